"""Probe training, metrics, splits, attention probes and probe files (tensor-level, offline)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from conftest import tiny_model
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

import residtap
from residtap.probes import (
    AttentionProbe,
    Probe,
    auroc,
    balanced_accuracy,
    class_weights,
    diff_means,
    evaluate,
    expected_calibration_error,
    f1,
    grouped_split,
    load_probe,
    row_split,
    save_probe,
    train_attention_probe,
    train_probe,
    train_probe_streaming,
)


def make_task(
    n: int = 3000, d: int = 20, n_classes: int = 2, seed: int = 0, *, sep: float = 0.6,
    offset: float = 0.0, spread_scales: bool = False, priors: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gaussian classes with overlapping centres; groups of 10 consecutive rows ("texts")."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=g) * sep
    probs = torch.tensor(priors or [1.0 / n_classes] * n_classes)
    y = torch.multinomial(probs, n, replacement=True, generator=g)
    X = centres[y] + torch.randn(n, d, generator=g)
    if spread_scales:
        X = X * torch.logspace(-2, 2, d)
    return X + offset, y, torch.arange(n) // 10


def sklearn_fit(Xtr, ytr, l2, class_weight=None):
    scaler = StandardScaler().fit(Xtr.double().numpy())
    clf = LogisticRegression(
        C=1.0 / (l2 * Xtr.shape[0]), tol=1e-10, max_iter=10_000, class_weight=class_weight
    ).fit(scaler.transform(Xtr.double().numpy()), ytr.numpy())
    return scaler, clf


TASKS = {
    "binary": dict(d=20),
    "binary_offset_scales": dict(d=50, offset=100.0, spread_scales=True),
    "binary_imbalanced": dict(d=30, priors=[0.85, 0.15], sep=0.8),
    "multinomial3": dict(d=30, n_classes=3),
    "multinomial5": dict(d=40, n_classes=5, sep=0.5),
}


CASES = [(task, torch.float64) for task in TASKS] + [
    ("binary_offset_scales", torch.float32), ("multinomial3", torch.float32)]  # fmt: skip


@pytest.mark.parametrize(("task", "dtype"), CASES)
def test_accuracy_matches_sklearn(task, dtype):
    X, y, groups = make_task(seed=len(task), **TASKS[task])
    tr, te = grouped_split(groups, 0.25, seed=1)
    kind = "multinomial" if "multinomial" in task else "logistic"
    l2 = 1e-3
    probe = train_probe(X[tr], y[tr], kind=kind, l2=l2, dtype=dtype)
    scaler, clf = sklearn_fit(X[tr], y[tr], l2)
    ours = evaluate(probe, X[te], y[te])["accuracy"]
    theirs = clf.score(scaler.transform(X[te].double().numpy()), y[te].numpy())
    assert abs(ours - theirs) <= 0.01, (task, ours, theirs)
    if dtype == torch.float64:  # same objective, so the same weights (standardised space)
        ours_w = probe.weight.double().numpy() * scaler.scale_
        expected = clf.coef_ if kind == "multinomial" else clf.coef_[:1]
        np.testing.assert_allclose(ours_w, expected, atol=2e-4 * np.abs(expected).max())


def test_class_weight_inverse_matches_sklearn_balanced():
    X, y, groups = make_task(d=20, priors=[0.9, 0.1], sep=0.5, seed=3)
    tr, te = grouped_split(groups, 0.25, seed=0)
    probe = train_probe(X[tr], y[tr], l2=1e-3, class_weight="inverse", dtype=torch.float64)
    scaler, clf = sklearn_fit(X[tr], y[tr], 1e-3, class_weight="balanced")
    ours = probe.predict(X[te]).numpy()
    theirs = clf.predict(scaler.transform(X[te].double().numpy()))
    assert (ours == theirs).mean() >= 0.99
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=y.numpy())
    np.testing.assert_allclose(class_weights(torch.bincount(y), "inverse").numpy(), expected)


def test_class_weights_shift_decisions_towards_the_rare_class():
    X, y, groups = make_task(d=10, priors=[0.9, 0.1], sep=0.4, seed=5)
    tr, te = grouped_split(groups, 0.3, seed=0)
    rates, bal = {}, {}
    for mode in (None, "sqrt_inverse", "inverse"):
        probe = train_probe(X[tr], y[tr], l2=1e-3, class_weight=mode)
        rates[mode] = float(probe.predict(X[te]).float().mean())
        bal[mode] = evaluate(probe, X[te], y[te])["balanced_accuracy"]
    assert rates[None] < rates["sqrt_inverse"] < rates["inverse"]
    assert bal["inverse"] > bal[None] + 0.05
    weights = class_weights(torch.tensor([90, 10]), "sqrt_inverse")
    assert weights[1] / weights[0] == pytest.approx(3.0)  # sqrt(90 / 10)
    assert float((weights * torch.tensor([90, 10])).sum()) == pytest.approx(100.0)


def test_ridge_matches_sklearn_and_streaming():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(800, 15, generator=g) * torch.linspace(0.1, 10, 15) + 50.0
    w = torch.randn(15, generator=g)
    y = X @ w + torch.randn(800, generator=g)
    l2 = 1e-2
    probe = train_probe(X, y, kind="ridge", l2=l2)
    scaler = StandardScaler().fit(X.double().numpy())
    ridge = Ridge(alpha=l2 * X.shape[0]).fit(scaler.transform(X.double().numpy()), y.numpy())
    np.testing.assert_allclose(
        probe.weight.double().numpy()[0] * scaler.scale_, ridge.coef_, rtol=1e-5, atol=1e-6
    )
    expected = ridge.predict(scaler.transform(X.double().numpy()))
    np.testing.assert_allclose(probe.predict(X).double().numpy(), expected, rtol=1e-4, atol=1e-3)
    batches = [(X[i : i + 100], y[i : i + 100]) for i in range(0, 800, 100)]
    streamed = train_probe_streaming(batches, kind="ridge", l2=l2)
    torch.testing.assert_close(streamed.weight, probe.weight, rtol=1e-5, atol=1e-6)
    chosen = train_probe(X, y, kind="ridge", groups=torch.arange(800) // 8)  # l2 from the grid
    assert chosen.metadata["l2"] in chosen.metadata["l2_val_mse"] or chosen.metadata["l2"] > 0
    assert chosen.metrics["train"]["r2"] > 0.9


def test_folded_standardisation_equals_predicting_on_standardised_data():
    X, y, _ = make_task(d=12, offset=30.0, spread_scales=True, seed=7)
    mean, std = X.double().mean(0), X.double().std(0, unbiased=False)
    Z = (X.double() - mean) / std
    raw = train_probe(X, y, l2=1e-2, dtype=torch.float64)
    standardised = train_probe(Z, y, l2=1e-2, dtype=torch.float64)
    # float32 weights folded for offsets ~3000 std lose ~3 digits: compare at that precision
    torch.testing.assert_close(raw.scores(X), standardised.scores(Z), rtol=1e-3, atol=1e-3)
    # the probe really applies to raw activations: score = x @ W.T + b
    torch.testing.assert_close(raw.scores(X), X @ raw.weight[0] + raw.bias[0])


def test_l2_grid_is_chosen_on_grouped_validation_and_refit():
    X, y, groups = make_task(d=40, n=1500, seed=11)
    probe = train_probe(X, y, groups=groups)
    assert probe.metadata["l2"] in (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
    assert len(probe.metadata["l2_val_loss"]) == 6
    assert probe.metrics["val"]["n"] == 300  # 30 of 150 texts, 10 rows each
    assert probe.metrics["train"]["n"] == 1500  # refit on train + val


def test_bf16_input_trains_without_touching_the_input():
    X, y, _ = make_task(d=16, n=1000, seed=2)
    xb = X.bfloat16()
    before = xb.clone()
    probe = train_probe(xb, y, l2=1e-3)
    assert torch.equal(xb, before) and probe.weight.dtype == torch.float32
    reference = train_probe(xb.float(), y, l2=1e-3)
    torch.testing.assert_close(probe.weight, reference.weight)
    assert probe.scores(xb[None, :5]).shape == (1, 5)  # any leading shape


def test_labels_can_be_strings_and_predictions_index_classes():
    X, y, _ = make_task(d=8, n=400, n_classes=3, sep=2.0, seed=4)
    names = [["cat", "dog", "eel"][i] for i in y.tolist()]
    probe = train_probe(X, names, kind="multinomial", l2=1e-3)
    assert probe.classes == ["cat", "dog", "eel"]
    assert evaluate(probe, X, names)["accuracy"] > 0.8
    with pytest.raises(ValueError, match="not among the probe's classes"):
        evaluate(probe, X[:2], ["cat", "fox"])
    with pytest.raises(ValueError, match="use kind='multinomial'"):
        train_probe(X, names, l2=1e-3)


def test_streaming_logistic_close_to_full_batch_and_refuses_generators():
    X, y, groups = make_task(d=20, n=4000, seed=9)
    tr, te = grouped_split(groups, 0.25, seed=0)
    full = evaluate(train_probe(X[tr], y[tr], l2=1e-3), X[te], y[te])["accuracy"]
    batches = [(X[tr][i : i + 100], y[tr][i : i + 100]) for i in range(0, tr.numel(), 100)]
    for optimizer in ("sgd", "adam"):
        probe = train_probe_streaming(batches, l2=1e-3, epochs=5, optimizer=optimizer, lr=0.03)
        assert abs(evaluate(probe, X[te], y[te])["accuracy"] - full) <= 0.02, optimizer
    with pytest.raises(TypeError, match="one-shot iterator"):
        train_probe_streaming(iter(batches))


def test_grouped_split_keeps_texts_together_and_is_reproducible():
    groups = torch.arange(1000) // 7
    tr, te = grouped_split(groups, 0.2, seed=3)
    assert set(groups[tr].tolist()).isdisjoint(groups[te].tolist())
    assert tr.numel() + te.numel() == 1000
    assert torch.equal(te, grouped_split(groups, 0.2, seed=3)[1])
    assert not torch.equal(te, grouped_split(groups, 0.2, seed=4)[1])
    names = [f"text{i // 7}" for i in range(1000)]
    assert grouped_split(names, 0.2, seed=3)[1].numel() in range(150, 250)
    with pytest.raises(ValueError, match="at least 2 distinct groups"):
        grouped_split([0] * 10, 0.2)


def test_per_row_split_leaks_text_identity_but_grouped_split_does_not():
    """Each text has a random offset shared by its tokens and one label; only a weak direction
    carries the label across texts. A row split lets the probe memorise texts."""
    g = torch.Generator().manual_seed(0)
    n_texts, per_text, d = 150, 12, 256
    text_label = torch.randint(0, 2, (n_texts,), generator=g)
    text_offset = 3.0 * torch.randn(n_texts, d, generator=g)
    signal = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    groups = torch.arange(n_texts).repeat_interleave(per_text)
    y = text_label[groups]
    X = (
        text_offset[groups]
        + (2.0 * y[:, None] - 1) * signal
        + 0.5 * torch.randn(n_texts * per_text, d, generator=g)
    )

    def held_out_accuracy(split):
        tr, te = split
        return evaluate(train_probe(X[tr], y[tr], l2=1e-4), X[te], y[te])["accuracy"]

    naive = held_out_accuracy(row_split(len(y), 0.25, seed=0))
    grouped = held_out_accuracy(grouped_split(groups, 0.25, seed=0))
    assert naive > 0.9
    assert grouped < 0.8
    assert naive - grouped > 0.2


def test_diff_means_is_the_mean_difference_thresholded_at_the_midpoint():
    X, y, _ = make_task(d=10, n=2000, sep=1.0, offset=5.0, seed=6)
    probe = diff_means(X, y)
    delta = X[y == 1].double().mean(0) - X[y == 0].double().mean(0)
    cosine = torch.nn.functional.cosine_similarity(probe.weight[0].double(), delta, dim=0)
    assert cosine > 0.99999 and probe.metadata["scale"] > 0
    midpoint = 0.5 * (X[y == 1].double().mean(0) + X[y == 0].double().mean(0))
    assert abs(float(probe.scores(midpoint.float()))) < 1e-4
    metrics = evaluate(probe, X, y)
    assert metrics["accuracy"] > 0.8 and metrics["ece"] < 0.05


def test_metrics_agree_with_sklearn():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (500,), generator=g)
    score = (y + torch.randn(500, generator=g)).round(decimals=1)  # many ties
    assert auroc(y, score) == pytest.approx(roc_auc_score(y.numpy(), score.numpy()))
    y3 = torch.randint(0, 4, (600,), generator=g)
    proba = torch.softmax(torch.randn(600, 4, generator=g) + torch.eye(4)[y3], dim=1)
    assert auroc(y3, proba) == pytest.approx(
        roc_auc_score(y3.numpy(), proba.numpy(), multi_class="ovr", average="macro")
    )
    pred = proba.argmax(1)
    assert f1(y3, pred, 4) == pytest.approx(f1_score(y3.numpy(), pred.numpy(), average="macro"))
    assert f1(y, (score > 0.5).long(), 2) == pytest.approx(f1_score(y.numpy(), score.numpy() > 0.5))
    assert balanced_accuracy(y3, pred) == pytest.approx(
        balanced_accuracy_score(y3.numpy(), pred.numpy())
    )
    conf, hit = proba.max(1).values.numpy(), (pred == y3).numpy()
    bins = np.minimum((conf * 10).astype(int), 9)
    ece = sum(abs(hit[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
              for b in range(10) if (bins == b).any())  # fmt: skip
    assert expected_calibration_error(y3, proba) == pytest.approx(ece)


# ---------------------------------------------------------------------------------------------
# attention probes


def middle_token_task(n: int, seed: int, T: int = 12, d: int = 8):
    """The label sits on one marked token somewhere in the middle; the rest is noise.
    Padding (right side, variable lengths) holds huge garbage values."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, T + 1, (n,), generator=g)
    X = torch.randn(n, T, d, generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    y = torch.randint(0, 2, (n,), generator=g)
    where = 2 + (torch.rand(n, generator=g) * (lengths - 4)).long()
    rows = torch.arange(n)
    X[rows, where, 0] += 4.0  # the marker
    X[rows, where, 1] = 2.0 * y - 1.0  # the label, only on the marked token
    X[~mask] = 1e4 * torch.randn(int((~mask).sum()), d, generator=g)
    return X, mask, y, lengths


@pytest.fixture(scope="module")
def attention_probe_and_data():
    X, mask, y, lengths = middle_token_task(600, seed=0)
    probe = train_attention_probe(X, y, mask=mask, epochs=15, lr=3e-2, n_heads=2)
    return probe, middle_token_task(400, seed=1), (X, mask, y, lengths)


def test_attention_probe_finds_a_middle_token_where_last_token_probe_fails(
    attention_probe_and_data,
):
    probe, (Xt, mt, yt, lt), (X, _, y, lengths) = attention_probe_and_data
    assert evaluate(probe, Xt, yt, mask=mt)["accuracy"] > 0.9
    last = train_probe(X[torch.arange(len(y)), lengths - 1], y, l2=1e-3)
    last_acc = evaluate(last, Xt[torch.arange(len(yt)), lt - 1], yt)["accuracy"]
    assert last_acc < 0.65


def test_attention_probe_ignores_padding_and_accepts_lists(attention_probe_and_data):
    probe, (Xt, mt, _, lt), _ = attention_probe_and_data
    scores = probe.scores(Xt, mask=mt)
    changed = Xt.clone()
    changed[~mt] = torch.randn(int((~mt).sum()), Xt.shape[-1]) * 1e6
    torch.testing.assert_close(probe.scores(changed, mask=mt), scores)
    as_list = [Xt[i, : lt[i]] for i in range(len(lt))]
    torch.testing.assert_close(probe.scores(as_list), scores, rtol=1e-5, atol=1e-5)
    weights = probe.attention(Xt, mask=mt)  # (N, H, T)
    assert float(weights[~mt[:, None, :].expand_as(weights)].abs().max()) == 0.0
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))


