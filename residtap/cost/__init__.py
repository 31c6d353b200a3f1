"""Predict what a bank of linear probes costs at inference, from a model's config alone.

    from residtap.cost import estimate_cost
    report = estimate_cost("Llama-3.1-8B", n_probes=1000, sites="all", positions="generated")
    print(report.verdict)   # packed readout +3.17% per decode step: small (1-10%); naive ...

A probe is one dot product per token against a hidden state the forward pass already made, so
its arithmetic is a rounding error; what costs is how the score leaves the forward pass (a
Python hook per probe, a host sync per score, the CUDA graphs that hooks rule out). The report
gives three ratios for one forward of the phase the probes ride on: a decode step (B new
tokens) for `positions="generated"`, the prefill pass (B x prompt_len tokens) for `"last"` and
`"prompt"`.

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
  implementations (see `roofline.latency`):
  naive - one Python hook per probe and site, one small kernel each, one host sync per score.
    Hooks stop CUDA-graph replay, so decode runs eager, and each sync drains the GPU so host
    and device no longer overlap.
  packed - all probes at a site stacked into one (d_model, n_probes) matrix, one matmul per
    site inside the graph, scores kept on the device and copied out asynchronously.
  These are predictions from documented assumptions, not measurements; `CostReport.measured`
  is where measured numbers go beside them.

Published measurements to hold the predictions against: hook-based vLLM decodes 4-11x slower
than with CUDA graphs (decoderesearch/interp-engine, docs/PERFORMANCE.md: Llama-3.1-8B 64.7 vs
278 tok/s, Gemma-2-2B 37.5 vs 399); graph-safe buffer taps land within 5-8% of vanilla at 4B/8B
(same source); a GPU-resident readout with asynchronous export costs 0.4-6.8% offline, ~6%
online (DMI-Lib); per-step `.cpu()` copies of hidden states made SGLang's
`return_hidden_states` 17x slower end to end (https://github.com/sgl-project/sglang/issues/8003).

The package: hardware.py (profiles), shape.py (a config's exact parameter counts, on the meta
device), roofline.py (the latency model), estimate.py (`estimate_cost`, `CostReport`),
columns.py (`count_columns`: the matmul columns of probe files, attention probes and SAE
features, and what their readout adds after the matmul).
"""

from residtap.cost.columns import ColumnCount, count_columns
from residtap.cost.estimate import (
    POSITIONS,
    VERDICT_BANDS,
    CostReport,
    Positions,
    estimate_cost,
    percent,
    verdict_for,
)
from residtap.cost.hardware import HARDWARE, Hardware, hardware_profile
from residtap.cost.roofline import latency
from residtap.cost.shape import ModelShape, load_config, meta_model, model_shape

__all__ = [
    "HARDWARE",
    "ColumnCount",
    "POSITIONS",
    "VERDICT_BANDS",
    "CostReport",
    "Hardware",
    "ModelShape",
    "Positions",
    "count_columns",
    "estimate_cost",
    "hardware_profile",
    "latency",
    "load_config",
    "meta_model",
    "model_shape",
    "percent",
    "verdict_for",
]
