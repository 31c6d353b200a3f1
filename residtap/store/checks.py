"""What the reader (and a resuming `extract`) checks before trusting a store's files.

    check_manifest(folder, manifest)      # structure, counts, every path inside the folder
    check_shard(folder, manifest, i)      # shard i's header agrees with the manifest
    inside(folder, "shard-00000.safetensors", "shard file")   # the checked path

A manifest is data from disk: a path in it may point anywhere (`../..`, `/etc/hostname`, a
symlink out of the folder) and a count may be wrong. Every path must resolve inside the store
folder, and each shard's safetensors header must hold every site with the manifest's rows, row
shape and dtype, plus `sample` and `position`; the header is read without reading the data
(8 bytes of length and a small JSON), so opening a store stays cheap. Errors name the file and
say how to repair the store: re-running the same capture rewrites a missing or damaged shard.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from residtap.artefacts import check_can_write
from residtap.store.manifest import MANIFEST
from residtap.store.writer import SAFETENSORS_DTYPES

MAX_HEADER = 100 * 2**20  # safetensors refuses larger headers too
REPAIR = ("re-run the same capture (same arguments; residtap.extract or `residtap capture`), "
          "which rewrites missing or damaged shards")


def inside(folder: Path, relative: Any, what: str) -> Path:
    """`folder / relative`, refused (ValueError naming it) unless it stays inside `folder`:
    no absolute path, no `..`, no symlink that leads out."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{folder / MANIFEST} is damaged: a {what} path is {relative!r}, "
                         "expected a file name inside the store folder")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or Path(relative).is_absolute() or ".." in pure.parts \
            or "\\" in relative:
        raise ValueError(
            f"{folder / MANIFEST} names the {what} {relative!r}, which is outside the store "
            "folder; a store only reads files inside its own folder (the manifest was edited "
            "or damaged)"
        )
    path = folder / relative
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise ValueError(
            f"{folder / MANIFEST} names the {what} {relative!r}, which resolves to "
            f"{str(path.resolve())!r}, outside the store folder {str(root)!r} (a symlink?); a "
            "store only reads files inside its own folder"
        )
    return path


