"""The estimate: arithmetic, bytes and latency of a probe bank for one forward, as a CostReport.

    from residtap.cost import estimate_cost
    report = estimate_cost("Llama-3.1-8B", n_probes=1000, sites="all", positions="generated")
    report.packed_overhead, report.naive_overhead, report.verdict
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from residtap.cost.hardware import Hardware, hardware_profile
from residtap.cost.roofline import latency
from residtap.cost.shape import load_config, model_shape

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Positions = Literal["generated", "last", "prompt"]
POSITIONS: tuple[str, ...] = ("generated", "last", "prompt")

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
    readout_flops: float = 0.0,
) -> CostReport:
    """Predict the arithmetic, bytes and latency overhead of `n_probes` linear probes at each
    of `sites` ('one', 'all' = every decoder layer, or a count), reading `positions`.
    Attention probes and SAE features count as their matmul columns (n_probes: columns per
    site; residtap.cost.columns counts them), plus `readout_flops` per token read: what their
    readout does after the matmul (summed over sites)."""
    cfg, name = load_config(config)
    shape = model_shape(cfg)
    hw = hardware_profile(hardware)
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
    probe_flops = reads * (k * (2 * d + (1 if probe_bias else 0)) + readout_flops)

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
    baseline, packed, naive, breakdown = latency(
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


def _sum_capped(first: int, last: int, window: int | None) -> int:
    """sum(min(c, window) for c in range(first, last + 1)), in closed form."""
    if last < first:
        return 0
    if window is None or last <= window:
        return (first + last) * (last - first + 1) // 2
    if first > window:
        return window * (last - first + 1)
    return (first + window) * (window - first + 1) // 2 + window * (last - window)


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
