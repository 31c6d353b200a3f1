"""Probe metrics on tensors: accuracy, balanced accuracy, AUROC, F1, calibration error, R².

    from residtap.probes import evaluate
    evaluate(probe, X_test, y_test)
    # {'n': 2000, 'accuracy': 0.91, 'balanced_accuracy': 0.90, 'auroc': 0.96, 'f1': 0.90,
    #  'ece': 0.02}

The metric functions take class indices `y` (N,) and probabilities `proba` (N, C) and compute in
float64 on the CPU. Binary tasks treat class index 1 as positive. Multiclass AUROC is the macro
average of one-vs-rest AUROCs and multiclass F1 is macro F1, both as in scikit-learn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

Labels = Tensor | np.ndarray | Sequence[Any]


# ---------------------------------------------------------------------------------------------
# labels <-> class indices


def encode_labels(y: Labels, classes: Sequence[Any] | None = None) -> tuple[Tensor, list[Any]]:
    """Label values -> (class indices LongTensor (N,), classes).

    Without `classes` the classes are the sorted distinct labels. With `classes` (e.g. a trained
    probe's), a label outside them is an error.
    """
    if isinstance(y, Tensor) and (classes is None or _all_numbers(classes)):
        if y.ndim != 1:
            raise ValueError(
                f"expected labels of shape (N,), got {tuple(y.shape)}; pass one label per row"
            )
        y_cpu = y.detach().cpu()
        if classes is None:
            found, inverse = torch.unique(y_cpu, return_inverse=True)
            return inverse.long(), found.tolist()
        table = torch.tensor([float(c) for c in classes], dtype=torch.float64)
        order = torch.argsort(table)
        values = y_cpu.double()
        pos = torch.searchsorted(table[order], values).clamp(max=len(classes) - 1)
        unknown = table[order][pos] != values
        if unknown.any():
            _raise_unknown(values[unknown].unique().tolist(), classes)
        return order[pos].long(), list(classes)
    values = y.detach().cpu().tolist() if isinstance(y, Tensor) else _as_list(y)
    if classes is None:
        try:
            classes = sorted(set(values))
        except TypeError as err:
            raise TypeError(
                f"labels must be mutually comparable (all numbers or all strings); got {err}"
            ) from err
    index_of = {c: i for i, c in enumerate(classes)}
    missing = sorted({str(v) for v in values if v not in index_of})
    if missing:
        _raise_unknown(missing, classes)
    return torch.tensor([index_of[v] for v in values], dtype=torch.long), list(classes)


def _as_list(y: Any) -> list[Any]:
    if isinstance(y, np.ndarray):
        if y.ndim != 1:
            raise ValueError(f"expected labels of shape (N,), got {y.shape}")
        return y.tolist()
    if isinstance(y, (str, bytes)) or not isinstance(y, Sequence):
        raise TypeError(f"expected labels as a tensor, numpy array or list, got {type(y).__name__}")
    return list(y)


def _all_numbers(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (bool, int, float)) for v in values)


def _raise_unknown(unknown: list[Any], classes: Sequence[Any]) -> None:
    raise ValueError(
        f"labels {unknown[:5]} are not among the probe's classes {list(classes)}; "
        "evaluate with labels from the same label set the probe was trained on"
    )


# ---------------------------------------------------------------------------------------------
# classification


def accuracy(y: Tensor, pred: Tensor) -> float:
    """Fraction of rows where `pred` equals `y` (both class indices)."""
    return float((y.cpu() == pred.cpu()).double().mean())


def balanced_accuracy(y: Tensor, pred: Tensor) -> float:
    """Mean recall over the classes present in `y`."""
    y, pred = y.cpu(), pred.cpu()
    recalls = [float((pred[y == c] == c).double().mean()) for c in torch.unique(y).tolist()]
    return sum(recalls) / len(recalls)


def f1(y: Tensor, pred: Tensor, n_classes: int) -> float:
    """Binary F1 of class 1 when n_classes == 2, else macro F1 over classes seen in y or pred."""
    y, pred = y.cpu(), pred.cpu()
    if n_classes == 2:
        return _f1_of(y, pred, 1)
    seen = torch.unique(torch.cat([y, pred])).tolist()
    return sum(_f1_of(y, pred, c) for c in seen) / len(seen)


def _f1_of(y: Tensor, pred: Tensor, c: int) -> float:
    true_pos = int(((pred == c) & (y == c)).sum())
    denom = int((pred == c).sum()) + int((y == c).sum())
    return 2.0 * true_pos / denom if denom else 0.0


def auroc(y: Tensor, proba: Tensor) -> float:
    """Area under the ROC curve.

    `proba` (N,) holds scores for class 1 of a binary task (any monotone score works); `proba`
    (N, C) gives the macro one-vs-rest average over the classes. NaN when a class is missing.
    """
    y, proba = y.cpu(), proba.detach().cpu().double()
    if proba.ndim == 1:
        return _binary_auroc(y == 1, proba)
    if proba.shape[1] == 2:
        return _binary_auroc(y == 1, proba[:, 1])
    return sum(_binary_auroc(y == c, proba[:, c]) for c in range(proba.shape[1])) / proba.shape[1]


def _binary_auroc(positive: Tensor, score: Tensor) -> float:
    """Mann-Whitney U with tied scores given their average rank."""
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        log.warning("AUROC is undefined with only one class present (%d rows); NaN", n_pos + n_neg)
        return math.nan
    _, inverse, counts = torch.unique(score, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of the last row of each tie block
    ranks = (ends - (counts.double() - 1.0) / 2.0)[inverse]
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def expected_calibration_error(y: Tensor, proba: Tensor, n_bins: int = 10) -> float:
    """ECE of the top-label confidence over `n_bins` equal-width bins: sum_b (n_b/N)|acc_b-conf_b|.

    `proba` is (N, C), rows summing to 1 (for a binary task, C = 2).
    """
    y, proba = y.cpu(), proba.detach().cpu().double()
    confidence, pred = proba.max(dim=1)
    correct = (pred == y).double()
    bins = (confidence * n_bins).long().clamp(max=n_bins - 1)
    n = y.numel()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    return float((conf_sum - acc_sum).abs().sum() / n)


def classification_metrics(
    y: Tensor, proba: Tensor, pred: Tensor | None = None
) -> dict[str, float]:
    """All classification metrics from class indices (N,) and probabilities (N, C).

    `pred` defaults to the argmax of `proba`; pass the probe's thresholded predictions instead.
    """
    if proba.ndim != 2 or proba.shape[0] != y.shape[0]:
        raise ValueError(f"expected proba of shape (N={y.shape[0]}, C), got {tuple(proba.shape)}")
    pred = proba.argmax(dim=1) if pred is None else pred
    return {
        "n": int(y.numel()),
        "accuracy": accuracy(y, pred),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "auroc": auroc(y, proba),
        "f1": f1(y, pred, proba.shape[1]),
        "ece": expected_calibration_error(y, proba),
    }


def regression_metrics(y: Tensor, pred: Tensor) -> dict[str, float]:
    """{'n', 'mse', 'r2'}; for several outputs (N, k) both are averaged over outputs."""
    y = y.detach().cpu().double().reshape(pred.shape[0], -1)
    pred = pred.detach().cpu().double().reshape(y.shape)
    residual = ((y - pred) ** 2).sum(0)
    spread = ((y - y.mean(0)) ** 2).sum(0)
    return {
        "n": int(y.shape[0]),
        "mse": float(residual.sum() / y.numel()),
        "r2": float((1.0 - residual / spread).mean()),
    }


# ---------------------------------------------------------------------------------------------
# evaluate a probe


class _ProbeLike(Protocol):
    kind: str
    classes: list[Any]

    def predict(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor: ...
    def predict_proba(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor: ...


def evaluate(
    probe: _ProbeLike, X: Any, y: Labels, *, mask: Tensor | None = None
) -> dict[str, float]:
    """Metrics of `probe` on rows `X` with labels `y` (label values, as given to training).

    Classification probes give n, accuracy, balanced_accuracy, auroc, f1 and ece; ridge probes
    give n, mse and r2. `mask` is passed on to attention probes (padded sequences).
    """
    extra = {} if mask is None else {"mask": mask}
    if probe.kind == "ridge":
        if not isinstance(y, Tensor):
            y = torch.as_tensor(np.asarray(y))
        return regression_metrics(y, probe.predict(X, **extra))
    y_idx, _ = encode_labels(y, probe.classes)
    with torch.no_grad():
        proba = probe.predict_proba(X, **extra)
        pred = probe.predict(X, **extra)
    return classification_metrics(y_idx, proba, pred)
