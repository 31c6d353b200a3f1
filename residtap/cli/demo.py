"""`residtap demo`: capture, probes, runtime probes with early exit, logit lens, steering and
cost on the bundled organism (or `--model PATH` with your own data), as an HTML report.

examples:
  residtap demo --max-samples 200 --out residtap-demo/
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from residtap.cli.common import (
    add_data,
    add_json_flag,
    add_list,
    add_model_flags,
    add_out,
    add_progress_flag,
    check_out,
    command_help,
    data_path,
    emit_json,
    load_model_from_args,
    progress,
)


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole story on the bundled model, as an HTML report",
                       **command_help(__doc__))
    add_out(p, "folder", "report.html and its figures", required=False, default="residtap-demo")
    p.add_argument("--model", default="organism",
                   help="a local HF decoder folder (then pass --labelled/--pairs/--ab too)")
    add_list(p, "--labelled", default=[], metavar="NAME=FILE",
             help="a labelled-texts JSONL ({'text','label','split'}) named NAME; FILE may be "
                  "organism:NAME")
    p.add_argument("--truth", help="NAME of the binary labelled set whose probe drives early "
                   "exit (with --early-exit FILE)")
    add_data(p, "--early-exit", required=False, help="JSONL {'text','answer','filler_start'}")
    add_list(p, "--classes", default=["false", "true"], metavar="NEG,POS",
             help="the two early-exit answer words, NEG,POS (default false,true)")
    add_data(p, "--pairs", required=False, help="steering pairs JSONL {'positive','negative'}")
    add_data(p, "--ab", required=False, help="A/B prompts JSONL in the CAA format")
    p.add_argument("--steer-site", default=None,
                   help="site of the steering vector (default: the middle layer)")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt for lens/steering (repeatable; commas stay in the text)")
    p.add_argument("--max-samples", type=int, default=600, help="texts per labelled set")
    add_model_flags(p)
    add_progress_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def inputs_from_args(args: argparse.Namespace):
    from residtap.demo import DemoInputs

    if len(args.classes) != 2:
        raise ValueError(f"expected --classes NEG,POS (two words), got {args.classes}")
    placed = any(getattr(args, k, None) for k in ("device", "device_map", "model_dtype"))
    if args.model == "organism" and not args.labelled:
        inputs = DemoInputs.organism()
        if placed:
            model, tok = load_model_from_args(args)
            inputs = dataclasses.replace(inputs, model=model, tokenizer=tok)
        return inputs
    if not args.labelled:
        raise ValueError("--model PATH needs at least one --labelled NAME=FILE (a JSONL of "
                         "{'text', 'label', 'split'}); see `residtap demo --help`")
    labelled = {}
    for item in args.labelled:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise ValueError(f"expected --labelled NAME=FILE, got {item!r}; e.g. "
                             "--labelled mood=organism:mood")
        labelled[name] = data_path(path)
    model, tok = load_model_from_args(args)
    neg, pos = args.classes
    return DemoInputs(model=model, tokenizer=tok, name=args.model, labelled=labelled,
                      pairs=args.pairs, ab=args.ab, truth=args.truth,
                      early_exit=args.early_exit, lens_prompts=args.prompt[:1],
                      steer_prompts=args.prompt, classes=(neg, pos),
                      steer_site=args.steer_site)


def run(args: argparse.Namespace) -> int:
    from residtap.demo import run_demo

    check_out(args.out, "folder")
    inputs = inputs_from_args(args)
    summary = run_demo(inputs, args.out, max_samples=args.max_samples, progress=progress(args))
    if args.json:
        emit_json(summary)
    else:
        print(terminal_summary(summary))
    return 0


def terminal_summary(summary: dict[str, Any]) -> str:
    """A short plain-text account of a demo run."""
    lines = [f"residtap demo on {summary['model']} ({summary['seconds']['total']:.0f} s)"]
    for name, p in (summary.get("probes") or {}).items():
        lines.append(f"  probe {name:<8} best {p['best_site']:<9} {p['best_accuracy']:.3f}   "
                     f"embed {p['embed_accuracy']:.3f}")
    curve = summary.get("early_exit")
    if curve:
        best = max(curve[1:], key=lambda c: (c["accuracy"] >= curve[0]["accuracy"] - 0.02,
                                              c["tokens_saved_frac"]))
        full = curve[0]["accuracy"]
        lines.append(f"  early exit: {100 * best['tokens_saved_frac']:.0f}% tokens saved at "
                     f"accuracy {best['accuracy']:.3f} (full generation {full:.3f})")
    lens = summary.get("lens")
    if lens:
        kl = lens["kl_by_layer"]
        lines.append(f"  logit lens: KL to final {kl[0]:.2f} (first) -> {kl[-1]:.2f} (last)")
        if "tuned_kl_by_layer" in lens:
            lines.append(f"  tuned lens: KL to final {lens['tuned_kl_by_layer'][0]:.2f} (first)")
    steer = summary.get("steering")
    if steer:
        v, r = steer["vector"], steer.get("random_baseline", {})
        lines.append(f"  steering at {steer['site']}: slope {v['mean']:.2f} "
                     f"({100 * v['wrong_way']:.0f}% wrong way); random {r.get('mean', 0):.2f}")
    cost = summary.get("cost")
    if cost:
        floor = cost["predicted"]["arithmetic_overhead"]
        lines.append(f"  cost: arithmetic floor {100 * floor:.2f}%, measured inside taps "
                     f"{100 * cost['measured_inside_fraction']:.2f}%")
    lines.append(f"  report: {summary['report']}")
    return "\n".join(lines)
