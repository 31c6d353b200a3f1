"""A store of SAE feature activations, made from a store of residuals, and probes trained on it.

    acts = residtap.extract(model, tok, data, ["layers.4"], "acts/", positions="last")
    feats = encode_store(acts, sae, "feats/", features=[132, 233])   # site "layers.4/sae"
    probe = train_feature_probe(feats, "label")                      # a Probe over (2,) rows
    bank.add_sae(sae, [132, 233], probe=probe, name="truth")         # folded into the bank

`encode_store` reads the residual store shard by shard (memory-mapped) and encodes each run of
whole samples of at most `shard_rows` rows, so memory stays near shard_rows x features whatever
the SAE's width (full width, `features=None`, is what analysis wants; a selection is what a bank
can read). The output is an ordinary residtap store (residtap.store.manifest): same samples,
rows, positions and model identity, one site `"{site}/sae"` of shape (k,), and a manifest key
"sae" recording the SAE and the features (residtap.sae.features.SAEFeatures.describe). Values
are `SAEFeatures.encode`: exactly what a bank computes for those features (for a TopK subset
with approximate_topk=True, relu of the pre-activation; see residtap.sae.features).

`train_feature_probe` trains a linear probe on it (residtap.probes.sweep.train_site_probe) and
records the features in the probe's metadata["sae"], so a saved probe file says which features
it reads: `ProbeBank.add_file(path, sae=folder)` folds it back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from tqdm.auto import tqdm

from residtap.artefacts import atomic_write_bytes
from residtap.sae.features import SAEFeatures
from residtap.sae.model import SAE
from residtap.store.manifest import settings_hash, shard_names, write_manifest
from residtap.store.reader import Store

log = logging.getLogger(__name__)

__all__ = ["encode_store", "feature_site", "train_feature_probe"]


def feature_site(site: str) -> str:
    """The name a feature store gives the features of `site`."""
    return f"{site}/sae"


def encode_store(store: Store | str | os.PathLike, sae: SAE | SAEFeatures, out: str | os.PathLike,
                 *, features: Sequence[int] | Tensor | None = None,
                 approximate_topk: bool = False, shard_rows: int = 4096,
                 dtype: torch.dtype | None = None, overwrite: bool = False,
                 progress: bool = True) -> Store:
    """Write the feature activations of `store`'s rows at the SAE's site to a new store at
    `out` (module docstring) and return it opened. features None: all d_sae (full width).
    dtype: of the stored activations (default the SAE's)."""
    store = store if isinstance(store, Store) else Store.open(store)
    feats = sae if isinstance(sae, SAEFeatures) else SAEFeatures.select(
        sae, features, approximate_topk=approximate_topk)
    site = feats.site
    if site not in store.sites:
        raise LookupError(f"the SAE reads {site!r}, which store {store.folder} does not hold "
                          f"(its sites: {store.sites}); capture that site first")
    if not isinstance(shard_rows, int) or shard_rows < 1:
        raise ValueError(f"shard_rows must be a positive int, got {shard_rows!r}")
    folder = Path(out)
    if folder.resolve() == Path(store.folder).resolve():
        raise ValueError("out is the residual store itself; pass a new folder")
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True "
                                  "(--overwrite) to replace it, or another folder")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = feature_site(site)
    dtype = dtype or feats.sae.dtype
    records = {int(r["sample"]): r for r in store.samples}
    shards: list[dict[str, Any]] = []
    bar = tqdm(total=len(store), desc=f"encode store ({feats.n_features} features)",
               unit="row", disable=not progress or None)
    for i, source in enumerate(store.manifest["shards"]):
        h = store.shard_tensor(site, i)  # (rows, d_in), memory-mapped
        sample = store.shard_tensor("sample", i)
        position = store.shard_tensor("position", i)
        first, end = source["first_sample"], source["first_sample"] + source["samples"]
        runs = _sample_runs(sample, shard_rows)
        for j, (lo, hi) in enumerate(runs):
            acts = feats.encode(h[lo:hi]).to(dtype=dtype, device="cpu")  # (n, k)
            tensor_file, samples_file = shard_names(len(shards))
            tensors = {name: acts.contiguous(), "sample": sample[lo:hi].clone(),
                       "position": position[lo:hi].clone()}
            meta = {"format": store.manifest["format"], "shard": str(len(shards))}
            atomic_write_bytes(folder / tensor_file, safetensors_bytes(tensors, metadata=meta))
            last = end if j == len(runs) - 1 else int(sample[hi - 1]) + 1  # samples first..last-1
            lines = "".join(json.dumps(records[s]) + "\n" for s in range(first, last))
            atomic_write_bytes(folder / samples_file, lines.encode())
            shards.append({"file": tensor_file, "samples_file": samples_file, "rows": hi - lo,
                           "first_sample": first, "samples": last - first})
            first = last
            bar.update(hi - lo)
    bar.close()
    manifest = {k: v for k, v in store.manifest.items() if k not in ("parts", "shards")}
    described = feats.describe()
    settings = dict(store.manifest.get("settings") or {})
    settings.pop("part", None)
    settings.update(sae=described, source_settings_hash=store.manifest.get("settings_hash"))
    manifest.update(
        sites={name: {"shape": [feats.n_features], "dtype": str(dtype).removeprefix("torch.")}},
        shards=shards, rows=sum(s["rows"] for s in shards), settings=settings,
        settings_hash=settings_hash(settings), sae=described, source=str(store.folder))
    write_manifest(folder, manifest)
    log.info("encoded %d rows of %s into %d features at %s", manifest["rows"], site,
             feats.n_features, folder)
    return Store.open(folder)


def _sample_runs(sample: Tensor, max_rows: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of whole samples, each at most max_rows rows (or one sample)."""
    n = int(sample.shape[0])
    if n == 0:
        return [(0, 0)]
    starts = [0] + (torch.nonzero(sample[1:] != sample[:-1]).flatten() + 1).tolist() + [n]
    runs, lo = [], 0
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        if b - lo > max_rows and a > lo:
            runs.append((lo, a))
            lo = a
    runs.append((lo, n))
    return runs


def feature_info(store: Store) -> dict[str, Any]:
    """What a feature store records of its SAE and features (its manifest's "sae")."""
    info = store.manifest.get("sae")
    if not isinstance(info, dict):
        raise ValueError(f"{store.folder} is not a store of SAE features (no 'sae' in its "
                         "manifest); make one with residtap.sae.store.encode_store")
    return info


def train_feature_probe(store: Store | str | os.PathLike, label_column: str,
                        **kwargs: Any) -> Any:
    """A linear probe on a feature store's rows (residtap.probes.sweep.train_site_probe; its
    keyword arguments pass through), with metadata["sae"] naming the features it reads."""
    from residtap.probes.sweep import train_site_probe

    store = store if isinstance(store, Store) else Store.open(store)
    info = feature_info(store)
    probe = train_site_probe(store, label_column, feature_site(info["site"]), **kwargs)
    probe.metadata["sae"] = dict(info)
    return probe
