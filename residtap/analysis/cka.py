"""Linear CKA between two sets of activations of the same rows (Kornblith et al. 2019).

    from residtap.analysis import linear_cka, LinearCKA
    linear_cka(acts_a, acts_b)                   # (N, d_a), (N, d_b) -> float in [0, 1]
    linear_cka(acts_a, acts_b, debiased=True)    # finite-sample corrected (can be < 0)

    cka = LinearCKA()                            # streaming: O(d²) memory, any number of rows
    for a, b in aligned_batches:                 # the same rows of both sources, in step
        cka.update(a, b)
    cka.value(), cka.value(debiased=True)

With K = X Xᵀ and L = Y Yᵀ (linear kernels), CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).
The biased HSIC is tr(K H L H)/(n-1)², which for centred features is ||Xᵀ Y||²_F/(n-1)². The
debiased CKA uses Song et al.'s (2012) unbiased HSIC estimator, as in Nguyen et al. (2021):

    HSIC_u = [tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n-1)(n-2)) - 2/(n-2) 1ᵀK̃L̃1] / (n(n-3)),

K̃, L̃ being K, L with zeroed diagonals. Every term is a sum over rows of feature-space
quantities, so streaming needs no O(N) storage:
    tr(K̃L̃)  = ||Σ x yᵀ||²_F - Σ k_i l_i             with k_i = ||x_i||², l_i = ||y_i||²
    1ᵀK̃1    = ||Σ x||² - Σ k_i
    1ᵀK̃L̃1  = (Σx)ᵀ(Σ x yᵀ)(Σy) - (Σx)·(Σ l_i x_i) - (Σy)·(Σ k_i y_i) + Σ k_i l_i
HSIC_u is exactly invariant to shifting x or y by a constant, so each source is shifted by its
first batch's mean before accumulating, in float64, to avoid cancellation with large offsets.
The debiased value can be slightly negative, or undefined (NaN) when a self-similarity
estimate is not positive, e.g. for a site whose activations are constant over the rows
(`layer_similarity` and `residtap compare` then name that site in one warning line).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

ArrayLike = Tensor | np.ndarray


class LinearCKA:
    """Accumulates feature-space sums over aligned row batches of two sources; see module doc."""

    def __init__(self) -> None:
        self.n = 0
        self._shift: tuple[Tensor, Tensor] | None = None

    def update(self, x: ArrayLike, y: ArrayLike) -> None:
        """Add rows x (B, d_x) and y (B, d_y); row i of x and of y describe the same input."""
        x = _as64(as_rows(x, "x"))
        y = _as64(as_rows(y, "y")).to(x.device)
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x has {x.shape[0]} rows but y has {y.shape[0]}; the two sources must give the "
                "same rows in the same order"
            )
        if self._shift is None:
            self._shift = (x.mean(0), y.mean(0))
            dx, dy = x.shape[1], y.shape[1]
            z = x.new_zeros
            self.sx, self.sy = z(dx), z(dy)
            self.sxx, self.syy, self.sxy = z(dx, dx), z(dy, dy), z(dx, dy)
            # Σ k_i x_i, Σ l_i y_i, Σ l_i x_i, Σ k_i y_i
            self.kx, self.ly, self.lx, self.ky = z(dx), z(dy), z(dx), z(dy)
            self.sums = z(5)  # Σk, Σl, Σk², Σl², Σkl
        elif (x.shape[1], y.shape[1]) != (self.sx.shape[0], self.sy.shape[0]):
            raise ValueError(
                f"batch has widths ({x.shape[1]}, {y.shape[1]}), earlier batches had "
                f"({self.sx.shape[0]}, {self.sy.shape[0]})"
            )
        x, y = x - self._shift[0], y - self._shift[1]
        k, l = (x * x).sum(1), (y * y).sum(1)  # (B,) squared row norms
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.syy += y.T @ y
        self.sxy += x.T @ y
        self.kx += k @ x
        self.ly += l @ y
        self.lx += l @ x
        self.ky += k @ y
        self.sums += torch.stack([k.sum(), l.sum(), k @ k, l @ l, k @ l])

    def value(self, debiased: bool = False) -> float:
        """CKA of all rows seen so far."""
        if self._shift is None or self.n < (4 if debiased else 2):
            raise ValueError(
                f"CKA needs at least {4 if debiased else 2} rows, got {self.n}; call update() "
                "with more data"
            )
        xy, xx, yy = self._unbiased_hsic() if debiased else self._biased_hsic()
        return _ratio(xy, xx, yy)

    def _biased_hsic(self) -> tuple[float, float, float]:
        n = self.n
        cxy = self.sxy - torch.outer(self.sx, self.sy) / n
        cxx = self.sxx - torch.outer(self.sx, self.sx) / n
        cyy = self.syy - torch.outer(self.sy, self.sy) / n
        return float((cxy**2).sum()), float((cxx**2).sum()), float((cyy**2).sum())

    def _unbiased_hsic(self) -> tuple[float, float, float]:
        n = self.n
        sk, sl, skk, sll, skl = self.sums.tolist()
        sx, sy = self.sx, self.sy

        def hsic(trace_kl: float, ones_k: float, ones_l: float, ones_kl: float) -> float:
            return (trace_kl + ones_k * ones_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ones_kl) / (
                n * (n - 3)
            )

        ones_k = float(sx @ sx) - sk
        ones_l = float(sy @ sy) - sl
        xy = hsic(
            float((self.sxy**2).sum()) - skl,
            ones_k,
            ones_l,
            float(sx @ self.sxy @ sy - sx @ self.lx - sy @ self.ky) + skl,
        )
        xx = hsic(
            float((self.sxx**2).sum()) - skk,
            ones_k,
            ones_k,
            float(sx @ self.sxx @ sx - 2 * sx @ self.kx) + skk,
        )
        yy = hsic(
            float((self.syy**2).sum()) - sll,
            ones_l,
            ones_l,
            float(sy @ self.syy @ sy - 2 * sy @ self.ly) + sll,
        )
        return xy, xx, yy


def linear_cka(x: ArrayLike, y: ArrayLike, *, debiased: bool = False) -> float:
    """Linear CKA of x (N, d_x) and y (N, d_y), in float64.

    Uses the N x N Gram matrices when N is smaller than the widths, feature-space sums otherwise
    (same value either way).
    """
    x, y = _as64(as_rows(x, "x")), _as64(as_rows(y, "y"))
    if x.shape[0] >= max(x.shape[1], y.shape[1]):
        acc = LinearCKA()
        acc.update(x, y.to(x.device))
        return acc.value(debiased)
    n = x.shape[0]
    if n != y.shape[0]:
        raise ValueError(f"x has {n} rows but y has {y.shape[0]}; pass the same rows of both")
    if n < (4 if debiased else 2):
        raise ValueError(f"CKA needs at least {4 if debiased else 2} rows, got {n}")
    x, y = x - x.mean(0), (y - y.mean(0)).to(x.device)
    grams = (x @ x.T, y @ y.T)  # (N, N) each
    hsic = _gram_hsic_unbiased if debiased else _gram_hsic_biased
    return _ratio(hsic(*grams), hsic(grams[0], grams[0]), hsic(grams[1], grams[1]))


def _gram_hsic_biased(k: Tensor, l: Tensor) -> float:
    return float((k * l).sum())  # features are centred, so K and L already are


def _gram_hsic_unbiased(k: Tensor, l: Tensor) -> float:
    n = k.shape[0]
    k = k - torch.diag(k.diagonal())
    l = l - torch.diag(l.diagonal())
    k1, l1 = k.sum(1), l.sum(1)
    value = (k * l).sum() + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)
    return float(value) / (n * (n - 3))


def _ratio(xy: float, xx: float, yy: float) -> float:
    if xx <= 0 or yy <= 0:  # layer_similarity / compare name such sites once, as a warning
        log.debug(
            "CKA undefined: a self-similarity HSIC is not positive (%g, %g); constant inputs, or "
            "too few rows for the debiased estimator; returning NaN",
            xx,
            yy,
        )
        return math.nan
    return xy / math.sqrt(xx * yy)


def as_rows(a: ArrayLike, name: str) -> Tensor:
    """`a` as a 2-D (rows, features) tensor; ValueError naming `name` otherwise."""
    t = torch.as_tensor(a) if isinstance(a, np.ndarray) else a
    if not isinstance(t, Tensor) or t.ndim != 2:
        raise ValueError(
            f"expected {name} as a 2-D tensor or array (rows, features), got "
            f"{type(a).__name__} {tuple(getattr(a, 'shape', ()))}; flatten tokens into rows first"
        )
    return t


def _as64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)
