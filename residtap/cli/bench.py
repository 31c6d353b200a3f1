"""`residtap bench probes|readouts`: what reading probes during generate costs, measured side by
side.

`probes`:

Without options it runs the reference configuration (a random 8-layer Llama, d_model 512;
about 10-20 min on 2 CPU cores); `--quick` runs a tiny one in seconds. The benchmark itself is
residtap.benchmark (its docstring says what each variant and column means); this command
prints its table, writes the JSON, text and plot, and draws the plot.

Variants: baseline (no probes), naive (one Python hook per probe, `.tolist()`), packed (a
ProbeBank: one matmul per site per step), deferred (the bank with defer=16). Overheads are
paired medians of ABBA blocks; `handlers` is the time inside residtap's hooks
(residtap.engine.timing), `tap body` the bank's own code.
`--compile` adds compiled plain forwards (torch.compile, fullgraph) with and without the bank.

`readouts`: attention probes and SAE features (residtap.benchmark.readouts): a bank of
attention probes and a bank of 100 SAE features at the middle layer, read every step and with
defer=16, against the baseline in ABBA blocks, on the organism (its own SAE) or the reference
model (a random 4096-feature SAE). Targets: overhead <= 3%, handlers <= 2%.

examples:
  residtap bench probes --quick
  residtap bench probes --quick --batch 1,4 --probes 1 --probes 50 --out bench/ --json
  residtap bench readouts --quick
  residtap bench readouts --model organism --batch 1 --repeats 1 --new-tokens 8 --out bench/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from residtap.benchmark import BenchConfig, bench_probes
from residtap.benchmark.readouts import ReadoutConfig, bench_readouts
from residtap.cli.common import (
    add_json_flag,
    add_list,
    add_out,
    add_progress_flag,
    check_out,
    command_help,
    emit_json,
    format_table,
    progress,
)

COLUMNS = ["batch", "scope", "probes", "baseline_tok_s", "naive_tok_s", "packed_tok_s",
           "deferred_tok_s", "floor_pct", "naive_overhead_pct", "packed_overhead_pct",
           "packed_spread_pct", "deferred_overhead_pct", "deferred_spread_pct", "handler_pct",
           "deferred_handler_pct", "pass_floor", "deferred_pass_floor", "pass_vs_naive",
           "deferred_pass_vs_naive", "pass_handlers", "deferred_pass_handlers"]


def format_report(result: dict[str, Any]) -> str:
    rows = [{k: _fmt(r[k]) for k in COLUMNS} for r in result["rows"]]
    text = format_table(rows, COLUMNS)
    for c in result.get("compiled", []):
        extra = f", overhead {c['overhead_pct']:.2f}%" if "overhead_pct" in c else ""
        text += (f"\ncompiled ({result['config']['compile_backend']}) batch {c['batch']} "
                 f"{c['variant']}: {c['forward_ms']:.2f} ms/forward (compile {c['compile_s']:.0f}"
                 f" s){extra}")
    return text


def plot_latency(result: dict[str, Any], path: Path) -> Path:
    """Log-scale bars per configuration: where the time per generated token goes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    n_tok = result["config"]["new_tokens"]
    def share(key: str):
        return lambda r: r["forward_ms_per_token"] * r[key] / 100

    parts = [("forward (baseline)", lambda r: r["forward_ms_per_token"]),
             ("naive overhead", share("naive_overhead_pct")),
             ("packed overhead", share("packed_overhead_pct")),
             ("residtap handlers", lambda r: share("handler_pct")(r)
              * (1 + r["packed_overhead_pct"] / 100)),
             ("deferred overhead", share("deferred_overhead_pct")),
             ("deferred handlers", lambda r: share("deferred_handler_pct")(r)
              * (1 + r["deferred_overhead_pct"] / 100)),
             ("arithmetic floor", share("floor_pct"))]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(rows)), 5))
    width = 0.8 / len(parts)
    for i, (label, get) in enumerate(parts):
        values = [max(get(r), 1e-5) for r in rows]  # <= 0 (within noise) drawn at the bottom
        ax.bar([j + i * width for j in range(len(rows))], values, width, label=label)
    ax.set_yscale("log")
    ax.set_ylabel(f"ms per generated token (greedy, {n_tok} tokens)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"B={r['batch']}\n{r['probes']} @ {r['scope']}" for r in rows],
                       fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("Where the latency goes: probes during generate (values <= 0 clipped)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure what residtap costs",
                                   **command_help(__doc__))
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    sub.required = True
    p = sub.add_parser("probes", help="probe bank vs naive hooks vs baseline during generate",
                       **command_help(__doc__))
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats (for tests)")
    add_list(p, "--batch", item_type=int, nargs="+",
             help="batch sizes, space- or comma-separated or repeated (default 1 8)")
    add_list(p, "--probes", item_type=int, nargs="+",
             help="probe counts, space- or comma-separated or repeated (default 1 100 1000)")
    add_list(p, "--scopes", item_type=_scope, nargs="+",
             help="'one' (a middle layer) and/or 'all' (every layer), space- or "
                  "comma-separated or repeated (default one all)")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 5)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per call (default 64)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    p.add_argument("--compile", action="store_true", help="also time compiled plain forwards")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    add_out(p, "folder", "bench_probes.json, .txt and .png", required=False)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add_progress_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)

    r = sub.add_parser("readouts", help="attention probes and SAE features vs baseline during "
                                        "generate", **command_help(__doc__))
    r.add_argument("--model", dest="which", choices=("organism", "reference"),
                   default="organism", help="the bundled model (its SAE) or the random "
                   "reference Llama (a random SAE of --d-sae features) (default organism)")
    r.add_argument("--quick", action="store_true", help="a tiny model, few repeats (for tests)")
    add_list(r, "--batch", item_type=int, nargs="+",
             help="batch sizes, space- or comma-separated or repeated (default 1 8)")
    r.add_argument("--repeats", type=int, help="interleaved repeats (default 5)")
    r.add_argument("--new-tokens", type=int, help="tokens generated per call (default 64)")
    r.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    r.add_argument("--sae-features", type=int, help="SAE features in the bank (default 100)")
    r.add_argument("--d-sae", type=int, help="the reference model's random SAE width (4096)")
    add_out(r, "folder", "bench_readouts_<model>.json and .txt", required=False)
    add_progress_flag(r)
    add_json_flag(r)
    r.set_defaults(func=run_readouts)


