"""Probe every site of an activation store for one label column: where is the label decodable?

    store = residtap.Store.open("acts/")
    result = sweep(store, "label")              # one probe per site, metrics on held-out texts
    result.best_site, result.table()            # 'layers.3', [{'site': ..., 'accuracy': ...}]
    write_files(result, "sweep/")               # residtap.probes.plot: sweep.json, .png, .html

The rows and labels of each side come from `plan_split` (residtap.probes.split_plan): split by
text, with the store's `split` column when it has one. Each site gets a probe from
`train_probe` (its L2 strength chosen on a validation split of the training texts) and the
held-out metrics of `evaluate`: accuracy, balanced accuracy, AUROC, F1 and ECE (ridge: MSE and
R²). `baseline=True` adds a difference-of-means probe per site (binary labels). The best site is
the one with the highest held-out `metric`; choosing it on the test side makes its number
slightly optimistic, so read it as a layer comparison, and re-test a probe chosen this way on
fresh data before quoting it.

For attention probes over a text's tokens, `store_sequences` turns an "all"-positions store into
padded sequences for `train_attention_probe`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from residtap.probes.files import _plain
from residtap.probes.linear import TrainKind, diff_means, train_probe
from residtap.probes.logistic import ClassWeight
from residtap.probes.metrics import evaluate
from residtap.probes.probe import Probe
from residtap.probes.split_plan import SplitPlan, SweepKind, plan_split
from residtap.store.reader import Store

log = logging.getLogger(__name__)

CLASSIFIER_METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1", "ece")
REGRESSION_METRICS = ("mse", "r2")


# ---------------------------------------------------------------------------------------------
# one site


def _site_rows(store: Store, site: str, index: Tensor) -> Tensor:
    if site not in store:
        raise LookupError(
            f"site {site!r} is not in the store {store.folder}; it holds {store.sites}"
        )
    x = store.rows_of(site, index)
    if x.ndim != 2:
        raise ValueError(
            f"site {site!r} has per-row shape {tuple(x.shape[1:])}; a linear probe needs one "
            "vector per row (d,), e.g. a residual-stream site such as 'layers.3'"
        )
    return x


def _targets(plan: SplitPlan, values: list[Any]) -> Any:
    return torch.tensor(values, dtype=torch.float64) if plan.kind == "ridge" else values


def train_site_probe(store: Store, label_column: str, site: str, *,
                     plan: SplitPlan | None = None, kind: SweepKind = "auto",
                     split_column: str | None = "split", test_fraction: float = 0.2,
                     seed: int = 0, l2: float | list[float] | None = None,
                     class_weight: ClassWeight = None) -> Probe:
    """Train one probe on the training rows of `site` and test it on the held-out rows.

    The probe carries its site, label column, the store's model identity and metrics
    {"train", "val" (L2 choice), "test"}, ready for `save_probe`. `plan` reuses a split made by
    `plan_split`; otherwise one is made from the other arguments.
    """
    plan = plan or plan_split(store, label_column, kind=kind, split_column=split_column,
                              test_fraction=test_fraction, seed=seed)
    x_train = _site_rows(store, site, plan.train)  # (n_train, d)
    probe = train_probe(x_train, _targets(plan, plan.y_train), kind=plan.kind,
                        groups=plan.groups[plan.train], l2=l2, class_weight=class_weight,
                        seed=seed, site=site, label_column=label_column)
    del x_train
    x_test = _site_rows(store, site, plan.test)
    probe.metrics["test"] = evaluate(probe, x_test, _targets(plan, plan.y_test))
    probe.model = store.model
    probe.metadata.update(store=str(store.folder), positions=store.positions,
                          split=plan.describe())
    return probe


def _baseline(store: Store, site: str, plan: SplitPlan) -> dict[str, float]:
    probe = diff_means(_site_rows(store, site, plan.train), plan.y_train, site=site,
                       label_column=plan.label_column)
    return evaluate(probe, _site_rows(store, site, plan.test), plan.y_test)


# ---------------------------------------------------------------------------------------------
# the sweep


@dataclass
class SiteScores:
    """One site's probe: held-out metrics, training metrics and the optional baseline's."""

    site: str
    test: dict[str, float]
    train: dict[str, float]
    l2: float | None = None
    baseline: dict[str, float] | None = None


@dataclass
class SweepResult:
    """Per-site probe metrics for one label column of one store; see `sweep`."""

    label_column: str
    kind: TrainKind
    metric: str  # the metric that ranks sites: "accuracy", or "r2" for ridge
    classes: list[Any]
    split: dict[str, Any]
    sites: list[SiteScores]
    store: str = ""
    model: dict[str, Any] | None = None
    positions: Any = None
    chance: float | None = None  # majority-class accuracy on the test rows
    probes: dict[str, Probe] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # one line: no per-site metric dicts, no probe weights
        try:
            best = f"best={self.best_site!r} ({self.metric} {self.best.test[self.metric]:.4g})"
        except ValueError:
            best = "best=None"
        return (f"SweepResult(label={self.label_column!r}, kind={self.kind!r}, "
                f"sites={len(self.sites)}, {best}, chance={self.chance}, store={self.store!r})")

    @property
    def best(self) -> SiteScores:
        """The site with the highest held-out `metric` (the first one on ties)."""
        scored = [s for s in self.sites if not math.isnan(s.test.get(self.metric, math.nan))]
        if not scored:
            raise ValueError(f"no site has a finite {self.metric!r}; nothing to rank")
        return max(scored, key=lambda s: s.test[self.metric])

    @property
    def best_site(self) -> str:
        return self.best.site

    def score(self, site: str, metric: str | None = None) -> float:
        """Held-out `metric` (default: the ranking metric) of one site."""
        for s in self.sites:
            if s.site == site:
                return s.test[metric or self.metric]
        raise LookupError(f"site {site!r} was not swept; swept sites: {self.site_names}")

    @property
    def site_names(self) -> list[str]:
        return [s.site for s in self.sites]

    def table(self, digits: int = 4) -> list[dict[str, Any]]:
        """One row per site: held-out metrics (and the baseline's accuracy), rounded."""
        names = REGRESSION_METRICS if self.kind == "ridge" else CLASSIFIER_METRICS
        rows = []
        for s in self.sites:
            row: dict[str, Any] = {"site": s.site}
            row |= {m: _round(s.test.get(m), digits) for m in names}
            if s.baseline is not None:
                row[f"diff_means_{self.metric}"] = _round(s.baseline.get(self.metric), digits)
            row["best"] = "*" if s.site == self.best_site else ""
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (NaN becomes null); probes are not included."""
        return _plain({
            "label_column": self.label_column, "kind": self.kind, "metric": self.metric,
            "classes": self.classes, "split": self.split, "store": self.store,
            "model": self.model, "positions": self.positions, "chance": self.chance,
            "best_site": self.best_site, "best": self.best.test[self.metric],
            "sites": [{"site": s.site, "test": s.test, "train": s.train, "l2": s.l2,
                       "baseline": s.baseline} for s in self.sites],
        })


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None or math.isnan(v) else round(float(v), digits)


def sweep(store: Store | str | os.PathLike[str], label_column: str = "label",
          sites: list[str] | None = None, *, kind: SweepKind = "auto",
          split_column: str | None = "split", test_fraction: float = 0.2, seed: int = 0,
          baseline: bool = False, l2: float | list[float] | None = None,
          class_weight: ClassWeight = None, progress: bool = True) -> SweepResult:
    """Train and test one probe per site of `store` (default: all its sites, in store order).

    kind: "auto" (ridge for fractional numbers, else logistic / multinomial by the number of
        classes), or "logistic", "multinomial", "ridge".
    split_column, test_fraction, seed: the split by text (see `plan_split`).
    baseline: also fit a difference-of-means probe per site (binary labels only).
    l2, class_weight: passed to `train_probe`.
    """
    store = store if isinstance(store, Store) else Store.open(store)
    sites = list(store.sites if sites is None else sites)
    if not sites:
        raise ValueError(f"no sites to sweep; the store holds {store.sites}")
    missing = [s for s in sites if s not in store]
    if missing:
        raise LookupError(
            f"sites {missing} are not in the store {store.folder}; it holds {store.sites}"
        )
    plan = plan_split(store, label_column, kind=kind, split_column=split_column,
                      test_fraction=test_fraction, seed=seed)
    if baseline and len(plan.classes) != 2:
        log.warning("sweep: the difference-of-means baseline needs 2 classes, %r has %d; "
                    "skipped", label_column, len(plan.classes))
        baseline = False
    log.info("sweep %r over %d sites: %s, kind=%s", label_column, len(sites), plan.source,
             plan.kind)
    scores, probes = [], {}
    for site in tqdm(sites, desc=f"probe sweep {label_column}", unit="site",
                     disable=not progress or None):
        probe = train_site_probe(store, label_column, site, plan=plan, l2=l2,
                                 class_weight=class_weight, seed=seed)
        probes[site] = probe
        scores.append(SiteScores(
            site=site, test=probe.metrics["test"], train=probe.metrics.get("train", {}),
            l2=probe.metadata.get("l2"),
            baseline=_baseline(store, site, plan) if baseline else None))
    chance = None
    if plan.kind != "ridge":
        counts = {}
        for v in plan.y_test:
            counts[str(v)] = counts.get(str(v), 0) + 1
        chance = max(counts.values()) / len(plan.y_test)
    return SweepResult(
        label_column=label_column, kind=plan.kind,
        metric="r2" if plan.kind == "ridge" else "accuracy", classes=plan.classes,
        split=plan.describe(), sites=scores, store=str(store.folder), model=store.model,
        positions=store.positions, chance=chance, probes=probes)


# ---------------------------------------------------------------------------------------------
# sequences for attention probes


def store_sequences(store: Store, site: str) -> tuple[Tensor, Tensor, Tensor]:
    """A store's rows of `site` as padded sequences, one per stored sample.

    Returns X (S, T, d) right-padded with zeros, mask (S, T) bool (True at stored tokens, in
    position order) and samples (S,) the sample index of each sequence. Meant for stores with
    positions "all", as input to `train_attention_probe(X, y, mask=mask)`; holds S * T * d
    values in memory.
    """
    x = _site_rows(store, site, torch.arange(len(store)))  # (rows, d)
    groups = store.groups()
    if groups.numel() > 1 and bool((groups[1:] < groups[:-1]).any()):
        raise ValueError(f"store {store.folder} rows are not ordered by sample; was it edited?")
    samples, counts = torch.unique_consecutive(groups, return_counts=True)
    sequences = list(torch.split(x, counts.tolist()))  # S tensors (T_i, d)
    padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)  # (S, T, d)
    mask = torch.arange(padded.shape[1])[None, :] < counts[:, None]  # (S, T)
    return padded, mask, samples