def check_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """ValueError naming what is wrong in a manifest's structure, counts or paths."""
    where = folder / MANIFEST

    def bad(what: str) -> ValueError:
        return ValueError(f"{where} is damaged: {what}; {REPAIR}, or with overwrite=True "
                          "(--overwrite) to rebuild the store")

    sites = manifest.get("sites")
    if not isinstance(sites, dict) or not sites or not all(
            isinstance(v, dict) and "shape" in v and "dtype" in v for v in sites.values()):
        raise bad(f"'sites' is {_short(sites)}, expected {{site: {{'shape', 'dtype'}}}}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise bad(f"'shards' is {_short(shards)}, expected a list")
    keys = {"file": str, "samples_file": str, "rows": int, "samples": int, "first_sample": int}
    samples = 0
    start = 0  # a data-parallel part's shards start at its block's first sample
    if shards and isinstance(shards[0], dict) and "part" in (manifest.get("settings") or {}):
        start = shards[0].get("first_sample", 0)
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or not all(
                isinstance(shard.get(k), t) and not isinstance(shard.get(k), bool)
                for k, t in keys.items()):
            raise bad(f"shard {i} is {_short(shard)}, expected {list(keys)} with int counts")
        if shard["rows"] < 0 or shard["samples"] < 1:
            raise bad(f"shard {i} has {shard['rows']} rows and {shard['samples']} samples")
        if shard["first_sample"] != start + samples:  # a data-parallel part starts later
            raise bad(f"shard {i} starts at sample {shard['first_sample']}, but the shards "
                      f"before it end at sample {start + samples - 1}")
        samples += shard["samples"]
        inside(folder, shard["file"], f"shard {i} file")
        inside(folder, shard["samples_file"], f"shard {i} samples file")
    for part in manifest.get("parts") or []:
        inside(folder, part, "part folder")
    rows = sum(s["rows"] for s in shards)
    if manifest.get("rows") != rows:
        raise bad(f"'rows' is {_short(manifest.get('rows'))} but its shards hold {rows} rows")
    total = manifest.get("samples")
    if not isinstance(total, int) or samples > total:
        raise bad(f"'samples' is {_short(total)} but its shards hold {samples} samples")
    if manifest.get("complete") and samples != total:
        raise bad(f"it is marked complete but its shards hold {samples} of {total} samples")


def read_header(path: Path, what: str) -> dict[str, Any]:
    """The JSON header of the safetensors file `path` (FileNotFoundError / ValueError)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} is missing; the store is damaged: "
                                f"{REPAIR}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, MAX_HEADER):
            raise ValueError(
                f"{what} {str(path)!r} is not a safetensors file (its first 8 bytes give a "
                f"header of {n} bytes in a file of {size}: truncated, or another format such as "
                f"a pickle); the store is damaged: {REPAIR}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {str(path)!r} has a corrupt safetensors header ({err}); the "
                         f"store is damaged: {REPAIR}") from err
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{what} {str(path)!r} has a corrupt safetensors header (tensor "
                             f"{name!r}: {_short(info)}); the store is damaged: {REPAIR}")
        if offsets[1] > data:
            raise ValueError(f"{what} {str(path)!r} is truncated: tensor {name!r} ends at byte "
                             f"{offsets[1]} of a data section of {data}; the store is damaged: "
                             f"{REPAIR}")
    return header


def check_shard(folder: Path, manifest: dict[str, Any], i: int) -> None:
    """Shard i's header against the manifest: rows, row shape and dtype of every site, and the
    int64 `sample` / `position` columns. The samples file must exist."""
    shard = manifest["shards"][i]
    what = f"shard {i} file"
    path = inside(folder, shard["file"], what)
    header = read_header(path, what)
    rows = shard["rows"]
    expected = {site: (info["shape"], info["dtype"]) for site, info in manifest["sites"].items()}
    expected |= {"sample": ([], "int64"), "position": ([], "int64")}
    for name, (shape, dtype) in expected.items():
        info = header.get(name)
        if not isinstance(info, dict):
            raise ValueError(f"{what} {str(path)!r} has no tensor {name!r} (it holds "
                             f"{sorted(k for k in header if k != '__metadata__')}); the store "
                             f"is damaged: {REPAIR}")
        code = SAFETENSORS_DTYPES.get(getattr(torch, str(dtype), None)) if dtype else None
        want = [rows, *shape] if shape is not None else None
        if (want is not None and info.get("shape") != want) or (
                code is not None and info.get("dtype") != code):
            raise ValueError(
                f"{what} {str(path)!r}: tensor {name!r} is {info.get('shape')} "
                f"{info.get('dtype')}, but the manifest says {rows} rows of {shape} {dtype} "
                f"(expected {want} {code}); the manifest or the shard was edited or damaged: "
                f"{REPAIR}"
            )
    samples_path = inside(folder, shard["samples_file"], f"shard {i} samples file")
    if not samples_path.is_file():
        raise FileNotFoundError(f"shard {i} samples file {str(samples_path)!r} is missing; the "
                                f"store is damaged: {REPAIR}")


def read_samples(path: Path, shard: dict[str, Any], i: int) -> list[dict[str, Any]]:
    """The records of shard i's samples JSONL, checked line by line against the manifest."""
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"shard {i} samples file {str(path)!r} is not UTF-8 ({err}); the "
                         f"store is damaged: {REPAIR}") from err
    for n, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n} is not valid JSON ({err}); the store is damaged: "
                             f"{REPAIR}") from err
        expect = shard["first_sample"] + len(records)
        if not isinstance(record, dict) or record.get("sample") != expect:
            raise ValueError(f"{path}:{n} should be the record of sample {expect}, got "
                             f"{_short(record)}; the store is damaged: {REPAIR}")
        records.append(record)
    if len(records) != shard["samples"]:
        raise ValueError(f"shard {i} samples file {str(path)!r} holds {len(records)} records but "
                         f"the manifest lists {shard['samples']} samples; the store is damaged: "
                         f"{REPAIR}")
    return records


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def check_out_folder(folder: Path) -> None:
    """ValueError unless a store can be written at `folder`: not an existing file, and in a
    folder this process can create files in (checked with an unnamed temporary file)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"out {str(folder)!r} is an existing file; the store is a folder, so "
                         "pass a new folder path (or an existing store)")
    check_can_write(folder, f"out {str(folder)!r}")


