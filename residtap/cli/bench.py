"""`residtap bench probes`: what reading probes during generate costs, measured side by side.

Without options it runs the reference configuration (a random 8-layer Llama, d_model 512;
about 10-20 min on 2 CPU cores); `--quick` runs a tiny one in seconds.

In one process, interleaved, greedy `generate` of `--new-tokens` tokens is timed for the
variants below; each repeat runs every variant as an ABBA block (baseline, variant, variant,
baseline), the variants taking turns to go first:
    baseline   no probes
    naive      one Python forward hook per probe: dot product on the last token, `.tolist()`
    packed     a residtap ProbeBank: one fused matmul per site into a preallocated buffer,
               per-token scores kept for every row (positions="generated")
    deferred   the same bank with defer=16: each decode step copies its hidden rows into a
               staging ring; one matmul per site reads 16 steps at a time (scores identical)
Overhead is the median over repeats of (the block's mean variant time / its mean baseline
time) - 1, with the 25th-75th percentile as spread. The arithmetic floor is probe FLOPs /
forward FLOPs per token (2 x d x probes vs 2 x matmul parameters; attention scores ignored).
`handlers` is the wall time inside residtap's hooks (engine dispatch, the bank's per-forward
pre-hook and tap bodies, measured with perf_counter around each hook) per generate, plus the
final flush of a deferred readout (timed inside the variant's wall clock too); `tap body` is the
bank's own code only.
`--compile` adds compiled plain forwards (torch.compile, fullgraph) with and without the bank.

examples:
  residtap bench probes --quick
  residtap bench probes --quick --batch 1,4 --probes 1 --probes 50 --out bench/ --json
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from residtap.cli.common import (
    add_json_flag,
    add_list,
    add_out,
    add_progress_flag,
    check_out,
    command_help,
    emit_json,
    format_table,
    progress,
)
from residtap.engine import Engine, _SiteHandler, hidden_of
from residtap.probes.bank import ProbeBank
from residtap.probes.bank_run import BankRun
from residtap.sites import blocks, layer_sites

log = logging.getLogger(__name__)


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


def reference_model(cfg: BenchConfig) -> nn.Module:
    """A random Llama of the configured size (LlamaConfig, MHA, untied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.d_model,
                         intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=cfg.prompt_len + cfg.new_tokens + 8,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def forward_flops_per_token(model: nn.Module) -> int:
    """2 x the parameters used in matmuls (input embedding lookup excluded)."""
    embed = model.get_input_embeddings().weight.numel()
    return 2 * (sum(p.numel() for p in model.parameters()) - embed)


def random_bank(model: nn.Module, n_probes: int, scope: str, seed: int = 0) -> ProbeBank:
    """n_probes binary probes at one middle layer ('one') or at every layer ('all')."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    sites = layer_sites(model)
    sites = [sites[len(sites) // 2]] if scope == "one" else sites
    bank = ProbeBank()
    for site in sites:
        weight = torch.randn(n_probes, d, generator=g) / d**0.5
        for i in range(n_probes):
            bank.add(f"{site}/p{i}", weight[i], 0.0, site=site)
    return bank


class _NaiveProbe:
    """The usual way: a forward hook per probe reading its score back to Python."""

    def __init__(self, weight: Tensor, bias: float, sink: list) -> None:
        self.weight, self.bias, self.sink = weight, bias, sink

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        h = hidden_of(output)[:, -1]  # (B, d) last position
        self.sink.append((h @ self.weight + self.bias).tolist())  # host sync per probe


@contextlib.contextmanager
def naive_hooks(model: nn.Module, bank: ProbeBank) -> Iterator[list]:
    sink: list = []
    handles = []
    try:
        for p in bank.probes:
            module = blocks(model)[int(p.site.split(".")[1])]
            handles.append(module.register_forward_hook(
                _NaiveProbe(p.weight[0].to(model.dtype), float(p.bias[0]), sink)))
        yield sink
    finally:
        for h in handles:
            h.remove()


class _HookClock:
    """Wraps residtap's installed hooks with perf_counter for one generate (bench only)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


@contextlib.contextmanager
def residtap_hook_clock(model: nn.Module) -> Iterator[_HookClock]:
    """Time every hook residtap installed (engine root pre-hook, site handlers, bank pre-hook)."""
    clock = _HookClock()
    swapped = []
    for module in model.modules():
        for table in (module._forward_hooks, module._forward_pre_hooks):
            for key, fn in list(table.items()):
                if isinstance(getattr(fn, "__self__", None), (Engine, _SiteHandler, BankRun)):
                    table[key] = clock.wrap(fn)
                    swapped.append((table, key, fn))
    try:
        yield clock
    finally:
        for table, key, fn in swapped:
            if key in table:
                table[key] = fn


def _generate(model: nn.Module, ids: Tensor, n: int) -> Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)


