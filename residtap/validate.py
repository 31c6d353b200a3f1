"""Validation of a model's parts on one recording: each part reproduces what the model itself
computes, or is refused with the reason.

    checks = validate(rec, model, arch, paths)   # {"embed": "validated", "ln2": "<why not>", ...}

- embed = HF's `hidden_states[0]`, block i = `hidden_states[i+1]`, the final norm = HF's last entry;
- the readout of the last block (final norm, projection, unembedding, logit soft-cap / scale /
  divisor named in the config) = the model's own logits;
- ln1 / ln2: the norm's output is the input of attention / of the MLP module called after it;
- attn / mlp satisfy a residual identity, with x the block's input and s the residual scale
  (Granite's residual_multiplier): parallel `out = x + s(a + m)`; sequential `x + s a` seen (as a
  module's input in the block), then `b + s m` seen with b = x + s a (pre-norm) or a norm's output
  of it (post-LN: OPT-350m, BERT); attn and mlp swapped are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from residtap.recording import Recording, close, feeds, sublayers

if TYPE_CHECKING:
    from residtap.arch import Arch

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
RESIDUAL_SCALES = ("residual_multiplier",)


def residual_scales(config: Any) -> list[tuple[str | None, float]]:
    out: list[tuple[str | None, float]] = [(None, 1.0)]
    for key in RESIDUAL_SCALES:
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and value not in (0, 1):
            out.append((key, float(value)))
    return out


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
        a, m = sum_check(rec, i, arch, model.config)
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


def sum_check(rec: Recording, i: int, arch: Any, config: Any) -> tuple[bool, bool]:
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
