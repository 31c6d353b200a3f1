"""Generate-time features under whatever transformers is installed (CI runs this file under the
lowest supported and the newest release): capture, probe bank, logit lens and steering during
`generate`, at batch 1 with no padding (the case transformers >= 5.23 passes without a mask)
and at batch 4 left-padded, against HF `output_hidden_states`, the model's own logits and
hand-made hooks. Also the engine's Step sequence for the forward keywords each release passes.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import left_padded, tiny_model

import residtap
from residtap.engine import Step, next_step
from residtap.lens import LogitLens
from residtap.probes.bank import ProbeBank

N_NEW = 5
PROMPTS = {"batch1": [[5, 9, 13, 22, 40]],
           "padded4": [[5, 9, 13, 22, 40], [8, 31], [11, 12, 60, 4], [70, 71, 72]]}


def batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return left_padded(PROMPTS[name])


def generate(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW,
                          do_sample=False, eos_token_id=None, pad_token_id=0, **kw)


def hf_reference(model, seqs: torch.Tensor, mask: torch.Tensor):
    """HF's own hidden states and logits for the generated sequences in one plain forward, with
    the position ids generate uses for left-padded rows."""
    full = torch.cat([mask, mask.new_ones(mask.shape[0], seqs.shape[1] - mask.shape[1])], 1)
    positions = (full.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=seqs, attention_mask=full, position_ids=positions,
                    output_hidden_states=True)
    return out, full.bool()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=3)


@pytest.mark.parametrize("case", ["batch1", "padded4"])
def test_capture_during_generate_equals_hf(model, case):
    ids, mask = batch(case)
    with torch.no_grad(), residtap.capture(model, ["embed", "layers.1", "logits"]) as acts:
        seqs = generate(model, ids, mask)
    assert len(acts.runs) == 1  # prefill + every decode step: one run
    ref, real = hf_reference(model, seqs, mask)
    fed = seqs.shape[1] - 1  # the last generated token is never fed back
    assert acts["layers.1"].shape == (ids.shape[0], fed, 32)
    r = real[:, :fed]
    assert torch.allclose(acts["embed"][r], ref.hidden_states[0][:, :fed][r], atol=1e-5)
    assert torch.allclose(acts["layers.1"][r], ref.hidden_states[2][:, :fed][r], atol=1e-5)
    # logits: generate asks only for the prefill's last position, then one per decode step
    want = ref.logits[:, ids.shape[1] - 1: fed]
    assert acts["logits"].shape == want.shape
    assert torch.allclose(acts["logits"], want, atol=1e-5)


@pytest.mark.parametrize("case", ["batch1", "padded4"])
def test_bank_during_generate_equals_a_hand_made_hook(model, case):
    ids, mask = batch(case)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(2, 32, generator=g), torch.randn(2, generator=g)
    bank = ProbeBank().add("p", w, b, site="layers.1")
    seen: list[torch.Tensor] = []
    handle = model.model.layers[1].register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out)[:, -1].clone()))
    try:
        with torch.no_grad(), bank.attach(model, max_tokens=N_NEW) as run:
            generate(model, ids, mask)
    finally:
        handle.remove()
    assert len(seen) == N_NEW  # the hand-made hook saw one forward per new token
    want = torch.stack(seen, 1) @ w.T + b  # (B, N_NEW, 2): the state each new token came from
    got = run.results()
    assert got.scores.shape[1] == N_NEW and got.valid.all()
    assert torch.allclose(got["p"], want, atol=1e-5)


@pytest.mark.parametrize("case", ["batch1", "padded4"])
def test_lens_during_generate_last_layer_is_the_models_distribution(model, case):
    ids, mask = batch(case)
    lens = LogitLens(model)
    captured = lens.capture(ids, mask, max_new_tokens=N_NEW, pad_token_id=0)
    assert captured.length == ids.shape[1] + N_NEW - 1
    result = lens.decode(captured, top_k=3)
    ref, real = hf_reference(model, captured.sequences, mask)
    T = captured.length
    probs = ref.logits[:, :T].float().softmax(-1)
    r = real[:, :T]
    top = probs.topk(3, dim=-1)
    assert torch.equal(result.topk_ids[-1][r], top.indices[r])
    torch.testing.assert_close(result.topk_probs[-1][r], top.values[r], atol=1e-5, rtol=1e-4)
    assert (result.actual_rank[-1, :, ids.shape[1] - 1:] == 0).all()  # greedy


@pytest.mark.parametrize("case", ["batch1", "padded4"])
def test_steering_generated_positions_equals_a_hand_made_hook(model, case):
    ids, mask = batch(case)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    vec = residtap.SteeringVector(v, site="layers.1", method="tensor")
    with torch.no_grad(), residtap.steer(model, vec, 6.0, positions="generated"):
        got = generate(model, ids, mask, output_logits=True, return_dict_in_generate=True)

    def add_on_decode(module, args, out):  # decode steps feed one token: steer those only
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[1] == 1:
            h = h + 6.0 * v
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = model.model.layers[1].register_forward_hook(add_on_decode)
    try:
        with torch.no_grad():
            want = generate(model, ids, mask, output_logits=True, return_dict_in_generate=True)
    finally:
        handle.remove()
    with torch.no_grad():
        plain = generate(model, ids, mask, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # and it did steer: decode-step logits move away from the unsteered run
    assert (got.logits[-1] - plain.logits[-1]).abs().max() > 1e-2


# -- the Step sequence for the forward keywords each release passes ----------------------------


class FakeCache:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


def _forward_kwargs(release: str, batch_size: int, prompt: int, past: int, padded: bool):
    """The keywords `generate` passes to the model's forward, as recorded from each release on
    a tiny Llama (names and shapes; tensors are zeros of those shapes)."""
    length = prompt if past == 0 else 1
    ids = torch.zeros(batch_size, length, dtype=torch.long)
    kw = {"input_ids": ids, "position_ids": torch.zeros(batch_size, length, dtype=torch.long),
          "use_cache": True, "return_dict": True, "logits_to_keep": 1}
    cache_key = "cache" if release == "5.24" else "past_key_values"
    kw[cache_key] = FakeCache(past)
    keeps_ones_mask = release in ("4.57", "5.17")  # 5.23+ drop an all-ones mask
    if padded or keeps_ones_mask:
        kw["attention_mask"] = torch.ones(batch_size, past + length, dtype=torch.long)
    if release == "4.57":
        kw["cache_position"] = torch.arange(past, past + length)
    return kw


@pytest.mark.parametrize("release", ["4.57", "5.17", "5.23", "5.24"])
@pytest.mark.parametrize("padded", [False, True])
def test_step_sequence_for_each_release(release, padded):
    B, T = (2, 4) if padded else (1, 3)
    step = Step()
    steps = []
    for past in (0, T, T + 1, T + 2):
        step = next_step(step, _forward_kwargs(release, B, T, past, padded))
        steps.append((step.run, step.index, step.past, step.batch, step.length,
                      step.attention_mask is not None))
    mask = padded or release in ("4.57", "5.17")
    r = steps[0][0]  # run ids are unique in the process; the decode steps share the prefill's
    assert steps == [(r, 0, 0, B, T, mask), (r, 1, T, B, 1, mask), (r, 2, T + 1, B, 1, mask),
                     (r, 3, T + 2, B, 1, mask)]
    # a new generate call starts a new run
    assert next_step(step, _forward_kwargs(release, B, T, 0, padded)).run > r


def test_a_mask_that_disagrees_with_the_cache_raises_naming_the_version():
    kw = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "cache": FakeCache(5),
          "attention_mask": torch.ones(1, 4)}
    with pytest.raises(RuntimeError, match=rf"transformers {transformers.__version__}.*5 tokens"):
        next_step(Step(), kw)


def test_a_cache_that_cannot_say_its_length_raises():
    class OddCache:
        pass

    kw = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "cache": OddCache()}
    with pytest.raises(RuntimeError, match="OddCache without get_seq_length"):
        next_step(Step(), kw)


def test_plain_forward_without_cache_or_mask_is_a_new_run():
    s = next_step(Step(), {"input_ids": torch.zeros(2, 7, dtype=torch.long)})
    assert (s.index, s.past, s.batch, s.length) == (0, 0, 2, 7)
    t = next_step(s, {"inputs_embeds": torch.zeros(2, 3, 8)})
    assert (t.index, t.past, t.length) == (0, 0, 3) and t.run != s.run


class DeviceLength(torch.Tensor):
    """A static cache's length as it lives on a GPU: reading it on the host is a sync."""

    def __int__(self):
        raise AssertionError("residtap read a static cache's length on the host")


