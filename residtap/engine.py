"""The tap engine: one handler per site, shared by every reader and writer registered there.

    with residtap.engine.tap(model, {"layers.3": my_tap}):
        model(**batch)

A tap is any callable `tap(hidden, step) -> Tensor | None`. `hidden` is the site's tensor
(B, T, ...); returning a tensor replaces it for the taps after it and for the model (a writer);
returning None leaves it as it is (a reader). `step` is the `Step` describing this forward.

Design rules:
- Per model there is at most one `Engine`, and per site at most one installed handler, however
  many taps or nested `tap(...)` blocks use it. Taps at a site run in registration order.
- Every hook the engine installs is kept as a handle and removed when the last tap using it
  leaves, in `finally`: after a normal exit, after an exception, and with nested blocks. The
  model itself is not changed (early stop wraps `model.forward` while it is asked for, and
  puts it back).
- Module outputs that may be a tensor, a tuple or a ModelOutput are normalised in one helper
  (`hidden_of` / `with_hidden`).
- Early stop: a block opened with `stop_early=True` raises StopForward as soon as every site of
  every open block has fired; the model's forward (wrapped while such blocks are open) catches
  it and returns None, so the stop ends that forward and the `with` body goes on (a loop of
  forwards is stopped once per forward). Reading layer 2 of 32 costs 3 layers. It stops only
  when every open block asked for it.
- Threads: an engine serves the thread that opened its first block; a forward from another
  thread raises, unless every open block was opened with `any_thread=True`.
- Nothing here synchronises with the device: positions come from tensor shapes.

What a forward is (`Step`, `next_step`) and how outputs hold their hidden state (`hidden_of`)
live in residtap.hooks, below site names, so that discovery can use them too.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from residtap.distributed import maybe_gather, output_sharding
from residtap.hooks import (  # noqa: F401 - Step, hidden_of, ... are residtap.engine's API too
    ENGINES,
    Clock,
    Step,
    StopForward,
    hidden_of,
    next_step,
    with_hidden,
)
from residtap.sites import Arch, Site, resolve_site

log = logging.getLogger(__name__)

Tap = Callable[[Tensor, "Step"], "Tensor | None"]



class Engine:
    """All taps on one model. Created and dropped by `tap(...)`; users rarely touch it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.step = Step()
        self._handlers: dict[Site, _SiteHandler] = {}
        self._sessions: list[TapBlock] = []
        self._fired: set[Site] = set()
        self._wanted: set[Site] = set()  # sites of every open block
        self._stop = False
        self.paused = 0  # > 0 while residtap's own validation forward runs: taps ignore it
        self.thread: int | None = None  # the thread whose forwards the open blocks see
        self.any_thread = False  # every open block accepts forwards from any thread
        self.clock: Clock | None = None  # set by timing(model)
        self._callbacks: list[Callable[[Step], None]] = []  # blocks' on_forward, in order
        self._forward_patch: tuple[bool, Any] | None = None  # (had an own forward, it)
        self._signature = inspect.signature(model.forward)
        self._root_handle = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    # -- step bookkeeping ------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.paused:
            return
        clock = self.clock
        t0 = time.perf_counter() if clock is not None else 0.0
        try:
            if (not self.any_thread and not torch.compiler.is_compiling()
                    and threading.get_ident() != self.thread):  # not traceable: eager only
                raise RuntimeError(
                    f"residtap taps are open on this {type(self.model).__name__} in another "
                    f"thread ({self.thread}); this forward runs in thread "
                    f"{threading.get_ident()} and would be read or steered by them. Call the "
                    "model from the thread that opened the `with` block, or give each thread "
                    "its own model"
                )
            if args:  # rare: HF callers pass keywords; bind positionals to their names
                kwargs = {**self._signature.bind_partial(*args, **kwargs).arguments, **kwargs}
            self.step = next_step(self.step, kwargs)
            if self._stop:  # early stop counts the sites that fired in this forward
                self._fired = set()
            for callback in self._callbacks:  # e.g. the probe bank plans its slots
                callback(self.step)
        finally:
            if clock is not None:
                clock.seconds += time.perf_counter() - t0
                clock.hook_calls += 1

    def _site_done(self, site: Site) -> None:
        if self._stop:  # (hashing a Site costs a Python call: only when early stop counts)
            self._fired.add(site)
            if self._wanted <= self._fired:
                raise StopForward

    # -- registration ----------------------------------------------------------------------
    def add(self, block: TapBlock, site: Site, tap_fn: Tap) -> None:
        handler = self._handlers.get(site)
        if handler is None:
            handler = _SiteHandler(self, site)
            self._handlers[site] = handler
        handler.taps.append((block, tap_fn))

    def open(self, block: TapBlock) -> None:
        _check_compiled(self.model)
        me = threading.get_ident()
        if self._sessions and me != self.thread and not (self.any_thread and block.any_thread):
            raise RuntimeError(
                f"residtap taps are already open on this {type(self.model).__name__} in thread "
                f"{self.thread}; open blocks on one model from one thread (or give each thread "
                "its own model)"
            )
        if not self._sessions:
            self.thread = me
        self._sessions.append(block)
        self._recompute()

    def close(self, block: TapBlock) -> None:
        """Remove every tap of `block`, and each handler no tap uses any more."""
        try:
            for site in list(self._handlers):
                handler = self._handlers[site]
                handler.taps = [(b, t) for b, t in handler.taps if b is not block]
                if not handler.taps:
                    del self._handlers[site]
                    handler.remove()
        finally:
            if block in self._sessions:
                self._sessions.remove(block)
            self._recompute()
            if not self._sessions:
                self._root_handle.remove()
                ENGINES.pop(self.model, None)

    def _recompute(self) -> None:
        self._wanted = {s for b in self._sessions for s in b.sites}
        self._stop = bool(self._sessions) and all(b.stop_early for b in self._sessions)
        self.any_thread = bool(self._sessions) and all(b.any_thread for b in self._sessions)
        self._callbacks = [b.on_forward for b in self._sessions if b.on_forward is not None]
        if self._stop and self._forward_patch is None:
            self._catch_stop()
        elif not self._stop and self._forward_patch is not None:
            self._release_stop()

    def _catch_stop(self) -> None:
        """While every open block asked for early stop, the model's forward returns None when
        StopForward ends it: early stop ends that forward, never the user's code after it.
        The model's own `forward` attribute is put back as it was when the last block leaves."""
        model = self.model
        had, original = "forward" in vars(model), model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            except StopForward:
                return None

        self._forward_patch = (had, original)
        model.forward = forward

    def _release_stop(self) -> None:
        had, original = self._forward_patch
        self._forward_patch = None
        if had:
            self.model.forward = original
        else:
            del self.model.forward


