"""The checks and derived settings of `extract`'s arguments, all done before any file is written.

    folder = check_out(out)                  # a writable folder path (not an existing file)
    dtype = check_dtype("bfloat16")          # floating dtypes only
    check_token_ids(model, samples)          # ids index the model's embedding
    check_lengths(model, tok, samples, None) # no text longer than the model's positions
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from residtap.positions import check_positions
from residtap.store.checks import check_out_folder
from residtap.store.data import Sample

SHARD_BYTES = 128 * 2**20  # default shard size: rows are chosen to fill about this much


def check_out(out: str | Path) -> Path:
    if not isinstance(out, (str, Path)):
        raise TypeError(f"out must be a folder path, got {type(out).__name__}")
    folder = Path(out)
    check_out_folder(folder)
    return folder


def check_policy(positions: Any) -> str | list[int]:
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        raise TypeError("a (B, T) positions mask depends on the batch; for a data set use "
                        "'all', 'last' or a list of indices")
    check_positions(positions)
    if isinstance(positions, str):
        return positions
    return [int(i) for i in (positions.tolist() if isinstance(positions, Tensor) else positions)]


def check_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a name such as 'bfloat16', got "
                        f"{dtype!r}")
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(
            f"dtype must be a floating dtype for activations (float32, bfloat16, float16 or "
            f"float64), got {dtype_name(dtype)}, which would truncate or wrap every value; "
            "pass one of those (--dtype bfloat16)"
        )
    return dtype


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the input embedding (what token ids index), or the config's vocab_size."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    rows = getattr(embedding, "num_embeddings", None)
    return rows if isinstance(rows, int) else getattr(getattr(model, "config", None),
                                                      "vocab_size", None)


def check_token_ids(model: nn.Module, samples: list[Sample]) -> None:
    """Token-id samples must index the model's embedding (ids < its rows)."""
    vocab = vocab_size(model)
    if vocab is None:
        return
    for s in samples:
        if s.input_ids is not None and max(s.input_ids) >= vocab:
            raise ValueError(
                f"sample {s.index} (id {s.id!r}) has token id {max(s.input_ids)}, but the model's "
                f"embedding has {vocab} rows (ids 0..{vocab - 1}); were the ids made with "
                "another tokenizer?"
            )


FALLBACK_MAX_TOKENS = 131_072  # for a config that names no position limit


def max_tokens(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_MAX_TOKENS


def check_lengths(model: nn.Module, tokenizer, samples: list[Sample], max_length: int | None
                   ) -> None:
    """Without max_length, refuse a sample longer than the model's positions before any
    forward (one such text can ask attention for tens of GB). Only texts with more UTF-8 bytes
    than the limit are tokenized here: no tokenizer makes many more tokens than bytes."""
    if max_length is not None:
        return
    limit = max_tokens(model)
    for s in samples:
        if s.input_ids is not None:
            n = len(s.input_ids)
        elif len(s.text.encode()) + 16 > limit:
            n = len(tokenizer(s.text, add_special_tokens=True)["input_ids"])
        else:
            continue
        if n > limit:
            raise ValueError(
                f"sample {s.index} (id {s.id!r}) is {n} tokens long, more than the model's "
                f"{limit} positions; a forward of it could need memory quadratic in its length. "
                f"Pass max_length={limit} (--max-length {limit}) to truncate, or shorten the text"
            )


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def default_shard_rows(model: nn.Module, sites: list[str], dtype: torch.dtype | None) -> int:
    config = getattr(model, "config", None)
    d = getattr(config, "hidden_size", None) or 1024
    vocab = getattr(config, "vocab_size", None) or d
    size = (dtype or param_dtype(model)).itemsize
    row_bytes = sum((vocab if s == "logits" else d) * size for s in sites) + 16
    return max(1, SHARD_BYTES // row_bytes)


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of what decides token ids: vocabulary, special-token handling, padding side."""
    if tokenizer is None:
        return None
    try:
        vocab = sorted(tokenizer.get_vocab().items())
        probe = list(tokenizer("residtap fingerprint")["input_ids"])
    except Exception as err:  # noqa: BLE001 - any tokenizer-like object is allowed
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer (get_vocab and __call__); "
                        f"got {type(tokenizer).__name__}: {err}") from err
    text = json.dumps([type(tokenizer).__name__, vocab, probe,
                       getattr(tokenizer, "padding_side", None)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
