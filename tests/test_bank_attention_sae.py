"""Attention probes and SAE features inside a probe bank, against independent oracles.

- an attention probe's score after every token equals `AttentionProbe.scores` (a plain softmax
  over the whole prefix) on that prefix of the captured activations, for every positions mode,
  with and without the deferred readout, greedy and sampled, batch 3 with left padding;
- SAE features in the bank equal the columns of the full encoding (a float64 reference of the
  SAELens formula for ReLU, JumpReLU and TopK over every feature), and a TopK subset equals
  relu of the pre-activation, as documented; a folded probe equals the probe on the encoding;
- compiled generate (torch.compile of model.forward) builds no more graphs than without the bank
  and equals eager; a compiled forward has no graph break;
- early exit and aggregates read these columns like linear ones; a new run resets the streams;
- files: attention-probe files, SAE folders and probes trained on a feature store go in through
  `add_file`.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import left_padded, stop_tokens, tiny_model

import residtap
from residtap.probes import Probe, save_probe
from residtap.probes.attention import AttentionProbe
from residtap.probes.bank import ProbeBank
from residtap.sae import SAE, save_sae
from residtap.sae.features import SAEFeatures

D = 32
PROMPTS = [[5, 9, 13, 22, 40, 7], [8, 31], [11, 12, 60, 4]]  # different lengths: left padding


def attention_probe(heads: int, outputs: int, position: str, seed: int,
                    site: str = "layers.2") -> AttentionProbe:
    g = torch.Generator().manual_seed(seed)
    classes = ["no", "yes"] if outputs == 1 else [f"c{i}" for i in range(outputs)]
    return AttentionProbe(query=torch.randn(heads, D, generator=g) / 3,
                          position_weight=0.3 * torch.randn(heads, generator=g),
                          value=torch.randn(heads, outputs, D, generator=g) / 4,
                          bias=torch.randn(outputs, generator=g), classes=classes,
                          position=position, site=site)


def random_sae(architecture: str, d_sae: int = 48, seed: int = 0, site: str = "layers.1") -> SAE:
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if architecture == "jumprelu":
        extra["threshold"] = 0.5 * torch.rand(d_sae, generator=g)
    if architecture == "topk":
        extra["k"] = 5
    return SAE(W_enc=torch.randn(D, d_sae, generator=g) / 3,
               b_enc=0.1 * torch.randn(d_sae, generator=g),
               W_dec=torch.randn(d_sae, D, generator=g), b_dec=0.1 * torch.randn(D, generator=g),
               architecture=architecture, site=site, **extra)


def reference_encode(sae: SAE, h: torch.Tensor) -> torch.Tensor:
    """SAELens's formula in float64, written out: (h - b_dec) W_enc + b_enc, then the activation."""
    pre = (h.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
    if sae.architecture == "standard":
        return pre.clamp(min=0)
    if sae.architecture == "jumprelu":
        return torch.where(pre > sae.threshold.double(), pre.clamp(min=0), 0.0)
    values, indices = pre.topk(sae.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.clamp(min=0))


def mixed_bank() -> tuple[ProbeBank, dict[str, AttentionProbe]]:
    """Two attention probes and a linear probe at layers.2, a linear probe at layers.1."""
    g = torch.Generator().manual_seed(7)
    attention = {"att": attention_probe(3, 1, "from_end", 1),
                 "multi": attention_probe(2, 4, "from_start", 2)}
    bank = ProbeBank().add("lin", torch.randn(D, generator=g), 0.5, site="layers.2")
    for name, probe in attention.items():
        bank.add_probe(probe, name=name)
    bank.add("other", torch.randn(2, D, generator=g), None, site="layers.1")
    return bank, attention


def generate(model, ids, mask, n, **kw):
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, **kw}
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **kw)


