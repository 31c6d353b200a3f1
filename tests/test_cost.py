"""residtap.cost: exact parameter counts, hand-checked overheads, `residtap cost`, errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import transformers as tf
from conftest import FAMILIES, family_config
from torch import nn

from residtap import presets
from residtap.cli import main
from residtap.cost import HARDWARE, estimate_cost, model_shape

V = 96  # tiny vocabulary
LLAMA_LIKE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip

# Tiny configs covering every counting rule: GQA, biases, qk-norms, four norms per layer, fused
# projections, learned positions, OPT's projections, tied and untied unembeddings.
TINY_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**LLAMA_LIKE),
    "llama-biases-tied": lambda: tf.LlamaConfig(**LLAMA_LIKE, attention_bias=True, mlp_bias=True,
                                                tie_word_embeddings=True),
    "llama-head-dim": lambda: tf.LlamaConfig(**LLAMA_LIKE, head_dim=16),
    "mistral": lambda: tf.MistralConfig(**LLAMA_LIKE, sliding_window=8),
    "qwen2": lambda: tf.Qwen2Config(**LLAMA_LIKE),
    "qwen3-tied": lambda: tf.Qwen3Config(**LLAMA_LIKE, head_dim=8, tie_word_embeddings=True),
    "qwen3-untied": lambda: tf.Qwen3Config(**LLAMA_LIKE, head_dim=8, attention_bias=True),
    "gemma2": lambda: tf.Gemma2Config(**LLAMA_LIKE, head_dim=8),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**LLAMA_LIKE, head_dim=8, sliding_window=4),
    "phi3": lambda: tf.Phi3Config(**LLAMA_LIKE, pad_token_id=0),
    "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt2-untied-inner": lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                               n_inner=40, tie_word_embeddings=False),
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4),
    "gpt_neox-nobias-tied": lambda: tf.GPTNeoXConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, attention_bias=False, tie_word_embeddings=True),
    "opt": lambda: tf.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                num_attention_heads=4, word_embed_proj_dim=32,
                                max_position_embeddings=64),
    "opt-projections-untied": lambda: tf.OPTConfig(
        vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=16, max_position_embeddings=64, tie_word_embeddings=False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_parameter_count_equals_the_built_model(name: str) -> None:
    config = TINY_CONFIGS[name]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    shape = model_shape(config)
    assert shape.n_params == sum(p.numel() for p in model.parameters()), shape.parts

    # Lookup tables, found independently: every nn.Embedding whose weight is not the unembedding.
    unembedding = model.get_output_embeddings().weight
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    lookup = sum(t.numel() for t in tables if t is not unembedding)
    assert shape.lookup_params == lookup
    assert shape.unembedding_params == unembedding.numel()
    assert shape.tied_embeddings == (model.get_input_embeddings().weight is unembedding)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_counts_like_the_built_model(family: str) -> None:
    """No per-architecture counter: the meta-device model and residtap.arch's parts."""
    config = family_config(family)
    model = tf.AutoModelForCausalLM.from_config(config)
    shape = model_shape(config)
    assert shape.n_params == sum(p.numel() for p in model.parameters()), shape.parts
    assert shape.n_layers == config.num_hidden_layers if hasattr(config, "num_hidden_layers") \
        else shape.n_layers == config.n_layer
    assert shape.parts.get("attention", 0) > 0 and shape.parts.get("mlp", 0) > 0, shape.parts


def test_mixture_of_experts_counts_active_experts_for_flops() -> None:
    config = family_config("mixtral")  # 4 experts, top 2
    model = tf.AutoModelForCausalLM.from_config(config)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in f".{n}.")
    shape = model_shape(config)
    assert shape.expert_params == experts > 0 and shape.active_experts == 0.5
    assert shape.active_matmul_params == shape.matmul_params - experts // 2


def test_a_saved_config_folder_gives_the_same_count(tmp_path) -> None:
    config = TINY_CONFIGS["qwen3-tied"]()
    config.save_pretrained(tmp_path)
    expected = model_shape(config).n_params
    assert model_shape(tmp_path).n_params == expected
    assert model_shape(tmp_path / "config.json").n_params == expected
    assert model_shape(json.loads((tmp_path / "config.json").read_text())).n_params == expected


