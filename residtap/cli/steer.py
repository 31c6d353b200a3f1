r"""`residtap steer make | eval | generate`: make a steering vector, measure it, try it.

    make      a vector from contrast pairs ({positive, negative}) or CAA A/B rows
    eval      per-example steerability over a strength sweep (CAA A/B rows)
    generate  steered vs unsteered greedy continuations

The bundled organism's mood vector (mean difference at layers.3, norm ~21) reads well at
strength 1 (-1 for the other mood); from about 2 on, the continuations degrade into repeated
mood words ("loved loved ..."), as over-steered models do.

examples:
  residtap steer make organism --pairs organism:mood_pairs --site layers.3 --out mood.safetensors
  residtap steer eval organism --vector mood.safetensors --data organism:mood_ab \
      --limit 50 --html sweep.html
  residtap steer generate organism --vector mood.safetensors \
      --prompt "today i am sad , and then the coach" --strength 1
  residtap steer generate organism --vector mood.safetensors --prompt "the cook" \
      --strength -1,1 --json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from residtap import inputs
from residtap.cli.common import (
    MODEL_HELP,
    add_allow_other_weights,
    add_data,
    add_json_flag,
    add_list,
    add_model_flags,
    add_out,
    add_positions,
    add_progress_flag,
    check_out,
    command_help,
    emit_json,
    format_table,
    load_model_from_args,
    parse_positions,
    progress,
)

POSITION_FORMS = {"words": ("all", "prompt", "generated"), "indices": True}
INDEX_HELP = ("a token index I: the vector is added from token I on (counted from the text's "
              "first real token; -1: from the last prompt token on)")
DEFAULT_GENERATE_STRENGTHS = "-1,1"


def register(subparsers) -> None:
    doc = command_help(__doc__)
    parser = subparsers.add_parser("steer", help="make, evaluate and try steering vectors", **doc)
    sub = parser.add_subparsers(dest="steer_command", metavar="ACTION")
    sub.required = True

    make = sub.add_parser("make", help="a vector from contrast pairs (JSONL)", **doc)
    make.add_argument("model", help=MODEL_HELP)
    add_data(make, "--pairs", help="JSONL of {positive, negative} pairs, or of CAA A/B rows "
                                   "(read at the answer token)")
    make.add_argument("--site", default="layers.3",
                      help="where to read and add (layers.3); a residual-stream site such as "
                           "layers.N, layers.N.ln1 or layers.N.ln2, not logits")
    make.add_argument("--position", default="last",
                      help="token of each pair text to read: last, or an index (default last)")
    make.add_argument("--method", choices=["mean_diff", "pca"], default="mean_diff")
    make.add_argument("--normalize", action="store_true", help="make the vector unit length")
    add_out(make, "file", "the vector (.safetensors)")
    add_model_flags(make)
    add_json_flag(make)
    make.set_defaults(func=run_make)

    ev = sub.add_parser("eval", help="per-example steerability over a strength sweep", **doc)
    ev.add_argument("model", help=MODEL_HELP)
    ev.add_argument("--vector", required=True, type=Path, help="a .safetensors steering vector")
    add_allow_other_weights(ev)
    add_data(ev, help="JSONL of {question, answer_matching_behavior, "
                      "answer_not_matching_behavior}")
    add_list(ev, "--strengths", item_type=float, nargs="+", default=None,
             help="strengths to sweep, space- or comma-separated or repeated (default -1.5 -1 "
                  "-0.5 0 0.5 1 1.5)")
    add_positions(ev, **POSITION_FORMS, default="-1", index_help=INDEX_HELP,
                  note="where the vector is added; -1 is the answer position, as CAA evaluates "
                       "A/B items, and shares each prompt's prefix across strengths")
    ev.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    ev.add_argument("--seed", type=int, default=0, help="seed of the random baseline direction")
    ev.add_argument("--no-baseline", action="store_true", help="skip the random baseline")
    ev.add_argument("--batch-size", type=int, default=256, help="rows per forward (256)")
    add_out(ev, "file", "a PNG of propensity", flag="--plot", required=False)
    add_out(ev, "file", "a self-contained HTML page", flag="--html", required=False)
    add_model_flags(ev)
    add_progress_flag(ev)
    add_json_flag(ev)
    ev.set_defaults(func=run_eval)

    gen = sub.add_parser("generate", help="steered vs unsteered greedy generations", **doc)
    gen.add_argument("model", help=MODEL_HELP)
    gen.add_argument("--vector", required=True, type=Path, help="a .safetensors steering vector")
    add_allow_other_weights(gen)
    gen.add_argument("--prompt", required=True, action="append",
                     help="a prompt (repeatable; commas stay in the text)")
    add_list(gen, "--strength", item_type=float, nargs="+",
             default=[float(x) for x in DEFAULT_GENERATE_STRENGTHS.split(",")],
             help="one or more strengths, space- or comma-separated or repeated; 0 (unsteered) "
                  f"is always shown (default {DEFAULT_GENERATE_STRENGTHS})")
    gen.add_argument("--max-new-tokens", type=int, default=20)
    add_positions(gen, **POSITION_FORMS, default="all", index_help=INDEX_HELP,
                  note="where the vector is added")
    add_model_flags(gen)
    add_json_flag(gen)
    gen.set_defaults(func=run_generate)


def _positions(values: list[str]) -> str | int:
    return parse_positions(values, **POSITION_FORMS, single=True)


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = inputs.read_jsonl(path, limit)
    if not rows:
        raise ValueError(f"{path} holds no rows; expected one JSON object per line")
    return rows


def split_rows(rows: list[dict[str, Any]], path: Path) -> tuple[list[dict], list[dict]]:
    """(pair rows, A/B rows); ValueError names a row that is neither."""
    pairs, ab = [], []
    for n, row in enumerate(rows, 1):
        if "positive" in row and "negative" in row:
            pairs.append(row)
        elif "question" in row and "answer_matching_behavior" in row:
            ab.append(row)
        else:
            raise ValueError(
                f"{path} row {n} has keys {sorted(row)}; expected positive/negative or "
                "question/answer_matching_behavior/answer_not_matching_behavior"
            )
    if pairs and ab:
        raise ValueError(f"{path} mixes pair rows and A/B rows; use one kind per file")
    return pairs, ab


def run_make(args: argparse.Namespace) -> int:
    from residtap.sites import resolve_site
    from residtap.steering import SteeringVector

    check_out(args.out, "file")
    pairs, ab = split_rows(read_jsonl(args.pairs), args.pairs)
    model, tok = load_model_from_args(args) if args.site.strip() != "logits" else (None, None)
    if model is None or resolve_site(model, args.site).name == "logits":
        raise ValueError(
            f"expected a residual-stream site for --site (layers.N, layers.N.ln1, ...), got "
            f"{args.site!r}: a vector at the logits has the vocabulary's width, is added after "
            "the last layer, and `steer generate` cannot apply it; fix: use e.g. --site layers.3"
        )
    if ab:  # CAA: read each side at its answer token
        vec = SteeringVector.from_ab(model, tok, ab, site=args.site, method=args.method,
                                     normalize=args.normalize)
    else:
        position: str | int = args.position if args.position == "last" else _int(args.position)
        vec = SteeringVector.from_pairs(model, tok, [r["positive"] for r in pairs],
                                        [r["negative"] for r in pairs], site=args.site,
                                        position=position, method=args.method,
                                        normalize=args.normalize)
    vec.save(args.out)
    info = {"out": str(args.out), "site": vec.site, "method": vec.method, "norm": vec.norm,
            "d_model": vec.d_model, **vec.extra}
    if args.json:
        emit_json(info)
    else:
        print(f"wrote {args.out}: {vec!r} from {vec.extra['n_pairs']} pairs")
    return 0


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--position must be 'last' or an integer, got {text!r}") from None


def run_eval(args: argparse.Namespace) -> int:
    from residtap.steering import DEFAULT_STRENGTHS, SteeringVector, steerability
    from residtap.steering.plot import save_steerability_plot

    positions = _positions(args.positions)
    check_out(args.plot, "file", "--plot")
    check_out(args.html, "file", "--html")
    rows = read_jsonl(args.data, args.limit)
    model, tok = load_model_from_args(args)
    vec = SteeringVector.load(args.vector, model=model,
                              allow_other_weights=args.allow_other_weights)
    result = steerability(model, tok, rows, vec, args.strengths or DEFAULT_STRENGTHS,
                          positions=positions, baseline=not args.no_baseline,
                          seed=args.seed, batch_size=args.batch_size, progress=progress(args))
    written = []
    if args.plot or args.html:
        written = [str(p) for p in save_steerability_plot(
            result, args.plot and Path(args.plot), args.html and Path(args.html))]
    summary = result.summary()
    if args.json:
        emit_json({**result.to_dict(), "files": written})
        return 0
    table = []
    for name in ("vector", "random_baseline"):
        s = summary.get(name)
        if s is not None:
            table.append({"direction": name, "mean slope": f"{s['mean']:.4g}",
                          "std": f"{s['std']:.4g}", "median": f"{s['median']:.4g}",
                          "IQR": f"{s['iqr']:.4g}", "wrong way": f"{s['wrong_way']:.1%}"})
    print(f"{summary['n_examples']} examples, site {vec.site}, vector norm {vec.norm:.4g}, "
          f"{summary['n_forwards']} forwards")
    print(format_table(table, ["direction", "mean slope", "std", "median", "IQR", "wrong way"]))
    curve = [{"strength": f"{x:g}", "mean propensity": f"{y:.4g}"}
             for x, y in zip(result.strengths, summary["vector"]["mean_propensity"], strict=True)]
    print(format_table(curve, ["strength", "mean propensity"]))
    for path in written:
        print(f"wrote {path}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from residtap.steering import SteeringVector, compare_generations

    positions = _positions(args.positions)
    model, tok = load_model_from_args(args)
    vec = SteeringVector.load(args.vector, model=model,
                              allow_other_weights=args.allow_other_weights)
    rows = compare_generations(model, tok, args.prompt, vec, args.strength,
                               max_new_tokens=args.max_new_tokens, positions=positions)
    if args.json:
        emit_json([{"prompt": r["prompt"],
                    "generations": [{"strength": s, "text": t}
                                    for s, t in r["generations"].items()]} for r in rows])
        return 0
    for r in rows:
        print(f"prompt: {r['prompt']}")
        table = [{"strength": f"{s:g}", "continuation": t} for s, t in r["generations"].items()]
        print(format_table(table, ["strength", "continuation"]))
        print()
    return 0