def test_attention_probe_defaults_read_the_organism_topic(tmp_path):
    """Default arguments (no lr/epochs/batch tuning) read the organism's topic, spread over the
    text, from every token's activations at a middle and the last layer."""
    from residtap import organism
    from residtap.probes.sweep import store_sequences

    if not (organism.MODEL_DIR / "config.json").is_file():
        pytest.skip(f"the organism checkpoint is absent ({organism.MODEL_DIR}/config.json); "
                    "train it with scripts/train_organism.sh")
    model, tok = organism.load()
    sites = ["layers.2", "layers.5"]
    store = residtap.extract(model, tok, organism.DATA_DIR / "topic.jsonl", sites,
                             tmp_path / "topic", positions="all", progress=False, batch_size=100)
    records = {r["sample"]: r for r in store.samples}
    for site in sites:
        x, mask, samples = store_sequences(store, site)  # (S, T, d), (S, T), (S,)
        labels = [records[int(s)]["label"] for s in samples]
        train = torch.tensor([records[int(s)]["split"] == "train" for s in samples])
        y_train = [v for v, t in zip(labels, train.tolist(), strict=True) if t]
        y_test = [v for v, t in zip(labels, train.tolist(), strict=True) if not t]
        probe = train_attention_probe(x[train], y_train, mask=mask[train],
                                      groups=samples[train].tolist(), progress=False)
        acc = evaluate(probe, x[~train], y_test, mask=mask[~train])["accuracy"]
        assert acc >= 0.95, (site, acc)


