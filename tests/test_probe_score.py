"""`residtap probe score PROBE_FILE MODEL --data F`: a saved probe's scores per
text, checked against the probe applied to the rows of a store that `residtap capture` wrote
from the same texts (another code path: store taps, the tokenizer's own padding side)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import tiny_model, word_tokenizer

from residtap.cli import main
from residtap.probes import load_probe, save_probe
from residtap.probes.attention import train_attention_probe
from residtap.probes.sweep import store_sequences
from residtap.store.reader import Store


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama folder, 14 texts of different lengths, and stores of them at layers.1."""
    root = tmp_path_factory.mktemp("score")
    model_dir = root / "model"
    tiny_model("llama", layers=2).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    rows = [{"id": f"t{i}", "text": " ".join(f"w{4 + (i * 5 + j) % 90}" for j in range(2 + i % 5)),
             "label": ["no", "yes"][i % 2], "split": "test" if i % 3 == 0 else "train"}
            for i in range(14)]
    data = root / "texts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stores = {}
    for positions in ("last", "all"):
        stores[positions] = root / f"store-{positions}"
        assert main(["capture", str(model_dir), "--data", str(data), "--sites", "layers.1",
                     "--positions", positions, "--batch-size", "4", "--out",
                     str(stores[positions]), "--json"]) == 0
    probe_file = root / "probe.safetensors"
    assert main(["probe", "train", str(stores["last"]), "--label", "label", "--site",
                 "layers.1", "--out", str(probe_file), "--json"]) == 0
    return {"model": model_dir, "data": data, "rows": rows, "stores": stores,
            "probe": probe_file}


