"""`residtap cost`: predict what a probe bank costs at inference, from the model's config.

Prints the arithmetic, bytes and serving-latency overhead of the probes against the forward
pass they ride on, for a naive readout (a hook and a host sync per probe) and a packed one (one
matmul per site, scores kept on the device), and a verdict. Predictions, not measurements; the
model behind them is in residtap/cost/. `--measure` (a local model folder or 'organism')
also times greedy generate with and without a packed bank of random probes on this machine and
prints the measured numbers beside the predicted ones (per forward: generate time / new tokens).

examples:
  residtap cost Llama-3.1-8B --probes 1000 --sites all --positions generated
  residtap cost organism --probes 8 --sites one --positions last --batch 32 --json
  residtap cost --list-presets
  residtap cost organism --probes 100 --sites all --measure --repeats 1 --new-tokens 16
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from residtap.cli.common import (
    ALL_LAYERS,
    add_json_flag,
    add_list,
    add_model_flags,
    add_positions,
    command_help,
    emit_json,
    format_table,
    load_model_from_args,
    parse_positions,
)
from residtap.cost import (
    HARDWARE,
    POSITIONS,
    CostReport,
    Hardware,
    estimate_cost,
    model_shape,
    percent,
)
from residtap.presets import PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cost", help="predict what probes cost at inference (arithmetic, bytes, latency)",
        **command_help(__doc__),
    )  # fmt: skip
    p.add_argument("model", nargs="?",
                   help="a preset (see --list-presets), a config.json, a local model folder, "
                        "or 'organism'")  # fmt: skip
    p.add_argument("--list-presets", action="store_true", help="list the shipped model configs")
    p.add_argument("--probes", type=int, default=1, help="probes at each site (default 1)")
    p.add_argument("--sites", default="one",
                   help="'one' (a middle layer), 'all' or 'all-layers' (every decoder layer), "
                        "or a number of sites (default one)")
    add_positions(p, words=POSITIONS, indices=False, default="generated",
                  note="the tokens each probe reads")
    p.add_argument("--batch", type=int, default=1, help="sequences per forward (default 1)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens (default 64)")
    p.add_argument("--dtype-bytes", type=float, default=None,
                   help="bytes per weight and score: 2 for bf16/fp16, 4 for fp32 (default 2; "
                        "with --measure, the loaded model's)")  # fmt: skip
    p.add_argument("--hardware", choices=list(HARDWARE), default=None,
                   help="latency assumptions to use (default h100; with --measure, the "
                        "measuring device's: cpu on a CPU)")  # fmt: skip
    add_list(p, "--assume", default=[], metavar="FIELD=VALUE",
             help="override hardware assumptions, e.g. sync_s=3e-5")
    p.add_argument("--no-attention-flops", action="store_true",
                   help="leave the attention-score FLOPs (QK^T, AV) out of the model's FLOPs")
    p.add_argument("--measure", action="store_true",
                   help="also measure: time generate with and without a bank of random probes "
                        "of this scope on the model (a local folder or 'organism')")
    p.add_argument("--repeats", type=int, default=3,
                   help="with --measure: paired timing repeats, medians reported (default 3)")
    add_model_flags(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list_presets:
        return _list_presets(args.json)
    if args.model is None:
        raise ValueError(
            "expected a model: a preset name, a config.json, a model folder or 'organism'; "
            "see `residtap cost --list-presets`"
        )
    args.positions = parse_positions(args.positions, words=POSITIONS, indices=False)
    sites: str | int = args.sites.strip()
    sites = int(sites) if sites.isdigit() else "all" if sites in ALL_LAYERS else sites
    model = _measurable_model(args) if args.measure else None
    hardware, dtype_bytes = args.hardware or "h100", args.dtype_bytes or 2
    if model is not None:
        param = next(model.parameters())
        hardware = args.hardware or ("cpu" if param.device.type == "cpu" else "h100")
        dtype_bytes = args.dtype_bytes or param.element_size()
    dtype_bytes = float(dtype_bytes)
    dtype_bytes = int(dtype_bytes) if dtype_bytes.is_integer() else dtype_bytes
    report = estimate_cost(
        args.model, n_probes=args.probes, sites=sites, positions=args.positions,
        batch_size=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
        dtype_bytes=dtype_bytes, attention_flops=not args.no_attention_flops,
        hardware=_hardware(hardware, args.assume),
    )  # fmt: skip
    if model is not None:
        report.measured = measure(model, args.probes, report.n_sites, args.batch,
                                  args.prompt_len, args.new_tokens, args.repeats)
    if args.json:
        emit_json(report.to_dict())
    else:
        print(render(report))
    return 0


def _measurable_model(args: argparse.Namespace):
    """The model to time for --measure: a local folder or 'organism', checked first."""
    if args.positions != "generated":
        raise ValueError(
            f"--measure times probes read at every generated token; got --positions "
            f"{args.positions}; drop --measure or use --positions generated"
        )
    if args.repeats < 1:
        raise ValueError(f"expected --repeats >= 1, got {args.repeats}")
    if args.model in PRESETS or args.model.lower() in {k.lower() for k in PRESETS}:
        raise ValueError(
            f"--measure needs weights to run, but {args.model!r} is a preset (a config only); "
            "pass a local model folder or 'organism', or drop --measure"
        )
    model, _ = load_model_from_args(args, tokenizer=False)
    return model


def measure(model: Any, n_probes: int, n_sites: int, batch_size: int, prompt_len: int,
            new_tokens: int, repeats: int = 3) -> dict[str, float]:
    """Measured cost of `n_probes` random probes at `n_sites` sites during greedy generate,
    under CostReport's keys (seconds per forward = generate seconds / new tokens)."""
    from residtap.benchmark import measure_overhead, random_bank
    from residtap.sites import layer_sites

    n_layers = len(layer_sites(model))
    if n_sites not in (1, n_layers):
        raise ValueError(
            f"--measure places probes at one middle layer or at all {n_layers} layers; got "
            f"{n_sites} sites; use --sites one or --sites all"
        )
    scope = "one" if n_sites == 1 else "all"
    m = measure_overhead(model, random_bank(model, n_probes, scope), batch_size=batch_size,
                         new_tokens=new_tokens, prompt_len=prompt_len, repeats=repeats)
    return {
        "baseline_s": m["baseline_s"] / new_tokens,
        "packed_s": m["packed_s"] / new_tokens,
        "packed_overhead": m["packed_overhead_pct"] / 100,
        "handler_fraction": m["packed_handler_pct"] / 100,  # inside residtap's hooks / generate
        "deferred_s": m["deferred_s"] / new_tokens,  # the same bank attached with defer=16
        "deferred_overhead": m["deferred_overhead_pct"] / 100,
        "deferred_handler_fraction": m["deferred_handler_pct"] / 100,
        "generate_baseline_s": m["baseline_s"],
        "generate_packed_s": m["packed_s"],
        "repeats": repeats,
    }


