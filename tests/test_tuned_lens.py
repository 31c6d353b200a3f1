"""Tuned lens: untrained it is the logit lens exactly; trained on the organism's store it beats
the logit lens's KL to the final layer on held-out texts and on a generation; files round-trip
and refuse other models; bad stores are refused; the CLI trains and decodes with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import batch_ids, tiny_model

import residtap
from residtap import organism
from residtap.lens import LogitLens, TunedLens, train_tuned_lens


@pytest.fixture(scope="module")
def organism_store(tmp_path_factory):
    model, tok = organism.load()
    out = tmp_path_factory.mktemp("tuned") / "mood"
    store = residtap.extract(model, tok, organism.DATA_DIR / "mood.jsonl", "all-layers", out,
                             positions="all", progress=False)
    return model, tok, store


@pytest.fixture(scope="module")
def trained(organism_store):
    model, _, store = organism_store
    return train_tuned_lens(model, store, steps=150)


def test_untrained_tuned_lens_is_the_logit_lens():
    model = tiny_model("llama", layers=3)
    ids = batch_ids(2, 6)
    plain = LogitLens(model).run(ids, max_new_tokens=3, pad_token_id=0)
    identity = TunedLens.identity(model, ["layers.0", "layers.1"])
    tuned = LogitLens(model, translators=identity).run(ids, max_new_tokens=3, pad_token_id=0)
    assert torch.equal(tuned.topk_ids, plain.topk_ids)
    assert torch.equal(tuned.topk_probs, plain.topk_probs)
    assert torch.equal(tuned.kl, plain.kl)


def test_trained_translators_beat_the_logit_lens_on_held_out_texts(trained):
    assert set(trained.metrics) == {f"layers.{i}" for i in range(5)}  # all but the last
    for site, m in trained.metrics.items():
        assert m["held_out_rows"] > 100
        assert m["tuned_lens_kl"] < 0.5 * m["logit_lens_kl"], (site, m)


def test_tuned_lens_lowers_kl_on_a_generation_and_keeps_the_last_layer(organism_store, trained):
    model, tok, _ = organism_store
    prompts = ["today i am sad , and then the", "we are happy , and then the cake"]
    plain = residtap.run_lens(model, tok, prompts, max_new_tokens=6)
    tuned = residtap.run_lens(model, tok, prompts, max_new_tokens=6, translators=trained)
    real = plain.attention_mask.bool()
    for i in range(5):
        assert tuned.kl[i][real].mean() < plain.kl[i][real].mean(), i
    assert torch.equal(tuned.topk_ids[-1], plain.topk_ids[-1])  # the last layer: no translator
    assert torch.equal(tuned.kl[-1], plain.kl[-1])


def test_file_round_trip_and_refusals(organism_store, trained, tmp_path):
    model, _, _ = organism_store
    path = trained.save(tmp_path / "tuned.safetensors")
    back = TunedLens.load(path, model)
    assert back.sites == trained.sites and back.metrics == trained.metrics
    for s in trained.sites:
        assert torch.equal(back.A[s], trained.A[s]) and torch.equal(back.b[s], trained.b[s])
    other = tiny_model("llama", layers=3)
    with pytest.raises(ValueError, match="tuned lens was made on model"):
        TunedLens.load(path, other)
    with pytest.raises(ValueError, match="tuned lens was made on model"):
        LogitLens(other, translators=back)
    probe = tmp_path / "probe.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1, 4)}, str(probe), metadata={"format": "residtap.probe"})
    with pytest.raises(ValueError, match="not a tuned-lens file"):
        TunedLens.load(probe)
    with pytest.raises(FileNotFoundError, match="train one"):
        TunedLens.load(tmp_path / "missing.safetensors")


def test_bad_stores_are_refused(organism_store, tmp_path):
    model, tok, store = organism_store
    partial = residtap.extract(model, tok, organism.DATA_DIR / "mood.jsonl",
                               ["layers.0", "layers.1"], tmp_path / "partial",
                               positions="last", max_samples=20, progress=False)
    with pytest.raises(ValueError, match="not 'layers.5'.*all-layers"):
        train_tuned_lens(model, partial)
    with pytest.raises(ValueError, match="store was made on model"):
        train_tuned_lens(tiny_model("llama", layers=3), store)
    with pytest.raises(ValueError, match="must be stored sites"):
        train_tuned_lens(model, store, sites=["layers.9"])


def test_softcapped_readout_trains(tmp_path):
    """Gemma 2's final soft-cap is applied out of place while training (gradients flow)."""
    model = tiny_model("gemma2", layers=2)
    data = batch_ids(24, 8).tolist()
    store = residtap.extract(model, None, data, "all-layers", tmp_path / "g", progress=False)
    lens = train_tuned_lens(model, store, steps=30, lr=1e-2)
    m = lens.metrics["layers.0"]
    assert m["tuned_lens_kl"] < m["logit_lens_kl"]
    assert all(p.requires_grad for p in model.parameters())  # frozen only while training


