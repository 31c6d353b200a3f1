"""Device bench, the other sections: logit lens, capture to disk, steering sweep.

lens      LogitLens capture inside one generate, then the chunked deferred decode, against the
          one-GEMM floor ((rows x d) @ (d x V), rows = layers x B x T) and against
          bench/bench_lens.py's naive lens (generate with output_hidden_states, then per step
          and layer: final norm, lm_head, full softmax; then top-k, entropy, KL, rank).
capture   residtap.extract of every layer to a store folder (positions "all" and "last")
          against a hookless forward over the same batches (logits for the last position only:
          extract stops after the last block). Per target folder (a disk, /dev/shm), with the
          folder's plain write throughput (same bytes, fsync) beside it.
steering  8 strengths over P A/B prompts: residtap's batched steerability() against eight
          sequential passes (bench/bench_steer.py's two paths).
Each variant runs in a rotating order per repeat; ratios are paired within a repeat.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from gpu_common import Clock, Section, generate, rotate, summary
from torch import nn

import residtap
from residtap.lens import LogitLens
from residtap.sites import num_layers
from residtap.steering import SteeringVector, steerability

log = logging.getLogger("bench_gpu")


# -- lens -------------------------------------------------------------------------------------
def bench_lens(model: nn.Module, plan: Any, clock: Clock, sec: Section) -> None:
    from bench_lens import run_naive

    cfg = plan.lens
    B, P, n, k = cfg["batch"], cfg["prompt"], cfg["new"], cfg["top_k"]
    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (B, P), device=device)
    mask = torch.ones_like(ids)
    lens, L, d = LogitLens(model), num_layers(model), model.config.hidden_size
    gen_kw = dict(min_new_tokens=n, do_sample=False, pad_token_id=0)
    weight = model.get_output_embeddings().weight  # (V, d)
    rows = L * B * (P + n - 1)
    x = torch.randn(rows, d, device=device, dtype=weight.dtype)
    sec.entry.update(batch=B, prompt=P, new=n, top_k=k, layers=L, rows=rows,
                     memory_budget_mb=cfg["budget_mb"], repeats=[])

    def ours() -> tuple[dict[str, float], Any]:
        t_cap, cap = clock.time(lambda: lens.capture(ids, mask, max_new_tokens=n, **gen_kw))
        t_dec, res = clock.time(lambda: lens.decode(cap, top_k=k,
                                                    memory_budget=cfg["budget_mb"] * 2**20))
        return {"capture": t_cap, "decode": t_dec, "total": t_cap + t_dec}, res

    def naive() -> tuple[dict[str, float], Any]:
        t, res = clock.time(lambda: run_naive(model, ids, mask, argparse.Namespace(new=n,
                                                                                   top_k=k)))
        return {"total": t}, res

    def plain() -> tuple[dict[str, float], None]:
        return {"total": clock.time(lambda: generate(model, ids, n))[0]}, None

    def floor() -> tuple[dict[str, float], None]:
        return {"total": clock.time(lambda: torch.matmul(x, weight.t()))[0]}, None

    runners = {"generate": plain, "ours": ours, "naive": naive, "floor": floor}
    with torch.no_grad():
        if not sec.fits("warm-up", cfg["prior_s"]):
            return
        t_warm = time.perf_counter()
        first = {v: fn() for v, fn in runners.items()}  # warm-up, and the agreement check
        warm_s = time.perf_counter() - t_warm
        same = (first["ours"][1].topk_ids[-1, ..., 0] == first["naive"][1]["final_ids"][..., 0])
        sec.entry["final_layer_top1_agreement"] = float(same.float().mean())
        del first
        sec.done("warm-up")
        for r in range(cfg["repeats"]):
            if not sec.fits(f"repeat {r}", warm_s):
                break
            got = {v: runners[v]()[0] for v in rotate(list(runners), r)}
            sec.entry["repeats"].append(got)
            sec.done(f"repeat {r}")
    reps = sec.entry["repeats"]

    def ratio(a: str, ka: str, b: str, kb: str) -> dict | None:
        return summary([g[a][ka] / g[b][kb] for g in reps])

    sec.entry.update(
        seconds={f"{v}_{part}": summary([g[v][part] for g in reps]) for v in runners
                 for part in ("total", "capture", "decode") if reps and part in reps[0][v]},
        decode_over_floor=ratio("ours", "decode", "floor", "total"),
        naive_over_ours_total=ratio("naive", "total", "ours", "total"),
        capture_over_generate=ratio("ours", "capture", "generate", "total"))
    dec, whole = sec.entry["decode_over_floor"], sec.entry["naive_over_ours_total"]
    sec.entry["pass_decode_floor"] = None if dec is None else dec["median"] <= 1.25
    sec.entry["pass_whole_run"] = None if whole is None else whole["median"] >= 5.0


# -- capture to disk --------------------------------------------------------------------------
def _fs_type(path: Path) -> str:
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def _hookless(model: nn.Module, data: list[list[int]], batch: int, device) -> None:
    """The forwards extract runs (position ids from 0, no cache), without taps or writes."""
    with torch.inference_mode():
        for lo in range(0, len(data), batch):
            ids = torch.tensor(data[lo:lo + batch], device=device)
            pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos,
                  use_cache=False, logits_to_keep=1)


def _plain_write(folder: Path, nbytes: int) -> float:
    """GB/s of writing `nbytes` to one file in `folder` (64 MiB writes, fsync)."""
    chunk = os.urandom(64 * 2**20)
    path = folder / "plain-write.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(chunk))):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return max(1, nbytes // len(chunk)) * len(chunk) / seconds / 1e9


def bench_capture(model: nn.Module, plan: Any, clock: Clock, sec: Section) -> None:
    from bench_store import make_data

    cfg = plan.capture
    data = make_data(cfg["samples"], cfg["seq"])  # random ids < 1000, no padding
    device = next(model.parameters()).device
    L, d = num_layers(model), model.config.hidden_size
    itemsize = next(model.parameters()).element_size()
    nbytes = cfg["samples"] * cfg["seq"] * L * d * itemsize
    sec.entry.update(samples=cfg["samples"], seq=cfg["seq"], batch=cfg["batch"], layers=L,
                     store_bytes_all=nbytes, targets=[])

    def extract(out: Path, positions: str) -> None:
        residtap.extract(model, None, data, "all-layers", out, positions=positions,
                         batch_size=cfg["batch"], progress=False)

    for base in cfg["dirs"]:
        base = Path(base)
        if not base.is_dir() or shutil.disk_usage(base).free < 3 * nbytes:
            sec.entry["skipped"].append({"unit": str(base), "reason": "missing or under 3x the "
                                         "store's bytes free"})
            continue
        entry = {"dir": str(base), "fs": _fs_type(base), "repeats": []}
        sec.entry["targets"].append(entry)
        work = Path(tempfile.mkdtemp(prefix="residtap-gpu-store-", dir=base))
        try:
            variants = {"hookless": lambda out: _hookless(model, data, cfg["batch"], device),
                        "all": lambda out: extract(out, "all"),
                        "last": lambda out: extract(out, "last")}
            if not sec.fits(f"{base} warm-up", cfg["prior_s"]):
                continue
            t0 = time.perf_counter()
            for v, fn in variants.items():  # warm-up: kernels, pinned host buffers
                fn(work / v)
                shutil.rmtree(work / v, ignore_errors=True)
            per_repeat = time.perf_counter() - t0
            entry["plain_write_gb_s"] = _plain_write(work, nbytes)
            for r in range(cfg["repeats"]):
                if not sec.fits(f"{base} repeat {r}", per_repeat):
                    break
                got = {}
                for v in rotate(list(variants), r):
                    shutil.rmtree(work / v, ignore_errors=True)  # untimed, as in bench_store
                    got[v] = clock.time(lambda f=variants[v], out=work / v: f(out))[0]
                entry["repeats"].append(got)
                sec.done(f"{base} repeat {r}")
            reps = entry["repeats"]
            for v in ("all", "last"):
                entry[f"{v}_over_hookless"] = summary([g[v] / g["hookless"] for g in reps])
            entry["seconds"] = {v: summary([g[v] for g in reps]) for v in variants}
            if reps:
                entry["all_gb_s"] = nbytes / entry["seconds"]["all"]["median"] / 1e9
                entry["pass_capture"] = entry["all_over_hookless"]["median"] <= 1.10
        finally:
            shutil.rmtree(work, ignore_errors=True)
            sec.save()


# -- steering sweep ---------------------------------------------------------------------------
def bench_steering(model: nn.Module, plan: Any, clock: Clock, sec: Section) -> None:
    from bench_steer import STRENGTHS, IdTokenizer, ab_rows, sequential_sweep

    cfg = plan.steer
    L, d = num_layers(model), model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector(torch.randn(d, generator=g) * 4 / d**0.5, site=f"layers.{L // 2}",
                         method="tensor")
    tok = IdTokenizer()
    sec.entry.update(strengths=list(STRENGTHS), site=vec.site, rows=[])
    with torch.no_grad():
        for positions in cfg["positions"]:
            for n in cfg["prompts"]:
                rows = ab_rows(n)

                def batched(rows=rows, n=n, positions=positions):
                    return steerability(model, tok, rows, vec, STRENGTHS, baseline=False,
                                        batch_size=8 * n, positions=positions)

                def sequential(rows=rows, positions=positions):
                    sequential_sweep(model, rows, vec, positions)

                unit = f"positions={positions} prompts={n}"
                if not sec.fits(unit, cfg["prior_s"]):
                    continue
                t0 = time.perf_counter()
                forwards = batched().n_forwards  # warm-up
                sequential()
                est = time.perf_counter() - t0
                times = {"batched": [], "sequential": []}
                for r in range(cfg["repeats"]):
                    if r and not sec.fits(f"{unit} repeat {r}", est):
                        break
                    for which in rotate(["batched", "sequential"], r):
                        fn = batched if which == "batched" else sequential
                        times[which].append(clock.time(fn)[0])
                speedup = summary([s / b for s, b in zip(times["sequential"], times["batched"],
                                                          strict=False)])
                sec.entry["rows"].append({
                    "positions": positions, "prompts": n, "rows": 8 * n, "forwards": forwards,
                    "batched_s": summary(times["batched"]),
                    "sequential_s": summary(times["sequential"]), "speedup": speedup})
                sec.done(unit)
