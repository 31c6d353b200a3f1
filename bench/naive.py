"""The naive probe readout residtap is measured against: one Python forward hook per probe,
reading its score back to the host with `.tolist()` at every forward.

    with naive_hooks(model, bank) as sink:     # bank: a residtap ProbeBank of binary probes
        model.generate(...)
    len(sink)                                  # forwards x probes

These hooks are registered directly on the model's blocks, not through residtap's engine,
which is the point of the baseline; no module of the residtap package may do that
(tests/test_structure.py), so it lives here. `residtap bench probes` loads this file from the
source checkout (residtap.benchmark.probes.naive_hooks); bench/gpu_probes.py imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from residtap.hooks import hidden_of
from residtap.sites import blocks


class NaiveProbe:
    """The usual way: a forward hook per probe reading its score back to Python."""

    def __init__(self, weight: Tensor, bias: float, sink: list) -> None:
        self.weight, self.bias, self.sink = weight, bias, sink

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        h = hidden_of(output)[:, -1]  # (B, d) last position
        self.sink.append((h @ self.weight + self.bias).tolist())  # host sync per probe


@contextlib.contextmanager
def naive_hooks(model: nn.Module, bank: Any) -> Iterator[list]:
    """A hook per probe of `bank` (sites `layers.{i}`, binary probes) on block i; the scores
    go to the yielded list. Every hook is removed on exit, also after an exception."""
    sink: list = []
    handles = []
    try:
        for p in bank.probes:
            module = blocks(model)[int(p.site.split(".")[1])]
            handles.append(module.register_forward_hook(
                NaiveProbe(p.weight[0].to(model.dtype), float(p.bias[0]), sink)))
        yield sink
    finally:
        for h in handles:
            h.remove()