def test_cli_trains_and_decodes(organism_store, tmp_path, capsys):
    from residtap.cli import main

    _, _, store = organism_store
    out = tmp_path / "t.safetensors"
    assert main(["tuned-lens", "organism", "--store", str(store.folder), "--out", str(out),
                 "--steps", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["site"] for r in report["sites"]] == [f"layers.{i}" for i in range(5)]
    assert main(["lens", "organism", "--prompt", "the cook", "--max-new-tokens", "3",
                 "--out", str(tmp_path / "lens"), "--tuned", str(out), "--json"]) == 0
    lens = json.loads(capsys.readouterr().out)
    assert len(lens["sites"]) == 6 and (tmp_path / "lens" / "lens.html").is_file()


def _saved(tmp_path, model, **change) -> Path:
    """An untrained lens of `model` saved, with tensors or metadata changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = TunedLens.identity(model, ["layers.0", "layers.1"]).save(tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors |= change.pop("tensors", {})
    meta |= change
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(("change", "match"), [
    (dict(tensors={"A.layers.1": torch.full((32, 32), float("nan"))}),
     "tensor 'A.layers.1' of this tuned-lens file has 1024 NaN/Inf"),
    (dict(tensors={"b.layers.0": torch.tensor([float("inf")] * 32)}), "'b.layers.0'.*NaN/Inf"),
    (dict(tensors={"A.layers.1": torch.zeros(32, 31)}),
     "translator of site 'layers.1' is A \\(32, 31\\)"),
    (dict(sites='["layers.0", "layers.9"]'), "tensors .* do not match its sites"),
    (dict(sites="[layers.0"), "metadata 'sites' is not valid JSON"),
    (dict(metrics="[]"), "metadata 'metrics' is"),
])
def test_damaged_tuned_lens_files_fail_at_load(tmp_path, change, match):
    """Before: NaN loaded, and a translator of the wrong shape failed only mid-lens."""
    model = tiny_model("llama", layers=3)
    path = _saved(tmp_path, model, **change)
    with pytest.raises(ValueError, match=match):
        TunedLens.load(path)


def test_tuned_lens_for_a_site_the_model_lacks_or_other_weights_is_refused(tmp_path):
    model = tiny_model("llama", layers=3)
    lens = TunedLens({"layers.7": torch.zeros(32, 32)}, {"layers.7": torch.zeros(32)},
                     residtap.identity.model_identity(model))
    path = lens.save(tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="translator for site 'layers.7', which this model lacks"):
        TunedLens.load(path, model)
    path = TunedLens.identity(model, ["layers.0"]).save(tmp_path / "u.safetensors")
    other = tiny_model("llama", layers=3, seed=1)
    with pytest.raises(ValueError, match="tuned lens was made on other weights"):
        TunedLens.load(path, other)
    allowed = TunedLens.load(path, other, allow_other_weights=True)
    LogitLens(other, translators=allowed)  # the override holds for this model from now on


def test_unusable_output_paths_are_refused_before_training(organism_store, tmp_path,
                                                           monkeypatch):
    model, _, store = organism_store
    steps = []
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1))
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for out, match in ((tmp_path / "folder", "is a folder"),
                       (tmp_path / "file" / "t.safetensors", "cannot be created.*is a file")):
        with pytest.raises(ValueError, match=match):
            train_tuned_lens(model, store, steps=2, out=out)
    assert steps == []
    lens = train_tuned_lens(model, store, steps=1, out=tmp_path / "new" / "t.safetensors")
    assert TunedLens.load(tmp_path / "new" / "t.safetensors", model).sites == lens.sites


def test_version_1_tuned_lens_files_still_load(tmp_path):
    """Version 1 (session 2): format "residtap.tuned_lens/1", no format_version."""
    import json

    from safetensors.torch import save_file

    from residtap.lens import TunedLens

    model = tiny_model("llama", layers=3)
    A, b = torch.randn(32, 32) * 0.01, torch.randn(32) * 0.01
    meta = {"format": "residtap.tuned_lens/1", "sites": json.dumps(["layers.0"]),
            "model": "null", "metrics": "{}"}
    save_file({"A.layers.0": A, "b.layers.0": b}, str(tmp_path / "old.safetensors"),
              metadata=meta)
    lens = TunedLens.load(tmp_path / "old.safetensors", model)
    assert torch.equal(lens.A["layers.0"], A) and lens.sites == ["layers.0"]
