"""Hardware profiles: what the latency prediction assumes about the machine.

    from residtap.cost import HARDWARE, hardware_profile
    hardware_profile("h100").mem_bandwidth                     # 3.35e12 bytes/s
    dataclasses.replace(HARDWARE["h100"], sync_s=30e-6)         # a profile of your own
"""

from __future__ import annotations

from dataclasses import dataclass


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


def hardware_profile(hardware: str | Hardware) -> Hardware:
    """The profile named `hardware` (a key of HARDWARE), or `hardware` itself."""
    if isinstance(hardware, Hardware):
        return hardware
    if hardware not in HARDWARE:
        raise LookupError(
            f"unknown hardware {hardware!r}; expected one of {', '.join(HARDWARE)}, or a "
            "residtap.cost.Hardware"
        )
    return HARDWARE[hardware]
