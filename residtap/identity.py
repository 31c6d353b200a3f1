"""Model identity: a short, stable description of which model produced an artefact.

Stores, probe files, steering vectors and tuned lenses record it, and loaders compare it, so
that an artefact made on one model is never silently used on another. `read_safetensors` is the
file read those loaders share.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

# Config keys that do not change what the network computes; left out of the hash.
_VOLATILE_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
    "_attn_implementation", "_attn_implementation_autoset", "use_cache", "output_hidden_states",
    "output_attentions", "return_dict", "_commit_hash", "name_or_path",
}


def config_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the model's config, without the volatile keys."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"expected a Hugging Face model with a .config, got {type(model).__name__}; "
            "pass a transformers PreTrainedModel"
        )
    raw = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_KEYS}
    text = json.dumps(raw, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(model: nn.Module) -> dict[str, Any]:
    """{'name': ..., 'class': ..., 'model_type': ..., 'config_hash': ..., 'd_model': ...}."""
    config = model.config
    return {
        "name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", "unknown"),
        "config_hash": config_hash(model),
        "d_model": getattr(config, "hidden_size", None),
    }


def check_same_model(recorded: dict[str, Any], model: nn.Module, what: str) -> None:
    """Raise ValueError when `recorded` (an identity) was not made on `model`."""
    current = config_hash(model)
    if recorded.get("config_hash") != current:
        raise ValueError(
            f"{what} was made on model {recorded.get('name')!r} "
            f"(config hash {recorded.get('config_hash')}), but this model "
            f"{getattr(model.config, '_name_or_path', '') or type(model).__name__!r} has config "
            f"hash {current}; use the model it was made on, or re-create the {what} for this one"
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
