"""The device run: residtap's costs on a GPU, in one script with time caps.

    bash bench/gpu.sh OUT                        # the device machine: installs, checks, runs
    python bench/bench_gpu.py OUT --plan         # print the sections, caps and sizes; run nothing
    python bench/bench_gpu.py OUT --smoke        # the same code, tiny CPU model (tests/test_gpu.py)

Model: Llama-3.1-8B's config (residtap's preset), random weights initialised on the device in
bf16 (no download). Sections, in order, each with a time cap (see `Plan.caps`; leftover time
flows into the next section; the whole run stays under `budget_s`):
    setup          versions, device, model build, the device's copy bandwidth and GEMM rate
    probes_eager   baseline vs 1000 packed probes (per step, deferred) vs 1000 naive hooks,
                   greedy decode of 128 tokens at batch 1, 8, 32 (gpu_probes.py)
    probes_graphs  the same with a static cache and torch.compile(mode="reduce-overhead")
    lens           deferred lens decode vs the one-GEMM floor; whole run vs the naive lens
    capture        every layer to a store on disk (and /dev/shm) vs a hookless forward
    steering       8-strength sweep, batched vs sequential (gpu_sections.py)
Writes OUT/bench_gpu.json after every unit of work (a run cut short keeps what it finished;
each section says "complete", "partial", "timeout", "failed" or "not run") and
OUT/bench_gpu.log; the last lines printed are a short summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START = time.perf_counter()  # the budget counts from here: imports and the model build included
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("setup", "probes_eager", "probes_graphs", "lens", "capture", "steering")
log = logging.getLogger("bench_gpu")


@dataclass
class Plan:
    smoke: bool = False
    device: str = "cuda"
    dtype: str = "bfloat16"
    model: str = "Llama-3.1-8B"
    shrink: dict[str, int] = field(default_factory=dict)  # config overrides (smoke)
    batches: tuple[int, ...] = (1, 8, 32)
    new_tokens: int = 128
    prompt_len: int = 32
    probes: int = 1000
    defer: int = 16
    repeats: int = 3  # paired blocks per batch size
    naive_repeats: int = 1  # blocks that include the naive hooks (the slowest variant)
    naive_factor: float = 4.0  # naive time / baseline time, for estimates before measuring
    prior_s: float = 10.0  # an eager generate before any was measured
    graph_prior_s: float = 3.0  # a generate replaying CUDA graphs, before any was measured
    compile_prior_s: float = 120.0  # a first compile + CUDA graph recording
    graph_backend: str = "inductor"
    lens: dict[str, Any] = field(default_factory=lambda: dict(
        batch=8, prompt=128, new=64, top_k=5, budget_mb=4096, repeats=3, prior_s=25.0))
    capture: dict[str, Any] = field(default_factory=lambda: dict(
        samples=32, seq=128, batch=8, repeats=3, prior_s=15.0,
        dirs=[tempfile_root(), "/dev/shm"]))
    steer: dict[str, Any] = field(default_factory=lambda: dict(
        prompts=(1, 8, 32), positions=("all", -1), repeats=3, prior_s=5.0))
    budget_s: float = 480.0  # this script; gpu.sh adds the install and import check (~30 s)
    grace_s: float = 20.0  # a section's hard cap is its cap plus this
    caps: dict[str, float] = field(default_factory=lambda: dict(
        setup=50, probes_eager=105, probes_graphs=180, lens=60, capture=35, steering=25))

    @classmethod
    def smoke_plan(cls) -> Plan:
        return cls(smoke=True, device="cpu", shrink=dict(
                       hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=8192),
                   batches=(1, 2), new_tokens=4, prompt_len=8, probes=10, defer=4, repeats=2,
                   prior_s=2.0, graph_prior_s=2.0, compile_prior_s=20.0, graph_backend="eager",
                   lens=dict(batch=2, prompt=8, new=4, top_k=5, budget_mb=64, repeats=2,
                             prior_s=5.0),
                   capture=dict(samples=8, seq=16, batch=4, repeats=2, prior_s=5.0,
                                dirs=[tempfile_root()]),
                   steer=dict(prompts=(2,), positions=("all", -1), repeats=2, prior_s=5.0),
                   budget_s=240.0, grace_s=30.0,
                   caps=dict(setup=30, probes_eager=40, probes_graphs=60, lens=30, capture=30,
                             steering=30))


def tempfile_root() -> str:
    import tempfile

    return tempfile.gettempdir()


# -- environment and model --------------------------------------------------------------------
def environment(plan: Plan) -> dict[str, Any]:
    import torch
    import transformers

    import residtap

    env: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "residtap": residtap.__version__, "residtap_path": str(Path(residtap.__file__).parent),
        "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda}
    try:
        env["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                           capture_output=True, text=True, timeout=10
                                           ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version())
    return env


def build_model(plan: Plan):
    """Llama-3.1-8B's config with random weights, made directly on the device in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    from residtap.cost import load_config

    config, _ = load_config(plan.model)
    for key, value in plan.shrink.items():
        setattr(config, key, value)
    if plan.shrink:
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, plan.dtype))
    return model.eval()


