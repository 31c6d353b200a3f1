"""Logit lens: the last layer equals the model's own next-token distribution, chunking changes
nothing, probabilities are full-vocabulary, capture during generate equals a plain forward, no
hooks remain, and the JSON/HTML/PNG/CLI outputs hold the data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, batch_ids, tiny_model, word_tokenizer

import residtap
from residtap.engine import count_hooks
from residtap.lens import JSON_FORMAT, LogitLens, Readout, readout_of, run_lens
from residtap.lens.decode import decode
from residtap.sites import final_norm, num_layers


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows, left-padded by 0, 2 and 3 tokens."""
    ids = batch_ids(3, 7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def sharpened(model, scale: float = 60.0):
    """The model with its unembedding scaled up, so logits are large (a random tiny model's are
    near 0): distributions are peaked and Gemma's soft-cap (5.0) changes them a lot."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def reference_probs(model, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's own next-token distributions (B, T, V) from one plain forward, with the
    position ids that generate uses for left-padded rows."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits
    return logits.float().softmax(-1)


def assert_last_layer_is_model(model, result, captured, k: int) -> None:
    T = captured.length
    probs = reference_probs(model, captured.sequences[:, :T], captured.attention_mask)
    real = captured.attention_mask.bool()
    top = probs.topk(k, dim=-1)
    assert torch.equal(result.topk_ids[-1][real], top.indices[real])
    torch.testing.assert_close(result.topk_probs[-1][real], top.values[real], atol=1e-5,
                               rtol=1e-4)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    torch.testing.assert_close(result.entropy[-1][real], entropy[real], atol=1e-4, rtol=1e-4)
    assert result.kl[-1].abs().max() == 0
    # greedy decoding: at every position that produced a new token, the final layer's top-1
    # is that token (rank 0)
    gen = result.actual_rank[-1, :, captured.prompt_length - 1 :]
    assert (gen == 0).all()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gpt2"])
def test_last_layer_equals_model_next_token_distribution(arch):
    model = sharpened(tiny_model(arch, layers=3))
    ids, mask = padded_batch()
    lens = LogitLens(model)
    captured = lens.capture(ids, mask, max_new_tokens=5, pad_token_id=0)
    assert captured.length == ids.shape[1] + 4
    result = lens.decode(captured, top_k=4)
    assert result.topk_ids.shape == (num_layers(model), 3, captured.length, 4)
    assert_last_layer_is_model(model, result, captured, k=4)
    assert count_hooks(model) == 0


def test_gemma2_softcap_is_applied():
    model = sharpened(tiny_model("gemma2"))
    readout = readout_of(model)
    assert readout.softcap == 5.0
    ids = batch_ids(1, 6)
    capped = LogitLens(model).run(ids, max_new_tokens=0)
    uncapped_readout = Readout(norm=readout.norm, unembed=readout.unembed, softcap=None)
    uncapped = LogitLens(model, readout=uncapped_readout).run(ids, max_new_tokens=0)
    # the last-layer test above would catch a missing cap: the distributions differ clearly
    assert (capped.topk_probs - uncapped.topk_probs).abs().max() > 0.1


def test_organism_last_layer_and_kl_falls_with_depth():
    from residtap import organism

    if not (organism.MODEL_DIR / "config.json").is_file():
        pytest.skip(f"organism checkpoint not built yet ({organism.MODEL_DIR} has no config.json)")
    model, tok = organism.load()
    prompts = ["two plus two is", "the weather today is", "one"]
    ids, mask = residtap.lens.tokenize_left_padded(tok, prompts)
    lens = LogitLens(model)
    captured = lens.capture(ids, mask, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    result = lens.decode(captured, top_k=5, tokenizer=tok)
    assert_last_layer_is_model(model, result, captured, k=5)
    real = captured.attention_mask.bool()
    mean_kl = torch.stack([result.kl[i][real].mean() for i in range(len(result.sites))])
    assert (mean_kl[1:] <= mean_kl[:-1] + 1e-3).float().mean() >= 0.75, mean_kl.tolist()
    assert mean_kl[0] > mean_kl[-2] > mean_kl[-1] == 0


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_chunked_decode_equals_unchunked(arch):
    model = tiny_model(arch, layers=3)
    ids, mask = padded_batch()
    lens = LogitLens(model, sublayers=True)
    captured = lens.capture(ids, mask, max_new_tokens=4, pad_token_id=0)
    whole = lens.decode(captured, top_k=5, memory_budget=2**40)  # one chunk
    row_bytes = VOCAB * 9 * len(lens.sites)
    for budget in (1, 3 * row_bytes, 7 * row_bytes, 20 * row_bytes):
        part = lens.decode(captured, top_k=5, memory_budget=budget)
        assert torch.equal(part.topk_ids, whole.topk_ids), budget
        assert torch.equal(part.actual_rank, whole.actual_rank), budget
        torch.testing.assert_close(part.topk_probs, whole.topk_probs, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(part.entropy, whole.entropy, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(part.kl, whole.kl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_exp_without_the_max_shift_equals_the_shifted_exp(monkeypatch, scale):
    """Rows whose max is small take exp(logits) unshifted; forcing the shift everywhere
    (EXP_SAFE = 0) gives the same statistics."""
    import residtap.lens.decode as lens_decode

    model = sharpened(tiny_model("llama", layers=3), scale)
    ids, mask = padded_batch()
    lens = LogitLens(model)
    captured = lens.capture(ids, mask, max_new_tokens=4, pad_token_id=0)
    fast = lens.decode(captured, top_k=5)
    monkeypatch.setattr(lens_decode, "EXP_SAFE", 0.0)
    shifted = lens.decode(captured, top_k=5)
    assert torch.equal(fast.topk_ids, shifted.topk_ids)
    assert torch.equal(fast.actual_rank, shifted.actual_rank)
    torch.testing.assert_close(fast.topk_probs, shifted.topk_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast.entropy, shifted.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.kl, shifted.kl, atol=1e-5, rtol=1e-5)


def test_probabilities_are_full_vocabulary_and_stats_match_direct_formulas():
    torch.manual_seed(0)
    B, S, T, d, V, k = 2, 3, 4, 8, 700, 3  # V > 128 * k: the blocked top-k path
    hidden = torch.randn(B, S, T, d)
    unembed = torch.nn.Linear(d, V, bias=True)
    readout = Readout(norm=None, unembed=unembed)
    nxt = torch.randint(0, V, (B, T))
    nxt[1, -1] = -1
    stats = decode(hidden, length=T, readout=readout, next_ids=nxt, final_slot=-1, top_k=k,
                   memory_budget=1)
    with torch.no_grad():
        logp = unembed(hidden).log_softmax(-1).permute(1, 0, 2, 3)  # (S, B, T, V)
    top = logp.topk(k, dim=-1)
    assert torch.equal(stats.topk_ids, top.indices)
    torch.testing.assert_close(stats.topk_probs, top.values.exp(), atol=1e-6, rtol=1e-5)
    renormalised = top.values.softmax(-1)  # what a top-k-only softmax would report
    assert (stats.topk_probs.sum(-1) < 0.9).all()
    assert (renormalised - stats.topk_probs).abs().max() > 0.1
    p = logp.exp()
    torch.testing.assert_close(stats.entropy, -(p * logp).sum(-1), atol=1e-5, rtol=1e-5)
    kl = (p[-1:] * (logp[-1:] - logp)).sum(-1)
    torch.testing.assert_close(stats.kl, kl, atol=1e-5, rtol=1e-5)
    target = logp.gather(-1, nxt.clamp(min=0)[None, ..., None].expand(S, B, T, 1))
    rank = (logp > target).sum(-1)
    assert torch.equal(stats.actual_rank[:, 0], rank[:, 0])
    assert (stats.actual_rank[:, 1, -1] == -1).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_capture_during_generate_equals_plain_forward_per_sequence(arch):
    model = tiny_model(arch, layers=3)
    ids, mask = padded_batch()
    lens = LogitLens(model)
    captured = lens.capture(ids, mask, max_new_tokens=5, pad_token_id=0)
    L = num_layers(model)
    real = captured.attention_mask.bool()
    for b in range(ids.shape[0]):
        seq = captured.sequences[b, : captured.length][real[b]][None]  # unpadded row
        with torch.no_grad():
            hs = model(input_ids=seq, output_hidden_states=True).hidden_states
        got = captured.hidden[b][:, real[b]]  # (S, n_b, d)
        for i in range(L - 1):
            torch.testing.assert_close(got[i], hs[i + 1][0], atol=1e-4, rtol=1e-4)
        with torch.no_grad():  # HF's last entry is after the final norm
            torch.testing.assert_close(final_norm(model)(got[L - 1]), hs[L][0], atol=1e-4,
                                       rtol=1e-4)


def test_no_hooks_remain_after_normal_exit_and_exception():
    model = tiny_model("llama")
    ids = batch_ids(2, 5)
    LogitLens(model).run(ids, max_new_tokens=3, pad_token_id=0)
    assert count_hooks(model) == 0

    class Boom(RuntimeError):
        pass

    def explode(input_ids, scores):
        if input_ids.shape[1] > 6:
            raise Boom("stop mid-generation")
        return scores

    with pytest.raises(Boom):
        LogitLens(model).run(ids, max_new_tokens=4, pad_token_id=0, logits_processor=[explode])
    assert count_hooks(model) == 0


def test_sublayers_buffer_dtype_and_forward_only():
    model = tiny_model("qwen3")
    ids = batch_ids(2, 6)
    base = LogitLens(model).run(ids, max_new_tokens=0)
    lens = LogitLens(model, sublayers=True, dtype=torch.bfloat16)
    assert lens.sites[:3] == ["layers.0.attn", "layers.0.mlp", "layers.0"]
    result = lens.run(ids, max_new_tokens=0)
    assert result.topk_ids.shape[:3] == (9, 2, 6)
    blocks_only = result.topk_probs[2::3]
    torch.testing.assert_close(blocks_only, base.topk_probs, atol=2e-2, rtol=0)  # bf16 buffer
    assert (base.actual_rank[:, :, -1] == -1).all()  # no next token after a plain forward
    assert (base.actual_rank[:, :, :-1] >= 0).all()


def test_user_errors_say_what_to_do():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="past the final norm"):
        LogitLens(model, ["logits"])
    with pytest.raises(ValueError, match="num_beams"):
        LogitLens(model).capture(batch_ids(1, 4), max_new_tokens=2, num_beams=2)
    with pytest.raises(LookupError, match="cannot reproduce"):
        readout_of(tiny_model("bert"))
    with pytest.raises(LookupError, match="unknown site"):
        LogitLens(model, ["layer.1"])
    assert count_hooks(model) == 0


@pytest.fixture(scope="module")
def text_result():
    model = tiny_model("llama", layers=3)
    tok = word_tokenizer()
    result = run_lens(model, tok, ["w5 w6 w7 w8", "<tag> & w10"], max_new_tokens=3,
                      top_k=3)
    return result


def test_json_holds_every_statistic(text_result):
    data = text_result.to_json()
    assert data["format"] == JSON_FORMAT
    assert data["sites"] == ["layers.0", "layers.1", "layers.2"]
    L, B, T, k = text_result.topk_ids.shape
    assert (len(data["topk_probs"]), len(data["topk_probs"][0]), len(data["topk_probs"][0][0]),
            len(data["topk_probs"][0][0][0])) == (L, B, T, k)
    assert data["topk_text"][0][0][0][0] == text_result.text(data["topk_ids"][0][0][0][0])
    assert data["token_text"][0][:2] == ["<bos>", "w5"]
    assert data["attention_mask"][1][0] == 0  # the shorter prompt is left-padded
    json.dumps(data)  # plain types only


def test_html_is_self_contained_and_holds_the_data(text_result, tmp_path):
    from residtap.lens.plot import write_html

    path = write_html(text_result, tmp_path / "lens.html")
    page = path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script src" not in page and "<link" not in page
    blob = re.search(r'<script type="application/json" id="lens-data">(.*?)</script>', page, re.S)
    assert blob is not None
    assert json.loads(blob.group(1).replace("<\\/", "</")) == json.loads(
        json.dumps(text_result.to_json()))
    head = page.split("lens-data")[0]
    assert "&lt;bos&gt;" in head and "<bos>" not in head  # token text is escaped
    top = text_result.text(int(text_result.topk_ids[0, 0, -1, 0]))
    assert f"1. {top!r}" in page or f"1. {top!r}".replace("'", "&#x27;") in page


def test_png_heatmap(text_result, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the plots extra) is not installed")
    from residtap.lens.plot import write_png

    for color in ("prob", "kl"):
        path = write_png(text_result, tmp_path / f"lens_{color}.png", row=1, color=color)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="color"):
        write_png(text_result, tmp_path / "x.png", color="loss")


def test_cli_lens_json(tmp_path, capsys):
    from residtap.cli import main

    model_dir, out = tmp_path / "model", tmp_path / "out"
    tiny_model("llama", layers=2).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    rc = main(["lens", str(model_dir), "--prompt", "w5 w6 w7", "--prompt", "w8",
               "--max-new-tokens", "3", "--out", str(out), "--top-k", "2", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert report["shape"] == {"L": 2, "B": 2, "T": 6, "k": 2}
    assert [row["site"] for row in report["sites"]] == ["layers.0", "layers.1"]
    assert report["sites"][-1]["kl_to_final"] == 0
    for name in ("lens.json", "lens.png", "lens.html"):
        assert (out / name).is_file()
    assert json.loads(Path(out / "lens.json").read_text())["top_k"] == 2
    rc = main(["lens", str(model_dir), "--prompt", "w5", "--out", str(out), "--top-k", "0"])
    assert rc == 2 and "--top-k" in capsys.readouterr().err


@pytest.mark.parametrize("V", [96, 1000, 1024])
def test_blocked_topk_and_count_greater_match_torch(V):
    from residtap.lens.decode import _padded_width, blocked_topk, count_greater

    torch.manual_seed(V)
    logits = torch.randn(37, V) * 3
    vals, ids = blocked_topk(logits, 5)
    ref = logits.topk(5, dim=-1)
    assert torch.equal(ids, ref.indices) and torch.equal(vals, ref.values)
    threshold = logits[:, 7:8]
    flags = torch.zeros(37, _padded_width(V), dtype=torch.bool)
    assert torch.equal(count_greater(logits, threshold, flags), (logits > threshold).sum(-1))


def test_prompt_only_lens_of_a_padded_row_equals_the_prompt_alone():
    """max_new_tokens=0 passes position ids like generate does: GPT-2's learned positions
    would otherwise shift a left-padded row (2e-3 before the fix)."""
    model = sharpened(tiny_model("gpt2"), scale=10.0)
    ids, mask = padded_batch()
    lens = LogitLens(model)
    batched = lens.run(ids, mask, max_new_tokens=0, top_k=4)
    for row in (1, 2):
        real = mask[row].bool()
        alone = lens.run(ids[row:row + 1, real], max_new_tokens=0, top_k=4)
        torch.testing.assert_close(batched.topk_probs[:, row, real], alone.topk_probs[:, 0],
                                   atol=1e-6, rtol=1e-5)
