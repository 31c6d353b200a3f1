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
allocation. Ridge is solved exactly from float64 sufficient statistics. For data that do not fit
in memory, `train_probe_streaming` reads an iterable of (X, y) batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import Labels, classification_metrics, encode_labels
from .ridge import chunk_rows, fit_ridge, regression_scores, safe_std
from .splits import GroupIds, grouped_split, row_split

log = logging.getLogger(__name__)

ProbeKind = Literal["logistic", "multinomial", "ridge", "diff_means"]
TrainKind = Literal["logistic", "multinomial", "ridge"]
ClassWeight = Literal["inverse", "sqrt_inverse"] | None

DEFAULT_L2_GRID: tuple[float, ...] = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


@dataclass
class Probe:
    """A trained linear probe: `scores(x) = x @ weight.T + bias` on raw activations.

    `weight` is (C, d) and `bias` (C,), with C = 1 for binary kinds (logistic, diff_means) and
    single-target ridge, C = len(classes) for multinomial, C = targets for multi-target ridge.
    Tensors are float32: on features whose mean is k orders of magnitude above their spread,
    folded scores carry about 7 - k significant digits (still far finer than bf16 inputs).
    """

    kind: ProbeKind
    weight: Tensor  # (C, d)
    bias: Tensor  # (C,)
    classes: list[Any] = field(default_factory=list)  # label values; [] for ridge
    site: str | None = None
    threshold: float = 0.0  # binary kinds predict classes[1] where score > threshold
    label_column: str | None = None
    model: dict[str, Any] | None = None  # residtap.identity.model_identity of the source model
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[-1])

    @property
    def n_outputs(self) -> int:
        return int(self.weight.shape[0])

    def __repr__(self) -> str:  # never the weights: what it is, where it reads, how it scored
        return probe_repr(self, f"outputs={self.n_outputs}")

    def to(self, device: torch.device | str) -> Probe:
        return replace(self, weight=self.weight.to(device), bias=self.bias.to(device))

    def scores(self, x: Tensor) -> Tensor:
        """Logits (values for ridge) for x of shape (..., d): (...,) when C = 1, else (..., C)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"probe expects activations with last dimension d_model={self.d_model}, got "
                f"shape {tuple(x.shape)}; apply it to the site it was trained on ({self.site})"
            )
        weight, bias = self.weight.to(x.device), self.bias.to(x.device)
        flat = x.reshape(-1, self.d_model)  # (M, d)
        step = chunk_rows(self.d_model)
        parts = [
            torch.addmm(bias, flat[i : i + step].to(weight.dtype), weight.T)
            for i in range(0, flat.shape[0], step)
        ]
        out = torch.cat(parts) if parts else flat.new_zeros((0, self.n_outputs), dtype=weight.dtype)
        out = out.reshape(*x.shape[:-1], self.n_outputs)
        return out.squeeze(-1) if self.n_outputs == 1 else out

    def predict(self, x: Tensor) -> Tensor:
        """Class indices into `classes` (..., ) for classifiers; values for ridge."""
        s = self.scores(x)
        if self.kind == "ridge":
            return s
        if self.kind == "multinomial":
            return s.argmax(dim=-1)
        return (s > self.threshold).long()

    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities (..., C); for binary kinds C = 2 ([1 - p, p])."""
        if self.kind == "ridge":
            raise TypeError("a ridge probe predicts values, not probabilities; use predict()")
        s = self.scores(x)
        if self.kind == "multinomial":
            return s.softmax(dim=-1)
        p = torch.sigmoid(s)
        return torch.stack([1.0 - p, p], dim=-1)


# ---------------------------------------------------------------------------------------------
# in-memory training


def probe_repr(probe: Any, shape: str) -> str:
    """`Kind(kind=..., site=..., d_model=..., classes=..., test_accuracy=..., model=...)`: the
    shared repr of probe classes; `shape` says what the weights are without printing them."""
    parts = [f"kind={probe.kind!r}", f"site={probe.site!r}", f"d_model={probe.d_model}", shape]
    if probe.classes:
        shown = probe.classes if len(probe.classes) <= 8 else [*probe.classes[:8], "..."]
        parts.append(f"classes={shown!r}")
    if probe.label_column is not None:
        parts.append(f"label={probe.label_column!r}")
    for split in ("test", "val", "train"):
        scores = probe.metrics.get(split) or {}
        name = next((m for m in ("accuracy", "r2", "mse") if m in scores), None)
        if name is not None and isinstance(scores[name], (int, float)):
            parts.append(f"{split}_{name}={scores[name]:.4g}")
    if probe.model:
        parts.append(f"model={probe.model.get('name', '?')!r}")
    return f"{type(probe).__name__}({', '.join(parts)})"


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
        probe = _train_logistic(
            X, y, kind, train_idx, val_idx, grid, class_weight, dtype, max_iter, tol
        )
    probe.site, probe.label_column = site, label_column
    probe.metadata.update(n_rows=n, seed=seed, val_fraction=val_fraction if len(grid) > 1 else 0)
    return probe


def _train_logistic(
    X: Tensor,
    y: Labels,
    kind: TrainKind,
    train_idx: Tensor,
    val_idx: Tensor,
    grid: list[float],
    class_weight: ClassWeight,
    dtype: torch.dtype,
    max_iter: int,
    tol: float,
) -> Probe:
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
# shared helpers


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