class FakeStaticCache:
    def __init__(self) -> None:
        self.n = 0

    def get_seq_length(self):
        return 0 if self.n == 0 else torch.tensor(self.n).as_subclass(DeviceLength)


def test_a_static_cache_is_followed_without_reading_its_length():
    cache, step, seen = FakeStaticCache(), Step(), []
    for length in (4, 1, 1, 1):  # no mask (5.23+ with batch 1): prefill, then decode steps
        step = next_step(step, {"input_ids": torch.zeros(1, length, dtype=torch.long),
                                "cache": cache})
        seen.append((step.index, step.past))
        cache.n += length
    assert seen == [(0, 0), (1, 4), (2, 5), (3, 6)]


def test_generate_with_a_static_cache_equals_the_dynamic_cache(model):
    ids, mask = batch("batch1")
    runs = {}
    for impl in ("dynamic", "static"):
        with torch.no_grad(), residtap.capture(model, ["layers.1"]) as acts:
            seqs = generate(model, ids, mask, cache_implementation=impl)
        assert len(acts.runs) == 1, impl
        runs[impl] = (seqs, acts["layers.1"])
    assert torch.equal(runs["static"][0], runs["dynamic"][0])
    assert torch.allclose(runs["static"][1], runs["dynamic"][1], atol=1e-5)