READOUT_COLUMNS = ["model", "batch", "bank", "mode", "columns", "baseline_tok_s",
                   "overhead_pct", "spread_pct", "handler_pct", "tap_body_pct", "pass_overhead",
                   "pass_handlers"]


def run_readouts(args: argparse.Namespace) -> int:
    cfg = ReadoutConfig.quick() if args.quick else ReadoutConfig(model=args.which)
    overrides = {"batches": args.batch, "repeats": args.repeats, "new_tokens": args.new_tokens,
                 "threads": args.threads, "sae_features": args.sae_features,
                 "reference_d_sae": args.d_sae}
    for name, value in overrides.items():
        if value is not None:
            setattr(cfg, name, tuple(value) if isinstance(value, list) else value)
    for name in ("repeats", "new_tokens", "sae_features", "reference_d_sae"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    check_out(args.out, "folder")
    result = bench_readouts(cfg, progress=progress(args))
    text = format_table([{k: _fmt(r[k]) for k in READOUT_COLUMNS} for r in result["rows"]],
                        READOUT_COLUMNS)
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"bench_readouts_{cfg.model}.json").write_text(json.dumps(result, indent=2))
        (out / f"bench_readouts_{cfg.model}.txt").write_text(text + "\n")
    if args.json:
        emit_json(result)
    else:
        print(text)
    return 0


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _scope(text: str) -> str:
    if text not in ("one", "all", "all-layers"):
        raise ValueError(text)
    return "all" if text == "all-layers" else text


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    overrides = {"batches": args.batch, "probe_counts": args.probes, "scopes": args.scopes,
                 "repeats": args.repeats, "new_tokens": args.new_tokens, "threads": args.threads}
    for name, value in overrides.items():
        if value is not None:
            setattr(cfg, name, tuple(value) if isinstance(value, list) else value)
    cfg.compile, cfg.compile_backend = args.compile, args.compile_backend
    if cfg.repeats < 1 or cfg.new_tokens < 1:
        raise ValueError(f"--repeats and --new-tokens must be >= 1, got {cfg.repeats} and "
                         f"{cfg.new_tokens}")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_out(args.out, "folder")
    result = bench_probes(cfg, progress=progress(args))
    text = format_report(result)
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_probes.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "bench_probes.txt").write_text(text + "\n")
        if not args.no_plot:
            result["plot"] = str(plot_latency(result, out / "bench_probes.png"))
    if args.json:
        emit_json(result)
    else:
        print(text)
        if "plot" in result:
            print(f"plot: {result['plot']}")
    return 0
