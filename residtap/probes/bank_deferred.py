"""The deferred readout of a probe bank: decode steps staged, then read K at a time.

    ring = DeferredReadout(steps=16)
    ring.allocate(packs, batch, device)
    ring.add_step(slot, real)         # before a one-token decode step that stages
    ring.stage(pack, hidden)          # at each site, inside that forward
    lo, hi, staged = ring.take()      # {site: (B, n, d)} for slots lo..hi-1, to read now
    ring.take_valid()                 # (B, n) bool: which staged tokens were real

A decode step that scores one token per row does not multiply at all: each site keeps a
reference to its (B, 1, d) hidden state (a fresh tensor the model never writes into again;
under torch.compile, a copy into a staging ring of K steps at the ring index the site's own
device counter holds, which the compiled step advances itself and each readout sets back to
0, so a compiled step reads it at a fixed address and an eager step runs no kernel for it),
and the bank later reads all staged steps with one matmul per site, so the probe weights are
read once per K steps instead of once per step. Attention streams (bank_readouts.py) are fed
the n staged steps in order at the flush, with the real-token mask each step had
(`add_step(slot, real)`: the step's slice of the attention mask, kept by reference, or None
when the forward had no mask: all real). On a CPU, a small matmul right after a block's own
kernels is several times slower than the same call in a warm loop; see BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from residtap.probes.bank_layout import SitePack


class DeferredReadout:
    """Up to `steps` staged decode steps, covering consecutive slots from `first`."""

    def __init__(self, steps: int) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"defer must be an int >= 0 (decode steps staged per readout; 0 "
                             f"reads at every forward), got {steps!r}")
        self.steps = steps
        self.pending = 0  # steps staged and not yet read
        self.first = 0  # the slot of the first of them
        self.flushes = 0  # readouts of staged steps done
        self._held: dict[str, list[Tensor]] = {}  # site -> the staged steps' hidden (eager)
        self._ring: dict[str, Tensor] = {}  # site -> (steps, B, d) staged rows (compiled)
        self._at: dict[str, Tensor] = {}  # site -> (1,) long: its next ring index (compiled)
        self._real: list[Tensor | None] = []  # per staged step: (B, 1) mask slice, or None
        self._batch, self._device = 0, torch.device("cpu")

    def allocate(self, packs: Sequence[SitePack], batch: int, device: torch.device) -> None:
        self._batch, self._device = batch, device
        if not self.steps:
            return
        self._held = {p.site.name: [] for p in packs}
        self._ring = {
            p.site.name: torch.zeros(self.steps, batch, p.weight.shape[1],
                                     dtype=p.weight.dtype, device=device) for p in packs
        }
        self._at = {p.site.name: torch.zeros(1, dtype=torch.long, device=device) for p in packs}

    def continues(self, slot: int) -> bool:
        """Can a step filling `slot` join the staged ones (room left, the next slot)?"""
        return self.pending < self.steps and slot == self.first + self.pending

    def add_step(self, slot: int, real: Tensor | None = None) -> None:
        """The forward about to run stages its one token for `slot`; real (B, 1): whether the
        token is real (None: it is)."""
        if not self.pending:
            self.first = slot
            self._real.clear()
        self._real.append(real)
        self.pending += 1

    def stage(self, pack: SitePack, hidden: Tensor) -> None:
        """Keep one site's (B, 1, d) hidden state of the staging forward; no work now."""
        if torch.compiler.is_compiling():
            h = hidden[:, -1].to(pack.weight.dtype)[None]  # (1, B, d)
            at = self._at[pack.site.name]
            self._ring[pack.site.name].index_copy_(0, at, h)
            at.add_(1)
        else:
            self._held[pack.site.name].append(hidden)  # (B, 1, d)

    def take(self) -> tuple[int, int, dict[str, Tensor]]:
        """(lo, hi, {site: (B, n, d)}): the staged steps, slots lo..hi-1, handed over to read."""
        n, self.pending = self.pending, 0
        self.flushes += 1
        staged = {}
        for site, held in self._held.items():
            if held:  # eager forwards: their hidden states, (B, 1, d) each
                h = torch.cat(held, dim=1) if len(held) > 1 else held[0]  # (B, n, d)
                held.clear()
            else:  # compiled forwards: the staging ring
                h = self._ring[site][:n].transpose(0, 1)
                self._at[site].zero_()
            if h.shape[1] != n:
                raise RuntimeError(f"site {site!r} staged {h.shape[1]} steps but {n} forwards "
                                   "ran; mixing compiled and eager forwards in one deferred "
                                   "run is not supported (attach with defer=0)")
            staged[site] = h
        return self.first, self.first + n, staged

    def take_valid(self) -> Tensor | None:
        """(B, n) bool: which tokens of the steps just taken were real; None: all of them (no
        step had a mask)."""
        real, self._real = self._real, []
        if all(r is None for r in real):
            return None
        ones = torch.ones(self._batch, 1, dtype=torch.bool, device=self._device)
        return torch.cat([ones if r is None else r.to(self._device, torch.bool) for r in real],
                         dim=1)

    def drop_unfinished(self) -> tuple[int, int] | None:
        """After an error inside a forward, some sites may have staged its step and others not:
        keep the steps every site staged; returns the slots (lo, hi) of the rest, or None."""
        if not self.pending or not any(self._held.values()):
            return None  # nothing staged, or compiled forwards (whose ring holds whole steps)
        done = min(len(held) for held in self._held.values())
        for held in self._held.values():
            del held[done:]
        dropped = (self.first + done, self.first + self.pending)
        self.pending = done
        del self._real[done:]
        return dropped
