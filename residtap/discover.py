"""Find a decoder's parts from its modules and one tiny forward, and prove them against HF.

    rec = record(model, "model.layers")          # one forward of 2 x 5 tokens, hooks removed
    parts = discover(rec, model.config)          # {"ln1": "input_layernorm", "attn": ...}
    checks = validate(rec, arch, model.config)   # {"embed": "validated", "ln2": "<why not>"}

`record` runs the model once with owned hooks on every module (removed in `finally`) and keeps,
per module, its first input and its output (cloned when they are seen, so a later in-place
change cannot alter them), the order of calls, and which outputs the model changed in place
afterwards (Falcon adds attention into the MLP's output tensor). Everything else is plain
tensor comparison on that one recording:

- blocks: the ModuleList of identical modules the config's layer count names;
- ln1 / ln2: the norm whose output is the input of the attention / MLP module that is called
  right after it; a parallel block whose MLP reads ln1 has no ln2 of its own;
- attn / mlp: the module whose output the block adds to its residual stream, found by the
  residual identity it satisfies (sequential pre-norm, parallel, post-LN, Gemma-style output
  norms, Bloom's inner projections, Granite's residual multiplier);
- final norm and projection: the modules called between the last block and the unembedding;
- the logit transform: a soft-cap, scale or divisor named in the config, kept only if the
  readout of the last block then equals the model's own logits.

`validate` checks any Arch (table, discovered or the user's) the same way: embed equals HF's
`hidden_states[0]`, every block equals `hidden_states[i+1]`, the final norm equals the last
entry, the readout equals the logits, and each sublayer satisfies its identity.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from residtap.hooks import recording_hooks

if TYPE_CHECKING:
    from residtap.arch import Arch

_ATTN = re.compile(r"attention|attn", re.I)
_MLP = re.compile(r"mlp|moe|feedforward|feed_forward|ffn", re.I)
_NORM = re.compile(r"norm", re.I)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
RESIDUAL_SCALES = ("residual_multiplier",)


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
    import inspect

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


# ------------------------------------------------------------------------------ comparisons


def close(a: Tensor | None, b: Tensor | None) -> bool:
    """Same values up to the dtypes' rounding, relative to b's size; shapes may differ only in
    how tokens are flattened ((B*T, d) vs (B, T, d))."""
    if a is None or b is None or a.numel() != b.numel() or a.shape[-1] != b.shape[-1]:
        return False
    exact = a.dtype in (torch.float32, torch.float64) and b.dtype in (torch.float32, torch.float64)
    tol = 1e-4 if exact else 3e-2
    a, b = a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()
    return bool((a - b).norm() <= tol * b.norm() + 1e-6)


def _rel(path: str, block: str) -> str:
    return path[len(block) + 1:]


def _scales(config: Any) -> list[tuple[str | None, float]]:
    out: list[tuple[str | None, float]] = [(None, 1.0)]
    for key in RESIDUAL_SCALES:
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and value not in (0, 1):
            out.append((key, float(value)))
    return out


# ------------------------------------------------------------------------------ discovery


def kind_of(name: str, cls: str, has_params: bool = True) -> str | None:
    """'norm', 'attn', 'mlp' or None for a block child called `name` of class `cls`. The class
    name decides; the attribute name only for a module with parameters (so a Dropout called
    `post_attention_dropout` is not attention)."""
    for kind, pattern in (("norm", _NORM), ("attn", _ATTN), ("mlp", _MLP)):
        if pattern.search(cls):
            return kind
    if not has_params or cls in ("Linear", "Embedding", "Conv1D"):
        return None
    for kind, pattern in (("norm", _NORM), ("attn", _ATTN), ("mlp", _MLP)):
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


def _pick_norm(rec: Recording, block: str, norms: list[str], target: str | None,
               hint: re.Pattern) -> str | None:
    """Among the norms feeding `target`, the one named like it (ln_attn / ln_mlp), else the
    one called last before it."""
    fitting = [n for n in norms if target and feeds(rec, block, n, target)]
    named = [n for n in fitting if hint.search(n)]
    return (named or fitting or [None])[-1]


def _candidates(rec: Recording, block: str, module: str) -> list[str]:
    """What a sublayer may add to the residual: the module's output, an output norm applied to
    it (Gemma 2, OLMo-2), or the last linear layer inside it (Bloom adds the residual inside)."""
    call = rec.get(f"{block}.{module}")
    if call is None or call.output is None:
        return []
    out = [module]
    for c in rec.children_in_order(block):
        if (c.start > call.end and c.path.count(".") == block.count(".") + 1
                and _NORM.search(c.path.rsplit(".", 1)[-1]) and close(c.input, call.output)):
            out.insert(0, _rel(c.path, block))
    inner = [c for c in rec.children_in_order(f"{block}.{module}")
             if c.output is not None and c.output.shape[-1] == call.output.shape[-1]
             and not any(rec.calls[p].start < c.start < rec.calls[p].end
                         for p in rec.calls if p.startswith(c.path + "."))]
    if inner:
        out.append(_rel(inner[-1].path, block))
    return out


def residual_fit(rec: Recording, attn: str | None, mlp: str | None, config: Any
                 ) -> tuple[str | None, str | None, str | None]:
    """(attn, mlp, residual scale attribute): the outputs block 0 adds to its residual stream,
    among the candidates of the given sublayer modules; None where none fits (see _sum_check).
    The scale is a config attribute (Granite's residual_multiplier) or None."""
    block = rec.block(0)
    best: tuple[str | None, str | None, str | None] = (None, None, None)
    for key, _ in _scales(config):
        for a in _candidates(rec, block, attn) if attn else []:
            for m in [*(_candidates(rec, block, mlp) if mlp else []), None]:
                a_ok, m_ok = _sum_check(rec, 0, _Trial(a, m, key), config)
                if a_ok and m_ok:
                    return a, m, key
                if a_ok and best[0] is None:
                    best = (a, None, key)
    return best


@dataclass(frozen=True)
class _Trial:
    attn: str | None
    mlp: str | None
    residual_scale: str | None


def is_parallel(rec: Recording, arch: Any, config: Any) -> bool:
    """True when attention and MLP both read the block's input (out = x + a + m, and x + a is
    never formed)."""
    block = rec.block(0)
    x = rec.get(block).input
    ta = rec.get(f"{block}.{arch.attn}").output if arch.attn else None
    if ta is None or ta.numel() != x.numel():
        return False
    mid = x + _scale(arch, config) * ta.reshape(x.shape)
    return not any(close(c.input, mid) for c in rec.children_in_order(block))


def discover(rec: Recording, model: nn.Module) -> dict[str, Any]:
    """Arch fields for `model` from its recording: paths relative to the block (sublayers) and
    to the model root (block list, final norm, projection), plus why any part is missing."""
    config = model.config
    kinds = sublayers(rec, model)
    block = rec.block(0)
    notes: dict[str, str] = {}
    attn = kinds["attn"][0] if len(kinds["attn"]) == 1 else None
    mlp = kinds["mlp"][0] if len(kinds["mlp"]) == 1 else None
    if attn is None:
        notes["attn"] = f"block children look like attention: {kinds['attn'] or 'none'}"
    if mlp is None:
        notes["mlp"] = f"block children look like an MLP: {kinds['mlp'] or 'none'}"
    ln1 = _pick_norm(rec, block, kinds["norm"], attn, _ATTN)
    ln2 = _pick_norm(rec, block, [n for n in kinds["norm"] if n != ln1], mlp, _MLP)
    if ln1 is None:
        notes["ln1"] = "no norm feeds attention (it reads the residual stream itself)"
    if ln2 is None:
        shared = ln1 is not None and mlp is not None and close(
            rec.get(f"{block}.{mlp}").input, rec.get(f"{block}.{ln1}").output)
        notes["ln2"] = ("parallel block: the MLP reads ln1's output too; read layers.{i}.ln1"
                        if shared else "no norm feeds the MLP")
    fit_attn, fit_mlp, scale = residual_fit(rec, attn, mlp, config)
    for part, found in (("attn", fit_attn), ("mlp", fit_mlp)):
        if found is None and part not in notes:
            notes[part] = "no output of this sublayer adds up with the block's residual stream"
    norm, project = readout_chain(rec, model)
    return dict(layers=rec.blocks, final_norm=norm, attn=fit_attn, mlp=fit_mlp, ln1=ln1,
                ln2=ln2, project_out=project, residual_scale=scale,
                notes=tuple(sorted(notes.items())))


def readout_chain(rec: Recording, model: nn.Module) -> tuple[str | None, str | None]:
    """(final norm, projection) paths: modules called after the last block returned and before
    the unembedding, outermost first (OPT-350m: no norm, `project_out`)."""
    last = rec.get(rec.block(rec.n_layers - 1))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_paths = {p for p, m in model.named_modules() if head is not None and m is head}
    head_start = min((rec.calls[h].start for h in head_paths if h in rec.calls), default=None)
    chain: list[Call] = []
    for call in sorted(rec.calls.values(), key=lambda c: c.start):
        if call.start <= last.end or (head_start is not None and call.start >= head_start):
            continue
        if any(call.path.startswith(c.path + ".") for c in chain):
            continue
        chain.append(call)
    norm = next((c.path for c in reversed(chain) if _NORM.search(c.path.rsplit(".", 1)[-1])
                 or _NORM.search(type(model.get_submodule(c.path)).__name__)), None)
    linear = [c.path for c in chain if isinstance(model.get_submodule(c.path), nn.Linear)]
    return norm, (linear[-1] if linear else None)


# ------------------------------------------------------------------------------ validation


def logit_transform(config: Any, arch: Arch) -> tuple[float | None, float]:
    """(soft-cap, multiplier) the Arch applies after the unembedding."""
    def value(attr):
        v = getattr(config, attr, None) if attr else None
        return float(v) if isinstance(v, (int, float)) else None

    cap = value(arch.logit_softcap)
    scale = 1.0
    if value(arch.logit_scale) is not None:
        scale *= value(arch.logit_scale)
    if value(arch.logit_divisor):
        scale /= value(arch.logit_divisor)
    return cap, scale


def readout(model: nn.Module, arch: Arch, norm: nn.Module | None, project: nn.Module | None,
            hidden: Tensor) -> Tensor:
    """Logits the Arch's readout gives for `hidden` (..., d), in float32."""
    head = model.get_output_embeddings()
    h = hidden.to(head.weight.dtype)
    if norm is not None:
        h = norm(h)
    if project is not None:
        h = project(h)
    logits = head(h).float()
    cap, scale = logit_transform(model.config, arch)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits * scale


def validate(rec: Recording, model: nn.Module, arch: Arch, paths: dict[str, str | None]
             ) -> dict[str, str]:
    """Per part ('embed', 'layers', 'norm', 'logits', 'ln1', 'ln2', 'attn', 'mlp'): 'validated'
    or why not. `paths` holds the absolute paths of 'final_norm' and 'project_out'."""
    hs, L = rec.hidden_states, rec.n_layers
    result: dict[str, str] = {}
    first, last = rec.get(rec.block(0)), rec.get(rec.block(L - 1))

    def check(part: str, ok: bool, why: str) -> None:
        result[part] = "validated" if ok else why

    if hs is None or len(hs) != L + 1:
        n = "none" if hs is None else len(hs)
        why = f"the model returned {n} hidden states for {L} blocks, so this was not checked"
        result.update(embed=why, layers=why)
    else:
        check("embed", close(first.input, hs[0]), "the input of block 0 differs from "
              "hidden_states[0]")
        bad = [i for i in range(L - 1) if not close(rec.get(rec.block(i)).output, hs[i + 1])]
        check("layers", not bad, f"block outputs differ from hidden_states[i+1] at {bad}")
    norm_call = rec.get(paths.get("final_norm"))
    if arch.final_norm is None:
        result["norm"] = "this model has no final norm"
    elif norm_call is None:
        result["norm"] = f"the final norm {paths.get('final_norm')!r} was not called"
    else:
        ok = close(norm_call.input, last.output) and (hs is None or close(norm_call.output, hs[L]))
        check("norm", ok, "the final norm's input is not the last block's output, or its "
              "output is not HF's last hidden state")
    if rec.logits is not None and hasattr(model, "get_output_embeddings"):
        norm = model.get_submodule(paths["final_norm"]) if paths.get("final_norm") else None
        project = model.get_submodule(paths["project_out"]) if paths.get("project_out") else None
        with torch.no_grad():
            got = readout(model, arch, norm, project, last.output)
        check("logits", close(got, rec.logits), "the readout of the last block (final norm, "
              "projection, unembedding, logit transform) differs from the model's logits")
    _validate_sublayers(rec, model, arch, result)
    return result


def _validate_sublayers(rec: Recording, model: nn.Module, arch: Arch, result: dict) -> None:
    notes = dict(arch.notes)
    kinds = sublayers(rec, model)
    attn_module = kinds["attn"][0] if len(kinds["attn"]) == 1 else None
    mlp_module = kinds["mlp"][0] if len(kinds["mlp"]) == 1 else None
    for part in ("ln1", "ln2", "attn", "mlp"):
        if getattr(arch, part) is None:
            result[part] = notes.get(part, f"this architecture has no {part}")
    for i in range(rec.n_layers):
        block = rec.block(i)
        if arch.ln1 is not None and not feeds(rec, block, arch.ln1, attn_module):
            result.setdefault("ln1", f"{arch.ln1!r} does not feed attention in block {i}")
        if arch.ln2 is not None and (not feeds(rec, block, arch.ln2, mlp_module) or (
                attn_module is not None and feeds(rec, block, arch.ln2, attn_module))):
            result.setdefault("ln2", f"{arch.ln2!r} does not feed the MLP in block {i}")
        if arch.attn is None and arch.mlp is None:
            continue
        a, m = _sum_check(rec, i, arch, model.config)
        if arch.attn is not None and not a:
            result.setdefault("attn", f"{arch.attn!r} does not add up with the residual "
                              f"stream of block {i}")
        if arch.mlp is not None and not m:
            result.setdefault("mlp", f"{arch.mlp!r} does not add up with the residual "
                              f"stream of block {i}")
    for part in ("ln1", "ln2", "attn", "mlp"):
        result.setdefault(part, "validated")


def _scale(arch: Any, config: Any) -> float:
    value = getattr(config, arch.residual_scale, 1.0) if arch.residual_scale else 1.0
    return float(value) if isinstance(value, (int, float)) else 1.0


def _sum_check(rec: Recording, i: int, arch: Any, config: Any) -> tuple[bool, bool]:
    """Whether the Arch's attn / mlp outputs (a, m) satisfy a residual identity in block i,
    with x the block's input, s the residual scale and "seen" any module input in the block or
    its output: parallel out = x + s(a + m); sequential x + s a seen, then b + s m seen, with
    b = x + s a (pre-norm) or a norm's output of it (post-LN: OPT-350m, BERT)."""
    block = rec.block(i)
    x, out = rec.get(block).input, rec.get(block).output
    ta = rec.get(f"{block}.{arch.attn}").output if arch.attn else None
    tm = rec.get(f"{block}.{arch.mlp}").output if arch.mlp else None
    sums = [c.input for c in rec.children_in_order(block)] + [out]
    scale = _scale(arch, config)
    if ta is None or ta.numel() != x.numel():
        return False, False
    ta = ta.reshape(x.shape)
    mid = x + scale * ta
    a_ok = any(close(t, mid) for t in sums)
    if tm is not None and tm.numel() == x.numel():
        tm = tm.reshape(x.shape)
        if close(out, mid + scale * tm):
            swapped = not a_ok and any(close(t, x + scale * tm) for t in sums)
            return not swapped, not swapped  # x + m is formed first: attn and mlp swapped
    if tm is None or tm.numel() != x.numel() or not a_ok:
        return a_ok, False
    bases = [mid] + [c.output for c in rec.children_in_order(block)
                     if c.output is not None and c.input is not None and close(c.input, mid)]
    return True, any(close(t, b.reshape(x.shape) + scale * tm) for b in bases for t in sums)
