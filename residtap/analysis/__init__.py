"""Representation similarity between activations: linear CKA (biased, debiased, streaming),
SVCCA and PWCCA.

    from residtap.analysis import layer_similarity
    sim = layer_similarity(acts_model_a, acts_model_b, method="cka")   # dicts of (N, d) tensors
    sim[i, j]   # similarity of the i-th site of acts_model_a and the j-th of acts_model_b

All inputs are (rows, features) tensors or arrays whose rows are the same inputs in the same
order (e.g. the same tokens of the same texts); computation is in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from .cca import canonical_correlations, pwcca, svcca
from .cka import ArrayLike, LinearCKA, linear_cka

Method = Literal["cka", "cka_debiased", "svcca", "pwcca"]

__all__ = [
    "LinearCKA",
    "canonical_correlations",
    "layer_similarity",
    "linear_cka",
    "pwcca",
    "svcca",
]


def layer_similarity(
    acts_a: Mapping[str, ArrayLike],
    acts_b: Mapping[str, ArrayLike] | None = None,
    method: Method = "cka",
) -> Tensor:
    """Similarity matrix (len(acts_a), len(acts_b)) float64 between every pair of sites.

    Rows follow the order of `acts_a`, columns that of `acts_b` (default: `acts_a` itself).
    method: "cka" (linear, biased), "cka_debiased", "svcca" (keep 99% variance) or "pwcca".
    """
    functions = {
        "cka": linear_cka,
        "cka_debiased": lambda a, b: linear_cka(a, b, debiased=True),
        "svcca": svcca,
        "pwcca": pwcca,
    }
    if method not in functions:
        raise ValueError(f"unknown method {method!r}; expected one of {list(functions)}")
    acts_b = acts_a if acts_b is None else acts_b
    if not acts_a or not acts_b:
        raise ValueError("layer_similarity needs at least one site on each side")
    out = torch.empty(len(acts_a), len(acts_b), dtype=torch.float64)
    for i, a in enumerate(acts_a.values()):
        for j, b in enumerate(acts_b.values()):
            out[i, j] = functions[method](a, b)
    return out