# ---------------------------------------------------------------------------------------------
# probe files


def all_probes() -> list[Probe | AttentionProbe]:
    X, y, _ = make_task(d=16, n=300, seed=1)
    X3, y3, _ = make_task(d=16, n=300, n_classes=3, seed=2)
    g = torch.Generator().manual_seed(0)
    attention = AttentionProbe(
        query=torch.randn(2, 16, generator=g), position_weight=torch.randn(2, generator=g),
        value=torch.randn(2, 3, 16, generator=g), bias=torch.randn(3, generator=g),
        classes=["a", "b", "c"], position="from_start", site="layers.1", label_column="topic",
        metrics={"val": {"accuracy": 0.5}}, metadata={"epochs": 3},
    )  # fmt: skip
    return [
        train_probe(X, y, l2=1e-2, site="layers.0", label_column="label"),
        train_probe(X3, y3, kind="multinomial", l2=1e-2),
        train_probe(X, X[:, 0] * 2.0, kind="ridge", l2=1e-2),
        diff_means(X, y.bool()),
        attention,
    ]


@pytest.mark.parametrize("index", range(5))
def test_probe_file_round_trip_is_exact(tmp_path, index):
    probe = all_probes()[index]
    probe.threshold = 0.25
    path = save_probe(probe, tmp_path / "p.safetensors")
    loaded = load_probe(path)
    assert type(loaded) is type(probe)
    names = ("query", "position_weight", "value", "bias") if probe.kind == "attention" else (
        "weight", "bias")  # fmt: skip
    for name in names:
        assert torch.equal(getattr(loaded, name), getattr(probe, name)), name
    for attr in ("kind", "classes", "site", "threshold", "label_column", "model", "metrics"):
        assert getattr(loaded, attr) == getattr(probe, attr), attr
    assert json.dumps(loaded.metadata, sort_keys=True) == json.dumps(
        probe.metadata, sort_keys=True, default=str
    )


