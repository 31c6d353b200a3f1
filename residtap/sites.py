"""Canonical site names and the per-architecture table that resolves them to modules.

    site = resolve_site(model, "layers.3.ln1")     # Site(name='layers.3.ln1', path=..., ...)
    site_names(model)                              # every canonical name this model has

Canonical names, the same for every architecture:

    embed             residual stream entering block 0 (token embeddings, plus positions/scale)
    layers.{i}        block i's output: the residual stream after block i
    layers.{i}.attn   attention output, before it is added to the residual stream
    layers.{i}.mlp    MLP output, before it is added to the residual stream
    layers.{i}.ln1    the normalised input of attention (post-LayerNorm)
    layers.{i}.ln2    the normalised input of the MLP (post-LayerNorm)
    norm              the final norm's output
    logits            the model's own output logits (after any soft-capping)

Negative layer indices count from the end (`layers.-1`). Any other string is taken as a raw
module path (`model.layers.3.self_attn.o_proj`), an escape hatch that works on any model.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass(frozen=True)
class Arch:
    """Where an architecture keeps its parts. Paths of `layers` and `final_norm` are relative to
    the base model (`model.base_model`); `attn`, `mlp`, `ln1` and `ln2` are relative to a block.
    A part an architecture lacks is None, and asking for its site is an error. `flat` names the
    sublayers whose modules see tokens flattened to (B*T, d) (OPT's MLP); the engine shows them
    to taps as (B, T, d) like every other site."""

    layers: str
    final_norm: str | None
    attn: str
    mlp: str
    ln1: str | None
    ln2: str | None
    flat: tuple[str, ...] = ()


_LLAMA_LIKE = Arch(
    "layers", "norm", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm"
)
# Gemma 2/3 normalise each sublayer's output before the residual add; what is added is the
# output of post_attention_layernorm / post_feedforward_layernorm, so attn/mlp read those.
_GEMMA = Arch(
    "layers", "norm", "post_attention_layernorm", "post_feedforward_layernorm",
    "input_layernorm", "pre_feedforward_layernorm",
)
_BERT = Arch("encoder.layer", None, "attention.output.dense", "output.dense", None,
             "attention.output.LayerNorm")

# model_type -> parts. Explicit on purpose: an unknown model raises, it is never guessed.
ARCHITECTURES: dict[str, Arch] = {
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
    "opt": Arch("decoder.layers", "decoder.final_layer_norm", "self_attn", "fc2",
                "self_attn_layer_norm", "final_layer_norm", flat=("ln2", "mlp")),
    "bert": _BERT,
    "roberta": _BERT,
}

SUBLAYERS = ("ln1", "attn", "ln2", "mlp")
_LAYER_RE = re.compile(r"^layers\.(-?\d+)(?:\.(attn|mlp|ln1|ln2))?$")


@dataclass(frozen=True)
class Site:
    """A resolved place in a model.

    hook: "output" reads the module's output; "input" reads its first input (used for `embed`,
    the input of block 0, so that position embeddings and scaling are included).
    field: for a module returning a ModelOutput, the attribute to read ("logits").
    flat: the module sees tokens flattened to (B*T, d); taps see them as (B, T, d)."""

    name: str
    path: str
    hook: Literal["output", "input"] = "output"
    field: str | None = None
    layer: int | None = None
    flat: bool = False


def arch_of(model: nn.Module, arch: Arch | None = None) -> Arch:
    """The model's Arch from the table (or the user's override); LookupError when unknown."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected a torch nn.Module (a Hugging Face model), got {type(model).__name__}; "
            "load one with transformers' from_pretrained"
        )
    if arch is not None:
        if not isinstance(arch, Arch):
            raise TypeError(f"arch must be a residtap.Arch, got {type(arch).__name__}")
        return arch
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise LookupError(
        f"residtap has no site table for {type(model).__name__} (model_type {model_type!r}); "
        f"known model types: {', '.join(sorted(ARCHITECTURES))}. Pass the paths yourself, e.g. "
        "arch=residtap.Arch(layers='model.layers', final_norm='model.norm', attn='self_attn', "
        "mlp='mlp', ln1='input_layernorm', ln2='post_attention_layernorm'), or use raw module "
        "paths as site names"
    )


