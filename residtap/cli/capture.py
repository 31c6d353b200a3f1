r"""`residtap capture MODEL --data FILE --sites ... --out DIR`: write an activation store.

Re-running the same command after an interruption resumes after the last complete shard.
Under torchrun, `torchrun --nproc-per-node N -m residtap capture ...` splits the data set over
the ranks (data parallel); `--distributed tensor` shards the model instead.

examples:
  residtap capture organism --data organism:mood --sites all-layers --positions last \
      --max-samples 200 --out acts/
  residtap capture organism --data organism:topic --sites layers.1 --sites layers.3 \
      --positions all --max-samples 50 --out topic-acts/
  residtap capture organism --data organism:mood --sites layers.1 --out acts-json/ --json
"""

from __future__ import annotations

import argparse
import os
import time

import residtap.distributed
from residtap.cli.common import (
    MODEL_HELP,
    add_data,
    add_json_flag,
    add_model_flags,
    add_out,
    add_positions,
    add_progress_flag,
    add_sites,
    check_out,
    command_help,
    emit_json,
    format_table,
    load_model_from_args,
    parse_positions,
    progress,
)

POSITION_FORMS = {"words": ("all", "last"), "indices": True}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "capture", help="run a data set through a model and store activations on disk",
        **command_help(__doc__),
    )
    p.add_argument("model", help=MODEL_HELP)
    add_data(p, help="the texts: a .jsonl (schema: id, text, label, split, ...), .json, .csv "
                     "or .txt file")
    add_sites(p, required=True)
    add_out(p, "folder", "the store (re-running the same command resumes it)")
    add_positions(p, **POSITION_FORMS, default="all")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None, help="truncate longer texts")
    p.add_argument("--text-column", default="text")
    p.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default ~128 MiB)")
    p.add_argument("--dtype", default=None,
                   help="storage dtype, e.g. bfloat16 or float32 (default: the model's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store made with other settings")
    p.add_argument("--distributed", choices=["data", "tensor"], default=None,
                   help="under torchrun: 'data' splits the data set over the ranks (the default "
                        "when WORLD_SIZE > 1), 'tensor' shards the model (tensor parallel) and "
                        "rank 0 writes")
    add_model_flags(p)
    add_progress_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def check_torchrun(mode: str) -> None:
    """ValueError unless this process was started by torchrun (or another launcher that sets
    torch.distributed's environment)."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if v not in os.environ]
    if missing:
        raise ValueError(
            f"expected --distributed {mode} to run under torchrun, but {', '.join(missing)} "
            "are not set (no torchrun); fix: torchrun --nproc-per-node N -m residtap capture "
            "..., or drop --distributed"
        )


def run(args: argparse.Namespace) -> int:
    from residtap.store import extract

    positions = parse_positions(args.positions, **POSITION_FORMS)
    check_out(args.out, "folder")
    sites = ["all-layers" if s == "all" else s for s in args.sites]
    mode = args.distributed
    if mode is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        mode = "data"
    rank = 0
    if mode is not None:
        check_torchrun(mode)
        rank, _ = residtap.distributed.init()
    model, tokenizer = load_model_from_args(args, tensor_parallel=mode == "tensor")
    t0 = time.perf_counter()
    store = extract(
        model, tokenizer, args.data, sites, args.out, positions=positions,
        dtype=args.dtype, batch_size=args.batch_size, max_samples=args.max_samples,
        text_column=args.text_column, max_length=args.max_length,
        shard_rows=args.shard_rows, overwrite=args.overwrite,
        progress=progress(args) and rank == 0, distributed=mode,
    )
    seconds = time.perf_counter() - t0
    if rank != 0:  # rank 0 reports for everyone
        return 0
    nbytes = sum((store.folder / s["file"]).stat().st_size for s in store.manifest["shards"])
    summary = {
        "out": str(store.folder), "rows": len(store), "samples": store.manifest["samples"],
        "shards": len(store.manifest["shards"]), "positions": store.positions,
        "sites": store.manifest["sites"], "bytes": nbytes, "seconds": round(seconds, 3),
        "complete": store.complete,
    }
    if args.json:
        emit_json(summary)
        return 0
    rows = [{"site": s, "shape": info["shape"], "dtype": info["dtype"]}
            for s, info in store.manifest["sites"].items()]
    print(format_table(rows, ["site", "shape", "dtype"]))
    print(f"\n{summary['rows']} rows from {summary['samples']} samples in {summary['shards']} "
          f"shard(s), {nbytes / 2**20:.1f} MiB, {seconds:.1f} s -> {summary['out']}")
    return 0
