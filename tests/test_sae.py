"""SAEs in SAELens's format (residtap.sae): the encoding formula against a hand-written float64
reference, folders written by SAELens itself (tests/data/saelens, made by make_fixtures.py with
sae-lens 6.54.12) against SAELens's own outputs, a folder built here from the documented layout,
selected features and packed columns against the full encoding, writing, and bad files."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from residtap.sae import SAE, check_model, load_sae, save_sae, site_of_hook
from residtap.sae import model as sae_model

FIXTURES = Path(__file__).parent / "data" / "saelens"
D_IN, D_SAE = 8, 24


def random_sae(architecture: str, *, seed: int = 0, apply_b_dec: bool = True, k: int = 5,
               rescale: bool = False, dtype=torch.float64) -> SAE:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.5):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return SAE(W_enc=r(D_IN, D_SAE), b_enc=r(D_SAE), W_dec=r(D_SAE, D_IN), b_dec=r(D_IN),
               architecture=architecture,
               threshold=r(D_SAE, scale=0.3).abs() if architecture == "jumprelu" else None,
               k=k if architecture == "topk" else None, rescale_acts_by_decoder_norm=rescale,
               apply_b_dec_to_input=apply_b_dec, site="layers.1").to(dtype=dtype)


def reference_encode(sae: SAE, h: torch.Tensor) -> torch.Tensor:
    """The format's formula, one row and one feature at a time, in float64."""
    W_enc, b_enc, W_dec, b_dec = (t.double() for t in (sae.W_enc, sae.b_enc, sae.W_dec,
                                                        sae.b_dec))
    out = torch.zeros(h.shape[0], sae.d_sae, dtype=torch.float64)
    for n, row in enumerate(h.double()):
        x = row - b_dec if sae.apply_b_dec_to_input else row
        pre = [float(x @ W_enc[:, i]) + float(b_enc[i]) for i in range(sae.d_sae)]
        if sae.architecture == "topk" and sae.rescale_acts_by_decoder_norm:
            pre = [p * math.sqrt(float((W_dec[i] ** 2).sum())) for i, p in enumerate(pre)]
        for i, p in enumerate(pre):
            if sae.architecture == "standard":
                out[n, i] = max(p, 0.0)
            elif sae.architecture == "jumprelu":
                out[n, i] = p if (p > float(sae.threshold[i]) and p > 0) else 0.0
        if sae.architecture == "topk":
            for i in sorted(range(sae.d_sae), key=lambda i: -pre[i])[: sae.k]:
                out[n, i] = max(pre[i], 0.0)
    return out


CASES = {
    "relu": dict(architecture="standard"),
    "relu_no_b_dec": dict(architecture="standard", apply_b_dec=False),
    "jumprelu": dict(architecture="jumprelu"),
    "topk": dict(architecture="topk", k=5),
    "topk_rescaled": dict(architecture="topk", k=3, rescale=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "small_chunks"])
