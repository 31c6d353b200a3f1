"""Probe sweeps over stores, `residtap probe sweep|train`, `residtap compare`, report plots
(and the rule that only the command line and the demo draw).

Tiny random models make the stores for the API and CLI tests; the bundled organism (skipped,
with the reason, while its checkpoint is absent) checks that a sweep finds each planted latent.
"""

from __future__ import annotations

import ast
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import residtap
from residtap.analysis import linear_cka, store_similarity
from residtap.cli import main
from residtap.probes import evaluate, load_probe, train_attention_probe
from residtap.probes.split_plan import plan_split
from residtap.probes.sweep import store_sequences, sweep
from residtap.report import heatmap_html, heatmap_png, line_html, line_png

SITES = ["embed", "layers.0", "layers.1"]
N_TEXTS = 48


def _rows(n: int = N_TEXTS, seed: int = 0) -> list[dict]:
    """Token-id texts whose last token gives the label away (so the embedding decodes it)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(5, 60, (5 + i % 4,), generator=g).tolist()
        ids[-1] = 70 + i % 2  # planted: the last token is 70 or 71
        rows.append({"id": f"t{i:03d}", "input_ids": ids, "label": ["neg", "pos"][i % 2],
                     "colour": ["red", "green", "blue"][i % 3], "score": i / 7,
                     "split": "test" if i % 8 in (0, 3) else "train"})
    return rows


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    model = tiny_model("llama", layers=2)
    other = tiny_model("llama", layers=2, seed=1)
    kw = dict(progress=False, batch_size=16)
    return {
        "last": residtap.extract(model, None, _rows(), SITES, root / "last", positions="last",
                                 **kw),
        "all": residtap.extract(model, None, _rows(), SITES, root / "all", positions="all", **kw),
        "other": residtap.extract(other, None, _rows(), SITES, root / "other", positions="last",
                                  **kw),
        "shuffled": residtap.extract(model, None, _rows()[::-1], SITES, root / "shuffled",
                                     positions="last", **kw),
    }


# ---------------------------------------------------------------------------------------------
# the sweep API


def test_sweep_uses_the_split_column_and_finds_the_planted_label(stores):
    result = sweep(stores["last"], "label", l2=1e-3, baseline=True, progress=False)
    assert result.site_names == SITES and result.kind == "logistic"
    assert result.split["train_texts"] == 36 and result.split["test_texts"] == 12
    assert "split" in result.split["source"]
    assert result.score("embed") == 1.0  # the last token's embedding is the label
    assert result.best.test["accuracy"] == 1.0 and result.chance == 0.5
    assert set(result.best.test) >= {"accuracy", "balanced_accuracy", "auroc", "f1", "ece"}
    assert all(s.baseline is not None for s in result.sites)
    assert result.probes["layers.1"].site == "layers.1"
    json.dumps(result.to_dict())  # JSON-safe


def test_sweep_on_all_positions_keeps_texts_whole(stores):
    store = stores["all"]
    plan = plan_split(store, "label", split_column=None, test_fraction=0.25, seed=3)
    train_texts = set(plan.groups[plan.train].tolist())
    test_texts = set(plan.groups[plan.test].tolist())
    assert not train_texts & test_texts and len(train_texts | test_texts) == N_TEXTS
    assert plan.train.numel() + plan.test.numel() == len(store) > N_TEXTS
    result = sweep(store, "label", ["embed"], split_column=None, test_fraction=0.25, seed=3,
                   l2=1e-2, progress=False)
    assert result.split["test_rows"] == plan.test.numel() and result.split["test_texts"] == 12


def test_sweep_kinds_auto(stores):
    multi = sweep(stores["last"], "colour", ["layers.1"], l2=1e-2, progress=False)
    assert multi.kind == "multinomial" and multi.classes == ["blue", "green", "red"]
    ridge = sweep(stores["last"], "score", ["layers.1"], l2=1e-2, progress=False)
    assert ridge.kind == "ridge" and ridge.metric == "r2" and "mse" in ridge.sites[0].test
    with pytest.raises(ValueError, match="logistic.*is binary.*multinomial"):
        sweep(stores["last"], "colour", kind="logistic", progress=False)


def test_unknown_label_and_site_are_clear_errors(stores):
    with pytest.raises(LookupError, match=r"'mood'.*available columns: \[.*'colour'.*'label'"):
        sweep(stores["last"], "mood", progress=False)
    with pytest.raises(LookupError, match="layers.9.*it holds"):
        sweep(stores["last"], "label", ["layers.9"], progress=False)


def test_store_sequences_match_the_rows(stores):
    store = stores["all"]
    x, mask, samples = store_sequences(store, "layers.0")
    assert x.shape[:2] == mask.shape and samples.tolist() == list(range(N_TEXTS))
    assert int(mask.sum()) == len(store)
    assert torch.equal(x[mask], store["layers.0"])  # rows in order, padding left out
    last = x[torch.arange(N_TEXTS), mask.sum(1) - 1]
    assert torch.equal(last, stores["last"]["layers.0"])


# ---------------------------------------------------------------------------------------------
# the CLI


def _svg_parses(path) -> None:
    text = path.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text and "<script src" not in text  # nothing from the network
    svg = re.search(r"<svg.*?</svg>", text, re.S)
    assert svg is not None
    ET.fromstring(svg.group(0))  # well-formed


def test_cli_probe_sweep_json_and_files(stores, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["probe", "sweep", str(stores["last"].folder), "--label", "label", "--sites",
            "embed,layers.1", "--baseline", "--out", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["best_site"] in ("embed", "layers.1") and report["best"] == 1.0
    assert [s["site"] for s in report["sites"]] == ["embed", "layers.1"]
    assert report["split"]["test_texts"] == 12 and report["kind"] == "logistic"
    assert set(report["files"]) == {"json", "html", "png"}
    assert json.loads((out / "sweep.json").read_text())["best_site"] == report["best_site"]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    _svg_parses(out / "sweep.html")


def test_cli_probe_sweep_table(stores, capsys):
    argv = ["probe", "sweep", str(stores["last"].folder), "--label", "colour", "--sites",
            "layers.0"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "multinomial" in text and "balanced_accuracy" in text and "best site: layers.0" in text


def test_cli_probe_train_round_trips(stores, tmp_path, capsys):
    store = stores["last"]
    path = tmp_path / "probe.safetensors"
    argv = ["probe", "train", str(store.folder), "--label", "label", "--site", "layers.1",
            "--out", str(path), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["site"] == "layers.1" and summary["test"]["n"] == 12
    probe = load_probe(path)
    assert probe.site == "layers.1" and probe.label_column == "label" and probe.kind == "logistic"
    assert probe.model == store.model and probe.classes == ["neg", "pos"]
    assert probe.metrics["test"] == summary["test"]
    x, y = store["layers.1"], store.labels("label")
    test = [s == "test" for s in store.labels("split")]
    again = evaluate(probe, x[torch.tensor(test)], [v for v, t in zip(y, test, strict=True) if t])
    assert again["accuracy"] == pytest.approx(summary["test"]["accuracy"])


def test_cli_unknown_label_lists_columns(stores, capsys):
    assert main(["probe", "sweep", str(stores["last"].folder), "--label", "mood"]) == 2
    err = capsys.readouterr().err
    assert "'mood'" in err and "available columns" in err and "'label'" in err


def test_cli_compare_self_has_unit_diagonal(stores, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(stores["last"].folder), "--json", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    m = torch.tensor(report["matrix"])
    assert m.shape == (3, 3) and report["sites_a"] == SITES
    assert torch.allclose(m.diagonal(), torch.ones(3, dtype=m.dtype), atol=1e-9)
    assert torch.allclose(m, m.T)
    assert (out / "compare.png").is_file()
    _svg_parses(out / "compare.html")


def test_streamed_cka_matches_in_memory_cka(stores):
    a, b = stores["last"], stores["other"]
    # a tiny budget and batch force one pass per pair and many batches
    result = store_similarity(a, b, method="cka_debiased", batch_rows=5, memory_budget=1,
                              progress=False)
    for i, sa in enumerate(SITES):
        for j, sb in enumerate(SITES):
            expected = linear_cka(a[sa], b[sb], debiased=True)
            assert result.matrix[i, j].item() == pytest.approx(expected, abs=1e-9)
    for method in ("svcca", "pwcca"):
        m = store_similarity(stores["all"], method=method, progress=False).matrix
        assert torch.allclose(m.diagonal(), torch.ones(3, dtype=m.dtype), atol=1e-6)


def test_cli_compare_refuses_misaligned_stores(stores, capsys):
    for other in ("all", "shuffled"):
        argv = ["compare", str(stores["last"].folder), str(stores[other].folder)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "not aligned" in err and "same data with the same positions" in err
    assert main(["compare", str(stores["last"].folder), str(stores["other"].folder)]) == 0
    assert "layers.1" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# report plots


def test_plots_handle_gaps_and_check_shapes(tmp_path):
    x = ["a", "b", "c"]
    series = {"one": [0.1, None, 0.9], "two": [0.2, math.nan, 0.5]}
    _svg_parses(line_html(tmp_path / "l.html", x, series, title="<t>", ylabel="acc",
                          dashed=("two",)))
    assert line_png(tmp_path / "l.png", [1, 2, 3], series).read_bytes()[:4] == b"\x89PNG"
    matrix = [[1.0, math.nan], [0.5, 0.25]]
    _svg_parses(heatmap_html(tmp_path / "h.html", matrix, ["r1", "r2"], ["c1", "c2"]))
    assert heatmap_png(tmp_path / "h.png", matrix, ["r1", "r2"], ["c1", "c2"]).is_file()
    with pytest.raises(ValueError, match="has 2 values but x has 3"):
        line_html(tmp_path / "x.html", x, {"bad": [1, 2]})
    with pytest.raises(ValueError, match="2 row labels"):
        heatmap_html(tmp_path / "x.html", matrix, ["r1", "r2"], ["c1"])


PICTURES = re.compile(r"^(matplotlib|residtap\.report|residtap\.\w+\.plot)(\.|$)")
DRAWERS = re.compile(r"^residtap\.(cli|demo)(\.|$)")


def _module_imports(root: Path) -> dict[str, set[str]]:
    """{module: every module name its import statements name, at any level (functions and
    TYPE_CHECKING blocks too)}, read with ast from the files under residtap/."""
    found = {}
    for path in sorted((root / "residtap").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[:-1]  # what a relative import starts from, for __init__.py too
        name = ".".join(parts if parts[-1] != "__init__" else package)
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against the importer's package
                    up = package[: len(package) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        found[name] = names
    return found


def test_feature_modules_draw_nothing():
    """The library knows no screen: sweeps, lens results and steerability results are data.
    Only the picture modules (report/, the features' plot.py) import matplotlib or the report,
    and only the command line and the demo import the picture modules."""
    imports = _module_imports(Path(__file__).parents[1])
    offenders = sorted(f"{module} imports {name}" for module, names in imports.items()
                       for name in names if PICTURES.match(name)
                       and not (PICTURES.match(module) or DRAWERS.match(module)))
    assert not offenders, (
        f"feature code draws: {offenders}; return data and let residtap/cli (or the demo) call "
        "the plot module")
    drawn = {name for module, names in imports.items() if DRAWERS.match(module)
             for name in names if PICTURES.match(name)}
    assert {"residtap.lens.plot", "residtap.probes.plot", "residtap.steering.plot"} <= drawn


# ---------------------------------------------------------------------------------------------
# the organism: planted latents


@pytest.fixture(scope="module")
def organism_stores(tmp_path_factory):
    from residtap import organism

    if not (organism.MODEL_DIR / "config.json").is_file():
        pytest.skip(f"the organism checkpoint is absent ({organism.MODEL_DIR}/config.json); "
                    "train it with scripts/train_organism.sh")
    model, tok = organism.load()
    root = tmp_path_factory.mktemp("organism")
    sites = ["embed"] + [f"layers.{i}" for i in range(model.config.num_hidden_layers)]
    kw = dict(progress=False, batch_size=100)
    stores = {name: residtap.extract(model, tok, organism.DATA_DIR / f"{name}.jsonl", sites,
                                     root / name, positions="last", **kw)
              for name in ("mood", "topic", "truth")}
    stores["topic_all"] = residtap.extract(model, tok, organism.DATA_DIR / "topic.jsonl", sites,
                                           root / "topic_all", positions="all", **kw)
    return stores


ORGANISM_L2 = [1e-2, 1e-4]  # a short grid keeps the test fast


@pytest.mark.parametrize("latent", ["mood", "topic", "truth"])
def test_sweep_finds_each_planted_latent(organism_stores, latent):
    from residtap import organism

    result = sweep(organism_stores[latent], "label", l2=ORGANISM_L2, progress=False)
    n_test = sum(r["split"] == "test" for r in organism.read_jsonl(latent))
    assert result.split["test_texts"] == n_test  # the data set's own split column
    best = result.best.test["accuracy"]
    embed = result.score("embed")
    print(f"{latent}: best {result.best_site} {best:.3f}, embed {embed:.3f}")
    assert best >= 0.95, result.table()
    assert embed <= best - 0.3  # the embedding gap: the last word is the same in every class
    if latent == "truth":
        assert embed <= 0.6  # near chance (0.5): no single word reveals the verdict


def test_attention_probe_reads_topic_spread_over_the_text(organism_stores):
    """Topic nouns sit in the middle of the text; the last token ('the') is the same for every
    topic. An attention probe over all tokens reads the topic wherever the last-token probe
    can, and also where it cannot (the embedding)."""
    store = organism_stores["topic_all"]
    linear = sweep(organism_stores["topic"], "label", l2=ORGANISM_L2, progress=False)
    records = {r["sample"]: r for r in store.samples}
    for site in ("embed", linear.best_site):  # default training settings at both
        x, mask, samples = store_sequences(store, site)
        labels = [records[int(s)]["label"] for s in samples]
        train = torch.tensor([records[int(s)]["split"] == "train" for s in samples])
        test = ~train
        y_train = [v for v, t in zip(labels, train.tolist(), strict=True) if t]
        y_test = [v for v, t in zip(labels, test.tolist(), strict=True) if t]
        probe = train_attention_probe(x[train], y_train, mask=mask[train],
                                      groups=samples[train].tolist(), progress=False)
        acc = evaluate(probe, x[test], y_test, mask=mask[test])["accuracy"]
        print(f"topic at {site}: attention {acc:.3f}, last-token linear "
              f"{linear.score(site):.3f}")
        assert acc >= linear.score(site) - 0.02  # matches: within 4 of 200 test texts
    assert linear.score("embed") <= 0.35  # chance is 0.25


@pytest.mark.parametrize("latent", ["mood", "topic", "truth"])
def test_organism_probe_accuracy_matches_sklearn(organism_stores, latent):
    """Same rows, same split, matched regularisation: sklearn's C = 1 / (l2 * n_train) on
    standardised features equals our l2 on the mean loss."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from residtap.probes import evaluate, train_probe

    store, site, l2 = organism_stores[latent], "layers.1", 1e-2
    x = store[site].float()
    labels, split = store.labels("label"), store.metadata("split")
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    train = torch.tensor([s == "train" for s in split])
    kind = "logistic" if len(classes) == 2 else "multinomial"
    probe = train_probe(x[train], y[train], kind=kind, l2=l2)
    ours = evaluate(probe, x[~train], y[~train])["accuracy"]
    scaler = StandardScaler().fit(x[train].numpy())
    clf = LogisticRegression(C=1 / (l2 * int(train.sum())), max_iter=10_000)
    clf.fit(scaler.transform(x[train].numpy()), y[train].numpy())
    ref = clf.score(scaler.transform(x[~train].numpy()), y[~train].numpy())
    print(f"{latent} at {site}: residtap {ours:.3f}, sklearn {ref:.3f}")
    assert abs(ours - ref) <= 0.01
