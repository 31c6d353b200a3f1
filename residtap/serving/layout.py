"""Which rows of a packed forward belong to which request: the layout every serving tap reads.

    layout = step.packed                       # set by the engine adapter before the forward
    for seg in layout.segments:                # in row order
        hidden[0, seg.start:seg.stop]          # (seg.length, d): request seg.request_id's rows,
                                               # at absolute positions seg.position, +1, ...
    layout.new_token_rows()                    # the rows whose logits pick a new token

A continuous-batching engine packs the tokens of many requests along one axis, (1, N, d):
a prefill chunk of one request, one decode token of another, ... Nothing in the forward's
tensors says which request a row is; the engine's step bookkeeping does. An engine adapter
(residtap.serving.transformers_cb for transformers' own continuous batching; vLLM's
`query_start_loc` would map the same way, see ARCHITECTURE.md) turns that bookkeeping into a
PackedLayout once per forward, from host-side Python ints only: no device read.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """One request's rows in a packed forward.

    start, length: rows [start, start + length) of the forward are this request's tokens.
    position:      absolute position of the first of them (tokens already in its KV cache).
    token:         index (0 = first generated token) of the token the segment's last row
                   picks, or -1 for a prefill chunk whose prompt goes on in a later forward.
    """

    request_id: str
    start: int
    length: int
    position: int
    token: int

    @property
    def stop(self) -> int:
        return self.start + self.length

    @property
    def last_row(self) -> int:
        return self.start + self.length - 1


@dataclass(frozen=True)
class PackedLayout:
    """The segments of one packed forward, in row order; `rows` = N, the forward's tokens."""

    segments: tuple[Segment, ...]
    rows: int

    def __post_init__(self) -> None:
        at = 0
        for seg in self.segments:
            if seg.start != at or seg.length < 1:
                raise ValueError(
                    f"a packed layout's segments must tile its rows in order without gaps; "
                    f"segment {seg.request_id!r} starts at row {seg.start} with {seg.length} "
                    f"rows, expected to start at {at} with at least 1"
                )
            at = seg.stop
        if at != self.rows:
            raise ValueError(f"the segments cover {at} rows but the forward has {self.rows}")

    @property
    def request_ids(self) -> list[str]:
        return [seg.request_id for seg in self.segments]

    def segment(self, request_id: str) -> Segment | None:
        """The request's segment in this forward, or None when it is not in it."""
        for seg in self.segments:
            if seg.request_id == request_id:
                return seg
        return None

    def new_token_rows(self) -> list[int]:
        """The rows whose logits pick a new token (one per segment with token >= 0)."""
        return [seg.last_row for seg in self.segments if seg.token >= 0]

    def positions(self) -> list[int]:
        """The absolute position of every row, in row order (length `rows`)."""
        return [seg.position + i for seg in self.segments for i in range(seg.length)]
