"""Benchmark: residtap's logit lens vs a naive lens vs the pure matmul floor.

    python bench/bench_lens.py                      # random 8-layer Llama, d=512, V=32000
    python bench/bench_lens.py --repeats 5 --batch 8 --prompt 128 --new 64

Model: the bundled organism when residtap/organism/model/ exists (--model organism), else (and by
default) a random LlamaConfig model: 8 layers, d_model 512, 8 heads, MLP 1376, vocab 32000.
Workload: batch 8, 128-token random prompts (no padding), 64 new tokens, greedy
(min_new_tokens forces all 64), top-5, every block output lensed (L = 8 sites).

Variants, interleaved in rotating order each round, all under torch.no_grad on CPU:
  generate   plain model.generate, no lens (reference: what generation alone costs)
  ours       LogitLens(model).run(...): capture inside that generate into a preallocated
             buffer, then the chunked deferred decode (timed separately: capture / decode)
  naive      generate(output_hidden_states=True, return_dict_in_generate=True), then per
             step and per layer: final norm, lm_head, full-vocabulary softmax, kept in a
             list; then top-k, entropy, KL to the final layer and rank from the kept
             probabilities
  floor      one matmul (rows x d) @ (d x V) with rows = L * B * T: the decode's FLOPs
Ratios are paired: computed within each round, then the median (min-max) over rounds.

Memory: torch's CPU allocations are invisible to tracemalloc, so each variant runs once more in
a fresh subprocess: build the model and inputs, run one small warm-up, reset the kernel's
peak-RSS counter (write 5 to /proc/self/clear_refs), run the variant, and report
VmHWM (peak RSS) minus VmRSS just before it: the peak extra memory the variant needed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from residtap.lens import DEFAULT_MEMORY_BUDGET, LogitLens  # noqa: E402
from residtap.sites import final_norm, num_layers  # noqa: E402

VARIANTS = ("generate", "ours", "naive", "floor")


def build(args):
    if args.model == "organism":
        from residtap import organism

        model, _ = organism.load()
    else:
        from residtap.benchmark import reference_model

        model = reference_model()
    model.eval()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (args.batch, args.prompt), generator=g)
    return model, ids, torch.ones_like(ids)


def gen_kwargs(args) -> dict:
    return dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                pad_token_id=0)


def run_generate(model, ids, mask, args) -> dict:
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs(args))
    return {"total": time.perf_counter() - t0}


def run_ours(model, ids, mask, args) -> dict:
    lens = LogitLens(model)
    t0 = time.perf_counter()
    kw = gen_kwargs(args)
    captured = lens.capture(ids, mask, max_new_tokens=kw.pop("max_new_tokens"), **kw)
    t1 = time.perf_counter()
    result = lens.decode(captured, top_k=args.top_k, memory_budget=args.budget_mb * 2**20)
    t2 = time.perf_counter()
    return {"total": t2 - t0, "capture": t1 - t0, "decode": t2 - t1, "result": result}


def run_naive(model, ids, mask, args) -> dict:
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                         return_dict_in_generate=True, **gen_kwargs(args))
    t1 = time.perf_counter()
    norm, head = final_norm(model), model.get_output_embeddings()
    L = num_layers(model)
    kept = []  # per step: list over layers of (B, t, V) full-vocabulary probabilities
    for step in out.hidden_states:
        layers = []
        for i in range(L):
            h = step[i + 1]
            if i < L - 1:  # HF's last entry is already after the final norm
                h = norm(h)
            layers.append(torch.softmax(head(h).float(), dim=-1))
        kept.append(layers)
    seq = out.sequences
    stats = {"topk_ids": [], "topk_probs": [], "entropy": [], "kl": [], "rank": []}
    pos = 0
    for layers in kept:
        t = layers[0].shape[1]
        nxt = seq[:, pos + 1 : pos + 1 + t]  # (B, t)
        pf = layers[-1]
        for p in layers:
            vals, idx = p.topk(args.top_k, dim=-1)
            logp = p.clamp_min(1e-30).log()
            stats["topk_ids"].append(idx)
            stats["topk_probs"].append(vals)
            stats["entropy"].append(-(p * logp).sum(-1))
            stats["kl"].append((pf * (pf.clamp_min(1e-30).log() - logp)).sum(-1))
            stats["rank"].append((p > p.gather(-1, nxt[..., None])).sum(-1))
        pos += t
    t2 = time.perf_counter()
    final_ids = torch.cat(stats["topk_ids"][L - 1 :: L], dim=1)  # (B, T, k) final layer
    return {"total": t2 - t0, "capture": t1 - t0, "decode": t2 - t1, "final_ids": final_ids,
            "final_probs": torch.cat(stats["topk_probs"][L - 1 :: L], dim=1)}


def run_floor(model, ids, mask, args) -> dict:
    L, d = num_layers(model), model.config.hidden_size
    rows = L * args.batch * (args.prompt + args.new - 1)
    x = torch.randn(rows, d)
    w = model.get_output_embeddings().weight
    t0 = time.perf_counter()
    torch.matmul(x, w.t())
    return {"total": time.perf_counter() - t0, "rows": rows}


RUNNERS = {"generate": run_generate, "ours": run_ours, "naive": run_naive, "floor": run_floor}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant: str, args) -> None:
    model, ids, mask = build(args)
    with torch.no_grad():
        model.generate(input_ids=ids[:1, :8], attention_mask=mask[:1, :8], max_new_tokens=2,
                       do_sample=False, pad_token_id=0)  # warm-up: load kernels, allocator
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset peak RSS (VmHWM) to now
        RUNNERS[variant](model, ids, mask, args)
        peak = _status("VmHWM")
    print(json.dumps({"variant": variant, "extra_bytes": peak - before}))


def measure_memory(args) -> dict[str, int]:
    out = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--memory-child", variant, "--model", args.model,
               "--batch", str(args.batch), "--prompt", str(args.prompt), "--new", str(args.new),
               "--top-k", str(args.top_k), "--budget-mb", str(args.budget_mb)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(done.stdout.strip().splitlines()[-1])["extra_bytes"]
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_model = "organism" if Path("residtap/organism/model/config.json").is_file() else "llama"
    parser.add_argument("--model", choices=("llama", "organism"), default=default_model)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-mb", type=int, default=DEFAULT_MEMORY_BUDGET // 2**20)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    model, ids, mask = build(args)
    print(f"model {args.model}: {type(model).__name__}, L={num_layers(model)}, "
          f"d={model.config.hidden_size}, V={model.config.vocab_size}; batch {args.batch}, "
          f"prompt {args.prompt}, new {args.new}, top-{args.top_k}, decode budget "
          f"{args.budget_mb} MiB; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load avg {os.getloadavg()[0]:.2f}")
    times: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with torch.no_grad():
        run_generate(model, ids[:2, :16], mask[:2, :16], argparse.Namespace(new=2))  # warm-up
        check_ours = check_naive = None
        for r in range(args.repeats):
            order = VARIANTS[r % 4:] + VARIANTS[: r % 4]
            for v in order:
                res = RUNNERS[v](model, ids, mask, args)
                if v == "ours" and check_ours is None:
                    check_ours = res["result"]
                if v == "naive" and check_naive is None:
                    check_naive = res
                times[v].append({k: x for k, x in res.items() if isinstance(x, float)})
            print(f"round {r + 1}/{args.repeats}: " + ", ".join(
                f"{v} {times[v][-1]['total']:.2f}s" for v in VARIANTS), flush=True)
    same = torch.equal(check_ours.topk_ids[-1], check_naive["final_ids"])
    diff = (check_ours.topk_probs[-1] - check_naive["final_probs"]).abs().max().item()
    print(f"\nagreement, final layer: top-{args.top_k} ids identical={same}, "
          f"max |prob diff|={diff:.2e}")

    def col(v: str, key: str = "total") -> list[float]:
        return [t[key] for t in times[v]]

    print(f"\nseconds, median (min-max) over {args.repeats} rounds")
    print(f"  plain generate          {spread(col('generate'))}")
    print(f"  ours total              {spread(col('ours'))}")
    print(f"    capture (generate)    {spread(col('ours', 'capture'))}")
    print(f"    deferred decode       {spread(col('ours', 'decode'))}")
    print(f"  naive total             {spread(col('naive'))}")
    print(f"    generate+hidden       {spread(col('naive', 'capture'))}")
    print(f"    per-step projection   {spread(col('naive', 'decode'))}")
    print(f"  matmul floor            {spread(col('floor'))}")

    def paired(a: list[float], b: list[float]) -> str:
        return spread([x / y for x, y in zip(a, b, strict=True)])

    print("\npaired ratios, median (min-max)")
    print(f"  our decode / matmul floor       {paired(col('ours', 'decode'), col('floor'))}"
          "   target <= 1.25")
    print(f"  naive total / our total         {paired(col('naive'), col('ours'))}"
          "   target >= 5")
    print("  naive decode / our decode       "
          f"{paired(col('naive', 'decode'), col('ours', 'decode'))}")
    print(f"  our capture / plain generate    {paired(col('ours', 'capture'), col('generate'))}")
    if args.skip_memory:
        return
    mem = measure_memory(args)
    print("\npeak extra memory (RSS high-water mark minus RSS before; fresh subprocess each)")
    for v in VARIANTS:
        print(f"  {v:10s} {mem[v] / 2**20:9.1f} MiB")
    print(f"  naive / ours = {mem['naive'] / max(mem['ours'], 1):.1f}x   target >= 10")


if __name__ == "__main__":
    main()
