"""Text and files -> model inputs, the same way for every feature: encoding, the pad id,
padding, a forward's keywords, the model's device, JSON-lines files.

    ids = encode(tok, ["i feel happy"])                    # token ids per text, BOS included
    ids, mask = pad_left(ids, pad_id_of(tok))              # (B, T) each, rows aligned right
    model(**forward_inputs(model, ids, mask))              # + position ids as generate counts

Padding is done by hand (the tokenizer's own padding side and pad token do not matter, except
where the store keeps the tokenizer's side on purpose), and position ids are counted over each
row's real tokens, as `generate` does, so a padded row gives the activations of the same text
alone, for absolute and rotary position schemes alike.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

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


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"] = "left"
        ) -> tuple[Tensor, Tensor]:
    """(ids, attention_mask), both (B, T_max): rows aligned on the right (left padding, what
    generate needs) or on the left."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            span = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[b, span] = torch.as_tensor(s, dtype=torch.long)
            mask[b, span] = 1
    return ids, mask


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """`pad(seqs, pad_id, "left")`."""
    return pad(seqs, pad_id, "left")


def forward_inputs(
    model: nn.Module, ids: Tensor, mask: Tensor, *, last_logits_only: bool = False
) -> dict[str, Tensor | int]:
    """Keyword arguments for `model(**inputs)`: ids, mask, and position ids / logits_to_keep
    where the model's forward accepts them."""
    params = inspect.signature(model.forward).parameters
    device = device_of(model)
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


def device_of(model: nn.Module) -> torch.device:
    """Where the model's (first) parameters live: where its inputs go."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file (blank lines skipped, at most `limit`). FileNotFoundError
    for a missing file; ValueError naming the file and line for invalid JSON or a byte that is
    not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    rows = []
    for n, line in utf8_lines(path):
        if limit is not None and len(rows) >= limit:
            break
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not valid JSON ({err.msg})") from None
    return rows


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a file read as UTF-8; ValueError naming the file and line
    of the first byte that is not UTF-8 (a byte-order mark at the start is dropped)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{n} is not UTF-8 (byte {raw[err.start:err.start + 1]!r} at column "
                    f"{err.start + 1}); re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
