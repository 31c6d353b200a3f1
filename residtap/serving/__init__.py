"""Probes, steering, capture and early exit per request, on a continuous-batching engine.

    from residtap.serving import attach
    run = attach(manager, bank=bank, vectors={"mood": vec})   # a transformers manager
    with run:
        manager.start()
        rid = run.add_request(ids, max_new_tokens=16, probes=["mood"], steer=("mood", 2.0),
                              early_exit=("mood", 3.0))
        ...                                                   # the manager's output for rid
        run.scores(rid)["mood"]                               # one score per generated token

Modules: layout (PackedLayout: which rows of a packed forward are which request's, at which
positions), transformers_cb (the adapter: the only module that reads transformers' continuous
batching internals), spec (what a request may ask for, checked), run (the taps and per-request
results), server (`residtap serve`: an OpenAI-compatible HTTP server; needs the `serve` extra),
protocol (the OpenAI request and response bodies).
"""

from residtap.serving.layout import PackedLayout, Segment
from residtap.serving.run import ServingRun, attach
from residtap.serving.spec import Catalogue, RequestRecord, RequestSpec

__all__ = ["Catalogue", "PackedLayout", "RequestRecord", "RequestSpec", "Segment",
           "ServingRun", "attach"]
