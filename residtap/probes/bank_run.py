"""An attached probe bank: the per-forward bookkeeping, the in-forward readout, the results.

    with bank.attach(model, max_tokens=64) as run:     # a BankRun
        model.generate(**batch, max_new_tokens=64)
    run.results()["refusal"]                           # (B, 64, C)

Each forward has two halves (see `BankRun`):
- `_begin`, from a forward pre-hook on the model's root: the Python side. It works out which
  slots this forward fills from the engine's Python ints (`step.past`, `step.length`), resets
  on a new run, and checks the buffer is large enough. When only `model.forward` is compiled
  this runs outside the compiled graph, so the ints never reach it.
- `read`, the tap at each site: the device side. One `F.linear` per site, written into the
  score buffer with `index_copy_` at a slot index held in a device tensor. It reads no Python
  int that changes between decode steps, so a compiled forward does not specialise (and
  recompile) on the step: compiled `generate` builds the same graphs with and without a bank.

Deferred readout (`defer=K`): a decode step that scores one token per row does not multiply at
all; each site keeps a reference to its (B, 1, d) hidden state (a fresh tensor the model never
writes into again; under torch.compile, a copy into a staging ring of K steps), and `flush()`
later reads all staged steps with one matmul per site, so the probe weights are read once per K
steps instead of once per step. On a CPU, a small matmul right after a block's own kernels is
several times slower than the same call in a warm loop; see BENCHMARKS.md.
`_begin` flushes when the ring is full or the sequence of slots breaks; `results()`,
`aggregate()`, early exit, the streamer and leaving the `with` block flush first, so every way
of reading scores sees them all. Only `run.scores` read directly mid-generate needs `flush()`.

An all-padding row (attention mask all zeros) has no last prompt token: "prompt_last" and
"generated" refuse it at the prefill with a ValueError naming the row, as positions="last" does
in capture (residtap.positions), instead of scoring a pad. That check reads one bool per run
(at the prefill); a forward traced by torch.compile cannot raise on a device value, so there the
row's slot is marked not valid instead, never scored as if it were real. "prompt" and "all"
mark every pad not valid, so such a row simply has no valid slot.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residtap.engine import Step, TapBlock
from residtap.sites import Arch

if TYPE_CHECKING:
    from residtap.probes.bank import ProbeBank, _Pack
    from residtap.probes.early_exit import EarlyExit, ScoreStream, StepScores

log = logging.getLogger(__name__)

BankPositions = Literal["generated", "prompt_last", "prompt", "all"]
Aggregate = Literal["max", "mean", "ema"]
POSITION_MODES: tuple[str, ...] = ("generated", "prompt_last", "prompt", "all")
AGGREGATES: tuple[str, ...] = ("max", "mean", "ema")


class BankRun(TapBlock):
    """An attached bank: a tap block whose buffers hold the latest run's scores.

    Attributes (device tensors, fixed addresses once allocated):
        scores (B, max_tokens, P)  valid (B, max_tokens) bool  active (B,) bool
        aggregates {name: (B, P)}
    Python ints: `filled` (slots written in this run), `prompt_len`, `run_id`."""

    def __init__(
        self,
        bank: ProbeBank,
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
        if len(bank) == 0:
            raise ValueError(
                "the probe bank is empty; add probes with bank.add(name, weight, "
                "bias, site=...) before attaching it"
            )
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        aggs = (aggregate,) if isinstance(aggregate, str) else tuple(aggregate)
        for a in aggs:
            if a not in AGGREGATES:
                raise ValueError(f"aggregate must be among {AGGREGATES}, got {a!r}")
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        if not isinstance(defer, int) or isinstance(defer, bool) or defer < 0:
            raise ValueError(f"defer must be an int >= 0 (decode steps staged per readout; 0 "
                             f"reads at every forward), got {defer!r}")
        for label, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{label} must be a positive int or None, got {value!r}")
        self.bank, self.positions, self.aggregate_names = bank, positions, aggs
        self.ema_alpha, self.dtype, self.timed = float(ema_alpha), dtype, timed
        layout = bank.layout(model, arch)
        self.packs, self.names, self.probe_columns, self.device = layout
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.scores: Tensor | None = None
        self.valid: Tensor | None = None
        self.active: Tensor | None = None
        self.aggregates: dict[str, Tensor] = {}
        self.filled = 0
        self.prompt_len = 0
        self.run_id = -1
        self.tap_seconds = 0.0
        self.tap_calls = 0
        self._root_handle: Any = None  # the forward pre-hook that runs `_begin`
        # What `read` needs, set by `_begin` each forward. No int that changes per step.
        self._writes = False  # does this forward fill any slot?
        self._last_only = False  # read only the last position (prefill, no mask)
        self._pick: Tensor | None = None  # (B,) position read per row, or None
        self._span = (0, 0)  # the slots lo..hi-1 this forward fills (eager readout)
        self._slots: Tensor | None = None  # (t,) long: the same slots (compiled readout)
        self._weights: Tensor | None = None  # (B, t) aggregation weight of each scored token
        self._ema: tuple[Tensor, Tensor] | None = None  # per-token weights, total decay
        self._sum_w: Tensor | None = None  # (B, 1) tokens aggregated (mean)
        self._ema_left: Tensor | None = None  # (B, 1) weight of the ema's zero start
        self.defer = defer
        self._held: dict[str, list[Tensor]] = {}  # site -> the staged steps' hidden (eager)
        self._stage: dict[str, Tensor] = {}  # site -> (defer, B, d) staged rows (compiled)
        self._staging = False  # does this forward stage instead of reading?
        self._stage_index: Tensor | None = None  # (1,) ring position this forward stages into
        self._pending = 0  # steps staged and not yet read
        self._pending_lo = 0  # the slot of the first of them
        self.flushes = 0  # deferred readouts done (each reads its staged steps at every site)
        if batch_size is not None and max_tokens is not None:
            self._allocate(batch_size, max_tokens)
        taps = {pack.site: _SiteReadout(self, pack) for pack in self.packs}
        super().__init__(model, taps, arch=arch)

    def _allocate(self, batch: int, max_tokens: int) -> None:
        P = self.packs[-1].stop
        dev = self.device
        self.scores = torch.zeros(batch, max_tokens, P, dtype=self.dtype, device=dev)
        self.valid = torch.zeros(batch, max_tokens, dtype=torch.bool, device=dev)
        self.active = torch.ones(batch, dtype=torch.bool, device=dev)
        self.aggregates = {
            a: torch.zeros(batch, P, dtype=self.dtype, device=dev) for a in self.aggregate_names
        }
        self._sum_w = torch.zeros(batch, 1, dtype=self.dtype, device=dev)
        self._ema_left = torch.ones(batch, 1, dtype=self.dtype, device=dev)
        if self.defer:
            self._held = {p.site.name: [] for p in self.packs}
            self._stage = {
                p.site.name: torch.zeros(self.defer, batch, p.weight.shape[1],
                                         dtype=p.weight.dtype, device=dev) for p in self.packs
            }
            ring = torch.arange(self.defer, device=dev)
            self._stage_slots = [ring[i:i + 1] for i in range(self.defer)]  # (1,) each
        self.batch_size, self.max_tokens = batch, max_tokens
        log.info("probe bank buffers: scores (%d, %d, %d) %s on %s", batch, max_tokens, P,
                 self.dtype, dev)

    def __enter__(self) -> BankRun:
        super().__enter__()  # the engine's root pre-hook exists now: ours runs after it
        try:
            self._root_handle = self.model.register_forward_pre_hook(self._on_forward)
        except BaseException:
            super().__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None:
                self._drop_unfinished_step()
            self.flush()
            for stream in getattr(self, "_streams", []):
                stream.flush()
        finally:
            handle, self._root_handle = self._root_handle, None
            try:
                if handle is not None:
                    handle.remove()
            finally:
                swallowed = super().__exit__(exc_type, exc, tb)
        return swallowed

    # -- per forward: the Python side ---------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: tuple) -> None:
        if self.timed:
            t0 = time.perf_counter()
            self._begin(self.step)
            self.tap_seconds += time.perf_counter() - t0
        else:
            self._begin(self.step)

    def _begin(self, step: Step) -> None:
        """Once per forward, before any site: work out the slots, reset on a new run."""
        B, T, past = step.batch, step.length, step.past
        self._writes = self._staging = False
        if self._pending and past == 0:
            self._flush()  # the previous run's last steps, before the new run resets
        if self.scores is None:
            if self.max_tokens is None and self.positions in ("generated", "all"):
                raise ValueError(
                    f"positions={self.positions!r} needs max_tokens (the number of "
                    "slots, e.g. max_new_tokens) to size the buffer; pass "
                    "bank.attach(model, max_tokens=...)"
                )
            default = 1 if self.positions == "prompt_last" else T
            self._allocate(self.batch_size or B, self.max_tokens or default)
        if B != self.batch_size:
            raise ValueError(
                f"the bank's buffers hold batch_size={self.batch_size} rows but this "
                f"forward has {B}; attach with batch_size={B}"
            )
        mask = step.attention_mask
        needs_real = past == 0 or self.positions == "all"
        # (B, T): which of this forward's tokens are real (None: all of them)
        real = mask[:, past:].bool() if mask is not None and needs_real else None
        has_real = None  # (B,) bool: rows with a last real token, for the last-token modes
        if past == 0 and real is not None and self.positions in ("generated", "prompt_last"):
            has_real = real.any(dim=1)
            if not torch.compiler.is_compiling() and not bool(has_real.all()):  # one sync a run
                row = int((~has_real).nonzero()[0])
                raise ValueError(
                    f"row {row} of the batch has no real token (its attention mask is all "
                    f"zeros), so positions={self.positions!r} has no last prompt token to "
                    "score; remove empty prompts from the batch"
                )
        if past == 0:
            self._new_run(T)
        elif self.run_id < 0:
            raise ValueError(
                "the bank saw a decode step without the prefill before it (the "
                "forward received a KV cache); attach the bank before the first "
                "forward of the sequence"
            )
        mode = self.positions
        self._pick, self._last_only = None, False
        if mode == "generated" or mode == "prompt_last":
            if past == 0:
                slots = (0, 1)
                self._pick = self._last_real(real, T)
                self._last_only = self._pick is None
                weights = self.active[:, None]
                if has_real is not None:  # compiled: no error possible, so never a pad's score
                    weights = weights & has_real[:, None]
            elif mode == "generated":
                first = past - self.prompt_len + 1
                slots = (first, first + T)
                weights = self.active[:, None].expand(B, T)
            else:
                return
        elif mode == "prompt":
            if past != 0:
                return
            slots = (0, T)
            weights = real if real is not None else self.active[:, None].expand(B, T)
        else:  # "all"
            slots = (past, past + T)
            w = self.active[:, None].expand(B, T)
            weights = w & real if real is not None else w
        lo, hi = slots
        if hi > self.max_tokens:
            raise ValueError(
                f"the probe bank's buffer has {self.max_tokens} slots per row but this forward "
                f"needs slots {lo}..{hi - 1} (positions={mode!r}); attach with a larger "
                "max_tokens (>= max_new_tokens for 'generated')"
            )
        self._writes = True
        self._span = slots
        self.valid[:, lo:hi] = weights
        self.filled = hi
        stage = self.defer and past > 0 and hi - lo == 1 and self._pick is None
        if self._pending and (not stage or self._pending == self.defer
                              or lo != self._pending_lo + self._pending):
            self._flush()
        if stage:
            if not self._pending:
                self._pending_lo = lo
            self._staging = True
            self._stage_index = self._stage_slots[self._pending]
            self._pending += 1
            return
        self._slots = torch.arange(lo, hi, device=self.device)
        if self.aggregate_names:
            self._prepare_aggregates(weights.to(self.dtype))

    def _new_run(self, T: int) -> None:
        self.run_id += 1
        self.prompt_len = T
        self.filled = 0
        self.valid.zero_()
        self.active.fill_(True)
        for name, buf in self.aggregates.items():
            buf.fill_(-math.inf if name == "max" else 0.0)
        self._sum_w.zero_()
        self._ema_left.fill_(1.0)

    def _last_real(self, real: Tensor | None, T: int) -> Tensor | None:
        if real is None:
            return None  # the last position of every row
        arange = torch.arange(T, device=real.device)
        return torch.where(real, arange, -1).amax(dim=1).clamp(min=0)  # (B,)

    def _prepare_aggregates(self, w: Tensor) -> None:
        """Per-forward terms shared by every site: token weights, mean counts, ema decay."""
        self._weights = w  # (B, t) in {0, 1}
        if "mean" in self.aggregate_names:
            self._sum_w.add_(w.sum(dim=1, keepdim=True))
        if "ema" in self.aggregate_names:
            decay = 1.0 - self.ema_alpha * w  # (B, t)
            # weight of token t in this update: a * w_t * prod_{u > t} decay_u
            later = torch.flip(torch.cumprod(torch.flip(decay, [1]), dim=1), [1])  # prod_{u>=t}
            total = later[:, :1]  # (B, 1) prod over all tokens
            after = torch.cat([later[:, 1:], torch.ones_like(total)], dim=1)  # prod_{u>t}
            self._ema = (self.ema_alpha * w * after, total)
            self._ema_left.mul_(total)

    # -- per site: the device side ------------------------------------------------------------
    def read(self, pack: _Pack, hidden: Tensor, step: Step) -> None:
        """The tap body: one fused matmul for the site, written into the buffers."""
        if not self._writes:
            return
        if hidden.shape[-1] != pack.weight.shape[1]:
            raise ValueError(
                f"probes at site {pack.site.name!r} expect width {pack.weight.shape[1]} but the "
                f"site produced {tuple(hidden.shape)}; attach probes trained at this site"
            )
        if self._staging:  # keep the token's rows; `flush` multiplies later
            if torch.compiler.is_compiling():
                h = hidden[:, -1].to(pack.weight.dtype)[None]  # (1, B, d)
                self._stage[pack.site.name].index_copy_(0, self._stage_index, h)
            else:
                self._held[pack.site.name].append(hidden)  # (B, 1, d): no work now
            return
        if self._pick is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            h = hidden[rows, self._pick][:, None]  # (B, 1, d)
        elif self._last_only:
            h = hidden[:, -1:]  # (B, 1, d)
        else:
            h = hidden  # (B, t, d)
        s = F.linear(h.to(pack.weight.dtype), pack.weight, pack.bias)  # (B, t, P_site)
        if torch.compiler.is_compiling():
            # a device index: the graph must not specialise on the step's Python ints
            self.scores[:, :, pack.start : pack.stop].index_copy_(1, self._slots, s.to(self.dtype))
        else:  # the same write, as a slice (cheaper in eager mode)
            lo, hi = self._span
            self.scores[:, lo:hi, pack.start : pack.stop] = s
        if self.aggregate_names:
            self._aggregate(pack, s.to(self.dtype))

    def _drop_unfinished_step(self) -> None:
        """After an error inside a forward, some sites may have staged its step and others not:
        keep the steps every site staged, and mark the rest's slots as not scored."""
        if not self._pending or not any(self._held.values()):
            return  # nothing staged, or compiled forwards (whose ring holds whole steps)
        done = min(len(held) for held in self._held.values())
        for held in self._held.values():
            del held[done:]
        self.valid[:, self._pending_lo + done:self._pending_lo + self._pending] = False
        self.filled = min(self.filled, self._pending_lo + done)
        self._pending = done

    def flush(self) -> None:
        """Read the staged decode steps (if any): one matmul per site over all of them."""
        if self._pending:
            t0 = time.perf_counter()
            self._flush()
            if self.timed:
                self.tap_seconds += time.perf_counter() - t0

    def _flush(self) -> None:
        n, self._pending = self._pending, 0
        self.flushes += 1
        lo, hi = self._pending_lo, self._pending_lo + n
        if self.aggregate_names:
            self._prepare_aggregates(self.valid[:, lo:hi].to(self.dtype))
        for pack in self.packs:
            held = self._held[pack.site.name]
            if held:  # eager forwards: their hidden states, (B, 1, d) each
                h = torch.cat(held, dim=1) if len(held) > 1 else held[0]  # (B, n, d)
                held.clear()
            else:  # compiled forwards: the staging ring
                h = self._stage[pack.site.name][:n].transpose(0, 1)
            if h.shape[1] != n:
                raise RuntimeError(f"site {pack.site.name!r} staged {h.shape[1]} steps but {n} "
                                   "forwards ran; mixing compiled and eager forwards in one "
                                   "deferred run is not supported (attach with defer=0)")
            s = F.linear(h.to(pack.weight.dtype), pack.weight, pack.bias)  # (B, n, P_site)
            self.scores[:, lo:hi, pack.start:pack.stop] = s
            if self.aggregate_names:
                self._aggregate(pack, s.to(self.dtype))

    def _aggregate(self, pack: _Pack, s: Tensor) -> None:
        w = self._weights[..., None]  # (B, t, 1)
        cols = slice(pack.start, pack.stop)
        if "max" in self.aggregates:
            buf = self.aggregates["max"][:, cols]
            buf.copy_(torch.maximum(buf, torch.where(w > 0, s, -math.inf).amax(dim=1)))
        if "mean" in self.aggregates:
            self.aggregates["mean"][:, cols].add_((s * w).sum(dim=1))
        if "ema" in self.aggregates:
            per_token, total = self._ema
            buf = self.aggregates["ema"][:, cols]
            buf.mul_(total).add_((s * per_token[..., None]).sum(dim=1))

    # -- reading results ---------------------------------------------------------------------
    def aggregate(self, name: Aggregate) -> Tensor:
        """The aggregate (B, P) over the run so far (mean/ema normalised; NaN: no tokens yet)."""
        if name not in self.aggregates:
            raise LookupError(
                f"aggregate {name!r} was not requested; attach with "
                f"aggregate={name!r} (requested: {list(self.aggregates)})"
            )
        self.flush()
        buf = self.aggregates[name]
        if name == "max":
            return buf.clone()
        denom = self._sum_w if name == "mean" else 1.0 - self._ema_left
        return buf / denom

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
            raise LookupError(f"no probe named {name!r} in the bank; probes: {self.bank.names}")
        cols = self.probe_columns[name]
        if len(cols) == 1:
            return cols[0]
        probe = next(p for p in self.bank.probes if p.name == name)
        labels = probe.classes if len(probe.classes) == len(cols) else list(range(len(cols)))
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
        from residtap.probes.early_exit import EarlyExit

        return EarlyExit(self, probe, threshold, patience=patience, cls=cls, direction=direction)

    def streamer(self, callback: Callable[[StepScores], None]) -> ScoreStream:
        """A transformers StoppingCriteria (never stops) that hands each step's new scores to
        `callback(StepScores)` while generate runs (see early_exit.py)."""
        from residtap.probes.early_exit import ScoreStream

        stream = ScoreStream(self, callback)
        if not hasattr(self, "_streams"):
            self._streams = []
        self._streams.append(stream)
        return stream


