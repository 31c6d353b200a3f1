"""Steering vectors: making, saving, per-row injection, generate, steerability, CLI, organism."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import VOCAB, left_padded, tiny_model, word_tokenizer

import residtap
from residtap.cli import main
from residtap.engine import count_hooks
from residtap.steering import SteeringVector, compare_generations, steer, steerability
from residtap.steering.contrast import pca_direction
from residtap.steering.plot import save_steerability_plot

ORGANISM_MODEL = Path(residtap.__file__).parent / "organism" / "model" / "config.json"


TOK = word_tokenizer()
POSITIVE = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13", "w14 w7"]
NEGATIVE = ["w5 w6 w20", "w8 w21", "w10 w11 w12 w22", "w14 w20 w30"]
AB_ROWS = [
    {"question": q, "answer_matching_behavior": " w7", "answer_not_matching_behavior": " w20"}
    for q in ("w5 w6", "w8 w9 w30", "w40", "w41 w42 w43 w44", "w50 w51")
]


def random_vector(model, site: str, seed: int, norm: float = 2.0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.config.hidden_size, generator=g)
    return SteeringVector.from_probe(v * norm / v.norm(), site=site, model=model)


PROMPTS = [[1, 5, 9, 13, 22, 40, 7], [1, 8, 31], [1, 11, 12, 60, 4]]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=4)


# -- making vectors ---------------------------------------------------------------------------


def test_mean_diff_matches_unpadded_reads(llama):
    vec = SteeringVector.from_pairs(llama, TOK, POSITIVE, NEGATIVE, site="layers.1")
    at_one = SteeringVector.from_pairs(llama, TOK, POSITIVE, NEGATIVE, site="layers.1",
                                       position=1)

    def read(text, index):
        ids = TOK([text], return_tensors="pt")["input_ids"]
        with torch.no_grad(), residtap.capture(llama, ["layers.1"]) as acts:
            llama(input_ids=ids)
        return acts["layers.1"][0, index]

    for got, index in ((vec, -1), (at_one, 1)):
        want = torch.stack([read(p, index) - read(n, index)
                            for p, n in zip(POSITIVE, NEGATIVE, strict=True)]).mean(0)
        assert torch.allclose(got.vector, want, atol=1e-5)
    assert vec.method == "mean_diff" and vec.model["config_hash"] and vec.extra["n_pairs"] == 4
    unit = SteeringVector.from_pairs(llama, TOK, POSITIVE, NEGATIVE, site="layers.1",
                                     normalize=True)
    assert abs(unit.norm - 1.0) < 1e-5 and torch.allclose(unit.vector * vec.norm, vec.vector,
                                                          atol=1e-6)


def test_pca_direction_is_the_shared_shift_and_sign_aligned(llama):
    g = torch.Generator().manual_seed(0)
    shift = torch.randn(16, generator=g)
    diffs = shift + 0.05 * torch.randn(50, 16, generator=g)
    got = pca_direction(diffs, diffs.mean(0))
    assert torch.cosine_similarity(got, shift, dim=0) > 0.99
    assert abs(got.norm() - shift.norm()) / shift.norm() < 0.05
    got_neg = pca_direction(-diffs, -diffs.mean(0))  # sign follows the mean difference
    assert torch.cosine_similarity(got_neg, -shift, dim=0) > 0.99
    pca = SteeringVector.from_pairs(llama, TOK, POSITIVE, NEGATIVE, site="layers.2", method="pca")
    mean = SteeringVector.from_pairs(llama, TOK, POSITIVE, NEGATIVE, site="layers.2")
    assert float(pca.vector @ mean.vector) > 0 and 0 < pca.extra["explained"] <= 1


def test_from_ab_reads_the_answer_token(llama):
    rows = [dict(r, answer_matching_behavior=" w7 w60", answer_not_matching_behavior=" w20 w60")
            for r in AB_ROWS]  # the answer token is w7 / w20, not the last token
    vec = SteeringVector.from_ab(llama, TOK, rows, site="layers.1")
    want = SteeringVector.from_pairs(llama, TOK, [r["question"] + " w7" for r in rows],
                                     [r["question"] + " w20" for r in rows], site="layers.1")
    assert vec.position == "answer" and torch.allclose(vec.vector, want.vector, atol=1e-6)


def test_from_probe_takes_probes_and_tensors(llama):
    w = torch.randn(1, 32)
    probe = SimpleNamespace(weight=w, site="layers.2", model=None, kind="logistic")
    vec = SteeringVector.from_probe(probe)
    assert vec.site == "layers.2" and vec.method == "probe" and torch.equal(vec.vector, w[0])
    multi = SimpleNamespace(weight=torch.randn(3, 32), site="layers.2", model=None)
    with pytest.raises(ValueError, match="row=i"):
        SteeringVector.from_probe(multi)
    assert torch.equal(SteeringVector.from_probe(multi, row=2).vector, multi.weight[2])
    with pytest.raises(ValueError, match="site="):
        SteeringVector.from_probe(torch.randn(32))
    try:
        from residtap.probes.linear import Probe
    except ImportError:  # the probes package is another engineer's work in progress
        return
    real = Probe(kind="logistic", weight=w, bias=torch.zeros(1), site="layers.1")
    assert torch.equal(SteeringVector.from_probe(real).vector, w[0])


def test_save_load_round_trip_and_format(llama, tmp_path):
    from safetensors import safe_open

    vec = SteeringVector.from_pairs(llama, TOK, POSITIVE, NEGATIVE, site="layers.1.ln2",
                                    method="pca", position=-1)
    path = vec.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(path, model=llama)
    assert torch.equal(back.vector, vec.vector) and back.vector.dtype == torch.float32
    assert (back.site, back.method, back.position, back.model, back.extra) == (
        vec.site, vec.method, vec.position, vec.model, vec.extra)
    with safe_open(str(path), framework="pt") as f:  # the pinned file layout
        assert list(f.keys()) == ["vector"]
        meta = f.metadata()
    assert sorted(meta) == ["extra", "format", "format_version", "method", "model", "norm",
                            "normalized", "position", "residtap_version", "site"]
    fields = {key: json.loads(text) for key, text in meta.items()}  # every value is JSON
    assert fields["format"] == "residtap.steering_vector" and fields["format_version"] == 2
    assert fields["norm"] == vec.norm and fields["model"] == vec.model
    assert fields["site"] == "layers.1.ln2" and fields["position"] == -1


def test_version_1_vector_files_still_load(llama, tmp_path):
    """Version 1 (session 2) wrote plain strings for format, version, site and method."""
    from safetensors.torch import save_file

    v = torch.randn(32)
    meta = {"format": "residtap.steering_vector", "format_version": "1", "site": "layers.1",
            "method": "mean_diff", "position": "-1", "normalized": "false",
            "norm": repr(float(v.norm())), "model": "null", "extra": "{}"}
    save_file({"vector": v}, str(tmp_path / "old.safetensors"), metadata=meta)
    back = SteeringVector.load(tmp_path / "old.safetensors", model=llama)
    assert torch.equal(back.vector, v) and (back.site, back.method, back.position) == (
        "layers.1", "mean_diff", -1)


# -- errors and hooks -------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(llama, tmp_path):
    with pytest.raises(ValueError, match="is empty"):
        SteeringVector.from_pairs(llama, TOK, [], [], site="layers.1")
    with pytest.raises(ValueError, match="same length"):
        SteeringVector.from_pairs(llama, TOK, POSITIVE, NEGATIVE[:2], site="layers.1")
    with pytest.raises(LookupError, match="did you mean 'layers.1'"):
        SteeringVector.from_pairs(llama, TOK, POSITIVE, NEGATIVE, site="layer.1")
    small = SteeringVector.from_probe(torch.randn(16), site="layers.1")
    with pytest.raises(ValueError, match="d=16.*hidden_size 32"):
        steer(llama, small)
    with pytest.raises(LookupError, match="unknown site"):
        steer(llama, SteeringVector.from_probe(torch.randn(32), site="layers.1.atn"))
    vec = random_vector(llama, "layers.1", 0)
    with pytest.raises(ValueError, match="one entry per vector"):
        steer(llama, vec, strengths=[0.0, 4.0])
    with pytest.raises(ValueError, match="finite"):
        steer(llama, vec, strengths=float("nan"))
    other = tiny_model("llama", layers=4, d=32, seed=0)
    other.config.rms_norm_eps = 1e-3  # same width, different model
    path = random_vector(llama, "layers.1", 0).save(tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="config hash"):
        SteeringVector.load(path, model=other)
    with pytest.raises(ValueError, match="config hash"):
        steer(other, SteeringVector.load(path))
    with pytest.raises(ValueError, match="A/B row 0 lacks"):
        steerability(llama, TOK, [{"question": "w5"}], vec)


def test_no_hooks_remain_after_exit_and_exception(llama):
    before = count_hooks(llama)
    vecs = [random_vector(llama, "layers.1", 0), random_vector(llama, "layers.2.ln1", 1)]
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad(), steer(llama, vecs, strengths=[1.0, 2.0]):
        assert count_hooks(llama) > before
        llama(input_ids=ids)
    assert count_hooks(llama) == before
    with pytest.raises(ValueError, match="cover 3 rows but this forward has 2"):
        with torch.no_grad(), steer(llama, vecs[0], strengths=torch.tensor([1.0, 0.0, 2.0])):
            llama(input_ids=ids)
    assert count_hooks(llama) == before


def test_pairs_as_tuples_or_rows_equal_two_lists(llama):
    two_lists = SteeringVector.from_pairs(llama, TOK, POSITIVE, NEGATIVE, site="layers.1")
    tuples = SteeringVector.from_pairs(llama, TOK, list(zip(POSITIVE, NEGATIVE, strict=True)),
                                       site="layers.1")
    rows = SteeringVector.from_pairs(
        llama, TOK, [{"positive": p, "negative": n} for p, n in zip(POSITIVE, NEGATIVE,
                                                                     strict=True)],
        site="layers.1", method="pca")
    assert torch.equal(tuples.vector, two_lists.vector)
    assert tuples.extra == two_lists.extra
    pca = SteeringVector.from_pairs(llama, TOK, POSITIVE, NEGATIVE, site="layers.1",
                                    method="pca")
    assert torch.equal(rows.vector, pca.vector)
    with pytest.raises(ValueError, match="pair 1 is .*\\(positive, negative\\) tuples"):
        SteeringVector.from_pairs(llama, TOK, [("w5", "w6"), ("w5", "w6", "w7")],
                                  site="layers.1")
    with pytest.raises(ValueError, match="pair 0 is 'w5 w6 w7'"):
        SteeringVector.from_pairs(llama, TOK, POSITIVE, site="layers.1")  # forgot the negatives
    with pytest.raises(TypeError, match="list of \\(positive, negative\\) tuples"):
        SteeringVector.from_pairs(llama, TOK, "w5 w6", site="layers.1")


def test_apply_is_steer_with_one_vector(llama):
    vec = random_vector(llama, "layers.2", 4, norm=5.0)
    ids, mask = left_padded(PROMPTS)
    before = count_hooks(llama)
    with torch.no_grad():
        plain = llama(input_ids=ids, attention_mask=mask).logits
        with steer(llama, vec, 3.0, positions=-1):
            want = llama(input_ids=ids, attention_mask=mask).logits
            want_gen = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                      do_sample=False, pad_token_id=0)
        with vec.apply(llama, 3.0, positions=-1) as steering:
            assert count_hooks(llama) > before and steering.vectors == [vec]
            got = llama(input_ids=ids, attention_mask=mask).logits
            got_gen = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                     do_sample=False, pad_token_id=0)
    assert torch.equal(got, want) and not torch.allclose(got, plain)
    assert torch.equal(got_gen, want_gen)
    assert count_hooks(llama) == before
    with pytest.raises(RuntimeError, match="boom"), vec.apply(llama, torch.tensor([1.0, 0.0])):
        raise RuntimeError("boom")
    assert count_hooks(llama) == before


def test_steering_is_hf_hidden_states_plus_s_times_v():
    """Against HF itself: under steer at layers.1 with positions="all", the captured layers.1 is
    the unsteered hidden_states[2] (block 1's output) + s·v at every position, pads included,
    and the logits are those of a forward where a hand-made hook adds s·v to block 1's output."""
    model = tiny_model("llama", layers=4)  # its own: output_hidden_states may leave HF's hooks
    s = 2.5
    vec = random_vector(model, "layers.1", 7, norm=3.0)
    v = vec.vector  # (d,)
    ids, mask = left_padded(PROMPTS)

    def add_s_v(module, args, output):  # by hand: block 1's output + s·v (tuple or tensor)
        if isinstance(output, tuple):
            return (output[0] + s * v, *output[1:])
        return output + s * v

    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with steer(model, vec, s, positions="all"), residtap.capture(model, "layers.1") as acts:
            steered = model(input_ids=ids, attention_mask=mask).logits
        handle = model.model.layers[1].register_forward_hook(add_s_v)
        try:
            by_hand = model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
    want = plain.hidden_states[2] + s * v  # (B, T, d)
    assert acts["layers.1"].shape == want.shape == (3, 7, model.config.hidden_size)
    torch.testing.assert_close(acts["layers.1"], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(steered, by_hand, rtol=1e-6, atol=1e-6)
    assert (steered - plain.logits).abs().max() > 1e-2  # the push changed the prediction


def test_repr_says_what_the_vector_is_without_its_values(llama):
    vec = SteeringVector.from_pairs(llama, TOK, list(zip(POSITIVE, NEGATIVE, strict=True)),
                                    site="layers.1")
    text = repr(vec)
    assert text.startswith("SteeringVector(site='layers.1', method='mean_diff', pairs=4, "
                           "d_model=32, norm=")
    assert f"norm={vec.norm:.4g}" in text and "\n" not in text and len(text) < 200
    assert "tensor(" not in text and f"{float(vec.vector[0]):.4f}" not in text
    assert "normalized" in repr(vec.normalized_copy())


# -- injection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_strength_zero_rows_are_bit_identical(arch):
    model = tiny_model(arch, layers=3)
    ids, mask = left_padded(PROMPTS + [[1, 70, 71]])
    vecs = [random_vector(model, "layers.0", 0), random_vector(model, "layers.1.ln1", 1),
            random_vector(model, "embed", 2)]
    strengths = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-2.0, 1.0, 5.0]])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with steer(model, vecs, strengths):
            steered = model(input_ids=ids, attention_mask=mask).logits
        with steer(model, vecs, strengths=0.0):
            zero = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(steered[0], plain[0]) and torch.equal(steered[2], plain[2])
    assert torch.equal(zero, plain)
    assert not torch.allclose(steered[1], plain[1]) and not torch.allclose(steered[3], plain[3])