def _score(capsys, setup, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["probe", "score", str(setup["probe"]), str(setup["model"]), "--data",
                 str(setup["data"]), "--batch-size", "3", *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_scores_per_text_equal_the_probe_on_the_store(setup, capsys):
    out = _score(capsys, setup)  # default positions: the store's ("last")
    probe = load_probe(setup["probe"])
    store = Store.open(setup["stores"]["last"])
    want = probe.scores(store["layers.1"].float())  # (14,)
    assert out["positions"] == "last" and out["texts"] == 14 and out["rows"] == 14
    got = torch.tensor([r["score"] for r in out["scores"]])
    assert torch.allclose(got, want, atol=1e-4)
    assert [r["id"] for r in out["scores"]] == [r["id"] for r in setup["rows"]]
    predicted = [probe.classes[int(s > probe.threshold)] for s in want.tolist()]
    assert [r["prediction"] for r in out["scores"]] == predicted
    assert torch.allclose(torch.tensor([r["probability"] for r in out["scores"]]),
                          torch.sigmoid(want), atol=1e-5)
    assert [r["label"] for r in out["scores"]] == [r["label"] for r in setup["rows"]]
    same = sum(p == r["label"] for p, r in zip(predicted, setup["rows"], strict=True))
    assert out["agreement"] == {"column": "label", "rows": 14, "accuracy": same / 14}


def test_scores_per_token_equal_the_probe_on_an_all_positions_store(setup, capsys):
    out = _score(capsys, setup, "--positions", "all")
    store = Store.open(setup["stores"]["all"])
    probe = load_probe(setup["probe"])
    want = probe.scores(store["layers.1"].float())  # (rows,)
    rows = store.rows
    assert [(r["sample"], r["position"]) for r in out["scores"]] == list(
        zip(rows["sample"].tolist(), rows["position"].tolist(), strict=True))
    assert torch.allclose(torch.tensor([r["score"] for r in out["scores"]]), want, atol=1e-4)
    assert out["scores"][0]["token"] == "<bos>"


def test_index_positions_count_from_each_texts_real_tokens(setup, capsys):
    out = _score(capsys, setup, "--positions", "0", "--positions", "-1")
    assert out["rows"] == 28
    lengths = [len(r["text"].split()) + 1 for r in setup["rows"]]  # + BOS
    assert [r["position"] for r in out["scores"]] == [
        p for n in lengths for p in (0, n - 1)]
    last = _score(capsys, setup, "--positions", "last")["scores"]
    assert [r["score"] for r in out["scores"][1::2]] == pytest.approx(
        [r["score"] for r in last], abs=1e-5)


def test_csv_and_jsonl_files_hold_every_row(setup, tmp_path, capsys):
    for name in ("scores.csv", "scores.jsonl"):
        out = tmp_path / name
        summary = _score(capsys, setup, "--out", str(out))
        assert summary["file"] == str(out) and "scores" not in summary
        if name.endswith(".csv"):
            with out.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            scores = [float(r["score"]) for r in rows]
        else:
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            scores = [r["score"] for r in rows]
        assert [r["id"] for r in rows] == [r["id"] for r in setup["rows"]]
        assert scores == pytest.approx(
            [r["score"] for r in _score(capsys, setup)["scores"]], abs=1e-6)
    assert main(["probe", "score", str(setup["probe"]), str(setup["model"]), "--data",
                 str(setup["data"]), "--out", str(tmp_path / "scores.txt")]) == 2
    assert ".jsonl or .csv" in capsys.readouterr().err


def test_table_without_out(setup, capsys):
    capsys.readouterr()
    assert main(["probe", "score", str(setup["probe"]), str(setup["model"]), "--data",
                 str(setup["data"])]) == 0
    text = capsys.readouterr().out
    assert "prediction" in text and "t13" in text and "14 score(s) on 14 text(s)" in text


def test_attention_probe_gives_one_row_per_text(setup, tmp_path, capsys):
    store = Store.open(setup["stores"]["all"])
    X, mask, samples = store_sequences(store, "layers.1")
    labels = [setup["rows"][int(s)]["label"] for s in samples]
    probe = train_attention_probe(X.float(), labels, mask=mask, n_heads=2, epochs=3,
                                  site="layers.1", label_column="label", progress=False)
    path = save_probe(probe, tmp_path / "attn.safetensors")
    capsys.readouterr()
    assert main(["probe", "score", str(path), str(setup["model"]), "--data",
                 str(setup["data"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 14 and {r["position"] for r in out["scores"]} == {None}
    want = probe.scores(X.float(), mask)
    assert torch.allclose(torch.tensor([r["score"] for r in out["scores"]]), want, atol=1e-4)
    assert main(["probe", "score", str(path), str(setup["model"]), "--data",
                 str(setup["data"]), "--positions", "last"]) == 2
    assert "attention probe" in capsys.readouterr().err


def test_a_probe_for_another_model_is_refused(setup, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_model("llama", layers=2, d=48).save_pretrained(other)
    word_tokenizer().save_pretrained(other)
    capsys.readouterr()
    assert main(["probe", "score", str(setup["probe"]), str(other), "--data",
                 str(setup["data"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "model" in err


def test_organism_probe_from_the_help_examples_agrees_with_labels(tmp_path, capsys):
    """On the bundled model a mood probe at layers.3 predicts the label of held-out texts."""
    store, probe = tmp_path / "acts", tmp_path / "mood.safetensors"
    assert main(["capture", "organism", "--data", "organism:mood", "--sites", "layers.3",
                 "--positions", "last", "--max-samples", "120", "--out", str(store),
                 "--json"]) == 0
    assert main(["probe", "train", str(store), "--label", "label", "--site", "layers.3",
                 "--out", str(probe), "--json"]) == 0
    capsys.readouterr()
    assert main(["probe", "score", str(probe), "organism", "--data", "organism:mood",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["texts"] == 600 and out["agreement"]["accuracy"] > 0.95


def test_positions_default_follows_the_store(setup, tmp_path, capsys):
    probe_all = tmp_path / "probe-all.safetensors"
    assert main(["probe", "train", str(setup["stores"]["all"]), "--label", "label", "--site",
                 "layers.1", "--out", str(probe_all), "--json"]) == 0
    capsys.readouterr()
    assert main(["probe", "score", str(probe_all), str(setup["model"]), "--data",
                 str(setup["data"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["positions"] == "all" and out["rows"] == len(Store.open(setup["stores"]["all"]))


def test_score_paths_are_independent_of_batching(setup, capsys):
    """A text scores the same alone and in a batch with longer texts (left padding and
    position ids over the real tokens)."""
    one = _score(capsys, setup, "--batch-size", "1")["scores"]
    many = _score(capsys, setup, "--batch-size", "14")["scores"]
    assert [r["score"] for r in one] == pytest.approx([r["score"] for r in many], abs=1e-5)



def test_probe_train_kind_attention_writes_a_file_score_and_the_bank_read(setup, tmp_path,
                                                                           capsys):
    """`probe train --kind attention` on the all-positions store: the file's probe equals the
    probe on the store's sequences (score: one row per text), and a bank reads the same file:
    its score after the prompt's last token equals the per-text score."""
    from residtap.probes.bank import ProbeBank

    path = tmp_path / "attention.safetensors"
    capsys.readouterr()
    assert main(["probe", "train", str(setup["stores"]["all"]), "--label", "label", "--site",
                 "layers.1", "--kind", "attention", "--heads", "2", "--epochs", "3", "--out",
                 str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "attention" and summary["test"]["n"] == 5  # 5 test texts
    probe = load_probe(path)
    assert probe.kind == "attention" and probe.n_heads == 2
    store = Store.open(setup["stores"]["all"])
    X, mask, _ = store_sequences(store, "layers.1")
    out = _score(capsys, {**setup, "probe": path})
    want = probe.scores(X.float(), mask)  # (14,)
    assert torch.allclose(torch.tensor([r["score"] for r in out["scores"]]), want, atol=1e-4)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    tok = AutoTokenizer.from_pretrained(setup["model"])
    tok.padding_side = "left"
    batch = tok([r["text"] for r in setup["rows"]], return_tensors="pt", padding=True)
    bank = ProbeBank().add_file(path)
    with torch.no_grad(), bank.attach(model, positions="last") as run:
        model(**batch)
    assert torch.allclose(run.results()["attention"][:, 0, 0], want, atol=1e-4)
    assert main(["probe", "train", str(setup["stores"]["last"]), "--label", "label", "--site",
                 "layers.1", "--kind", "attention", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "positions='all'" in capsys.readouterr().err


def test_sae_folders_and_probes_on_sae_features(setup, tmp_path, capsys):
    """An SAE folder scores its --features' activations (= SAE.encode's columns on the store's
    rows); a probe trained by `probe train` on a feature store (residtap.sae.store) scores like
    the probe on the encoded rows, given --sae, and refuses to run without it."""
    from residtap.sae import SAE, save_sae
    from residtap.sae.store import encode_store

    g = torch.Generator().manual_seed(0)
    d, n = 32, 40
    sae = SAE(torch.randn(d, n, generator=g) / 4, 0.1 * torch.randn(n, generator=g),
              torch.randn(n, d, generator=g), 0.1 * torch.randn(d, generator=g),
              site="layers.1")
    folder = save_sae(sae, tmp_path / "sae")
    store = Store.open(setup["stores"]["last"])
    capsys.readouterr()
    assert main(["probe", "score", str(folder), str(setup["model"]), "--data",
                 str(setup["data"]), "--features", "3,7,11", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = sae.encode(store["layers.1"].float())[:, [3, 7, 11]]
    assert out["kind"] == "sae features" and out["rows"] == 14
    assert torch.allclose(torch.tensor([r["score"] for r in out["scores"]]), want, atol=1e-4)
    assert "prediction" not in out["scores"][0]

    feats = encode_store(store, sae, tmp_path / "feats", features=[3, 7, 11, 20],
                         progress=False)
    probe_path = tmp_path / "on_features.safetensors"
    assert main(["probe", "train", str(feats.folder), "--label", "label", "--site",
                 "layers.1/sae", "--out", str(probe_path), "--json"]) == 0
    probe = load_probe(probe_path)
    assert probe.metadata["sae"]["features"] == [3, 7, 11, 20]
    capsys.readouterr()
    assert main(["probe", "score", str(probe_path), str(setup["model"]), "--data",
                 str(setup["data"]), "--sae", str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = probe.scores(feats["layers.1/sae"])
    assert out["kind"] == "logistic on SAE features" and out["agreement"]["rows"] == 14
    assert torch.allclose(torch.tensor([r["score"] for r in out["scores"]]), want, atol=1e-4)
    assert [r["prediction"] for r in out["scores"]] == [
        probe.classes[int(s > 0)] for s in want.tolist()]
    assert main(["probe", "score", str(probe_path), str(setup["model"]), "--data",
                 str(setup["data"])]) == 2
    assert "--sae FOLDER" in capsys.readouterr().err
