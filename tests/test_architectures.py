"""Any decoder family, table entry or not: every canonical site equals what Hugging Face and a
hand-made hook say, sublayers equal the module a person would name, parts a family lacks are
refused with the reason, and the lens's last layer is the model's own distribution.

The expected module of each sublayer below is written by hand from each family's modeling
code; it is the oracle the discovered (or table) parts are held against."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, batch_ids, family_model

import residtap
from residtap.arch import ARCHITECTURES, find
from residtap.lens import LogitLens, readout_of
from residtap.sites import blocks, num_layers

# family -> (ln1, attn, ln2, mlp) relative to a block; None: the family has no such part.
# ln1/ln2 name the norm whose output attention/the MLP reads; attn/mlp what the block adds.
EXPECTED = {
    "llama": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    "qwen3": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    "gemma2": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm"),
    "gpt2": ("ln_1", "attn", "ln_2", "mlp"),
    "gpt_neox_parallel": ("input_layernorm", "attention", "post_attention_layernorm", "mlp"),
    "gpt_neox_sequential": ("input_layernorm", "attention", "post_attention_layernorm", "mlp"),
    "opt_pre_ln": ("self_attn_layer_norm", "self_attn", "final_layer_norm", "fc2"),
    "opt_post_ln": (None, "self_attn", "self_attn_layer_norm", "fc2"),
    "phi": ("input_layernorm", "self_attn", None, "mlp"),
    "phi3": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    "olmo": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    "olmo2": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
    "falcon_parallel": ("input_layernorm", "self_attention", None, "mlp"),
    "falcon_new_arch": ("ln_attn", "self_attention", "ln_mlp", "mlp"),
    "falcon_sequential": ("input_layernorm", "self_attention", "post_attention_layernorm",
                          "mlp"),
    "mixtral": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    "qwen2_moe": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    "gptj": ("ln_1", "attn", None, "mlp"),
    "bloom": ("input_layernorm", "self_attention.dense", "post_attention_layernorm",
              "mlp.dense_4h_to_h"),
    "cohere": ("input_layernorm", "self_attn", None, "mlp"),
    "granite": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    "starcoder2": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    "stablelm": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
}
# The module whose input is "the MLP's input" (ln2's oracle), where it is not `mlp`.
MLP_INPUT = {"opt_pre_ln": "fc1", "opt_post_ln": "fc1", "bloom": "mlp", "gemma2": "mlp",
             "olmo2": "mlp"}
ATTN_MODULE = {"gemma2": "self_attn", "olmo2": "self_attn", "bloom": "self_attention"}
RESIDUAL_SCALE = {"granite": 0.5}
POST_LN = {"opt_post_ln"}  # out != in + attn + mlp (norms between the adds)
# Families that had no table entry before discovery existed must be found without one.
DISCOVERED = {"phi", "olmo", "olmo2", "falcon_parallel", "falcon_new_arch", "falcon_sequential",
              "mixtral", "qwen2_moe", "gptj", "bloom", "cohere", "granite", "starcoder2",
              "stablelm"}


def close(a, b, atol=1e-5):
    return torch.allclose(a.float().reshape(b.shape), b.float(), atol=atol, rtol=1e-4)


def hand_hooks(model, paths: dict[str, tuple[str, str]]):
    """Plain PyTorch hooks recording module inputs ('in') or outputs ('out'), cloned at once."""
    seen, handles = {}, []
    for key, (path, which) in paths.items():
        module = model.get_submodule(path)
        if which == "in":
            def hook(m, args, kwargs, key=key):
                x = args[0] if args else kwargs["hidden_states"]
                seen.setdefault(key, x.detach().clone())
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            def hook(m, args, out, key=key):
                y = out[0] if isinstance(out, tuple) else out
                seen.setdefault(key, y.detach().clone())
            handles.append(module.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_embed_blocks_norm_logits_equal_hf(family):
    model = family_model(family)
    ids = batch_ids(2, 6)
    found = find(model)
    assert found.origin == ("discovered" if family in DISCOVERED else "table")
    if family in DISCOVERED:
        assert getattr(model.config, "model_type", None) not in ARCHITECTURES
    L = num_layers(model)
    sites = ["embed", *[f"layers.{i}" for i in range(L)], "logits"]
    has_norm = family != "opt_post_ln"
    if has_norm:
        sites.append("norm")
    else:
        with pytest.raises(LookupError, match="no final norm"):
            residtap.capture(model, ["norm"])
    with torch.no_grad(), residtap.capture(model, sites) as acts:
        out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == L + 1
    assert close(acts["embed"], hs[0])
    for i in range(L - 1):
        assert close(acts[f"layers.{i}"], hs[i + 1]), f"layers.{i}"
    if has_norm:  # HF's last entry is the final norm's output, not the last block's
        assert close(acts["norm"], hs[L])
    assert torch.equal(acts["logits"], out.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_sublayers_equal_the_named_modules_or_are_refused(family):
    model = family_model(family)
    ids = batch_ids(2, 6)
    ln1, attn, ln2, mlp = EXPECTED[family]
    if family == "mixtral" and not hasattr(blocks(model)[0], "mlp"):
        mlp = "block_sparse_moe"  # transformers 4.x names Mixtral's MoE block so
    L = num_layers(model)
    prefix = [p for p, m in model.named_modules() if m is blocks(model)][0]
    parts = {"ln1": ln1, "attn": attn, "ln2": ln2, "mlp": mlp}
    oracle: dict[str, tuple[str, str]] = {}
    for i in range(L):
        block = f"{prefix}.{i}"
        if ln1:  # what attention reads
            oracle[f"layers.{i}.ln1"] = (f"{block}.{ATTN_MODULE.get(family, attn)}", "in")
        if ln2:  # what the MLP reads
            oracle[f"layers.{i}.ln2"] = (f"{block}.{MLP_INPUT.get(family, mlp)}", "in")
        for part in ("attn", "mlp"):
            oracle[f"layers.{i}.{part}"] = (f"{block}.{parts[part]}", "out")
        oracle[f"in.{i}"] = (block, "in")
        oracle[f"out.{i}"] = (block, "out")
    sites = [s for s in oracle if s.startswith("layers.")]
    for part, rel in parts.items():
        if rel is None:
            with pytest.raises(LookupError, match=f"layers.0.{part}"):
                residtap.capture(model, [f"layers.0.{part}"])
    seen, handles = hand_hooks(model, oracle)
    try:
        with torch.no_grad(), residtap.capture(model, sites) as acts:
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    for site in sites:
        assert close(acts[site], seen[site]), site
    if family in POST_LN:
        return
    s = RESIDUAL_SCALE.get(family, 1.0)
    for i in range(L):  # closed form: out = in + s * (attn + mlp)
        summed = seen[f"in.{i}"] + s * (acts[f"layers.{i}.attn"] + acts[f"layers.{i}.mlp"])
        assert close(summed, seen[f"out.{i}"], atol=1e-4), f"residual identity, block {i}"


def test_falcon_mlp_is_copied_before_the_model_adds_attention_into_it():
    """Falcon's parallel block does `mlp_output += attention_output` in place: a capture that
    kept the module's output tensor would hold mlp + attn."""
    model = family_model("falcon_parallel")
    assert find(model).copy == frozenset({"mlp"})
    seen, handles = hand_hooks(model, {"mlp": ("transformer.h.0.mlp", "out"),
                                       "attn": ("transformer.h.0.self_attention", "out")})
    try:
        with torch.no_grad(), residtap.capture(model, ["layers.0.mlp"]) as acts:
            model(input_ids=batch_ids(2, 6))
    finally:
        for h in handles:
            h.remove()
    assert close(acts["layers.0.mlp"], seen["mlp"])
    assert not close(acts["layers.0.mlp"], seen["mlp"] + seen["attn"])