def test_probe_file_format_is_pinned(tmp_path):
    probe = Probe(kind="logistic", weight=torch.tensor([[1.0, -2.0]]), bias=torch.tensor([0.5]),
                  classes=[0, 1], site="layers.3", metrics={"val": {"accuracy": 0.75}},
                  metadata={"l2": 0.01})  # fmt: skip
    path = save_probe(probe, tmp_path / "p.safetensors")
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert header.pop("__metadata__") == {
        "format": '"residtap.probe"', "format_version": "1", "kind": '"logistic"',
        "site": '"layers.3"', "d_model": "2", "n_outputs": "1", "classes": "[0, 1]",
        "label_column": "null", "threshold": "0.0", "metrics": '{"val": {"accuracy": 0.75}}',
        "model": "null", "metadata": '{"l2": 0.01}',
        "residtap_version": json.dumps(residtap.__version__),
    }  # fmt: skip
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == {
        "weight": ("F32", [1, 2]), "bias": ("F32", [1]),
    }  # fmt: skip


def tamper(path, tensors=None, **meta_changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        current = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.update({k: v for k, v in meta_changes.items() if v is not None})
    for k in [k for k, v in meta_changes.items() if v is None]:
        del meta[k]
    save_file(tensors if tensors is not None else current, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(tensors={"weight": torch.zeros(1, 16)}), "missing \\['bias'\\]"),
        (dict(tensors={"weight": torch.zeros(1, 15), "bias": torch.zeros(1)}), "shape"),
        (dict(d_model="17"), "shape"),
        (dict(kind='"quantum"'), "unknown probe kind"),
        (dict(format='"other.thing"'), "expected 'residtap.probe'"),
        (dict(format=None), "not a residtap probe"),
        (dict(format_version="2"), "upgrade residtap"),
        (dict(classes="[0, 1, 2]"), "cannot have classes"),
        (dict(threshold="{oops"), "not valid JSON"),
    ],
)
def test_tampered_probe_files_give_clear_errors(tmp_path, change, message):
    path = save_probe(all_probes()[0], tmp_path / "p.safetensors")
    tamper(path, **change)
    with pytest.raises(ValueError, match=message):
        load_probe(path)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_probe(path)


