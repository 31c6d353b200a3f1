"""Find a decoder's parts from its modules and one recorded tiny forward (residtap.recording).

    parts = discover(rec, model)     # {"layers": ..., "ln1": "input_layernorm", "attn": ...}

Plain tensor comparisons on the recording:
- ln1 / ln2: the norm whose output is the input of the attention / MLP module called after it
  (named like it where two qualify: Falcon's ln_attn / ln_mlp); a parallel block whose MLP reads
  ln1 has no ln2 of its own;
- attn / mlp: among the module's output, an output norm applied to it (Gemma 2, OLMo-2) and its
  last inner projection (Bloom adds the residual inside), the one whose output satisfies the
  block's residual identity (residtap.validate.sum_check), with Granite's residual multiplier;
- final norm and projection: the modules called between the last block and the unembedding;
- why any part is missing, for the error a site request gets.
The logit transform is taken from the config by residtap.arch and proved by validation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from residtap.recording import (
    ATTN,
    MLP,
    NORM,
    Call,
    Recording,
    close,
    feeds,
    relative,
    sublayers,
)
from residtap.validate import residual_scales, sum_check


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
                and NORM.search(c.path.rsplit(".", 1)[-1]) and close(c.input, call.output)):
            out.insert(0, relative(c.path, block))
    inner = [c for c in rec.children_in_order(f"{block}.{module}")
             if c.output is not None and c.output.shape[-1] == call.output.shape[-1]
             and not any(rec.calls[p].start < c.start < rec.calls[p].end
                         for p in rec.calls if p.startswith(c.path + "."))]
    if inner:
        out.append(relative(inner[-1].path, block))
    return out


def residual_fit(rec: Recording, attn: str | None, mlp: str | None, config: Any
                 ) -> tuple[str | None, str | None, str | None]:
    """(attn, mlp, residual scale attribute): the outputs block 0 adds to its residual stream,
    among the candidates of the given sublayer modules; None where none fits (see sum_check).
    The scale is a config attribute (Granite's residual_multiplier) or None."""
    block = rec.block(0)
    best: tuple[str | None, str | None, str | None] = (None, None, None)
    for key, _ in residual_scales(config):
        for a in _candidates(rec, block, attn) if attn else []:
            for m in [*(_candidates(rec, block, mlp) if mlp else []), None]:
                a_ok, m_ok = sum_check(rec, 0, _Trial(a, m, key), config)
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
    ln1 = _pick_norm(rec, block, kinds["norm"], attn, ATTN)
    ln2 = _pick_norm(rec, block, [n for n in kinds["norm"] if n != ln1], mlp, MLP)
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
    norm = next((c.path for c in reversed(chain) if NORM.search(c.path.rsplit(".", 1)[-1])
                 or NORM.search(type(model.get_submodule(c.path)).__name__)), None)
    linear = [c.path for c in chain if isinstance(model.get_submodule(c.path), nn.Linear)]
    return norm, (linear[-1] if linear else None)