def _time_variant(model: nn.Module, variant: str, bank: ProbeBank | None, ids: Tensor,
                  n: int, defer: int = 16) -> dict[str, float]:
    t0 = time.perf_counter()
    if variant == "baseline":
        _generate(model, ids, n)
        return {"seconds": time.perf_counter() - t0}
    if variant == "naive":
        with naive_hooks(model, bank):
            _generate(model, ids, n)
        return {"seconds": time.perf_counter() - t0}
    with bank.attach(model, batch_size=ids.shape[0], max_tokens=n, timed=True,
                     defer=defer if variant == "deferred" else 0) as run:
        with residtap_hook_clock(model) as clock:
            _generate(model, ids, n)
        t1 = time.perf_counter()
        run.flush()  # the deferred readout's last steps (a no-op for "packed")
        flush_s = time.perf_counter() - t1
        scores = run.scores  # kept for every row and token: (B, n, P)
    assert scores.shape[:2] == (ids.shape[0], n) and run.filled == n
    return {"seconds": time.perf_counter() - t0, "handler_seconds": clock.seconds + flush_s,
            "tap_seconds": run.tap_seconds}


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def bench_probes(cfg: BenchConfig, progress: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-ready dict (rows, config, environment)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _bench(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _bench(cfg: BenchConfig, progress: bool) -> dict[str, Any]:
    model = reference_model(cfg)
    fwd_flops = forward_flops_per_token(model)
    scopes = [(n, s) for s in cfg.scopes for n in cfg.probe_counts]
    banks = {(n, s): random_bank(model, n, s, cfg.seed) for n, s in scopes}
    for bank in banks.values():
        bank.layout(model)  # pack once, outside the timings (attach reuses it)
    g = torch.Generator().manual_seed(cfg.seed)
    times: dict[tuple, list[dict[str, float]]] = {}
    total = len(cfg.batches) * cfg.repeats
    bar = _progress(total, progress)
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
                        b0 = _time_variant(model, "baseline", None, ids, cfg.new_tokens)
                        t0, t1 = (_time_variant(model, v, banks[key], ids, cfg.new_tokens,
                                                cfg.defer) for _ in range(2))
                        b1 = _time_variant(model, "baseline", None, ids, cfg.new_tokens)
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


VARIANTS = ("naive", "packed", "deferred")


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
                lo, med, hi = _quantiles(over)
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
    """Compiled plain forwards (positions='prompt_last'), with and without the bank.

    `model.forward` is compiled (fullgraph), not `model.__call__`: the root pre-hooks that do
    the per-forward Python bookkeeping run outside the graph, as the README says to do."""
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
                                                    positions="prompt_last"))
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
    device = next(model.parameters()).device
    ids = torch.randint(3, vocab, (batch_size, prompt_len), device=device)
    runs: dict[str, list[dict[str, float]]] = {"packed": [], "deferred": []}
    base_s = []
    with torch.no_grad():
        _generate(model, ids, 2)
        for r in range(repeats):
            order = ("packed", "deferred") if r % 2 == 0 else ("deferred", "packed")
            b0 = _time_variant(model, "baseline", None, ids, new_tokens)["seconds"]
            got = {v: _time_variant(model, v, bank, ids, new_tokens, defer) for v in order}
            b1 = _time_variant(model, "baseline", None, ids, new_tokens)["seconds"]
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


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="bench probes (repeats x batches)")


COLUMNS = ["batch", "scope", "probes", "baseline_tok_s", "naive_tok_s", "packed_tok_s",
           "deferred_tok_s", "floor_pct", "naive_overhead_pct", "packed_overhead_pct",
           "packed_spread_pct", "deferred_overhead_pct", "deferred_spread_pct", "handler_pct",
           "deferred_handler_pct", "pass_floor", "deferred_pass_floor", "pass_vs_naive",
           "deferred_pass_vs_naive", "pass_handlers", "deferred_pass_handlers"]


