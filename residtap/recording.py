"""One recorded tiny forward of a model, and the comparisons discovery and validation make on it.

    rec = record(model, "model.layers")     # 2 x 5 tokens; every module's first input/output
    rec.get("model.layers.0.mlp").output    # cloned when seen: later in-place edits cannot alter it
    feeds(rec, "model.layers.0", "input_layernorm", "self_attn")   # the norm's output is its input

`record` runs the model once with hooks on every module (residtap.hooks.recording_hooks, removed in
`finally`) and keeps, per module, its first input and its output, the order of calls, and which
outputs the model changed in place afterwards (Falcon adds attention into the MLP's output). The
forward leaves the model exactly as it was: transformers 5 installs permanent hidden-state hooks on
the first `output_hidden_states=True` call and 4.57 re-binds each layer's `forward`; both are
undone. A compiled `model.forward` runs eagerly here.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from residtap.hooks import recording_hooks

ATTN = re.compile(r"attention|attn", re.I)
MLP = re.compile(r"mlp|moe|feedforward|feed_forward|ffn", re.I)
NORM = re.compile(r"norm", re.I)



@dataclass
class Call:
    """One module's call in the recorded forward (the first call, if it ran more than once)."""

    path: str
    start: int  # order of the pre-hook
    end: int = -1  # order of the forward hook
    input: Tensor | None = None  # first tensor argument (or hidden_states), cloned
    output: Tensor | None = None  # the tensor hidden_of(output) found, cloned
    live: Tensor | None = None  # the output tensor itself, to see later in-place changes


@dataclass
class Recording:
    """What one tiny forward showed: calls by module path, HF's hidden states and logits."""

    blocks: str  # path of the block list
    n_layers: int
    calls: dict[str, Call]
    hidden_states: tuple[Tensor, ...] | None
    logits: Tensor | None
    mutated: set[str] = field(default_factory=set)  # outputs changed in place after their call

    def block(self, i: int) -> str:
        return f"{self.blocks}.{i}"

    def get(self, path: str | None) -> Call | None:
        return self.calls.get(path) if path else None

    def children_in_order(self, prefix: str) -> list[Call]:
        """Calls of modules under `prefix` (any depth), in call order."""
        dot = prefix + "."
        return sorted((c for p, c in self.calls.items() if p.startswith(dot)),
                      key=lambda c: c.start)


def layer_count(config: Any) -> int | None:
    """The number of blocks a (text) config declares, or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_blocks(model: nn.Module) -> str:
    """Path of the model's list of transformer blocks: the ModuleList of identical modules whose
    length the config gives (the one with most parameters if several). LookupError if none."""
    want = layer_count(getattr(model, "config", None))
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or (want is not None and len(module) != want):
            continue
        size = sum(p.numel() for p in module.parameters())
        found.append((size, -path.count("."), path))
    if not found:
        raise LookupError(
            f"found no list of {want or 'identical'} transformer blocks in "
            f"{type(model).__name__}; pass arch=residtap.Arch(layers=<path of the block list>, "
            "...) or use raw module paths"
        )
    return max(found)[2]


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    if args and isinstance(args[0], Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    if isinstance(value, Tensor):
        return value
    return next((a for a in args if isinstance(a, Tensor)), None)


def _output_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def probe_inputs(model: nn.Module) -> dict[str, Tensor]:
    """Two rows of five tokens on the model's input device, plus an all-ones mask."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    device = weight.device if isinstance(weight, Tensor) else next(model.parameters()).device
    vocab = int(weight.shape[0]) if isinstance(weight, Tensor) else 8
    ids = (torch.arange(10, device=device).view(2, 5) * 7 + 3) % max(vocab, 1)  # (2, 5)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _plain(x: Tensor | None) -> Tensor | None:
    """A detached, cloned plain tensor; a DTensor (tensor parallelism) is gathered in full (a
    collective: every rank records the same calls in the same order)."""
    if x is None:
        return None
    full = getattr(x, "full_tensor", None)
    if callable(full):
        x = full()
    return x.detach().clone()


def _recorder(calls: dict[str, Call]):
    """(on_call, on_return) callbacks filling `calls` with each module's first call."""
    counter = [0]

    def on_call(path: str, args: tuple, kwargs: dict) -> None:
        counter[0] += 1
        if path not in calls:
            calls[path] = Call(path, counter[0], input=_plain(_first_tensor(args, kwargs)))

    def on_return(path: str, output: Any) -> None:
        counter[0] += 1
        call = calls.get(path)
        if call is not None and call.end < 0:
            call.end = counter[0]
            y = _output_tensor(output)
            if y is not None:
                call.output, call.live = _plain(y), y

    return on_call, on_return


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_INSTALLED_FLAG = "_output_capturing_hooks_installed"


