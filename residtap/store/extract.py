"""Run a data set through a model and write the activations at some sites to an on-disk store.

    store = residtap.extract(model, tokenizer, "mood.jsonl", ["layers.4", "layers.8"], "acts/")
    store["layers.4"]            # (rows, d_model): every real token of every text
    store.labels("label")        # one label per row

How it works: everything is checked first (residtap.store.inputs). Samples are tokenized and
padded batch by batch, in data-set order (batch i always holds samples i*B .. i*B+B-1, so
batches are the same on every run; residtap.store.batches). A tap per site, installed with the
tap engine, picks the rows to keep with `residtap.positions` inside the forward (only real
tokens, never padding), copies them to the CPU and hands them to a background writer thread
through a bounded queue (residtap.store.forward, residtap.store.writer). Each forward stops
after the last site (`stop_early`). A shard closes after the first batch that brings it to
`shard_rows` rows, so shard boundaries depend only on the data and the settings. Under
torch.distributed, residtap.store.parallel writes one part per rank and merges them.

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

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from residtap.distributed import barrier
from residtap.identity import model_identity
from residtap.sites import Arch, layer_sites, resolve_site
from residtap.store.data import fingerprint, load_samples
from residtap.store.forward import run_forwards
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
)
from residtap.store.lock import folder_lock
from residtap.store.manifest import write_manifest
from residtap.store.parallel import check_distributed, extract_part
from residtap.store.reader import Store
from residtap.store.resume import existing_or_new, remove_leftovers

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
    rank, world = check_distributed(distributed, len(samples))
    if distributed == "data" and world > 1:
        return extract_part(model, tokenizer, samples, resolved, folder, settings, identity,
                            overwrite, rank, world, policy=policy, dtype=storage_dtype,
                            batch_size=batch_size, max_length=max_length,
                            shard_rows=shard_rows, progress=progress, arch=arch)
    if distributed == "tensor" and rank != 0:  # same forwards (collectives match), no files
        run_forwards(model, tokenizer, samples, resolved, None, {}, policy=policy,
                     dtype=storage_dtype, batch_size=batch_size, start=0, max_length=max_length,
                     shard_rows=shard_rows, progress=False, arch=arch)
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
            run_forwards(model, tokenizer, samples, resolved, folder, manifest, policy=policy,
                         dtype=storage_dtype, batch_size=batch_size, start=start,
                         max_length=max_length, shard_rows=shard_rows, progress=progress,
                         arch=arch)
    if distributed == "tensor":
        barrier()
    return Store.open(folder)


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
