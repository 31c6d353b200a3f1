"""`residtap capture MODEL --data FILE --sites ... --out DIR`: write an activation store.

    residtap capture ./my-model --data texts.jsonl --sites all-layers --out acts/ --positions last

Re-running the same command after an interruption resumes after the last complete shard.
Under torchrun, `torchrun --nproc-per-node N -m residtap capture ...` splits the data set over
the ranks (data parallel); `--distributed tensor` shards the model instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import residtap.distributed
from residtap.cli.common import MODEL_HELP, add_json_flag, emit_json, format_table, load_model


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "capture", help="run a data set through a model and store activations on disk",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--data", required=True,
                   help="a .jsonl (schema: id, text, label, split, ...), .json, .csv or .txt file")
    p.add_argument("--sites", required=True,
                   help="comma-separated site names (layers.0,layers.1) or 'all-layers'")
    p.add_argument("--out", required=True, help="the store folder to write (or resume)")
    p.add_argument("--positions", default="all",
                   help="'all' real tokens, 'last' token of each text, or indices such as 0,-1")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None, help="truncate longer texts")
    p.add_argument("--text-column", default="text")
    p.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default ~128 MiB)")
    p.add_argument("--dtype", default=None,
                   help="storage dtype, e.g. bfloat16 or float32 (default: the model's)")
    p.add_argument("--model-dtype", default=None, help="dtype to load the model in")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store made with other settings")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--distributed", choices=["data", "tensor"], default=None,
                   help="under torchrun: 'data' splits the data set over the ranks (the default "
                        "when WORLD_SIZE > 1), 'tensor' shards the model (tensor parallel) and "
                        "rank 0 writes")
    add_json_flag(p)
    p.set_defaults(func=run)


def parse_positions(text: str) -> str | list[int]:
    if text in ("all", "last"):
        return text
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"--positions must be 'all', 'last' or comma-separated ints such as "
                         f"0,-1; got {text!r}") from err


def run(args: argparse.Namespace) -> int:
    from residtap.store import StoreWriteError, extract

    positions = parse_positions(args.positions)
    mode = args.distributed
    if mode is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        mode = "data"
    rank = 0
    if mode is not None:
        rank, _ = residtap.distributed.init()
    model, tokenizer = load_model(args.model, dtype=args.model_dtype,
                                  tensor_parallel=mode == "tensor")
    t0 = time.perf_counter()
    try:
        store = extract(
            model, tokenizer, args.data, args.sites, args.out, positions=positions,
            dtype=args.dtype, batch_size=args.batch_size, max_samples=args.max_samples,
            text_column=args.text_column, max_length=args.max_length,
            shard_rows=args.shard_rows, overwrite=args.overwrite,
            progress=not args.no_progress and not args.json and rank == 0,
            distributed=mode,
        )
    except StoreWriteError as err:
        print(f"residtap capture: error: {err}", file=sys.stderr)
        return 1
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
