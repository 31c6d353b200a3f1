"""The trained linear probe: weights that apply to raw activations, and what it predicts.

    probe.scores(x)          # x (..., d) -> logits (...,) or (..., C): x @ weight.T + bias
    probe.predict(x)         # class indices into probe.classes (values for ridge)
    probe.predict_proba(x)   # (..., C) probabilities

Made by residtap.probes.linear (train_probe, diff_means) and streaming (train_probe_streaming);
saved and loaded by residtap.probes.files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from .ridge import chunk_rows

ProbeKind = Literal["logistic", "multinomial", "ridge", "diff_means"]


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
