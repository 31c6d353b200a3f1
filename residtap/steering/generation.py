"""Steered and unsteered greedy generations side by side, from one batched `generate` call.

    rows = compare_generations(model, tok, ["once upon"], vec, strengths=[4.0])
    rows[0]["generations"]     # {0.0: "...", 4.0: "..."}

Each prompt is repeated once per strength (0 = unsteered) and every copy gets its own strength,
so the whole comparison is one generate call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from residtap.inputs import device_of, encode, pad_id_of, pad_left
from residtap.steering.inject import PositionPolicy, steer
from residtap.steering.vector import SteeringVector


def compare_generations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    vector: SteeringVector,
    strengths: Sequence[float],
    *,
    max_new_tokens: int = 20,
    positions: PositionPolicy = "all",
    include_unsteered: bool = True,
) -> list[dict[str, Any]]:
    """[{"prompt": p, "generations": {strength: continuation}}, ...], greedy decoding."""
    strengths = [float(s) for s in strengths]
    if not strengths or not all(math.isfinite(s) for s in strengths):
        raise ValueError(f"give at least one finite strength, got {strengths}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sweep = ([0.0] if include_unsteered and 0.0 not in strengths else []) + strengths
    ids = encode(tokenizer, prompts, "prompts")
    pad = pad_id_of(tokenizer)
    input_ids, mask = pad_left([s for s in ids for _ in sweep], pad)
    per_row = torch.tensor([s for _ in ids for s in sweep])  # (B,)
    device = device_of(model)
    with torch.no_grad(), steer(model, vector, per_row, positions=positions):
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = out[:, input_ids.shape[1]:].cpu()
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    rows = []
    for p, prompt in enumerate(prompts):
        chunk = texts[p * len(sweep):(p + 1) * len(sweep)]
        rows.append({"prompt": prompt,
                     "generations": dict(zip(sweep, (t.strip() for t in chunk), strict=True))})
    return rows
