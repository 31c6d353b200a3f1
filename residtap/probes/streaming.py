"""Probe training over batches that do not fit in memory together.

    def batches():                      # a fresh pass over the data each call
        for x, y in my_store.iter_rows(batch_size=8192):
            yield x, y                  # x (B, d) any float dtype, y (B,) labels
    probe = train_probe_streaming(batches, kind="logistic", l2=1e-4, epochs=5)

A first pass collects the feature mean and std (for standardisation, folded into the final
weights as in `train_probe`) and the classes. Logistic and multinomial probes then take
`epochs` passes of SGD with momentum (or Adam) on the same objective as `train_probe` (mean
loss plus `l2/2 ||W||²` on standardised features), with a cosine learning-rate decay; a last
pass measures training metrics. Ridge probes are exact after the first pass (float64
sufficient statistics). Shuffle rows across texts in the source: batches are read in order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .linear import TrainKind
from .logistic import ClassWeight, class_weights, log_loss
from .metrics import classification_metrics, encode_labels
from .probe import Probe
from .ridge import RidgeStats, safe_std

log = logging.getLogger(__name__)

Batches = Iterable[tuple[Tensor, Any]] | Callable[[], Iterable[tuple[Tensor, Any]]]


def train_probe_streaming(
    batches: Batches,
    *,
    kind: TrainKind = "logistic",
    l2: float = 1e-4,
    class_weight: ClassWeight = None,
    epochs: int = 5,
    optimizer: Literal["sgd", "adam"] = "sgd",
    lr: float | None = None,
    device: torch.device | str | None = None,
    site: str | None = None,
    label_column: str | None = None,
    progress: bool = True,
) -> Probe:
    """Train a probe from an iterable of (X (B, d), y (B,)) batches read several times.

    batches: a function returning a fresh iterable, or a re-iterable object (a list, a
        DataLoader); a one-shot generator cannot be read more than once and is refused.
    lr: default 0.1 for SGD (momentum 0.9), 0.02 for Adam, on standardised features.
    device: where to train; default the device of the first batch.
    progress: show a progress bar over epochs (only when stderr is a terminal).
    """
    make_batches = _reiterable(batches)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if kind not in ("logistic", "multinomial", "ridge"):
        raise ValueError(
            f"unknown probe kind {kind!r}; expected 'logistic', 'multinomial' or 'ridge'"
        )
    if kind == "ridge":
        return _streaming_ridge(make_batches, l2, device, site, label_column)
    scan = _scan(make_batches, device)
    classes, counts = scan["classes"], scan["counts"]
    if len(classes) < 2 or (kind == "logistic" and len(classes) > 2):
        raise ValueError(
            f"kind={kind!r} needs {'exactly 2' if kind == 'logistic' else 'at least 2'} classes, "
            f"the batches hold {len(classes)}: {classes[:10]}; "
            + ("use kind='multinomial'" if len(classes) > 2 else "check the labels")
        )
    dev, mean, std = scan["device"], scan["mean"], scan["std"]
    cw = class_weights(counts, class_weight)
    cw = None if cw is None else cw.to(dev)
    n_out = 1 if kind == "logistic" else len(classes)
    weight = torch.zeros(n_out, mean.shape[0], device=dev, requires_grad=True)  # (C, d)
    bias = torch.zeros(n_out, device=dev, requires_grad=True)  # (C,)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([weight, bias], lr=lr or 0.02)
    elif optimizer == "sgd":
        opt = torch.optim.SGD([weight, bias], lr=lr or 0.1, momentum=0.9)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adam' or 'sgd'")
    total_steps = epochs * scan["n_batches"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    mean32, std32 = mean.float(), std.float()
    epoch_loss: list[float] = []
    with torch.enable_grad():
        for _ in tqdm(range(epochs), desc="probe epochs", disable=not progress or None):
            running, rows = 0.0, 0
            for x, y in make_batches():
                z = (x.to(dev, torch.float32) - mean32) / std32  # (B, d)
                y_idx = encode_labels(y, classes)[0].to(dev)
                logits = torch.addmm(bias, z, weight.T)  # (B, C)
                loss = log_loss(logits, y_idx, cw) + 0.5 * l2 * weight.pow(2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                running += float(loss.detach()) * z.shape[0]
                rows += z.shape[0]
            epoch_loss.append(running / max(rows, 1))
    log.info("streaming probe: mean training loss per epoch %s", epoch_loss)
    raw_weight = weight.detach().double() / std  # fold standardisation
    raw_bias = bias.detach().double() - raw_weight @ mean
    probe = Probe(
        kind=kind,
        weight=raw_weight.float(),
        bias=raw_bias.float(),
        classes=classes,
        site=site,
        label_column=label_column,
        metadata={
            "l2": l2,
            "class_weight": class_weight,
            "optimizer": optimizer,
            "epochs": epochs,
            "epoch_loss": epoch_loss,
            "n_rows": scan["n"],
        },
    )
    probe.metrics = {"train": _streaming_metrics(probe, make_batches, dev)}
    return probe


def _scan(make_batches: Callable[[], Iterable[tuple[Tensor, Any]]], device: Any) -> dict[str, Any]:
    """One pass: row count, batch count, feature mean/std (float64, shifted sums), class counts."""
    n, n_batches, shift, total, total_sq = 0, 0, None, None, None
    label_counts: dict[Any, int] = {}
    dev = None
    for x, y in make_batches():
        _check_batch(x, y)
        if dev is None:
            dev = torch.device(device) if device is not None else x.device
        x64 = x.to(dev, torch.float64)
        if shift is None:
            shift = x64.mean(0)
            total, total_sq = torch.zeros_like(shift), torch.zeros_like(shift)
        x64 = x64 - shift
        total += x64.sum(0)
        total_sq += (x64 * x64).sum(0)
        values, counts = (
            torch.unique(y, return_counts=True) if isinstance(y, Tensor) else _count_list(y)
        )
        for value, count in zip(
            values.tolist() if isinstance(values, Tensor) else values,
            counts.tolist() if isinstance(counts, Tensor) else counts,
            strict=True,
        ):
            label_counts[value] = label_counts.get(value, 0) + int(count)
        n += x.shape[0]
        n_batches += 1
    if n < 2 or shift is None or total is None or total_sq is None:
        raise ValueError(f"the batches held {n} rows; a probe needs at least 2")
    centred = total / n
    std = safe_std((total_sq / n - centred**2).clamp(min=0).sqrt())
    classes = sorted(label_counts)
    return {
        "n": n,
        "n_batches": n_batches,
        "device": dev,
        "mean": shift + centred,
        "std": std,
        "classes": classes,
        "counts": torch.tensor([label_counts[c] for c in classes]),
    }


def _streaming_ridge(
    make_batches: Callable[[], Iterable[tuple[Tensor, Any]]],
    l2: float,
    device: Any,
    site: str | None,
    label_column: str | None,
) -> Probe:
    stats = RidgeStats()
    for x, y in make_batches():
        _check_batch(x, y)
        dev = torch.device(device) if device is not None else x.device
        stats.update(x.to(dev), torch.as_tensor(y).to(dev))
    weight, bias = stats.solve(l2)
    return Probe(
        kind="ridge",
        weight=weight.float(),
        bias=bias.float(),
        site=site,
        label_column=label_column,
        metadata={"l2": l2, "optimizer": "closed_form", "n_rows": stats.n},
    )


def _streaming_metrics(
    probe: Probe, make_batches: Callable[[], Iterable[tuple[Tensor, Any]]], device: Any
) -> dict[str, float]:
    probas, preds, labels = [], [], []
    with torch.no_grad():
        for x, y in make_batches():
            x = x.to(device)
            probas.append(probe.predict_proba(x).cpu())
            preds.append(probe.predict(x).cpu())
            labels.append(encode_labels(y, probe.classes)[0])
    return classification_metrics(torch.cat(labels), torch.cat(probas), torch.cat(preds))


def _reiterable(batches: Batches) -> Callable[[], Iterable[tuple[Tensor, Any]]]:
    if callable(batches):
        return batches
    if iter(batches) is batches:
        raise TypeError(
            "train_probe_streaming reads the batches several times, but got a one-shot iterator "
            f"({type(batches).__name__}); pass a function returning a fresh iterator, a list, "
            "or a DataLoader"
        )
    return lambda: batches


def _check_batch(x: Any, y: Any) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise TypeError(
            "expected each batch as (X, y) with X a float tensor (B, d), got X of type "
            f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
        )
    if len(y) != x.shape[0]:
        raise ValueError(f"a batch has {x.shape[0]} rows but {len(y)} labels; pass one per row")


def _count_list(y: Any) -> tuple[list[Any], list[int]]:
    counts: dict[Any, int] = {}
    for value in y.tolist() if hasattr(y, "tolist") else list(y):
        counts[value] = counts.get(value, 0) + 1
    return list(counts), list(counts.values())
