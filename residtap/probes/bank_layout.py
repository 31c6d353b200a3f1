"""A probe bank's probes, and how they are packed per site for one model.

    packs, names, columns, device = pack_probes(model, probes, arch=None)
    packs[0].weight                      # (M_site, d): every probe reading that site, stacked

All probes reading one site are packed into one weight (M_site, d) and bias (M_site,), in the
model's dtype and on its device, so reading a site costs one `F.linear`. Score columns run site
by site: `scores[..., pack.start:pack.stop]` belong to `pack`.

With linear probes only (`pack.segments` empty) the matmul's columns are the scores:
M_site = stop - start, `pack.n_linear` of them. Attention probes and SAE features
(bank_readouts.py) add matmul columns that `pack.segments` turn into scores after the matmul:
the site's score columns are its `n_linear` linear ones, then each segment's `width`; segment
i reads the matmul's columns `segments[i].cols`. `pack.streams` says whether a segment keeps
state over the tokens of a sequence (attention probes), which must then see every token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from residtap.probes.bank_readouts import (
    AttentionReadout,
    AttentionSegment,
    Readout,
    SAEReadout,
    SAESegment,
    Segment,
)
from residtap.sites import Arch, Site, resolve_site

log = logging.getLogger(__name__)


@dataclass
class BankProbe:
    """One probe of a bank: `scores = h @ weight.T + bias`, C = len(weight) columns, or with a
    `readout` (an attention probe, SAE features) K = len(weight) matmul columns that the readout
    turns into its scores (bank_readouts.py)."""

    name: str
    site: str
    weight: Tensor  # (K, d): its matmul columns (= its score columns for a linear probe)
    bias: Tensor  # (K,)
    classes: list[Any] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None  # identity of the model it was trained on, if known
    readout: Readout | None = None  # None: a linear probe

    @property
    def n_outputs(self) -> int:
        """Score columns."""
        return int(self.weight.shape[0]) if self.readout is None else self.readout.n_outputs

    @property
    def columns(self) -> list[str]:
        """Column names in the score buffer: the probe name, or 'name:class' per class (per
        feature for SAE features)."""
        if self.n_outputs == 1:
            return [self.name]
        return [f"{self.name}:{c}" for c in self.labels]

    @property
    def labels(self) -> list[Any]:
        """The class of each column (its index where the probe names no classes; the feature
        index for SAE features)."""
        if self.readout is not None:
            return list(self.readout.labels)
        C = int(self.weight.shape[0])
        return list(self.classes) if len(self.classes) == C else list(range(C))


@dataclass
class SitePack:
    """The probes of one site, packed: scores[..., start:stop] = F.linear(h, weight, bias) for
    linear probes; with segments, see the module docstring (bank_readouts.site_scores)."""

    site: Site
    weight: Tensor  # (M_site, d), model dtype and device
    bias: Tensor  # (M_site,)
    start: int
    stop: int
    n_linear: int = -1  # leading matmul columns read as scores (-1: all of them)
    segments: list[Segment] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n_linear < 0:
            self.n_linear = self.stop - self.start

    @property
    def streams(self) -> bool:
        """Does a segment keep state over a sequence's tokens (so it must see all of them)?"""
        return any(s.streams for s in self.segments)


Layout = tuple[list[SitePack], list[str], dict[str, list[int]], torch.device]
"""(packs, column names, {probe: its columns}, device)."""


def pack_probes(model: nn.Module, probes: Sequence[BankProbe], arch: Arch | None,
                device: torch.device, wdtype: torch.dtype) -> Layout:
    """Group `probes` by resolved site and stack each group (see the module docstring)."""
    groups: dict[Site, list[BankProbe]] = {}
    resolved: dict[str, Site] = {}
    for p in probes:
        if p.site not in resolved:  # LookupError names close matches
            resolved[p.site] = resolve_site(model, p.site, arch)
        groups.setdefault(resolved[p.site], []).append(p)
    packs: list[SitePack] = []
    names: list[str] = []
    probe_columns: dict[str, list[int]] = {}
    for site, members in groups.items():
        widths = {p.name: int(p.weight.shape[1]) for p in members}
        expected = _site_width(model, site)
        for name, d in widths.items():
            if expected is not None and d != expected:
                raise ValueError(
                    f"probe {name!r} has d_model={d} but site {site.name!r} of "
                    f"{type(model).__name__} is {expected} wide; use a probe trained on "
                    "this model's activations at that site")
        if len(set(widths.values())) > 1:
            raise ValueError(f"probes at site {site.name!r} disagree on d_model: {widths}; "
                             "every probe at one site must have the site's width")
        linear = [p for p in members if p.readout is None]
        attention = [p for p in members if isinstance(p.readout, AttentionReadout)]
        sae = [p for p in members if isinstance(p.readout, SAEReadout)]
        start = len(names)
        for p in linear:
            probe_columns[p.name] = list(range(len(names), len(names) + p.n_outputs))
            names += p.columns
        weights = [p.weight for p in linear]  # (C, d) each
        biases = [p.bias for p in linear]
        n_linear = len(names) - start
        m = n_linear  # matmul columns so far
        segments: list[Segment] = []
        if attention:
            seg = AttentionSegment([p.name for p in attention],
                                   [p.readout.probe for p in attention], device, m)
            for p in attention:
                out = seg.pack.outputs_of(p.name)
                probe_columns[p.name] = list(range(len(names) + out.start,
                                                   len(names) + out.stop))
            names += seg.pack.columns
            weights.append(seg.pack.weight)
            biases.append(seg.pack.bias)
            segments.append(seg)
            m = seg.cols.stop
        for p in sae:
            seg = SAESegment(p.readout.features, device, m)
            probe_columns[p.name] = list(range(len(names), len(names) + seg.width))
            names += p.columns
            weights.append(p.weight)
            biases.append(p.bias)
            segments.append(seg)
            m = seg.cols.stop
        weight = torch.cat([w.to(device, wdtype) for w in weights])  # (M_site, d)
        bias = torch.cat([b.to(device, wdtype) for b in biases])  # (M_site,)
        packs.append(SitePack(site, weight, bias, start, len(names), n_linear, segments))
    log.info("packed %d probes into %d site matrices (%d columns)", len(probes), len(packs),
             len(names))
    return packs, names, probe_columns, device


def _site_width(model: nn.Module, site: Site) -> int | None:
    """The feature width a canonical site produces, when the config says; None: unknown."""
    config = getattr(model, "config", None)
    if site.name == "logits":
        return getattr(config, "vocab_size", None)
    canonical = site.name in ("embed", "norm") or site.name.startswith("layers.")
    return getattr(config, "hidden_size", None) if canonical else None
