"""What every section of the device bench (bench_gpu.py) shares: clocks, time caps, generate.

    clock = Clock(device)
    seconds, out = clock.time(lambda: generate(model, ids, 128))   # CUDA events on a GPU
    with Section("lens", cap_s=60, results=doc) as sec:           # one entry of the JSON
        if sec.fits(estimate_s): ...; sec.done("unit")             # soft cap; the alarm is hard

Time caps: each section has a soft cap (a unit of work starts only if its estimate fits in
what is left) and a hard one (cap + grace: SIGALRM raises SectionTimeout in the main thread,
a BaseException so no library `except Exception` swallows it). The section's entry in the JSON
says which units finished, which were skipped and why.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import signal
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger("bench_gpu")


class SectionTimeout(BaseException):
    """A section ran past its hard cap."""


class Clock:
    """Seconds of a call: CUDA events on a GPU (the queue drained first), perf_counter on a CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return time.perf_counter() - t0, out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out


class Section:
    """One section of the run: its soft and hard time caps and its entry in the results."""

    def __init__(self, name: str, cap_s: float, results: dict[str, Any], grace_s: float,
                 save: Callable[[], None]) -> None:
        self.name, self.cap_s, self.grace_s, self.save = name, cap_s, grace_s, save
        self.entry: dict[str, Any] = {"status": "running", "cap_s": round(cap_s, 1),
                                      "done": [], "skipped": []}
        results.setdefault("sections", {})[name] = self.entry
        self.t0 = 0.0

    def __enter__(self) -> Section:
        self.t0 = time.perf_counter()
        log.info("== section %s (cap %.0f s)", self.name, self.cap_s)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, self.cap_s + self.grace_s)
        return self

    def _alarm(self, signum, frame) -> None:
        raise SectionTimeout(f"section {self.name} passed its hard cap "
                             f"({self.cap_s + self.grace_s:.0f} s)")

    def __exit__(self, exc_type, exc, tb) -> bool:
        if threading.current_thread() is threading.main_thread():
            signal.setitimer(signal.ITIMER_REAL, 0)
        self.entry["elapsed_s"] = round(self.elapsed(), 2)
        if exc_type is None:
            self.entry["status"] = "partial" if self.entry["skipped"] else "complete"
        else:
            self.entry["status"] = "timeout" if exc_type is SectionTimeout else "failed"
            self.entry["error"] = "".join(traceback.format_exception_only(exc_type, exc)).strip()
            log.error("section %s %s:\n%s", self.name, self.entry["status"],
                      "".join(traceback.format_exception(exc_type, exc, tb)))
        log.info("== section %s: %s in %.1f s", self.name, self.entry["status"], self.elapsed())
        self.save()
        return exc_type is not None and issubclass(exc_type, Exception | SectionTimeout)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.cap_s - self.elapsed()

    def fits(self, unit: str, estimate_s: float) -> bool:
        """Start `unit` only if its estimate fits in the soft cap; else record it as skipped."""
        if estimate_s <= self.left():
            return True
        self.entry["skipped"].append({"unit": unit, "estimate_s": round(estimate_s, 1),
                                      "left_s": round(self.left(), 1)})
        log.warning("%s: skipping %s (estimate %.0f s, %.0f s left)", self.name, unit,
                    estimate_s, self.left())
        self.save()
        return False

    def done(self, unit: str) -> None:
        self.entry["done"].append(unit)
        self.save()


# -- statistics -------------------------------------------------------------------------------
def summary(xs: list[float]) -> dict[str, float] | None:
    """median and the 25th-75th percentile (min/max for fewer than 4 values)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None
    if len(xs) < 4:
        return {"median": statistics.median(xs), "lo": min(xs), "hi": max(xs), "n": len(xs)}
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": q[1], "lo": q[0], "hi": q[2], "n": len(xs)}


def rotate(items: list, r: int) -> list:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


# -- generation -------------------------------------------------------------------------------
def cache_keyword(model: nn.Module) -> str:
    """transformers 5.24 names the forward's KV cache `cache`; older releases `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate(model: nn.Module, ids: Tensor, n: int, cache: Any = None, **kw: Any) -> Tensor:
    """Greedy decode of exactly `n` new tokens (no EOS), as residtap's CPU bench does. With a
    static `cache` (reset first, so its tensors keep their addresses across calls)
    transformers' own compile is off: `compiled_decode` decides what is compiled."""
    if cache is not None:
        cache.reset()
        kw.update({cache_keyword(model): cache, "disable_compile": True})
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0, **kw)


def static_cache(model: nn.Module, max_len: int) -> Any:
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


@contextlib.contextmanager
def compiled_decode(model: nn.Module, backend: str) -> Iterator[None]:
    """`model.forward` compiled (fullgraph) for one-token decode steps; the prefill runs
    eagerly, as transformers' own compiled generate does, so the static cache is allocated
    (and marked static) outside the graph. backend 'inductor': mode='reduce-overhead' (CUDA
    graphs); 'cudagraphs': CUDA graphs of the traced ATen graph, no inductor codegen;
    'eager' (dynamo alone) and 'aot_eager': CPU stand-ins (no code generation, no CUDA graphs)."""
    import torch._dynamo.config as dynamo_config

    eager = model.forward
    # torch's default skips guards on submodule hooks: a forward compiled before a bank was
    # attached would keep running without it. Guarded, each set of taps gets its own graph.
    skip_hook_guards, dynamo_config.skip_nnmodule_hook_guards = (
        dynamo_config.skip_nnmodule_hook_guards, False)
    if backend == "inductor":
        compiled = torch.compile(eager, mode="reduce-overhead", fullgraph=True)
    else:
        compiled = torch.compile(eager, backend=backend, fullgraph=True)

    @functools.wraps(eager)
    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[1] != 1:
            return eager(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    model.forward = forward
    try:
        yield
    finally:
        del model.forward
        dynamo_config.skip_nnmodule_hook_guards = skip_hook_guards


@contextlib.contextmanager
def count_cuda_graph_recordings() -> Iterator[dict[str, int]]:
    """Counts CUDA graphs recorded by torch.compile's CUDA graph trees inside the block."""
    counter = {"recorded": 0}
    try:
        from torch._inductor import cudagraph_trees as trees

        original = trees.CUDAGraphTreeManager.record_function
    except (ImportError, AttributeError):  # pragma: no cover - depends on the torch release
        yield counter
        return

    def counted(self, *args, **kwargs):
        counter["recorded"] += 1
        return original(self, *args, **kwargs)

    trees.CUDAGraphTreeManager.record_function = counted
    try:
        yield counter
    finally:
        trees.CUDAGraphTreeManager.record_function = original


def dynamo_counts() -> dict[str, int]:
    """Graphs compiled, graph breaks and CUDA graph skips so far (torch._dynamo counters)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


def set_recompile_limit(n: int) -> None:
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6
        if hasattr(cfg, name):
            setattr(cfg, name, n)
            return
