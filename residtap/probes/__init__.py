"""Probes on activations: train, evaluate, save and load.

    from residtap.probes import train_probe, evaluate, save_probe, load_probe
    probe = train_probe(X, y, groups=text_ids)      # X (N, d) activations, y (N,) labels
    evaluate(probe, X_test, y_test)                 # accuracy, balanced accuracy, AUROC, F1, ECE
    save_probe(probe, "probe.safetensors", model=model)

Kinds: "logistic" (binary), "multinomial", "ridge" (continuous targets) via `train_probe`
(in memory, L-BFGS) or `train_probe_streaming` (batches, Adam/SGD); "diff_means" via
`diff_means`; "attention" (over a sequence's tokens) via `train_attention_probe`. Split by text
with `grouped_split` so no text's tokens are on both sides.
"""

from .attention import AttentionProbe, train_attention_probe
from .files import load_probe, save_probe
from .linear import DEFAULT_L2_GRID, diff_means, train_probe
from .logistic import class_weights
from .metrics import (
    accuracy,
    auroc,
    balanced_accuracy,
    classification_metrics,
    evaluate,
    expected_calibration_error,
    f1,
    regression_metrics,
)
from .probe import Probe
from .ridge import RidgeStats
from .splits import grouped_split, row_split
from .streaming import train_probe_streaming

__all__ = [
    "DEFAULT_L2_GRID",
    "AttentionProbe",
    "Probe",
    "RidgeStats",
    "accuracy",
    "auroc",
    "balanced_accuracy",
    "class_weights",
    "classification_metrics",
    "diff_means",
    "evaluate",
    "expected_calibration_error",
    "f1",
    "grouped_split",
    "load_probe",
    "regression_metrics",
    "row_split",
    "save_probe",
    "train_attention_probe",
    "train_probe",
    "train_probe_streaming",
]
