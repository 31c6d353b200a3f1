"""The model's own readout: the path from a residual-stream vector to its logits.

    readout = readout_of(model)          # final norm, projection, unembedding, logit transform
    logits = readout.logits(hidden)      # (R, d) -> (R, V)

It is exactly what the model applies after its last block: the final norm, any projection
(OPT's `project_out`), the unembedding and any final logit transform (Gemma 2/3's soft-cap
`tanh(logits / cap) * cap`, Cohere's `logit_scale`, Granite's `logits_scaling`). Which of these
a model has comes from its residtap.arch entry (the one table, or discovery), validated on first
use: the readout of the last block equals the model's own logits, or `readout_of` refuses,
naming what disagreed (pass `readout=Readout(...)`). The logit lens (residtap.lens.decode) and
the tuned lens (residtap.lens.tuned) both read through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from residtap.arch import Arch, find
from residtap.distributed import VocabShard
from residtap.validate import logit_transform


@dataclass
class Readout:
    """The model's own path from a residual-stream vector to logits.

    norm:    the final norm (None only for a model without one; pass it explicitly)
    unembed: a Linear-like module with `weight` (V, d) and optional `bias` (V,)
    softcap: final logit soft-cap, or None
    project: a module applied after the norm and before the unembedding, or None
    scale:   a multiplier applied last (Cohere's logit_scale, 1 / Granite's logits_scaling)"""

    norm: nn.Module | None
    unembed: nn.Module
    softcap: float | None = None
    project: nn.Module | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        weight = getattr(self.unembed, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError(
                "the unembedding must be a Linear-like module with a 2-D weight (vocab, d); got "
                f"{type(self.unembed).__name__}; pass readout=Readout(norm=..., unembed=...)"
            )

    @property
    def weight(self) -> Tensor:
        return self.unembed.weight  # (V, d)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def logits(
        self, hidden: Tensor, out: Tensor | None = None, *, shard: VocabShard | None = None
    ) -> Tensor:
        """Logits (R, V) for residual vectors `hidden` (R, d), optionally written into `out`.

        With `shard` (a vocabulary-sharded unembedding), only this rank's columns: (R, V_local)."""
        weight = self.weight if shard is None else shard.weight  # (V, d) or (V_local, d)
        bias = getattr(self.unembed, "bias", None) if shard is None else shard.bias
        h = hidden.to(weight.dtype)
        if self.norm is not None:
            h = self.norm(h)
        if self.project is not None:
            h = self.project(h)
        if bias is None:
            logits = torch.matmul(h, weight.t(), out=out)  # (R, V)
        else:
            logits = torch.addmm(bias, h, weight.t(), out=out)
        if self.softcap is not None and logits.requires_grad:  # training a tuned lens
            logits = torch.tanh(logits / self.softcap) * self.softcap
        elif self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        if self.scale is not None and logits.requires_grad:
            logits = logits * self.scale
        elif self.scale is not None:
            logits.mul_(self.scale)
        return logits


def readout_of(model: nn.Module, arch: Arch | None = None) -> Readout:
    """The model's own readout, from its residtap.arch entry (table or discovered) once
    validation showed it reproduces the model's logits; LookupError otherwise."""
    found = find(model, arch)
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None:
        raise LookupError(
            f"{type(model).__name__} has no output embeddings, so there is nothing to lens "
            "through; load the model with AutoModelForCausalLM"
        )
    if not found.usable("logits"):
        raise LookupError(
            f"residtap cannot reproduce {type(model).__name__}'s logits from its last block "
            f"(parts {found.origin}): {found.refusal('logits')}. Pass the parts yourself: "
            "readout=residtap.lens.Readout(norm=<final norm>, unembed=<lm head>, softcap=..., "
            "project=..., scale=...)"
        )
    softcap, scale = logit_transform(model.config, found.arch)
    paths = found.paths
    return Readout(
        norm=model.get_submodule(paths["final_norm"]) if paths["final_norm"] else None,
        unembed=unembed, softcap=softcap, scale=None if scale == 1.0 else scale,
        project=model.get_submodule(paths["project_out"]) if paths["project_out"] else None,
    )
