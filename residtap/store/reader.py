"""Read a store written by `residtap.extract`: lazily, memory-mapped, shard by shard.

    store = residtap.Store.open("acts/")
    X = store["layers.4"]                          # (rows, d_model), in the stored dtype
    y = store.labels("label")                      # one label per row
    groups = store.groups()                        # (rows,) sample index: split by text
    for xb in store.iter_batches("layers.4", 256, shuffle=True, seed=0): ...
    ds = store.dataset("layers.4", label="label")  # a torch Dataset of (x, y)
    store.to_npz("acts.npz")                       # float32 arrays for plain numpy

Tensors come from safetensors' `safe_open`, which memory-maps each shard: only the pages that
are read are loaded. bf16 stays bf16 (only `to_npz` casts, since numpy has no bf16). The format
is described in residtap.store.manifest.

Opening checks what the manifest says before trusting it (residtap.store.checks): every path
resolves inside the store folder, and each shard's header holds the manifest's row count, row
shape and dtype for every site; a missing or damaged shard is an error that says how to repair
the store. Samples files are checked line by line when first read.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset

from residtap.store.checks import check_manifest, check_shard, inside, read_samples
from residtap.store.data import check_one_label_kind
from residtap.store.manifest import read_manifest

ROW_COLUMNS = ("sample", "position")


class Store:
    """A read-only view of a store folder. Make one with `Store.open(path)`."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Use `Store.open`; this checks the manifest and every shard header (see above)."""
        check_manifest(folder, manifest)
        for i in range(len(manifest["shards"])):
            check_shard(folder, manifest, i)
        self.folder = folder
        self.manifest = manifest
        self._tensors: dict[tuple[str, int], Tensor] = {}  # memory-mapped, loaded lazily
        self._offsets = [0]
        for shard in manifest["shards"]:
            self._offsets.append(self._offsets[-1] + shard["rows"])

    @classmethod
    def open(cls, path: str | os.PathLike) -> Store:
        """Open the store at `path` (complete, or the complete shards of an interrupted run)."""
        folder = Path(path)
        return cls(folder, read_manifest(folder))

    # -- description -----------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def model(self) -> dict[str, Any]:
        """The model identity the store was made on (residtap.identity.model_identity)."""
        return self.manifest["model"]

    @property
    def positions(self) -> str | list[int]:
        return self.manifest["positions"]

    def __len__(self) -> int:
        """Number of rows (stored token positions)."""
        return self._offsets[-1]

    def __contains__(self, site: str) -> bool:
        return site in self.manifest["sites"]

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (f"Store({str(self.folder)!r}, {len(self)} rows, {len(self.manifest['shards'])} "
                f"shards, sites={self.sites}, positions={self.positions!r}, {state})")

    # -- tensors ---------------------------------------------------------------------------
    def _check_site(self, site: str) -> None:
        if site not in self.manifest["sites"] and site not in ROW_COLUMNS:
            raise KeyError(f"site {site!r} is not in this store; it holds {self.sites}")

    def shard_tensor(self, site: str, shard: int) -> Tensor:
        """One shard's rows of `site` (memory-mapped)."""
        self._check_site(site)
        key = (site, shard)
        if key not in self._tensors:
            path = inside(self.folder, self.manifest["shards"][shard]["file"], "shard file")
            with safe_open(str(path), framework="pt") as f:
                self._tensors[key] = f.get_tensor(site)
        return self._tensors[key]

    def _cat(self, site: str) -> Tensor:
        self._check_site(site)
        parts = [self.shard_tensor(site, i) for i in range(len(self.manifest["shards"]))]
        if not parts:
            info = self.manifest["sites"].get(site, {})
            dtype = getattr(torch, info.get("dtype") or "int64")
            return torch.empty((0, *(info.get("shape") or [])), dtype=dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __getitem__(self, site: str) -> Tensor:
        """All rows of `site`: (rows, *site_shape), in the stored dtype."""
        return self._cat(site)

    def rows_of(self, site: str, index: Tensor | Sequence[int]) -> Tensor:
        """Rows `index` (global row numbers) of `site`, read shard by shard."""
        index = torch.as_tensor(index, dtype=torch.long)
        shard_of = torch.bucketize(index, torch.tensor(self._offsets[1:]), right=True)
        out = None
        for shard in shard_of.unique().tolist():
            pick = (shard_of == shard).nonzero().squeeze(1)
            part = self.shard_tensor(site, shard)[index[pick] - self._offsets[shard]]
            if out is None:
                out = part.new_empty((len(index), *part.shape[1:]))
            out[pick] = part
        if out is None:
            return self._cat(site)[:0]
        return out

    # -- per-row metadata ------------------------------------------------------------------
    @property
    def rows(self) -> dict[str, Tensor]:
        """{'sample': (rows,), 'position': (rows,)}: each row's sample index and its position
        among the sample's real tokens."""
        return {c: self._cat(c) for c in ROW_COLUMNS}

    @cached_property
    def samples(self) -> list[dict[str, Any]]:
        """One record per stored sample, in order: {'sample', 'id', 'label', ...metadata}."""
        records: list[dict[str, Any]] = []
        for i, shard in enumerate(self.manifest["shards"]):
            path = inside(self.folder, shard["samples_file"], f"shard {i} samples file")
            records += read_samples(path, shard, i)
        return records

    def groups(self) -> Tensor:
        """(rows,) LongTensor: each row's sample index, the group for splits by text
        (residtap.probes.splits.grouped_split)."""
        return self._cat("sample")

    def metadata(self, column: str) -> list[Any]:
        """Per-row values of a sample column ('id', 'label', 'split', ... or 'sample' /
        'position'); a sample's value repeats on each of its rows."""
        if column in ROW_COLUMNS:
            return self._cat(column).tolist()
        by_sample = [self._column_value(r, column) for r in self.samples]  # index = sample
        return [by_sample[s] for s in self._cat("sample").tolist()]

    def labels(self, column: str = "label") -> list[Any]:
        """Per-row labels: `metadata(column)`."""
        return self.metadata(column)

    def _column_value(self, record: dict[str, Any], column: str) -> Any:
        if column not in record:
            known = sorted({k for r in self.samples[:100] for k in r})
            raise KeyError(f"column {column!r} is not in this store's samples; columns: {known}")
        return record[column]

    def label_tensor(self, column: str = "label") -> tuple[Tensor, list[Any] | None]:
        """Per-row labels as a tensor, and the classes when they are not numbers: numeric and
        bool labels are kept (classes None); other labels become indices into sorted classes."""
        values = self.labels(column)
        check_one_label_kind(values, f"column {column!r} of {self.folder}")
        if all(isinstance(v, (bool, int, float)) for v in values):
            return torch.tensor(values), None
        classes = sorted(set(values), key=str)
        code = {c: i for i, c in enumerate(classes)}
        return torch.tensor([code[v] for v in values], dtype=torch.long), classes

    # -- iteration -------------------------------------------------------------------------
    def iter_batches(self, site: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                     label: str | None = None, buffer_rows: int = 262_144
                     ) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """Batches of `site` rows: (batch, *site_shape), or (x, y) with `label`.

        shuffle=False reads in store order. shuffle=True reads shards in a random order through a
        shuffle buffer of `buffer_rows` rows (a full shuffle when the store fits in it); the same
        seed gives the same order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}")
        self._check_site(site)
        y_all = self.label_tensor(label)[0] if label is not None else None
        gen = torch.Generator().manual_seed(seed)
        for x_idx in self._index_batches(batch_size, shuffle, gen, buffer_rows):
            x = self.rows_of(site, x_idx) if shuffle else self._slice(site, x_idx)
            yield x if y_all is None else (x, y_all[x_idx])

    def _index_batches(self, batch_size: int, shuffle: bool, gen: torch.Generator,
                       buffer_rows: int) -> Iterator[Tensor]:
        """Global row indices, batch by batch (the shuffle buffer works on indices, and reads
        each batch's rows from the memory-mapped shards)."""
        n_shards = len(self.manifest["shards"])
        order = torch.randperm(n_shards, generator=gen).tolist() if shuffle else range(n_shards)
        buffer = torch.empty(0, dtype=torch.long)
        for shard in order:
            rows = torch.arange(self._offsets[shard], self._offsets[shard + 1])
            buffer = torch.cat([buffer, rows])
            if shuffle:
                buffer = buffer[torch.randperm(len(buffer), generator=gen)]
            while len(buffer) >= max(batch_size, buffer_rows if shuffle else 0):
                yield buffer[:batch_size]
                buffer = buffer[batch_size:]
        while len(buffer):
            yield buffer[:batch_size]
            buffer = buffer[batch_size:]

    def _slice(self, site: str, index: Tensor) -> Tensor:
        lo, hi = int(index[0]), int(index[-1]) + 1
        first = bisect.bisect_right(self._offsets, lo) - 1
        last = bisect.bisect_right(self._offsets, hi - 1) - 1
        parts = [self.shard_tensor(site, s)[max(lo - self._offsets[s], 0):
                                            hi - self._offsets[s]] for s in range(first, last + 1)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def dataset(self, site: str, label: str | None = None) -> StoreDataset:
        """A map-style torch Dataset of `site` rows (x, or (x, y) with `label`)."""
        self._check_site(site)
        return StoreDataset(self, site, label)

    # -- export ----------------------------------------------------------------------------
    def to_npz(self, path: str | os.PathLike, sites: Sequence[str] | None = None) -> Path:
        """Write sites (default all) as float32 arrays, plus int64 'sample' and 'position', to a
        .npz that plain numpy loads (`np.load(path)`). Loads each site in memory once."""
        arrays: dict[str, np.ndarray] = {}
        for site in sites or self.sites:
            self._check_site(site)
            arrays[site] = self[site].float().numpy()
        for column in ROW_COLUMNS:
            arrays[column] = self._cat(column).numpy()
        path = Path(path)
        np.savez(path, **arrays)
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


class StoreDataset(Dataset):
    """Row i of one site of a store: x, or (x, y) when a label column is given."""

    def __init__(self, store: Store, site: str, label: str | None) -> None:
        self.store, self.site = store, site
        self.y, self.classes = store.label_tensor(label) if label is not None else (None, None)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, Tensor]:
        n = len(self.store)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for a store of {n} rows")
        i %= n
        shard = bisect.bisect_right(self.store._offsets, i) - 1
        x = self.store.shard_tensor(self.site, shard)[i - self.store._offsets[shard]]
        return x if self.y is None else (x, self.y[i])