class _SiteReadout:
    """The tap installed at one site: hands the hidden state to the run's fused readout."""

    def __init__(self, run: BankRun, pack: _Pack) -> None:
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
        return None


@dataclass
class ProbeResults:
    """Scores of one run, per row, token and probe column (CPU tensors).

    scores (B, T, P); valid (B, T) bool: real tokens scored while the row was running;
    names: the P column names ('probe' or 'probe:class'); aggregates {name: (B, P)}."""

    names: list[str]
    probe_columns: dict[str, list[int]]
    positions: str
    scores: Tensor
    valid: Tensor
    aggregates: dict[str, Tensor]

    def __getitem__(self, probe: str) -> Tensor:
        """(B, T, C) scores of one probe (C = its classes, 1 for a binary probe)."""
        if probe not in self.probe_columns:
            raise LookupError(
                f"no probe {probe!r} in these results; probes: {list(self.probe_columns)}"
            )
        return self.scores[..., self.probe_columns[probe]]

    def rows(self) -> list[dict[str, Tensor]]:
        """Per row (request): {column name: (n_b,) scores at its valid tokens}."""
        out = []
        for b in range(self.scores.shape[0]):
            kept = self.scores[b][self.valid[b]]  # (n_b, P)
            out.append({n: kept[:, i] for i, n in enumerate(self.names)})
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per row, per column, the list of valid-token scores, and aggregates."""
        rows = [{n: v.tolist() for n, v in r.items()} for r in self.rows()]
        aggs = {
            a: [dict(zip(self.names, row, strict=True)) for row in t.tolist()]
            for a, t in self.aggregates.items()
        }
        return {
            "positions": self.positions,
            "columns": self.names,
            "rows": rows,
            "aggregates": aggs,
        }
