"""Extraction under torch.distributed: data-parallel parts and their merged manifest.

    rank, world = check_distributed("data", len(samples))     # (0, 1) without torch.distributed
    store = extract_part(model, tokenizer, samples, sites, top, settings, identity, overwrite,
                         rank, world, **forward_settings)     # called by residtap.extract

Data parallel: each rank writes a resumable `part-RRRRR-of-WWWWW/` store of a contiguous block
of samples (global sample indices), and rank 0 writes a top-level manifest whose shard paths
point into the parts; `Store` reads it like any other. Tensor parallel (every rank runs the
forwards, rank 0 writes) needs nothing here beyond `check_distributed`.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from residtap.distributed import barrier, block_of, rank_world
from residtap.store import manifest as fmt
from residtap.store.data import Sample, fingerprint
from residtap.store.forward import run_forwards
from residtap.store.lock import folder_lock
from residtap.store.manifest import read_manifest, write_manifest
from residtap.store.reader import Store
from residtap.store.resume import existing_or_new, remove_leftovers

log = logging.getLogger(__name__)


def check_distributed(distributed: Any, n_samples: int) -> tuple[int, int]:
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


def extract_part(model, tokenizer, samples: list[Sample], resolved: list, top: Path,
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
            run_forwards(model, tokenizer, mine, resolved, folder, manifest, start=start,
                         **run_kwargs)
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
