"""The arithmetic behind a steering vector made from contrastive texts.

    pos = read_activations(model, pos_ids, "layers.3", "last", pad_id)   # (N, d)
    neg = read_activations(model, neg_ids, "layers.3", "last", pad_id)   # (N, d)
    diffs = pos - neg
    mean_diff = diffs.mean(dim=0)                     # "mean_diff" (CAA)
    direction = pca_direction(diffs, mean_diff)       # "pca" (repeng's pca_diff)

`read_activations` runs padded batches and stops each forward at the site; a padded row reads
exactly what the text alone would (left padding, position ids over real tokens). The PCA is
uncentred (as in steering-vectors' pca aggregator): centring would subtract the shared shift
that is the behaviour, leaving only the pair-to-pair noise. Its length is the mean projection
of the differences on that direction, so strength 1 moves an activation by the average pair's
separation, the same scale as "mean_diff".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from residtap.capture import capture
from residtap.inputs import forward_inputs, pad_left
from residtap.sites import resolve_site

log = logging.getLogger(__name__)


def read_activations(
    model: nn.Module,
    ids: list[list[int]],
    site: str,
    position: Literal["last"] | int,
    pad_id: int,
    batch_size: int = 32,
) -> Tensor:
    """(N, d) float32 activations at `site`, one token per text; the forward stops at the site."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows: list[Tensor] = []
    policy: Any = "last" if position == "last" else [int(position)]
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        if position != "last":
            short = [i for i, s in enumerate(chunk) if not -len(s) <= int(position) < len(s)]
            if short:
                raise IndexError(
                    f"position {position} is outside text {start + short[0]}, which has "
                    f"{len(chunk[short[0]])} tokens; use an index every text has, or 'last'"
                )
        input_ids, mask = pad_left(chunk, pad_id)
        with torch.no_grad(), capture(model, [site], positions=policy, stop_early=True) as acts:
            model(**forward_inputs(model, input_ids, mask))
        got = acts[resolve_site(model, site).name]  # (B, d) or (B, 1, d)
        rows.append(got.reshape(len(chunk), -1).float().cpu())
    return torch.cat(rows)


def split_pairs(pairs: Any) -> tuple[list[str], list[str]]:
    """[(positive, negative), ...] or [{"positive", "negative"}, ...] -> (positives, negatives)."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(
            f"expected pairs as a list of (positive, negative) tuples, got "
            f"{type(pairs).__name__}; or pass two lists: from_pairs(model, tok, positives, "
            "negatives)"
        )
    positives, negatives = [], []
    for i, pair in enumerate(pairs):
        if isinstance(pair, dict) and {"positive", "negative"} <= pair.keys():
            pair = (pair["positive"], pair["negative"])
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(
                f"pair {i} is {pair!r}; with one argument, give (positive, negative) tuples "
                "(or {'positive', 'negative'} rows); for two lists of texts pass the negatives "
                "as the next argument"
            )
        positives.append(pair[0])
        negatives.append(pair[1])
    return positives, negatives


def pca_direction(diffs: Tensor, mean_diff: Tensor) -> Tensor:
    """First right singular vector of the uncentred differences (N, d), sign-aligned with
    mean_diff (d,), scaled to the mean projection of the differences on it: (d,)."""
    _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    direction = vh[0].float()  # (d,), unit length
    projection = (diffs @ direction).mean()  # scalar: the average pair's separation
    if float(projection) < 0:
        direction, projection = -direction, -projection
    if math.isclose(float(projection), 0.0, abs_tol=1e-12):
        log.warning("the first principal component is orthogonal to the mean difference")
    return direction * projection


def explained(diffs: Tensor, vector: Tensor) -> float:
    """Fraction of the differences' (uncentred) energy along the vector's direction."""
    unit = vector / vector.norm().clamp_min(1e-12)
    total = float((diffs.double() ** 2).sum())
    return float(((diffs.double() @ unit.double()) ** 2).sum()) / total if total > 0 else 0.0
