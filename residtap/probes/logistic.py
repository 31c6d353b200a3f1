"""Logistic and multinomial probes: full-batch L-BFGS on standardised features.

    from residtap.probes.logistic import fit_logistic   # train_probe(kind="logistic") calls it

One standardised working copy of X in `dtype` (float32 by default, whatever the input dtype,
e.g. bf16) is the only large allocation. The objective is the mean (optionally class-weighted)
log loss plus `l2/2 * ||W||²` on the standardised-feature weights; the standardisation is
folded into the returned weights, so the probe applies to raw activations. With several `l2`
values the strength is chosen by the loss on the validation rows, each fit starting from the
previous (stronger) one, then the probe is refit on all rows.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import Labels, classification_metrics, encode_labels
from .probe import Probe
from .ridge import chunk_rows, safe_std

log = logging.getLogger(__name__)

ClassWeight = Literal["inverse", "sqrt_inverse"] | None


def fit_logistic(
    X: Tensor,
    y: Labels,
    kind: Literal["logistic", "multinomial"],
    train_idx: Tensor,
    val_idx: Tensor,
    grid: list[float],
    class_weight: ClassWeight,
    dtype: torch.dtype,
    max_iter: int,
    tol: float,
) -> Probe:
    """A logistic (binary) or multinomial probe on X (N, d) from the rows `train_idx`, `l2`
    chosen from `grid` on the rows `val_idx` (when there are several), refit on both."""
    y_idx, classes = encode_labels(y)
    n_classes = len(classes)
    if n_classes < 2:
        raise ValueError(f"y has a single class {classes}; a classifier needs at least two")
    if kind == "logistic" and n_classes > 2:
        raise ValueError(
            f"kind='logistic' is binary but y has {n_classes} classes {classes[:10]}; "
            "use kind='multinomial'"
        )
    n_out = 1 if kind == "logistic" else n_classes
    order = torch.cat([train_idx, val_idx])
    n_train = train_idx.numel()
    z = _working_copy(X, order, dtype)  # (N, d), train rows first
    mean, std = _standardise_(z)
    y_idx = y_idx[order].to(X.device)
    z_tr, y_tr, z_va, y_va = z[:n_train], y_idx[:n_train], z[n_train:], y_idx[n_train:]

    d = z.shape[1]
    params = (z.new_zeros(n_out, d), z.new_zeros(n_out))
    val_loss: dict[str, float] = {}
    val_metrics: dict[str, Any] = {}
    if len(grid) > 1:
        cw = _row_class_weights(y_tr, n_classes, class_weight)
        best = (math.inf, grid[0], params)
        for l2 in grid:  # strongest first; each fit starts from the previous solution
            params, _ = _fit_lbfgs(z_tr, y_tr, cw, l2, params, max_iter, tol)
            loss = float(_loss(z_va, y_va, cw, 0.0, *params))
            val_loss[repr(l2)] = loss
            if loss < best[0]:
                best = (loss, l2, params)
        _, chosen, params = best
        val_metrics = _metrics_standardised(z_va, y_va, *params)
        log.info("probe: chose l2=%g by validation loss %s", chosen, val_loss)
    else:
        chosen = grid[0]
    cw = _row_class_weights(y_idx, n_classes, class_weight)
    params, n_iter = _fit_lbfgs(z, y_idx, cw, chosen, params, max_iter, tol)
    train_metrics = _metrics_standardised(z, y_idx, *params)
    del z, z_tr, z_va
    weight, bias = _fold(params[0], params[1], mean, std)
    metrics = {"train": train_metrics} | ({"val": val_metrics} if val_metrics else {})
    return Probe(
        kind=kind,
        weight=weight,
        bias=bias,
        classes=classes,
        metrics=metrics,
        metadata={
            "l2": chosen,
            "l2_val_loss": val_loss,
            "class_weight": class_weight,
            "optimizer": "lbfgs",
            "n_iter": n_iter,
            "dtype": str(dtype).split(".")[-1],
        },
    )


def _fit_lbfgs(
    z: Tensor,
    y: Tensor,
    cw: Tensor | None,
    l2: float,
    init: tuple[Tensor, Tensor],
    max_iter: int,
    tol: float,
) -> tuple[tuple[Tensor, Tensor], int]:
    """Minimise the penalised mean loss with full-batch L-BFGS from `init`; returns
    ((weight, bias), iterations)."""
    weight = init[0].detach().clone().requires_grad_(True)  # (C, d)
    bias = init[1].detach().clone().requires_grad_(True)  # (C,)
    opt = torch.optim.LBFGS(
        [weight, bias],
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _loss(z, y, cw, l2, weight, bias)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    state = opt.state[weight]
    n_iter = int(state.get("n_iter", 0))
    if n_iter >= max_iter or state.get("func_evals", 0) >= opt.defaults["max_eval"]:
        log.warning(
            "L-BFGS used its budget (max_iter=%d) before max |grad| fell below tol=%g (l2=%g); "
            "raise max_iter, or use a larger l2",
            max_iter,
            tol,
            l2,
        )
    return (weight.detach(), bias.detach()), n_iter


def log_loss(logits: Tensor, y: Tensor, cw: Tensor | None = None) -> Tensor:
    """Mean (class-weighted) log loss of logits (n, C) for class indices y (n,).

    One column means a binary task (its logit scores class 1); more columns use softmax.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    if logits.shape[1] == 1:
        per_row = F.binary_cross_entropy_with_logits(
            logits[:, 0], y.to(logits.dtype), reduction="none"
        )
    else:
        per_row = F.cross_entropy(logits, y, reduction="none")
    if cw is not None:
        per_row = per_row * cw.to(per_row)[y]
    return per_row.mean()