@pytest.mark.parametrize("family", FAMILIES)
def test_lens_last_layer_is_the_models_distribution(family):
    model = family_model(family)
    ids = batch_ids(2, 6)
    readout = readout_of(model)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        with residtap.capture(model, [f"layers.{num_layers(model) - 1}"]) as acts:
            model(input_ids=ids)
        last = acts[f"layers.{num_layers(model) - 1}"]
        got = readout.logits(last.reshape(-1, last.shape[-1])).view_as(out.logits)
    torch.testing.assert_close(got.softmax(-1), out.logits.float().softmax(-1), atol=1e-5,
                               rtol=1e-4)
    result = LogitLens(model).run(ids, max_new_tokens=0, top_k=3)
    top = out.logits.float().softmax(-1).topk(3, dim=-1)
    torch.testing.assert_close(result.topk_probs[-1], top.values, atol=1e-5, rtol=1e-4)


def test_a_wrong_arch_is_refused_with_the_site_and_what_disagreed():
    model = family_model("llama")
    wrong = residtap.Arch("layers", "norm", "mlp", "self_attn", "post_attention_layernorm",
                          "input_layernorm")
    with pytest.raises(LookupError, match=r"layers\.0\.ln1.*does not feed attention"):
        residtap.capture(model, ["layers.0.ln1"], arch=wrong)
    with pytest.raises(LookupError, match=r"layers\.1\.attn.*does not add up"):
        residtap.capture(model, ["layers.1.attn"], arch=wrong)
    # a correct hand-written Arch for a discovered family works like the discovered one
    gptj = family_model("gptj")
    mine = residtap.Arch("transformer.h", "transformer.ln_f", "attn", "mlp", "ln_1", None)
    assert find(gptj, mine).origin == "given"
    with torch.no_grad(), residtap.capture(gptj, ["layers.1.attn"], arch=mine) as a, \
            residtap.capture(gptj, ["layers.1.attn"]) as b:
        gptj(input_ids=batch_ids(1, 4))
    assert torch.equal(a["layers.1.attn"], b["layers.1.attn"])


def test_validation_leaves_no_hook_and_no_transformers_flag():
    model = family_model("llama")
    before = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), vars(m).copy().keys())
              for n, m in model.named_modules()}
    find(model)
    after = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), vars(m).copy().keys())
             for n, m in model.named_modules()}
    assert before == after


def test_cli_sites_says_how_each_part_was_found_and_what_is_refused(tmp_path, capsys):
    import json

    from conftest import word_tokenizer

    from residtap.cli import main

    folder = tmp_path / "gptj"
    family_model("gptj").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    assert main(["sites", str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parts"] == "discovered"
    assert {r["check"] for r in out["sites"]} == {"validated"}
    assert "layers.0.ln1" in {r["site"] for r in out["sites"]}
    assert "parallel block" in out["refused"]["ln2"]


def test_the_shipped_checkpoint_has_one_identity_under_every_release():
    """Artefacts record the config hash and weights fingerprint of the model they were made on;
    the same checkpoint must give the same values under every supported transformers (4.57's
    configs carry generation defaults and older rope keys that 5.x dropped). The values were
    computed under 5.24; .ci/run checks them under the lowest and the newest release too."""
    from residtap import organism
    from residtap.identity import config_hash, weights_fingerprint

    model, _ = organism.load()
    assert config_hash(model) == "4455f5b961c4f700"
    assert weights_fingerprint(model) == "4474c2394d614c84"
