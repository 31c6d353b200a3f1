"""The store's forward loop: batches through the model with one reader tap per site, each
batch's kept rows handed to the writer.

    run_forwards(model, tokenizer, samples, sites, folder, manifest, policy="all", dtype=None,
                 batch_size=8, start=0, max_length=None, shard_rows=4096, progress=False,
                 arch=None)

A `StoreTap` per site, installed with the tap engine, picks the rows to keep inside the forward
(only real tokens, never padding), copies them to the CPU and hands them to a background writer
thread through a bounded queue (residtap.store.writer). Each forward stops after the last site
(`stop_early`). Position ids are passed from the attention mask (as `generate` does), so with
left padding a sample's activations do not depend on how long its batch neighbours are.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from residtap.engine import Step, StopForward, tap
from residtap.inputs import device_of
from residtap.sites import Arch
from residtap.store.batches import padding, shards
from residtap.store.data import Sample
from residtap.store.inputs import vocab_size
from residtap.store.writer import ShardWriter

log = logging.getLogger(__name__)


class StoreTap:
    """Reader tap: keeps the batch's selected rows of one site, on the CPU, in storage dtype."""

    def __init__(self, site: str, dtype: torch.dtype | None, non_blocking: bool) -> None:
        self.site, self.dtype, self.non_blocking = site, dtype, non_blocking
        self.index: Tensor | None = None  # (R,) flat indices into the batch's B*T tokens
        self.keep_all = False  # the index is arange(B*T): keep the whole batch as it is
        self.rows: Tensor | None = None

    def __call__(self, hidden: Tensor, step: Step) -> None:
        B, T = step.batch, step.length
        if hidden.dim() < 2 or tuple(hidden.shape[:2]) != (B, T):
            raise ValueError(
                f"site {self.site!r} produced shape {tuple(hidden.shape)}, which does not start "
                f"with the batch's (B, T) = ({B}, {T}); only per-token sites can be stored"
            )
        flat = hidden.detach().reshape(B * T, *hidden.shape[2:])
        # Every token kept (no padding, positions "all"): no gather. As in `capture`, keeping a
        # reference is safe because a module's output is a fresh tensor nobody writes into.
        rows = flat if self.keep_all else flat.index_select(0, self.index)
        self.rows = rows.to("cpu", self.dtype, non_blocking=self.non_blocking)  # (R, ...)


def run_forwards(model, tokenizer, samples: list[Sample], resolved: list, folder: Path | None,
                 manifest: dict, *, policy, dtype, batch_size: int, start: int,
                 max_length: int | None, shard_rows: int, progress: bool,
                 arch: Arch | None) -> None:
    """Samples `start`.. through the model with a StoreTap at each resolved site; each batch's
    rows go to a ShardWriter on `folder` (None: run the forwards, write nothing: a
    tensor-parallel rank other than 0)."""
    non_blocking = device_of(model).type == "cuda"
    taps = {s.name: StoreTap(s.name, dtype, non_blocking) for s in resolved}
    # stop_early: each forward ends after the last site fires; with 'logits' among the sites
    # that is the end of the model anyway.
    accepted = inspect.signature(model.forward).parameters
    pad_id, side = padding(tokenizer)
    writer = ShardWriter(folder, manifest) if folder is not None else _NoWriter()
    bar = tqdm(total=len(samples), initial=start, unit="sample", desc="residtap capture",
               disable=not progress, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    tokens, t0 = 0, time.perf_counter()
    writer.start()
    try:
        with torch.inference_mode(), tap(model, taps, stop_early=True, arch=arch):
            for shard, shard_rows_planned in shards(samples, start, batch_size, shard_rows,
                                                    policy, tokenizer, pad_id, side, max_length,
                                                    vocab_size(model)):
                writer.begin_shard(shard_rows_planned)
                for batch, ids, mask, index, sample, position in shard:
                    rows = _forward(model, taps, ids, mask, index, policy, accepted)
                    writer.put_batch(rows, sample, position, batch)
                    tokens += int(mask.sum())
                    bar.update(len(batch))
                    rate = tokens / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} tok/s, {writer.bytes_written / 2**20:,.1f}"
                                        " MiB written", refresh=False)
                writer.end_shard()
        writer.close()
        writer.finish_manifest(complete=True)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        model.train(was_training)
        for t in taps.values():
            t.index = t.rows = None
    if folder is not None:
        log.info("store %s complete: %d rows in %d shard(s)", folder, manifest["rows"],
                 len(manifest["shards"]))


def _forward(model, taps: dict[str, StoreTap], ids: Tensor, mask: Tensor, index: Tensor,
             policy, accepted) -> dict[str, Tensor]:
    """One batch through the model with the store taps on: each site's kept rows (CPU)."""
    device = device_of(model)
    index = index.to(device)
    keep_all = policy == "all" and index.shape[0] == mask.numel()
    for t in taps.values():
        t.index, t.keep_all, t.rows = index, keep_all, None
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if "position_ids" in accepted:
        inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0).to(device)
    if "use_cache" in accepted:
        inputs["use_cache"] = False
    try:
        model(**inputs)
    except StopForward:
        pass
    if device.type == "cuda":  # the taps' copies to the host were non-blocking
        torch.cuda.current_stream(device).synchronize()
    missing = [name for name, t in taps.items() if t.rows is None]
    if missing:
        raise LookupError(f"site(s) {missing} never fired during the forward; "
                          "choose modules the model calls")
    return {n: t.rows for n, t in taps.items()}


class _NoWriter:
    """Stands in for ShardWriter on tensor-parallel ranks that run forwards but write nothing."""

    bytes_written = 0

    def start(self) -> None: ...
    def begin_shard(self, rows: int) -> None: ...
    def put_batch(self, *args: Any) -> None: ...
    def end_shard(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def finish_manifest(self, **updates: Any) -> None: ...
