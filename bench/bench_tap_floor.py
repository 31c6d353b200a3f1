"""How much of the probe bank's in-handler time is the readout matmul itself?

Times, inside one generate call and through the same tap engine, (a) a bare tap per layer that
does only `F.linear(h[:, -1:], W)` and a slice write into a buffer, and (b) the ProbeBank with
the same weights. Reference Llama (8 layers, d 512), 125 probes per layer, batch 1, 64 tokens.

    python bench/bench_tap_floor.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import residtap
from residtap.benchmark import reference_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = reference_model()
    sites = residtap.layer_sites(model)
    weights = {s: torch.randn(125, 512) for s in sites}
    buf = torch.zeros(1, 80, 125 * len(sites))
    spent = [0.0, 0]

    def bare(i: int, w: torch.Tensor):
        def tap_fn(h, step):
            t0 = time.perf_counter()
            buf[:, step.past:step.past + 1, i * 125:(i + 1) * 125] = F.linear(h[:, -1:], w)
            spent[0] += time.perf_counter() - t0
            spent[1] += 1
        return tap_fn

    bank = residtap.ProbeBank()
    for s in sites:
        bank.add(f"p-{s}", weights[s], None, site=s)
    ids = torch.randint(0, 32000, (1, 16))

    def generate() -> float:
        t = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                       pad_token_id=0)
        return time.perf_counter() - t

    with torch.no_grad():
        generate()  # warm-up
        for r in range(args.repeats):
            spent[:] = [0.0, 0]
            with residtap.tap(model, {s: bare(i, weights[s]) for i, s in enumerate(sites)}):
                g = generate()
            print(f"round {r}: bare matmul tap {spent[0] / spent[1] * 1e6:6.1f} us/call, "
                  f"{100 * spent[0] / g:.2f}% of generate", end="; ")
            with bank.attach(model, max_tokens=64, timed=True) as run:
                g = generate()
            print(f"probe bank {run.tap_seconds / run.tap_calls * 1e6:6.1f} us/call, "
                  f"{100 * run.tap_seconds / g:.2f}% of generate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
