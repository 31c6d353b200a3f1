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

Where the parts are comes from residtap.arch: the ARCHITECTURES table, or discovery from the
module structure, validated against the model's own hidden states and logits on first use; a
part that fails validation is refused here with the reason.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from residtap.arch import ARCHITECTURES, Arch, Finding, find

__all__ = ["ARCHITECTURES", "Arch", "SUBLAYERS", "Site", "arch_of", "blocks", "final_norm",
           "finding", "layer_sites", "num_layers", "resolve_site", "site_names"]

SUBLAYERS = ("ln1", "attn", "ln2", "mlp")
_LAYER_RE = re.compile(r"^layers\.(-?\d+)(?:\.(attn|mlp|ln1|ln2))?$")


@dataclass(frozen=True)
class Site:
    """A resolved place in a model.

    hook: "output" reads the module's output; "input" reads its first input (used for `embed`,
    the input of block 0, so that position embeddings and scaling are included).
    field: for a module returning a ModelOutput, the attribute to read ("logits").
    copy: the model changes this output in place after the module returns (Falcon's MLP); the
    engine hands taps a copy.
    flat: kept for compatibility; the engine shows (B*T, d) outputs as (B, T, d) by shape."""

    name: str
    path: str
    hook: Literal["output", "input"] = "output"
    field: str | None = None
    layer: int | None = None
    flat: bool = False
    copy: bool = False


def finding(model: nn.Module, arch: Arch | None = None) -> Finding:
    """How the model's parts were found (table / discovered / given) and what validation said."""
    return find(model, arch)


def arch_of(model: nn.Module, arch: Arch | None = None) -> Arch:
    """The model's Arch: the caller's, the table's, or discovered; validated on first use."""
    return find(model, arch).arch


def blocks(model: nn.Module, arch: Arch | None = None) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    return model.get_submodule(find(model, arch).paths["layers"])


def num_layers(model: nn.Module, arch: Arch | None = None) -> int:
    return len(blocks(model, arch))


def final_norm(model: nn.Module, arch: Arch | None = None) -> nn.Module:
    """The model's final norm module; LookupError for architectures without one."""
    found = find(model, arch)
    if found.paths["final_norm"] is None:
        raise LookupError(
            f"{type(model).__name__} has no final norm (site 'norm' does not apply: "
            f"{found.refusal('norm')})"
        )
    return model.get_submodule(found.paths["final_norm"])


def site_names(model: nn.Module, arch: Arch | None = None) -> list[str]:
    """Every canonical site this model has and validation accepted, in forward order."""
    found = find(model, arch)
    names = ["embed"]
    subs = [s for s in SUBLAYERS if getattr(found.arch, s) is not None and found.usable(s)]
    for i in range(num_layers(model, arch)):
        names += [f"layers.{i}.{s}" for s in subs]
        names.append(f"layers.{i}")
    if found.paths["final_norm"] is not None and found.usable("norm"):
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

    Raises TypeError for a non-string, LookupError (with close matches) for an unknown name or
    a part that validation refused (naming what disagreed and how to pass an Arch)."""
    if not isinstance(name, str):
        raise TypeError(
            f"a site name must be a str such as 'layers.3', got {type(name).__name__} {name!r}"
        )
    if not isinstance(model, nn.Module):
        find(model)  # raises the TypeError that names what was expected
    canonical = _resolve_canonical(model, name, arch)
    if canonical is not None:
        return canonical
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return Site(name=name, path=name)
    raise LookupError(_unknown_site_message(model, name, modules, arch))


def _refuse(model: nn.Module, name: str, found: Finding, part: str) -> LookupError:
    return LookupError(
        f"site {name!r} is not available on {type(model).__name__} (parts {found.origin}): "
        f"{found.refusal(part)}. If you know where it is, pass arch=residtap.Arch(...) with the "
        "module paths (see residtap.sites.arch_of(model) for what was found), or read a raw "
        "module path"
    )


def _resolve_canonical(model: nn.Module, name: str, arch: Arch | None) -> Site | None:
    match = _LAYER_RE.match(name)
    if name not in ("embed", "norm", "logits") and match is None:
        return None
    if name == "logits":
        if not _has_logits(model):
            raise LookupError(
                f"site 'logits' does not apply to {type(model).__name__}: it has no output "
                "embeddings (a base model without a language-model head); load it with "
                "AutoModelForCausalLM/AutoModelForMaskedLM, or read 'norm' or 'layers.{i}'"
            )
        return Site(name="logits", path="", field="logits")
    found = find(model, arch)
    layers = found.paths["layers"]
    if name == "embed":
        if not found.usable("embed"):
            raise _refuse(model, name, found, "embed")
        return Site(name="embed", path=f"{layers}.0", hook="input", layer=0)
    if name == "norm":
        if found.paths["final_norm"] is None or not found.usable("norm"):
            raise _refuse(model, name, found, "norm")
        return Site(name="norm", path=found.paths["final_norm"])
    n = num_layers(model, arch)
    index, sub = int(match.group(1)), match.group(2)
    if not -n <= index < n:
        raise LookupError(
            f"site {name!r} asks for layer {index}, but {type(model).__name__} has {n} layers "
            f"(valid: 0..{n - 1}, or -{n}..-1 from the end)"
        )
    index %= n
    block = f"{layers}.{index}"
    if sub is None:
        if not found.usable("layers"):
            raise _refuse(model, name, found, "layers")
        return Site(name=f"layers.{index}", path=block, layer=index)
    rel = getattr(found.arch, sub)
    if rel is None or not found.usable(sub):
        raise _refuse(model, name, found, sub)
    path = f"{block}.{rel}"
    try:
        model.get_submodule(path)
    except AttributeError as err:
        raise LookupError(
            f"site {name!r} should be module {path!r}, which {type(model).__name__} lacks "
            f"(this configuration may not have it); pass raw module paths instead"
        ) from err
    return Site(name=f"layers.{index}.{sub}", path=path, layer=index, copy=sub in found.copy)


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
        f"canonical sites: {shown or '(none found)'}; "
        "any module path from model.named_modules() also works"
    )
