"""Device bench, probes: greedy decode with no probes, a packed ProbeBank (read every step and
deferred), and naive hooks, eager and with CUDA graphs.

Variants (one greedy `generate` of `new_tokens` tokens each, batch B, random prompts):
    baseline  no probes
    packed    residtap ProbeBank, `probes` probes spread over every layer, read every step
    deferred  the same bank with defer=K (one matmul per site per K decode steps)
    naive     one forward hook per probe reading its score back with `.tolist()`
              (bench/naive.py): one host sync per probe per forward
Eager: transformers' default (dynamic) cache, no compile. Graphs: a static cache per batch size
(reused, so its tensors keep their addresses) and `model.forward` compiled for decode steps
(mode="reduce-overhead": CUDA graph replay). Naive hooks read values on the host inside the
forward, which a CUDA graph cannot hold: a serving engine runs them eagerly, so the graph
rows compare against the eager naive time (unpaired, `naive_vs_graph_baseline_pct`).

Timing: each block runs baseline, the variants in a rotating order, baseline again; a
variant's overhead is its time over the mean of the block's two baselines, minus 1 (a linear
drift of the machine cancels). With graphs, each bank variant is attached, run once untimed
(new score buffers are new static inputs: their graphs are recorded then), then timed. The
arithmetic floor is probe FLOPs over forward FLOPs per token (residtap.benchmark), with
residtap.cost's prediction for 1000 dot products per token beside it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from gpu_common import (
    Clock,
    Section,
    compiled_decode,
    count_cuda_graph_recordings,
    dynamo_counts,
    generate,
    rotate,
    set_recompile_limit,
    static_cache,
    summary,
)
from naive import naive_hooks
from torch import Tensor, nn

from residtap.benchmark import forward_flops_per_token
from residtap.cost import estimate_cost
from residtap.probes.bank import ProbeBank
from residtap.sites import layer_sites

log = logging.getLogger("bench_gpu")


def spread_bank(model: nn.Module, total: int, seed: int = 0) -> ProbeBank:
    """`total` binary probes, round-robin over every layer, weights on the model's device (so
    the naive hooks, which take them from the bank, multiply on the device too)."""
    param = next(model.parameters())
    d = model.config.hidden_size
    g = torch.Generator(device=param.device).manual_seed(seed)
    weight = torch.randn(total, d, generator=g, device=param.device) / d**0.5  # (P, d)
    sites = layer_sites(model)
    bank = ProbeBank()
    for i in range(total):
        bank.add(f"p{i}", weight[i], 0.0, site=sites[i % len(sites)])
    return bank


def floors(model: nn.Module, plan: Any, batch: int) -> dict[str, float]:
    d = model.config.hidden_size
    fwd = forward_flops_per_token(model)
    cost = estimate_cost(model.config, n_probes=plan.probes, sites=1, positions="generated",
                         batch_size=batch, prompt_len=plan.prompt_len,
                         new_tokens=plan.new_tokens, hardware="h200")
    return {"floor_pct": 100 * 2 * d * plan.probes / fwd,
            "cost_arithmetic_pct": 100 * cost.arithmetic_overhead,
            "cost_bytes_pct": 100 * cost.bytes_overhead,
            "predicted_packed_pct": 100 * cost.packed_overhead,
            "predicted_naive_pct": 100 * cost.naive_overhead}


class Runner:
    """Runs one variant once and times it; keeps what is known for time estimates."""

    def __init__(self, model: nn.Module, bank: ProbeBank, plan: Any, clock: Clock,
                 graphs: bool) -> None:
        self.model, self.bank, self.plan, self.clock, self.graphs = model, bank, plan, clock, graphs
        self.caches: dict[int, Any] = {}
        self.last: dict[tuple[str, int], float] = {}  # (variant, B) -> seconds, for estimates
        self.warm_s: list[float] = []  # warm-up calls (with graphs: compiles and recordings)

    def cache(self, B: int) -> Any:
        if not self.graphs:
            return None
        if B not in self.caches:
            self.caches[B] = static_cache(self.model, self.plan.prompt_len + self.plan.new_tokens)
        return self.caches[B]

    def run(self, variant: str, ids: Tensor, warm: bool = False,
            record: bool = True) -> dict[str, Any]:
        """Time one generate of `variant`. warm: the bank's first (untimed) call in a fresh
        attachment precedes the timed one (graphs). record: keep the time for estimates."""
        B, n, model = ids.shape[0], self.plan.new_tokens, self.model
        cache = self.cache(B)
        out: dict[str, Any] = {}
        before = dynamo_counts()
        with contextlib.ExitStack() as stack:
            run = None
            if variant in ("packed", "deferred"):
                defer = self.plan.defer if variant == "deferred" else 0
                run = stack.enter_context(self.bank.attach(model, batch_size=B, max_tokens=n,
                                                           defer=defer))
                if warm:
                    generate(model, ids, n, cache)
            sink = stack.enter_context(naive_hooks(model, self.bank)) if variant == "naive" \
                else None
            recordings = stack.enter_context(count_cuda_graph_recordings())
            seconds, _ = self.clock.time(lambda: self._timed(run, ids, n, cache))
        after = dynamo_counts()
        if run is not None:  # outside the timing: every slot written, every score finite
            _check_scores(run, n, variant)
        if sink is not None:
            assert len(sink) == n * len(self.bank), (len(sink), n, len(self.bank))
        out.update(seconds=seconds, graphs_recorded=recordings["recorded"],
                   **{f"new_{k}": after[k] - before[k] for k in before})
        if record:
            self.last[(variant, B)] = seconds
        return out

    def _timed(self, run, ids: Tensor, n: int, cache: Any) -> None:
        generate(self.model, ids, n, cache)
        if run is not None:
            run.flush()  # a deferred readout's last steps belong to the variant's cost

    def estimate(self, variant: str, B: int) -> float:
        if (variant, B) in self.last:
            return self.last[(variant, B)]
        prior = self.plan.graph_prior_s if self.graphs else self.plan.prior_s
        base = self.last.get(("baseline", B)) or max(
            [t for (v, b), t in self.last.items() if v == "baseline"] or [prior])
        return base * (self.plan.naive_factor if variant == "naive" else 1.3)


def _check_scores(run, n: int, variant: str) -> None:
    """Every slot of every row was written (random probes never score exactly 0) and finite."""
    scores = run.scores[:, :n]  # (B, n, P)
    written = (scores != 0).any(dim=-1)  # (B, n)
    if run.filled != n or not bool(written.all()) or not bool(torch.isfinite(scores).all()):
        raise RuntimeError(f"{variant}: the bank wrote {int(written.sum())} of {written.numel()} "
                           f"(row, token) slots (filled {run.filled} of {n}), or non-finite "
                           "scores: its taps did not run in every forward")


def block(runner: Runner, variants: list[str], ids: Tensor, r: int, warm: bool) -> dict:
    """baseline, the variants (rotated by r), baseline: paired overheads for each variant."""
    b0 = runner.run("baseline", ids)
    got = {v: runner.run(v, ids, warm=warm) for v in rotate(variants, r)}
    b1 = runner.run("baseline", ids)
    base = (b0["seconds"] + b1["seconds"]) / 2
    return {"baseline": {**b0, "seconds": base},
            **{v: {**t, "overhead_pct": 100 * (t["seconds"] / base - 1)} for v, t in got.items()}}


def bench_probes(model: nn.Module, plan: Any, clock: Clock, sec: Section, graphs: bool,
                 eager_naive: dict[int, float]) -> None:
    """Fill `sec.entry` with one row per batch size (eager, or CUDA graphs when `graphs`).
    eager_naive {B: seconds}: the eager section fills it, the graph section reads it."""
    torch.manual_seed(1)
    bank = spread_bank(model, plan.probes)
    bank.layout(model)  # pack once, outside the timings (attach reuses it)
    runner = Runner(model, bank, plan, clock, graphs)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    prompts = {B: torch.randint(3, vocab, (B, plan.prompt_len), device=device)
               for B in plan.batches}
    variants = ["packed", "deferred"] if graphs else ["packed", "deferred", "naive"]
    blocks: dict[int, list[dict]] = {B: [] for B in plan.batches}
    sec.entry.update(probes=len(bank), defer=plan.defer, new_tokens=plan.new_tokens,
                     prompt_len=plan.prompt_len, rows=[])
    stack = contextlib.ExitStack()
    if graphs:
        set_recompile_limit(64)
        stack.enter_context(compiled_decode(model, plan.graph_backend))
        sec.entry["graph_backend"] = plan.graph_backend
    # Graphs: the per-step bank at every batch size first (its compiles come first), then
    # the deferred one; each new variant is compiled (warm-up) before its first block.
    groups = [["packed"], ["deferred"]] if graphs else [variants]
    warmed: dict[int, list[str]] = {B: [] for B in plan.batches}
    with stack, torch.no_grad():
        for group in groups:
            for B in plan.batches:
                need = [v for v in ["baseline", *group] if v not in warmed[B]]
                if not _warm_up(runner, sec, need, B, prompts[B]):
                    break
                warmed[B] += need
                unit = f"block {len(blocks[B])} B={B}"
                if sec.fits(unit, _block_estimate(runner, group, B)):
                    blocks[B].append(block(runner, group, prompts[B], len(blocks[B]), graphs))
                    sec.done(unit)
                    _write_rows(sec, blocks, plan, model, graphs, eager_naive)
        for r in range(1, plan.repeats):  # more blocks, batch sizes taking turns
            for B in plan.batches:
                vs = [v for v in variants if v in warmed[B] and (v != "naive" or
                                                                 r < plan.naive_repeats)]
                unit = f"block {len(blocks[B])} B={B}"
                if vs and sec.fits(unit, _block_estimate(runner, vs, B)):
                    blocks[B].append(block(runner, vs, prompts[B], len(blocks[B]), graphs))
                    sec.done(unit)
                    _write_rows(sec, blocks, plan, model, graphs, eager_naive)


def _warm_up(runner: Runner, sec: Section, variants: list[str], B: int, ids: Tensor) -> bool:
    """Eager: one baseline call. Graphs: one call of every variant (compiles, records)."""
    for v in variants if runner.graphs else ["baseline"]:
        if runner.graphs:
            est = runner.warm_s[-1] if runner.warm_s else runner.plan.compile_prior_s
        else:
            est = runner.estimate("baseline", B)
        if not sec.fits(f"warm-up {v} B={B}", est):
            return False
        got = runner.run(v, ids, record=not runner.graphs)
        runner.warm_s.append(got["seconds"])
        sec.entry.setdefault("warm_up", []).append({"variant": v, "batch": B, **got})
        log.info("%s warm-up %s B=%d: %.1f s", sec.name, v, B, got["seconds"])
    return True


def _block_estimate(runner: Runner, variants: list[str], B: int) -> float:
    warm = 2 if runner.graphs else 1  # graphs: an untimed call precedes each bank variant
    return 2 * runner.estimate("baseline", B) + sum(
        runner.estimate(v, B) * (warm if v != "naive" else 1) for v in variants)


def _write_rows(sec: Section, blocks: dict[int, list[dict]], plan: Any, model: nn.Module,
                graphs: bool, eager_naive: dict[int, float]) -> None:
    rows = []
    for B, bs in blocks.items():
        if not bs:
            continue
        base = summary([b["baseline"]["seconds"] for b in bs])["median"]
        row: dict[str, Any] = {"batch": B, "blocks": len(bs), "baseline_s": base,
                               "baseline_tok_s": B * plan.new_tokens / base,
                               **floors(model, plan, B)}
        for v in ("packed", "deferred", "naive"):
            got = [b[v] for b in bs if v in b]
            if not got:
                continue
            row[f"{v}_s"] = summary([g["seconds"] for g in got])["median"]
            row[f"{v}_overhead_pct"] = summary([g["overhead_pct"] for g in got])
            for key in ("graphs_recorded", "new_graphs", "new_graph_breaks",
                        "new_cudagraph_skips"):
                row[f"{v}_{key}"] = sum(g[key] for g in got)
        if not graphs and "naive_s" in row:
            eager_naive[B] = row["naive_s"]
        if graphs and B in eager_naive:
            row["naive_vs_graph_baseline_pct"] = 100 * (eager_naive[B] / base - 1)
        row["target_pct"] = max(2 * row["floor_pct"], 3.0)
        naive = (row.get("naive_overhead_pct") or {}).get("median") if not graphs else \
            row.get("naive_vs_graph_baseline_pct")
        for v in ("packed", "deferred"):
            over = (row.get(f"{v}_overhead_pct") or {}).get("median")
            if over is not None:
                row[f"{v}_pass_floor"] = over <= row["target_pct"]
                row[f"{v}_pass_vs_naive"] = None if naive is None else 10 * over <= naive
        rows.append(row)
    sec.entry["rows"] = rows
    sec.entry["blocks"] = {str(B): bs for B, bs in blocks.items()}
    sec.save()
