"""Probe-driven early exit and live score streaming for `model.generate`.

    with bank.attach(model, max_tokens=64) as run:
        stop = run.early_exit("answer_ready", threshold=2.0, patience=3)
        live = run.streamer(lambda s: print(s.start, s.scores.shape))
        out = model.generate(**batch, max_new_tokens=64, stopping_criteria=[stop, live])
    stop.report()       # which rows stopped early, at which token, tokens saved

The probe may be any bank column: a linear probe's, an attention probe's (its score after each
token pools the whole prefix) or an SAE feature's / a probe folded on SAE features
(residtap.probes.bank_readouts). What it saves on a data set, for several probes side by side:
residtap.probes.early_exit_curve.

Both are `transformers.StoppingCriteria`: generate calls them after each new token, outside the
model's forward (so they never sit inside a compiled graph). `EarlyExit` returns a per-row bool
tensor (transformers >= 4.39 stops rows individually; in 5.x a stopped row is padded with
`pad_token_id` when an EOS criterion is active, else it keeps decoding but is marked finished).
It keeps its state on the device and does no host synchronisation.

`ScoreStream` hands the slots written since its last call to a callback. On CPU the callback
gets views of the bank's own buffer (no copy). On CUDA the slots are copied into pinned host
buffers with non-blocking copies and a recorded event, and delivered once the event has
completed (normally on the next step; the rest when the `attach` block exits). The CUDA path is
written but untested here (no GPU in the test environment).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from transformers import StoppingCriteria

log = logging.getLogger(__name__)

Direction = Literal["above", "below", "either"]


class ScoredRun(Protocol):
    """What early exit and streaming read of an attached bank (a bank_run.BankRun): its score
    buffers and their bookkeeping. Named here, so this module imports no bank module."""

    positions: str
    names: list[str]
    max_tokens: int | None
    scores: Tensor | None  # (B, max_tokens, P)
    valid: Tensor | None  # (B, max_tokens) bool
    active: Tensor | None  # (B,) bool, cleared here for rows that stop
    filled: int  # slots written in this run
    run_id: int

    def flush(self) -> None: ...

    def column(self, name: str, cls: Any = None) -> int: ...


@dataclass
class EarlyExitReport:
    """What an EarlyExit did in its run. Lists have one entry per row (request).

    stop_token: index of the last generated token the row kept (-1: never stopped);
    tokens_saved: max_new_tokens - tokens kept, for stopped rows (what a serving engine that
    frees finished rows saves); steps_saved: decode forwards the whole batch skipped."""

    stopped: list[bool]
    stop_token: list[int]
    tokens_kept: list[int]
    tokens_saved: list[int]
    steps_run: int
    steps_saved: int

    @property
    def total_saved(self) -> int:
        return sum(self.tokens_saved)

    def trim(self, sequences: Tensor, prompt_len: int) -> list[list[int]]:
        """Each row's generated tokens, cut after the token where it stopped."""
        out = []
        for b, kept in enumerate(self.tokens_kept):
            out.append(sequences[b, prompt_len : prompt_len + kept].tolist())
        return out


class EarlyExit(StoppingCriteria):
    """Stop a row once probe `probe` scores above (or below, or beyond +-) `threshold` on
    `patience` consecutive generated tokens. Made by `BankRun.early_exit(...)`."""

    def __init__(
        self,
        run: ScoredRun,
        probe: str,
        threshold: float,
        *,
        patience: int = 1,
        cls: Any = None,
        direction: Direction = "above",
    ) -> None:
        if run.positions != "generated":
            raise ValueError(
                f"early exit reads the score of each new token; attach the bank "
                f"with positions='generated' (got {run.positions!r})"
            )
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1 (consecutive tokens), got {patience!r}")
        if direction not in ("above", "below", "either"):
            raise ValueError(f"direction must be 'above', 'below' or 'either' (|score| > "
                             f"threshold), got {direction!r}")
        self.run, self.probe, self.threshold = run, probe, float(threshold)
        self.patience, self.direction = patience, direction
        self.col = run.column(probe, cls)
        self._run_id: int | None = None
        self.streak: Tensor | None = None  # (B,) consecutive tokens over the threshold
        self.stop_slot: Tensor | None = None  # (B,) slot of the token a row stopped at, or -1

    def __call__(self, input_ids: Tensor, scores: Any = None, **kwargs: Any) -> Tensor:
        run = self.run
        if run.run_id != self._run_id:  # a new generate: start over
            self._run_id = run.run_id
            B = run.scores.shape[0]
            self.streak = torch.zeros(B, dtype=torch.long, device=run.scores.device)
            self.stop_slot = torch.full((B,), -1, dtype=torch.long, device=run.scores.device)
        run.flush()  # a deferred readout's staged steps
        k = run.filled - 1  # the slot of the token generate just appended
        s = run.scores[:, k, self.col]  # (B,)
        if self.direction == "above":
            hit = s > self.threshold
        elif self.direction == "below":
            hit = s < self.threshold
        else:
            hit = s.abs() > self.threshold
        self.streak = torch.where(hit & run.active, self.streak + 1, 0)
        stop = self.streak >= self.patience  # (B,)
        self.stop_slot = torch.where(stop & run.active, k, self.stop_slot)
        run.active.logical_and_(~stop)  # later slots of stopped rows are marked invalid
        return (self.stop_slot >= 0).to(input_ids.device)

    def report(self, max_new_tokens: int | None = None) -> EarlyExitReport:
        """Which rows stopped, where, and the tokens saved (reads the device once)."""
        if self.stop_slot is None:
            raise LookupError(
                "this early exit has not run; pass it to model.generate("
                "stopping_criteria=[...]) inside the attach block first"
            )
        n = max_new_tokens if max_new_tokens is not None else self.run.max_tokens
        slots = self.stop_slot.tolist()
        stopped = [s >= 0 for s in slots]
        kept = [s + 1 if s >= 0 else self.run.filled for s in slots]
        saved = [n - k if st else 0 for st, k in zip(stopped, kept, strict=True)]
        return EarlyExitReport(
            stopped, slots, kept, saved, self.run.filled, max(0, n - self.run.filled)
        )


