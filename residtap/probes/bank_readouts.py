"""What a bank does with a site's matmul columns beyond reading them as scores: attention
probes and SAE features.

    BankProbe(name, site, weight, bias, readout=AttentionReadout(probe))  # H + H*C columns
    BankProbe(name, site, weight, bias, readout=SAEReadout(features))     # k columns
    s = site_scores(pack, proj, valid, states)   # (B, T, P_site) from the matmul's (B, T, M)

A linear probe's columns are its scores. The other kinds add columns to the same one matmul per
site and turn them into scores afterwards, with tensor ops only (no host sync, compile-safe):

- attention probes (residtap.probes.attention): every attention probe of a site is packed by
  `pack_attention_probes` (query and value columns; its docstring has the layout and the maths)
  into one segment; per forward an `AttentionStream` (one per attached run: the online-softmax
  state per row) turns the columns into each probe's score after every token, equal to
  `AttentionProbe.scores` on that prefix. The stream must see every token of the sequence, not
  only the scored ones, so in a prefill the bank multiplies all its tokens for a site that has
  attention probes, and `valid` says which are real (padding is skipped).
- SAE features (residtap.sae.features): k encoder columns, the SAE's activation (ReLU, JumpReLU,
  TopK over all features, or relu of a TopK subset), then optionally a folded probe's (C, k)
  matmul. One segment per `add_sae`.

In the score buffer a site's columns run: linear probes (in the order added), then the
attention probes' outputs, then each SAE segment's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from residtap.probes.attention import AttentionProbe
from residtap.probes.attention_stream import AttentionPack, AttentionStream, pack_attention_probes

if TYPE_CHECKING:
    from residtap.probes.bank_layout import SitePack
    from residtap.sae.features import SAEFeatures


@dataclass
class AttentionReadout:
    """A bank probe that is an attention probe: its columns are pooled, not read as scores."""

    probe: AttentionProbe

    @property
    def labels(self) -> list[Any]:
        p = self.probe
        if p.n_outputs == 1:
            return list(p.classes[1:]) if len(p.classes) == 2 else [0]
        return list(p.classes) if len(p.classes) == p.n_outputs else list(range(p.n_outputs))

    @property
    def n_outputs(self) -> int:
        return self.probe.n_outputs

    def columns(self, name: str) -> tuple[Tensor, Tensor]:
        """(weight (H + H*C, d), bias): this probe's matmul columns alone (for counting and
        width checks; a site packs all its attention probes together)."""
        pack = pack_attention_probes({name: self.probe}, dtype=self.probe.query.dtype)
        return pack.weight, pack.bias


@dataclass
class SAEReadout:
    """A bank probe made of SAE features (optionally folded into a linear probe)."""

    features: SAEFeatures

    @property
    def labels(self) -> list[Any]:
        return self.features.labels

    @property
    def n_outputs(self) -> int:
        return self.features.n_outputs


Readout = AttentionReadout | SAEReadout


class AttentionSegment:
    """The attention probes of one site: matmul columns `cols`, `width` score columns."""

    streams = True

    def __init__(self, names: list[str], probes: list[AttentionProbe], device: torch.device,
                 first_column: int) -> None:
        self.pack: AttentionPack = pack_attention_probes(dict(zip(names, probes, strict=True)),
                                                         device=device)
        self.cols = slice(first_column, first_column + self.pack.n_columns)
        self.width = self.pack.n_outputs

    def state(self, batch: int, device: torch.device) -> AttentionStream:
        return AttentionStream(self.pack, batch, device=device)

    def __call__(self, proj: Tensor, valid: Tensor | None, state: AttentionStream) -> Tensor:
        return state.update(proj, valid)  # (B, T, O)


class SAESegment:
    """One `add_sae`: k encoder columns `cols`, the activation, an optional (C, k) matmul."""

    streams = False

    def __init__(self, features: SAEFeatures, device: torch.device, first_column: int) -> None:
        pk = features.packed()
        self.activation, self.k = pk.activation, pk.k
        self.threshold = None if pk.threshold is None else pk.threshold.to(device, torch.float32)
        self.cols = slice(first_column, first_column + features.n_features)
        probe = features.probe
        self.fold_weight = self.fold_bias = None
        if probe is not None:
            self.fold_weight = probe.weight.to(device, torch.float32)  # (C, k)
            self.fold_bias = probe.bias.to(device, torch.float32)  # (C,)
        self.width = features.n_outputs

    def state(self, batch: int, device: torch.device) -> None:
        return None

    def __call__(self, pre: Tensor, valid: Tensor | None, state: None) -> Tensor:
        pre = pre.float()  # (B, T, k)
        if self.activation == "relu":
            acts = pre.clamp(min=0)
        elif self.activation == "jumprelu":
            acts = torch.where(pre > self.threshold, pre.clamp(min=0), 0.0)
        else:  # topk over every feature of the SAE
            values, indices = pre.topk(self.k, dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, indices, values.clamp(min=0))
        if self.fold_weight is None:
            return acts
        return F.linear(acts, self.fold_weight, self.fold_bias)  # (B, T, C)


Segment = AttentionSegment | SAESegment


def site_scores(pack: SitePack, proj: Tensor, valid: Tensor | None, states: list[Any],
                dtype: torch.dtype) -> Tensor:
    """Scores (B, T, stop - start) of one site from its matmul's output proj (B, T, M):
    the linear columns as they are, then each segment's readout (valid (B, T) bool: the real
    tokens, for the attention streams, None: all of them; states: each segment's per-run
    state)."""
    parts = [proj[..., :pack.n_linear].to(dtype)] if pack.n_linear else []
    for segment, state in zip(pack.segments, states, strict=True):
        parts.append(segment(proj[..., segment.cols], valid, state).to(dtype))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
