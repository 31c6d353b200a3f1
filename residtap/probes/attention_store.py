"""Attention probes trained on an activation store: what `residtap probe train --kind attention`
runs.

    store = residtap.extract(model, tok, data, ["layers.4"], "acts/", positions="all")
    probe = train_store_attention_probe(store, "label", "layers.4", n_heads=4)
    save_probe(probe, "answer.safetensors")        # a bank reads it: ProbeBank.add_file

One sequence per stored sample (its stored tokens, in order: residtap.probes.sweep's
`store_sequences`), split by text as residtap.probes.split_plan splits the store's rows, trained
by residtap.probes.attention's `train_attention_probe`; held-out texts give metrics["test"].
"""

from __future__ import annotations

from typing import Any

import torch

from residtap.probes.attention import AttentionProbe, train_attention_probe
from residtap.probes.metrics import classification_metrics
from residtap.probes.split_plan import plan_split
from residtap.probes.sweep import store_sequences
from residtap.store.reader import Store


def train_store_attention_probe(store: Store, label_column: str, site: str, *,
                                split_column: str | None = "split", test_fraction: float = 0.2,
                                seed: int = 0, **kwargs: Any) -> AttentionProbe:
    """An attention probe on a store captured with positions "all" (one sequence per sample:
    its stored tokens), split by text as residtap.probes.split_plan splits the store; held-out
    texts give metrics["test"]. kwargs go to `train_attention_probe` (n_heads, epochs, ...).
    This is `residtap probe train --kind attention`."""
    if store.positions != "all":
        raise ValueError(f"an attention probe pools over every token of a text, but store "
                         f"{store.folder} holds positions {store.positions!r}; capture with "
                         "positions='all' (--positions all)")
    plan = plan_split(store, label_column, split_column=split_column,
                      test_fraction=test_fraction, seed=seed)
    if plan.kind == "ridge":
        raise ValueError(f"column {label_column!r} holds numbers; attention probes classify")
    X, mask, samples = store_sequences(store, site)  # (S, T, d), (S, T), (S,)
    label = dict(zip(plan.groups[plan.train].tolist(), plan.y_train, strict=True))
    label |= dict(zip(plan.groups[plan.test].tolist(), plan.y_test, strict=True))
    test_side = set(plan.groups[plan.test].tolist())
    keep = [i for i, s in enumerate(samples.tolist()) if s in label]
    train = torch.tensor([i for i in keep if int(samples[i]) not in test_side])
    test = torch.tensor([i for i in keep if int(samples[i]) in test_side])
    y_of = {i: label[int(samples[i])] for i in keep}
    kwargs.setdefault("seed", seed)
    probe = train_attention_probe(X[train], [y_of[i] for i in train.tolist()], mask=mask[train],
                                  site=site, label_column=label_column, **kwargs)
    classes = probe.classes
    with torch.no_grad():
        y_test = torch.tensor([classes.index(y_of[i]) for i in test.tolist()])
        probe.metrics["test"] = classification_metrics(
            y_test, probe.predict_proba(X[test], mask[test]), probe.predict(X[test], mask[test]))
    probe.model = store.model
    probe.metadata.update(store=str(store.folder), positions="all", split=plan.describe())
    return probe
