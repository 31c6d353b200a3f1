"""Run a data set through a model and write the activations at some sites to an on-disk store.

    store = residtap.extract(model, tokenizer, "mood.jsonl", ["layers.4", "layers.8"], "acts/")
    store["layers.4"]            # (rows, d_model): every real token of every text
    store.labels("label")        # one label per row

How it works: samples are tokenized and padded batch by batch, in data-set order (batch i always
holds samples i*B .. i*B+B-1, so batches are the same on every run). A tap per site, installed
with the tap engine, picks the rows to keep with `residtap.positions` inside the forward (only
real tokens, never padding), copies them to the CPU and hands them to a background writer
thread through a bounded queue (see residtap.store.writer). Each forward stops after the last
site (`stop_early`). A shard closes after the first batch that brings it to `shard_rows` rows,
so shard boundaries depend only on the data and the settings.

Resume: the manifest records the settings (hash) and the complete shards. Calling `extract`
again with the same arguments after an interruption (Ctrl-C, SIGKILL, a full disk) continues
after the last complete shard and ends with the same store as an uninterrupted run. A store
made with other settings, or on another checkpoint of the model (weights fingerprint, see
residtap.identity), is never resumed or overwritten silently: `overwrite=True` replaces it. A
re-run also checks every listed shard and rewrites, from the first missing or damaged one on,
what an uninterrupted run would have written.

While a capture writes a folder it holds an exclusive lock on it (residtap.store.lock): a second
capture into the same folder, or an `overwrite` of it, is refused naming the holder.

Position ids are passed from the attention mask (as `generate` does), so with left padding a
sample's activations do not depend on how long its batch neighbours are.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from residtap.distributed import barrier, block_of, rank_world
from residtap.engine import Step, StopForward, tap
from residtap.identity import model_identity
from residtap.positions import real_mask, select_positions
from residtap.sites import Arch, layer_sites, resolve_site
from residtap.store import manifest as fmt
from residtap.store.data import Sample, fingerprint, load_samples
from residtap.store.inputs import (
    check_dtype,
    check_lengths,
    check_out,
    check_policy,
    check_token_ids,
    default_shard_rows,
    dtype_name,
    param_dtype,
    positive_int,
    tokenizer_fingerprint,
    vocab_size,
)
from residtap.store.lock import folder_lock
from residtap.store.manifest import read_manifest, write_manifest
from residtap.store.reader import Store
from residtap.store.resume import existing_or_new, remove_leftovers
from residtap.store.writer import ShardWriter

log = logging.getLogger(__name__)



def extract(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    sites: Sequence[str] | str,
    out: str | Path,
    *,
    positions: str | Sequence[int] = "all",
    dtype: torch.dtype | str | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    text_column: str = "text",
    max_length: int | None = None,
    shard_rows: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    arch: Arch | None = None,
    distributed: Literal["data", "tensor"] | None = None,
) -> Store:
    """Write the activations of `data` at `sites` to the store folder `out`; return the Store.

    data: a .jsonl/.json/.csv/.txt path, a list of texts, a list of token-id lists, a list of
        dicts or a datasets.Dataset (see residtap.store.data). tokenizer may be None for ids.
    sites: site names, or "all-layers" for every `layers.{i}`.
    positions: "all" (every real token), "last" (each sample's last token) or indices into each
        sample's real tokens (negative: from the end).
    dtype: storage dtype, a floating one (default: the model's).
    max_length: truncate longer texts. Without it, a text longer than the model's positions
        (max_position_embeddings) is refused before any forward.
    shard_rows: rows per shard (default: about 128 MiB of activations per shard).
    overwrite: replace a store made with other settings instead of raising.
    distributed: under torch.distributed (torchrun), "data" splits the samples into one
        contiguous block per rank, each rank writes a resumable part folder, and rank 0 merges
        the parts' manifests into one store; "tensor" is for a tensor-parallel model: every
        rank runs every forward (activations are full on each) and rank 0 alone writes.
        See residtap.distributed.
    """
    # Everything is checked before the first file is written.
    folder = check_out(out)
    batch_size = positive_int(batch_size, "batch_size")
    storage_dtype = check_dtype(dtype)
    policy = check_policy(positions)
    resolved = expand_sites(model, sites, arch)
    samples = load_samples(data, text_column, max_samples)
    if tokenizer is None and any(s.text is not None for s in samples):
        raise ValueError("the data holds texts but tokenizer is None; pass the model's tokenizer")
    if max_length is not None:
        max_length = positive_int(max_length, "max_length")
    check_token_ids(model, samples)
    check_lengths(model, tokenizer, samples, max_length)
    if shard_rows is None:
        shard_rows = default_shard_rows(model, [s.name for s in resolved], storage_dtype)
    shard_rows = positive_int(shard_rows, "shard_rows")
    identity = model_identity(model)
    settings = {
        "model_config_hash": identity["config_hash"], "sites": [s.name for s in resolved],
        "positions": policy, "data": fingerprint(samples),
        # dtype=None stores the model's dtype; record which, so that a resume with the model
        # loaded in another dtype is refused instead of mixing dtypes in one store
        "dtype": dtype_name(storage_dtype) or f"model:{dtype_name(param_dtype(model))}",
        "samples": len(samples), "text_column": text_column, "max_length": max_length,
        "tokenizer": tokenizer_fingerprint(tokenizer), "batch_size": batch_size,
        "shard_rows": shard_rows,
    }
    rank, world = _check_distributed(distributed, len(samples))
    if distributed == "data" and world > 1:
        return _extract_part(model, tokenizer, samples, resolved, folder, settings, identity,
                             overwrite, rank, world, policy=policy, dtype=storage_dtype,
                             batch_size=batch_size, max_length=max_length,
                             shard_rows=shard_rows, progress=progress, arch=arch)
    if distributed == "tensor" and rank != 0:  # same forwards (collectives match), no files
        _run(model, tokenizer, samples, resolved, None, {}, policy=policy, dtype=storage_dtype,
             batch_size=batch_size, start=0, max_length=max_length, shard_rows=shard_rows,
             progress=False, arch=arch)
        barrier()
        return Store.open(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        manifest = existing_or_new(folder, settings, identity, tokenizer, overwrite)
        if manifest.get("complete"):
            log.info("store %s is already complete (%d rows); nothing to do", folder,
                     manifest["rows"])
        else:
            start = sum(s["samples"] for s in manifest["shards"])
            if start:
                log.info("resuming store %s after %d complete shard(s), at sample %d of %d",
                         folder, len(manifest["shards"]), start, len(samples))
            remove_leftovers(folder, len(manifest["shards"]))
            write_manifest(folder, manifest)
            _run(model, tokenizer, samples, resolved, folder, manifest, policy=policy,
                 dtype=storage_dtype, batch_size=batch_size, start=start,
                 max_length=max_length, shard_rows=shard_rows, progress=progress, arch=arch)
    if distributed == "tensor":
        barrier()
    return Store.open(folder)


def _check_distributed(distributed: Any, n_samples: int) -> tuple[int, int]:
    if distributed not in (None, "data", "tensor"):
        raise ValueError(f"distributed must be None, 'data' or 'tensor', got {distributed!r}")
    rank, world = rank_world()
    if distributed is not None and world == 1:
        log.warning("distributed=%r but torch.distributed runs a single process (world size 1);"
                    " extracting in this process", distributed)
    if distributed == "data" and n_samples < world:
        raise ValueError(f"data-parallel extraction over {world} ranks needs at least {world} "
                         f"samples, got {n_samples}; use fewer ranks")
    return rank, world


def _extract_part(model, tokenizer, samples: list[Sample], resolved: list, top: Path,
                  settings: dict, identity: dict, overwrite: bool, rank: int, world: int,
                  **run_kwargs) -> Store:
    """Data parallel: this rank's block into `top/part-RRRRR-of-WWWWW`, then rank 0 merges."""
    merged_settings = {**settings, "parts": world}
    with ExitStack() as locks:  # rank 0 locks the top folder, every rank its part
        if rank == 0:  # refuses (or, with overwrite, clears) a store made with other settings
            top.mkdir(parents=True, exist_ok=True)
            locks.enter_context(folder_lock(top))
            existing_or_new(top, merged_settings, identity, tokenizer, overwrite)
        barrier()
        lo, hi = block_of(len(samples), rank, world)
        mine = samples[lo:hi]
        part_settings = {**settings, "data": fingerprint(mine), "samples": len(mine),
                         "part": [rank, world]}
        folder = top / f"part-{rank:05d}-of-{world:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        locks.enter_context(folder_lock(folder))
        manifest = existing_or_new(folder, part_settings, identity, tokenizer, overwrite)
        if not manifest.get("complete"):
            start = sum(s["samples"] for s in manifest["shards"])
            remove_leftovers(folder, len(manifest["shards"]))
            write_manifest(folder, manifest)
            _run(model, tokenizer, mine, resolved, folder, manifest, start=start, **run_kwargs)
        barrier()
        if rank == 0:
            _write_merged(top, world, merged_settings)
        barrier()
    return Store.open(top)


def _write_merged(top: Path, world: int, settings: dict) -> None:
    """One manifest over every part's shards (paths relative to `top`)."""
    names = [f"part-{r:05d}-of-{world:05d}" for r in range(world)]
    parts = [read_manifest(top / name) for name in names]
    merged = dict(parts[0])
    merged["shards"] = [
        {**shard, "file": f"{name}/{shard['file']}",
         "samples_file": f"{name}/{shard['samples_file']}"}
        for name, part in zip(names, parts, strict=True) for shard in part["shards"]
    ]
    merged.update(settings=settings, settings_hash=fmt.settings_hash(settings),
                  samples=sum(p["samples"] for p in parts), rows=sum(p["rows"] for p in parts),
                  complete=all(p.get("complete") for p in parts), parts=names)
    write_manifest(top, merged)


def expand_sites(model: nn.Module, sites: Sequence[str] | str, arch: Arch | None = None) -> list:
    """Resolved sites, in order, without repeats; 'all-layers' means every `layers.{i}`."""
    if isinstance(sites, str):
        sites = [s.strip() for s in sites.split(",") if s.strip()]
    if not isinstance(sites, Sequence) or not all(isinstance(s, str) for s in sites):
        raise TypeError(f"sites must be a list of site names such as ['layers.3'], got {sites!r}")
    names: list[str] = []
    for name in sites:
        names += layer_sites(model, arch) if name == "all-layers" else [name]
    if not names:
        raise ValueError("sites is empty; name at least one site, e.g. ['layers.0'] or "
                         "'all-layers'")
    resolved, seen = [], set()
    for name in names:
        site = resolve_site(model, name, arch)
        if site.name not in seen:
            seen.add(site.name)
            resolved.append(site)
    return resolved


# -- the forward loop -------------------------------------------------------------------------
class _StoreTap:
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


def _run(model, tokenizer, samples: list[Sample], resolved: list, folder: Path | None,
         manifest: dict, *, policy, dtype, batch_size: int, start: int,
         max_length: int | None, shard_rows: int, progress: bool, arch: Arch | None) -> None:
    non_blocking = next(model.parameters()).device.type == "cuda"
    taps = {s.name: _StoreTap(s.name, dtype, non_blocking) for s in resolved}
    # stop_early: each forward ends after the last site fires; with 'logits' among the sites
    # that is the end of the model anyway.
    accepted = inspect.signature(model.forward).parameters
    pad_id, side = _padding(tokenizer)
    writer = ShardWriter(folder, manifest) if folder is not None else _NoWriter()
    bar = tqdm(total=len(samples), initial=start, unit="sample", desc="residtap capture",
               disable=not progress, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    tokens, t0 = 0, time.perf_counter()
    writer.start()
    try:
        with torch.inference_mode(), tap(model, taps, stop_early=True, arch=arch):
            for shard, shard_rows_planned in _shards(samples, start, batch_size, shard_rows,
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


def _forward(model, taps: dict[str, _StoreTap], ids: Tensor, mask: Tensor, index: Tensor,
             policy, accepted) -> dict[str, Tensor]:
    """One batch through the model with the store taps on: each site's kept rows (CPU)."""
    device = next(model.parameters()).device
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


def _shards(samples: list[Sample], start: int, batch_size: int, shard_rows: int, policy,
            tokenizer, pad_id: int, side: str, max_length: int | None, vocab: int | None):
    """The batches from sample `start` on, encoded and grouped into shards, each with its
    rows: a shard closes after the first batch that brings it to `shard_rows` rows. A shard's
    batches are encoded before its first forward, so the writer knows the shard's size."""
    shard, rows = [], 0
    for lo in range(start, len(samples), batch_size):
        batch = samples[lo:lo + batch_size]
        ids, mask = _encode(batch, tokenizer, pad_id, side, max_length, vocab)  # (B, T)
        index, sample, position = _rows(mask, policy, batch[0].index)
        shard.append((batch, ids, mask, index, sample, position))
        rows += int(sample.shape[0])
        if rows >= shard_rows:
            yield shard, rows
            shard, rows = [], 0
    if shard:
        yield shard, rows


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


def _encode(batch: list[Sample], tokenizer, pad_id: int, side: str, max_length: int | None,
            vocab: int | None = None) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask (B, T), padded on the tokenizer's side."""
    seqs: list[list[int] | None] = [s.input_ids for s in batch]
    todo = [i for i, s in enumerate(batch) if s.text is not None]
    if todo:
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
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        span = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, span] = torch.tensor(s, dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


def _rows(mask: Tensor, policy, first_sample: int) -> tuple[Tensor, Tensor, Tensor]:
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


def _padding(tokenizer) -> tuple[int, str]:
    if tokenizer is None:
        return 0, "right"
    side = getattr(tokenizer, "padding_side", "right")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            pad = 0
        log.info("the tokenizer has no pad token; padding with id %d (padded positions are "
                 "masked out and never stored)", pad)
    return int(pad), side


