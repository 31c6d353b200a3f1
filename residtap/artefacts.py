"""Artefact files, one convention: probe files, steering vectors, tuned lenses (safetensors) and
the store's manifest (JSON).

    write_artefact(path, "residtap.steering_vector", 2, {"vector": v}, {"site": "layers.3"})
    meta, tensors = read_artefact(path, "residtap.steering_vector", 2, "steering vector file")
    meta.get("site", str)                  # a typed field; an error names the file and key

Layout of a safetensors artefact: its tensors, and string metadata in which every value is a
JSON document: `format` ("residtap.<kind>"), `format_version` (an int, raised when the layout
changes), `residtap_version`, then the kind's own fields (the model identity, the site, ...).
The store's manifest.json carries the same `format` and `format_version` keys.

Writing checks the path first (a folder, or a file where a folder should be, is a ValueError
before any work), creates missing parent folders and is atomic: a temporary file beside the
target, fsynced, then renamed, so a reader sees the old file or the complete new one. Reading
never unpickles, checks the format and the version (newer than this residtap reads: an error
saying to upgrade), decodes every field (errors name the file and the key) and refuses NaN/Inf
tensors. Files of earlier layouts stay readable: their plain-string fields (the format, the
version, a site) are read as strings.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from residtap.version import __version__

_UNSET = object()


class Metadata(dict):
    """An artefact's decoded metadata, with typed access: `meta.get("site", str)`."""

    def __init__(self, raw: dict[str, str], path: Path, fix: str) -> None:
        decoded, self.not_json = {}, {}
        for key, text in raw.items():
            try:
                decoded[key] = json.loads(text)
            except json.JSONDecodeError as err:  # a plain string (earlier layouts), or damage
                decoded[key], self.not_json[key] = text, err
        super().__init__(decoded)
        self.path, self.fix = path, fix

    def get(self, key: str, types: type | tuple[type, ...] = object,  # type: ignore[override]
            default: Any = _UNSET) -> Any:
        """The field `key` if it is of `types`; `default` when absent (ValueError without a
        default, or when the value has another type)."""
        if key not in self:
            if default is _UNSET:
                raise ValueError(f"{self.path}: metadata {key!r} is missing; {self.fix}")
            return default
        value = self[key]
        if key in self.not_json and not isinstance(value, types):
            raise ValueError(f"{self.path}: metadata {key!r} is not valid JSON "
                             f"({self.not_json[key]}): {value!r:.60}; {self.fix}")
        if not isinstance(value, types):
            raise ValueError(f"{self.path}: metadata {key!r} is {value!r:.80}, of the wrong "
                             f"type; {self.fix}")
        return value


def write_artefact(path: str | os.PathLike, format: str, version: int,
                   tensors: dict[str, Tensor], fields: dict[str, Any]) -> Path:
    """Write a safetensors artefact atomically (see the module docstring)."""
    from safetensors.torch import save

    path = Path(path)
    check_out_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": format, "format_version": version, "residtap_version": __version__,
            **fields}
    text = {key: json.dumps(value, sort_keys=True, default=str) for key, value in meta.items()}
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=text))
    return path


def read_artefact(path: str | os.PathLike, format: str, version: int, what: str,
                  make: str = "make it again", legacy: dict[str, int] | None = None
                  ) -> tuple[Metadata, dict[str, Tensor]]:
    """(metadata, tensors) of a safetensors artefact of `format`, at most `version`. `make` says
    how to make one (it ends every error); `legacy` maps format strings of earlier layouts to
    the version they stand for."""
    path = Path(path)
    raw, tensors = read_safetensors(path, what, f"; {make}")
    fix = f"the file was damaged or edited; {make}"
    meta = Metadata(raw, path, fix)
    found_format = meta.get("format", object, None)
    if found_format in (legacy or {}):
        meta["format"], meta["format_version"] = format, legacy[found_format]
    elif found_format != format:
        raise ValueError(f"{path} is not a {what} (metadata format {raw.get('format')!r}, "
                         f"expected {format!r}); {fix}")
    found = _version(meta.get("format_version", object, 1))
    if found is None or found < 1:
        raise ValueError(f"{path}: format_version {raw.get('format_version')!r} is not a "
                         f"positive integer; {fix}")
    if found > version:
        raise ValueError(f"{path} is a {what} of format_version {found}; this residtap "
                         f"({__version__}) reads up to {version}: upgrade residtap")
    meta["format_version"] = found
    check_finite(path, tensors, what)
    return meta, tensors


def _version(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else None


def check_finite(path: str | os.PathLike, tensors: dict[str, Tensor], what: str) -> None:
    """ValueError naming the first tensor of a `what` file with NaN or Inf entries."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{path}: tensor {name!r} of this {what} has {bad} NaN/Inf entries; the file was "
                f"damaged or made from diverged training; re-create the {what}"
            )


def read_safetensors(path: str | os.PathLike, what: str, hint: str = ""
                     ) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of the safetensors file at `path`, a `what` ("probe file", ...):
    FileNotFoundError ("no <what> at <path><hint>") or ValueError for an unreadable file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); was it truncated?"
        ) from err


def check_out_file(path: Path) -> None:
    """ValueError unless a file can be written at `path` (checked before expensive work)."""
    if path.is_dir():
        raise ValueError(f"out {str(path)!r} is a folder; pass a file path such as "
                         f"{str(path / 'out.safetensors')!r}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"out {str(path)!r} is an existing read-only file; choose another path "
                         "or make it writable")
    check_can_write(path.parent, f"out {str(path)!r}")


def check_can_write(folder: Path, what: str) -> None:
    existing = folder
    while not existing.exists():  # the folders that do not exist yet are created later
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} cannot be created: {str(existing)!r} is a file, not a folder; "
                         "choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):  # unnamed where the OS allows (O_TMPFILE)
            pass
    except OSError as err:
        raise ValueError(f"{what} is not writable: cannot create files in {str(existing)!r} "
                         f"({err.strerror}); choose a writable path or fix the permissions"
                         ) from None


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(f)` on a temporary file beside `path`, fsync it and rename it to `path`, so
    `path` is either the old file or the complete new one; the temporary file never stays."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