def test_encode_equals_float64_reference(case, chunked, monkeypatch):
    if chunked:  # several row and feature chunks, so TopK merges candidates across chunks
        monkeypatch.setattr(sae_model, "_ROWS", 5)
        monkeypatch.setattr(sae_model, "_FEATURES", 7)
    sae = random_sae(**CASES[case], seed=1)
    h = torch.randn(3, 6, D_IN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    acts = sae.encode(h)
    assert acts.shape == (3, 6, D_SAE)
    ref = reference_encode(sae, h.reshape(-1, D_IN)).reshape(3, 6, D_SAE)
    torch.testing.assert_close(acts, ref, atol=1e-12, rtol=1e-12)
    assert (acts > 0).any() and (acts == 0).any()  # the activation did something
    if case.startswith("topk"):
        assert ((acts != 0).sum(-1) <= sae.k).all()
    scale = sae.W_dec.norm(dim=-1) if sae.rescale_acts_by_decoder_norm else 1.0
    torch.testing.assert_close(sae.decode(acts), (acts / scale) @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("case", list(CASES))
def test_selected_features_and_packed_columns_equal_the_full_encoding(case):
    sae = random_sae(**CASES[case], seed=3).to(dtype=torch.float32)
    h = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(4))
    full = sae.encode(h)
    idx = [17, 2, 2, 23, 0]  # unsorted, repeated
    torch.testing.assert_close(sae.encode_features(h, idx), full[:, idx], atol=1e-6, rtol=1e-6)
    if sae.architecture == "topk":
        with pytest.raises(ValueError, match="among the k=.* largest"):
            sae.packed(idx)
        pk = sae.packed()  # all features: TopK is exact over the packed columns
        torch.testing.assert_close(pk.activate(h @ pk.weight.T + pk.bias), full,
                                   atol=1e-5, rtol=1e-5)
        approx = sae.packed(idx, approximate_topk=True)
        pre = sae.encode_features(h, idx)
        got = approx.activate(h @ approx.weight.T + approx.bias)
        on = pre > 0  # where TopK kept the feature, relu(pre) is the same number
        torch.testing.assert_close(got[on], pre[on], atol=1e-5, rtol=1e-5)
        return
    pk = sae.packed(idx)
    assert pk.weight.shape == (5, D_IN) and pk.bias.shape == (5,)
    torch.testing.assert_close(pk.activate(h @ pk.weight.T + pk.bias), full[:, idx],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["standard", "jumprelu", "topk", "topk_rescaled",
                                  "no_b_dec_input", "layer_norm", "constant_norm_rescale",
                                  "pre6_topk"])
def test_folders_written_by_saelens_encode_as_saelens_does(name):
    folder = FIXTURES / name
    expected = load_file(folder / "expected.safetensors")
    sae = load_sae(folder, site="layers.0")
    torch.testing.assert_close(sae.encode(expected["x"]), expected["acts"], atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(sae.reconstruct(expected["x"]), expected["out"], atol=1e-5,
                               rtol=1e-5)
    assert (expected["acts"] > 0).any() and (expected["acts"] == 0).any()


def test_hook_names_map_to_sites_only_where_unambiguous(caplog):
    assert load_sae(FIXTURES / "standard").site == "layers.3"  # blocks.3.hook_resid_post
    assert load_sae(FIXTURES / "jumprelu").site == "embed"  # blocks.0.hook_resid_pre
    assert load_sae(FIXTURES / "pre6_topk").site == "layers.1"  # hook_point blocks.2...pre
    assert site_of_hook("blocks.5.hook_resid_pre") == "layers.4"
    for hook in ("blocks.3.hook_resid_mid", "blocks.3.hook_mlp_out", "model.layers.3", None):
        assert site_of_hook(hook) is None
    with pytest.raises(LookupError, match="pass site="):
        load_sae(FIXTURES / "topk")  # SAELens wrote no hook name
    assert load_sae(FIXTURES / "topk", site="layers.2").site == "layers.2"
    with caplog.at_level("WARNING"):
        assert load_sae(FIXTURES / "standard", site="layers.5").site == "layers.5"
    assert "using site='layers.5' as given" in caplog.text


def test_per_row_normalisation_encodes_but_does_not_pack():
    sae = load_sae(FIXTURES / "layer_norm", site="layers.0")
    with pytest.raises(ValueError, match="not an affine map"):
        sae.packed([0, 1])
    with pytest.raises(ValueError, match="reconstruct"):
        sae.decode(torch.zeros(1, D_SAE))


def documented_folder(tmp_path: Path, sae: SAE, **cfg_extra) -> Path:
    """A v6 folder built from SAELens's documented layout, without SAELens or save_sae."""
    folder = tmp_path / "documented"
    folder.mkdir(exist_ok=True)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    save_file({k: v.float().contiguous() for k, v in tensors.items()},
              folder / "sae_weights.safetensors")
    cfg = {"architecture": sae.architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": sae.apply_b_dec_to_input,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "m", "hook_name": "blocks.2.hook_resid_post",
                        "sae_lens_version": "6.3.0"}}
    if sae.architecture == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm)
    cfg.update(cfg_extra)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("case", ["relu", "jumprelu", "topk"])
