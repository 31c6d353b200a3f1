"""Which rows of an activation store train a probe and which test it, with their labels.

    plan = plan_split(store, "label")          # split by text; kind from the label values
    plan.train, plan.test                      # sorted global row indices (LongTensor)
    plan.y_train, plan.kind, plan.describe()   # labels, "logistic"/"multinomial"/"ridge", counts

Labels are the store's per-sample metadata (`store.labels(column)`), repeated on each of a
sample's rows. The split is by text: when the samples have a `split` column its "train" rows
train and its "test" rows test (other values are left out); otherwise `grouped_split` on
`store.groups()` puts a `test_fraction` of the texts aside. Stores with positions "all" (many
rows per text) are split row by row, and no text has rows on both sides. residtap.probes.sweep
trains one probe per site on such a plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from residtap.probes.linear import TrainKind
from residtap.probes.splits import grouped_split
from residtap.store.reader import ROW_COLUMNS, Store

log = logging.getLogger(__name__)

SweepKind = Literal["auto", "logistic", "multinomial", "ridge"]
SWEEP_KINDS: tuple[str, ...] = ("auto", "logistic", "multinomial", "ridge")


@dataclass
class SplitPlan:
    """Which store rows train and which test, and their labels.

    `train` and `test` are sorted global row indices (LongTensor); `y_train` / `y_test` their
    label values; `groups` (rows,) is each row's sample index.
    """

    label_column: str
    kind: TrainKind
    train: Tensor
    test: Tensor
    y_train: list[Any]
    y_test: list[Any]
    groups: Tensor
    source: str  # how the split was made, for reports
    classes: list[Any] = field(default_factory=list)  # [] for ridge

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "train_rows": int(self.train.numel()),
            "test_rows": int(self.test.numel()),
            "train_texts": int(self.groups[self.train].unique().numel()),
            "test_texts": int(self.groups[self.test].unique().numel()),
        }


def sample_columns(store: Store) -> list[str]:
    """The per-sample metadata columns of a store ('id', 'label', 'split', ...)."""
    return sorted({key for record in store.samples for key in record} - {"sample"})


def _per_sample(store: Store, column: str) -> dict[int, Any]:
    """{sample index: value}; samples without the column map to None."""
    return {int(r["sample"]): r.get(column) for r in store.samples}


def _check_column(store: Store, column: str, what: str) -> None:
    if column in ROW_COLUMNS:
        return
    available = sample_columns(store)
    if column not in available:
        raise LookupError(
            f"{what} column {column!r} is not in the store's samples ({store.folder}); "
            f"available columns: {available}; pass one of them (e.g. --label label)"
        )


def plan_split(store: Store, label_column: str, *, kind: SweepKind = "auto",
               split_column: str | None = "split", test_fraction: float = 0.2, seed: int = 0,
               ) -> SplitPlan:
    """Labels and the by-text train/test split of `store`'s rows (see the module docstring).

    split_column: the sample column that says "train"/"test"; None, or a column the samples do
        not have, splits with `grouped_split(store.groups(), test_fraction, seed)` instead.
    kind "auto": ridge for fractional numbers, logistic for two classes, multinomial for more.
    Rows whose label is None (missing) are left out.
    """
    if kind not in SWEEP_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; expected one of {list(SWEEP_KINDS)}")
    if len(store) == 0:
        raise ValueError(f"store {store.folder} has no rows; extract some data into it first")
    _check_column(store, label_column, "label")
    groups = store.groups()  # (rows,) sample index of each row
    by_sample = _per_sample(store, label_column)
    labels = store.metadata(label_column) if label_column in ROW_COLUMNS else [
        by_sample[s] for s in groups.tolist()]
    labelled = torch.tensor([v is not None for v in labels], dtype=torch.bool)
    if not labelled.all():
        log.info("sweep: %d of %d rows have no %r label and are left out",
                 int((~labelled).sum()), len(labels), label_column)

    if split_column is not None and split_column in sample_columns(store):
        side = _per_sample(store, split_column)
        row_side = [side[s] for s in groups.tolist()]
        is_train = torch.tensor([v == "train" for v in row_side]) & labelled
        is_test = torch.tensor([v == "test" for v in row_side]) & labelled
        other = sorted({str(v) for v in row_side} - {"train", "test"})
        if other:
            log.info("sweep: rows with %s=%s are left out", split_column, other)
        train, test = is_train.nonzero().flatten(), is_test.nonzero().flatten()
        source = f"column {split_column!r} (train / test)"
        if train.numel() == 0 or test.numel() == 0:
            raise ValueError(
                f"the store's {split_column!r} column gives {train.numel()} train and "
                f"{test.numel()} test rows with a {label_column!r} label; both sides need "
                "rows: fix the column's values ('train' / 'test'), or pass split_column=None "
                "(--split-column none) to split the texts at random"
            )
    else:
        kept = labelled.nonzero().flatten()
        tr, te = grouped_split(groups[kept], test_fraction, seed)
        train, test = kept[tr], kept[te]
        source = f"grouped_split by text (test_fraction={test_fraction}, seed={seed})"
    y_train = [labels[i] for i in train.tolist()]
    y_test = [labels[i] for i in test.tolist()]
    resolved = _resolve_kind(kind, y_train + y_test, label_column)
    classes: list[Any] = []
    if resolved != "ridge":
        classes = sorted(set(y_train), key=_sort_key)
        unseen = sorted({str(v) for v in y_test} - {str(c) for c in classes})
        if unseen:
            raise ValueError(
                f"test rows have {label_column!r} values {unseen[:10]} that no training row "
                f"has (training classes: {classes[:10]}); a probe cannot predict a class it "
                "never saw: rebalance the split"
            )
    return SplitPlan(label_column, resolved, train, test, y_train, y_test, groups, source,
                     classes)


def _sort_key(v: Any) -> tuple[str, Any]:
    return (type(v).__name__, v)


def _resolve_kind(kind: SweepKind, values: list[Any], column: str) -> TrainKind:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    fractional = numbers and any(isinstance(v, float) and not v.is_integer() for v in values)
    n_classes = len({str(v) for v in values})
    if kind == "auto":
        kind = "ridge" if fractional else "logistic" if n_classes == 2 else "multinomial"
    if kind == "ridge" and not numbers:
        raise TypeError(
            f"kind='ridge' needs numeric labels, but column {column!r} holds "
            f"{sorted({type(v).__name__ for v in values})}; use kind='logistic' or "
            "'multinomial' for classes"
        )
    if kind != "ridge" and n_classes < 2:
        raise ValueError(
            f"column {column!r} has a single value ({values[0]!r}) on the rows used; a "
            "classifier needs at least two classes"
        )
    if kind == "logistic" and n_classes > 2:
        raise ValueError(
            f"kind='logistic' is binary but column {column!r} has {n_classes} classes; "
            "use kind='multinomial' (or 'auto')"
        )
    return kind  # type: ignore[return-value]