def format_report(result: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    rows = [{k: fmt(r[k]) for k in COLUMNS} for r in result["rows"]]
    text = format_table(rows, COLUMNS)
    for c in result.get("compiled", []):
        extra = f", overhead {c['overhead_pct']:.2f}%" if "overhead_pct" in c else ""
        text += (f"\ncompiled ({result['config']['compile_backend']}) batch {c['batch']} "
                 f"{c['variant']}: {c['forward_ms']:.2f} ms/forward (compile {c['compile_s']:.0f}"
                 f" s){extra}")
    return text


def plot_latency(result: dict[str, Any], path: Path) -> Path:
    """Log-scale bars per configuration: where the time per generated token goes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    n_tok = result["config"]["new_tokens"]
    def share(key: str):
        return lambda r: r["forward_ms_per_token"] * r[key] / 100

    parts = [("forward (baseline)", lambda r: r["forward_ms_per_token"]),
             ("naive overhead", share("naive_overhead_pct")),
             ("packed overhead", share("packed_overhead_pct")),
             ("residtap handlers", lambda r: share("handler_pct")(r)
              * (1 + r["packed_overhead_pct"] / 100)),
             ("deferred overhead", share("deferred_overhead_pct")),
             ("deferred handlers", lambda r: share("deferred_handler_pct")(r)
              * (1 + r["deferred_overhead_pct"] / 100)),
             ("arithmetic floor", share("floor_pct"))]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(rows)), 5))
    width = 0.8 / len(parts)
    for i, (label, get) in enumerate(parts):
        values = [max(get(r), 1e-5) for r in rows]  # <= 0 (within noise) drawn at the bottom
        ax.bar([j + i * width for j in range(len(rows))], values, width, label=label)
    ax.set_yscale("log")
    ax.set_ylabel(f"ms per generated token (greedy, {n_tok} tokens)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"B={r['batch']}\n{r['probes']} @ {r['scope']}" for r in rows],
                       fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("Where the latency goes: probes during generate (values <= 0 clipped)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure what residtap costs",
                                   **command_help(__doc__))
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    sub.required = True
    p = sub.add_parser("probes", help="probe bank vs naive hooks vs baseline during generate",
                       **command_help(__doc__))
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats (for tests)")
    add_list(p, "--batch", item_type=int, nargs="+",
             help="batch sizes, space- or comma-separated or repeated (default 1 8)")
    add_list(p, "--probes", item_type=int, nargs="+",
             help="probe counts, space- or comma-separated or repeated (default 1 100 1000)")
    add_list(p, "--scopes", item_type=_scope, nargs="+",
             help="'one' (a middle layer) and/or 'all' (every layer), space- or "
                  "comma-separated or repeated (default one all)")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 5)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per call (default 64)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    p.add_argument("--compile", action="store_true", help="also time compiled plain forwards")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    add_out(p, "folder", "bench_probes.json, .txt and .png", required=False)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add_progress_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def _scope(text: str) -> str:
    if text not in ("one", "all", "all-layers"):
        raise ValueError(text)
    return "all" if text == "all-layers" else text


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    overrides = {"batches": args.batch, "probe_counts": args.probes, "scopes": args.scopes,
                 "repeats": args.repeats, "new_tokens": args.new_tokens, "threads": args.threads}
    for name, value in overrides.items():
        if value is not None:
            setattr(cfg, name, tuple(value) if isinstance(value, list) else value)
    cfg.compile, cfg.compile_backend = args.compile, args.compile_backend
    if cfg.repeats < 1 or cfg.new_tokens < 1:
        raise ValueError(f"--repeats and --new-tokens must be >= 1, got {cfg.repeats} and "
                         f"{cfg.new_tokens}")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_out(args.out, "folder")
    result = bench_probes(cfg, progress=progress(args))
    text = format_report(result)
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        import json

        (out / "bench_probes.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "bench_probes.txt").write_text(text + "\n")
        if not args.no_plot:
            result["plot"] = str(plot_latency(result, out / "bench_probes.png"))
    if args.json:
        emit_json(result)
    else:
        print(text)
        if "plot" in result:
            print(f"plot: {result['plot']}")
    return 0
