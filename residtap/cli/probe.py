"""`residtap probe sweep|train STORE --label COLUMN`: probes on an activation store.

    residtap probe sweep acts/ --label label --out sweep/      # table; sweep.json/.png/.html
    residtap probe train acts/ --label label --site layers.3 --out probe.safetensors

Both split by text: the samples' `split` column (train / test) when the store has one, else a
random `--test-fraction` of the texts (see residtap.probes.sweep).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from residtap.cli.common import add_json_flag, emit_json, format_table
from residtap.probes.sweep import SWEEP_KINDS, sweep, train_site_probe


def register(sub) -> None:
    p = sub.add_parser("probe", help="train probes on a store: sweep every site, or one site")
    probe_sub = p.add_subparsers(dest="probe_command", metavar="{sweep,train}")
    probe_sub.required = True

    s = probe_sub.add_parser("sweep", help="one probe per site; held-out metrics by layer")
    _common(s)
    s.add_argument("--sites", help="comma-separated sites to probe (default: all in the store)")
    s.add_argument("--baseline", action="store_true",
                   help="also fit a difference-of-means probe per site (binary labels)")
    s.add_argument("--out", help="folder for sweep.json, sweep.png and sweep.html "
                                 "(default: print only)")
    s.add_argument("--no-png", action="store_true", help="skip sweep.png (no matplotlib)")
    add_json_flag(s)
    s.set_defaults(func=run_sweep)

    t = probe_sub.add_parser("train", help="train one probe at one site and save it")
    _common(t)
    t.add_argument("--site", required=True, help="the site to probe, e.g. layers.3")
    t.add_argument("--out", required=True, help="probe file to write (.safetensors)")
    add_json_flag(t)
    t.set_defaults(func=run_train)


def _common(p) -> None:
    p.add_argument("store", metavar="STORE", help="a store folder written by `residtap capture`")
    p.add_argument("--label", required=True, help="the sample column holding the labels")
    p.add_argument("--kind", choices=SWEEP_KINDS, default="auto",
                   help="probe kind (auto: ridge for fractional numbers, else logistic or "
                        "multinomial by the number of classes)")
    p.add_argument("--split-column", default="split",
                   help="sample column with train/test values ('none': random split by text)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="fraction of texts held out when there is no split column (0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (0)")


def _split_column(args) -> str | None:
    return None if args.split_column.lower() == "none" else args.split_column


def run_sweep(args) -> int:
    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else None
    result = sweep(args.store, args.label, sites, kind=args.kind,
                   split_column=_split_column(args), test_fraction=args.test_fraction,
                   seed=args.seed, baseline=args.baseline, progress=not args.json)
    files = result.save(args.out, png=not args.no_png) if args.out else {}
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
    store = Store.open(args.store)
    probe = train_site_probe(store, args.label, args.site, kind=args.kind,
                             split_column=_split_column(args),
                             test_fraction=args.test_fraction, seed=args.seed)
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
