"""Which slots of a probe bank's buffers each forward fills: the per-forward plan.

    planner = SlotPlanner("generated", batch=3, max_tokens=64, device=dev)
    slots = planner.plan(step)       # before the forward: None when it fills no slot
    slots.lo, slots.hi, slots.pick   # slots lo..hi-1; the position read per row, if one

The plan is made from the engine's Python ints (`step.past`, `step.length`) and the attention
mask, with tensor ops only: nothing is read back from the device. A forward with no cached
tokens starts a new run (slot 0 again, every row running). The words are residtap.positions':

    "generated"  slot k is read at the forward that picks new token k: the prompt's last real
                 token for k = 0, then the token fed at decode step k. (B, max_new_tokens)
    "last"       the prompt's last real token only. (B, 1)
    "prompt"     every prompt position, pads included (marked not valid). (B, T_prompt)
    "all"        every position fed: prompt then each decode step. (B, T_prompt + new - 1)

`valid` (B, max_tokens) says which slots hold a real token scored while its row was running;
`active` (B,) is cleared by early exit for rows that stopped. A row with no real token (its
attention mask all zeros) has no last prompt token: in "generated" and "last" its slot 0 is
simply not valid (the readout reads position 0 and nobody counts it), without a host read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from residtap.hooks import Step
from residtap.positions import last_real_index

BankPositions = Literal["generated", "last", "prompt", "all"]
POSITION_MODES: tuple[str, ...] = ("generated", "last", "prompt", "all")


@dataclass
class ForwardSlots:
    """What one forward fills: slots lo..hi-1 of every row.

    weights (B, hi - lo) bool: which of them hold a real token of a running row (-> valid);
    pick (B,) long: the position each row reads (its last real prompt token), or None;
    last_only: read each row's last position (a prefill without a mask)."""

    lo: int
    hi: int
    weights: Tensor
    pick: Tensor | None = None
    last_only: bool = False

    @property
    def width(self) -> int:
        return self.hi - self.lo


class SlotPlanner:
    """The slot bookkeeping of an attached bank: the run, its rows' state, the plan per forward.

    Python ints: `run_id` (runs seen, -1 before the first), `prompt_len`, `filled` (slots
    written in this run). Device tensors: valid (B, max_tokens) bool, active (B,) bool."""

    def __init__(self, positions: BankPositions, batch: int, max_tokens: int,
                 device: torch.device) -> None:
        self.positions, self.max_tokens = positions, max_tokens
        self.valid = torch.zeros(batch, max_tokens, dtype=torch.bool, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self._running = self.active[:, None]  # (B, 1) view: follows `active` in place
        self.run_id = -1
        self.prompt_len = 0
        self.filled = 0

    def plan(self, step: Step) -> ForwardSlots | None:
        """The slots `step`'s forward fills (writing their `valid` now), or None. A forward
        with no cached tokens starts a new run first."""
        B, T, past = step.batch, step.length, step.past
        if past == 0:
            self._new_run(T)
        elif self.run_id < 0:
            raise ValueError(
                "the bank saw a decode step without the prefill before it (the forward "
                "received a KV cache); attach the bank before the first forward of the sequence"
            )
        mode, mask = self.positions, step.attention_mask
        # (B, T): which of this forward's tokens are real (None: all of them)
        needs_real = past == 0 or mode == "all"
        real = mask[:, past:].bool() if mask is not None and needs_real else None
        running = self._running  # (B, 1)
        if mode in ("generated", "last") and past == 0:
            if real is None:
                slots = ForwardSlots(0, 1, running, last_only=True)
            else:
                last = last_real_index(real)  # (B,); -1: a row with no real token
                slots = ForwardSlots(0, 1, running & (last >= 0)[:, None], last.clamp(min=0))
        elif mode == "generated":
            first = past - self.prompt_len + 1
            slots = ForwardSlots(first, first + T, running.expand(B, T))
        elif mode == "prompt" and past == 0:
            slots = ForwardSlots(0, T, real if real is not None else running.expand(B, T))
        elif mode == "all":
            w = running.expand(B, T)
            slots = ForwardSlots(past, past + T, w & real if real is not None else w)
        else:  # "last" and "prompt" read nothing in decode steps
            return None
        if slots.hi > self.max_tokens:
            raise ValueError(
                f"the probe bank's buffer has {self.max_tokens} slots per row but this forward "
                f"needs slots {slots.lo}..{slots.hi - 1} (positions={mode!r}); attach with a "
                "larger max_tokens (>= max_new_tokens for 'generated')"
            )
        self.valid[:, slots.lo:slots.hi] = slots.weights
        self.filled = slots.hi
        return slots

    def _new_run(self, prompt_len: int) -> None:
        self.run_id += 1
        self.prompt_len = prompt_len
        self.filled = 0
        self.valid.zero_()
        self.active.fill_(True)

    def unscored(self, lo: int, hi: int) -> None:
        """Slots lo..hi-1 were planned but never read (an error inside their forward)."""
        self.valid[:, lo:hi] = False
        self.filled = min(self.filled, lo)
