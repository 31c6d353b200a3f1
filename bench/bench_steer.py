"""Benchmark: batched strength sweeps, and the decode cost of steering.

    python bench/bench_steer.py [--prompts 1 8 32] [--pairs 10] [--new-tokens 32] [--threads N]

Reference model (residtap.benchmark.reference_model) with vocab_size 8192: a random Llama,
8 layers, d_model 512, 8 heads, MLP 1376, float32, seed 0; the vector is random (norm 4) at
layers.4.

1. Sweep: 8 strengths over P prompts of 24 tokens. "batched" is residtap's steerability()
   (every prompt x strength a row with its own strength, one forward; with positions=-1 the
   unsteered prompt prefix runs once per prompt and only the last token per row, 2 forwards);
   "sequential" is eight full passes, one per strength, each over the P prompts (the usual
   one-multiplier-per-run loop). Both read only the last position's logits. Target: >= 4x.
2. Decode: greedy generate (batch 1, 16-token prompt, N new tokens) with and without steering,
   in interleaved ABBA blocks (no steering, steering, steering, no steering; the next block
   BAAB), one process; each block gives one paired ratio. Target: overhead <= 2%. Then the
   time spent inside the steering tap per generate call, measured separately (timing the tap
   costs a little itself).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from residtap.benchmark import reference_model
from residtap.inputs import forward_inputs, pad_left
from residtap.steering import SteeringVector, steer, steerability
from residtap.steering import inject as inject_module

VOCAB = 8192
STRENGTHS = [-4.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 4.0]


class IdTokenizer:
    """Texts are space-separated token ids (the bench needs no real tokenizer)."""

    pad_token_id = 0

    def __call__(self, texts):
        return {"input_ids": [[int(t) for t in text.split()] for text in texts]}


def build_model() -> nn.Module:
    return reference_model(vocab=VOCAB)


def ab_rows(n: int, length: int = 24, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        q = torch.randint(3, VOCAB, (length - 1,), generator=g).tolist()
        a, b = torch.randint(3, VOCAB, (2,), generator=g).tolist()
        rows.append({"question": " ".join(map(str, [1, *q])),
                     "answer_matching_behavior": f" {a}", "answer_not_matching_behavior": f" {b}"})
    return rows


def sequential_sweep(model, rows, vec, positions) -> None:
    prompts = [[int(t) for t in r["question"].split()] for r in rows]
    ids, mask = pad_left(prompts, 0)
    for s in STRENGTHS:
        with torch.no_grad(), steer(model, vec, s, positions=positions):
            model(**forward_inputs(model, ids, mask, last_logits_only=True))


def bench_sweep(model, vec, prompt_counts: list[int], repeats: int) -> None:
    print("\n== sweep: 8 strengths, batched vs 8 sequential passes (full forwards) ==")
    print(f"{'positions':>9} {'prompts':>8} {'rows':>6} {'forwards':>8} {'batched s':>10} "
          f"{'sequential s':>13} {'speed-up':>9}")
    tok = IdTokenizer()
    for positions, n in [(p, n) for p in ("all", -1) for n in prompt_counts]:
        rows = ab_rows(n)
        batched_t, seq_t = [], []
        def batched(rows=rows, n=n, positions=positions):
            return steerability(model, tok, rows, vec, STRENGTHS, baseline=False,
                                batch_size=8 * n, positions=positions)

        forwards = batched().n_forwards  # warm-up; 1, or 2 with a shared prompt prefix
        for r in range(repeats):
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                start = time.perf_counter()
                if which == 0:
                    batched()
                    batched_t.append(time.perf_counter() - start)
                else:
                    sequential_sweep(model, rows, vec, positions)
                    seq_t.append(time.perf_counter() - start)
        b, s = statistics.median(batched_t), statistics.median(seq_t)
        print(f"{positions!s:>9} {n:>8} {8 * n:>6} {forwards:>8} {b:>10.4f} {s:>13.4f} "
              f"{s / b:>8.2f}x")


def generate(model, ids, new_tokens):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, eos_token_id=None)


def bench_decode(model, vec, pairs: int, new_tokens: int) -> None:
    print(f"\n== decode: greedy generate, batch 1, 16-token prompt, {new_tokens} new tokens, "
          f"{pairs} interleaved ABBA blocks ==")
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator()
                        .manual_seed(2))
    for policy in ("all", -1):
        generate(model, ids, 4)  # warm-up
        plain_t, steer_t = [], []
        for r in range(pairs):  # ABBA blocks (BAAB every other one): drift cancels in a block
            block = {0: 0.0, 1: 0.0}
            for which in ((0, 1, 1, 0) if r % 2 == 0 else (1, 0, 0, 1)):
                start = time.perf_counter()
                if which == 0:
                    out_plain = generate(model, ids, new_tokens)
                else:
                    with steer(model, vec, 4.0, positions=policy):
                        generate(model, ids, new_tokens)
                block[which] += (time.perf_counter() - start) / 2
            plain_t.append(block[0])
            steer_t.append(block[1])
        ratios = [s / p for s, p in zip(steer_t, plain_t, strict=True)]
        p_med, s_med = statistics.median(plain_t), statistics.median(steer_t)
        print(f"positions={policy!s:>4}: no steering {p_med * 1e3:8.1f} ms, steering "
              f"{s_med * 1e3:8.1f} ms per generate; paired overhead median "
              f"{(statistics.median(ratios) - 1) * 100:+.2f}% (ratio of medians "
              f"{(s_med / p_med - 1) * 100:+.2f}%)")
        with steer(model, vec, 4.0, positions=policy):
            steered = generate(model, ids, new_tokens)
        with steer(model, vec, 0.0, positions=policy):
            assert torch.equal(generate(model, ids, new_tokens), out_plain)
        print(f"  (strength 4 changes {int((steered != out_plain).sum())} of {new_tokens} tokens;"
              " strength 0 gives the identical sequence)")
        tap_time(model, vec, ids, new_tokens, policy, min(pairs, 3))


def tap_time(model, vec, ids, new_tokens, policy, calls: int) -> None:
    original = inject_module._SiteTap.__call__
    spent: list[float] = []

    def timed(self, hidden, step):
        start = time.perf_counter()
        out = original(self, hidden, step)
        spent.append(time.perf_counter() - start)
        return out

    inject_module._SiteTap.__call__ = timed
    try:
        for _ in range(calls):
            with steer(model, vec, 4.0, positions=policy):
                generate(model, ids, new_tokens)
    finally:
        inject_module._SiteTap.__call__ = original
    per_call = sum(spent) / calls
    print(f"  time inside the steering tap: {per_call * 1e3:.3f} ms per generate "
          f"({len(spent) // calls} tap calls, {statistics.median(spent) * 1e6:.1f} us median "
          "per call)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model: "
          f"{model.config.model_type}, {model.num_parameters() / 1e6:.1f}M parameters, "
          f"vocab {model.config.vocab_size}")
    vec = SteeringVector.from_probe(torch.randn(512) * 4 / 512**0.5, site="layers.4",
                                    model=model)
    bench_sweep(model, vec, args.prompts, args.repeats)
    bench_decode(model, vec, args.pairs, args.new_tokens)


if __name__ == "__main__":
    main()
