"""Predict what a bank of linear probes costs at inference, from a model's config alone.

    from residtap.cost import estimate_cost
    report = estimate_cost("Llama-3.1-8B", n_probes=1000, sites="all", positions="generated")
    print(report.verdict)   # packed readout +3.17% per decode step: small (1-10%); naive ...

A probe is one dot product per token against a hidden state the forward pass already made, so
its arithmetic is a rounding error; what costs is how the score leaves the forward pass
(shared/research/runtime-probes.md §0-§1). The report gives three ratios for one forward of the
phase the probes ride on: a decode step (B new tokens) for `positions="generated"`, the prefill
pass (B x prompt_len tokens) for `"last"` and `"prompt"`.

- arithmetic: probe FLOPs / model FLOPs. A probe costs 2*d_model (+1 with a bias) per token read.
  The model costs 2 FLOPs per weight multiplied: every parameter except the embedding-lookup
  tables (a lookup is not a matmul; a tied unembedding is, so it counts once, as the matmul). In
  prefill only the last position goes through the unembedding (as in `generate` and vLLM). With
  `attention_flops=True` (default) add QK^T and AV: 4 * d_attn * keys per layer and token, keys
  capped by sliding windows. (Kaplan et al. 2020, Table 1, count 2*n_layer*n_ctx*d_attn per
  token; on average over a causal sequence of n_ctx tokens, n_ctx/2 keys, the two agree.)
- bytes: probe weights read + scores written / model weights read (= matmul parameters x dtype,
  once per forward whatever the batch) + KV cache (read in decode, written in prefill).
- latency: a roofline on a hardware profile (`HARDWARE`) plus fixed host costs, for two
  implementations (see `_latency`):
  naive - one Python hook per probe and site, one small kernel each, one host sync per score.
    Hooks stop CUDA-graph replay, so decode runs eager, and each sync drains the GPU so host
    and device no longer overlap.
  packed - all probes at a site stacked into one (d_model, n_probes) matrix, one matmul per
    site inside the graph, scores kept on the device and copied out asynchronously.
  These are predictions from documented assumptions, not measurements; `CostReport.measured`
  is where measured numbers go beside them.

Published measurements to hold the predictions against (research/runtime-probes.md §2, §5):
hook-based vLLM decodes 4-11x slower than with CUDA graphs (interp-engine docs/PERFORMANCE.md:
Llama-3.1-8B 64.7 vs 278 tok/s, Gemma-2-2B 37.5 vs 399); graph-safe buffer taps land within
5-8% of vanilla at 4B/8B (same source); a GPU-resident readout with asynchronous export costs
0.4-6.8% offline, ~6% online (DMI-Lib); per-step `.cpu()` copies of hidden states made SGLang's
`return_hidden_states` 17x slower end to end (sgl-project/sglang#8003).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from residtap import presets

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

Positions = Literal["generated", "last", "prompt"]
POSITIONS: tuple[str, ...] = ("generated", "last", "prompt")


@dataclass(frozen=True)
class Hardware:
    """What the latency prediction assumes about the machine. Replace fields to taste:
    `dataclasses.replace(HARDWARE["h100"], sync_s=30e-6)`."""

    name: str
    mem_bandwidth: float  # bytes/s the weights stream at
    peak_flops: float  # FLOP/s for matmuls in the model dtype
    cuda_graphs: bool  # decode replays a captured graph (a serving engine's default)
    async_host: bool  # the host queues work ahead of the device (GPUs: yes; CPU: no)
    hook_s: float  # one Python forward-hook call
    launch_s: float  # host cost of one eager op / kernel launch
    sync_s: float  # one blocking device-to-host read of a score (`.item()`, `.cpu()`)
    graph_kernel_s: float  # one extra small kernel inside a replayed graph
    eager_layer_s: float  # host time to dispatch one decoder layer eagerly


# Host costs measured on residtap's 2-core CI VM (Xeon 2.5 GHz, torch 2.13 CPU, 2025):
# a no-op forward hook adds 0.8 us to a module call (3.7 us for the first hook on a module,
# which leaves PyTorch's hook-free fast path); one small matmul op costs ~4 us to dispatch; a
# `.item()` on a CPU tensor ~0.5 us; a transformers 5 Llama decoder layer ~1.2 ms eagerly.
_HOOK_S = 2e-6
_CPU_OP_S = 4e-6
# GPU host costs (assumptions; no GPU was measured): a kernel launch adds ~1-2 us of CUDA driver
# time to the op dispatch above; a blocking D2H read of a few bytes is a round trip through the
# driver plus a stream drain, ~10-20 us on current GPUs; a kernel inside a replayed graph ~2 us.
# Eager decode costs ~0.1 ms of host time per layer more than graph replay: interp-engine
# (decoderesearch/interp-engine docs/PERFORMANCE.md) measured gpt2 on vLLM at 608 tok/s eager vs
# 2,224 tok/s with CUDA graphs, 12 layers -> (1/608 - 1/2224)/12 = 0.10 ms. transformers' own
# eager layers cost more (see the CPU figure), so the naive prediction is a lower bound.
_GPU_HOST = dict(hook_s=_HOOK_S, launch_s=6e-6, sync_s=15e-6, graph_kernel_s=2e-6,
                 eager_layer_s=1e-4)  # fmt: skip

# Bandwidth and dense bf16 tensor-core peak from NVIDIA's datasheets (SXM parts); the "cpu"
# profile is the CI VM above (measured: ~10 GB/s streaming read, ~100 GFLOP/s fp32 matmul).
HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("h100", 3.35e12, 989e12, True, True, **_GPU_HOST),
    "h200": Hardware("h200", 4.8e12, 989e12, True, True, **_GPU_HOST),
    "a100": Hardware("a100", 2.039e12, 312e12, True, True, **_GPU_HOST),
    "cpu": Hardware("cpu", 10e9, 100e9, False, False, hook_s=_HOOK_S, launch_s=_CPU_OP_S,
                    sync_s=0.5e-6, graph_kernel_s=0.0, eager_layer_s=1.2e-3),
}  # fmt: skip

# Latency overhead bands for the verdict: (upper bound, word). At or above the last: prohibitive.
VERDICT_BANDS: tuple[tuple[float, str], ...] = (
    (0.01, "negligible (<1%)"),
    (0.10, "small (1-10%)"),
    (1.00, "significant (10-100%)"),
)


def percent(fraction: float) -> str:
    """0.0317 -> '3.17%', 164.8 -> '16,477%', 5.5e-7 -> '5.5e-05%'."""
    value = 100 * fraction
    if abs(value) >= 100:
        return f"{value:,.0f}%"
    return f"{value:.3g}%" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}%"


def verdict_for(overhead: float) -> str:
    """The verdict word for a fractional latency overhead (0.03 = +3%)."""
    for bound, word in VERDICT_BANDS:
        if overhead < bound:
            return word
    return "prohibitive (>=100%)"


# ---------------------------------------------------------------- model shape from a config


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder that cost depends on, counted exactly from its config: the
    model is built on the meta device (no memory, no weights) and its parameters are counted
    by the parts residtap.arch finds, the same entry sites and the lens use."""

    model_type: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    parts: dict[str, int]  # parameter count per component; sums to n_params
    lookup_params: int  # tables read by index: token embedding unless tied, learned positions
    unembedding_params: int  # the lm_head matrix (the embedding table when tied)
    windows: tuple[int | None, ...]  # per layer: sliding attention window, None for full
    expert_params: int = 0  # parameters of mixture-of-experts experts (all of them)
    active_experts: float = 1.0  # fraction of the experts each token runs (top-k / experts)

    @property
    def n_params(self) -> int:
        """Equals `sum(p.numel() for p in model.parameters())` (a tied table counted once)."""
        return sum(self.parts.values())

    @property
    def matmul_params(self) -> int:
        """Weights that multiply every token's activations: all but the lookup tables (for a
        mixture of experts, all experts: the weights a forward may read)."""
        return self.n_params - self.lookup_params

    @property
    def active_matmul_params(self) -> int:
        """Weights one token is multiplied by: a mixture of experts runs top-k experts only."""
        return self.matmul_params - round(self.expert_params * (1 - self.active_experts))

    @property
    def d_attn(self) -> int:
        return self.n_heads * self.head_dim