def test_presets_have_their_published_sizes() -> None:
    # Published parameter counts (model cards), to three significant figures.
    published = {"Llama-3.1-8B": 8.03e9, "Llama-3.1-70B": 70.6e9, "Qwen3-4B": 4.02e9,
                 "Qwen3-14B": 14.8e9, "Qwen3-32B": 32.8e9, "Gemma-2-2B": 2.61e9,
                 "GPT-2": 124e6}  # fmt: skip
    assert set(published) == set(presets.PRESETS)
    for name, size in published.items():
        assert model_shape(name).n_params == pytest.approx(size, rel=5e-3), name
    assert model_shape("GPT-2").n_params == 124_439_808
    assert model_shape("gemma-2-2b").n_params == 2_614_341_888  # any case, or the hub id's tail


def test_llama_3_1_8b_by_hand() -> None:
    """1000 probes at all 32 layers, every generated token, batch 1, 128 + 64 tokens, bf16."""
    d, layers, heads, kv, hd, ff, vocab = 4096, 32, 32, 8, 128, 14336, 128256
    per_layer = 2 * d * heads * hd + 2 * d * kv * hd + 3 * d * ff + 2 * d
    params = layers * per_layer + d + 2 * vocab * d  # + final norm, embedding, lm_head
    assert params == 8_030_261_248

    matmul = params - vocab * d  # the embedding table is a lookup, the lm_head a matmul
    mean_keys = (129 + 192) / 2  # decode steps see 129 .. 192 keys
    model_flops = 2 * matmul + 4 * layers * heads * hd * mean_keys
    probe_flops = 1000 * 32 * (2 * d + 1)
    model_bytes = 2 * matmul + 2 * layers * 2 * kv * hd * mean_keys  # weights + KV read, bf16
    probe_bytes = 2 * 1000 * 32 * (d + 1) + 2 * 1000 * 32  # weights and biases + scores

    r = estimate_cost("Llama-3.1-8B", n_probes=1000, sites="all", positions="generated")
    assert (r.n_params, r.n_sites, r.n_readouts) == (params, 32, 32_000)
    assert r.model_flops == pytest.approx(model_flops, rel=1e-12)
    assert r.probe_flops == probe_flops
    assert r.arithmetic_overhead == pytest.approx(probe_flops / model_flops, rel=1e-12)
    assert r.bytes_overhead == pytest.approx(probe_bytes / model_bytes, rel=1e-12)
    assert 0.017 < r.arithmetic_overhead < 0.018  # ~1.7%: a thousand probes per layer is not free

    dense_only = estimate_cost("Llama-3.1-8B", n_probes=1000, sites="all",
                               positions="generated", attention_flops=False)  # fmt: skip
    assert dense_only.arithmetic_overhead == pytest.approx(probe_flops / (2 * matmul), rel=1e-12)
    # The seed's "one probe is ~0.00006% of the forward pass" (a ~7-8B model, d_model 4096):
    one = estimate_cost("Llama-3.1-8B", n_probes=1, sites="one", positions="generated",
                        probe_bias=False, attention_flops=False)  # fmt: skip
    assert one.arithmetic_overhead == pytest.approx(2 * d / (2 * matmul), rel=1e-12)