@dataclass
class StepScores:
    """Scores of slots start .. start + n - 1 of run `run_id`: scores (B, n, P), valid (B, n).
    Valid during the callback; clone to keep (CUDA host buffers are reused)."""

    run_id: int
    start: int
    scores: Tensor
    valid: Tensor
    names: list[str]


class ScoreStream(StoppingCriteria):
    """Delivers new scores to `callback(StepScores)` after every generated token; never stops
    a row. Made by `BankRun.streamer(callback)`; `push()` also works after plain forwards."""

    def __init__(self, run: ScoredRun, callback: Callable[[StepScores], None]) -> None:
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self.run, self.callback = run, callback
        self.delivered = 0
        self._run_id: int | None = None
        self._ring: _HostRing | None = None
        self._never: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Any = None, **kwargs: Any) -> Tensor:
        self.push()
        if self._never is None or self._never.shape[0] != input_ids.shape[0]:
            self._never = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self._never

    def push(self) -> None:
        """Hand over the slots written since the last push (CUDA: queue their copy)."""
        run = self.run
        if run.scores is None:
            return
        run.flush()  # a deferred readout's staged steps
        if run.run_id != self._run_id:
            self._run_id, self.delivered = run.run_id, 0
        lo, hi = self.delivered, run.filled
        if hi <= lo:
            return
        self.delivered = hi
        scores, valid = run.scores[:, lo:hi], run.valid[:, lo:hi]
        if scores.device.type != "cuda":
            self.callback(StepScores(run.run_id, lo, scores, valid, run.names))
            return
        if self._ring is None:
            self._ring = _HostRing(run.scores, run.valid)
        self._ring.deliver(self.callback, run.names, block=False)
        if self._ring.full:  # every host buffer still in flight: wait for the oldest
            self._ring.deliver(self.callback, run.names, block=True, limit=1)
        self._ring.submit(scores, valid, run.run_id, lo)

    def flush(self) -> None:
        """Deliver everything still in flight (waits for the device)."""
        self.push()
        if self._ring is not None:
            self._ring.deliver(self.callback, self.run.names, block=True)


class _HostRing:
    """Two pinned host buffers the size of the bank's buffers, filled by non-blocking copies;
    an event per copy says when it may be read. CUDA only (untested without a GPU)."""

    def __init__(self, scores: Tensor, valid: Tensor, slots: int = 2) -> None:
        self.slots = [
            (
                torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True),
                torch.empty(valid.shape, dtype=valid.dtype, pin_memory=True),
                torch.cuda.Event(),
            )
            for _ in range(slots)
        ]
        self.pending: deque[tuple[int, int, int, int]] = deque()  # slot, run, start, n
        self.next = 0

    @property
    def full(self) -> bool:
        return len(self.pending) == len(self.slots)

    def submit(self, scores: Tensor, valid: Tensor, run_id: int, start: int) -> None:
        i = self.next
        self.next = (i + 1) % len(self.slots)
        host_scores, host_valid, event = self.slots[i]
        n = scores.shape[1]
        host_scores[:, :n].copy_(scores, non_blocking=True)
        host_valid[:, :n].copy_(valid, non_blocking=True)
        event.record()  # on the current stream, after the forward that wrote these slots
        self.pending.append((i, run_id, start, n))

    def deliver(
        self,
        callback: Callable[[StepScores], None],
        names: Sequence[str],
        block: bool,
        limit: int | None = None,
    ) -> None:
        """Hand completed copies to `callback`, oldest first (block: wait for each)."""
        done = 0
        while self.pending and (limit is None or done < limit):
            i, run_id, start, n = self.pending[0]
            host_scores, host_valid, event = self.slots[i]
            if block:
                event.synchronize()
            elif not event.query():
                return
            self.pending.popleft()
            done += 1
            callback(StepScores(run_id, start, host_scores[:, :n], host_valid[:, :n], list(names)))
