"""Similarity of in-memory activations, every site against every site.

    from residtap.analysis import layer_similarity
    sim = layer_similarity(acts_model_a, acts_model_b, method="cka")   # dicts of (N, d) tensors
    sim[i, j]   # similarity of the i-th site of acts_model_a and the j-th of acts_model_b
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from residtap.analysis.cca import ConstantActivationsError, pwcca, svcca
from residtap.analysis.cka import ArrayLike, linear_cka

log = logging.getLogger(__name__)

Method = Literal["cka", "cka_debiased", "svcca", "pwcca"]
METHODS: tuple[str, ...] = ("cka", "cka_debiased", "svcca", "pwcca")


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
    for i, (name_a, a) in enumerate(acts_a.items()):
        for j, (name_b, b) in enumerate(acts_b.items()):
            try:
                out[i, j] = functions[method](a, b)
            except ConstantActivationsError as err:
                site = name_a if err.side == "x" else name_b
                raise ValueError(
                    f"{method}: site {site!r} is constant over its {err.rows} rows, so CCA is "
                    "undefined for it (linear CKA gives NaN); leave that site out"
                ) from err
    warn_undefined(out, list(acts_a), list(acts_b), method)
    return out


def warn_undefined(matrix: Tensor, sites_a: list[str], sites_b: list[str], method: str) -> None:
    """One warning naming the sites whose whole row (or column) of `matrix` is NaN."""
    rows = [s for s, row in zip(sites_a, matrix, strict=True) if bool(row.isnan().all())]
    cols = [s for s, col in zip(sites_b, matrix.T, strict=True) if bool(col.isnan().all())]
    named = list(dict.fromkeys(rows + cols))
    if named:
        log.warning("%s is undefined (NaN) for site(s) %s: constant over the rows, or too few "
                    "rows for the debiased estimator", method, ", ".join(map(repr, named)))