def test_prefill_by_hand_on_gpt2() -> None:
    """positions='prompt': every prompt token read; the lm_head runs on the last position only."""
    d, layers, vocab, b, p = 768, 12, 50257, 2, 10
    r = estimate_cost("GPT-2", n_probes=3, sites=2, positions="prompt", batch_size=b,
                      prompt_len=p, dtype_bytes=4)  # fmt: skip
    matmul = 124_439_808 - 1024 * d  # tied: only the position table is a lookup
    dense = 2 * ((matmul - vocab * d) * b * p + vocab * d * b)
    attention = 4 * d * layers * b * sum(range(1, p + 1))
    assert r.model_flops == pytest.approx(dense + attention, rel=1e-12)
    assert r.probe_flops == b * p * 3 * 2 * (2 * d + 1)
    kv_written = b * p * layers * 2 * d * 4
    probe_bytes = 4 * 3 * 2 * (d + 1) + 4 * b * p * 3 * 2
    assert r.bytes_overhead == pytest.approx(probe_bytes / (4 * matmul + kv_written), rel=1e-12)
    assert (r.phase, r.tokens_per_forward, r.reads_per_forward) == ("prefill", 20, 20)
    last = estimate_cost("GPT-2", n_probes=3, sites=2, positions="last", batch_size=b,
                         prompt_len=p)  # fmt: skip
    assert last.reads_per_forward == b


def test_sliding_windows_cap_the_attention_term() -> None:
    """Gemma-2 alternates 4096-token sliding layers (even indices) with full ones."""
    p, n = 5000, 4
    r = estimate_cost("Gemma-2-2B", n_probes=1, sites="one", positions="generated",
                      prompt_len=p, new_tokens=n)  # fmt: skip
    windows = [4096 if i % 2 == 0 else None for i in range(26)]
    keys = sum(min(c, w or c) for w in windows for c in range(p + 1, p + n + 1)) / n
    assert r.attention_flops_per_token == pytest.approx(4 * 8 * 256 * keys, rel=1e-12)


def test_latency_predictions_are_ordered_and_the_verdicts_follow() -> None:
    one = estimate_cost("Llama-3.1-8B", n_probes=1, sites="one", positions="generated")
    many = estimate_cost("Llama-3.1-8B", n_probes=1000, sites="all", positions="generated")
    for r in (one, many):
        assert r.baseline_s < r.packed_s < r.naive_s
        assert r.naive_s == pytest.approx(r.baseline_s + sum(r.naive_breakdown_s.values()))
    assert one.verdict_packed.startswith("negligible")
    assert many.verdict_packed.startswith("small")
    assert many.verdict_naive.startswith("prohibitive")
    assert "packed readout" in many.verdict and "naive hooks" in many.verdict
    # No graphs to lose on a CPU: the naive readout pays its host costs only.
    cpu = estimate_cost("GPT-2", n_probes=1, sites="one", positions="generated", hardware="cpu")
    assert cpu.naive_breakdown_s["eager_forward"] == 0
    slow_sync = dataclasses.replace(HARDWARE["h100"], sync_s=1e-3)
    slower = estimate_cost("Llama-3.1-8B", n_probes=1000, sites="all", positions="generated",
                           hardware=slow_sync)  # fmt: skip
    assert slower.naive_s > many.naive_s and slower.packed_s == many.packed_s


def test_report_leaves_room_for_measured_numbers() -> None:
    r = estimate_cost("Qwen3-4B", n_probes=16, sites="all", positions="last")
    out = r.to_dict()
    assert out["measured"] is None
    json.dumps(out)  # plain data all the way down
    for key in ("n_params", "arithmetic_overhead", "bytes_overhead", "packed_overhead",
                "naive_overhead", "verdict", "verdict_packed", "verdict_naive", "assumptions"):
        assert key in out


# ------------------------------------------------------------------------------------ the CLI


