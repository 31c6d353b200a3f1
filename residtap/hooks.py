"""The engine's plumbing, below site names: what a forward is (Step), how module outputs hold
their hidden state, the registry of engines and the recording hooks discovery uses.

    step = next_step(previous, forward_kwargs)   # run, index, past, batch, length, mask
    hidden_of(output)                            # the tensor a module's output stands for

`residtap.engine` builds the tap blocks on top; discovery (`residtap.discover`) and validation
(`residtap.arch`) use this module directly, so they need no site names. The engine is these
two files: no other module registers hooks (tests/test_structure.py checks it).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


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
    packed: None for a forward of one sequence per row. For tokens of several sequences packed
           along one axis (continuous batching: input (1, N), boundaries in `cu_seq_lens_q`):
           True, then the serving adapter's `residtap.serving.PackedLayout` (which rows belong
           to which request, at which absolute positions) once its `on_forward` has run.
    """

    run: int = -1
    index: int = 0
    past: int = 0
    batch: int = 0
    length: int = 0
    attention_mask: Tensor | None = None
    cache: int | None = None
    packed: Any = None


@dataclass
class Clock:
    """Time spent inside residtap's hooks (the root pre-hook with every per-forward callback,
    and every site handler with its taps) while `timing(model)` is open."""

    seconds: float = 0.0
    hook_calls: int = 0


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
    if kwargs.get("cu_seq_lens_q") is not None:  # packed: no one cache length applies
        return Step(next(_RUN_IDS), 0, 0, batch, length, None, None, packed=True)
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


# model -> its Engine while any tap block is open on it (residtap.engine adds and removes)
ENGINES: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


class paused:
    """Taps of an engine open on the model ignore the forwards run inside this block
    (residtap's own validation forward)."""

    def __init__(self, model: nn.Module) -> None:
        self.engine = ENGINES.get(model)

    def __enter__(self) -> None:
        if self.engine is not None:
            self.engine.paused += 1

    def __exit__(self, *exc: Any) -> None:
        if self.engine is not None:
            self.engine.paused -= 1


@contextmanager
def recording_hooks(model: nn.Module, on_call: Callable[[str, tuple, dict], None],
                    on_return: Callable[[str, Any], None]) -> Iterator[None]:
    """Hooks on every submodule for one recording forward (residtap.discover):
    `on_call(path, args, kwargs)` before, `on_return(path, output)` after each module runs.
    Owned here like every other hook residtap adds, and removed in `finally`."""
    handles = []
    try:
        for path, module in model.named_modules():
            if not path:
                continue
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, path=path: on_call(path, a, k), with_kwargs=True))
            handles.append(module.register_forward_hook(
                lambda m, a, k, out, path=path: on_return(path, out), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
