"""Steering-vector files: one safetensors tensor and its metadata, checked whole on reading.

    write_vector_file("mood.safetensors", vector, {"site": "layers.3", ...})
    vector, fields = read_vector_file("mood.safetensors")     # SteeringVector.load uses these

Format: a residtap artefact (residtap.artefacts: safetensors, every metadata value JSON,
written atomically) of format "residtap.steering_vector", format_version 2: one float32 tensor
"vector" (d,) and the fields site, method, position, normalized, norm (the vector's L2 norm),
model (residtap.identity.model_identity, or null) and extra. Version 1 files (plain-string
format, version, site and method) are still read. Reading never unpickles, and refuses a file
whose format, version, site, dtype or fields are not what this version writes, naming the
field and how to fix it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from residtap.artefacts import read_artefact, write_artefact

FORMAT = "residtap.steering_vector"
FORMAT_VERSION = 2  # 2: every metadata value JSON (residtap.artefacts); 1 is still read
TENSOR_KEY = "vector"
MAKE = "make one with SteeringVector.save or `residtap steer make`"
FIX = f"the file was damaged or edited; {MAKE}"


def write_vector_file(path: str | Path, vector: Tensor, fields: dict[str, Any]) -> Path:
    """Write `vector` (d,) with `fields` (site, method, position, normalized, model, extra),
    atomically; a path that cannot be written is a ValueError before anything is written."""
    return write_artefact(path, FORMAT, FORMAT_VERSION, {TENSOR_KEY: vector}, {
        "site": fields["site"], "method": fields["method"], "position": fields["position"],
        "normalized": fields["normalized"], "norm": float(vector.norm()),
        "model": fields["model"], "extra": fields["extra"]})


def read_vector_file(path: str | Path) -> tuple[Tensor, dict[str, Any]]:
    """(vector (d,), fields) of a file written by `write_vector_file`; ValueError naming what
    is wrong with a file that is not one, or is damaged."""
    path = Path(path)
    meta, tensors = read_artefact(path, FORMAT, FORMAT_VERSION, "steering vector file", MAKE)
    tensor = tensors.get(TENSOR_KEY)
    if tensor is None:
        raise ValueError(f"{path} has no tensor {TENSOR_KEY!r} (tensors {list(tensors)}); {FIX}")
    site = meta.get("site", object, None)
    if not isinstance(site, str) or not site:
        raise ValueError(f"{path}: metadata 'site' is {site!r}; expected a site name such as "
                         f"'layers.3'; {FIX}")
    if not tensor.is_floating_point():
        raise ValueError(f"{path}: tensor {TENSOR_KEY!r} is {tensor.dtype}, expected a float "
                         f"vector (d,); {FIX}")
    fields = {
        "site": site,
        "method": meta.get("method", str, "unknown"),
        "model": meta.get("model", (dict, type(None)), None),
        "position": meta.get("position", (str, int, type(None)), None),
        "normalized": meta.get("normalized", bool, False),
        "extra": meta.get("extra", dict, {}),
    }
    return tensor, fields
