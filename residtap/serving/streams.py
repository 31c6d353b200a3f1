"""Attention probes on a continuous-batching engine: each request's pooling state, carried from
forward to forward.

    streams = RequestStreams(segments, device)   # the bank's attention segments (bank_readouts)
    streams.collect()                            # before a forward: free forgotten requests' slots
    feed = streams.plan(fed, places, n_scored)   # its streamed segments, in groups
    for group in feed:
        scores = streams.update(k, cols, group)  # in it: segment k's (S_read, O) scores, from
                                                 # its matmul columns (N, K) of every row

An attention probe pools over every token of its sequence (probes/attention_stream.py), so its
state must follow each request whatever else shares the packed forward. Per attention segment of
the bank, one AttentionStream is kept as a table: row i is the state of the request holding slot
i. Per forward, from host-side ints only:
- a request takes a free slot when first seen (the table doubles when none is free) and its row
  is reset whenever its segment starts at position 0 (its prompt, or a re-prefill after a soft
  reset); a segment that starts anywhere but where the request's fed tokens end means rows went
  past the taps: RuntimeError, not a wrong score.
- the streamed segments go in two groups, decode tokens (one row each: the stream's one-token
  path) and prompt chunks (gathered into (S, T, K), T the longest chunk, padding marked invalid
  so it never enters a state). A group's rows of the table are selected, fed and put back.
- a forgotten request's slot is freed by `collect`, which the run calls on the manager's thread
  before it reads any request's spec: the thread that feeds the tables is the only one that
  changes them, and a request forgotten while its forward is planned is fed once more, harmlessly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from residtap.probes.bank_readouts import AttentionSegment
from residtap.serving.layout import Segment

FIRST_SLOTS = 8


@dataclass
class Group:
    """Streamed segments of one forward fed together (see RequestStreams.plan)."""

    slots: Tensor  # (S,) long: each segment's slot
    index: Tensor  # (S * T,) long: the forward's row that feeds (s, t); padding repeats a real one
    valid: Tensor | None  # (S, T) bool: real rows; None when every segment has T rows
    fresh: Tensor | None  # (F,) long: slots whose sequence starts in this forward
    shape: tuple[int, int]  # (S, T)
    last: Tensor  # (S_read,) long: s * T + length - 1 of each segment whose scores are read
    into: Tensor | None  # (S_read,) long: their places among the forward's scored rows; None:
    # all of the scored rows, in order


class RequestStreams:
    """One slot table per attention segment, shared slots per request (module docstring)."""

    def __init__(self, segments: list[AttentionSegment], device: torch.device) -> None:
        self.device = device
        self.tables = [segment.state(FIRST_SLOTS, device) for segment in segments]
        self.slot: dict[str, int] = {}
        self.fed: dict[str, int] = {}  # tokens of the request its state has seen
        self.free = list(range(FIRST_SLOTS - 1, -1, -1))
        self._released: list[str] = []
        self._lock = threading.Lock()

    def release(self, request_id: str) -> None:
        """Free the request's slot at the next `collect` (callable from any thread)."""
        with self._lock:
            self._released.append(request_id)

    def collect(self) -> None:
        """Free the slots of released requests (on the thread that feeds the tables)."""
        with self._lock:
            released, self._released = self._released, []
        for request_id in released:
            self.fed.pop(request_id, None)
            slot = self.slot.pop(request_id, None)
            if slot is not None:
                self.free.append(slot)

    def plan(self, fed: list[Segment], places: list[int | None], n_scored: int) -> list[Group]:
        """The groups of a forward whose segments `fed` (in row order) go through the streams;
        places[s]: the place of segment s among the forward's n_scored scored rows, None when
        its last row picks no token."""
        slots = [self._slot(seg) for seg in fed]
        decode = [s for s, seg in enumerate(fed) if seg.length == 1]
        chunks = [s for s, seg in enumerate(fed) if seg.length > 1]
        return [self._group([fed[s] for s in part], [slots[s] for s in part],
                            [places[s] for s in part], n_scored)
                for part in (decode, chunks) if part]

    def update(self, k: int, cols: Tensor, group: Group) -> Tensor:
        """Feed segment k's columns cols (N, K) of the forward's rows to the group's states;
        their scores (S_read, O) after the last row of each segment that is read."""
        table = self.tables[k]
        if group.fresh is not None:
            table.reset_rows(group.fresh)
        S, T = group.shape
        sub = table.select(group.slots)
        scores = sub.update(cols.index_select(0, group.index).view(S, T, -1),
                            group.valid)  # (S, T, O)
        table.put(group.slots, sub)
        return scores.view(S * T, -1).index_select(0, group.last)

    def _slot(self, seg: Segment) -> int:
        """The request's slot (taken now if it has none), its tokens fed checked and counted."""
        request_id, new = seg.request_id, seg.request_id not in self.slot
        if new:
            if not self.free:
                self._grow()
            self.slot[request_id] = self.free.pop()
        if seg.position > 0 and self.fed.get(request_id) != seg.position:
            why = (f"first reached residtap's taps at position {seg.position} (registered "
                   "after its prompt ran? register it before the manager's add_request)" if new
                   else f"had {self.fed.get(request_id)} tokens through residtap's taps when its "
                   f"rows resumed at position {seg.position} (a prompt prefix served from "
                   "another request's KV cache? serve with "
                   "residtap.serving.transformers_cb.serving_config(): no block sharing)")
            raise RuntimeError(f"request {request_id!r} {why}, so its attention probes cannot "
                               "pool over all of its tokens")
        self.fed[request_id] = seg.position + seg.length
        return self.slot[request_id]

    def _group(self, segs: list[Segment], slots: list[int], places: list[int | None],
               n_scored: int) -> Group:
        S, T = len(segs), max(seg.length for seg in segs)
        index = [seg.start + min(t, seg.length - 1) for seg in segs for t in range(T)]
        valid = None
        if any(seg.length != T for seg in segs):
            valid = torch.tensor([[t < seg.length for t in range(T)] for seg in segs],
                                 device=self.device)
        fresh = [slot for seg, slot in zip(segs, slots, strict=True) if seg.position == 0]
        read = [s for s, place in enumerate(places) if place is not None]
        into = [places[s] for s in read]
        return Group(self._long(slots), self._long(index), valid,
                     self._long(fresh) if fresh else None, (S, T),
                     self._long([s * T + segs[s].length - 1 for s in read]),
                     None if into == list(range(n_scored)) else self._long(into))

    def _grow(self) -> None:
        size = self.tables[0].batch_size
        self.tables = [table.grown(2 * size) for table in self.tables]
        self.free = list(range(2 * size - 1, size - 1, -1))

    def _long(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
