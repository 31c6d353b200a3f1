"""An attached probe bank: a tap block that scores every probe during the forwards inside it.

    with bank.attach(model, max_tokens=64) as run:     # a BankRun
        model.generate(**batch, max_new_tokens=64)
    run.results()["refusal"]                           # (B, 64, C)

A BankRun composes three parts, each in its own module:
- the slot planner (bank_slots.py): before each forward, called by the engine with its Step
  (`on_forward`), it works out which buffer slots the forward fills from Python ints
  (`step.past`, `step.length`) and resets on a new run. When only `model.forward` is compiled
  this runs outside the compiled graph, so the ints never reach it.
- the aggregates (bank_aggregates.py): max / mean / ema over each row's scored tokens.
- the deferred readout (bank_deferred.py): with `defer=K`, one-token decode steps are staged
  and read K at a time.
The tap at each site (`read`) is the device side: one `F.linear` per site, written into the
score buffer (attention probes and SAE features turn their columns into scores first:
bank_readouts.py; their per-run state, an attention stream per site, is reset with each run).
Under torch.compile it writes with `index_copy_` at a slot index held in one device tensor,
written in place before each forward, so a compiled step reads no Python int that changes
between decode steps (no recompile per step) and finds its inputs at fixed addresses (CUDA
graphs replay instead of recording again).

With `defer=K`, a staged run is read when the ring is full or the sequence of slots breaks;
`results()`, `aggregate()`, early exit, the streamer and leaving the `with` block flush first,
so every way of reading scores sees them all. Only `run.scores` read directly mid-generate
needs `flush()`.

An all-padding row (attention mask all zeros) has no last prompt token: in "last" and
"generated" its slot 0 is marked not valid (never scored, never aggregated), in eager and
compiled forwards alike, without reading anything back from the device. "prompt" and "all"
mark every pad not valid, so such a row simply has no valid slot. (Capture's positions="last"
refuses such a row instead: see residtap.positions.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residtap.engine import Step, TapBlock
from residtap.positions import check_positions
from residtap.probes.bank_aggregates import AGGREGATES, Aggregate, Aggregates
from residtap.probes.bank_deferred import DeferredReadout
from residtap.probes.bank_layout import Layout, SitePack
from residtap.probes.bank_readouts import site_scores
from residtap.probes.bank_results import ProbeResults
from residtap.probes.bank_slots import POSITION_MODES, BankPositions, ForwardSlots, SlotPlanner
from residtap.probes.early_exit import EarlyExit, ScoreStream, StepScores
from residtap.sites import Arch

log = logging.getLogger(__name__)

__all__ = ["AGGREGATES", "POSITION_MODES", "Aggregate", "BankPositions", "BankRun",
           "ProbeResults"]


class BankRun(TapBlock):
    """An attached bank: a tap block whose buffers hold the latest run's scores.

    Attributes (device tensors, fixed addresses once allocated):
        scores (B, max_tokens, P)  valid (B, max_tokens) bool  active (B,) bool
        aggregates {name: (B, P)}
    Python ints: `filled` (slots written in this run), `prompt_len`, `run_id`."""

    def __init__(
        self,
        layout: Layout,
        labels: dict[str, list[Any]],
        model: nn.Module,
        *,
        batch_size: int | None,
        max_tokens: int | None,
        positions: BankPositions,
        aggregate: Aggregate | Sequence[Aggregate],
        ema_alpha: float,
        dtype: torch.dtype,
        timed: bool,
        arch: Arch | None,
        defer: int = 0,
    ) -> None:
        self.positions = check_positions(positions, words=POSITION_MODES, indices=False,
                                         mask=False, stacklevel=5)  # the user's attach(...)
        names = (aggregate,) if isinstance(aggregate, str) else tuple(aggregate)
        self.aggregator = Aggregates(names, ema_alpha, dtype)
        self.deferred = DeferredReadout(defer)
        for label, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{label} must be a positive int or None, got {value!r}")
        self.packs, self.names, self.probe_columns, self.device = layout
        self.labels = labels  # probe -> the class of each of its columns
        self.dtype, self.timed = dtype, timed
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.scores: Tensor | None = None
        self.planner: SlotPlanner | None = None
        self.tap_seconds = 0.0
        self.tap_calls = 0
        self._streams: list[ScoreStream] = []
        # What `read` needs, set before each forward: no int that changes per step.
        self._slots: ForwardSlots | None = None  # this forward's slots; None: it fills none
        self._staging = False  # does this forward stage instead of reading?
        self._slot_index: Tensor | None = None  # (t,) long: the slots, for compiled readout
        self._states: dict[str, list[Any]] = {}  # site -> each segment's per-run state
        self._needs_valid = any(pack.streams for pack in self.packs)
        self._valid: Tensor | None = None  # (B, T) bool: this forward's real tokens (streams)
        if batch_size is not None and max_tokens is not None:
            self._allocate(batch_size, max_tokens)
        taps = {pack.site: _SiteReadout(self, pack) for pack in self.packs}
        super().__init__(model, taps, arch=arch, on_forward=self._on_forward)

    def _allocate(self, batch: int, max_tokens: int) -> None:
        P, dev = self.packs[-1].stop, self.device
        self.scores = torch.zeros(batch, max_tokens, P, dtype=self.dtype, device=dev)
        self.planner = SlotPlanner(self.positions, batch, max_tokens, dev)
        self.aggregator.allocate(batch, P, max_tokens, dev)
        self.deferred.allocate(self.packs, batch, dev)
        self._states = {p.site.name: [s.state(batch, dev) for s in p.segments]
                        for p in self.packs}
        self._valid_step = torch.ones(batch, 1, dtype=torch.bool, device=dev)  # decode steps
        self._slot_base = torch.arange(max_tokens, device=dev)  # (max_tokens,)
        self._slot_buf = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self._slot_one = self._slot_buf[:1]  # a decode step's slot: one fill, no slicing
        self._score_views = {p.site.name: self.scores[:, :, p.start:p.stop]  # (B, max, P_site)
                             for p in self.packs}
        self.batch_size, self.max_tokens = batch, max_tokens
        log.info("probe bank buffers: scores (%d, %d, %d) %s on %s", batch, max_tokens, P,
                 self.dtype, dev)

    # -- what the planner and the parts hold, under the names users read ---------------------
    @property
    def valid(self) -> Tensor | None:
        return self.planner.valid if self.planner is not None else None

    @property
    def active(self) -> Tensor | None:
        return self.planner.active if self.planner is not None else None

    @property
    def filled(self) -> int:
        return self.planner.filled if self.planner is not None else 0

    @property
    def prompt_len(self) -> int:
        return self.planner.prompt_len if self.planner is not None else 0

    @property
    def run_id(self) -> int:
        return self.planner.run_id if self.planner is not None else -1

    @property
    def aggregates(self) -> dict[str, Tensor]:
        return self.aggregator.buffers

    @property
    def defer(self) -> int:
        return self.deferred.steps

    @property
    def flushes(self) -> int:
        return self.deferred.flushes

    def __enter__(self) -> BankRun:
        super().__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None:
                self._drop_unfinished_step()
            self.flush()
            for stream in self._streams:
                stream.flush()
        finally:
            swallowed = super().__exit__(exc_type, exc, tb)
        return swallowed

    # -- per forward: the Python side ---------------------------------------------------------
    def _on_forward(self, step: Step) -> None:
        if self.timed:
            t0 = time.perf_counter()
            self._begin(step)
            self.tap_seconds += time.perf_counter() - t0
        else:
            self._begin(step)

    def _begin(self, step: Step) -> None:
        """Once per forward, before any site: plan the slots, stage or prepare the readout."""
        self._slots, self._staging = None, False
        deferred = self.deferred
        if deferred.pending and step.past == 0:
            self._flush()  # the previous run's last steps, before the new run resets
        if self.scores is None:
            if self.max_tokens is None and self.positions in ("generated", "all"):
                raise ValueError(
                    f"positions={self.positions!r} needs max_tokens (the number of "
                    "slots, e.g. max_new_tokens) to size the buffer; pass "
                    "bank.attach(model, max_tokens=...)"
                )
            default = 1 if self.positions == "last" else step.length
            self._allocate(self.batch_size or step.batch, self.max_tokens or default)
        if step.batch != self.batch_size:
            raise ValueError(
                f"the bank's buffers hold batch_size={self.batch_size} rows but this "
                f"forward has {step.batch}; attach with batch_size={step.batch}"
            )
        if step.past == 0:
            self.aggregator.reset()  # a new run: the planner starts over at slot 0 too
            for states in self._states.values():
                for state in states:
                    if state is not None:
                        state.reset()
        slots = self.planner.plan(step)
        if slots is None:
            return
        stage = (deferred.steps and step.past > 0 and slots.width == 1 and slots.pick is None)
        if deferred.pending and not (stage and deferred.continues(slots.lo)):
            self._flush()
        self._slots = slots
        mask = step.attention_mask  # (B, past + T): which tokens are real, for the streams
        real = mask[:, step.past:] if self._needs_valid and mask is not None else None
        if stage:
            deferred.add_step(slots.lo, real)
            self._staging = True
            return
        if self._needs_valid:
            self._valid = self._real_tokens(real, step)
        # the slot index a compiled readout writes at: one buffer, written in place
        if slots.width == 1:
            self._slot_index = self._slot_one.fill_(slots.lo)
        else:  # the slots lo..hi-1
            self._slot_index = torch.add(self._slot_base[:slots.width], slots.lo,
                                         out=self._slot_buf[:slots.width])
        if self.aggregator.names:
            self.aggregator.prepare(slots.weights.to(self.dtype))

    def _real_tokens(self, real: Tensor | None, step: Step) -> Tensor | None:
        """(B, T) bool: this forward's real tokens, for the attention streams (None: all); a
        one-token step's lives in one buffer written in place (a fixed address)."""
        if real is not None and step.length == 1:
            return self._valid_step.copy_(real)
        return None if real is None else real.to(self.device, torch.bool)

    # -- per site: the device side ------------------------------------------------------------
    def read(self, pack: SitePack, hidden: Tensor, step: Step) -> None:
        """The tap body: one fused matmul for the site, written into the buffers."""
        slots = self._slots
        if slots is None:
            return
        if hidden.shape[-1] != pack.weight.shape[1]:
            raise ValueError(
                f"probes at site {pack.site.name!r} expect width {pack.weight.shape[1]} but the "
                f"site produced {tuple(hidden.shape)}; attach probes trained at this site"
            )
        if self._staging:  # keep the token's rows; `flush` multiplies later
            self.deferred.stage(pack, hidden)
            return
        one = slots.pick is not None or slots.last_only  # one token per row is scored
        if one and pack.streams:  # a stream sees every token; read it after the last one
            s = self._site_scores(pack, hidden, self._valid)  # (B, T, P_site)
            s = self._one_token(s, slots)
        else:
            s = self._site_scores(pack, self._one_token(hidden, slots) if one else hidden,
                                  self._valid)  # (B, t, P_site)
        cols = slice(pack.start, pack.stop)
        if torch.compiler.is_compiling():
            # a device index: the graph must not specialise on the step's Python ints
            self._score_views[pack.site.name].index_copy_(1, self._slot_index, s.to(self.dtype))
        else:  # the same write, as a slice (cheaper in eager mode)
            self._score_views[pack.site.name][:, slots.lo:slots.hi] = s
        if self.aggregator.names:
            self.aggregator.add(cols, s.to(self.dtype))

    def _site_scores(self, pack: SitePack, h: Tensor, valid: Tensor | None) -> Tensor:
        """(B, t, P_site): the site's one matmul, then its segments' readouts (if any)."""
        proj = F.linear(h.to(pack.weight.dtype), pack.weight, pack.bias)  # (B, t, M_site)
        if not pack.segments:
            return proj
        return site_scores(pack, proj, valid, self._states[pack.site.name], self.dtype)

    @staticmethod
    def _one_token(x: Tensor, slots: ForwardSlots) -> Tensor:
        """(B, 1, ...) of x (B, T, ...): each row's picked position, or the last one."""
        if slots.pick is None:
            return x[:, -1:]
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, slots.pick][:, None]

    def _drop_unfinished_step(self) -> None:
        """After an error inside a forward, keep the steps every site staged and mark the
        rest's slots as not scored."""
        dropped = self.deferred.drop_unfinished()
        if dropped is not None:
            self.planner.unscored(*dropped)

    def flush(self) -> None:
        """Read the staged decode steps (if any): one matmul per site over all of them."""
        if self.deferred.pending:
            t0 = time.perf_counter()
            self._flush()
            if self.timed:
                self.tap_seconds += time.perf_counter() - t0

    def _flush(self) -> None:
        lo, hi, staged = self.deferred.take()
        real = self.deferred.take_valid()  # (B, n) bool, or None (no attention streams)
        if self.aggregator.names:
            self.aggregator.prepare(self.planner.valid[:, lo:hi].to(self.dtype))
        for pack in self.packs:
            h = staged[pack.site.name]  # (B, n, d)
            s = self._site_scores(pack, h, real)  # (B, n, P_site), the n steps in order
            self._score_views[pack.site.name][:, lo:hi] = s
            if self.aggregator.names:
                self.aggregator.add(slice(pack.start, pack.stop), s.to(self.dtype))

    # -- reading results ---------------------------------------------------------------------
    def aggregate(self, name: Aggregate) -> Tensor:
        """The aggregate (B, P) over the run so far (mean/ema normalised; NaN: no tokens yet)."""
        if name not in self.aggregates:
            raise LookupError(
                f"aggregate {name!r} was not requested; attach with "
                f"aggregate={name!r} (requested: {list(self.aggregates)})"
            )
        self.flush()
        return self.aggregator.value(name)

    def results(self, copy: bool = True) -> ProbeResults:
        """The latest run's scores, moved to the CPU (copied unless copy=False on CPU)."""
        if self.scores is None:
            raise LookupError(
                "no forward has run with this bank attached; call the model "
                "inside the `with bank.attach(...)` block first"
            )
        self.flush()
        scores = self.scores[:, : self.filled]
        valid = self.valid[:, : self.filled]
        aggs = {a: self.aggregate(a).cpu() for a in self.aggregates}
        if copy:
            scores, valid = scores.clone(), valid.clone()
        return ProbeResults(
            self.names, dict(self.probe_columns), self.positions, scores.cpu(), valid.cpu(), aggs
        )

    def column(self, name: str, cls: Any = None) -> int:
        """Buffer column of probe `name` (class `cls` for multi-class probes)."""
        if name not in self.probe_columns:
            raise LookupError(f"no probe named {name!r} in the bank; probes: {list(self.labels)}")
        cols = self.probe_columns[name]
        if len(cols) == 1:
            return cols[0]
        labels = self.labels[name]
        if cls is None or cls not in labels:
            raise LookupError(
                f"probe {name!r} has {len(cols)} classes {labels}; pass "
                f"cls=<one of them> (got {cls!r})"
            )
        return cols[labels.index(cls)]

    def early_exit(
        self,
        probe: str,
        threshold: float,
        *,
        patience: int = 1,
        cls: Any = None,
        direction: Literal["above", "below", "either"] = "above",
    ) -> EarlyExit:
        """A transformers StoppingCriteria stopping each row whose probe score passes
        `threshold` (direction "above", "below" or "either": |score|) for `patience`
        consecutive generated tokens (see early_exit.py)."""
        return EarlyExit(self, probe, threshold, patience=patience, cls=cls, direction=direction)

    def streamer(self, callback: Callable[[StepScores], None]) -> ScoreStream:
        """A transformers StoppingCriteria (never stops) that hands each step's new scores to
        `callback(StepScores)` while generate runs (see early_exit.py)."""
        stream = ScoreStream(self, callback)
        self._streams.append(stream)
        return stream


class _SiteReadout:
    """The tap installed at one site: hands the hidden state to the run's fused readout."""

    def __init__(self, run: BankRun, pack: SitePack) -> None:
        self.run, self.pack = run, pack

    def __call__(self, hidden: Tensor, step: Step) -> None:
        run = self.run
        if run.timed:
            t0 = time.perf_counter()
            run.read(self.pack, hidden, step)
            run.tap_seconds += time.perf_counter() - t0
            run.tap_calls += 1
        else:
            run.read(self.pack, hidden, step)