def test_per_row_mixing_equals_separate_runs(llama):
    v1, v2 = random_vector(llama, "layers.1", 0), random_vector(llama, "layers.1", 1)
    v3 = random_vector(llama, "layers.2.ln2", 2)
    ids, mask = left_padded(PROMPTS)
    rows = torch.tensor([[2.0, 0.0, 0.0], [0.0, -3.0, 0.0], [1.0, 0.0, 4.0]])  # (B, K)
    with torch.no_grad():
        with steer(llama, [v1, v2, v3], rows):
            mixed = llama(input_ids=ids, attention_mask=mask).logits
        with steer(llama, [v1, v2], strengths=torch.tensor([2.0, -3.0]),
                   vector_index=[0, 1]):  # one vector per row, chosen by index
            indexed = llama(input_ids=ids[:2], attention_mask=mask[:2]).logits
        separate = []
        for b, (vecs, s) in enumerate((([v1], [2.0]), ([v2], [-3.0]), ([v1, v3], [1.0, 4.0]))):
            with steer(llama, vecs, s):
                separate.append(llama(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1])
                                .logits[0])
    for b in range(3):
        assert torch.allclose(mixed[b], separate[b], atol=1e-5), b
    assert torch.allclose(indexed, mixed[:2], atol=1e-5)