def prefix_scores(probe: AttentionProbe, x: torch.Tensor, mask: torch.Tensor,
                  ends: list[int]) -> torch.Tensor:
    """(B, len(ends), C): the offline probe on each row's tokens 0..end (its real ones);
    NaN where the prefix has no real token."""
    B = x.shape[0]
    out = torch.full((B, len(ends), probe.n_outputs), math.nan)
    for b in range(B):
        for j, end in enumerate(ends):
            m = mask[b:b + 1, :end + 1]
            if m.any():
                out[b, j] = probe.scores(x[b:b + 1, :end + 1], m).reshape(-1)
    return out


CASES = [("generated", 0, False), ("generated", 0, True), ("generated", 2, True),
         ("all", 0, True), ("all", 2, False), ("prompt", 0, False), ("last", 0, False)]


@pytest.mark.parametrize(("positions", "defer", "sample"), CASES)
def test_attention_probe_scores_equal_the_offline_probe_on_every_prefix(positions, defer,
                                                                         sample):
    model, n = tiny_model("llama", layers=4), 5
    bank, attention = mixed_bank()
    ids, mask = left_padded(PROMPTS)
    B, Tp = ids.shape
    slots = {"generated": n, "last": 1, "prompt": Tp, "all": Tp + n - 1}[positions]
    torch.manual_seed(3)  # sampling: the bank must follow whatever tokens are drawn
    with torch.no_grad(), residtap.capture(model, ["layers.1", "layers.2"]) as acts, \
            bank.attach(model, batch_size=B, max_tokens=slots, positions=positions,
                        aggregate=("max", "mean"), defer=defer) as run:
        generate(model, ids, mask, n, do_sample=sample, top_k=0)
    res = run.results()
    x = acts["layers.2"]  # (B, Tp + n - 1, d): every fed position
    full = torch.cat([mask, torch.ones(B, n - 1, dtype=mask.dtype)], 1).bool()
    ends = {"generated": list(range(Tp - 1, Tp + n - 1)), "last": [Tp - 1],
            "prompt": list(range(Tp)), "all": list(range(Tp + n - 1))}[positions]
    for name, probe in attention.items():
        want = prefix_scores(probe, x, full, ends)  # (B, slots, C)
        got = res[name]
        assert got.shape == want.shape
        valid = res.valid
        assert not want[valid].isnan().any()
        torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=1e-5)
        cols = run.probe_columns[name]
        for b in range(B):  # aggregates over each row's valid slots read these columns too
            torch.testing.assert_close(res.aggregates["max"][b, cols],
                                       want[b][valid[b]].amax(0), atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(res.aggregates["mean"][b, cols],
                                       want[b][valid[b]].mean(0), atol=2e-5, rtol=1e-5)
    linear = bank.probes[0]
    lin_want = (x[:, ends] @ linear.weight.T + linear.bias)[..., 0]
    torch.testing.assert_close(res["lin"][..., 0][res.valid], lin_want[res.valid], atol=1e-5,
                               rtol=1e-5)


def test_bank_columns_and_their_names():
    bank, attention = mixed_bank()
    model = tiny_model("llama", layers=4)
    # matmul columns: 1 + (3 + 3) + (2 + 2 * 4) + 2; score columns: 1 + 1 + 4 + 2
    assert bank.n_columns == 1 + 6 + 10 + 2 and bank.n_scores == 8
    packs, names, columns, _ = bank.layout(model)
    assert names == ["lin", "att", "multi:c0", "multi:c1", "multi:c2", "multi:c3", "other:0",
                     "other:1"]
    site2 = next(p for p in packs if p.site.name == "layers.2")
    assert site2.weight.shape == (1 + 6 + 10, D) and site2.n_linear == 1 and site2.streams
    assert columns["multi"] == [2, 3, 4, 5]
    linear_only = next(p for p in packs if p.site.name == "layers.1")
    assert linear_only.segments == [] and linear_only.n_linear == 2


def test_a_new_run_resets_the_streams():
    """Two generate calls in one attach: the second run's scores equal a fresh attach's."""
    model, n = tiny_model("llama", layers=4), 4
    bank, _ = mixed_bank()
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad(), bank.attach(model, batch_size=3, max_tokens=n) as run:
        generate(model, ids[:, 1:], mask[:, 1:], n)
        generate(model, ids, mask, n)
        second = run.results()
    with torch.no_grad(), bank.attach(model, batch_size=3, max_tokens=n) as run:
        generate(model, ids, mask, n)
    assert torch.equal(second.scores, run.results().scores)


@pytest.mark.parametrize(("architecture", "features", "approximate"), [
    ("standard", [3, 7, 40, 11], False), ("jumprelu", [0, 5, 47], False),
    ("topk", None, False), ("topk", [2, 9, 30], True)])
@pytest.mark.parametrize("defer", [0, 2])
def test_sae_features_equal_the_full_encodings_columns(architecture, features, approximate,
                                                       defer):
    model, n = tiny_model("llama", layers=4), 4
    sae = random_sae(architecture)
    bank = ProbeBank().add_sae(sae, features, name="f", approximate_topk=approximate)
    ids, mask = left_padded(PROMPTS)
    B, Tp = ids.shape
    with torch.no_grad(), residtap.capture(model, ["layers.1"]) as acts, \
            bank.attach(model, batch_size=B, max_tokens=Tp + n - 1, positions="all",
                        defer=defer) as run:
        generate(model, ids, mask, n)
    res = run.results()
    h = acts["layers.1"]  # (B, Tp + n - 1, d)
    idx = list(range(sae.d_sae)) if features is None else features
    if approximate:  # documented: relu of the pre-activation of the selected features
        pre = (h.double() - sae.b_dec.double()) @ sae.W_enc[:, idx].double() + sae.b_enc[idx]
        want = pre.clamp(min=0)
    else:
        want = reference_encode(sae, h)[..., idx]
    assert res["f"].shape == (B, Tp + n - 1, len(idx))
    v = res.valid
    torch.testing.assert_close(res["f"][v].double(), want[v], atol=1e-5, rtol=1e-5)
    assert run.names[:2] == [f"f:{idx[0]}", f"f:{idx[1]}"]
    if not approximate:  # the library's own full-width encoding agrees
        torch.testing.assert_close(sae.encode(h)[..., idx].double(), want, atol=1e-5, rtol=1e-5)


def test_a_subset_of_a_topk_sae_is_refused_without_approximate_topk():
    with pytest.raises(ValueError, match="approximate_topk=True"):
        ProbeBank().add_sae(random_sae("topk"), [1, 2])


def test_a_folded_probe_equals_the_probe_on_the_encoded_features():
    model, n = tiny_model("llama", layers=4), 5
    sae = random_sae("jumprelu")
    idx = [4, 8, 15, 16, 23]
    g = torch.Generator().manual_seed(5)
    probe = Probe("multinomial", torch.randn(3, len(idx), generator=g), torch.randn(3, generator=g),
                  classes=["a", "b", "c"], site="layers.1/sae")
    bank = ProbeBank().add_sae(sae, idx, name="folded", probe=probe)
    assert bank.n_columns == len(idx) and bank.n_scores == 3
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad(), residtap.capture(model, ["layers.1"]) as acts, \
            bank.attach(model, max_tokens=n) as run:
        generate(model, ids, mask, n, do_sample=True, top_k=0)
    h = acts["layers.1"][:, ids.shape[1] - 1:]  # the generated slots' positions
    want = reference_encode(sae, h)[..., idx] @ probe.weight.double().T + probe.bias.double()
    torch.testing.assert_close(run.results()["folded"].double(), want, atol=1e-5, rtol=1e-5)
    assert run.names == ["folded:a", "folded:b", "folded:c"]
    with pytest.raises(ValueError, match=r"needs weight \(C, 3\), got \(3, 5\)"):
        ProbeBank().add_sae(sae, idx[:3], probe=probe)


@pytest.mark.parametrize("defer", [0, 2])
def test_compiled_generate_equals_eager_and_builds_no_more_graphs(defer):
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter

    ids, mask = left_padded(PROMPTS)
    n = 6

    def bank() -> ProbeBank:
        b, _ = mixed_bank()
        return b.add_sae(random_sae("jumprelu"), [1, 4, 9], name="f")

    @dynamo.config.patch(skip_nnmodule_hook_guards=False)  # what residtap asks of compile
    def run_generate(compiled: bool, with_bank: bool):
        model, counter = tiny_model("llama", layers=4), CompileCounter()
        dynamo.reset()
        if compiled:  # CompileCounter: counts graphs, runs them eagerly (no C++ build)
            model.forward = torch.compile(model.forward, backend=counter)
        try:
            with torch.no_grad():
                if not with_bank:
                    return generate(model, ids, mask, n), None, counter.frame_count
                with bank().attach(model, batch_size=3, max_tokens=n, defer=defer,
                                   aggregate=("max", "ema")) as run:
                    out = generate(model, ids, mask, n)
                return out, run.results(), counter.frame_count
        finally:
            dynamo.reset()

    _, _, baseline_graphs = run_generate(True, False)
    eager_out, eager, _ = run_generate(False, True)
    out, got, graphs = run_generate(True, True)
    assert baseline_graphs >= 2 and graphs <= baseline_graphs, (graphs, baseline_graphs)
    assert torch.equal(out, eager_out) and torch.equal(got.valid, eager.valid)
    torch.testing.assert_close(got.scores, eager.scores, atol=1e-5, rtol=1e-5)
    for name, agg in eager.aggregates.items():
        torch.testing.assert_close(got.aggregates[name], agg, atol=1e-5, rtol=1e-5)


def test_a_compiled_forward_has_no_graph_break():
    import torch._dynamo as dynamo

    model = tiny_model("llama", layers=4)
    bank, _ = mixed_bank()
    bank.add_sae(random_sae("topk"), None, name="f")
    ids, mask = left_padded(PROMPTS)

    def forward(x, m):
        return model(input_ids=x, attention_mask=m, use_cache=False).logits

    with torch.no_grad(), bank.attach(model, batch_size=3, max_tokens=ids.shape[1],
                                      positions="prompt") as run:
        dynamo.reset()
        explained = dynamo.explain(forward)(ids, mask)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, [
            str(r.reason)[:200] for r in explained.break_reasons]
        forward(ids, mask)
        eager = run.results()
        dynamo.reset()
        torch.compile(forward, fullgraph=True, backend="aot_eager")(ids, mask)
        got = run.results()
        dynamo.reset()
    torch.testing.assert_close(got.scores, eager.scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("probe", "cls"), [("att", None), ("f", 9)])
@pytest.mark.parametrize("defer", [0, 3])
def test_early_exit_on_attention_and_sae_columns_stops_exactly_the_crossing_rows(probe, cls,
                                                                                 defer):
    model, n, patience = tiny_model("llama", layers=4), 8, 2
    bank, _ = mixed_bank()
    bank.add_sae(random_sae("standard", seed=3), [9, 21], name="f", site="layers.3")
    ids, mask = left_padded(PROMPTS)
    kw = {"eos_token_id": 2, "pad_token_id": 0}
    with torch.no_grad(), bank.attach(model, max_tokens=n) as run:
        base = generate(model, ids, mask, n, **kw)
    score = run.results().scores[..., run.column(probe, cls)]  # (B, n)
    for threshold in torch.quantile(score, torch.linspace(0.3, 0.95, 14)).tolist():
        stop_at = stop_tokens(score, threshold, patience)
        if 0 < sum(s >= 0 for s in stop_at) < len(PROMPTS):
            break
    else:
        pytest.fail(f"no threshold splits the rows; scores {score}")
    with torch.no_grad(), bank.attach(model, max_tokens=n, defer=defer) as run:
        stop = run.early_exit(probe, threshold, patience=patience, cls=cls)
        out = generate(model, ids, mask, n, stopping_criteria=[stop], **kw)
    assert stop.report().stop_token == stop_at
    Tp = ids.shape[1]
    for b, k in enumerate(stop_at):
        kept = n if k < 0 else k + 1
        assert torch.equal(out[b, Tp:Tp + kept], base[b, Tp:Tp + kept])


def test_files_attention_probes_sae_folders_and_feature_probes(tmp_path):
    """add_file takes an attention-probe file, an SAE folder (its features), and a probe on a
    feature store (with its SAE); each equals the same thing added from memory."""
    from residtap.identity import model_identity
    from residtap.sae.store import encode_store, train_feature_probe
    from residtap.store.extract import extract

    model = tiny_model("llama", layers=4)
    att = attention_probe(2, 1, "from_end", 4)
    att.model = model_identity(model)
    att_path = save_probe(att, tmp_path / "answer.safetensors")
    sae = random_sae("standard", seed=2)
    sae_dir = save_sae(sae, tmp_path / "sae", model=model)
    data = [{"input_ids": p, "label": ["x", "y"][i % 2], "split": ["train", "test"][i // 2 % 2]}
            for i, p in enumerate(PROMPTS * 6)]
    store = extract(model, None, data, ["layers.1"], tmp_path / "acts", positions="last",
                    progress=False)
    feats = encode_store(store, sae, tmp_path / "feats", features=[3, 5, 8], shard_rows=4,
                         progress=False)
    assert len(feats.manifest["shards"]) > 1  # split at sample boundaries
    torch.testing.assert_close(feats["layers.1/sae"], sae.encode(store["layers.1"])[:, [3, 5, 8]])
    probe = train_feature_probe(feats, "label")
    assert probe.metadata["sae"]["features"] == [3, 5, 8]
    probe_path = save_probe(probe, tmp_path / "on_features.safetensors")

    with pytest.raises(ValueError, match="pass that SAE"):
        ProbeBank().add_file(probe_path)
    with pytest.raises(ValueError, match="reads SAE features"):
        ProbeBank().add_probe(probe)
    from_files = (ProbeBank().add_file(att_path).add_file(sae_dir, features=[3, 5])
                  .add_file(probe_path, sae=sae_dir))
    from_memory = (ProbeBank().add_probe(att, name="answer").add_sae(sae, [3, 5], name="sae")
                   .add_sae(sae, [3, 5, 8], probe=probe, name="on_features"))
    assert from_files.names == from_memory.names == ["answer", "sae", "on_features"]
    ids, mask = left_padded(PROMPTS)
    results = []
    for bank in (from_files, from_memory):
        with torch.no_grad(), bank.attach(model, max_tokens=3) as run:
            generate(model, ids, mask, 3)
        results.append(run.results().scores)
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-6)
    other = tiny_model("llama", layers=4, seed=1)
    with pytest.raises(ValueError, match="other weights"):
        from_files.attach(other)


def test_sae_features_object_refusals():
    sae = random_sae("standard")
    with pytest.raises(ValueError, match="repeat an index"):
        SAEFeatures.select(sae, [1, 1])
    with pytest.raises(ValueError, match=r"feature indices must be in 0..47 \(d_sae\), got min 48"):
        SAEFeatures.select(sae, [48])
    with pytest.raises(TypeError, match="expected a residtap.sae.SAE"):
        SAEFeatures.select(object(), [1])


def test_on_the_organism_an_attention_probe_exits_early_within_two_points_saving_half(tmp_path):
    """The organism's early-exit set (residtap/organism/data/early_exit.jsonl): an attention probe
    trained by residtap's trainer on the set's store (training texts, every token, layers.4)
    chooses its threshold on training prompts; on the held-out prompts its answer accuracy is
    within 0.02 of full generation's while it saves at least half of the generated tokens."""
    from residtap import organism
    from residtap.inputs import read_jsonl
    from residtap.probes.attention_store import train_store_attention_probe
    from residtap.probes.early_exit_curve import compare_exit_curves
    from residtap.store.extract import extract

    model, tok = organism.load()
    data = organism.DATA_DIR / "early_exit.jsonl"
    store = extract(model, tok, data, ["layers.4"], tmp_path / "all", positions="all",
                    progress=False)
    probe = train_store_attention_probe(store, "label", "layers.4", progress=False)
    assert probe.metrics["test"]["accuracy"] > 0.95
    rows = read_jsonl(data)
    train = [r for r in rows if r["split"] == "train"][:200]
    test = [r for r in rows if r["split"] == "test"]
    bank = ProbeBank().add_probe(probe, name="answer")
    curves = compare_exit_curves(model, tok, test, {"attention": (bank, "answer")},
                                 [8.0, 4.0, 2.0, 1.0], classes=("false", "true"), patience=1,
                                 choose_rows=train)
    full, chosen = curves["attention"]["curve"][0], curves["attention"]["chosen"]
    print("attention probe exit curve on the held-out prompts:", curves["attention"]["curve"])
    assert chosen is not None, curves["attention"]["choice_curve"]
    assert chosen["accuracy"] >= full["accuracy"] - 0.02, (chosen, full)
    assert chosen["tokens_saved_frac"] >= 0.5, chosen


def test_cost_columns_count_what_the_bank_packs(tmp_path):
    """residtap.cost.columns: an attention probe is H + H*C columns, an SAE feature 1, a folded
    probe adds 2kC FLOPs after the matmul; the count equals the rows of the bank's packed
    weights, site by site, from objects and from files alike."""
    from residtap.cost import count_columns, estimate_cost

    model = tiny_model("llama", layers=4)
    bank, attention = mixed_bank()
    sae = random_sae("standard")
    probe = Probe("logistic", torch.randn(1, 3), torch.zeros(1), classes=[0, 1],
                  metadata={"sae": SAEFeatures.select(sae, [1, 2, 3]).describe()})
    bank.add_sae(sae, [1, 2, 3], name="folded", probe=probe).add_sae(sae, [5, 6], name="raw")
    count = count_columns([bank])
    packs = bank.layout(model)[0]
    assert count.columns == bank.n_columns == sum(p.weight.shape[0] for p in packs)
    assert count.per_site == {p.site.name: p.weight.shape[0] for p in packs}
    kinds = {i["name"]: (i["kind"], i["columns"], i["readout_flops"]) for i in count.items}
    assert kinds["att"] == ("attention", 3 + 3, 8 * 3 + 16 * 3)
    assert kinds["multi"] == ("attention", 2 + 8, 8 * 2 + 16 * 8)
    assert kinds["folded"] == ("sae probe", 3, 3 + 2 * 3 * 1)
    assert kinds["raw"] == ("sae", 2, 2) and kinds["lin"] == ("linear", 1, 0.0)

    att_file = save_probe(attention["multi"], tmp_path / "multi.safetensors")
    folder = save_sae(sae, tmp_path / "sae")
    probe_file = save_probe(probe, tmp_path / "folded.safetensors")
    from_files = count_columns([att_file, folder, probe_file], features=[5, 6])
    assert [(i["name"], i["columns"]) for i in from_files.items] == [
        ("multi", 10), ("sae", 2), ("folded", 3)]
    assert from_files.per_site == {"layers.2": 10, "layers.1": 5}
    plain = estimate_cost(model.config, n_probes=15, sites=1, positions="generated")
    more = estimate_cost(model.config, n_probes=15, sites=1, positions="generated",
                         readout_flops=from_files.readout_flops)
    assert more.probe_flops - plain.probe_flops == pytest.approx(
        plain.reads_per_forward * from_files.readout_flops)
