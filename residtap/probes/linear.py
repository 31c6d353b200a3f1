"""Linear probes trained in torch: logistic, multinomial, ridge, and difference of means.

    from residtap.probes import train_probe, evaluate
    probe = train_probe(X_train, y_train, groups=text_ids)   # X (N, d), y (N,) labels
    evaluate(probe, X_test, y_test)                          # accuracy, AUROC, F1, ECE, ...

Training standardises the features (mean 0, variance 1 over the rows given), fits on the
standardised features and folds the standardisation into the final weights, so a probe applies
to raw activations: `score = x @ probe.weight.T + probe.bias`.

The objective is the mean (optionally class-weighted) loss over rows plus `l2/2 * ||W||²` on the
standardised-feature weights (the bias is not penalised). It has the same minimiser as
scikit-learn's `LogisticRegression(C=1 / (l2 * n_rows))` and `Ridge(alpha=l2 * n_rows)` on
standardised features. With `l2=None` the strength is chosen from `DEFAULT_L2_GRID` by the
loss on a validation split grouped by `groups` (texts), then the probe is refit on all rows.

Logistic probes use full-batch L-BFGS on one standardised working copy of X in `dtype`
(float32 by default, whatever the input dtype, e.g. bf16): that copy is the only large
allocation (logistic.py). Ridge is solved exactly from float64 sufficient statistics (ridge.py).
For data that do not fit in memory, `train_probe_streaming` reads an iterable of (X, y) batches
(streaming.py). The `Probe` they all return is defined in probe.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .logistic import ClassWeight, fit_logistic
from .metrics import Labels, encode_labels
from .probe import Probe
from .ridge import chunk_rows, fit_ridge, regression_scores
from .splits import GroupIds, grouped_split, row_split

TrainKind = Literal["logistic", "multinomial", "ridge"]

DEFAULT_L2_GRID: tuple[float, ...] = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


def train_probe(
    X: Tensor,
    y: Labels,
    *,
    kind: TrainKind = "logistic",
    groups: GroupIds | None = None,
    l2: float | Sequence[float] | None = None,
    class_weight: ClassWeight = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_iter: int = 1000,
    tol: float | None = None,
    site: str | None = None,
    label_column: str | None = None,
) -> Probe:
    """Train a linear probe on activations X (N, d) (any float dtype, any device) and labels y.

    kind: "logistic" (binary), "multinomial" (softmax over all classes) or "ridge" (y are
        continuous targets (N,) or (N, k)).
    groups: one id per row (e.g. the text it came from); the validation split never separates a
        group. None: every row is its own group.
    l2: a float (no validation split), a grid to choose from, or None for DEFAULT_L2_GRID.
    class_weight: None, "inverse" (n / (C * n_c), scikit-learn's "balanced") or "sqrt_inverse"
        (proportional to 1/sqrt(n_c)); both average 1 over the rows.
    dtype: float32 or float64, the precision of the working copy and of L-BFGS.
    max_iter, tol: L-BFGS iteration cap and gradient tolerance (max |grad| of the mean loss;
        default 1e-5 in float32, 1e-8 in float64).
    """
    n = _check_rows(X, y)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if kind not in ("logistic", "multinomial", "ridge"):
        raise ValueError(
            f"unknown probe kind {kind!r}; expected 'logistic', 'multinomial' or 'ridge' "
            "(for a difference of means use diff_means(), for sequences train_attention_probe())"
        )
    if class_weight not in (None, "inverse", "sqrt_inverse"):
        raise ValueError(
            f"unknown class_weight {class_weight!r}; expected None, 'inverse' or 'sqrt_inverse'"
        )
    grid = _l2_grid(l2)
    if len(grid) == 1:
        train_idx, val_idx = torch.arange(n), torch.arange(0)
    elif groups is None:
        train_idx, val_idx = row_split(n, val_fraction, seed)
    else:
        train_idx, val_idx = grouped_split(_check_groups(groups, n), val_fraction, seed)
    if kind == "ridge":
        targets = _as_float_targets(y, n, X.device)  # (N, k)
        weight, bias, chosen, val_mse = fit_ridge(X, targets, train_idx, val_idx, grid)
        metrics = {"train": regression_scores(X, targets, torch.arange(n), weight, bias)}
        if val_mse:
            metrics["val"] = {"n": int(val_idx.numel()), "mse": val_mse[repr(chosen)]}
        probe = Probe(
            kind="ridge",
            weight=weight.float(),
            bias=bias.float(),
            metrics=metrics,
            metadata={"l2": chosen, "l2_val_mse": val_mse, "optimizer": "closed_form"},
        )
    else:
        tol = tol if tol is not None else (1e-5 if dtype == torch.float32 else 1e-8)
        probe = fit_logistic(
            X, y, kind, train_idx, val_idx, grid, class_weight, dtype, max_iter, tol
        )
    probe.site, probe.label_column = site, label_column
    probe.metadata.update(n_rows=n, seed=seed, val_fraction=val_fraction if len(grid) > 1 else 0)
    return probe


# ---------------------------------------------------------------------------------------------
# difference of means


def diff_means(
    X: Tensor,
    y: Labels,
    *,
    calibrate: bool = True,
    site: str | None = None,
    label_column: str | None = None,
) -> Probe:
    """Direction mean(X | classes[1]) - mean(X | classes[0]), thresholded at the midpoint.

    The weight is that direction (the vector used for steering) times a positive scale; the
    bias puts score 0 at the midpoint of the two class means. With `calibrate`, the scale is
    fitted (1-D logistic regression) so predict_proba is meaningful; otherwise it is 1.
    """
    _check_rows(X, y)
    y_idx, classes = encode_labels(y)
    if len(classes) != 2:
        raise ValueError(f"diff_means needs exactly 2 classes, got {len(classes)}: {classes[:10]}")
    y_idx = y_idx.to(X.device)
    sums = torch.zeros(2, X.shape[1], dtype=torch.float64, device=X.device)
    step = chunk_rows(X.shape[1])
    for i in range(0, X.shape[0], step):
        sums.index_add_(0, y_idx[i : i + step], X[i : i + step].double())
    means = sums / torch.bincount(y_idx, minlength=2).double()[:, None]
    direction = means[1] - means[0]  # (d,)
    midpoint = 0.5 * (means[0] + means[1])
    scale = 1.0
    if calibrate:
        parts = [X[i : i + step].double() @ direction for i in range(0, X.shape[0], step)]
        proj = torch.cat(parts) - direction @ midpoint  # (N,)
        scale = _fit_scale(proj, y_idx)
    weight = (scale * direction)[None].float()
    bias = (-(scale * direction) @ midpoint).reshape(1).float()
    return Probe(
        kind="diff_means",
        weight=weight,
        bias=bias,
        classes=classes,
        site=site,
        label_column=label_column,
        metadata={
            "scale": scale,
            "direction_norm": float(direction.norm()),
            "n_rows": int(X.shape[0]),
        },
    )


def _fit_scale(proj: Tensor, y: Tensor) -> float:
    """Newton's method for s in sigmoid(s * proj), with a tiny penalty so separable data stop."""
    target = y.double()
    penalty = 1e-4 * (float(proj.pow(2).mean()) or 1.0)
    s = 0.0
    for _ in range(50):
        p = torch.sigmoid(s * proj)
        grad = float(((p - target) * proj).mean()) + penalty * s
        hess = float((p * (1 - p) * proj * proj).mean()) + penalty
        step = grad / hess
        s -= step
        if abs(step) <= 1e-10 * max(abs(s), 1e-12):
            break
    return s


# ---------------------------------------------------------------------------------------------
# checks


def _l2_grid(l2: float | Sequence[float] | None) -> list[float]:
    grid = (
        list(DEFAULT_L2_GRID) if l2 is None else [l2] if isinstance(l2, (int, float)) else list(l2)
    )
    if not grid or any(not isinstance(v, (int, float)) or v < 0 for v in grid):
        raise ValueError(f"l2 must be a float >= 0, a non-empty list of them, or None; got {l2!r}")
    return sorted((float(v) for v in grid), reverse=True)


def _check_rows(X: Tensor, y: Any) -> int:
    if not isinstance(X, Tensor):
        raise TypeError(f"expected X as a torch.Tensor (N, d), got {type(X).__name__}")
    if X.ndim != 2 or not X.is_floating_point():
        raise ValueError(
            f"expected X of shape (N, d) with a float dtype, got {tuple(X.shape)} {X.dtype}; "
            "flatten (batch, seq) into rows first, e.g. X.reshape(-1, X.shape[-1])"
        )
    if len(y) != X.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {len(y)} labels; pass one per row")
    if X.shape[0] < 2:
        raise ValueError(f"need at least 2 rows to train a probe, got {X.shape[0]}")
    return int(X.shape[0])


def _check_groups(groups: GroupIds, n: int) -> GroupIds:
    if len(groups) != n:
        raise ValueError(f"X has {n} rows but groups has {len(groups)} ids; pass one per row")
    return groups


def _as_float_targets(y: Labels, n: int, device: torch.device) -> Tensor:
    t = y if isinstance(y, Tensor) else torch.as_tensor(y)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)) or t.shape[0] != n:
        raise TypeError(f"ridge targets must be numbers of shape (N,) or (N, k), got {t.dtype}")
    return t.to(device=device, dtype=torch.float64).reshape(n, -1)