def ceilings(plan: Plan, clock) -> dict[str, float]:
    """The device's copy bandwidth (bytes read + written) and bf16 GEMM rate, random data."""
    import torch

    n = 2**30 if plan.device == "cuda" else 2**22  # elements: 2 GiB of bf16 on a GPU
    m = 8192 if plan.device == "cuda" else 256
    a = torch.randn(n, device=plan.device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    x = torch.randn(m, m, device=plan.device, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=plan.device, dtype=torch.bfloat16)
    b.copy_(a), torch.matmul(x, y)  # warm-up
    copy_s = min(clock.time(lambda: b.copy_(a))[0] for _ in range(5))
    gemm_s = min(clock.time(lambda: torch.matmul(x, y))[0] for _ in range(5))
    return {"copy_gb_s": 2 * n * 2 / copy_s / 1e9, "bf16_gemm_tflop_s": 2 * m**3 / gemm_s / 1e12}


# -- the run ----------------------------------------------------------------------------------
class Run:
    def __init__(self, plan: Plan, out: Path, sections: list[str]) -> None:
        self.plan, self.out, self.sections = plan, out, sections
        self.t0 = START
        self.results: dict[str, Any] = {
            "format": "residtap.bench_gpu/1", "mode": "smoke" if plan.smoke else "full",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "plan": dataclasses.asdict(plan),
            "sections": {name: {"status": "not run"} for name in SECTIONS}}

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.results["completed"] = [n for n, s in self.results["sections"].items()
                                     if s.get("status") == "complete"]
        tmp = self.out / "bench_gpu.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "bench_gpu.json")

    def cap(self, name: str, carry: float) -> float:
        """The section's cap plus what earlier sections left, within what the budget has left
        after reserving the caps of the sections still to come."""
        later = sum(self.plan.caps[s] for s in self.sections[self.sections.index(name) + 1:])
        left = self.plan.budget_s - (time.perf_counter() - self.t0) - later
        return max(0.0, min(self.plan.caps[name] + carry, left))

    def go(self) -> None:
        import torch
        from gpu_common import Clock, Section
        from gpu_probes import bench_probes
        from gpu_sections import bench_capture, bench_lens, bench_steering

        plan, clock = self.plan, Clock(self.plan.device)
        model, eager_naive, carry = None, {}, 0.0
        for name in self.sections:
            cap = self.cap(name, carry)
            if name != "setup" and model is None:
                self.results["sections"][name] = {"status": "not run", "reason": "no model"}
                continue
            with Section(name, cap, self.results, plan.grace_s, self.save) as sec:
                if name == "setup":
                    self.results["environment"] = environment(plan)
                    log.info("environment: %s", json.dumps(self.results["environment"]))
                    t0 = time.perf_counter()
                    model = build_model(plan)
                    clock.sync()
                    sec.entry["model_build_s"] = time.perf_counter() - t0
                    sec.entry["model"] = {"config": plan.model, "shrink": plan.shrink,
                                          "params": sum(p.numel() for p in model.parameters()),
                                          "dtype": plan.dtype, "device": plan.device}
                    sec.entry["ceilings"] = ceilings(plan, clock)
                    log.info("model built in %.1f s; ceilings %s", sec.entry["model_build_s"],
                             sec.entry["ceilings"])
                elif name in ("probes_eager", "probes_graphs"):
                    bench_probes(model, plan, clock, sec, name == "probes_graphs", eager_naive)
                elif name == "lens":
                    bench_lens(model, plan, clock, sec)
                elif name == "capture":
                    bench_capture(model, plan, clock, sec)
                elif name == "steering":
                    bench_steering(model, plan, clock, sec)
            carry = max(0.0, cap - sec.elapsed())
            if name == "probes_graphs":
                import torch._dynamo

                torch._dynamo.reset()
            if plan.device == "cuda":
                torch.cuda.empty_cache()
        self.save()


def print_summary(results: dict[str, Any]) -> None:
    """A short table of the figures that carry a target (the device tool shows the tail)."""
    s = results["sections"]
    print(f"\n== bench_gpu {results['mode']}: {results.get('elapsed_s')} s; completed: "
          f"{', '.join(results.get('completed', []))}")
    for name in SECTIONS:
        entry = s.get(name, {})
        print(f"  {name:14s} {entry.get('status', 'not run'):9s} "
              f"{entry.get('elapsed_s', '-')} s {entry.get('error', '')[:100]}")
    for name in ("probes_eager", "probes_graphs"):
        for row in s.get(name, {}).get("rows", []):
            cells = [f"{name} B={row['batch']:<3d} base {row['baseline_tok_s']:8.1f} tok/s",
                     f"floor {row['floor_pct']:.3f}%"]
            for v in ("packed", "deferred", "naive"):
                over = row.get(f"{v}_overhead_pct")
                if over:
                    cells.append(f"{v} {over['median']:+.2f}%")
            if "naive_vs_graph_baseline_pct" in row:
                cells.append(f"naive(eager) {row['naive_vs_graph_baseline_pct']:+.0f}%")
            print("  " + ", ".join(cells))
    lens = s.get("lens", {})
    if lens.get("decode_over_floor"):
        print(f"  lens decode/floor {lens['decode_over_floor']['median']:.2f}x (<= 1.25), "
              f"naive/ours whole run {lens['naive_over_ours_total']['median']:.2f}x (>= 5)")
    for t in s.get("capture", {}).get("targets", []):
        if t.get("all_over_hookless"):
            print(f"  capture {t['dir']} ({t['fs']}): all {t['all_over_hookless']['median']:.2f}x"
                  f" (<= 1.10), last {t['last_over_hookless']['median']:.2f}x, "
                  f"{t['all_gb_s']:.2f} GB/s vs plain write {t['plain_write_gb_s']:.2f} GB/s")
    for row in s.get("steering", {}).get("rows", []):
        if row.get("speedup"):
            print(f"  steering positions={row['positions']} prompts={row['prompts']}: batched "
                  f"{row['speedup']['median']:.1f}x faster than sequential")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for bench_gpu.json and bench_gpu.log")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU model, seconds")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (setup is "
                             "always run)")
    parser.add_argument("--graph-backend", choices=("inductor", "cudagraphs", "aot_eager",
                                                      "eager"),
                        help="how decode steps are compiled (default: inductor, i.e. "
                             "mode='reduce-overhead'; smoke: eager, i.e. dynamo alone)")
    parser.add_argument("--budget-s", type=float, help="seconds for this script (default 480)")
    parser.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS",
                        help="change a section's time cap (repeatable), e.g. probes_graphs=300")
    args = parser.parse_args(argv)
    plan = Plan.smoke_plan() if args.smoke else Plan()
    if args.graph_backend:
        plan.graph_backend = args.graph_backend
    if args.budget_s:
        plan.budget_s = args.budget_s
    for item in args.cap:
        name, _, seconds = item.partition("=")
        try:
            if name not in plan.caps:
                raise ValueError(name)
            plan.caps[name] = float(seconds)
        except ValueError:
            parser.error(f"--cap expects SECTION=SECONDS with SECTION one of {list(SECTIONS)}, "
                         f"got {item!r}")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; expected a subset of {list(SECTIONS)}")
    sections = [s for s in SECTIONS if s in wanted or s == "setup"]
    if sum(plan.caps[s] for s in sections) > plan.budget_s:
        parser.error(f"the caps of {sections} add up to {sum(plan.caps[s] for s in sections)} s,"
                     f" over the budget of {plan.budget_s} s")
    if args.plan:
        caps = {s: plan.caps[s] for s in sections}
        print(json.dumps({"sections": caps, "caps_total_s": sum(caps.values()),
                          "hard_cap_grace_s": plan.grace_s, "budget_s": plan.budget_s,
                          "plan": dataclasses.asdict(plan)}, indent=1, default=str))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(),
                                  logging.FileHandler(args.out / "bench_gpu.log", mode="w")])
    import torch

    if plan.device == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA device: run with --smoke on a CPU (torch %s)", torch.__version__)
        return 2
    if plan.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = Run(plan, args.out, sections)
    try:
        run.go()
    finally:
        run.save()
        print_summary(run.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
