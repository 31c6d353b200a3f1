"""The latency model: a roofline for the device plus fixed host costs, for the model's forward
alone (baseline) and with two implementations of the probe readout.

    baseline_s, packed_s, naive_s, naive_by_cause = latency(
        HARDWARE["h100"], decode=True, n_layers=32, n_sites=32, n_readouts=32_000,
        model=(model_bytes, model_flops), probes=(probe_bytes, probe_flops))

  naive - one Python hook per probe and site, one small kernel each, one host sync per score.
    Hooks stop CUDA-graph replay, so decode runs eager, and each sync drains the GPU so host
    and device no longer overlap.
  packed - all probes at a site stacked into one (d_model, n_probes) matrix, one matmul per
    site inside the graph, scores kept on the device and copied out asynchronously.
"""

from __future__ import annotations

from residtap.cost.hardware import Hardware


def latency(
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
