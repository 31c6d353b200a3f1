"""CCA-based similarity: canonical correlations, SVCCA and PWCCA, in float64.

    from residtap.analysis import svcca, pwcca
    svcca(acts_a, acts_b)              # (N, d_a), (N, d_b) -> mean canonical correlation
    svcca(acts_a, acts_b, keep=20)     # keep 20 SVD directions per side instead of 99% variance
    pwcca(acts_a, acts_b)              # projection-weighted mean canonical correlation

Canonical correlations come from the SVD of Q_xᵀ Q_y, where Q_x, Q_y are orthonormal bases of
the centred activations (from their SVDs, dropping numerically null directions).

SVCCA (Raghu et al. 2017): per side, keep the top SVD directions explaining `keep` of the
variance (a float in (0, 1]) or the top `keep` directions (an int), then average all canonical
correlations of the reduced sides.

PWCCA (Morcos et al. 2018): a weighted mean of the canonical correlations, weight_i ∝
sum_j |<h_i, x_j>| where h_i is the i-th canonical variate (unit norm over rows) and x_j the
j-th centred neuron of the side with fewer neurons (the first side on a tie), as google/svcca
does. Unlike google/svcca we use centred neurons for the weights, as the paper defines them.

CCA needs more rows than dimensions: when d_x + d_y > N - 1 the two (centred) spans must
overlap and some correlations are 1 whatever the data, so that is an error here; fewer than 5
rows per dimension logs a warning (the estimates are biased upwards).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from residtap.analysis.cka import ArrayLike, as_rows

log = logging.getLogger(__name__)


class ConstantActivationsError(ValueError):
    """One side of a CCA is constant over the rows; `side` is "x" or "y"."""

    def __init__(self, side: str, rows: int) -> None:
        self.side, self.rows = side, rows
        super().__init__(
            f"{side} is constant over its {rows} rows, so CCA is undefined (linear CKA gives NaN "
            "there); leave that site out of the comparison"
        )



def canonical_correlations(x: ArrayLike, y: ArrayLike) -> Tensor:
    """Canonical correlations (k,) of x (N, d_x) and y (N, d_y), descending, k = min ranks."""
    return _cca(_centred(x, "x"), _centred(y, "y"))[0]


def svcca(x: ArrayLike, y: ArrayLike, *, keep: float | int = 0.99) -> float:
    """Mean canonical correlation after reducing each side by SVD (see module doc)."""
    if isinstance(keep, bool) or not (
        (isinstance(keep, int) and keep >= 1) or (isinstance(keep, float) and 0.0 < keep <= 1.0)
    ):
        raise ValueError(
            f"keep must be a variance fraction in (0, 1] (e.g. 0.99) or a number of directions "
            f">= 1 (e.g. 20), got {keep!r}"
        )
    bases = []
    for name, side in (("x", x), ("y", y)):
        u, s = _basis(_centred(side, name), name)
        energy = (s**2).cumsum(0) / (s**2).sum()
        if isinstance(keep, float):
            k = int((energy < keep - 1e-12).sum()) + 1
        else:
            k = keep
        bases.append(u[:, : min(k, u.shape[1])])
    return float(_correlations_of_bases(*bases)[0].mean())


def pwcca(x: ArrayLike, y: ArrayLike) -> float:
    """Projection-weighted CCA similarity (see module doc)."""
    xc, yc = _centred(x, "x"), _centred(y, "y")
    rho, hx, hy = _cca(xc, yc)
    h, neurons = (hx, xc) if xc.shape[1] <= yc.shape[1] else (hy, yc)
    weights = (h.T @ neurons).abs().sum(1)  # (k,)
    return float((weights / weights.sum()) @ rho)


def _cca(xc: Tensor, yc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(correlations (k,), canonical variates of x (N, k), of y (N, k)), variates orthonormal."""
    if xc.shape[0] != yc.shape[0]:
        raise ValueError(
            f"x has {xc.shape[0]} rows but y has {yc.shape[0]}; pass the same rows of both"
        )
    return _correlations_of_bases(_basis(xc, "x")[0], _basis(yc, "y")[0])


def _correlations_of_bases(qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    qy = qy.to(qx.device)
    n, widest = qx.shape[0], max(qx.shape[1], qy.shape[1])
    if qx.shape[1] + qy.shape[1] > n - 1:
        raise ValueError(
            f"CCA needs more rows than dimensions: {n} rows for {qx.shape[1]} + {qy.shape[1]} "
            "dimensions forces some correlations to 1; use more rows (5-10 per dimension), or "
            "SVCCA with a smaller keep"
        )
    if n < 5 * widest:
        log.warning(
            "CCA with %d rows for %d dimensions: fewer than 5 rows per dimension inflates the "
            "correlations; use more rows or compare against a shuffled baseline",
            n,
            widest,
        )
    u, s, vh = torch.linalg.svd(qx.T @ qy, full_matrices=False)
    k = s.shape[0]
    return s.clamp(max=1.0), qx @ u[:, :k], qy @ vh[:k].T


def _basis(xc: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """(orthonormal basis U (N, r) of the column space, singular values (r,)), r = numeric rank."""
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    tol = s[0] * max(xc.shape) * torch.finfo(s.dtype).eps if s.numel() else 0.0
    r = int((s > tol).sum())
    if r == 0:
        raise ConstantActivationsError(name, xc.shape[0])
    return u[:, :r], s[:r]


def _centred(a: ArrayLike, name: str) -> Tensor:
    t = as_rows(a, name).detach().to(torch.float64)
    return t - t.mean(0)
