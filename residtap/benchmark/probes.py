"""The runtime-probe benchmark: what reading probes during generate costs, side by side.

    result = bench_probes(BenchConfig())       # the reference configuration (10-20 min, 2 cores)
    result = bench_probes(BenchConfig.quick()) # a tiny model, seconds

In one process, interleaved, greedy `generate` of `new_tokens` tokens is timed for the variants
below; each repeat runs every variant as an ABBA block (baseline, variant, variant, baseline),
the variants taking turns to go first:
    baseline   no probes
    naive      one Python forward hook per probe: dot product on the last token, `.tolist()`
               (bench/naive.py, outside the package: it registers its own hooks)
    packed     a residtap ProbeBank: one fused matmul per site into a preallocated buffer,
               per-token scores kept for every row (positions="generated")
    deferred   the same bank with defer=16: each decode step keeps its hidden rows; one matmul
               per site reads 16 steps at a time (scores identical)
Overhead is the median over repeats of (the block's mean variant time / its mean baseline
time) - 1, with the 25th-75th percentile as spread. The arithmetic floor is probe FLOPs /
forward FLOPs per token (2 x d x probes vs 2 x matmul parameters; attention scores ignored).
`handler` is the wall time inside residtap's hooks per generate (`residtap.engine.timing`: the
engine's per-forward pre-hook with the bank's slot planning, and every site handler with its
taps), plus the final flush of a deferred readout (timed inside the variant's wall clock too);
`tap body` is the bank's own code only (`timed=True`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from residtap.benchmark.reference import forward_flops_per_token, random_bank, reference_model
from residtap.engine import timing
from residtap.inputs import device_of
from residtap.probes.bank import ProbeBank

log = logging.getLogger(__name__)

VARIANTS = ("naive", "packed", "deferred")
NAIVE_FILE = Path(__file__).resolve().parents[2] / "bench" / "naive.py"


@dataclass
class BenchConfig:
    layers: int = 8
    d_model: int = 512
    intermediate: int = 1376
    vocab: int = 32000
    heads: int = 8
    new_tokens: int = 64
    prompt_len: int = 16
    batches: tuple[int, ...] = (1, 8)
    probe_counts: tuple[int, ...] = (1, 100, 1000)
    scopes: tuple[str, ...] = ("one", "all")  # probes at one middle site / at every layer
    repeats: int = 5
    threads: int = 1
    seed: int = 0
    compile: bool = False
    compile_backend: str = "inductor"
    defer: int = 16  # decode steps per readout in the "deferred" variant
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(layers=2, d_model=64, intermediate=128, vocab=256, heads=4, new_tokens=4,
                   prompt_len=6, batches=(1, 2), probe_counts=(1, 10), repeats=2)

    def model(self) -> nn.Module:
        """The reference model (residtap.benchmark.reference) of this configuration's shape."""
        return reference_model(layers=self.layers, d_model=self.d_model,
                               intermediate=self.intermediate, heads=self.heads,
                               vocab=self.vocab,
                               max_positions=self.prompt_len + self.new_tokens + 8, seed=self.seed)


def naive_baseline() -> ModuleType:
    """bench/naive.py of the source checkout: the naive readout, whose hooks are its own."""
    if not NAIVE_FILE.is_file():
        raise FileNotFoundError(
            f"the naive baseline {NAIVE_FILE} is not here (residtap installed without its source "
            "tree?); run `residtap bench probes` from a clone of the repository"
        )
    spec = importlib.util.spec_from_file_location("residtap_bench_naive", NAIVE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generate(model: nn.Module, ids: Tensor, n: int) -> Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)


