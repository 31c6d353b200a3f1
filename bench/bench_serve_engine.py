"""The serving run without HTTP: transformers' continuous batching manager driven in-process.

    python bench/bench_serve_engine.py [--model reference] [--bank linear] [--clients 32]
                                       [--repeats 12]

The reference model (residtap.benchmark.reference_model) or the organism, 1 torch thread, the
CPU paged-cache sizes of `residtap serve`; `--clients` prompts of 8-24 random token ids, 64 new
tokens each, added right after the manager starts. Three variants per repeat, in a rotating order:
    plain     no residtap
    attached  a ServingRun with the bank; requests ask nothing
    scoring   the same; every request asks for 4 probes' scores per token (all of an SAE's)
Banks: "linear" 1000 random probes (1000 / L per layer); "attention" and "sae" those of
`residtap bench readouts` (residtap.benchmark.readouts: 8 four-head attention probes, or 100
features of an SAE, at the middle layer), whose requests each pool over their own tokens.
Reported: median wall and process CPU seconds per variant, the time inside residtap's handlers
(engine.timing), and per variant the CPU cost against plain, paired within each repeat; for
"scoring", the handler time per forward split into the run's parts (each timed around its call):
the plan (the layout read and the forward's plan, before it runs), the score taps (their packed
matmuls), the end of the forward (the host read and the scores given to their requests), and
the rest (the engine's dispatch to them, with the timing's own calls).
What bench_serve.py measures minus the web stack and the clients: where a cost beyond the
handlers comes from (BENCHMARKS.md, "Serving under load").
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from typing import Any

import torch
from transformers import GenerationConfig

from residtap.benchmark import random_bank, reference_model
from residtap.benchmark.readouts import (
    ReadoutConfig,
    load_model,
    middle_site,
    random_sae,
    readout_banks,
)
from residtap.cli.serve import CPU_SIZES
from residtap.engine import timing
from residtap.organism import load
from residtap.serving import attach
from residtap.serving import transformers_cb as cb
from residtap.serving.run import ServingRun
from residtap.serving.taps import ScoreTap
from residtap.sites import layer_sites

VARIANTS = ("plain", "attached", "scoring")
PARTS = {"plan": (ServingRun, "_on_forward"), "score taps": (ScoreTap, "__call__"),
         "end of forward": (ServingRun, "_end_of_forward")}
spent = dict.fromkeys(PARTS, 0.0)  # seconds inside each part, all runs


def timed(part: str) -> None:
    """Add the time of every call of PARTS[part] to spent[part]."""
    cls, name = PARTS[part]
    inner = getattr(cls, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - t0

    setattr(cls, name, wrapper)
ORDERS = [(0, 1, 2), (2, 1, 0), (1, 2, 0), (0, 2, 1), (2, 0, 1), (1, 0, 2)]


def one(model, bank, asks: list[str], prompts: list[list[int]], variant: str
        ) -> tuple[float, float, float, int, dict[str, float]]:
    """(wall s, process CPU s, handler s, forwards, {part: s}) of one batch of requests, start
    to last result."""
    before = dict(spent)
    config = GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=-1)
    manager = model.init_continuous_batching(
        generation_config=config, continuous_batching_config=cb.serving_config(**CPU_SIZES))
    run = attach(manager, bank=bank) if variant != "plain" else None
    with (run or contextlib.nullcontext()), \
            (timing(model) if run else contextlib.nullcontext()) as clock:
        manager.start()
        t0, c0 = time.perf_counter(), time.process_time()
        for p in prompts:
            if run is None:
                manager.add_request(p, max_new_tokens=64)
            else:
                run.add_request(p, max_new_tokens=64,
                                probes=asks if variant == "scoring" else None)
        done = 0
        while done < len(prompts):
            out = manager.get_result(timeout=60)
            done += out is not None and out.is_finished()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        manager.stop(block=True)
    parts = {k: spent[k] - before[k] for k in spent}
    return wall, cpu, clock.seconds if run else 0.0, run.forwards if run else 0, parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["reference", "organism"], default="reference")
    p.add_argument("--bank", choices=["linear", "attention", "sae"], default="linear")
    p.add_argument("--clients", type=int, default=32, help="requests per batch")
    p.add_argument("--repeats", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(1)
    for part in PARTS:
        timed(part)
    model = reference_model() if args.model == "reference" else load()[0]
    if args.bank == "linear":
        bank = random_bank(model, -(-1000 // len(layer_sites(model))), "all")
    else:
        cfg = ReadoutConfig(model=args.model)
        sae = (load_model(cfg)[1] if args.model == "organism" else
               random_sae(model.config.hidden_size, cfg.reference_d_sae, middle_site(model)))
        bank = readout_banks(model, sae, cfg)[args.bank]
    names = [probe.name for probe in bank.probes]
    asks = names[:: max(1, len(names) // 4)][:4]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(rng.randint(8, 24))]
               for _ in range(args.clients)]
    for v in VARIANTS:  # warm-up, not counted
        one(model, bank, asks, prompts, v)
    res: dict[str, list[tuple]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for i in ORDERS[r % len(ORDERS)]:
            res[VARIANTS[i]].append(one(model, bank, asks, prompts, VARIANTS[i]))
    for v in VARIANTS:
        print(f"{v:9s} wall {statistics.median(x[0] for x in res[v]):.3f} s, CPU "
              f"{statistics.median(x[1] for x in res[v]):.3f} s, handlers "
              f"{statistics.median(x[2] for x in res[v]):.3f} s")
    for v in VARIANTS[1:]:
        costs = [b[1] / a[1] - 1 for a, b in zip(res["plain"], res[v], strict=True)]
        print(f"{v:9s} CPU cost vs plain, paired: median {100 * statistics.median(costs):+.2f}% "
              f"[{100 * min(costs):+.1f}, {100 * max(costs):+.1f}]")
    scoring = res["scoring"]
    forwards = sum(x[3] for x in scoring)
    per = {k: sum(x[4][k] for x in scoring) / forwards for k in PARTS}
    per["rest"] = sum(x[2] for x in scoring) / forwards - sum(per.values())
    wall = sum(x[0] for x in scoring) / forwards
    print(f"scoring, per forward ({forwards / len(scoring):.0f} forwards a run, "
          f"{1e3 * wall:.2f} ms each): " + ", ".join(
              f"{k} {1e6 * t:.0f} us ({100 * t / wall:.2f}%)" for k, t in per.items()))


if __name__ == "__main__":
    main()
