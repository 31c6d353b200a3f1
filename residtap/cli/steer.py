"""`residtap steer make | eval | generate`: make a steering vector, measure it, try it.

    residtap steer make organism --pairs mood_pairs.jsonl --site layers.3 --out mood.safetensors
    residtap steer eval organism --vector mood.safetensors --data mood_ab.jsonl --html sweep.html
    residtap steer generate organism --vector mood.safetensors --prompt "the cat" --strength 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from residtap.cli.common import MODEL_HELP, add_json_flag, emit_json, format_table, load_model

POSITIONS_HELP = ("where to add the vector: all, prompt, generated, or a token index (>= 0: "
                  "from that index on; -1: from the last prompt token on)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("steer", help="make, evaluate and try steering vectors",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="steer_command", metavar="ACTION")
    sub.required = True

    make = sub.add_parser("make", help="a vector from contrast pairs (JSONL)")
    make.add_argument("model", help=MODEL_HELP)
    make.add_argument("--pairs", required=True, type=Path,
                      help="JSONL of {positive, negative} pairs, or of CAA A/B rows (read "
                           "at the answer token)")
    make.add_argument("--site", default="layers.3", help="where to read and add (layers.3)")
    make.add_argument("--position", default="last",
                      help="token of each pair text to read: last, or an index (default last)")
    make.add_argument("--method", choices=["mean_diff", "pca"], default="mean_diff")
    make.add_argument("--normalize", action="store_true", help="make the vector unit length")
    make.add_argument("--out", required=True, type=Path, help="where to write .safetensors")
    add_json_flag(make)
    make.set_defaults(func=run_make)

    ev = sub.add_parser("eval", help="per-example steerability over a strength sweep")
    ev.add_argument("model", help=MODEL_HELP)
    ev.add_argument("--vector", required=True, type=Path, help="a .safetensors steering vector")
    ev.add_argument("--data", required=True, type=Path,
                    help="JSONL of {question, answer_matching_behavior, "
                         "answer_not_matching_behavior}")
    ev.add_argument("--strengths", type=float, nargs="+", default=None,
                    help="strengths to sweep (default -1.5 -1 -0.5 0 0.5 1 1.5)")
    ev.add_argument("--positions", default="-1",
                    help=POSITIONS_HELP + " (default -1: the answer position, as CAA "
                         "evaluates A/B items; shares each prompt's prefix across strengths)")
    ev.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    ev.add_argument("--seed", type=int, default=0, help="seed of the random baseline direction")
    ev.add_argument("--no-baseline", action="store_true", help="skip the random baseline")
    ev.add_argument("--batch-size", type=int, default=256, help="rows per forward (256)")
    ev.add_argument("--plot", type=Path, default=None, help="write a PNG of propensity")
    ev.add_argument("--html", type=Path, default=None, help="write a self-contained HTML page")
    add_json_flag(ev)
    ev.set_defaults(func=run_eval)

    gen = sub.add_parser("generate", help="steered vs unsteered greedy generations")
    gen.add_argument("model", help=MODEL_HELP)
    gen.add_argument("--vector", required=True, type=Path, help="a .safetensors steering vector")
    gen.add_argument("--prompt", required=True, action="append", help="a prompt (repeatable)")
    gen.add_argument("--strength", required=True, type=float, nargs="+",
                     help="one or more strengths; 0 (unsteered) is always shown")
    gen.add_argument("--max-new-tokens", type=int, default=20)
    gen.add_argument("--positions", default="all", help=POSITIONS_HELP)
    add_json_flag(gen)
    gen.set_defaults(func=run_generate)


def _positions(text: str) -> str | int:
    if text in ("all", "prompt", "generated"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"--positions must be all, prompt, generated or an integer, got {text!r}"
        ) from None


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n} is not valid JSON ({err.msg})") from None
    if not rows:
        raise ValueError(f"{path} holds no rows; expected one JSON object per line")
    return rows[:limit] if limit is not None else rows


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
    from residtap.steering import SteeringVector

    pairs, ab = split_rows(read_jsonl(args.pairs), args.pairs)
    model, tok = load_model(args.model)
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

    rows = read_jsonl(args.data, args.limit)
    model, tok = load_model(args.model)
    vec = SteeringVector.load(args.vector, model=model)
    result = steerability(model, tok, rows, vec, args.strengths or DEFAULT_STRENGTHS,
                          positions=_positions(args.positions), baseline=not args.no_baseline,
                          seed=args.seed, batch_size=args.batch_size, progress=not args.json)
    written = []
    if args.plot or args.html:
        written = [str(p) for p in result.save_plot(args.plot, args.html)]
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

    model, tok = load_model(args.model)
    vec = SteeringVector.load(args.vector, model=model)
    rows = compare_generations(model, tok, args.prompt, vec, args.strength,
                               max_new_tokens=args.max_new_tokens,
                               positions=_positions(args.positions))
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
