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
  model itself is never changed.
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
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from residtap.distributed import maybe_gather, output_sharding
from residtap.sites import Arch, Site, resolve_site

log = logging.getLogger(__name__)

Tap = Callable[[Tensor, "Step"], "Tensor | None"]


class StopForward(Exception):
    """Raised inside the forward to stop it early; the `tap` block that asked for it swallows it."""


@dataclass
class Step:
    """What the engine knows about the forward in progress.

    run:   identifies forwards that start a sequence (no cached tokens), unique in the process;
           the decode steps of one `generate` call share the run of its prefill.
    index: 0 for the first forward of a run, then 1, 2, ... for each decode step.
    past:  tokens already in the KV cache before this forward (0 for a fresh forward).
    batch: rows in this forward (B of its input).
    length: tokens this forward processes (T of its input).
    attention_mask: (B, past + length) mask the model was given, or None.
    cache: id() of the forward's KV cache object, or None (to follow a static cache's length
           from step to step without reading it from the device).
    """

    run: int = -1
    index: int = 0
    past: int = 0
    batch: int = 0
    length: int = 0
    attention_mask: Tensor | None = None
    cache: int | None = None


def next_step(previous: Step, kwargs: Mapping[str, Any]) -> Step:
    """The Step of a forward called with `kwargs`, following `previous`.

    Derived from what the forward really uses, not from how a transformers release names its
    arguments: the KV cache is any argument with `get_seq_length()` (5.23 and older pass it as
    `past_key_values`, 5.24 as `cache`), the tokens already cached are its length; a 2-D
    `attention_mask` (which 5.24 drops when it is all ones) must agree with it. A forward with
    no cached tokens starts a new run. Where the two disagree, or a cache cannot say its length,
    this raises instead of guessing. Only shapes and Python ints are read: no host sync. A
    static cache keeps its length in a device tensor: it is followed from step to step instead
    (see _static_length), read from the device only when first seen mid-sequence.
    """
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    batch, length = tuple(ids.shape[:2]) if isinstance(ids, Tensor) and ids.dim() > 1 else (0, 0)
    cache, cached = _cache_of(kwargs)
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
    if isinstance(cached, Tensor):
        cached = _static_length(cached, cache, mask, length, previous)
    if mask is not None and cached is not None and mask.shape[1] != cached + length:
        raise RuntimeError(
            f"residtap cannot tell which tokens this forward covers (transformers "
            f"{_transformers_version()}): the KV cache holds {cached} tokens and the input has "
            f"{length}, but the attention_mask is {mask.shape[1]} wide (expected "
            f"{cached + length}). Pass an attention_mask covering the cached and the new "
            "tokens, or report this with your transformers version"
        )
    if mask is not None and mask.shape[1] < length:
        raise RuntimeError(
            f"the attention_mask is {mask.shape[1]} wide but the input has {length} tokens "
            f"(transformers {_transformers_version()}); pass a (batch, tokens) mask"
        )
    past = cached if cached is not None else (mask.shape[1] - length if mask is not None else 0)
    key = None if cache is None else id(cache)
    if past == 0:
        return Step(next(_RUN_IDS), 0, 0, batch, length, mask, key)
    return Step(previous.run, previous.index + 1, past, batch, length, mask, key)


_RUN_IDS = itertools.count()  # unique across engines: a re-entered block never joins an old run


def _cache_of(kwargs: Mapping[str, Any]) -> tuple[Any, int | Tensor | None]:
    """(the forward's KV cache, the tokens it holds) whatever keyword carries it; (None, None)
    without a cache. The length is an int, or a 0-d device tensor for a static cache."""
    for key, value in kwargs.items():
        if value is None or isinstance(value, (Tensor, bool, int, float, str)):
            continue
        if hasattr(value, "get_seq_length"):
            return value, value.get_seq_length()
        if isinstance(value, (tuple, list)) and key in ("past_key_values", "cache"):
            first = value[0] if value else None  # legacy cache: ((key, value), ...) per layer
            if isinstance(first, (tuple, list)) and first and isinstance(first[0], Tensor):
                return value, int(first[0].shape[-2])
            if not value:
                return value, 0
        if type(value).__name__.endswith("Cache"):
            raise RuntimeError(
                f"the forward's {key!r} is a {type(value).__name__} without get_seq_length(), "
                f"so residtap cannot tell a decode step from a new sequence (transformers "
                f"{_transformers_version()}); use a standard transformers cache "
                "(DynamicCache, StaticCache)"
            )
    return None, None