def test_folder_in_the_documented_layout_loads_and_encodes_identically(tmp_path, case):
    sae = random_sae(**CASES[case], seed=5).to(dtype=torch.float32)
    loaded = load_sae(documented_folder(tmp_path, sae))
    assert loaded.site == "layers.2" and loaded.model_name == "m"
    h = torch.randn(10, D_IN, generator=torch.Generator().manual_seed(6))
    assert torch.equal(loaded.encode(h), sae.encode(h))


@pytest.mark.parametrize("case", ["relu", "jumprelu", "topk_rescaled"])
def test_save_then_load_is_identical_and_atomic(tmp_path, case):
    sae = random_sae(**CASES[case], seed=7).to(dtype=torch.float32)
    sae.info = {"note": "kept"}
    folder = save_sae(sae, tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["residtap"]["site"] == "layers.1" and cfg["residtap"]["note"] == "kept"
    assert cfg["architecture"] == sae.architecture and cfg["dtype"] == "float32"
    back = load_sae(folder)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        a, b = getattr(sae, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b)
    assert (back.site, back.k, back.info) == (sae.site, sae.k, {"note": "kept"})


def test_an_interrupted_save_leaves_the_old_files(tmp_path, monkeypatch):
    old = random_sae("standard", seed=8).to(dtype=torch.float32)
    folder = save_sae(old, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_sae(random_sae("jumprelu", seed=9).to(dtype=torch.float32), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no .tmp, old bytes


def test_saelens_loads_what_residtap_writes(tmp_path):
    sae_lens = pytest.importorskip(
        "sae_lens", reason="sae-lens is not installed (it is no residtap dependency); the "
        "folders it wrote are checked above from tests/data/saelens")
    for case in ("relu", "jumprelu", "topk_rescaled"):
        sae = random_sae(**CASES[case], seed=10).to(dtype=torch.float32)
        folder = save_sae(sae, tmp_path / case)
        theirs = sae_lens.SAE.load_from_disk(str(folder))
        h = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(h), sae.encode(h), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(theirs(h), sae.reconstruct(h), atol=1e-6, rtol=1e-6)


def test_bad_folders_give_clear_errors(tmp_path):
    sae = random_sae("jumprelu", seed=12).to(dtype=torch.float32)

    def fresh(**cfg_extra) -> Path:
        folder = documented_folder(tmp_path, sae, **cfg_extra)
        return folder

    with pytest.raises(FileNotFoundError, match="expected an SAE folder with cfg.json"):
        load_sae(tmp_path / "nothing")
    folder = fresh()
    tensors = load_file(folder / "sae_weights.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "threshold"},
              folder / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"missing \['threshold'\]"):
        load_sae(folder)
    folder = fresh()
    save_file({**tensors, "W_enc": tensors["W_enc"].T.contiguous()},
              folder / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"W_enc has shape \(24, 8\) \(stored transposed\?\), "
                                         r"expected \(8, 24\)"):
        load_sae(folder)
    folder = fresh()
    bad = tensors["b_enc"].clone()
    bad[3] = math.nan
    save_file({**tensors, "b_enc": bad}, folder / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="'b_enc' of this SAE has 1 NaN/Inf"):
        load_sae(folder)
    folder = fresh()
    save_file({**tensors, "log_threshold": tensors["threshold"].log()},
              folder / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="unexpected \\['log_threshold'\\].*training checkpoint"):
        load_sae(folder)
    with pytest.raises(ValueError, match="architecture 'gated' is not supported"):
        load_sae(fresh(architecture="gated"))
    folder = fresh(metadata={"sae_lens_version": "5.0.0"}, activation_fn="tanh-relu")
    with pytest.raises(ValueError, match="activation_fn 'tanh-relu' is not supported"):
        load_sae(folder)
    with pytest.raises(ValueError, match="per-head SAEs"):
        load_sae(fresh(reshape_activations="hook_z"))
    with pytest.raises(ValueError, match="dtype 'float8' is unknown"):
        load_sae(fresh(dtype="float8"))
    with pytest.raises(ValueError, match="normalize_activations 'whiten' is not supported"):
        load_sae(fresh(normalize_activations="whiten"))
    folder = fresh()
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sae(folder)
    folder = fresh()
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no SAE weights file"):
        load_sae(folder)
    shutil.rmtree(folder)
    with pytest.raises(ValueError, match="expected activations \\(..., d_in=8\\)"):
        sae.encode(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="feature indices must be in 0..23"):
        sae.encode_features(torch.zeros(2, D_IN), [24])


def test_model_checks_d_in_and_the_recorded_identity(tmp_path):
    from transformers import LlamaForCausalLM

    from residtap import organism

    model, _ = organism.load()
    with pytest.raises(ValueError, match="d_in=8 .* hidden size is 128"):
        check_model(random_sae("standard"), model)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    sae = SAE(W_enc=torch.randn(d, 16, generator=g), b_enc=torch.zeros(16),
              W_dec=torch.randn(16, d, generator=g), b_dec=torch.zeros(d), site="layers.4")
    folder = save_sae(sae, tmp_path / "sae", model=model)
    assert load_sae(folder, model=model).model["config_hash"] is not None
    torch.manual_seed(0)
    other = LlamaForCausalLM(model.config)  # same config, other weights
    with pytest.raises(ValueError, match="other weights"):
        load_sae(folder, model=other)
    load_sae(folder, model=other, allow_other_weights=True)


def test_shipped_organism_sae_reconstructs_and_reads_mood():
    """The SAE in residtap/organism/sae, on texts it was not trained on (the data sets' test
    split), with activations from HF's own hidden_states (block 4's output) and AUROC from
    scikit-learn. Measured when shipped: explained variance 0.998, L0 8, mood AUROC 1.000."""
    from sklearn.metrics import roc_auc_score

    from residtap import organism

    model, tok = organism.load()
    sae = load_sae(Path(organism.__file__).parent / "sae", model=model)  # identity checked
    assert (sae.site, sae.architecture, sae.d_in, sae.d_sae, sae.k) == (
        "layers.4", "topk", 128, 512, 8)
    rows = [{**r, "set": name} for name in ("mood", "topic", "truth", "early_exit")
            for r in organism.read_jsonl(name) if r["split"] == "test"]
    batch = tok([r["text"] for r in rows], padding=True, return_tensors="pt")  # left padding
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[5]  # (B, T, 128)
    real = batch["attention_mask"].bool()
    real[torch.arange(len(rows)), real.long().argmax(1)] = False  # drop <bos>, as in training
    X = hidden[real]  # (N, 128)
    assert X.shape[0] > 5000
    rec = sae.reconstruct(X)
    explained = 1 - float((rec - X).pow(2).sum() / (X - X.mean(0)).pow(2).sum())
    assert explained > 0.99, explained
    assert float((sae.encode(X) > 0).sum(-1).double().mean()) <= 8
    mood = [i for i, r in enumerate(rows) if r["set"] == "mood"]
    last = hidden[mood, -1]  # the probe position: the last token (left padding)
    for mood_class in ("positive", "negative"):
        feature = sae.info["latent_features"]["mood"][mood_class][0]["feature"]  # chosen on train
        acts = sae.encode_features(last, [feature])[:, 0]
        score = roc_auc_score([rows[i]["label"] == mood_class for i in mood], acts.numpy())
        assert score > 0.95, (mood_class, feature, score)