class _SiteHandler:
    """The one hook installed at a site; runs the site's taps in order."""

    def __init__(self, engine: Engine, site: Site) -> None:
        self.engine = engine
        self.site = site
        self.taps: list[tuple[TapBlock, Tap]] = []
        module = engine.model.get_submodule(site.path)
        if site.hook == "input":
            self.handle = module.register_forward_pre_hook(self._on_input, with_kwargs=True)
        else:
            self.handle = module.register_forward_hook(self._on_output)
        # Under tensor parallelism a column-parallel module's output is a per-rank slice:
        # taps see it gathered, and a writer's result goes back as this rank's slice.
        self.sharding = output_sharding(module) if site.hook == "output" else None

    def remove(self) -> None:
        self.handle.remove()

    def _run_taps(self, hidden: Any) -> tuple[Tensor, bool]:
        if not isinstance(hidden, Tensor):
            raise TypeError(
                f"site {self.site.name!r} (module {self.site.path!r}) produced "
                f"{type(hidden).__name__}, not a tensor; choose a module whose output is a "
                "tensor or a tuple starting with one"
            )
        changed = False
        step = self.engine.step
        gathered = False
        if self.sharding is not None:
            hidden, gathered = maybe_gather(self.sharding, hidden)
        if self.site.copy:  # the model changes this tensor in place after the module returns
            hidden = hidden.clone()
        flat_shape = None
        if hidden.dim() == 2 and hidden.shape[0] == step.batch * step.length > 0:
            flat_shape = hidden.shape  # (B*T, d) -> (B, T, d): OPT's MLP, BERT-style dense
            hidden = hidden.view(step.batch, step.length, *flat_shape[1:])
        for _, tap_fn in self.taps:
            new = tap_fn(hidden, step)
            if new is not None:
                hidden, changed = new, True
        if flat_shape is not None:
            hidden = hidden.reshape(flat_shape)
        if changed and gathered:
            hidden = self.sharding.local_slice(hidden)
        return hidden, changed

    def _on_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.engine.paused:
            return None
        clock = self.engine.clock
        t0 = time.perf_counter() if clock is not None else 0.0
        try:
            hidden, changed = self._run_taps(hidden_of(output, self.site.field))
            result = with_hidden(output, self.site.field, hidden) if changed else None
        finally:
            if clock is not None:
                clock.seconds += time.perf_counter() - t0
                clock.hook_calls += 1
        self.engine._site_done(self.site)
        return result

    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.engine.paused:
            return None
        clock = self.engine.clock
        t0 = time.perf_counter() if clock is not None else 0.0
        try:
            in_args = bool(args)
            hidden, changed = self._run_taps(args[0] if in_args else kwargs.get("hidden_states"))
        finally:
            if clock is not None:
                clock.seconds += time.perf_counter() - t0
                clock.hook_calls += 1
        self.engine._site_done(self.site)
        if not changed:
            return None
        if in_args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def _check_compiled(model: nn.Module) -> None:
    """Refuse a compiled model whose graphs would ignore taps added or removed after they were
    built: torch.compile does not guard module hooks unless told to."""
    compiled = (hasattr(vars(model).get("forward"), "_torchdynamo_orig_callable")
                or getattr(model, "_compiled_call_impl", None) is not None  # model.compile()
                or vars(model).get("_compiled_call") is not None)  # transformers' auto-compile
    if compiled and torch._dynamo.config.skip_nnmodule_hook_guards:
        raise RuntimeError(
            f"{type(model).__name__}'s forward is compiled while "
            "torch._dynamo.config.skip_nnmodule_hook_guards is True, so its graphs would keep "
            "running taps that were removed, or never run taps added after they were built. "
            "Set torch._dynamo.config.skip_nnmodule_hook_guards = False before compiling (then "
            "adding or removing taps recompiles once)"
        )