def time_variant(model: nn.Module, variant: str, bank: ProbeBank | None, ids: Tensor,
                 n: int, defer: int = 16, naive: ModuleType | None = None) -> dict[str, float]:
    """One greedy generate of `n` tokens with `variant`: its seconds, and for the bank variants
    the seconds inside residtap's hooks (plus the final flush) and inside the bank's own code."""
    t0 = time.perf_counter()
    if variant == "baseline":
        _generate(model, ids, n)
        return {"seconds": time.perf_counter() - t0}
    if variant == "naive":
        with (naive or naive_baseline()).naive_hooks(model, bank):
            _generate(model, ids, n)
        return {"seconds": time.perf_counter() - t0}
    with bank.attach(model, batch_size=ids.shape[0], max_tokens=n, timed=True,
                     defer=defer if variant == "deferred" else 0) as run:
        with timing(model) as clock:
            _generate(model, ids, n)
        t1 = time.perf_counter()
        run.flush()  # the deferred readout's last steps (a no-op for "packed")
        flush_s = time.perf_counter() - t1
        scores = run.scores  # kept for every row and token: (B, n, P)
    assert scores.shape[:2] == (ids.shape[0], n) and run.filled == n
    return {"seconds": time.perf_counter() - t0, "handler_seconds": clock.seconds + flush_s,
            "tap_seconds": run.tap_seconds}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to `n` inside the block, restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bench_probes(cfg: BenchConfig, progress: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-ready dict (rows, config, environment)."""
    with torch_threads(cfg.threads):
        return _bench(cfg, progress)


def _bench(cfg: BenchConfig, progress: bool) -> dict[str, Any]:
    naive = naive_baseline()
    model = cfg.model()
    fwd_flops = forward_flops_per_token(model)
    scopes = [(n, s) for s in cfg.scopes for n in cfg.probe_counts]
    banks = {(n, s): random_bank(model, n, s, cfg.seed) for n, s in scopes}
    for bank in banks.values():
        bank.layout(model)  # pack once, outside the timings (attach reuses it)
    g = torch.Generator().manual_seed(cfg.seed)
    times: dict[tuple, list[dict[str, float]]] = {}
    bar = progress_bar(len(cfg.batches) * cfg.repeats, progress)
    with torch.no_grad():
        for B in cfg.batches:
            ids = torch.randint(3, cfg.vocab, (B, cfg.prompt_len), generator=g)
            _generate(model, ids, 2)  # warm-up
            for r in range(cfg.repeats):
                order = scopes if r % 2 == 0 else scopes[::-1]
                for key in order:
                    k = r % len(VARIANTS)
                    for v in VARIANTS[k:] + VARIANTS[:k]:  # each variant leads in turn
                        # ABBA: baseline, variant, variant, baseline; a linear drift of the
                        # machine's speed cancels out of the pair's ratio
                        b0 = time_variant(model, "baseline", None, ids, cfg.new_tokens)
                        t0, t1 = (time_variant(model, v, banks[key], ids, cfg.new_tokens,
                                               cfg.defer, naive) for _ in range(2))
                        b1 = time_variant(model, "baseline", None, ids, cfg.new_tokens)
                        base = (b0["seconds"] + b1["seconds"]) / 2
                        times.setdefault((B, *key, "baseline"), []).append({"seconds": base})
                        got = {key_: (t0[key_] + t1[key_]) / 2 for key_ in t0}
                        times.setdefault((B, *key, v), []).append({**got, "base": base})
                bar.update(1)
            log.info("batch %d done", B)
    bar.close()
    rows = _summarise(cfg, times, banks, fwd_flops, model.config.hidden_size)
    result: dict[str, Any] = {
        "config": asdict(cfg), "forward_flops_per_token": fwd_flops, "rows": rows,
        "environment": {"torch": torch.__version__, "threads": cfg.threads,
                        "device": "cpu"},
    }
    if cfg.compile:
        result["compiled"] = bench_compiled(model, cfg, banks[scopes[-1]])
    return result


def _summarise(cfg, times, banks, fwd_flops, d) -> list[dict[str, Any]]:
    rows = []
    for B in cfg.batches:
        for n, scope in [(n, s) for s in cfg.scopes for n in cfg.probe_counts]:
            bank = banks[(n, scope)]
            floor = 2 * d * bank.n_columns / fwd_flops
            base = [t["seconds"] for t in times[(B, n, scope, "baseline")]]
            row: dict[str, Any] = {"batch": B, "probes": bank.n_columns, "scope": scope,
                                   "floor_pct": 100 * floor,
                                   "baseline_tok_s": B * cfg.new_tokens / statistics.median(base)}
            for v in VARIANTS:
                ts = times[(B, n, scope, v)]
                over = [100 * (t["seconds"] / t["base"] - 1) for t in ts]
                lo, med, hi = quartiles(over)
                row[f"{v}_tok_s"] = B * cfg.new_tokens / statistics.median(
                    [t["seconds"] for t in ts])
                row[f"{v}_overhead_pct"], row[f"{v}_spread_pct"] = med, [lo, hi]
            row["forward_ms_per_token"] = 1000 * statistics.median(base) / cfg.new_tokens
            target = max(2 * row["floor_pct"], 3.0)
            row["target_pct"] = target
            for v in ("packed", "deferred"):
                ts = times[(B, n, scope, v)]
                pre = "" if v == "packed" else "deferred_"
                row[f"{pre}handler_pct"] = 100 * statistics.median(
                    t["handler_seconds"] / t["seconds"] for t in ts)
                row[f"{pre}tap_body_pct"] = 100 * statistics.median(
                    t["tap_seconds"] / t["seconds"] for t in ts)
                row[f"{pre}pass_floor"] = row[f"{v}_overhead_pct"] <= target
                row[f"{pre}pass_vs_naive"] = (row[f"{v}_overhead_pct"] * 10
                                              <= row["naive_overhead_pct"])
                row[f"{pre}pass_handlers"] = row[f"{pre}handler_pct"] <= 2.0
            rows.append(row)
    return rows


def bench_compiled(model: nn.Module, cfg: BenchConfig, bank: ProbeBank) -> list[dict]:
    """Compiled plain forwards (positions='last'), with and without the bank.

    `model.forward` is compiled (fullgraph), not `model.__call__`: the engine's root pre-hook,
    which does the per-forward Python bookkeeping, runs outside the graph, as the README says."""
    import torch._dynamo as dynamo

    out = []
    for B in cfg.batches:
        ids = torch.randint(3, cfg.vocab, (B, cfg.prompt_len))
        times: dict[str, list[float]] = {"baseline": [], "packed": []}
        for variant in ("baseline", "packed"):
            dynamo.reset()
            model.forward = torch.compile(model.forward, fullgraph=True,
                                          backend=cfg.compile_backend)
            with contextlib.ExitStack() as stack:
                # graphs must follow the taps (residtap refuses a compiled forward otherwise)
                stack.enter_context(dynamo.config.patch(skip_nnmodule_hook_guards=False))
                stack.callback(delattr, model, "forward")  # back to the class's forward
                if variant == "packed":
                    stack.enter_context(bank.attach(model, batch_size=B, max_tokens=1,
                                                    positions="last"))
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
                    compile_s = time.perf_counter() - t0
                    for _ in range(cfg.repeats * 4):
                        t0 = time.perf_counter()
                        model(input_ids=ids, use_cache=False)
                        times[variant].append(time.perf_counter() - t0)
            out.append({"batch": B, "variant": variant, "compile_s": compile_s,
                        "forward_ms": 1000 * statistics.median(times[variant])})
        dynamo.reset()
        base, packed = out[-2]["forward_ms"], out[-1]["forward_ms"]
        out[-1]["overhead_pct"] = 100 * (packed / base - 1)
    return out


def measure_overhead(model: nn.Module, bank: ProbeBank, *, batch_size: int = 1,
                     new_tokens: int = 32, prompt_len: int = 16,
                     repeats: int = 3, defer: int = 16) -> dict[str, float]:
    """Measured overhead of `bank` on `model`'s greedy generate (for `residtap cost --measure`),
    read every step ("packed") and with `defer` ("deferred"), as paired medians:
    {"baseline_s", "<v>_s", "<v>_overhead_pct", "<v>_handler_pct"} for v in packed, deferred."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = device_of(model)
    ids = torch.randint(3, vocab, (batch_size, prompt_len), device=device)
    runs: dict[str, list[dict[str, float]]] = {"packed": [], "deferred": []}
    base_s = []
    with torch.no_grad():
        _generate(model, ids, 2)
        for r in range(repeats):
            order = ("packed", "deferred") if r % 2 == 0 else ("deferred", "packed")
            b0 = time_variant(model, "baseline", None, ids, new_tokens)["seconds"]
            got = {v: time_variant(model, v, bank, ids, new_tokens, defer) for v in order}
            b1 = time_variant(model, "baseline", None, ids, new_tokens)["seconds"]
            base = (b0 + b1) / 2
            base_s.append(base)
            for v, t in got.items():
                runs[v].append({"s": t["seconds"], "over": 100 * (t["seconds"] / base - 1),
                                "handler": 100 * t["handler_seconds"] / t["seconds"]})
    out = {"baseline_s": statistics.median(base_s)}
    for v, ts in runs.items():
        out[f"{v}_s"] = statistics.median(t["s"] for t in ts)
        out[f"{v}_overhead_pct"] = statistics.median(t["over"] for t in ts)
        out[f"{v}_handler_pct"] = statistics.median(t["handler"] for t in ts)
    return out


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="bench probes (repeats x batches)")