def _windows(cfg: PretrainedConfig, n_layers: int) -> tuple[int | None, ...]:
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * n_layers


def _first(cfg: PretrainedConfig, *keys: str) -> Any:
    return next((getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None), None)


def _kv_heads(cfg: PretrainedConfig, heads: int) -> int:
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        return 1  # Falcon-7B style
    return int(_first(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv") or heads)


def meta_model(cfg: PretrainedConfig) -> nn.Module:
    """The causal-LM model of `cfg` on the meta device: its modules and parameter shapes, no
    memory and no weights. LookupError when transformers has no causal LM for the config."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except ValueError as err:
        raise LookupError(
            f"cannot cost model_type {cfg.model_type!r}: transformers has no causal language "
            f"model for it ({str(err).splitlines()[0][:120]}); residtap costs decoders"
        ) from err


def model_shape(config: dict | PretrainedConfig | str | Path) -> ModelShape:
    """The exact parameter count and shape numbers of any decoder's config."""
    from residtap.arch import find
    from residtap.recording import kind_of

    cfg, _ = load_config(config)
    model = meta_model(cfg)
    layers = find(model).paths["layers"]
    blocks = model.get_submodule(layers)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    kinds = {id(m): ("unembedding", None) for m in [head] if m is not None and not tied}
    kinds[id(embed)] = ("embedding", None)
    for path, module in model.named_modules():
        if id(module) in kinds or path == layers or path.startswith(layers + "."):
            continue
        if isinstance(module, nn.Embedding):
            kinds[id(module)] = ("position_embedding", None)
        elif kind_of(path.rsplit(".", 1)[-1], type(module).__name__, False) == "norm":
            kinds[id(module)] = ("norms", None)
    for block in blocks:
        children = [(name, child, kind_of(name, type(child).__name__,
                                          any(True for _ in child.parameters())))
                    for name, child in block.named_children()]
        # no MLP module (OPT: fc1 and fc2 sit in the block): its other weights are the MLP
        rest = "mlp" if all(kind != "mlp" for *_, kind in children) else "other"
        for _, child, kind in children:
            group = {"attn": "attention", "mlp": "mlp", "norm": "norms"}.get(kind, rest)
            kinds.setdefault(id(child), (group, None))
    parts: dict[str, int] = {}
    lookup = expert = 0
    seen: set[int] = set()
    for path, param in _params_by_owner(model):
        if id(param[1]) in seen:
            continue
        seen.add(id(param[1]))
        group = next((kinds[id(m)][0] for m in param[0] if id(m) in kinds), "other")
        parts[group] = parts.get(group, 0) + param[1].numel()
        if group in ("embedding", "position_embedding") and not (tied and group == "embedding"):
            lookup += param[1].numel()
        if ".experts." in f".{path}.":
            expert += param[1].numel()
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    d = _d_model(text)  # the residual stream (OPT-350m's embeddings are narrower)
    heads = int(_first(text, "num_attention_heads", "n_head", "num_heads"))
    head_dim = int(_first(text, "head_dim") or d // heads)
    n_experts = _first(text, "num_local_experts", "num_experts", "n_routed_experts")
    top_k = _first(text, "num_experts_per_tok", "moe_topk", "top_k")
    active = float(top_k) / float(n_experts) if expert and n_experts and top_k else 1.0
    unembedding = (head.weight if head is not None else embed.weight).numel()
    return ModelShape(text.model_type, d, len(blocks), heads, _kv_heads(text, heads), head_dim,
                      int(head.weight.shape[0] if head is not None else embed.weight.shape[0]),
                      tied, parts, lookup, unembedding, _windows(text, len(blocks)), expert,
                      active)  # fmt: skip


def _d_model(cfg: PretrainedConfig) -> int:
    return int(_first(cfg, "hidden_size", "n_embd", "d_model"))


def _params_by_owner(model: nn.Module):
    """(path, (owner modules outermost-last, parameter)) for every parameter: the owners are the
    modules on its path, innermost first, so the first one with a kind decides its group."""
    modules = dict(model.named_modules())
    for path, param in model.named_parameters(remove_duplicate=False):
        names = path.split(".")[:-1]
        owners = [modules[".".join(names[:i])] for i in range(len(names), 0, -1)]
        yield path, (owners, param)


def load_config(source: dict | PretrainedConfig | str | Path) -> tuple[PretrainedConfig, str]:
    """(config with its architecture's defaults filled in, display name) for any model source:
    a config object or dict, a config.json, a model folder, a preset name, or 'organism'."""
    from transformers import PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source, getattr(source, "name_or_path", "") or source.model_type
    if isinstance(source, dict):
        return _config_from_dict(source), str(source.get("model_type", "config"))
    if isinstance(source, (str, Path)):
        raw, name = presets.config_dict(source)
        return _config_from_dict(raw), name
    raise TypeError(
        f"expected a config (dict or PretrainedConfig), a path or a preset name, got "
        f"{type(source).__name__}"
    )


def _config_from_dict(raw: dict[str, Any]) -> PretrainedConfig:
    from transformers import AutoConfig

    raw = dict(raw)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise ValueError(
            f"expected a Hugging Face config with a 'model_type', got keys {sorted(raw)[:8]}...; "
            "pass the model's config.json"
        )
    try:
        return AutoConfig.for_model(model_type, **raw)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"could not read the {model_type!r} config: {err}") from err


# ---------------------------------------------------------------- the estimate


@dataclass
class CostReport:
    """Predicted cost of a probe bank for one forward of the phase it rides on.

    Per forward = one decode step (B new tokens) for positions='generated', the prefill pass
    (B x prompt_len tokens) for 'last' and 'prompt'. Overheads are fractions (0.03 = +3%).
    """

    model: str
    model_type: str
    n_params: int  # exact, from the config
    n_params_lookup: int  # embedding tables read by index, not multiplied
    d_model: int
    n_layers: int
    tied_embeddings: bool
    # the scope
    n_probes: int  # probes at each site
    n_sites: int
    positions: str
    phase: str  # "decode step" or "prefill"
    batch_size: int
    prompt_len: int
    new_tokens: int
    dtype_bytes: float
    hardware: str
    # arithmetic
    forward_flops_per_token: float  # 2 x matmul weights
    attention_flops_per_token: float  # QK^T + AV, mean over the phase's tokens; 0 if left out
    tokens_per_forward: int
    reads_per_forward: int  # token positions the probes read in one forward
    model_flops: float
    probe_flops: float
    arithmetic_overhead: float
    # bytes
    weight_bytes: float
    kv_cache_bytes: float
    probe_weight_bytes: float
    probe_output_bytes: float
    bytes_overhead: float
    # latency (seconds per forward)
    baseline_s: float
    packed_s: float
    naive_s: float
    packed_overhead: float
    naive_overhead: float
    naive_breakdown_s: dict[str, float]  # what the naive readout adds, by cause
    assumptions: dict[str, Any]  # the Hardware fields the latency used
    notes: list[str] = field(default_factory=list)
    # Measured numbers, when a measurement is run, under the same keys as the predicted ones
    # (e.g. {"baseline_s": ..., "packed_overhead": ...}); None for a prediction only.
    measured: dict[str, float] | None = None

    @property
    def n_readouts(self) -> int:
        """Dot products per token read: probes x sites."""
        return self.n_probes * self.n_sites

    @property
    def verdict_packed(self) -> str:
        return verdict_for(self.packed_overhead)

    @property
    def verdict_naive(self) -> str:
        return verdict_for(self.naive_overhead)

    @property
    def verdict(self) -> str:
        """One line: both readouts' latency overhead and their verdicts."""
        return (
            f"packed readout +{percent(self.packed_overhead)} per {self.phase}: "
            f"{self.verdict_packed}; naive hooks +{percent(self.naive_overhead)} "
            f"({self.naive_s / self.baseline_s:.3g}x the time): {self.verdict_naive}"
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(n_readouts=self.n_readouts, verdict_packed=self.verdict_packed,
                   verdict_naive=self.verdict_naive, verdict=self.verdict)  # fmt: skip
        return out


def estimate_cost(
    config: dict | PretrainedConfig | str | Path,
    *,
    n_probes: int,
    sites: Literal["one", "all"] | int,
    positions: Positions,
    batch_size: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 64,
    dtype_bytes: float = 2,
    probe_bias: bool = True,
    attention_flops: bool = True,
    hardware: str | Hardware = "h100",
) -> CostReport:
    """Predict the arithmetic, bytes and latency overhead of `n_probes` linear probes at each
    of `sites` ('one', 'all' = every decoder layer, or a count), reading `positions`."""
    cfg, name = load_config(config)
    shape = model_shape(cfg)
    hw = _hardware(hardware)
    n_sites = _n_sites(sites, shape.n_layers)
    _check_scope(n_probes, positions, batch_size, prompt_len, new_tokens, dtype_bytes)
    decode = positions == "generated"
    b, d, k = batch_size, shape.d_model, n_probes * n_sites  # k = dot products per token read

    # Keys each query attends to: decode step i (1..N) sees prompt_len + i; prefill token j sees j.
    first, last = (prompt_len + 1, prompt_len + new_tokens) if decode else (1, prompt_len)
    n_forwards = new_tokens if decode else 1
    keys = [_sum_capped(first, last, w) for w in shape.windows]  # per layer, summed over queries
    tokens = b if decode else b * prompt_len
    reads = b if decode else b * (1 if positions == "last" else prompt_len)

    unembedded = tokens if decode else b  # prefill unembeds only the last position
    dense = 2 * ((shape.active_matmul_params - shape.unembedding_params) * tokens
                 + shape.unembedding_params * unembedded)  # fmt: skip
    attention = 4 * shape.d_attn * b * sum(keys) / n_forwards if attention_flops else 0.0
    probe_flops = reads * k * (2 * d + (1 if probe_bias else 0))

    weight_bytes = shape.matmul_params * dtype_bytes
    kv_per_key = 2 * shape.n_kv_heads * shape.head_dim * dtype_bytes
    if decode:  # the cache is read: every key each layer attends to
        kv_bytes = b * kv_per_key * sum(keys) / n_forwards
    else:  # the cache is written: every prompt position, every layer
        kv_bytes = b * prompt_len * kv_per_key * shape.n_layers
    probe_weight_bytes = k * (d + (1 if probe_bias else 0)) * dtype_bytes
    probe_output_bytes = reads * k * dtype_bytes

    model_flops = dense + attention
    model_bytes = weight_bytes + kv_bytes
    probe_bytes = probe_weight_bytes + probe_output_bytes
    baseline, packed, naive, breakdown = _latency(
        hw, decode=decode, n_layers=shape.n_layers, n_sites=n_sites, n_readouts=k,
        model=(model_bytes, model_flops), probes=(probe_bytes, probe_flops),
    )  # fmt: skip

    flops_note = "model FLOPs = 2 x weights multiplied (lookups excluded, unembedding included"
    flops_note += ")" if decode else " for the last position only)"
    flops_note += " + attention QK^T and AV" if attention_flops else "; attention scores left out"
    notes = [flops_note, f"latency: roofline on '{hw.name}' plus host costs; a prediction"]
    if decode and hw.cuda_graphs:
        notes.append("baseline decode replays CUDA graphs; naive hooks force eager decode")
    return CostReport(
        model=name, model_type=shape.model_type, n_params=shape.n_params,
        n_params_lookup=shape.lookup_params, d_model=d, n_layers=shape.n_layers,
        tied_embeddings=shape.tied_embeddings, n_probes=n_probes, n_sites=n_sites,
        positions=positions, phase="decode step" if decode else "prefill", batch_size=b,
        prompt_len=prompt_len, new_tokens=new_tokens, dtype_bytes=dtype_bytes, hardware=hw.name,
        forward_flops_per_token=2 * shape.active_matmul_params,
        attention_flops_per_token=attention / tokens,
        tokens_per_forward=tokens, reads_per_forward=reads,
        model_flops=model_flops, probe_flops=probe_flops,
        arithmetic_overhead=probe_flops / model_flops,
        weight_bytes=weight_bytes, kv_cache_bytes=kv_bytes,
        probe_weight_bytes=probe_weight_bytes, probe_output_bytes=probe_output_bytes,
        bytes_overhead=probe_bytes / model_bytes,
        baseline_s=baseline, packed_s=packed, naive_s=naive,
        packed_overhead=packed / baseline - 1, naive_overhead=naive / baseline - 1,
        naive_breakdown_s=breakdown, assumptions=dataclasses.asdict(hw), notes=notes,
    )  # fmt: skip


def _latency(
    hw: Hardware, *, decode: bool, n_layers: int, n_sites: int, n_readouts: int,
    model: tuple[float, float], probes: tuple[float, float],
) -> tuple[float, float, float, dict[str, float]]:  # fmt: skip
    """(baseline, packed, naive, naive's additions by cause), seconds per forward.

    device time of work = max(bytes / bandwidth, FLOPs / peak)   (a roofline)
    baseline: graph replay in decode -> device time; otherwise the host dispatches layers
        eagerly (n_layers x eager_layer_s), overlapped with the device when it runs ahead.
    packed: baseline + the probe matmuls' device time + one small kernel per site (in the
        graph; eager: one hook and one launch per site). Scores stay on the device.
    naive: eager, and serial because every score is synced to the host: device time + host
        dispatch + the probes' device time + per readout (hook + launch + sync). Its additions
        to the baseline: eager_forward (graphs and host/device overlap lost), probe_math,
        hooks, launches, syncs.
    """
    t_model = max(model[0] / hw.mem_bandwidth, model[1] / hw.peak_flops)
    t_probes = max(probes[0] / hw.mem_bandwidth, probes[1] / hw.peak_flops)
    dispatch = n_layers * hw.eager_layer_s
    per_site_host = hw.hook_s + hw.launch_s
    if decode and hw.cuda_graphs:
        baseline = t_model
        packed = t_model + t_probes + n_sites * hw.graph_kernel_s
    elif hw.async_host:
        baseline = max(t_model, dispatch)
        packed = max(t_model + t_probes, dispatch + n_sites * per_site_host)
    else:
        baseline = t_model + dispatch
        packed = baseline + t_probes + n_sites * per_site_host
    breakdown = {
        "eager_forward": t_model + dispatch - baseline,
        "probe_math": t_probes,
        "hooks": n_readouts * hw.hook_s,
        "launches": n_readouts * hw.launch_s,
        "syncs": n_readouts * hw.sync_s,
    }
    return baseline, packed, baseline + sum(breakdown.values()), breakdown


def _sum_capped(first: int, last: int, window: int | None) -> int:
    """sum(min(c, window) for c in range(first, last + 1)), in closed form."""
    if last < first:
        return 0
    if window is None or last <= window:
        return (first + last) * (last - first + 1) // 2
    if first > window:
        return window * (last - first + 1)
    return (first + window) * (window - first + 1) // 2 + window * (last - window)


def _hardware(hardware: str | Hardware) -> Hardware:
    if isinstance(hardware, Hardware):
        return hardware
    if hardware not in HARDWARE:
        raise LookupError(
            f"unknown hardware {hardware!r}; expected one of {', '.join(HARDWARE)}, or a "
            "residtap.cost.Hardware"
        )
    return HARDWARE[hardware]


def _n_sites(sites: Literal["one", "all"] | int, n_layers: int) -> int:
    if sites == "one":
        return 1
    if sites == "all":
        return n_layers
    if isinstance(sites, int) and not isinstance(sites, bool) and sites >= 1:
        return sites
    raise ValueError(
        f"expected sites to be 'one', 'all' (every one of the {n_layers} layers) or a positive "
        f"number of sites, got {sites!r}"
    )


def _check_scope(n_probes: Any, positions: Any, batch_size: Any, prompt_len: Any,
                 new_tokens: Any, dtype_bytes: Any) -> None:  # fmt: skip
    if not isinstance(n_probes, int) or isinstance(n_probes, bool) or n_probes < 1:
        raise ValueError(f"expected n_probes to be a whole number >= 1, got {n_probes!r}")
    if positions not in POSITIONS:
        raise ValueError(
            f"expected positions to be one of {', '.join(POSITIONS)} (every generated token, "
            f"the prompt's last token, all prompt tokens), got {positions!r}"
        )
    for what, value, low in (("batch_size", batch_size, 1), ("prompt_len", prompt_len, 1),
                             ("new_tokens", new_tokens, 1 if positions == "generated" else 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"expected {what} to be a whole number >= {low}, got {value!r}")
    number = isinstance(dtype_bytes, int | float) and not isinstance(dtype_bytes, bool)
    if not number or dtype_bytes <= 0:
        raise ValueError(
            f"expected dtype_bytes > 0 (2 for bf16/fp16, 4 for fp32), got {dtype_bytes!r}"
        )