@contextmanager
def _hooks_as_they_were(model: nn.Module) -> Iterator[None]:
    """Leave the model's hooks exactly as they were: transformers 5.x installs permanent
    hidden-state hooks on the first `output_hidden_states=True` call, which our one recording
    forward must not leave behind (they would slow every later forward). Hooks and flags that
    appear during the block are removed (and the `forward` attribute transformers 4.57 sets on
    each layer it records); transformers installs them again when the user asks."""
    modules = list(model.modules())
    before = [{name: set(getattr(m, name, {})) for name in _HOOK_DICTS} for m in modules]
    own = [{a for a in (_INSTALLED_FLAG, "forward") if a in vars(m)} for m in modules]
    try:
        yield
    finally:
        for m, keys, attrs in zip(modules, before, own, strict=True):
            for name, old in keys.items():
                table = getattr(m, name, None)
                for key in [k for k in (table or {}) if k not in old]:
                    del table[key]
            for attr in {_INSTALLED_FLAG, "forward"} - attrs:  # 4.57 re-binds forward
                if attr in vars(m):
                    delattr(m, attr)


def _eager():
    """Run a compiled `model.forward` eagerly: the recording forward must not add graphs."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@torch.no_grad()
def record(model: nn.Module, blocks: str) -> Recording:
    """Run `model` once on `probe_inputs` with recording hooks (all removed afterwards)."""

    calls: dict[str, Call] = {}
    inputs = probe_inputs(model)
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        inputs["use_cache"] = False
    with _hooks_as_they_were(model), recording_hooks(model, *_recorder(calls)), _eager():
        out = model(**inputs, output_hidden_states=True, return_dict=True)
    mutated = {p for p, c in calls.items()
               if c.live is not None and c.live.shape == c.output.shape
               and not torch.equal(_plain(c.live), c.output)}  # fmt: skip
    for c in calls.values():
        c.live = None
    hidden = getattr(out, "hidden_states", None)
    logits = getattr(out, "logits", None)
    return Recording(blocks, len(model.get_submodule(blocks)), calls,
                     tuple(_plain(h) for h in hidden) if hidden is not None else None,
                     _plain(logits), mutated)


def close(a: Tensor | None, b: Tensor | None) -> bool:
    """Same values up to the dtypes' rounding, relative to b's size; shapes may differ only in
    how tokens are flattened ((B*T, d) vs (B, T, d))."""
    if a is None or b is None or a.numel() != b.numel() or a.shape[-1] != b.shape[-1]:
        return False
    exact = a.dtype in (torch.float32, torch.float64) and b.dtype in (torch.float32, torch.float64)
    tol = 1e-4 if exact else 3e-2
    a, b = a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()
    return bool((a - b).norm() <= tol * b.norm() + 1e-6)


def relative(path: str, block: str) -> str:
    return path[len(block) + 1:]


def kind_of(name: str, cls: str, has_params: bool = True) -> str | None:
    """'norm', 'attn', 'mlp' or None for a block child called `name` of class `cls`. The class
    name decides; the attribute name only for a module with parameters (so a Dropout called
    `post_attention_dropout` is not attention)."""
    for kind, pattern in (("norm", NORM), ("attn", ATTN), ("mlp", MLP)):
        if pattern.search(cls):
            return kind
    if not has_params or cls in ("Linear", "Embedding", "Conv1D"):
        return None
    for kind, pattern in (("norm", NORM), ("attn", ATTN), ("mlp", MLP)):
        if pattern.search(name):
            return kind
    return None


def sublayers(rec: Recording, model: nn.Module, i: int = 0) -> dict[str, list[str]]:
    """Direct children of block `i` by kind ('attn', 'mlp', 'norm'), in call order, as paths
    relative to the block. Structure only (class and attribute names)."""
    block = rec.block(i)
    kinds: dict[str, list[str]] = {"attn": [], "mlp": [], "norm": []}
    children = model.get_submodule(block).named_children()
    called = [(rec.calls[f"{block}.{n}"].start, n, m) for n, m in children
              if f"{block}.{n}" in rec.calls]
    for _, name, module in sorted(called, key=lambda t: t[0]):
        kind = kind_of(name, type(module).__name__, any(True for _ in module.parameters()))
        if kind is not None:
            kinds[kind].append(name)
    return kinds


def feeds(rec: Recording, block: str, norm: str, target: str | None) -> bool:
    """True when the norm's output is the input of `target` (relative to the block), called
    after the norm returned; with target None, of the next module called after it."""
    call = rec.get(f"{block}.{norm}")
    if call is None or call.output is None:
        return False
    if target is None:
        later = [c for c in rec.children_in_order(block) if c.start > call.end]
        return bool(later) and close(later[0].input, call.output)
    t = rec.get(f"{block}.{target}")
    return t is not None and t.start > call.end and close(t.input, call.output)
