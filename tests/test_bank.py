"""Probe bank: packed scores equal probes on captured activations, early exit per row,
compile safety, hook hygiene, user errors, and the bench CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import left_padded, right_padded, stop_tokens, tiny_model

import residtap
from residtap.engine import count_hooks
from residtap.probes.bank import ProbeBank

D = 32
PROMPTS = [[5, 9, 13, 22, 40, 7], [8, 31], [11, 12, 60, 4]]  # different lengths: left padding


def make_bank(seed: int = 0) -> ProbeBank:
    g = torch.Generator().manual_seed(seed)
    bank = ProbeBank()
    bank.add("a", torch.randn(D, generator=g), 0.5, site="layers.1")
    bank.add("b", torch.randn(3, D, generator=g), torch.randn(3, generator=g), site="layers.3",
             classes=["x", "y", "z"])
    bank.add("c", torch.randn(D, generator=g), -0.25, site="layers.1")
    bank.add("e", torch.randn(2, D, generator=g), None, site="embed")
    return bank


def expected_scores(bank: ProbeBank, acts) -> dict[str, torch.Tensor]:
    """W @ h + b for every probe on captured activations (B, T, d) -> (B, T, C)."""
    return {p.name: acts[p.site] @ p.weight.T + p.bias for p in bank.probes}


class NaiveItemHook:
    """The usual way: one forward hook per probe reading its score with .item()."""

    def __init__(self, weight: torch.Tensor, sink: list) -> None:
        self.weight, self.sink = weight, sink

    def __call__(self, module, args, output) -> None:
        self.sink.append(float((output[:, -1] @ self.weight).sum().item()))


def generate(model, ids, mask, n, **kw):
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, **kw}
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **kw)


@pytest.mark.parametrize("defer", [0, 2])  # 2: a deferred readout, its ring filled twice
@pytest.mark.parametrize("positions", ["generated", "last", "prompt", "all"])
def test_packed_scores_equal_probes_on_captured_activations(positions, defer):
    model, bank, n = tiny_model("llama", layers=4), make_bank(), 5
    ids, mask = left_padded(PROMPTS)
    B, Tp = ids.shape
    sites = sorted({p.site for p in bank.probes})
    slots = {"generated": n, "last": 1, "prompt": Tp, "all": Tp + n - 1}[positions]
    torch.manual_seed(3)  # sampling: the bank must follow whatever tokens are drawn
    with torch.no_grad(), residtap.capture(model, sites) as acts, bank.attach(
            model, batch_size=B, max_tokens=slots, positions=positions,
            aggregate=("max", "mean", "ema"), ema_alpha=0.3, defer=defer) as run:
        generate(model, ids, mask, n, do_sample=True, top_k=0)
    res = run.results()
    if defer and positions in ("generated", "all"):  # 4 decode steps, read 2 at a time
        assert run.flushes == 2
    full = expected_scores(bank, acts)  # (B, Tp + n - 1, C): every fed position
    real = mask.bool()
    pick = {"generated": slice(Tp - 1, None), "last": slice(Tp - 1, Tp),
            "prompt": slice(0, Tp), "all": slice(None)}[positions]
    valid = {"generated": torch.ones(B, n, dtype=torch.bool),
             "last": torch.ones(B, 1, dtype=torch.bool), "prompt": real,
             "all": torch.cat([real, torch.ones(B, n - 1, dtype=torch.bool)], 1)}[positions]
    assert res.scores.shape == (B, slots, 7) and torch.equal(res.valid, valid)
    for name, want in full.items():
        got = res[name]
        assert torch.allclose(got, want[:, pick], atol=1e-5), (positions, name)
        # aggregates over each row's valid tokens
        rows = [want[b, pick][valid[b]] for b in range(B)]  # (n_b, C)
        cols = run.probe_columns[name]
        mx = torch.stack([r.amax(0) for r in rows])
        mean = torch.stack([r.mean(0) for r in rows])
        ema = []
        for r in rows:
            s = torch.zeros(r.shape[1])
            for x in r:
                s = 0.3 * x + 0.7 * s
            ema.append(s / (1 - 0.7 ** len(r)))
        assert torch.allclose(res.aggregates["max"][:, cols], mx, atol=1e-5)
        assert torch.allclose(res.aggregates["mean"][:, cols], mean, atol=1e-5)
        assert torch.allclose(res.aggregates["ema"][:, cols], torch.stack(ema), atol=1e-5)
    per_row = res.rows()
    assert len(per_row) == B and per_row[1]["b:y"].shape == (int(valid[1].sum()),)


def test_plain_forward_right_padding_reads_last_real_token():
    model, bank = tiny_model("llama", layers=4), make_bank()
    ids, mask = right_padded(PROMPTS)
    with torch.no_grad(), residtap.capture(model, ["layers.1", "layers.3", "embed"],
                                           positions="last") as acts:
        with bank.attach(model, positions="last") as run:
            model(input_ids=ids, attention_mask=mask)
    want = expected_scores(bank, acts)
    for name in ("a", "b", "e"):
        assert torch.allclose(run.results()[name][:, 0], want[name], atol=1e-5)


def test_prompt_last_is_a_deprecated_name_of_last():
    model, bank = tiny_model("llama", layers=4), make_bank()
    ids, mask = left_padded(PROMPTS)
    runs = {}
    for word in ("last", "prompt_last"):
        with torch.no_grad(), bank.attach(model, positions=word) as runs[word]:
            model(input_ids=ids, attention_mask=mask)
    with pytest.warns(DeprecationWarning, match="'prompt_last' is now called 'last'"):
        bank.attach(model, positions="prompt_last")
    old, new = runs["prompt_last"].results(), runs["last"].results()
    assert old.positions == new.positions == "last"
    assert torch.equal(old.scores, new.scores) and torch.equal(old.valid, new.valid)


def test_rows_are_never_attributed_to_another_request():
    """Each row of a left-padded batch scores like its prompt generated alone."""
    model, bank, n = tiny_model("llama", layers=4), make_bank(), 6
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad(), bank.attach(model, max_tokens=n) as run:
        out = generate(model, ids, mask, n)
    batched = run.results()
    for b, prompt in enumerate(PROMPTS):
        one = torch.tensor([prompt])
        with torch.no_grad(), bank.attach(model, max_tokens=n) as solo:
            alone = generate(model, one, torch.ones_like(one), n)
        assert torch.equal(alone[0, len(prompt):], out[b, ids.shape[1]:])
        assert torch.allclose(solo.results().scores[0], batched.scores[b], atol=1e-4), b


@pytest.mark.parametrize("defer", [0, 3])
def test_stream_callback_gets_every_step_while_generating(defer):
    model, bank, n = tiny_model("llama", layers=4), make_bank(), 5
    ids, mask = left_padded(PROMPTS)
    seen = []
    with torch.no_grad(), bank.attach(model, max_tokens=n, defer=defer) as run:
        live = run.streamer(lambda s: seen.append((s.start, s.scores.clone())))
        generate(model, ids, mask, n, stopping_criteria=[live])
    assert [s for s, _ in seen] == list(range(n))
    assert torch.equal(torch.cat([x for _, x in seen], 1), run.results().scores)


@pytest.mark.parametrize("defer", [0, 3])
def test_early_exit_stops_exactly_the_crossing_rows_and_leaves_others_unchanged(defer):
    model, n, patience = tiny_model("llama", layers=4), 8, 2
    bank = make_bank()
    ids, mask = left_padded(PROMPTS)
    kw = {"eos_token_id": 2, "pad_token_id": 0}  # an EOS criterion: stopped rows get pads
    with torch.no_grad(), bank.attach(model, max_tokens=n) as run:
        base = generate(model, ids, mask, n, **kw)
    score = run.results()["a"][..., 0]  # (B, n)
    # Pick a threshold that stops some rows but not all, and compute where each should stop.
    for threshold in torch.quantile(score, torch.linspace(0.3, 0.95, 14)).tolist():
        stop_at = stop_tokens(score, threshold, patience)
        if 0 < sum(s >= 0 for s in stop_at) < len(PROMPTS):
            break
    else:
        pytest.fail(f"no threshold splits the rows; scores {score}")
    with torch.no_grad(), bank.attach(model, max_tokens=n, defer=defer) as run:
        stop = run.early_exit("a", threshold, patience=patience)
        out = generate(model, ids, mask, n, stopping_criteria=[stop], **kw)
    report = stop.report()
    assert report.stop_token == stop_at
    Tp = ids.shape[1]
    for b, k in enumerate(stop_at):
        if k < 0:  # a row that did not stop: identical output
            assert torch.equal(out[b, Tp:], base[b, Tp:])
            assert report.tokens_saved[b] == 0
        else:  # kept tokens 0..k, then pads
            assert torch.equal(out[b, Tp:Tp + k + 1], base[b, Tp:Tp + k + 1])
            assert (out[b, Tp + k + 1:] == 0).all()
            assert report.tokens_saved[b] == n - (k + 1)
            assert not run.results().valid[b, k + 1:].any()
    assert report.trim(out, Tp)[0] == out[0, Tp:Tp + report.tokens_kept[0]].tolist()


def test_compiles_with_zero_graph_breaks_and_matches_eager_while_naive_hooks_break():
    import torch._dynamo as dynamo

    model, bank = tiny_model("llama", layers=2), ProbeBank()  # small: tracing costs CPU time
    bank.add("a", torch.randn(D), 0.5, site="layers.0")
    bank.add("b", torch.randn(3, D), torch.randn(3), site="layers.1", classes=["x", "y", "z"])
    bank.add("e", torch.randn(2, D), None, site="embed")
    ids, mask = left_padded(PROMPTS)

    def forward(x, m):
        return model(input_ids=x, attention_mask=m, use_cache=False).logits

    with torch.no_grad(), bank.attach(model, batch_size=3, max_tokens=ids.shape[1],
                                      positions="prompt", aggregate=("max", "ema")) as run:
        dynamo.reset()
        explained = dynamo.explain(forward)(ids, mask)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, [
            str(r.reason)[:200] for r in explained.break_reasons]
        eager_logits = forward(ids, mask)
        eager = run.results()
        dynamo.reset()
        # aot_eager: the full dynamo + AOTAutograd path without inductor's C++ build (CPU time)
        compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
        assert torch.allclose(compiled(ids, mask), eager_logits, atol=1e-5)
        got = run.results()
    assert torch.allclose(got.scores, eager.scores, atol=1e-6)
    assert torch.allclose(got.aggregates["ema"], eager.aggregates["ema"], atol=1e-6)

    # The usual way: a hook per probe reading its score with .item() breaks the graph.
    sink: list = []
    layer0 = model.get_submodule(residtap.resolve_site(model, "layers.0").path)
    handle = layer0.register_forward_hook(NaiveItemHook(bank.probes[0].weight[0], sink))
    try:
        dynamo.reset()
        with torch.no_grad():
            naive = dynamo.explain(forward)(ids, mask)
    finally:
        handle.remove()
        dynamo.reset()
    assert naive.graph_break_count > 0 and sink
    assert any("item" in str(r.reason) for r in naive.break_reasons)


@pytest.mark.parametrize("defer", [0, 2])
def test_compiled_generate_builds_no_more_graphs_than_without_the_bank(defer):
    """The readout writes at a device slot index, so a compiled `model.forward` does not
    specialise on the decode step: one graph per baseline graph, tokens and scores as eager.
    With defer, compiled decode steps copy into the staging ring, read at each flush."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter

    ids, mask = left_padded(PROMPTS)
    n = 6  # the old readout compiled one graph per decode step: 6 instead of 3

    def run_generate(compiled: bool, bank: ProbeBank | None):
        model, counter = tiny_model("llama", layers=4), CompileCounter()
        dynamo.reset()
        return _run_generate(model, counter, compiled, bank)

    @dynamo.config.patch(skip_nnmodule_hook_guards=False)  # what residtap asks of compile
    def _run_generate(model, counter, compiled: bool, bank: ProbeBank | None):
        if compiled:  # CompileCounter: counts graphs, runs them eagerly (no C++ build)
            model.forward = torch.compile(model.forward, backend=counter)
        try:
            with torch.no_grad():
                if bank is None:
                    return generate(model, ids, mask, n), None, counter.frame_count
                with bank.attach(model, batch_size=3, max_tokens=n, defer=defer,
                                 aggregate=("max", "mean", "ema")) as run:
                    out = generate(model, ids, mask, n)
                assert run.flushes == (0 if not defer else -(-(n - 1) // defer))
                return out, run.results(), counter.frame_count
        finally:
            dynamo.reset()

    _, _, baseline_graphs = run_generate(True, None)
    eager_out, eager, _ = run_generate(False, make_bank())
    out, got, graphs = run_generate(True, make_bank())
    assert baseline_graphs >= 2 and graphs <= baseline_graphs, (graphs, baseline_graphs)
    assert torch.equal(out, eager_out)
    assert torch.equal(got.valid, eager.valid) and got.scores.shape == (3, n, 7)
    assert torch.allclose(got.scores, eager.scores, atol=1e-5)
    for name, agg in eager.aggregates.items():
        assert torch.allclose(got.aggregates[name], agg, atol=1e-5), name


def test_no_hook_remains_after_normal_exit_or_exception():
    model, bank = tiny_model("llama", layers=4), make_bank()
    before = count_hooks(model)
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad(), bank.attach(model, max_tokens=3) as run:
        assert count_hooks(model) > before
        stop = run.early_exit("a", 1e9)
        generate(model, ids, mask, 3, stopping_criteria=[stop])
    assert count_hooks(model) == before
    with pytest.raises(RuntimeError, match="boom"), bank.attach(model, max_tokens=3):
        raise RuntimeError("boom")
    assert count_hooks(model) == before
    with pytest.raises(ValueError, match="slots"), torch.no_grad(), bank.attach(
            model, max_tokens=2):
        generate(model, ids, mask, 4)  # the buffer is too small: error, then clean-up
    assert count_hooks(model) == before


def test_error_mid_forward_keeps_the_deferred_steps_every_site_staged():
    """An error inside a decode step's forward (after some sites staged it) propagates as is;
    the steps before it are read, the broken one is marked not scored, no hook remains."""
    model, bank = tiny_model("llama", layers=4), make_bank()
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad(), bank.attach(model, max_tokens=3) as run:
        generate(model, ids, mask, 3)
    want = run.results()
    calls = []

    def boom(module, args, output):  # layers.2 runs after embed and layers.1, before layers.3
        calls.append(1)
        if len(calls) == 4:  # prefill, decode 1, decode 2, then decode 3 fails
            raise ValueError("boom")

    layer2 = model.get_submodule(residtap.resolve_site(model, "layers.2").path)
    before = count_hooks(model)
    handle = layer2.register_forward_hook(boom)
    try:
        with pytest.raises(ValueError, match="boom"), torch.no_grad(), bank.attach(
                model, max_tokens=6, defer=8) as run:
            generate(model, ids, mask, 6)
    finally:
        handle.remove()
    assert count_hooks(model) == before
    got = run.results()
    assert got.scores.shape[1] == 3 and torch.equal(got.valid, want.valid)
    assert torch.allclose(got.scores, want.scores, atol=1e-5)


def test_bad_inputs_give_clear_errors():
    model = tiny_model("llama", layers=4)
    with pytest.raises(ValueError, match="d_model=16 but site 'layers.1'.* 32 wide"):
        ProbeBank().add("p", torch.randn(16), site="layers.1").attach(model)
    with pytest.raises(LookupError, match="unknown site 'layer.1'.*did you mean"):
        ProbeBank().add("p", torch.randn(D), site="layer.1").attach(model)
    with pytest.raises(ValueError, match="empty"):
        ProbeBank().attach(model)
    with pytest.raises(ValueError, match="already has a probe named 'p'"):
        ProbeBank().add("p", torch.randn(D), site="layers.1").add("p", torch.randn(D),
                                                                    site="layers.0")
    with pytest.raises(ValueError, match=r"bias of probe 'q' must have shape \(2,\)"):
        ProbeBank().add("q", torch.randn(2, D), torch.zeros(3), site="layers.0")
    with pytest.raises(ValueError, match="positions must be one of"):
        make_bank().attach(model, positions="first")
    with pytest.raises(ValueError, match="defer must be an int >= 0.*got -1"):
        make_bank().attach(model, defer=-1)
    with pytest.raises(ValueError, match="batch_size=2 .* has 3"), torch.no_grad(), \
            make_bank().attach(model, batch_size=2, max_tokens=4):
        model(input_ids=left_padded(PROMPTS)[0])
    with pytest.raises(ValueError, match="needs max_tokens"), torch.no_grad(), \
            make_bank().attach(model):
        model(input_ids=left_padded(PROMPTS)[0])
    with make_bank().attach(model, max_tokens=2, positions="prompt") as run:
        with pytest.raises(ValueError, match="positions='generated'"):
            run.early_exit("a", 0.0)
        with pytest.raises(LookupError, match="pass cls="):
            run.column("b")


def test_trained_probe_objects_and_probe_files(tmp_path):
    from residtap import probes

    model = tiny_model("llama", layers=4)
    g = torch.Generator().manual_seed(0)
    probe = probes.Probe("logistic", torch.randn(1, D, generator=g), torch.zeros(1),
                         classes=["neg", "pos"], site="layers.2")
    path = probes.save_probe(probe, tmp_path / "p.safetensors")
    bank = ProbeBank().add_probe(probe, name="mem").add_file(path, name="file")
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad(), residtap.capture(model, ["layers.2"], positions="last") as acts, \
            bank.attach(model, positions="last") as run:
        model(input_ids=ids, attention_mask=mask)
    want = probe.scores(acts["layers.2"])
    assert torch.allclose(run.results()["mem"][:, 0, 0], want, atol=1e-5)
    assert torch.allclose(run.results()["file"][:, 0, 0], want, atol=1e-5)


def test_bench_probes_quick_json_in_process(capsys, tmp_path):
    from residtap.cli import main

    assert main(["bench", "probes", "--quick", "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {r["scope"] for r in result["rows"]} == {"one", "all"}
    row = result["rows"][0]
    for key in ("baseline_tok_s", "naive_overhead_pct", "packed_overhead_pct", "floor_pct",
                "handler_pct", "tap_body_pct", "packed_spread_pct", "deferred_overhead_pct",
                "deferred_handler_pct", "deferred_tap_body_pct"):
        assert key in row
    assert (tmp_path / "bench_probes.json").is_file() and (tmp_path / "bench_probes.png").is_file()


def test_early_exit_curve_plumbing_on_a_tiny_model():
    """Tokens saved vs accuracy: full generation first, then fewer tokens as thresholds fall."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from residtap.organism.tokenizer import build_tokenizer
    from residtap.probes.early_exit_curve import early_exit_curve

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)).eval()
    bank = ProbeBank().add("truth", torch.randn(D), 0.0, site="layers.1")
    prompts = ["two plus two is four . hmm", "three plus one is nine . hmm",
               "one plus one is two ."]
    curve = early_exit_curve(model, tok, prompts, ["true", "false", "true"], bank, "truth",
                             [1e9, 0.0], classes=("false", "true"), patience=1,
                             max_new_tokens=5, batch_size=2)
    assert [c["threshold"] for c in curve] == [None, 1e9, 0.0]
    assert curve[0]["tokens_saved_frac"] == 0 and curve[1]["tokens"] == curve[0]["tokens"]
    assert curve[2]["stopped_frac"] == 1.0 and curve[2]["tokens"] == 1.0  # stops at token 0
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in curve)


def test_probes_recorded_model_is_checked_at_attach(tmp_path):
    """Issue 15: add_probe(load_probe(p)) and add_file without model= skipped the check."""
    from residtap.identity import model_identity
    from residtap.probes import Probe, load_probe, save_probe

    model, other = tiny_model("llama", layers=4), tiny_model("llama", layers=4, seed=1)
    probe = Probe("logistic", torch.randn(1, D), torch.zeros(1), classes=[0, 1], site="layers.2",
                  model=model_identity(model))
    path = save_probe(probe, tmp_path / "p.safetensors")
    banks = [ProbeBank().add_probe(load_probe(path)), ProbeBank().add_file(path),
             ProbeBank().add("raw", torch.randn(D), site="layers.2",
                             model=model_identity(model))]
    ids, mask = left_padded(PROMPTS)
    for bank in banks:
        with pytest.raises(ValueError, match="probe '.*' was made on other weights"):
            bank.attach(other, positions="last")
        with torch.no_grad(), bank.attach(model, positions="last") as run:
            model(input_ids=ids, attention_mask=mask)
        assert run.results().scores.shape == (3, 1, 1)
    with torch.no_grad(), banks[0].attach(other, positions="last",
                                          allow_other_weights=True) as run:
        other(input_ids=ids, attention_mask=mask)
    small = tiny_model("llama", layers=4, d=16)
    with pytest.raises(ValueError, match="config hash"):
        banks[1].attach(small)


@pytest.mark.parametrize("positions", ["last", "generated"])
def test_an_all_padding_row_is_never_scored_and_capture_last_refuses_it(positions):
    """Before: the bank read a pad position and marked it valid with a score, while capture's
    positions='last' read position 0. Now the bank marks the row's slot not valid (as under
    torch.compile, and without a host read), and capture's 'last' refuses it, naming the row."""
    model, bank = tiny_model("llama", layers=4), make_bank()
    ids, mask = left_padded(PROMPTS)
    mask[1] = 0  # row 1: nothing but padding
    with torch.no_grad(), bank.attach(model, positions=positions, max_tokens=2,
                                      aggregate="max") as run:
        model(input_ids=ids, attention_mask=mask)
    got = run.results()
    assert got.valid[:, 0].tolist() == [True, False, True]
    assert torch.isinf(got.aggregates["max"][1]).all()  # nothing aggregated for the empty row
    assert got.rows()[1]["a"].numel() == 0
    with torch.no_grad(), residtap.capture(model, ["layers.1"], positions="last") as acts:
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="row 1 has no real token"):
        _ = acts["layers.1"]
    with torch.no_grad(), bank.attach(model, positions="prompt") as run:  # pads: not valid
        model(input_ids=ids, attention_mask=mask)
    assert not run.results().valid[1].any() and run.results().valid[0].all()


def test_under_compile_an_all_padding_row_is_marked_not_valid():
    """A traced forward cannot raise on a device value: the row's slot is not valid instead."""
    import torch._dynamo as dynamo

    model, bank = tiny_model("llama", layers=2), ProbeBank()
    bank.add("a", torch.randn(D), 0.5, site="layers.0")
    ids, mask = left_padded(PROMPTS)
    mask[1] = 0

    def forward(x, m):
        return model(input_ids=x, attention_mask=m, use_cache=False).logits

    try:
        dynamo.reset()
        with torch.no_grad(), bank.attach(model, batch_size=3, max_tokens=1,
                                          positions="last", aggregate="max") as run:
            torch.compile(forward, fullgraph=True, backend="aot_eager")(ids, mask)
            got = run.results()
    finally:
        dynamo.reset()
    assert got.valid[:, 0].tolist() == [True, False, True]
    assert torch.isinf(got.aggregates["max"][1]).all()  # nothing aggregated for the empty row
