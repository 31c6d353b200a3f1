"""Streaming attention probes (residtap.probes.attention_stream) against the offline probe.

The oracle is `AttentionProbe.scores` on each prefix 0..t of each row (residtap.probes.attention,
a plain softmax over the whole prefix), for tokens fed one by one, in chunks, with left padding,
batch > 1, and during a real `generate` with the KV cache.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import residtap
from residtap.probes.attention import AttentionProbe
from residtap.probes.attention_stream import AttentionStream, pack_attention_probes

D = 16


def random_probe(heads: int, outputs: int, position: str, *, seed: int = 0, slope: float = 0.5,
                 site: str | None = None) -> AttentionProbe:
    g = torch.Generator().manual_seed(seed)
    classes = [False, True] if outputs == 1 else [f"c{i}" for i in range(outputs)]
    return AttentionProbe(
        query=torch.randn(heads, D, generator=g, dtype=torch.float64),
        position_weight=slope * torch.randn(heads, generator=g, dtype=torch.float64),
        value=torch.randn(heads, outputs, D, generator=g, dtype=torch.float64),
        bias=torch.randn(outputs, generator=g, dtype=torch.float64),
        classes=classes, position=position, site=site)


def probes(dtype=torch.float64, slope: float = 0.5) -> dict[str, AttentionProbe]:
    """Three probes (binary / 4 classes, 1-3 heads, both position modes); the same numbers in
    every dtype (drawn in float64, then cast)."""
    named = {
        "binary_end": random_probe(3, 1, "from_end", seed=1, slope=slope),
        "classes_start": random_probe(2, 4, "from_start", seed=2, slope=slope),
        "one_head": random_probe(1, 1, "from_start", seed=3, slope=slope),
    }
    for p in named.values():
        for key in ("query", "position_weight", "value", "bias"):
            setattr(p, key, getattr(p, key).to(dtype))
    return named


def left_padded_activations(B: int, T: int, dtype=torch.float64,
                            seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x (B, T, D) and a mask with left padding of 0..B-1 tokens plus one hole in the last row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, :b] = False
    mask[-1, T // 2] = False  # a pad in the middle (a row that skipped a step)
    return x, mask


def offline_prefix_scores(named: dict[str, AttentionProbe], x, mask) -> torch.Tensor:
    """(B, T, O) with the offline probes on each prefix; NaN where a row has no valid token."""
    B, T, _ = x.shape
    rows = []
    for b in range(B):
        per_t = []
        for t in range(T):
            m = mask[b : b + 1, : t + 1]
            if not m.any():
                per_t.append(None)
                continue
            cols = [p.scores(x[b : b + 1, : t + 1], m).reshape(1, -1) for p in named.values()]
            per_t.append(torch.cat(cols, 1)[0])
        width = next(s for s in per_t if s is not None).shape[0]
        rows.append(torch.stack([s if s is not None else torch.full((width,), math.nan,
                                                                    dtype=x.dtype)
                                 for s in per_t]))
    return torch.stack(rows)


def stream_in_chunks(named, x, mask, chunks: list[int], dtype=torch.float64) -> torch.Tensor:
    pack = pack_attention_probes(named, dtype=dtype)
    stream = AttentionStream(pack, x.shape[0], dtype=dtype)
    proj = F.linear(x.to(dtype), pack.weight, pack.bias)  # (B, T, K): the site's extra columns
    out, start = [], 0
    for size in chunks:
        out.append(stream.update(proj[:, start : start + size], mask[:, start : start + size]))
        start += size
    assert start == x.shape[1]
    return torch.cat(out, 1)


def assert_matches(got, ref, atol, rtol=0.0):
    unseen = ref.isnan()
    assert (got[unseen] == 0).all(), "a row with no valid token yet must score exactly 0"
    torch.testing.assert_close(got[~unseen], ref[~unseen], atol=atol, rtol=rtol)


@pytest.mark.parametrize("chunks", [[1] * 12, [12], [5, 1, 1, 3, 2], [3, 9]],
                         ids=["token_by_token", "one_chunk", "mixed", "prefill_then_rest"])
def test_stream_equals_offline_on_every_prefix_float64(chunks):
    named = probes()
    x, mask = left_padded_activations(4, 12)
    ref = offline_prefix_scores(named, x, mask)
    got = stream_in_chunks(named, x, mask, chunks)
    assert_matches(got, ref, atol=1e-10)


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 5]], ids=["token_by_token", "mixed"])
def test_probes_of_one_shape_equal_offline(chunks):
    """Probes with the same heads and outputs take the (P, H, C) grid path (broadcast and
    reshape) instead of index_select / index_add: the same scores."""
    named = {f"p{i}": random_probe(2, 3, ("from_start", "from_end")[i % 2], seed=10 + i)
             for i in range(3)}
    x, mask = left_padded_activations(3, 12)
    ref = offline_prefix_scores(named, x, mask)
    assert_matches(stream_in_chunks(named, x, mask, chunks), ref, atol=1e-10)


def test_stream_float32_within_float_tolerance():
    named64 = probes()
    named32 = probes(torch.float32)
    x, mask = left_padded_activations(3, 20)
    ref = offline_prefix_scores(named64, x, mask)
    got = stream_in_chunks(named32, x.float(), mask, [7, 1, 1, 11], dtype=torch.float32)
    assert_matches(got.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunks", [[64], [1] * 64, [20] + [1] * 10 + [34]],
                         ids=["one_chunk", "token_by_token", "mixed"])
def test_large_logit_ranges_stay_exact(chunks):
    """Position slopes of +-8 over 64 tokens give logits hundreds apart: within a chunk a shared
    reference maximum would underflow the early prefixes (the log-sum form does not), and token
    by token each new weight is exp(+-hundreds) against the running denominator."""
    named = probes(slope=8.0)
    x, mask = left_padded_activations(2, 64)
    ref = offline_prefix_scores(named, x, mask)
    got = stream_in_chunks(named, x, mask, chunks)
    assert got.isfinite().all()
    assert_matches(got, ref, atol=1e-9, rtol=1e-9)


def test_invalid_tokens_leave_the_score_unchanged_and_current_matches():
    named = probes()
    x, mask = left_padded_activations(3, 10)
    pack = pack_attention_probes(named, dtype=torch.float64)
    stream = AttentionStream(pack, 3, dtype=torch.float64)
    out = stream.update(F.linear(x, pack.weight, pack.bias), mask)
    b, t = 2, 10 // 2  # the hole in the last row
    assert not mask[b, t]
    assert torch.equal(out[b, t], out[b, t - 1])
    torch.testing.assert_close(stream.current(), out[:, -1], atol=0, rtol=0)
    assert (out[1, 0] == 0).all()  # row 1 starts with one pad


def test_reset_starts_a_new_run_in_the_same_buffers():
    named = probes()
    x, mask = left_padded_activations(2, 8)
    pack = pack_attention_probes(named, dtype=torch.float64)
    stream = AttentionStream(pack, 2, dtype=torch.float64)
    proj = F.linear(x, pack.weight, pack.bias)
    first = stream.update(proj, mask)
    addresses = [t.data_ptr() for t in (stream.den, stream.mean, stream.count)]
    stream.update(proj[:, :3], mask[:, :3])
    stream.reset()
    again = stream.update(proj, mask)
    assert torch.equal(first, again)
    assert addresses == [t.data_ptr() for t in (stream.den, stream.mean, stream.count)]


def test_rows_selected_fed_and_put_back_follow_their_own_sequences():
    """A table of 4 rows (serving's request slots): rows 3 and 1 fed alone through select / put,
    in chunks, then row 3 restarted, and the table grown: each row's scores equal the offline
    probe on its own tokens; untouched rows keep theirs."""
    named = probes()
    pack = pack_attention_probes(named, dtype=torch.float64)
    x = torch.randn(4, 9, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    proj = F.linear(x, pack.weight, pack.bias)  # (4, 9, K)
    every = torch.ones(4, 9, dtype=torch.bool)
    ref = offline_prefix_scores(named, x, every)  # (4, 9, O)
    table = AttentionStream(pack, 4, dtype=torch.float64)
    table.update(proj[:, :4])  # every row's first 4 tokens
    rows = torch.tensor([3, 1])
    for start, stop in ((4, 7), (7, 8)):  # a chunk of 3, then a decode step
        sub = table.select(rows)
        got = sub.update(proj[rows, start:stop])
        table.put(rows, sub)
        assert_matches(got, ref[rows, start:stop], atol=1e-10)
    assert_matches(table.current(), torch.stack([ref[0, 3], ref[1, 7], ref[2, 3], ref[3, 7]]),
                   atol=1e-10)
    table.reset_rows(torch.tensor([3]))  # row 3 starts again with row 0's tokens
    sub = table.select(torch.tensor([3]))
    assert_matches(sub.update(proj[:1, :5]), ref[:1, :5], atol=1e-10)
    table.put(torch.tensor([3]), sub)
    grown = table.grown(6)
    assert torch.equal(grown.current()[:4], table.current())
    assert (grown.current()[4:] == 0).all()
    with pytest.raises(ValueError, match="keeps this one's 4 rows"):
        table.grown(2)


def test_column_layout_is_the_documented_one():
    named = probes()
    pack = pack_attention_probes(named, dtype=torch.float64)
    G = sum(p.n_heads for p in named.values())
    assert pack.n_heads == G
    assert pack.n_values == sum(p.n_heads * p.n_outputs for p in named.values())
    assert pack.columns == ["binary_end", "classes_start:c0", "classes_start:c1",
                            "classes_start:c2", "classes_start:c3", "one_head"]
    for i, (name, p) in enumerate(named.items()):
        for h in range(p.n_heads):
            col = pack.head_offset[i] + h
            assert torch.equal(pack.weight[col], p.query[h])
            assert pack.bias[col] == 0
            sign = 1.0 if p.position == "from_start" else -1.0
            assert pack.slope[col] == sign * p.position_weight[h]
            for c in range(p.n_outputs):
                vcol = pack.value_offset[i] + h * p.n_outputs + c
                assert torch.equal(pack.weight[G + vcol], p.value[h, c])
                assert pack.bias[G + vcol] == (p.bias[c] if h == 0 else 0)
                assert pack.value_head[vcol] == col
                assert pack.value_output[vcol] == pack.out_offset[i] + c
        assert pack.outputs_of(name) == slice(pack.out_offset[i], pack.out_offset[i] + p.n_outputs)
    as32 = pack.to(dtype=torch.float32)
    assert as32.weight.dtype == as32.slope.dtype == torch.float32
    assert torch.equal(as32.weight, pack.weight.float()) and as32.columns == pack.columns


def test_compiled_update_equals_eager_without_graph_breaks():
    named = probes(torch.float32)
    x, mask = left_padded_activations(3, 9, dtype=torch.float32)
    pack = pack_attention_probes(named)
    proj = F.linear(x, pack.weight, pack.bias)
    eager, compiled = AttentionStream(pack, 3), AttentionStream(pack, 3)
    torch._dynamo.reset()
    step = torch.compile(compiled.update, fullgraph=True)  # fullgraph: a graph break raises
    outs_e, outs_c = [], []
    for start, size in [(0, 5), (5, 1), (6, 1), (7, 1), (8, 1)]:  # a prefill, then decode steps
        sl = slice(start, start + size)
        outs_e.append(eager.update(proj[:, sl], mask[:, sl]))
        outs_c.append(step(proj[:, sl], mask[:, sl]))
    torch.testing.assert_close(torch.cat(outs_c, 1), torch.cat(outs_e, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(compiled.den, eager.den, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(compiled.mean, eager.mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(compiled.count, eager.count, atol=0, rtol=0)


def test_during_generate_with_kv_cache_and_left_padding():
    """A tap runs the pack's matmul and the stream at each forward of a greedy generate (batch 2,
    left padding); each score equals the offline probe on that prefix of the full sequence."""
    from residtap import organism

    model, tok = organism.load()
    site = "layers.4"
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    probe = AttentionProbe(query=torch.randn(2, d, generator=g) / 4,
                           position_weight=torch.tensor([0.3, -0.2]),
                           value=torch.randn(2, 3, d, generator=g) / 8,
                           bias=torch.randn(3, generator=g), classes=["a", "b", "c"],
                           position="from_end", site=site)
    pack = pack_attention_probes({"p": probe})
    batch = tok(["the fog dreaded the storm . it was", "i feel happy , and then the"],
                return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all()  # left padding present
    stream = AttentionStream(pack, 2)
    steps: list[torch.Tensor] = []

    def read(hidden: torch.Tensor, step: residtap.Step) -> None:
        if step.index == 0:
            stream.reset()
        mask = step.attention_mask
        valid = (torch.ones(step.batch, step.length, dtype=torch.bool) if mask is None
                 else mask[:, step.past : step.past + step.length].bool())
        steps.append(stream.update(F.linear(hidden, pack.weight, pack.bias), valid))

    new = 6
    with torch.no_grad(), residtap.tap(model, {site: read}):
        out = model.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=0,
                             min_new_tokens=new)
    got = torch.cat(steps, 1)  # (B, T_prompt + new - 1, 3): the last token is never fed
    full_mask = torch.cat([batch["attention_mask"],
                           torch.ones(2, new, dtype=batch["attention_mask"].dtype)], 1).bool()
    with torch.no_grad(), residtap.capture(model, [site]) as acts:
        model(input_ids=out, attention_mask=full_mask.long())
    x = acts[site][:, : got.shape[1]].double()
    ref = offline_prefix_scores({"p": probe}, x, full_mask[:, : got.shape[1]])
    assert_matches(got.double(), ref, atol=2e-4, rtol=1e-4)


def test_refusals_say_what_and_how():
    good = random_probe(2, 1, "from_end", site="layers.1")
    with pytest.raises(TypeError, match="not an AttentionProbe"):
        pack_attention_probes({"lin": object()})
    with pytest.raises(ValueError, match="non-empty mapping"):
        pack_attention_probes({})
    other_d = AttentionProbe(query=torch.zeros(1, D + 1), position_weight=torch.zeros(1),
                             value=torch.zeros(1, 1, D + 1), bias=torch.zeros(1),
                             classes=[0, 1])
    with pytest.raises(ValueError, match="one d_model"):
        pack_attention_probes({"a": good, "b": other_d})
    with pytest.raises(ValueError, match="one site"):
        pack_attention_probes({"a": good, "b": random_probe(2, 1, "from_end", site="layers.2")})
    bad = random_probe(2, 1, "from_end")
    bad.value[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN/Inf in value"):
        pack_attention_probes({"bad": bad})
    pack = pack_attention_probes({"a": good})
    stream = AttentionStream(pack, 2)
    with pytest.raises(ValueError, match=r"expected proj of shape \(B=2, T, K=4\)"):
        stream.update(torch.zeros(2, 3, 5), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected valid of shape"):
        stream.update(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(LookupError, match="no attention probe 'zz'"):
        pack.outputs_of("zz")
    with pytest.raises(ValueError, match="batch_size"):
        AttentionStream(pack, 0)
    with pytest.raises(ValueError, match=r"float32 or float64, got torch.bfloat16; pass dtype="):
        AttentionStream(pack, 2, dtype=torch.bfloat16)
