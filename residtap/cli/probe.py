r"""`residtap probe sweep|train|score`: probes on an activation store, and scores of a saved
probe on new texts.

    sweep   one probe per site of a store: table; sweep.json, sweep.png, sweep.html
    train   one probe at one site, saved as a .safetensors probe file (--kind attention: an
            attention probe over every token of a text, from a store with positions all; on a
            store of SAE features, residtap.sae.store, the probe records which features it reads)
    score   a probe file's scores per text (or per token) on a data file: table, JSON or CSV;
            also an SAE folder (its --features' activations) or a probe on SAE features (--sae)

sweep and train split by text: the samples' `split` column (train / test) when the store has
one, else a random `--test-fraction` of the texts (see residtap.probes.split_plan). score runs the
model on the texts and reads the probe where it was trained, at the store's positions unless
--positions says otherwise (see residtap.probes.scoring).

examples:
  residtap capture organism --data organism:mood --sites all-layers --positions last \
      --max-samples 200 --out acts/
  residtap probe sweep acts/ --label label --out sweep/
  residtap probe train acts/ --label label --site layers.3 --out mood-probe.safetensors
  residtap probe score mood-probe.safetensors organism --data organism:mood --out scores.csv
  residtap probe score mood-probe.safetensors organism --data organism:mood --max-samples 3 --json
  residtap capture organism --data organism:early_exit --sites layers.4 --positions all \
      --max-samples 200 --out acts-all/
  residtap probe train acts-all/ --label label --site layers.4 --kind attention --heads 4 \
      --epochs 10 --out answer.safetensors
  residtap probe score answer.safetensors organism --data organism:early_exit --max-samples 3
  residtap probe score organism:sae organism --data organism:mood --features 222,21 \
      --approximate-topk --max-samples 2
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

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
    add_sites,
    check_out,
    command_help,
    emit_json,
    expand_all_layers,
    format_table,
    layer_sites_of,
    load_model_from_args,
    parse_positions,
    progress,
)
from residtap.probes.plot import write_files
from residtap.probes.split_plan import SWEEP_KINDS
from residtap.probes.sweep import sweep, train_site_probe

TRAIN_KINDS = (*SWEEP_KINDS, "attention")

POSITION_FORMS = {"words": ("all", "last"), "indices": True}
SHOWN_ROWS = 20  # rows `probe score` prints as a table without --out


def register(sub) -> None:
    parser = command_help(__doc__)
    p = sub.add_parser("probe", help="probes: sweep every site of a store, train one, score "
                                     "texts with a saved one", **parser)
    probe_sub = p.add_subparsers(dest="probe_command", metavar="{sweep,train,score}")
    probe_sub.required = True

    s = probe_sub.add_parser("sweep", help="one probe per site; held-out metrics by layer",
                             **parser)
    _common(s)
    add_sites(s, default_help="every site in the store")
    s.add_argument("--baseline", action="store_true",
                   help="also fit a difference-of-means probe per site (binary labels)")
    add_out(s, "folder", "sweep.json, sweep.png and sweep.html", required=False)
    s.add_argument("--no-png", action="store_true", help="skip sweep.png (no matplotlib)")
    add_progress_flag(s)
    add_json_flag(s)
    s.set_defaults(func=run_sweep)

    t = probe_sub.add_parser("train", help="train one probe at one site and save it", **parser)
    _common(t, TRAIN_KINDS)
    t.add_argument("--site", required=True, help="the site to probe, e.g. layers.3")
    t.add_argument("--heads", type=int, default=4,
                   help="--kind attention: attention heads (4)")
    t.add_argument("--epochs", type=int, default=50,
                   help="--kind attention: training epochs; the best on a validation split "
                        "is kept (50)")
    add_progress_flag(t)
    add_out(t, "file", "the probe (.safetensors)")
    add_json_flag(t)
    t.set_defaults(func=run_train)

    c = probe_sub.add_parser("score", help="a saved probe's scores on texts (JSON or CSV)",
                             **parser)
    c.add_argument("probe_file", metavar="PROBE_FILE",
                   help="a probe file (.safetensors) from `residtap probe train` or save_probe "
                        "(linear or attention), or an SAE folder (SAELens layout; organism:sae "
                        "is the organism's)")
    c.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    add_allow_other_weights(c)
    add_data(c, help="the texts: a .jsonl, .json, .csv or .txt file")
    add_list(c, "--features", item_type=int, default=None,
             help="with an SAE folder: the feature indices to score (default: all)")
    c.add_argument("--sae", default=None, metavar="FOLDER",
                   help="with a probe trained on SAE features: that SAE's folder")
    c.add_argument("--approximate-topk", action="store_true",
                   help="with a subset of a TopK SAE's features: read relu(pre-activation) "
                        "(residtap.sae.features says when it equals TopK)")
    add_positions(c, **POSITION_FORMS, default="the probe's",
                  note="the default is the positions of the store the probe was trained on "
                       "(else last)")
    add_out(c, "file", "every row as .jsonl or .csv (by suffix)", required=False)
    c.add_argument("--batch-size", type=int, default=16, help="texts per forward (16)")
    c.add_argument("--max-samples", type=int, default=None, help="score only the first N texts")
    c.add_argument("--max-length", type=int, default=None, help="truncate longer texts")
    c.add_argument("--text-column", default="text")
    add_model_flags(c)
    add_progress_flag(c)
    add_json_flag(c)
    c.set_defaults(func=run_score)


def _common(p, kinds: tuple[str, ...] = SWEEP_KINDS) -> None:
    p.add_argument("store", metavar="STORE", help="a store folder written by `residtap capture`")
    p.add_argument("--label", required=True, help="the sample column holding the labels")
    p.add_argument("--kind", choices=kinds, default="auto",
                   help="probe kind (auto: ridge for fractional numbers, else logistic or "
                        "multinomial by the number of classes"
                        + ("; attention: pooled over a text's tokens" if "attention" in kinds
                           else "") + ")")
    p.add_argument("--split-column", default="split",
                   help="sample column with train/test values ('none': random split by text)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="fraction of texts held out when there is no split column (0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (0)")


def _split_column(args) -> str | None:
    return None if args.split_column.lower() == "none" else args.split_column


def run_sweep(args) -> int:
    from residtap.store.reader import Store

    check_out(args.out, "folder")
    store = Store.open(args.store)
    sites = expand_all_layers(args.sites, layer_sites_of(store.sites))
    result = sweep(store, args.label, sites, kind=args.kind,
                   split_column=_split_column(args), test_fraction=args.test_fraction,
                   seed=args.seed, baseline=args.baseline, progress=progress(args))
    files = write_files(result, args.out, png=not args.no_png) if args.out else {}
    if args.json:
        emit_json(result.to_dict() | {"files": {k: str(v) for k, v in files.items()}})
        return 0
    table = result.table()
    print(f"{args.label}: {result.kind} probes, split {result.split['source']} "
          f"({result.split['train_texts']} train / {result.split['test_texts']} test texts)")
    print(format_table(table, list(table[0])))
    print(f"best site: {result.best_site} ({result.metric} "
          f"{result.best.test[result.metric]:.4f})"
          + (f"; majority class {result.chance:.4f}" if result.chance is not None else ""))
    for kind, path in files.items():
        print(f"wrote {kind}: {path}")
    if not files:
        print("(pass --out DIR to save sweep.json and the plots)")
    return 0


def run_train(args) -> int:
    from residtap.probes.files import save_probe
    from residtap.store.reader import Store

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"expected --out to end in .safetensors, got {str(out)!r}; e.g. "
                         "--out probe.safetensors")
    check_out(out, "file")
    store = Store.open(args.store)
    if args.kind == "attention":
        from residtap.probes.attention_store import train_store_attention_probe

        probe = train_store_attention_probe(
            store, args.label, args.site, split_column=_split_column(args),
            test_fraction=args.test_fraction, seed=args.seed, n_heads=args.heads,
            epochs=args.epochs, progress=progress(args))
    else:
        probe = train_site_probe(store, args.label, args.site, kind=args.kind,
                                 split_column=_split_column(args),
                                 test_fraction=args.test_fraction, seed=args.seed)
        if isinstance(store.manifest.get("sae"), dict):  # a store of SAE features
            probe.metadata["sae"] = dict(store.manifest["sae"])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_probe(probe, out)
    summary: dict[str, Any] = {
        "file": str(out), "site": probe.site, "label_column": probe.label_column,
        "kind": probe.kind, "classes": probe.classes, "d_model": probe.d_model,
        "model": (probe.model or {}).get("name"), "test": probe.metrics["test"],
        "split": probe.metadata["split"],
    }
    if args.json:
        emit_json(summary)
        return 0
    print(f"{probe.kind} probe for {args.label!r} at {probe.site}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in probe.metrics["test"].items() if k != "n")
          + f" on {probe.metrics['test']['n']} held-out rows")
    print(f"wrote {out}")
    return 0


def run_score(args) -> int:
    from residtap.probes.files import load_any_probe
    from residtap.probes.scoring import agreement, default_positions, score_texts

    out = Path(args.out) if args.out else None
    if out is not None:
        if out.suffix not in (".jsonl", ".csv"):
            raise ValueError(f"expected --out to end in .jsonl or .csv, got {str(out)!r}; e.g. "
                             "--out scores.csv")
        check_out(out, "file")
    path = _bundled(args.probe_file)
    picks = {"sae": _bundled(args.sae) if args.sae else None, "features": args.features,
             "approximate_topk": args.approximate_topk}
    load_any_probe(path, **picks)  # a damaged file fails before the model loads
    model, tokenizer = load_model_from_args(args)
    probe = load_any_probe(path, model=model, allow_other_weights=args.allow_other_weights,
                           **picks)
    label_column = getattr(getattr(probe, "probe", probe), "label_column", None)
    positions = (default_positions(probe) if args.positions == ["the probe's"]
                 else parse_positions(args.positions, **POSITION_FORMS))
    rows = list(score_texts(model, tokenizer, probe, args.data, positions=positions,
                            batch_size=args.batch_size, max_length=args.max_length,
                            text_column=args.text_column, max_samples=args.max_samples,
                            progress=progress(args)))
    check = agreement(rows, label_column) if label_column else None
    kind = getattr(probe, "kind", None) or ("sae features" if probe.probe is None else
                                            f"{probe.probe.kind} on SAE features")
    summary: dict[str, Any] = {
        "probe": str(args.probe_file), "site": probe.site, "kind": kind,
        "positions": positions, "texts": len({r["sample"] for r in rows}), "rows": len(rows),
        "agreement": check,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_rows(rows, out)
        summary["file"] = str(out)
    if args.json:
        emit_json(summary if out is not None else summary | {"scores": rows})
        return 0
    shown = rows if out is None else rows[:0]
    if shown:
        cols = [c for c in ("id", "position", "token", "score", "probability", "prediction",
                            label_column) if c and any(c in r for r in rows)]
        table = [{c: _short(r.get(c)) for c in cols} for r in shown[:SHOWN_ROWS]]
        print(format_table(table, cols))
        if len(rows) > SHOWN_ROWS:
            print(f"... {len(rows) - SHOWN_ROWS} more rows (pass --out FILE.csv or --json for "
                  "all)")
    print(f"{probe.site}: {len(rows)} score(s) on {summary['texts']} text(s), positions "
          f"{positions}" + (f"; prediction = {check['column']} on {check['accuracy']:.1%} of "
                            f"{check['rows']} rows" if check else ""))
    if out is not None:
        print(f"wrote {out}")
    return 0


def _bundled(value: str) -> str:
    """`organism:sae` -> the organism's SAE folder; anything else as given."""
    if value == "organism:sae":
        from residtap.organism import DATA_DIR

        return str(DATA_DIR.parent / "sae")
    return value


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """JSON lines, or CSV with one column per key (lists as JSON text)."""
    with path.open("w", encoding="utf-8", newline="") as f:
        if path.suffix == ".jsonl":
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
            return
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                             for k, v in row.items()})


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return "" if value is None else str(value)
