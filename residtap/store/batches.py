"""A data set as the batches the store's forward loop runs: encoded, padded, grouped into shards.

    for shard, n_rows in shards(samples, start, batch_size, shard_rows, policy, tokenizer,
                                *padding(tokenizer), max_length, vocab):
        for batch, ids, mask, index, sample, position in shard:   # ids, mask (B, T)
            ...   # index (R,): the flat tokens to keep; sample, position (R,): where each is from

Batches are fixed by sample index (batch i holds samples i*B .. i*B+B-1), so they are the same
on every run and a resumed store is byte-identical to an uninterrupted one. The rows kept come
from residtap.positions on an index grid, so a store keeps exactly the positions `capture`
would return.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from residtap.inputs import pad, pad_id_of
from residtap.positions import real_mask, select_positions
from residtap.store.data import Sample

log = logging.getLogger(__name__)


def shards(samples: list[Sample], start: int, batch_size: int, shard_rows: int, policy,
            tokenizer, pad_id: int, side: str, max_length: int | None, vocab: int | None):
    """The batches from sample `start` on, encoded and grouped into shards, each with its
    rows: a shard closes after the first batch that brings it to `shard_rows` rows. A shard's
    batches are encoded before its first forward, so the writer knows the shard's size."""
    shard, rows = [], 0
    for lo in range(start, len(samples), batch_size):
        batch = samples[lo:lo + batch_size]
        ids, mask = encode(batch, tokenizer, pad_id, side, max_length, vocab)  # (B, T)
        index, sample, position = rows_to_keep(mask, policy, batch[0].index)
        shard.append((batch, ids, mask, index, sample, position))
        rows += int(sample.shape[0])
        if rows >= shard_rows:
            yield shard, rows
            shard, rows = [], 0
    if shard:
        yield shard, rows


def encode(batch: list[Sample], tokenizer, pad_id: int, side: str, max_length: int | None,
           vocab: int | None = None) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask (B, T), padded on the tokenizer's side."""
    return pad(token_ids(batch, tokenizer, max_length, vocab), pad_id, side)


def token_ids(batch: list[Sample], tokenizer, max_length: int | None,
              vocab: int | None = None) -> list[list[int]]:
    """Each sample's token ids (its text tokenized, special tokens included, or its input_ids),
    cut to `max_length`. ValueError for a sample with no tokens, or (with `vocab`) an id the
    model's embedding does not have."""
    seqs: list[list[int] | None] = [s.input_ids for s in batch]
    todo = [i for i, s in enumerate(batch) if s.text is not None]
    if todo:
        if tokenizer is None:
            raise ValueError("the data holds texts but no tokenizer was given; pass the model's")
        enc = tokenizer([batch[i].text for i in todo], add_special_tokens=True,
                        truncation=max_length is not None, max_length=max_length)["input_ids"]
        for i, ids in zip(todo, enc, strict=True):
            seqs[i] = list(ids)
    if max_length is not None:
        seqs = [s[:max_length] for s in seqs]
    for s, ids in zip(batch, seqs, strict=True):
        if not ids:
            raise ValueError(f"sample {s.index} (id {s.id!r}) has no tokens after tokenization; "
                             "remove it from the data set")
        if vocab is not None and max(ids) >= vocab:
            raise ValueError(f"sample {s.index} (id {s.id!r}) tokenizes to id {max(ids)}, but the "
                             f"model's embedding has {vocab} rows (ids 0..{vocab - 1}); use the "
                             "model's own tokenizer (or resize the model's embeddings)")
    return seqs


def rows_to_keep(mask: Tensor, policy, first_sample: int) -> tuple[Tensor, Tensor, Tensor]:
    """For a (B, T) mask: flat token indices to keep (R,), their sample index and position
    among the sample's real tokens. Uses residtap.positions on an index grid, so the store
    keeps exactly the positions `capture` would."""
    B, T = mask.shape
    grid = torch.arange(B * T).view(B, T)
    if policy == "all":
        index = grid[real_mask(grid, mask)]
    else:
        index = select_positions(grid, mask, policy).reshape(-1)
    rank = (mask.cumsum(1) - 1).view(-1)  # position of each token among its row's real tokens
    return index, index // T + first_sample, rank[index]


def padding(tokenizer) -> tuple[int, str]:
    """(pad id, padding side) for the store: the tokenizer's side is kept (it decides nothing
    stored: padded positions are masked out)."""
    if tokenizer is None:
        return 0, "right"
    if getattr(tokenizer, "pad_token_id", None) is None:
        log.info("the tokenizer has no pad token; padding with id %d (padded positions are "
                 "masked out and never stored)", pad_id_of(tokenizer))
    return pad_id_of(tokenizer), getattr(tokenizer, "padding_side", "right")
