"""Steering-vector files: one safetensors tensor and its metadata, checked whole on reading.

    write_vector_file("mood.safetensors", vector, {"site": "layers.3", ...})
    vector, fields = read_vector_file("mood.safetensors")     # SteeringVector.load uses these

Format (safetensors): one float32 tensor "vector" (d,) and string metadata: format
"residtap.steering_vector", format_version "1", site, method, position, normalized, norm (the
vector's L2 norm), model (JSON of residtap.identity.model_identity, or "null") and extra (JSON).
Reading never unpickles, and refuses a file whose format, version, site, dtype or JSON fields
are not what this version writes, naming the field and how to fix it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from residtap.identity import read_safetensors
from residtap.store.checks import check_out_file

FORMAT = "residtap.steering_vector"
FORMAT_VERSION = "1"
TENSOR_KEY = "vector"


def write_vector_file(path: str | Path, vector: Tensor, fields: dict[str, Any]) -> Path:
    """Write `vector` (d,) with `fields` (site, method, position, normalized, model, extra);
    missing parent folders are created; a path that cannot be written (a folder, a file where
    a folder should be, read-only) is a ValueError."""
    path = Path(path)
    check_out_file(path)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "site": fields["site"],
        "method": fields["method"],
        "position": json.dumps(fields["position"]),
        "normalized": json.dumps(fields["normalized"]),
        "norm": repr(float(vector.norm())),
        "model": json.dumps(fields["model"], sort_keys=True, default=str),
        "extra": json.dumps(fields["extra"], sort_keys=True, default=str),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({TENSOR_KEY: vector}, str(path), metadata=metadata)
    return path


def read_vector_file(path: str | Path) -> tuple[Tensor, dict[str, Any]]:
    """(vector (d,), fields) of a file written by `write_vector_file`; ValueError naming what
    is wrong with a file that is not one, or is damaged."""
    path = Path(path)
    meta, tensors = read_safetensors(path, "steering vector file")
    keys, tensor = list(tensors), tensors.get(TENSOR_KEY)
    if meta.get("format") != FORMAT or tensor is None:
        raise ValueError(
            f"{path} is not a residtap steering vector (expected metadata format={FORMAT!r} "
            f"and a tensor {TENSOR_KEY!r}; got format={meta.get('format')!r}, tensors "
            f"{keys}); make one with SteeringVector.save or `residtap steer make`"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has steering-vector format version {meta.get('format_version')!r}; this "
            f"residtap reads version {FORMAT_VERSION}; upgrade residtap or re-make the vector"
        )
    site = meta.get("site")
    if not isinstance(site, str) or not site:
        raise ValueError(f"{path}: metadata 'site' is {site!r}; expected a site name such as "
                         "'layers.3'; the file was damaged or edited, re-make the vector")
    if not tensor.is_floating_point():
        raise ValueError(f"{path}: tensor {TENSOR_KEY!r} is {tensor.dtype}, expected a float "
                         "vector (d,); the file was damaged or edited, re-make the vector")
    fields = {
        "site": site,
        "method": meta.get("method", "unknown"),
        "model": _json_meta(path, meta, "model", "null", (dict, type(None))),
        "position": _json_meta(path, meta, "position", "null", (str, int, type(None))),
        "normalized": _json_meta(path, meta, "normalized", "false", bool),
        "extra": _json_meta(path, meta, "extra", "{}", dict),
    }
    return tensor, fields


def _json_meta(path: Path, meta: dict[str, str], key: str, default: str, types) -> Any:
    """A JSON-encoded metadata value of a steering-vector file, of the expected type."""
    text = meta.get(key, default)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({err}): {text[:60]!r}; "
                         "the file was damaged or edited, re-make the vector") from err
    if not isinstance(value, types):
        raise ValueError(f"{path}: metadata {key!r} is {text[:60]!r}, of the wrong type; the "
                         "file was damaged or edited, re-make the vector")
    return value
