"""What a decode step pays inside residtap's hooks on a small model, whatever the readout does.

    python bench/bench_step_floor.py [--model organism|reference] [--repeats 5] [--batch 1]

Greedy decode of 64 tokens after a 16-token prompt, 1 torch thread, time inside residtap's
hooks per decode step (residtap.engine.timing), median over repeats, the variants interleaved:
    no-op tap      the engine with one tap that does nothing (the root pre-hook, the step
                   bookkeeping, one site handler)
    linear         a bank of one linear probe at the middle layer, read every step / deferred
    attention      the `bench readouts` attention bank (8 probes x 4 heads), same two modes
and, inside a tap that does nothing else, a kernel's cost on its first call in a step against
the same call right after it (torch.exp of a (1, 32) tensor): on a CPU whose
caches the model's own kernels have just filled, the first call of each kind of kernel costs
several times its warm cost, so what a step pays depends on how many kinds it runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from residtap.benchmark.readouts import ReadoutConfig, load_model, middle_site, readout_banks
from residtap.engine import tap, timing
from residtap.probes.bank import ProbeBank

NEW, PROMPT = 64, 16


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["organism", "reference"], default="organism")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = ReadoutConfig(model=args.model)
    model, sae = load_model(cfg)
    site = middle_site(model)
    linear = ProbeBank().add("probe", torch.randn(model.config.hidden_size), site=site)
    attention = readout_banks(model, sae, cfg)["attention"]
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (args.batch, PROMPT), generator=torch.Generator().manual_seed(0))

    def generate() -> float:
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                       min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    def in_hooks(variant: str) -> tuple[float, float]:
        """(µs per step inside residtap's hooks, generate seconds) for one variant."""
        if variant == "baseline":
            return 0.0, generate()
        if variant == "no-op tap":
            with tap(model, {site: lambda h, step: None}), timing(model) as clock:
                seconds = generate()
            return clock.seconds / NEW * 1e6, seconds
        bank, mode = {"linear packed": (linear, 0), "linear deferred": (linear, 16),
                      "attention packed": (attention, 0),
                      "attention deferred": (attention, 16)}[variant]
        with bank.attach(model, batch_size=args.batch, max_tokens=NEW, defer=mode) as run:
            with timing(model) as clock:
                seconds = generate()
            t0 = time.perf_counter()
            run.flush()
            flush = time.perf_counter() - t0
        return (clock.seconds + flush) / NEW * 1e6, seconds

    variants = ["baseline", "no-op tap", "linear packed", "linear deferred", "attention packed",
                "attention deferred"]
    got: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    with torch.no_grad():
        generate()  # warm-up
        for r in range(args.repeats):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                got[v].append(in_hooks(v))
        first, second = kernel_first_call(model, site, generate)
    step_ms = statistics.median(s for _, s in got["baseline"]) / NEW * 1e3
    print(f"{args.model}, batch {args.batch}: baseline {step_ms:.2f} ms per decode step "
          f"(median of {args.repeats}); time inside residtap's hooks per step:")
    for v in variants[1:]:
        us = [u for u, _ in got[v]]
        med = statistics.median(us)
        print(f"  {v:20s} {med:7.1f} us  [{min(us):.1f}, {max(us):.1f}]  "
              f"{100 * med / (step_ms * 1e3):5.2f}% of a step")
    print(f"a kernel inside a tap (torch.exp, (1, 32)): first call {first:.1f} us, "
          f"the same call right after {second:.1f} us (medians over {NEW * 3} steps)")
    return 0


def kernel_first_call(model: torch.nn.Module, site: str, generate) -> tuple[float, float]:
    """Median µs of a kernel's first and second call inside a tap at `site`."""
    x = torch.randn(1, 32)
    first: list[float] = []
    second: list[float] = []

    def probe_kernel(hidden: torch.Tensor, step) -> None:
        t0 = time.perf_counter()
        torch.exp(x)
        t1 = time.perf_counter()
        torch.exp(x)
        t2 = time.perf_counter()
        first.append(t1 - t0)
        second.append(t2 - t1)

    with tap(model, {site: probe_kernel}):
        for _ in range(3):
            generate()
    return statistics.median(first) * 1e6, statistics.median(second) * 1e6


if __name__ == "__main__":
    raise SystemExit(main())