def render(r: CostReport) -> str:
    """The report as a readable text block: header, table of overheads, breakdown, verdict."""
    tied = "tied" if r.tied_embeddings else "untied"
    context = f"context {r.prompt_len} + {r.new_tokens}" if r.phase == "decode step" else (
        f"{r.prompt_len}-token prompt")  # fmt: skip
    rows = [
        _row("arithmetic", _si(r.model_flops, "FLOP"), _si(r.probe_flops, "FLOP"),
             percent(r.arithmetic_overhead)),
        _row("bytes moved", _si(r.weight_bytes + r.kv_cache_bytes, "B"),
             _si(r.probe_weight_bytes + r.probe_output_bytes, "B"), percent(r.bytes_overhead)),
        _row("latency, packed", _seconds(r.baseline_s), "+" + _seconds(r.packed_s - r.baseline_s),
             "+" + percent(r.packed_overhead)),
        _row("latency, naive", _seconds(r.baseline_s), "+" + _seconds(r.naive_s - r.baseline_s),
             "+" + percent(r.naive_overhead)),
    ]  # fmt: skip
    causes = sorted(r.naive_breakdown_s.items(), key=lambda kv: -kv[1])
    measured = []
    if r.measured:
        m = r.measured
        measured = [
            f"measured on this machine (generate, median of {m['repeats']:.0f} paired runs): "
            f"{_seconds(m['baseline_s'])} per forward, packed "
            f"{_signed_seconds(m['packed_s'] - m['baseline_s'])} "
            f"({'+' if m['packed_overhead'] >= 0 else ''}{percent(m['packed_overhead'])}; "
            f"predicted +{percent(r.packed_overhead)}); inside residtap's hooks "
            f"{percent(m['handler_fraction'])} of generate",
            f"  with defer=16 (scores read 16 decode steps at a time): packed "
            f"{_signed_seconds(m['deferred_s'] - m['baseline_s'])} "
            f"({'+' if m['deferred_overhead'] >= 0 else ''}{percent(m['deferred_overhead'])}); "
            f"inside residtap's hooks {percent(m['deferred_handler_fraction'])} of generate",
        ]
    return "\n".join([
        f"{r.model} ({r.model_type}): {r.n_params / 1e9:.3g} B parameters, d_model {r.d_model}, "
        f"{r.n_layers} layers, {tied} embeddings",
        f"scope: {_count(r.n_probes, 'probe')} at each of {_count(r.n_sites, 'site')} = "
        f"{_count(r.n_readouts, 'dot product')} per token read; positions={r.positions}",
        f"per {r.phase}: batch {r.batch_size}, {_count(r.reads_per_forward, 'token')} read, "
        f"{context}; {r.dtype_bytes}-byte weights; hardware {r.hardware}",
        "",
        format_table(rows, ["quantity", "model", "probes", "overhead"]),
        "",
        "naive adds: " + ", ".join(f"{k} {_seconds(v)}" for k, v in causes),
        "verdict: " + r.verdict,
        "(predicted from a roofline and host-cost assumptions; see --json 'assumptions')",
        *measured,
    ])  # fmt: skip