def engine_of(model: nn.Module) -> Engine | None:
    """The model's active engine, or None when no tap block is open on it."""
    return ENGINES.get(model)


class TapBlock:
    """A context manager that adds taps to a model's engine and removes them on exit.
    Made by `tap(...)`; capture, probe banks, lenses and steering are built on it."""

    def __init__(
        self,
        model: nn.Module,
        taps: Mapping[str | Site, Tap | Iterable[Tap]],
        *,
        stop_early: bool = False,
        arch: Arch | None = None,
        any_thread: bool = False,
        on_forward: Callable[[Step], None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"expected a torch nn.Module (a Hugging Face model), got {type(model).__name__}"
            )
        if not isinstance(taps, Mapping):
            raise TypeError(
                f"taps must be a mapping of site name -> tap callable, got {type(taps).__name__}"
            )
        self.model = model
        self.stop_early = stop_early
        self.any_thread = any_thread
        self.on_forward = on_forward  # called with the Step before each forward runs
        self._taps: list[tuple[Site, Tap]] = []
        for name, fns in taps.items():
            site = name if isinstance(name, Site) else resolve_site(model, name, arch)
            for fn in [fns] if callable(fns) else list(fns):
                if not callable(fn):
                    raise TypeError(f"tap for site {site.name!r} must be callable, got {fn!r}")
                self._taps.append((site, fn))
        self.sites = {site for site, _ in self._taps}
        self._engine: Engine | None = None

    def __enter__(self) -> TapBlock:
        if self._engine is not None:
            raise RuntimeError("this tap block is already open; make a new one to nest")
        engine = ENGINES.get(self.model)
        if engine is None:
            engine = ENGINES[self.model] = Engine(self.model)
        self._engine = engine
        try:
            for site, fn in self._taps:
                engine.add(self, site, fn)
            engine.open(self)
        except BaseException:
            engine.close(self)
            self._engine = None
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close(self)
        return exc_type is not None and issubclass(exc_type, StopForward)

    @property
    def step(self) -> Step:
        return self._engine.step if self._engine is not None else Step()


def tap(
    model: nn.Module,
    taps: Mapping[str | Site, Tap | Iterable[Tap]],
    *,
    stop_early: bool = False,
    arch: Arch | None = None,
    any_thread: bool = False,
) -> TapBlock:
    """Open a block of taps on `model`: `with tap(model, {"layers.3": fn}): model(**batch)`.

    Threads: taps see only forwards run by the thread that opened the block; a forward of the
    same model from another thread while it is open raises (so two threads never read or
    steer each other's forwards). `any_thread=True` (for an engine that runs the model on a
    worker thread) lets every thread's forwards through, when every open block says so."""
    return TapBlock(model, taps, stop_early=stop_early, arch=arch, any_thread=any_thread)


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks on all of `model`'s modules (used by leak tests)."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
    )


@contextmanager
def timing(model: nn.Module) -> Iterator[Clock]:
    """Time spent inside residtap's hooks on `model` while the block is open (for benchmarks):
    `with bank.attach(model) as run, timing(model) as clock: model.generate(...)`."""
    engine = ENGINES.get(model)
    if engine is None:
        raise RuntimeError(
            f"no residtap taps are open on this {type(model).__name__}: open the tap block "
            "(capture, bank.attach, steer, ...) first, then timing(model) inside it"
        )
    clock, previous = Clock(), engine.clock
    engine.clock = clock
    try:
        yield clock
    finally:
        engine.clock = previous


