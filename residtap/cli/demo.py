"""`residtap demo`: capture, probes, runtime probes with early exit, logit lens, steering and
cost on the bundled organism (or `--model PATH` with your own data), as an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from residtap.cli.common import add_json_flag, emit_json, load_model


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole story on the bundled model, as an HTML report",
                       description=__doc__)
    p.add_argument("--out", default="residtap-demo", help="report folder (default residtap-demo)")
    p.add_argument("--model", default="organism",
                   help="a local HF decoder folder (then pass --labelled/--pairs/--ab too)")
    p.add_argument("--labelled", action="append", default=[], metavar="NAME=FILE",
                   help="a labelled-texts JSONL ({'text','label','split'}); repeatable")
    p.add_argument("--truth", help="NAME of the binary labelled set whose probe drives early "
                   "exit (with --early-exit FILE)")
    p.add_argument("--early-exit", type=Path, help="JSONL {'text','answer','filler_start'}")
    p.add_argument("--classes", default="false,true", help="early-exit answer words: NEG,POS")
    p.add_argument("--pairs", type=Path, help="steering pairs JSONL {'positive','negative'}")
    p.add_argument("--ab", type=Path, help="A/B prompts JSONL in the CAA format")
    p.add_argument("--steer-site", default=None,
                   help="site of the steering vector (default: the middle layer)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt for lens/steering")
    p.add_argument("--max-samples", type=int, default=600, help="texts per labelled set")
    p.add_argument("--no-progress", action="store_true")
    add_json_flag(p)
    p.set_defaults(func=run)


def inputs_from_args(args: argparse.Namespace):
    from residtap.demo import DemoInputs

    if args.model == "organism" and not args.labelled:
        return DemoInputs.organism()
    if not args.labelled:
        raise ValueError("--model PATH needs at least one --labelled NAME=FILE (a JSONL of "
                         "{'text', 'label', 'split'}); see `residtap demo --help`")
    labelled = {}
    for item in args.labelled:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise ValueError(f"--labelled expects NAME=FILE with an existing file, got {item!r}")
        labelled[name] = Path(path)
    model, tok = load_model(args.model)
    neg, _, pos = args.classes.partition(",")
    return DemoInputs(model=model, tokenizer=tok, name=args.model, labelled=labelled,
                      pairs=args.pairs, ab=args.ab, truth=args.truth,
                      early_exit=args.early_exit, lens_prompts=args.prompt[:1],
                      steer_prompts=args.prompt, classes=(neg, pos),
                      steer_site=args.steer_site)


def run(args: argparse.Namespace) -> int:
    from residtap.demo import run_demo, terminal_summary

    inputs = inputs_from_args(args)
    summary = run_demo(inputs, args.out, max_samples=args.max_samples,
                       progress=not args.no_progress and not args.json)
    if args.json:
        emit_json(summary)
    else:
        print(terminal_summary(summary))
    return 0
