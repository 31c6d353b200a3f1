"""Ridge regression probes, solved exactly from float64 sufficient statistics.

    stats = RidgeStats()
    for x, y in batches:          # x (B, d), y (B,) or (B, k)
        stats.update(x, y)
    weight, bias = stats.solve(l2=1e-3)   # predictions: x @ weight.T + bias

The objective is mean(½ (y - z·w - b)²) + l2/2 ||w||² on features z standardised with the rows'
own mean and population std; the result is folded back to raw features. This equals
scikit-learn's `Ridge(alpha=l2 * n_rows)` on StandardScaler'd features. One pass, O(d²) memory,
so the same code serves in-memory tensors and streamed batches.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 22  # a pass over X works on chunks of about this many values


def chunk_rows(d: int) -> int:
    """Rows per chunk for chunked passes over an (N, d) tensor (bounded temporary memory)."""
    return max(1, CHUNK_ELEMENTS // max(d, 1))


class RidgeStats:
    """Sums over rows of x, y, x xᵀ and x yᵀ in float64, about a fixed shift (for precision).

    The shift is the first batch's mean, so large common offsets (massive activations) do not
    cancel catastrophically when the covariance is formed.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: Tensor | None = None  # (d,)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add rows x (B, d) with targets y (B,) or (B, k)."""
        x = x.detach().to(torch.float64)
        y = y.detach().to(device=x.device, dtype=torch.float64).reshape(x.shape[0], -1)
        if self.shift is None:
            self.shift = x.mean(0)
            self.sx = x.new_zeros(x.shape[1])
            self.sxx = x.new_zeros(x.shape[1], x.shape[1])
            self.sxy = x.new_zeros(x.shape[1], y.shape[1])
            self.sy = x.new_zeros(y.shape[1])
        x = x - self.shift
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sxx += x.T @ x
        self.sxy += x.T @ y
        self.sy += y.sum(0)

    def merged(self, other: RidgeStats) -> RidgeStats:
        """Statistics of both row sets, expressed about this one's shift."""
        if other.shift is None:
            return self
        if self.shift is None:
            return other
        out = RidgeStats()
        out.n, out.shift = self.n + other.n, self.shift
        delta = other.shift - self.shift  # other's rows: x - other.shift = (x - shift) - delta
        out.sx = self.sx + other.sx + other.n * delta
        out.sxx = self.sxx + other.sxx + torch.outer(other.sx, delta) + torch.outer(delta, other.sx)
        out.sxx += other.n * torch.outer(delta, delta)
        out.sxy = self.sxy + other.sxy + torch.outer(delta, other.sy)
        out.sy = self.sy + other.sy
        return out

    def solve(self, l2: float) -> tuple[Tensor, Tensor]:
        """(weight (k, d), bias (k,)) in float64 for raw x, standardisation folded in."""
        if self.shift is None or self.n < 2:
            raise ValueError(f"ridge needs at least 2 rows, got {self.n}")
        mean = self.sx / self.n  # (d,), relative to the shift
        cov = self.sxx / self.n - torch.outer(mean, mean)  # (d, d)
        cxy = self.sxy / self.n - torch.outer(mean, self.sy / self.n)  # (d, k)
        std = safe_std(cov.diagonal().clamp(min=0).sqrt())
        system = cov / torch.outer(std, std) + l2 * torch.eye(cov.shape[0]).to(cov)
        try:
            w_z = torch.linalg.solve(system, cxy / std[:, None])  # (d, k)
        except RuntimeError:  # singular, only possible with l2 = 0
            w_z = torch.linalg.pinv(system) @ (cxy / std[:, None])
        weight = (w_z / std[:, None]).T  # (k, d)
        bias = self.sy / self.n - weight @ (mean + self.shift)
        return weight, bias


def safe_std(std: Tensor) -> Tensor:
    """std with (near-)constant features set to 1, as scikit-learn's StandardScaler does."""
    return torch.where(std > 1e-12 * std.max().clamp(min=1e-300), std, torch.ones_like(std))


def fit_ridge(
    X: Tensor, targets: Tensor, train_idx: Tensor, val_idx: Tensor, grid: list[float]
) -> tuple[Tensor, Tensor, float, dict[str, float]]:
    """Choose l2 from `grid` by validation MSE (when there is more than one), refit on all rows.

    X (N, d) any float dtype; targets (N, k) float64. Returns (weight (k, d) float64,
    bias (k,) float64, chosen l2, {repr(l2): validation MSE}).
    """
    train, val = RidgeStats(), RidgeStats()
    step = chunk_rows(X.shape[1])
    for stats, idx in ((train, train_idx), (val, val_idx)):
        for i in range(0, idx.numel(), step):
            rows = idx[i : i + step].to(X.device)
            stats.update(X[rows], targets[rows])
    val_mse: dict[str, float] = {}
    chosen = grid[0]
    if len(grid) > 1:
        for l2 in grid:
            weight, bias = train.solve(l2)
            val_mse[repr(l2)] = regression_scores(X, targets, val_idx, weight, bias)["mse"]
        chosen = min(grid, key=lambda l2: val_mse[repr(l2)])
        log.info("ridge probe: chose l2=%g by validation MSE %s", chosen, val_mse)
    weight, bias = train.merged(val).solve(chosen)
    return weight, bias, chosen, val_mse


def regression_scores(
    X: Tensor, targets: Tensor, idx: Tensor, weight: Tensor, bias: Tensor
) -> dict[str, float]:
    """{'n', 'mse', 'r2'} of x @ weight.T + bias on rows idx, chunked (no copy of X)."""
    sse = targets.new_zeros(targets.shape[1])
    total = targets.new_zeros(targets.shape[1])
    total_sq = targets.new_zeros(targets.shape[1])
    step = chunk_rows(X.shape[1])
    for i in range(0, idx.numel(), step):
        rows = idx[i : i + step].to(X.device)
        pred = torch.addmm(bias, X[rows].double(), weight.T)  # (B, k)
        sse += ((pred - targets[rows]) ** 2).sum(0)
        total += targets[rows].sum(0)
        total_sq += (targets[rows] ** 2).sum(0)
    n = max(idx.numel(), 1)
    variance = total_sq / n - (total / n) ** 2
    return {
        "n": int(idx.numel()),
        "mse": float(sse.sum() / (n * targets.shape[1])),
        "r2": float((1.0 - sse / n / variance).mean()),
    }