def _row_oracle(model, vec, strength, prompt, new_tokens, start):
    """One row alone, no padding, full forward over prompt + generated, steered from `start`."""
    full = torch.tensor([prompt + new_tokens[:-1]])
    with torch.no_grad(), steer(model, vec, strength, positions=start):
        logits = model(input_ids=full).logits[0]
    return logits[len(prompt) - 1:]  # the logits that chose each new token


@pytest.mark.parametrize("positions", ["all", 4, -1, "generated"])
def test_generate_with_cache_equals_full_forward(llama, positions):
    vec = random_vector(llama, "layers.1", 3, norm=4.0)
    strengths = torch.tensor([3.0, 0.0, -2.0])
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad(), steer(llama, vec, strengths, positions=positions):
        out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                             do_sample=False, eos_token_id=None, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits, dim=1)  # (B, 5, V)
    for b, prompt in enumerate(PROMPTS):
        new = out.sequences[b, ids.shape[1]:].tolist()
        start = {"all": 0, "generated": len(prompt), -1: len(prompt) - 1}.get(positions, positions)
        want = _row_oracle(llama, vec, float(strengths[b]), prompt, new, start)
        assert torch.allclose(logits[b], want, atol=1e-4), (positions, b)


def test_prompt_only_policy_steers_the_prefill_only(llama):
    vec = random_vector(llama, "layers.1", 3, norm=4.0)
    ids, mask = left_padded(PROMPTS)
    runs = {}
    for policy in ("all", "prompt", None):
        with torch.no_grad(), steer(llama, vec, 3.0 if policy else 0.0, positions=policy or "all"):
            runs[policy] = torch.stack(llama.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                eos_token_id=None, pad_token_id=0, output_logits=True,
                return_dict_in_generate=True).logits, dim=1)
    assert torch.allclose(runs["prompt"][:, 0], runs["all"][:, 0], atol=1e-5)
    assert not torch.allclose(runs["prompt"][:, 1:], runs["all"][:, 1:], atol=1e-3)
    assert not torch.allclose(runs["prompt"][:, 1:], runs[None][:, 1:], atol=1e-3)


