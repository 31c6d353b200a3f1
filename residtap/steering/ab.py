"""A/B items in CAA's format, tokenised: the shared prompt and each answer's first own token.

    items = ab_items(tok, [{"question": "...", "answer_matching_behavior": " (A)",
                            "answer_not_matching_behavior": " (B)"}])
    items[0].prompt, items[0].matching, items[0].other      # token ids

Each answer is appended to the question and tokenised; the tokens the two share form the
prompt, and the first token where they differ is each answer's token (so " (A)" / " (B)"
compare "A" with "B" after " ("). Steering vectors are made from A/B rows (`SteeringVector
.from_ab`: each side read at its answer token) and measured on them (`steerability`: the
propensity logit(matching) - logit(other) at the prompt's last position).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from residtap.inputs import encode

AB_KEYS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")


@dataclass
class ABItem:
    """One A/B example, tokenised: the shared prompt and the two answers' first tokens."""

    prompt: list[int]
    matching: int
    other: int


def ab_items(tokenizer: Any, rows: Sequence[Mapping[str, str]]) -> list[ABItem]:
    """Tokenise CAA-style rows (see the module docstring); ValueError names the bad row."""
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
        raise TypeError(f"expected a list of A/B rows (dicts), got {type(rows).__name__}")
    if not rows:
        raise ValueError("no A/B rows given; expected a non-empty list with keys "
                         + ", ".join(AB_KEYS))
    for i, row in enumerate(rows):
        fields = row if isinstance(row, Mapping) else {}
        missing = [k for k in AB_KEYS if not isinstance(fields.get(k), str)]
        if missing:
            raise ValueError(
                f"A/B row {i} lacks string field(s) {missing}; expected keys {list(AB_KEYS)}, "
                f"got {sorted(row) if isinstance(row, Mapping) else type(row).__name__}"
            )
    texts = [r["question"] + r[k] for r in rows for k in AB_KEYS[1:]]
    ids = encode(tokenizer, texts, "A/B texts")
    items = []
    for i in range(len(rows)):
        a, b = ids[2 * i], ids[2 * i + 1]
        k = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if k is None or k == 0:
            raise ValueError(
                f"A/B row {i}: the two answers {rows[i][AB_KEYS[1]]!r} and {rows[i][AB_KEYS[2]]!r} "
                + ("tokenise to the same tokens" if k is None else "differ at the first token, "
                   "leaving no prompt") + "; the answers must differ after a shared prompt"
            )
        items.append(ABItem(a[:k], a[k], b[k]))
    return items
