"""The one module that reads transformers' continuous-batching internals.

    problem = unsupported_reason()          # None where this transformers' internals match
    manager = model.init_continuous_batching(generation_config=gc,
                                             continuous_batching_config=serving_config())
    check_manager(manager, steering=True)   # ValueError for settings taps cannot serve
    layout, states = read_forward(manager)  # before each forward (the engine's on_forward)
    finish_after(states["req_3"], tokens=5) # req_3 ends after its 5th generated token

Everything else in residtap.serving sees a `PackedLayout` (residtap.serving.layout) and calls
these functions, so a transformers release that changes its continuous batching breaks this
file and tests/test_serving.py::test_adapter_assumptions, never results. What is relied on
(tested: transformers 5.24.0):

- `manager.batch_processor.inputs_and_outputs.requests_in_batch`, read in the model's root
  pre-hook: the `FutureRequestState`s of the forward about to run, in row order. Each has
  `query_length` rows and `has_new_token` (its last row's logits pick a token); its `.state`
  (`RequestState`) has the `request_id` and `position_offset`, already advanced past this
  forward's rows when the forward starts.
- The prompt is `initial_tokens`, or its first `_true_initial_tokens` after a soft reset (an
  offloaded request re-prefilled with its generated tokens appended to the prompt).
- `RequestState._new_tokens_limit`: `update_and_check_completion` keeps a token while fewer
  than that many are generated and finishes the request at that many (transformers' own
  max_new_tokens rule), so lowering it ends a request through the manager's normal finish:
  blocks freed, a FINISHED output with the tokens kept delivered to its handler.
- `manager.output_router.result_handlers` (request id -> handler), dropped for a request the
  server cancels (the manager drops it only when an output says the request finished).
- `manager.continuous_batching_config` (resolved at init), `manager.num_return_sequences`,
  `manager.pause()`, `batch_processor.scheduler.active_requests / waiting_requests`, and
  `manager._generation_thread`, the thread that runs its forwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Iterator
from typing import Any

from residtap.serving.layout import PackedLayout, Segment

TESTED = "5.24.0"
_STATE_FIELDS = ("request_id", "initial_tokens", "generated_tokens", "position_offset",
                 "_true_initial_tokens", "_new_tokens_limit")
_FUTURE_SLOTS = ("state", "has_new_token", "query_length")
_MANAGER_METHODS = ("add_request", "cancel_request", "register_result_handler", "pause",
                    "start", "stop")


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def unsupported_reason() -> str | None:
    """None when this transformers' continuous batching is laid out as this adapter reads it;
    else one sentence naming the version, what is missing, and what to install."""
    version = transformers_version()
    missing: list[str] = []
    try:
        from transformers.generation.continuous_batching import continuous_api, requests
    except ImportError as err:
        missing.append(f"the continuous_batching package ({err})")
    else:
        future = getattr(requests, "FutureRequestState", None)
        if future is None:
            missing.append("FutureRequestState (a forward's requests in row order)")
        else:
            slots = getattr(future, "__slots__", ())
            missing += [f"FutureRequestState.{s}" for s in _FUTURE_SLOTS if s not in slots]
        state = getattr(requests, "RequestState", None)
        fields = ({f.name for f in dataclasses.fields(state)}
                  if state is not None and dataclasses.is_dataclass(state) else set())
        missing += [f"RequestState.{f}" for f in _STATE_FIELDS if f not in fields]
        manager = getattr(continuous_api, "ContinuousBatchingManager", None)
        missing += [f"ContinuousBatchingManager.{m}()" for m in _MANAGER_METHODS
                    if not hasattr(manager, m)]
        if hasattr(manager, "add_request"):
            params = inspect.signature(manager.add_request).parameters
            missing += [f"add_request({p}=...)" for p in ("request_id", "streaming")
                        if p not in params]
    if not missing:
        return None
    return (f"residtap's serving adapter reads transformers' continuous batching as laid out in "
            f"transformers {TESTED}; transformers {version} lacks {', '.join(missing)}. Install "
            f"transformers>={TESTED},<6 to serve (the rest of residtap works on {version})")


def require_supported() -> None:
    """RuntimeError with unsupported_reason() when this transformers cannot be served."""
    reason = unsupported_reason()
    if reason is not None:
        raise RuntimeError(reason)


def serving_config(*, max_batch_tokens: int | None = None, num_blocks: int | None = None,
                   page_size: int | None = None) -> Any:
    """A ContinuousBatchingConfig that taps can serve: synchronous batching (each forward's
    layout is the batch just prepared), no CUDA graphs (a replayed graph skips Python hooks),
    no prefix sharing (a steered request must not reuse another request's unsteered KV, and
    every prompt row must run). Sizes: None lets transformers choose."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    sizes = {"max_batch_tokens": max_batch_tokens, "num_blocks": num_blocks,
             "page_size": page_size}
    return ContinuousBatchingConfig(allow_block_sharing=False, use_async_batching=False,
                                    use_cuda_graph=False,
                                    **{k: v for k, v in sizes.items() if v is not None})


