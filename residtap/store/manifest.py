"""The store's `manifest.json`: what a store holds, how it was made, and which shards are done.

A store is a folder:

    manifest.json                     this file (rewritten atomically after each shard)
    .residtap.lock                    only while a capture writes the folder: its lock, naming
                                      the holder (residtap.store.lock)
    shard-00000.safetensors           one tensor per site (rows, *site_shape), plus int64
                                      `sample` (rows,) and `position` (rows,)
    shard-00000.samples.jsonl         one line per sample in the shard: {"sample": index,
                                      "id": ..., "label": ..., ...metadata}
    shard-00001.safetensors ...

Rows are the stored token positions, in order: sample by sample, and within a sample by
position. `sample` is the sample's index in the data set (0-based, after `max_samples`);
`position` counts the sample's real tokens from its first one (padding never counts, so left
and right padding give the same numbers). The labels and other metadata of a sample live once
in the JSONL of the shard that holds its rows, not once per row.

Manifest keys (format version 1):

    format, format_version "residtap.store", 1 (the key was "version" before; both are read)
    residtap_version       the version that wrote it
    model                  residtap.identity.model_identity(model) (name, class, config_hash,
                           weights_fingerprint, ...); a resume with other weights is refused
    tokenizer              tokenizer name, or null for token-id data
    sites                  {site: {"shape": [...per-row shape], "dtype": "bfloat16"}}; shape and
                           dtype are null until the first shard is written
    positions              "all" | "last" | [indices]
    settings               every setting that decides the contents (model config hash, sites,
                           positions, dtype, data fingerprint, batch_size, shard_rows, ...)
    settings_hash          sha256 of `settings`; a re-run with the same hash resumes
    samples                number of samples in the data set
    shards                 complete shards, in order: {"file", "samples_file", "rows",
                           "first_sample", "samples"}
    rows                   rows in the complete shards
    complete               true once every sample is stored

A shard counts only once the manifest lists it; files of unlisted shards are leftovers of an
interrupted run and are replaced when the run resumes. Every path in a manifest is relative to
the store folder and must stay inside it; counts must agree with the shard headers
(residtap.store.checks, on every open).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from residtap.artefacts import atomic_write_bytes

FORMAT = "residtap.store"
VERSION = 1
MANIFEST = "manifest.json"


def shard_names(index: int) -> tuple[str, str]:
    """(tensor file, samples file) names of shard `index`."""
    return f"shard-{index:05d}.safetensors", f"shard-{index:05d}.samples.jsonl"


def settings_hash(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]




def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=False) + "\n"
    atomic_write_bytes(folder / MANIFEST, text.encode())


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the store at `folder`; clear errors for anything that is not a store."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(
            f"expected a residtap store folder, but {str(folder)!r} "
            f"{'is a file' if folder.exists() else 'does not exist'}; "
            "make one with residtap.extract(...) or `residtap capture`"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {MANIFEST}, so it is not a residtap store (or its first shard "
            "was never written); make one with residtap.extract(...)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the store is damaged") from err
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; "
            "this folder holds something other than a residtap store"
        )
    version = manifest.get("format_version", manifest.get("version"))  # "version" until 0.1
    if version != VERSION:
        raise ValueError(
            f"{path} is store format_version {version}, but this residtap reads version "
            f"{VERSION}; use the residtap version that wrote it "
            f"({manifest.get('residtap_version')}) or re-create the store"
        )
    return manifest


def settings_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable 'key: stored X, now Y' lines for the settings that differ."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            lines.append(f"{key}: store has {_short(old.get(key))}, this call has "
                         f"{_short(new.get(key))}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