def _base_prefix(model: nn.Module) -> str:
    """Module path of the base model inside `model` ('' when `model` is the base model)."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def blocks(model: nn.Module, arch: Arch | None = None) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    path = _base_prefix(model) + arch_of(model, arch).layers
    return model.get_submodule(path)


def num_layers(model: nn.Module, arch: Arch | None = None) -> int:
    return len(blocks(model, arch))


def final_norm(model: nn.Module, arch: Arch | None = None) -> nn.Module:
    """The model's final norm module; LookupError for architectures without one."""
    parts = arch_of(model, arch)
    if parts.final_norm is None:
        raise LookupError(f"{type(model).__name__} has no final norm (site 'norm' does not apply)")
    return model.get_submodule(_base_prefix(model) + parts.final_norm)


def site_names(model: nn.Module, arch: Arch | None = None) -> list[str]:
    """Every canonical site this model has, in forward order."""
    parts = arch_of(model, arch)
    names = ["embed"]
    for i in range(num_layers(model, arch)):
        names += [f"layers.{i}.{s}" for s in SUBLAYERS if getattr(parts, s) is not None]
        names.append(f"layers.{i}")
    if parts.final_norm is not None:
        names.append("norm")
    if _has_logits(model):
        names.append("logits")
    return names


def layer_sites(model: nn.Module, arch: Arch | None = None) -> list[str]:
    """['layers.0', 'layers.1', ...]: the residual stream after each block."""
    return [f"layers.{i}" for i in range(num_layers(model, arch))]


def _has_logits(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is not None


def resolve_site(model: nn.Module, name: str, arch: Arch | None = None) -> Site:
    """Resolve a canonical name or a raw module path to a Site.

    Raises TypeError for a non-string, LookupError (with close matches) for an unknown name."""
    if not isinstance(name, str):
        raise TypeError(
            f"a site name must be a str such as 'layers.3', got {type(name).__name__} {name!r}"
        )
    if not isinstance(model, nn.Module):
        arch_of(model)  # raises the TypeError that names what was expected
    canonical = _resolve_canonical(model, name, arch)
    if canonical is not None:
        return canonical
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return Site(name=name, path=name)
    raise LookupError(_unknown_site_message(model, name, modules, arch))


def _resolve_canonical(model: nn.Module, name: str, arch: Arch | None) -> Site | None:
    if name == "logits":
        if not _has_logits(model):
            raise LookupError(
                f"site 'logits' does not apply to {type(model).__name__}: it has no output "
                "embeddings (a base model without a language-model head); load it with "
                "AutoModelForCausalLM/AutoModelForMaskedLM, or read 'norm' or 'layers.{i}'"
            )
        return Site(name="logits", path="", field="logits")
    match = _LAYER_RE.match(name)
    if name not in ("embed", "norm") and match is None:
        return None
    parts = arch_of(model, arch)
    base = _base_prefix(model)
    if name == "embed":
        return Site(name="embed", path=f"{base}{parts.layers}.0", hook="input", layer=0)
    if name == "norm":
        final_norm(model, arch)  # raises for architectures without a final norm
        return Site(name="norm", path=base + parts.final_norm)
    n = num_layers(model, arch)
    index, sub = int(match.group(1)), match.group(2)
    if not -n <= index < n:
        raise LookupError(
            f"site {name!r} asks for layer {index}, but {type(model).__name__} has {n} layers "
            f"(valid: 0..{n - 1}, or -{n}..-1 from the end)"
        )
    index %= n
    block = f"{base}{parts.layers}.{index}"
    if sub is None:
        return Site(name=f"layers.{index}", path=block, layer=index)
    rel = getattr(parts, sub)
    if rel is None:
        raise LookupError(
            f"site {name!r} does not apply to {type(model).__name__}: it has no {sub} "
            f"(sites it has: {', '.join(s for s in SUBLAYERS if getattr(parts, s))})"
        )
    path = f"{block}.{rel}"
    try:
        model.get_submodule(path)
    except AttributeError as err:
        raise LookupError(
            f"site {name!r} should be module {path!r}, which {type(model).__name__} lacks "
            f"(this configuration may not have it); pass raw module paths instead"
        ) from err
    return Site(name=f"layers.{index}.{sub}", path=path, layer=index, flat=sub in parts.flat)


def _unknown_site_message(model, name: str, modules: dict, arch: Arch | None) -> str:
    try:
        canonical = site_names(model, arch)
    except LookupError:
        canonical = []
    candidates = canonical + [m for m in modules if m]
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    shown = ", ".join(canonical[:6] + (["..."] if len(canonical) > 6 else []))
    return (
        f"unknown site {name!r} for {type(model).__name__}; {hint}"
        f"canonical sites: {shown or '(none: no site table for this model)'}; "
        "any module path from model.named_modules() also works"
    )
