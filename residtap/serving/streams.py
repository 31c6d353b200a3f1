"""Attention probes on a continuous-batching engine: each request's pooling state, carried from
forward to forward.

    streams = RequestStreams(segments, device)   # the bank's attention segments (bank_readouts)
    feed = streams.plan(fed, read)               # before a forward: its streamed segments
    scores = streams.update(k, cols, feed)       # in it: segment k's (S_read, O) scores, from
                                                 # its matmul columns (N, K) of every row

An attention probe pools over every token of its sequence (probes/attention_stream.py), so its
state must follow each request whatever else shares the packed forward. Per attention segment of
the bank, one AttentionStream is kept as a table: row i is the state of the request holding slot
i. Per forward, from host-side ints only:
- a request takes a free slot when first seen (the table doubles when none is free) and its row
  is reset whenever its segment starts at position 0 (its prompt, or a re-prefill after a soft
  reset); a segment that starts anywhere but where the request's fed tokens end means rows went
  past the taps (a prefix served from another request's KV cache): RuntimeError, not a score.
- the forward's rows of the streamed requests are gathered into (S, T, K), T the longest
  segment; padding is marked invalid, so it never enters a state. The table's S rows are
  selected, fed and put back: the stream's chunk path gives the exact score after each token.
- forgotten requests' slots are freed at the next forward: the manager's thread owns the tables.
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
class Feed:
    """The streamed segments of one forward, as index tensors (see RequestStreams.plan)."""

    slots: Tensor  # (S,) long: each segment's slot
    index: Tensor  # (S * T,) long: the forward's row that feeds (s, t); padding reads row 0
    valid: Tensor | None  # (S, T) bool: real rows; None when every segment has T rows
    fresh: Tensor | None  # (F,) long: slots whose sequence starts in this forward
    shape: tuple[int, int]  # (S, T)
    last: Tensor  # (S_read,) long: s * T + length - 1 of each segment whose scores are read


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
        """Free the request's slot at the next forward (callable from any thread)."""
        with self._lock:
            self._released.append(request_id)

    def plan(self, fed: list[Segment], read: list[bool]) -> Feed:
        """The Feed of a forward whose segments `fed` (in row order) go through the streams;
        read[s]: is segment s's last row scored (it picks a token)?"""
        with self._lock:
            released, self._released = self._released, []
        for request_id in released:
            self.fed.pop(request_id, None)
            slot = self.slot.pop(request_id, None)
            if slot is not None:
                self.free.append(slot)
        slots, fresh = [], []
        for seg in fed:
            slot = self.slot.get(seg.request_id)
            if slot is None:
                if not self.free:
                    self._grow()
                slot = self.slot[seg.request_id] = self.free.pop()
            if seg.position == 0:
                fresh.append(slot)
            elif self.fed.get(seg.request_id) != seg.position:
                raise RuntimeError(
                    f"request {seg.request_id!r}'s rows from position "
                    f"{self.fed.get(seg.request_id, 0)} to {seg.position} never came through "
                    "residtap's taps (a prompt prefix served from another request's KV cache?), "
                    "so its attention probes cannot pool over them; serve with "
                    "residtap.serving.transformers_cb.serving_config() (no block sharing)")
            self.fed[seg.request_id] = seg.position + seg.length
            slots.append(slot)
        S, T = len(fed), max(seg.length for seg in fed)
        index = [seg.start + min(t, seg.length - 1) for seg in fed for t in range(T)]
        valid = None
        if any(seg.length != T for seg in fed):
            valid = torch.tensor([[t < seg.length for t in range(T)] for seg in fed],
                                 device=self.device)
        last = [s * T + seg.length - 1 for s, seg in enumerate(fed) if read[s]]
        return Feed(self._long(slots), self._long(index), valid,
                    self._long(fresh) if fresh else None, (S, T), self._long(last))

    def update(self, k: int, cols: Tensor, feed: Feed) -> Tensor:
        """Feed segment k's columns cols (N, K) of the forward's rows to the streamed requests'
        states; their scores (S_read, O) after the last row of each segment that is read."""
        table = self.tables[k]
        if feed.fresh is not None:
            table.reset_rows(feed.fresh)
        S, T = feed.shape
        sub = table.select(feed.slots)
        scores = sub.update(cols.index_select(0, feed.index).view(S, T, -1),
                            feed.valid)  # (S, T, O)
        table.put(feed.slots, sub)
        return scores.view(S * T, -1).index_select(0, feed.last)

    def _grow(self) -> None:
        size = self.tables[0].batch_size
        self.tables = [table.grown(2 * size) for table in self.tables]
        self.free = list(range(2 * size - 1, size - 1, -1))

    def _long(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
