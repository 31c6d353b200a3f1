"""Benchmark the activation store: capture-to-disk cost, tap time, memory and write speed.

    python bench/bench_store.py                 # table
    python bench/bench_store.py --json          # machine-readable

Model: the reference Llama (residtap.benchmark.reference_model: 8 layers, d_model 512) with
vocab 1000; data: random
token-id sequences of --seq tokens (no padding). Measured:

1. capture of every `layers.{i}` to disk (positions "all" and "last") against a hookless
   forward over the same batches (same padding/encoding code, same inputs); the three variants
   run interleaved, in a rotating order, --repeats times; each repeat gives paired ratios, and
   the table shows their median and min/max;
2. the time spent inside residtap's own taps per forward, and the time the forward loop waited
   on the writer's queue (an instrumented extra run);
3. peak RSS (ru_maxrss) of a fresh subprocess capturing N and 10*N samples;
4. write throughput of the shard writer against a plain file write of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from residtap.store import writer as writer_mod  # noqa: E402
from residtap.store.batches import encode  # noqa: E402
from residtap.store.data import load_samples  # noqa: E402
from residtap.store.extract import extract  # noqa: E402
from residtap.store.forward import StoreTap  # noqa: E402
from residtap.store.reader import Store  # noqa: E402


def build_model():
    from residtap.benchmark import reference_model

    return reference_model(vocab=1000)


def make_data(n: int, seq: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 1000, (n, seq), generator=g).tolist()


def hookless(model, data, batch_size: int) -> None:
    """The same loop extract runs (encode, pad, position ids), without taps or writes."""
    samples = load_samples(data)
    with torch.inference_mode():
        for lo in range(0, len(samples), batch_size):
            ids, mask = encode(samples[lo:lo + batch_size], None, 0, "right", None)
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1),
                  use_cache=False)


def capture(model, data, batch_size: int, out: Path, positions: str,
            shard_rows: int | None = None) -> Store:
    """extract() into a fresh `out`; call `clear(out)` first (outside any timed region)."""
    sites = [f"layers.{i}" for i in range(8)]
    return extract(model, None, data, sites, out, positions=positions,
                   batch_size=batch_size, shard_rows=shard_rows, progress=False)


def clear(out: Path) -> None:
    """Delete an earlier run's store. Untimed: unlinking 64 MiB of freshly written shards takes
    about 0.1 s, which a hookless forward never pays."""
    shutil.rmtree(out, ignore_errors=True)


def timed(fn, before=None) -> float:
    if before is not None:
        before()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# -- 1. paired timing ---------------------------------------------------------------------------
def bench_ratio(model, data, args, work: Path) -> dict:
    hookless(model, data[: args.batch_size], args.batch_size)  # warm-up
    variants = {
        "hookless": (lambda: hookless(model, data, args.batch_size), None),
        "all": (lambda: capture(model, data, args.batch_size, work / "all", "all"),
                lambda: clear(work / "all")),
        "last": (lambda: capture(model, data, args.batch_size, work / "last", "last"),
                 lambda: clear(work / "last")),
    }
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % 3:] + names[:r % 3]  # rotate so no variant always runs first
        for name in order:
            times[name].append(timed(*variants[name]))
    ratios = {v: [a / b for a, b in zip(times[v], times["hookless"], strict=True)]
              for v in ("all", "last")}
    return {"seconds": {n: summary(t) for n, t in times.items()},
            "ratio": {v: summary(x) for v, x in ratios.items()}}


# -- 2. time inside the taps ----------------------------------------------------------------------
def bench_taps(model, data, args, work: Path) -> dict:
    tap_s, wait_s, forwards = [0.0], [0.0], len(range(0, len(data), args.batch_size))
    call, put = StoreTap.__call__, writer_mod.ShardWriter._put

    def timed_call(self, hidden, step):
        t0 = time.perf_counter()
        call(self, hidden, step)
        tap_s[0] += time.perf_counter() - t0

    def timed_put(self, item):
        t0 = time.perf_counter()
        put(self, item)
        wait_s[0] += time.perf_counter() - t0

    StoreTap.__call__, writer_mod.ShardWriter._put = timed_call, timed_put
    try:
        total = timed(lambda: capture(model, data, args.batch_size, work / "taps", "all"),
                      lambda: clear(work / "taps"))
    finally:
        StoreTap.__call__, writer_mod.ShardWriter._put = call, put
    return {"forwards": forwards, "tap_ms_per_forward": 1e3 * tap_s[0] / forwards,
            "queue_wait_ms_per_forward": 1e3 * wait_s[0] / forwards,
            "total_ms_per_forward": 1e3 * total / forwards}


# -- 3. peak RSS in fresh subprocesses ------------------------------------------------------------
def rss_child(args) -> None:
    torch.set_num_threads(args.threads)
    model = build_model()
    data = make_data(args.rss_child, args.seq)
    out = Path(args.workdir) / f"rss-{args.rss_child}"
    clear(out)
    store = capture(model, data, args.batch_size, out, "all", shard_rows=args.shard_rows)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    nbytes = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"samples": args.rss_child, "rows": len(store), "store_mib": nbytes / 2**20,
                      "peak_rss_mib": peak_kib / 1024}))


def bench_rss(args, work: Path) -> list[dict]:
    results = []
    for n in (args.rss_samples, 10 * args.rss_samples):
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--seq", str(args.seq),
               "--batch-size", str(args.batch_size), "--shard-rows", str(args.shard_rows),
               "--threads", str(args.threads), "--workdir", str(work)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


# -- 4. write throughput --------------------------------------------------------------------------
def bench_write(store: Store, work: Path) -> dict:
    shards = []
    names = [*store.sites, "sample", "position"]
    for i in range(len(store.manifest["shards"])):
        shards.append({n: [store.shard_tensor(n, i).clone()] for n in names})  # in memory
    out = work / "write"
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    nbytes = sum(writer_mod.write_safetensors(out / f"{i}.safetensors", s, {})
                 for i, s in enumerate(shards))
    t_writer = time.perf_counter() - t0
    payload = b"\0" * (nbytes // max(len(shards), 1))
    t0 = time.perf_counter()
    for i in range(len(shards)):
        with open(out / f"plain-{i}.bin", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    t_plain = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"bytes": nbytes, "writer_mib_s": nbytes / 2**20 / t_writer,
            "plain_mib_s": nbytes / 2**20 / t_plain, "writer_vs_plain": t_writer / t_plain}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32, help="samples for the timing runs")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rss-samples", type=int, default=16, help="N for the RSS runs (and 10*N)")
    p.add_argument("--shard-rows", type=int, default=1024, help="rows per shard in RSS runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where stores are written (a real disk)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child is not None:
        rss_child(args)
        return 0
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="residtap-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model, data = build_model(), make_data(args.samples, args.seq)
        result = {"config": {k: v for k, v in vars(args).items() if k != "rss_child"},
                  "timing": bench_ratio(model, data, args, work),
                  "taps": bench_taps(model, data, args, work)}
        result["write"] = bench_write(Store.open(work / "taps"), work)
        result["rss"] = bench_rss(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


def print_table(r: dict) -> None:
    c = r["config"]
    print(f"8-layer Llama d=512, {c['samples']} samples x {c['seq']} tokens, batch "
          f"{c['batch_size']}, {c['threads']} threads, {c['repeats']} interleaved repeats")
    print(f"{'variant':<26}{'median s':>10}{'ratio med':>11}{'ratio min':>11}{'ratio max':>11}")
    for name in ("hookless", "all", "last"):
        s = r["timing"]["seconds"][name]["median"]
        ratio = r["timing"]["ratio"].get(name)
        cells = [f"{ratio[k]:>11.3f}" for k in ("median", "min", "max")] if ratio else [
            f"{'1':>11}", "", ""]
        label = "hookless forward" if name == "hookless" else f"capture all layers, {name}"
        print(f"{label:<26}{s:>10.3f}" + "".join(cells))
    t = r["taps"]
    print(f"\ninside residtap taps: {t['tap_ms_per_forward']:.2f} ms/forward; waiting on the "
          f"writer queue: {t['queue_wait_ms_per_forward']:.2f} ms/forward; whole capture: "
          f"{t['total_ms_per_forward']:.1f} ms/forward ({t['forwards']} forwards, positions all)")
    w = r["write"]
    print(f"write: shard writer {w['writer_mib_s']:.0f} MiB/s, plain file write "
          f"{w['plain_mib_s']:.0f} MiB/s (writer/plain time {w['writer_vs_plain']:.2f}x, "
          f"{w['bytes'] / 2**20:.0f} MiB, fsync included)")
    a, b = r["rss"]
    print(f"peak RSS: N={a['samples']} ({a['store_mib']:.0f} MiB stored) {a['peak_rss_mib']:.0f} "
          f"MiB; 10N={b['samples']} ({b['store_mib']:.0f} MiB stored) {b['peak_rss_mib']:.0f} "
          f"MiB; ratio {b['peak_rss_mib'] / a['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
