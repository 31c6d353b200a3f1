"""Text -> padded model inputs, done the same way by vector extraction, evaluation and generate.

Padding is on the left, by hand (the tokenizer's own padding side and pad token do not matter),
and position ids are counted over each row's real tokens, as `generate` does, so a padded row
gives the activations of the same text alone, for absolute and rotary position schemes alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def encode(tokenizer: Any, texts: Sequence[str], what: str = "texts") -> list[list[int]]:
    """Token ids of each text, special tokens included (the model's BOS, if it uses one)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(
            f"{what} must be a list of strings, got {type(texts).__name__}; wrap a single "
            "text in a list"
        )
    if not texts:
        raise ValueError(f"{what} is empty; give at least one text")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(
            f"{what} must hold only strings; item {bad[0]} is {type(texts[bad[0]]).__name__}"
        )
    ids = [list(map(int, row)) for row in tokenizer(list(texts))["input_ids"]]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(
            f"{what}[{empty[0]}] = {texts[empty[0]]!r} tokenizes to no tokens; drop it or give "
            "it some text"
        )
    return ids


def pad_id_of(tokenizer: Any) -> int:
    """Any id works for padding (pads are masked); prefer the tokenizer's own."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, attention_mask), both (B, T_max), rows aligned on the right."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[b, T - len(s):] = 1
    return ids, mask


def forward_inputs(
    model: nn.Module, ids: Tensor, mask: Tensor, *, last_logits_only: bool = False
) -> dict[str, Tensor | int]:
    """Keyword arguments for `model(**inputs)`: ids, mask, and position ids / logits_to_keep
    where the model's forward accepts them."""
    params = inspect.signature(model.forward).parameters
    device = _device_of(model)
    inputs: dict[str, Tensor | int] = {
        "input_ids": ids.to(device), "attention_mask": mask.to(device)
    }
    if "position_ids" in params:
        inputs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0).to(device)
    if last_logits_only and "logits_to_keep" in params:
        inputs["logits_to_keep"] = 1
    return inputs


def cache_keyword(model: nn.Module) -> str:
    """The keyword the model's forward takes its KV cache under: `cache` from transformers
    5.24, `past_key_values` before (5.24 still accepts it, with a FutureWarning)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