def _static_length(cached: Tensor, cache: Any, mask: Tensor | None, length: int,
                   previous: Step) -> int:
    """A static cache's length without reading the device: from the mask's width, or, for a
    one-token step on the cache the previous forward used, from that forward's Step. Only a
    static cache seen for the first time mid-sequence costs one host read."""
    if mask is not None:
        return mask.shape[1] - length
    if length == 1 and previous.cache == id(cache):
        return previous.past + previous.length
    return int(cached)


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:  # pragma: no cover - residtap requires it
        return "not installed"
    return transformers.__version__


def hidden_of(output: Any, field: str | None = None) -> Any:
    """The tensor a module's output stands for: the output itself, a tuple/list's first element,
    or a ModelOutput's `field` (or first entry). The one place that knows these shapes."""
    if field is not None:
        return getattr(output, field, None)
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


def with_hidden(output: Any, field: str | None, hidden: Tensor) -> Any:
    """`output` with the tensor `hidden_of` found replaced by `hidden`."""
    if field is not None:
        output[field] = hidden  # ModelOutput supports item assignment and keeps attrs in sync
        return output
    if isinstance(output, Tensor):
        return hidden
    if isinstance(output, (tuple, list)):
        return type(output)([hidden, *output[1:]])
    raise TypeError(f"cannot replace the hidden state in a {type(output).__name__}")


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
        self._forward_patch: tuple[bool, Any] | None = None  # (had an own forward, it)
        self._signature = inspect.signature(model.forward)
        self._root_handle = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    # -- step bookkeeping ------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.paused:
            return
        if (not self.any_thread and not torch.compiler.is_compiling()
                and threading.get_ident() != self.thread):  # not traceable: eager calls only
            raise RuntimeError(
                f"residtap taps are open on this {type(self.model).__name__} in another thread "
                f"({self.thread}); this forward runs in thread {threading.get_ident()} and would "
                "be read or steered by them. Call the model from the thread that opened the "
                "`with` block, or give each thread its own model"
            )
        if args:  # rare: HF callers pass keywords; bind positionals to their names
            kwargs = {**self._signature.bind_partial(*args, **kwargs).arguments, **kwargs}
        self.step = next_step(self.step, kwargs)
        self._fired = set()

    def _site_done(self, site: Site) -> None:
        self._fired.add(site)
        if self._stop and self._wanted <= self._fired:
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
                _ENGINES.pop(self.model, None)

    def _recompute(self) -> None:
        self._wanted = {s for b in self._sessions for s in b.sites}
        self._stop = bool(self._sessions) and all(b.stop_early for b in self._sessions)
        self.any_thread = bool(self._sessions) and all(b.any_thread for b in self._sessions)
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
        hidden, changed = self._run_taps(hidden_of(output, self.site.field))
        result = with_hidden(output, self.site.field, hidden) if changed else None
        self.engine._site_done(self.site)
        return result

    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.engine.paused:
            return None
        in_args = bool(args)
        hidden, changed = self._run_taps(args[0] if in_args else kwargs.get("hidden_states"))
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


_ENGINES: weakref.WeakKeyDictionary[nn.Module, Engine] = weakref.WeakKeyDictionary()


def engine_of(model: nn.Module) -> Engine | None:
    """The model's active engine, or None when no tap block is open on it."""
    return _ENGINES.get(model)


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
        engine = _ENGINES.get(self.model)
        if engine is None:
            engine = _ENGINES[self.model] = Engine(self.model)
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