def test_loading_for_a_different_model_is_an_error(tmp_path):
    model = tiny_model("gpt2", layers=1, d=16)
    probe = all_probes()[0]
    path = save_probe(probe, tmp_path / "p.safetensors", model=model)
    assert load_probe(path, model=model).model["d_model"] == 16
    with pytest.raises(ValueError, match="config hash"):
        load_probe(path, model=tiny_model("gpt2", layers=2, d=16))
    with pytest.raises(ValueError, match="d_model=16 but the model's hidden_size is 32"):
        load_probe(path, model=tiny_model("gpt2", layers=1, d=32))
    with pytest.raises(ValueError, match="hidden_size is 32"):
        save_probe(probe, tmp_path / "q.safetensors", model=tiny_model("gpt2", layers=1, d=32))


def test_probe_made_on_another_checkpoint_is_refused_unless_allowed(tmp_path, caplog):
    """Regression: identity was once a config hash only, so another seed (checkpoint) was
    accepted."""
    model, other = tiny_model("gpt2", layers=1, d=16), tiny_model("gpt2", layers=1, d=16, seed=1)
    path = save_probe(all_probes()[0], tmp_path / "p.safetensors", model=model)
    assert load_probe(path, model=model).model["weights_fingerprint"]
    with pytest.raises(ValueError, match="other weights.*allow_other_weights=True"):
        load_probe(path, model=other)
    with caplog.at_level("WARNING"):
        probe = load_probe(path, model=other, allow_other_weights=True)
    assert "used anyway" in caplog.text and probe.model["weights_fingerprint"]


