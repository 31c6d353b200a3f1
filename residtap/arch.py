"""Where a model keeps its parts: one table of overrides, discovery for everything else, and
validation of either on first use.

    finding = find(model)            # Finding(arch=Arch(...), origin="discovered", checks=...)
    finding.checks["ln2"]            # 'validated', or why layers.{i}.ln2 is refused

`ARCHITECTURES` is the only table keyed by `model_type`: sites, the lens readout and the cost
counters all read the same entry. A model type it does not list is discovered from its module
structure and one tiny forward (residtap.recording, residtap.discover). Either way, the parts
are then proved on that forward against the model's own `output_hidden_states` and logits
(residtap.validate), once per model object; a part that fails is refused by name when a site
asks for it, never read wrongly.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from torch import nn

from residtap.discover import discover
from residtap.hooks import paused
from residtap.recording import find_blocks, kind_of, record
from residtap.validate import validate

log = logging.getLogger(__name__)

PARTS = ("embed", "layers", "norm", "logits", "ln1", "attn", "ln2", "mlp")


@dataclass(frozen=True)
class Arch:
    """Where an architecture keeps its parts. `layers`, `final_norm` and `project_out` are
    paths relative to the base model (`model.base_model`) or to the model itself; `attn`, `mlp`,
    `ln1` and `ln2` are relative to a block. A part an architecture lacks is None, and asking
    for its site is an error (`notes` may say why).

    attn / mlp:     the module whose output the block adds to its residual stream
    ln1 / ln2:      the norm whose output is the input of attention / of the MLP
    project_out:    a module applied after the final norm, before the unembedding (OPT-350m)
    logit_softcap:  config attribute c of a final soft-cap, logits = c * tanh(logits / c)
    logit_scale:    config attribute multiplying the logits (Cohere's logit_scale)
    logit_divisor:  config attribute dividing the logits (Granite's logits_scaling)
    residual_scale: config attribute scaling what attn / mlp add (Granite's residual_multiplier)
    flat:           kept for compatibility; the engine shows (B*T, d) outputs as (B, T, d) itself
    """

    layers: str
    final_norm: str | None
    attn: str | None
    mlp: str | None
    ln1: str | None
    ln2: str | None
    flat: tuple[str, ...] = ()
    project_out: str | None = None
    logit_softcap: str | None = None
    logit_scale: str | None = None
    logit_divisor: str | None = None
    residual_scale: str | None = None
    notes: tuple[tuple[str, str], ...] = ()


_LLAMA_LIKE = Arch(
    "layers", "norm", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm"
)
# Gemma 2/3 normalise each sublayer's output before the residual add; what is added is the
# output of post_attention_layernorm / post_feedforward_layernorm, so attn/mlp read those.
_GEMMA = Arch(
    "layers", "norm", "post_attention_layernorm", "post_feedforward_layernorm",
    "input_layernorm", "pre_feedforward_layernorm", logit_softcap="final_logit_softcapping",
)
_BERT = Arch("encoder.layer", None, "attention.output.dense", "output.dense", None,
             "attention.output.LayerNorm", notes=(("ln1", "post-LN: attention reads the "
                                                   "residual stream itself"),))


def _opt(config: Any) -> Arch:
    """OPT: pre-LN (125m, 1.3b+) or post-LN with projected embeddings (350m)."""
    project = "decoder.project_out" if config.word_embed_proj_dim != config.hidden_size else None
    if getattr(config, "do_layer_norm_before", True):
        final = None if getattr(config, "_remove_final_layer_norm", False) else (
            "decoder.final_layer_norm")
        return Arch("decoder.layers", final, "self_attn", "fc2", "self_attn_layer_norm",
                    "final_layer_norm", project_out=project)
    return Arch("decoder.layers", None, "self_attn", "fc2", None, "self_attn_layer_norm",
                project_out=project, notes=(
                    ("ln1", "post-LN OPT (do_layer_norm_before=False): attention reads the "
                            "residual stream itself"),
                    ("norm", "post-LN OPT has no final norm")))


# model_type -> parts (or a function of the config). Explicit entries override discovery;
# they are validated like everything else.
ARCHITECTURES: dict[str, Arch | Callable[[Any], Arch]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gpt2": Arch("h", "ln_f", "attn", "mlp", "ln_1", "ln_2"),
    "gpt_neox": Arch("layers", "final_layer_norm", "attention", "mlp", "input_layernorm",
                     "post_attention_layernorm"),
    "opt": _opt,
    "bert": _BERT,
    "roberta": _BERT,
}

_TRANSFORM_FIELDS = {"final_logit_softcapping": "logit_softcap", "logit_scale": "logit_scale",
                     "logits_scaling": "logit_divisor"}


@dataclass
class Finding:
    """A model's parts, how they were found and what validation said.

    origin: 'table' (ARCHITECTURES), 'discovered' (module structure + one forward) or 'given'
            (an Arch passed by the caller)
    paths:  absolute module paths of 'layers', 'final_norm' and 'project_out' (or None)
    checks: per part in PARTS, 'validated', 'unchecked: <why>' (usable) or why it is refused
    copy:   sublayer parts whose output tensor the model changes in place after the module
            returns (Falcon's MLP output); the engine copies them before taps keep them"""

    arch: Arch
    origin: Literal["table", "discovered", "given"]
    paths: dict[str, str | None]
    checks: dict[str, str]
    copy: frozenset[str] = field(default_factory=frozenset)

    def usable(self, part: str) -> bool:
        status = self.checks.get(part, "")
        return status == "validated" or status.startswith("unchecked")

    def refusal(self, part: str) -> str:
        return self.checks.get(part, f"{part} was not found")


_FINDINGS: weakref.WeakKeyDictionary[nn.Module, dict[Arch | None, Finding]] = (
    weakref.WeakKeyDictionary()
)


def find(model: nn.Module, arch: Arch | None = None) -> Finding:
    """The model's parts (from `arch`, the table or discovery), validated on first use."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected a torch nn.Module (a Hugging Face model), got {type(model).__name__}; "
            "load one with transformers' from_pretrained"
        )
    if arch is not None and not isinstance(arch, Arch):
        raise TypeError(f"arch must be a residtap.Arch, got {type(arch).__name__}")
    cache = _FINDINGS.setdefault(model, {})
    if arch not in cache:
        cache[arch] = _find(model, arch)
    return cache[arch]


def table_entry(model: nn.Module) -> Arch | None:
    """The ARCHITECTURES entry for the model's config, or None."""
    config = getattr(model, "config", None)
    entry = ARCHITECTURES.get(getattr(config, "model_type", None))
    return entry(config) if callable(entry) else entry


def _find(model: nn.Module, arch: Arch | None) -> Finding:
    origin: Literal["table", "discovered", "given"] = "given"
    if arch is None:
        arch = table_entry(model)
        origin = "table"
    if arch is None:
        origin = "discovered"
    layers = locate(model, arch.layers) if arch is not None else find_blocks(model)
    if _on_meta(model):
        arch = arch or structural_arch(model, layers)
        why = "unchecked: the model's weights are on the meta device"
        return Finding(arch, origin, _paths(model, arch, layers), dict.fromkeys(PARTS, why))
    with paused(model):
        rec = record(model, layers)
    if arch is None:
        fields_ = discover(rec, model)
        arch = Arch(**fields_, **_transforms(model.config))
    paths = _paths(model, arch, layers)
    checks = validate(rec, model, arch, paths)
    for part, why in arch.notes:
        if part in ("norm",) and arch.final_norm is None:
            checks[part] = why
    block = rec.block(0)
    copy = frozenset(p for p in ("ln1", "ln2", "attn", "mlp")
                     if getattr(arch, p) and f"{block}.{getattr(arch, p)}" in rec.mutated)
    finding = Finding(arch, origin, paths, checks, copy)
    bad = {p: s for p, s in checks.items() if not finding.usable(p)}
    log.info("%s: parts %s (%s); refused: %s", type(model).__name__, origin,
             ", ".join(f"{f.name}={getattr(arch, f.name)!r}" for f in fields(arch)
                       if getattr(arch, f.name)), bad or "none")
    return finding


def _transforms(config: Any) -> dict[str, str]:
    out = {}
    for attr, name in _TRANSFORM_FIELDS.items():
        value = getattr(config, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            out[name] = attr
    return out


def _paths(model: nn.Module, arch: Arch, layers: str) -> dict[str, str | None]:
    return {"layers": layers,
            "final_norm": locate(model, arch.final_norm) if arch.final_norm else None,
            "project_out": locate(model, arch.project_out, optional=True)
            if arch.project_out else None}  # fmt: skip


def locate(model: nn.Module, rel: str, optional: bool = False) -> str | None:
    """Absolute module path of `rel`, a path relative to the base model or to the model."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (f"{prefix}.{rel}" if prefix else None, rel):
        if candidate and modules.get(candidate) is not None:
            return candidate
    ends = sorted((p for p in modules if p.endswith("." + rel) and modules[p] is not None),
                  key=len)
    if ends:
        return ends[0]
    if optional:
        return None
    raise LookupError(
        f"{type(model).__name__} has no module {rel!r} (looked under the base model "
        f"{prefix!r} and the model itself); pass arch=residtap.Arch(...) with paths from "
        "model.named_modules()"
    )


def structural_arch(model: nn.Module, layers: str) -> Arch:
    """Parts from class and attribute names only (no forward): used where the model cannot run,
    e.g. on the meta device for the cost calculator. Never validated."""
    block = model.get_submodule(layers)[0]
    names = {"attn": [], "mlp": [], "norm": []}
    for name, child in block.named_children():
        kind = kind_of(name, type(child).__name__,
                                any(True for _ in child.parameters()))
        if kind is not None:
            names[kind].append(name)
    one = {k: (v[0] if len(v) == 1 else None) for k, v in names.items()}
    return Arch(layers, None, one["attn"], one["mlp"], None, None)


def _on_meta(model: nn.Module) -> bool:
    first = next(model.parameters(), None)
    return first is not None and first.device.type == "meta"