def check_manager(manager: Any, *, steering: bool = False, capture: bool = False,
                  streams: bool = False) -> None:
    """ValueError naming the setting, for a manager whose forwards taps cannot follow."""
    cls = type(manager).__name__
    if cls != "ContinuousBatchingManager":
        raise TypeError(f"expected a transformers ContinuousBatchingManager (from "
                        f"model.init_continuous_batching(...)), got {cls}")
    config = manager.continuous_batching_config
    fix = ("; create the manager with continuous_batching_config="
           "residtap.serving.transformers_cb.serving_config()")
    if config.use_async_batching:
        raise ValueError("the manager uses asynchronous batching (the next batch is prepared "
                         "while a forward runs), so a forward's rows cannot be matched to its "
                         "requests" + fix)
    graphs = config.use_cuda_graph
    if graphs is True or (isinstance(graphs, (tuple, list)) and any(graphs)):
        raise ValueError("the manager replays CUDA graphs, which skip the Python hooks residtap's "
                         "taps run in" + fix)
    if config.varlen_compile_config is not None or config.decode_compile_config is not None:
        raise ValueError("the manager compiles its forward with torch.compile, which traces "
                         "hooks away" + fix)
    if getattr(manager, "num_return_sequences", 1) != 1:
        raise ValueError(f"the manager forks every request into {manager.num_return_sequences} "
                         "sequences (num_return_sequences); residtap follows requests by id and "
                         "would not know the forks: use num_return_sequences=1")
    if (steering or capture or streams) and config.allow_block_sharing:
        what = ("steering" if steering else "capture" if capture
                else "attention probes (which pool over every token)")
        why = " (a steered request would reuse another's unsteered KV)" if steering else ""
        raise ValueError(f"the manager shares KV blocks between requests with a common prompt "
                         f"prefix, so {what} would miss the shared rows{why}" + fix)


def prompt_length(state: Any) -> int:
    """The request's prompt length (before any soft reset moved generated tokens into it)."""
    return state._true_initial_tokens or len(state.initial_tokens)


def read_forward(manager: Any) -> tuple[PackedLayout, dict[str, Any]]:
    """The layout of the forward about to run, and each of its requests' RequestState by id.
    Host-side ints only; call it before the forward (the engine's on_forward)."""
    processor = manager.batch_processor
    if processor is None:
        raise RuntimeError("the continuous batching manager has no batch processor yet; "
                           "residtap reads a forward's layout only from inside the manager's loop")
    segments: list[Segment] = []
    states: dict[str, Any] = {}
    at = 0
    for future in processor.inputs_and_outputs.requests_in_batch:
        state, q = future.state, future.query_length
        past = state.position_offset - q  # already advanced past this forward's rows
        token = past + q - prompt_length(state) if future.has_new_token else -1
        segments.append(Segment(state.request_id, at, q, past, token))
        states[state.request_id] = state
        at += q
    return PackedLayout(tuple(segments), at), states


def in_manager_thread(manager: Any) -> bool:
    """Is the caller the manager's generation thread, whose forwards it schedules? (Another
    manager, or a plain generate, may run the same model from another thread.)"""
    return threading.current_thread() is manager._generation_thread


def finish_after(state: Any, tokens: int) -> None:
    """End the request once it has generated `tokens` tokens (the manager's own finish: the
    tokens so far are kept and delivered as FINISHED). Call before the update of the forward
    that picks token `tokens - 1`, or any time after it and before the next forward's update."""
    moved = len(state.initial_tokens) - prompt_length(state)  # tokens a soft reset re-prefilled
    state._new_tokens_limit = min(state._new_tokens_limit, max(tokens - moved, 0))


def active_request_ids(manager: Any) -> set[str]:
    """Requests the manager holds (scheduled or waiting), queued ones excepted."""
    processor = manager.batch_processor
    if processor is None:
        return set()
    scheduler = processor.scheduler
    return set(scheduler.active_requests) | set(scheduler.waiting_requests)


def drop_result_handler(manager: Any, request_id: str) -> None:
    """Forget a cancelled request's result handler (a finished one's goes by itself)."""
    router = manager.output_router
    with router._lock:
        router.result_handlers.pop(request_id, None)


@contextlib.contextmanager
def paused(manager: Any) -> Iterator[None]:
    """No forward runs inside this block (the manager's loop waits between forwards)."""
    if manager.is_running():
        with manager.pause():
            yield
    else:
        yield
