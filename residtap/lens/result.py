"""What the logit lens saw: per site, batch row and position, the top-k tokens with their
full-vocabulary probabilities, entropy, KL to the final layer and the rank of the next token.

    result = residtap.run_lens(model, tok, ["The capital of France is"], max_new_tokens=8)
    result.topk_probs[:, 0, -1]      # (L, k) every site's guesses at the last position of row 0
    result.to_json()                 # plain lists, the "residtap.lens/1" format of lens.json

Pictures and files of a result (lens.json, lens.png, lens.html) are written by
residtap.lens.plot, which the command line and the demo call; the result itself only holds data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

JSON_FORMAT = "residtap.lens/1"


@dataclass
class LensResult:
    """What the lens saw. L = sites, B = batch rows, T = positions, k = top-k."""

    sites: list[str]
    topk_ids: Tensor  # (L, B, T, k) int64
    topk_probs: Tensor  # (L, B, T, k) float32, full-vocabulary probabilities
    entropy: Tensor  # (L, B, T) nats
    kl: Tensor  # (L, B, T) KL(final layer || site), nats
    actual_rank: Tensor  # (L, B, T) rank of the token that came next; -1 unknown
    sequences: Tensor  # (B, T_total) prompt + generated token ids
    attention_mask: Tensor  # (B, T) 1 at real positions
    prompt_length: int
    vocab_text: dict[int, str] = field(default_factory=dict)  # id -> decoded text

    @property
    def length(self) -> int:
        return int(self.topk_ids.shape[2])

    def add_token_text(self, tokenizer: Any) -> None:
        """Decode the text of every token id that appears (each id once)."""
        ids = torch.cat([self.topk_ids.flatten(), self.sequences.flatten()]).unique().tolist()
        self.vocab_text = {i: tokenizer.decode([i]) for i in ids}

    def text(self, token_id: int) -> str:
        return self.vocab_text.get(int(token_id), f"<{int(token_id)}>")

    def real_positions(self, row: int = 0) -> list[int]:
        """Positions of batch row `row` that hold real tokens (pads skipped)."""
        self._check_row(row)
        return self.attention_mask[row].nonzero().flatten().tolist()

    def _check_row(self, row: int) -> None:
        B = self.topk_ids.shape[1]
        if not -B <= row < B:
            raise IndexError(f"row {row} out of range: the result has {B} batch rows")

    def to_json(self) -> dict[str, Any]:
        """Plain lists (nested L, B, T[, k]) ready for json.dump; probabilities to 6 digits."""
        text = self.text
        return {
            "format": JSON_FORMAT,
            "sites": self.sites,
            "prompt_length": self.prompt_length,
            "top_k": int(self.topk_ids.shape[-1]),
            "tokens": self.sequences.tolist(),
            "token_text": [[text(i) for i in row] for row in self.sequences.tolist()],
            "attention_mask": self.attention_mask.tolist(),
            "topk_ids": self.topk_ids.tolist(),
            "topk_text": _map_nested(self.topk_ids.tolist(), text),
            "topk_probs": _rounded(self.topk_probs),
            "entropy": _rounded(self.entropy),
            "kl": _rounded(self.kl),
            "actual_rank": self.actual_rank.tolist(),
        }


def _rounded(t: Tensor, digits: int = 6) -> list:
    return torch.round(t.float(), decimals=digits).tolist()


def _map_nested(values: list, fn) -> list:
    return [_map_nested(v, fn) if isinstance(v, list) else fn(v) for v in values]
