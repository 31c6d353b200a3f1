r"""`residtap compare STORE_A [STORE_B] --method cka`: site x site similarity of two stores.

Prints a table; with --out, also writes compare.json, compare.png and compare.html.

The two stores must hold the same rows: the same samples (ids) and the same token positions in
the same order, e.g. the same data extracted from two models (or checkpoints) that share a
tokenizer. Anything else is refused with the first row that differs. The stores must also
record the same data fingerprint (a hash of every sample's id, text or token ids and metadata):
two data sets with the same ids and lengths but other texts are not aligned.
`--allow-other-data` (allow_other_data=True) skips only that check, e.g. for the same texts
saved with other metadata columns.

CKA ("cka", "cka_debiased") is streamed over row batches with `LinearCKA`, so the number of rows
is not limited by memory: every pair of sites needs O(d_a² + d_b² + d_a d_b) float64 sums, and
pairs are grouped into passes over the stores that fit `--memory-budget-mb`. SVCCA and PWCCA
need all rows of a pair in memory (one site of each store at a time).

The library behind the command is `residtap.analysis.store_similarity`.

examples:
  residtap capture organism --data organism:mood --sites all-layers \
      --positions last --max-samples 100 --out acts/
  residtap compare acts/
  residtap compare acts/ acts/ --method svcca --sites-a layers.0,layers.5 --sites-b all --out cmp/
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from residtap.analysis.compare import StoreSimilarity, store_similarity
from residtap.analysis.similarity import METHODS
from residtap.cli.common import (
    add_json_flag,
    add_out,
    add_progress_flag,
    add_sites,
    check_out,
    command_help,
    emit_json,
    expand_all_layers,
    format_table,
    layer_sites_of,
    progress,
)
from residtap.report.plots import heatmap_html, heatmap_png
from residtap.store.reader import Store

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("compare", help="site x site similarity (CKA, SVCCA, PWCCA) of two stores",
                       **command_help(__doc__))
    p.add_argument("store_a", metavar="STORE_A", help="a store folder")
    p.add_argument("store_b", metavar="STORE_B", nargs="?",
                   help="a store with the same rows (default: STORE_A itself)")
    p.add_argument("--method", choices=METHODS, default="cka", help="similarity measure (cka)")
    add_sites(p, "--sites-a", default_help="every site of STORE_A")
    add_sites(p, "--sites-b", default_help="every site of STORE_B")
    p.add_argument("--batch-rows", type=int, default=4096, help="rows per CKA batch (4096)")
    p.add_argument("--memory-budget-mb", type=int, default=1024,
                   help="memory for the streamed CKA sums, MiB (1024)")
    add_out(p, "folder", "compare.json, compare.png and compare.html", required=False)
    p.add_argument("--no-png", action="store_true", help="skip compare.png (no matplotlib)")
    p.add_argument("--allow-other-data", action="store_true",
                   help="compare stores whose data fingerprints differ (same ids and positions, "
                        "e.g. other metadata columns)")
    add_progress_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.memory_budget_mb < 1:
        raise ValueError(f"expected --memory-budget-mb >= 1, got {args.memory_budget_mb}")
    check_out(args.out, "folder")
    a = Store.open(args.store_a)
    b = Store.open(args.store_b) if args.store_b else None
    result = store_similarity(a, b, method=args.method,
                              sites_a=expand_all_layers(args.sites_a, layer_sites_of(a.sites)),
                              sites_b=expand_all_layers(args.sites_b,
                                                        layer_sites_of((b or a).sites)),
                              batch_rows=args.batch_rows,
                              memory_budget=args.memory_budget_mb * 2**20,
                              progress=progress(args),
                              allow_other_data=args.allow_other_data)
    files = write_outputs(result, args.out, png=not args.no_png) if args.out else {}
    if args.json:
        emit_json(result.to_dict() | {"files": {k: str(v) for k, v in files.items()}})
        return 0
    print(f"{result.method}: rows = {result.store_a} sites, columns = {result.store_b} sites, "
          f"{result.rows} aligned rows")
    table = result.table()
    print(format_table(table, list(table[0])))
    for kind, path in files.items():
        print(f"wrote {kind}: {path}")
    return 0


def write_outputs(result: StoreSimilarity, folder: str | os.PathLike[str], *,
                  png: bool = True) -> dict[str, Path]:
    """Write compare.json, compare.html and (with matplotlib, when `png`) compare.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "compare.json"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    same = result.store_a == result.store_b
    labels = dict(matrix=result.matrix.tolist(), row_labels=result.sites_a,
                  col_labels=result.sites_b, title=f"{result.method} similarity of sites",
                  xlabel="store B sites" if not same else "sites",
                  ylabel="store A sites" if not same else "sites",
                  vmin=0.0 if result.method != "cka_debiased" else None, vmax=1.0)
    note = f"A: {result.store_a}; B: {result.store_b}; {result.rows} aligned rows."
    paths["html"] = heatmap_html(folder / "compare.html", **labels, note=note)
    if png:
        try:
            paths["png"] = heatmap_png(folder / "compare.png", **labels)
        except ImportError as err:
            log.warning("compare.png not written: %s", err)
    return paths
