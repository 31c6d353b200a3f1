"""Probe training: residtap (torch L-BFGS) vs scikit-learn LogisticRegression, same splits.

    python bench/bench_probe_training.py                      # N = 1k, 10k, 50k rows, d = 256
    python bench/bench_probe_training.py --sizes 2000 --json  # machine-readable
    python bench/bench_probe_training.py --threads 1          # torch and BLAS on one thread

Synthetic residual-stream-like data: texts of 50 tokens, a label per token from a noisy linear
rule, per-feature offsets and scales with a few "massive" dimensions. Each size uses one
grouped 80/20 split (by text) for every method. Rows:
    residtap l2=...     train_probe with a fixed l2 (one L-BFGS fit, float32)
    residtap grid       train_probe choosing l2 from its 6-value grid on a grouped validation
                        split, then refitting (7 fits)
    sklearn C=...       StandardScaler + LogisticRegression(C = 1 / (l2 * n_train)), the same
                        objective, default max_iter=100 and tol=1e-4, then max_iter=1000
Times are wall-clock seconds of the fit only, best of --repeats (data already in memory,
float32 for residtap, float64 copies made inside sklearn count; residtap's time includes the
training metrics it computes). Accuracy is on the held-out texts. On a CPU shared with other
jobs, --threads 1 avoids OpenMP oversubscription, which can slow torch several-fold.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings

import torch

from residtap.probes import evaluate, grouped_split, train_probe


def make_data(n: int, d: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randn(d, generator=g) * 3.0
    scales = torch.rand(d, generator=g) * 2.0 + 0.2
    scales[:4] *= 50.0  # a few massive dimensions
    latent = torch.randn(n, d, generator=g)
    groups = torch.arange(n) // 50
    latent += 0.5 * torch.randn(int(groups.max()) + 1, d, generator=g)[groups]  # per-text drift
    w = torch.randn(classes if classes > 2 else 1, d, generator=g) / d**0.5
    logits = latent @ w.T + 0.7 * torch.randn(n, w.shape[0], generator=g)
    y = (logits[:, 0] > 0).long() if classes == 2 else logits.argmax(1)
    return (latent * scales + offsets).float(), y, groups


def timed(repeats: int, fn):
    """(result of the last call, best wall-clock seconds over `repeats` calls)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def bench_size(
    n: int, d: int, classes: int, l2: float, max_iters: list[int], repeats: int
) -> list[dict]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y, groups = make_data(n, d, classes)
    tr, te = grouped_split(groups, 0.2, seed=0)
    Xtr, ytr, Xte, yte = X[tr], y[tr], X[te], y[te]
    kind = "logistic" if classes == 2 else "multinomial"
    rows = []

    probe, seconds = timed(repeats, lambda: train_probe(Xtr, ytr, kind=kind, l2=l2))
    rows.append(_row(n, f"residtap l2={l2:g}", seconds, evaluate(probe, Xte, yte)["accuracy"],
                     probe.metadata["n_iter"], True))  # fmt: skip

    probe, seconds = timed(repeats, lambda: train_probe(Xtr, ytr, kind=kind, groups=groups[tr]))
    accuracy = evaluate(probe, Xte, yte)["accuracy"]
    method = f"residtap grid (chose {probe.metadata['l2']:g})"
    rows.append(_row(n, method, seconds, accuracy, probe.metadata["n_iter"], True))

    Xtr_np, Xte_np = Xtr.numpy(), Xte.numpy()
    for max_iter in max_iters:

        def fit_sklearn(max_iter: int = max_iter):
            scaler = StandardScaler().fit(Xtr_np)
            clf = LogisticRegression(C=1.0 / (l2 * len(tr)), max_iter=max_iter)
            return scaler, clf.fit(scaler.transform(Xtr_np), ytr.numpy())

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            (scaler, clf), seconds = timed(repeats, fit_sklearn)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        accuracy = clf.score(scaler.transform(Xte_np), yte.numpy())
        rows.append(_row(n, f"sklearn C=1/(l2 n) max_iter={max_iter}", seconds, accuracy,
                         int(clf.n_iter_.max()), converged))  # fmt: skip
    return rows


def _row(n: int, method: str, seconds: float, accuracy: float, n_iter: int, converged: bool):
    return {
        "n": n,
        "method": method,
        "seconds": round(seconds, 3),
        "accuracy": round(float(accuracy), 4),
        "n_iter": n_iter,
        "converged": converged,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 50_000])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--l2", type=float, default=1e-4)
    parser.add_argument("--sklearn-max-iter", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many")
    parser.add_argument("--threads", type=int, default=None, help="torch and BLAS threads")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        import sklearn
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("this benchmark compares against scikit-learn: pip install scikit-learn",
              file=sys.stderr)  # fmt: skip
        return 2
    # warm-up: the first optimizer construction imports torch._dynamo (seconds), not timed
    train_probe(torch.randn(64, 4), torch.arange(64) % 2, l2=1.0)
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    rows = []
    for n in args.sizes:
        rows += bench_size(n, args.d, args.classes, args.l2, args.sklearn_max_iter, args.repeats)
    env = {"torch": torch.__version__, "sklearn": sklearn.__version__,
           "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
           "d": args.d, "classes": args.classes, "l2": args.l2}  # fmt: skip
    if args.json:
        print(json.dumps({"env": env, "rows": rows}, indent=1))
        return 0
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'N':>7}  {'method':<40} {'seconds':>8} {'accuracy':>9} {'iters':>6} converged")
    for r in rows:
        print(f"{r['n']:>7}  {r['method']:<40} {r['seconds']:>8.3f} {r['accuracy']:>9.4f} "
              f"{r['n_iter']:>6} {r['converged']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