def test_cli_json_has_the_fields(capsys) -> None:
    code = main(["cost", "Llama-3.1-8B", "--probes", "1000", "--sites", "all",
                 "--positions", "generated", "--batch", "1", "--json"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    expected = estimate_cost("Llama-3.1-8B", n_probes=1000, sites="all", positions="generated")
    assert out == json.loads(json.dumps(expected.to_dict()))
    assert out["n_sites"] == 32 and out["verdict"].startswith("packed readout")


def test_cli_table_and_presets(capsys) -> None:
    assert main(["cost", "qwen3-14b", "--probes", "8", "--sites", "3", "--assume",
                 "sync_s=2e-5"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "Qwen3-14B" in text and "verdict: packed readout" in text and "latency, naive" in text
    assert main(["cost", "--list-presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(presets.PRESETS)
    assert main(["cost", "--list-presets"]) == 0
    assert "meta-llama/Llama-3.1-70B" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- bad input


def test_unknown_preset_lists_close_matches(capsys) -> None:
    with pytest.raises(LookupError, match=r"unknown preset 'llama-3.1-7b'.*'Llama-3.1-8B'"):
        estimate_cost("llama-3.1-7b", n_probes=1, sites="one", positions="last")
    assert main(["cost", "Qwen3-8B"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and "Qwen3-4B" in err and "available presets" in err


def test_missing_paths_and_unbuilt_organism_are_clear(tmp_path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        estimate_cost(str(tmp_path / "config.json"), n_probes=1, sites="one", positions="last")
    with pytest.raises(FileNotFoundError, match="has none"):
        estimate_cost(tmp_path, n_probes=1, sites="one", positions="last")
    monkeypatch.setattr(presets, "ORGANISM_CONFIG", tmp_path / "model" / "config.json")
    with pytest.raises(FileNotFoundError, match="organism.*not built"):
        estimate_cost("organism", n_probes=1, sites="one", positions="last")
    (tmp_path / "model").mkdir()
    TINY_CONFIGS["llama"]().save_pretrained(tmp_path / "model")
    assert estimate_cost("organism", n_probes=1, sites="one", positions="last").model == "organism"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_probes": 0}, r"n_probes to be a whole number >= 1, got 0"),
        ({"n_probes": 2.5}, r"n_probes to be a whole number"),
        ({"sites": "every"}, r"sites to be 'one', 'all' .* got 'every'"),
        ({"sites": 0}, r"positive number of sites, got 0"),
        ({"positions": "first"}, r"positions to be one of generated, last, prompt"),
        ({"batch_size": 0}, r"batch_size to be a whole number >= 1"),
        ({"dtype_bytes": 0}, r"dtype_bytes > 0"),
    ],
)
def test_bad_scope_says_what_was_expected(kwargs: dict, message: str) -> None:
    args = {"n_probes": 1, "sites": "one", "positions": "generated"} | kwargs
    with pytest.raises(ValueError, match=message):
        estimate_cost("GPT-2", **args)


def test_unsupported_architecture_and_hardware() -> None:
    vit = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48)  # fmt: skip
    with pytest.raises(LookupError, match=r"model_type 'vit'.*no causal language model"):
        model_shape(vit)
    with pytest.raises(ValueError, match="model_type"):
        model_shape({"hidden_size": 32})
    with pytest.raises(LookupError, match="unknown hardware 'tpu'; expected one of h100"):
        estimate_cost("GPT-2", n_probes=1, sites="one", positions="last", hardware="tpu")
    with pytest.raises(TypeError, match="expected a config"):
        model_shape(42)  # type: ignore[arg-type]


def test_cli_measure_puts_measured_numbers_beside_the_predicted(capsys) -> None:
    code = main(["cost", "organism", "--probes", "10", "--sites", "all", "--measure", "--json",
                 "--new-tokens", "4", "--prompt-len", "8", "--repeats", "1"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    measured = out["measured"]
    for key in ("baseline_s", "packed_s", "packed_overhead", "handler_fraction",
                "deferred_s", "deferred_overhead", "deferred_handler_fraction",
                "generate_baseline_s", "generate_packed_s"):
        assert math.isfinite(measured[key]), (key, measured)
    assert measured["baseline_s"] > 0 and measured["packed_s"] > 0 and measured["deferred_s"] > 0
    assert 0 <= measured["handler_fraction"] < 1 and 0 <= measured["deferred_handler_fraction"] < 1
    assert out["packed_s"] > 0 and out["hardware"] == "cpu" and out["dtype_bytes"] == 4
    assert main(["cost", "organism", "--probes", "10", "--sites", "all", "--measure",
                 "--new-tokens", "4", "--prompt-len", "8", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "measured on this machine" in text and "with defer=16" in text
    assert main(["cost", "GPT-2", "--measure"]) == 2
    assert "is a preset" in capsys.readouterr().err