# -- steerability and generation -----------------------------------------------------------


def test_steerability_batched_equals_sequential_and_slopes(llama):
    vec = random_vector(llama, "layers.2", 5, norm=3.0)
    strengths = [-2.0, -1.0, 0.0, 1.0, 2.0]
    res = steerability(llama, TOK, AB_ROWS, vec, strengths, positions="all", batch_size=16)
    assert res.n_forwards == -(-len(AB_ROWS) * len(strengths) * 2 // 16)
    assert res.propensity.shape == (len(AB_ROWS), len(strengths))
    # one example, one strength at a time, unbatched: the oracle
    for i, row in enumerate(AB_ROWS[:3]):
        prompt = TOK([row["question"]], return_tensors="pt")["input_ids"]
        a, b = TOK.convert_tokens_to_ids(["w7", "w20"])
        for s, strength in enumerate(strengths):
            with torch.no_grad(), steer(llama, vec, strength):
                last = llama(input_ids=prompt).logits[0, -1]
            assert abs(float(last[a] - last[b]) - float(res.propensity[i, s])) < 1e-4
    want = np.polyfit(strengths, res.propensity.double().numpy().T, 1)[0]
    assert np.allclose(res.slopes.numpy(), want, atol=1e-5)
    summary = res.summary()
    assert summary["vector"]["wrong_way"] == float((res.slopes < 0).float().mean())
    base = res.baseline_slopes
    assert base is not None and not torch.allclose(base, res.slopes)
    assert torch.allclose(res.baseline[:, 2], res.propensity[:, 2])  # strength 0 is shared


def test_steerability_shared_prefix_equals_full_forwards(llama):
    vec = random_vector(llama, "layers.1", 6, norm=3.0)
    strengths = [-2.0, 0.0, 1.0, 3.0]
    for k in (1, 2):
        res = steerability(llama, TOK, AB_ROWS, vec, strengths, positions=-k, batch_size=16)
        assert res.info["shared_prefix"] is (k == 1)  # one prompt has a single word + BOS
        assert res.n_forwards == (2 * 3 if k == 1 else 3)  # 2 examples per prefix forward
        a, b = TOK.convert_tokens_to_ids(["w7", "w20"])
        for i, row in enumerate(AB_ROWS):
            prompt = TOK([row["question"]], return_tensors="pt")["input_ids"]
            for j, strength in enumerate(strengths):
                with torch.no_grad(), steer(llama, vec, strength, positions=-k):
                    last = llama(input_ids=prompt).logits[0, -1]
                assert abs(float(last[a] - last[b]) - float(res.propensity[i, j])) < 1e-4


def test_plot_png_and_self_contained_html(llama, tmp_path):
    vec = random_vector(llama, "layers.2", 5)
    res = steerability(llama, TOK, AB_ROWS[:2], vec, [-1.0, 0.0, 1.0])
    png, html = save_steerability_plot(res, tmp_path / "s.png", tmp_path / "s.html")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = html.read_text()
    assert "data:image/png;base64," in page and "<script src" not in page and "http" not in page
    assert "Shaded bands: the middle half of the examples" in page  # the plot explained
    linked = save_steerability_plot(res, html=tmp_path / "side" / "s.html", back="../r.html")
    assert '<nav><a href="../r.html">' in linked[0].read_text()


def test_compare_generations_one_call_matches_single_runs(llama):
    vec = random_vector(llama, "layers.1", 3, norm=6.0)
    rows = compare_generations(llama, TOK, ["w5 w6", "w40"], vec, [4.0], max_new_tokens=4)
    assert [list(r["generations"]) for r in rows] == [[0.0, 4.0], [0.0, 4.0]]
    for r in rows:
        ids = TOK([r["prompt"]], return_tensors="pt")["input_ids"]
        for s, text in r["generations"].items():
            with torch.no_grad(), steer(llama, vec, s):
                out = llama.generate(input_ids=ids, max_new_tokens=4, do_sample=False,
                                     pad_token_id=0)
            assert TOK.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == text


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_make_eval_generate(llama, tmp_path, capsys):
    folder = tmp_path / "tiny"
    llama.save_pretrained(folder)
    TOK.save_pretrained(folder)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n"
                             for p, n in zip(POSITIVE, NEGATIVE, strict=True)))
    data = tmp_path / "ab.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in AB_ROWS))
    out = tmp_path / "v.safetensors"
    assert main(["steer", "make", str(folder), "--pairs", str(pairs), "--site", "layers.2",
                 "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_pairs"] == 4
    assert main(["steer", "make", str(folder), "--pairs", str(data), "--site", "layers.2",
                 "--out", str(tmp_path / "ab.safetensors")]) == 0
    assert "from 5 pairs" in capsys.readouterr().out
    assert main(["steer", "eval", str(folder), "--vector", str(out), "--data", str(data),
                 "--strengths", "-2", "0", "2", "--json", "--html", str(tmp_path / "e.html")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_examples"] == 5 and "random_baseline" in report
    assert (tmp_path / "e.html").is_file()
    assert main(["steer", "generate", str(folder), "--vector", str(out), "--prompt", "w5 w6",
                 "--strength", "50", "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert "prompt: w5 w6" in text and "50" in text
    assert main(["steer", "eval", str(folder), "--vector", str(pairs), "--data", str(data)]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err


# -- the organism: behaviour --------------------------------------------------------------------

needs_organism = pytest.mark.skipif(
    not ORGANISM_MODEL.is_file(),
    reason=f"the bundled organism checkpoint is not built yet ({ORGANISM_MODEL} missing)",
)


@pytest.fixture(scope="module")
def organism_mood():
    from residtap import organism

    model, tok = organism.load()
    site = f"layers.{model.config.num_hidden_layers // 2}"
    pairs = organism.read_jsonl("mood_pairs")
    vec = SteeringVector.from_pairs(model, tok, [p["positive"] for p in pairs],
                                    [p["negative"] for p in pairs], site=site, batch_size=100)
    return model, tok, vec, organism


@needs_organism
def test_organism_mood_vector_steers_and_random_does_not(organism_mood):
    model, tok, vec, organism = organism_mood
    rows = organism.read_jsonl("mood_ab")[:60]
    res = steerability(model, tok, rows, vec, [-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], seed=0,
                       positions=-1)  # CAA: steer from the answer position on
    s = res.summary()
    mood, rand = s["vector"], s["random_baseline"]
    assert res.n_forwards == 8  # 60 x 7 x 2 rows: 18 examples per chunk, 2 forwards each
    assert mood["mean"] > 2.0 and mood["q25"] > 0, mood
    assert mood["wrong_way"] <= 0.05, mood
    assert abs(rand["mean"]) < 0.15 * mood["mean"], (rand, mood)


@needs_organism
def test_organism_generations_switch_mood(organism_mood):
    model, tok, vec, organism = organism_mood
    negative_prompts = ["i feel sad , and then the", "we are upset , and then the",
                        "the storm hated the"]
    positive_prompts = ["i feel happy , and then the", "the band loved the"]

    def counts(texts: list[str]) -> dict[str, int]:
        words = " ".join(texts).split()
        return {m: sum(w in organism.MOOD_WORDS[m] for w in words) for m in ("positive",
                                                                             "negative")}

    for prompts, strength, before, after in ((negative_prompts, 1.0, "negative", "positive"),
                                             (positive_prompts, -1.0, "positive", "negative")):
        rows = compare_generations(model, tok, prompts, vec, [strength], max_new_tokens=12,
                                   positions=-1)
        plain = counts([r["generations"][0.0] for r in rows])
        steered = counts([r["generations"][strength] for r in rows])
        assert plain[before] > 2 * plain[after] and steered[after] > 2 * steered[before], rows
        for r in rows:  # every prompt moves toward the other mood
            p, q = counts([r["generations"][0.0]]), counts([r["generations"][strength]])
            assert q[after] / max(1, sum(q.values())) > p[after] / max(1, sum(p.values())), r