def _loss(z: Tensor, y: Tensor, cw: Tensor | None, l2: float, weight: Tensor, bias: Tensor):
    """The training objective: log_loss + l2/2 ||weight||² (weight (C, d), bias (C,))."""
    return log_loss(torch.addmm(bias, z, weight.T), y, cw) + 0.5 * l2 * weight.pow(2).sum()


def _row_class_weights(y: Tensor, n_classes: int, mode: ClassWeight) -> Tensor | None:
    weights = class_weights(torch.bincount(y, minlength=n_classes), mode)
    return None if weights is None else weights.to(y.device)


def _metrics_standardised(z: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> dict[str, Any]:
    if z.shape[0] == 0:
        return {}
    with torch.no_grad():
        logits = torch.addmm(bias, z, weight.T)
        if weight.shape[0] == 1:
            p = torch.sigmoid(logits[:, 0])
            proba = torch.stack([1 - p, p], dim=1)
            return classification_metrics(y, proba, (logits[:, 0] > 0).long())
        return classification_metrics(y, logits.softmax(dim=1))


def class_weights(counts: Tensor, mode: ClassWeight) -> Tensor | None:
    """Per-class weights (C,) float64 from per-class row counts (C,); None when mode is None.

    "inverse": n / (C_present * n_c) (scikit-learn's "balanced"); "sqrt_inverse":
    n / (sqrt(n_c) * sum_c sqrt(n_c)). Both give a mean row weight of 1. Absent classes get 0.
    """
    if mode is None:
        return None
    counts = counts.detach().cpu().double()
    present = counts > 0
    n = counts.sum()
    weights = torch.zeros_like(counts)
    if mode == "inverse":
        weights[present] = n / (int(present.sum()) * counts[present])
    elif mode == "sqrt_inverse":
        weights[present] = n / (counts[present].sqrt() * counts[present].sqrt().sum())
    else:
        raise ValueError(
            f"unknown class_weight {mode!r}; expected None, 'inverse' or 'sqrt_inverse'"
        )
    return weights


def _working_copy(X: Tensor, order: Tensor, dtype: torch.dtype) -> Tensor:
    """X[order] as one new (N, d) tensor in `dtype`, converted chunk by chunk."""
    out = torch.empty(order.numel(), X.shape[1], dtype=dtype, device=X.device)
    step = chunk_rows(X.shape[1])
    for i in range(0, order.numel(), step):
        out[i : i + step] = X[order[i : i + step].to(X.device)]
    log.debug("probe: working copy %s %s", tuple(out.shape), dtype)
    return out


def _standardise_(z: Tensor) -> tuple[Tensor, Tensor]:
    """Standardise z (N, d) in place; returns its column mean and population std in float64.

    Chunk statistics are merged with Chan et al.'s parallel update. They need not be exact:
    folding undoes whatever mean and std were used. Constant columns get std 1.
    """
    mean = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
    m2 = torch.zeros_like(mean)
    count, step = 0, chunk_rows(z.shape[1])
    for i in range(0, z.shape[0], step):
        chunk = z[i : i + step]  # (k, d)
        k = chunk.shape[0]
        ones = chunk.new_ones(1, k)  # column sums as a matmul: much faster than var_mean on CPU
        mean_c = (ones @ chunk)[0] / k
        centred = chunk - mean_c
        m2_c = (ones @ centred.mul_(centred))[0]
        delta = mean_c.double() - mean
        mean += delta * (k / (count + k))
        m2 += m2_c.double() + delta**2 * (count * k / (count + k))
        count += k
    if not (torch.isfinite(mean).all() and torch.isfinite(m2).all()):
        raise ValueError("X contains NaN or inf values; drop or fix those rows before training")
    std = safe_std((m2 / count).sqrt())
    mean_z, std_z = mean.to(z.dtype), std.to(z.dtype)
    for i in range(0, z.shape[0], step):
        z[i : i + step].sub_(mean_z).div_(std_z)
    return mean, std


def _fold(weight: Tensor, bias: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """Standardised-feature (W, b) -> raw-feature (W / std, b - (W / std) @ mean), as float32."""
    raw = weight.double() / std.to(weight.device)  # (C, d)
    return raw.float(), (bias.double() - raw @ mean.to(weight.device)).float()