def _list_presets(as_json: bool) -> int:
    rows = []
    for name, preset in PRESETS.items():
        shape = model_shape(name)
        rows.append({"name": name, "hub_id": preset.hub_id, "model_type": shape.model_type,
                     "params": shape.n_params, "d_model": shape.d_model,
                     "layers": shape.n_layers})  # fmt: skip
    if as_json:
        emit_json(rows)
    else:
        shown = [r | {"params": f"{r['params'] / 1e9:.3g} B"} for r in rows]
        print(format_table(shown, ["name", "hub_id", "model_type", "params", "d_model", "layers"]))
    return 0


def _hardware(name: str, assume: list[str]) -> Hardware:
    hw = HARDWARE[name]
    fields = {f.name: f.type for f in dataclasses.fields(hw) if f.name != "name"}
    changes: dict[str, Any] = {}
    for item in assume:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(
                f"expected --assume FIELD=VALUE with FIELD one of {', '.join(fields)}, "
                f"got {item!r}"
            )
        if fields[key] == "bool":
            changes[key] = value.strip().lower() in ("1", "true", "yes")
        else:
            try:
                changes[key] = float(value)
            except ValueError:
                msg = f"expected a number for --assume {key}=..., got {value!r}"
                raise ValueError(msg) from None
    return dataclasses.replace(hw, **changes) if changes else hw


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _row(quantity: str, model: str, probes: str, overhead: str) -> dict[str, str]:
    return {"quantity": quantity, "model": model, "probes": probes, "overhead": overhead}


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {prefix}{unit}"
    return f"{value:.4g} {unit}"


def _signed_seconds(value: float) -> str:
    return ("+" if value >= 0 else "-") + _seconds(abs(value))


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} us"