def test_probe_file_without_a_weights_fingerprint_loads_with_a_warning(tmp_path, caplog):
    model = tiny_model("gpt2", layers=1, d=16)
    path = save_probe(all_probes()[0], tmp_path / "p.safetensors", model=model)
    identity = load_probe(path).model
    del identity["weights_fingerprint"]  # as residtap wrote it before
    tamper(path, model=json.dumps(identity))
    with caplog.at_level("WARNING"):
        load_probe(path, model=tiny_model("gpt2", layers=1, d=16, seed=1))
    assert "no weights fingerprint" in caplog.text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_probe_files_with_nan_or_inf_are_refused(tmp_path, bad, name):
    path = save_probe(all_probes()[0], tmp_path / "p.safetensors")
    tensors = {"weight": torch.zeros(1, 16), "bias": torch.zeros(1)}
    tensors[name].view(-1)[0] = bad
    tamper(path, tensors=tensors)
    with pytest.raises(ValueError, match=f"tensor '{name}' of this probe file has 1 NaN/Inf"):
        load_probe(path)


def test_saving_to_an_unusable_path_is_a_clear_error(tmp_path):
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a folder"):
        save_probe(all_probes()[0], tmp_path / "folder.safetensors")
    with pytest.raises(ValueError, match="cannot be created.*is a file"):
        save_probe(all_probes()[0], tmp_path / "file" / "p.safetensors")
