"""A probe bank's probes, and how they are packed per site for one model.

    packs, names, columns, device = pack_probes(model, probes, arch=None)
    packs[0].weight                      # (P_site, d): every probe reading that site, stacked

All probes reading one site are packed into one weight (P_site, d) and bias (P_site,), in the
model's dtype and on its device, so reading a site costs one `F.linear`. Score columns run site
by site: `scores[..., pack.start:pack.stop]` belong to `pack`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from residtap.sites import Arch, Site, resolve_site

log = logging.getLogger(__name__)


@dataclass
class BankProbe:
    """One probe of a bank: `scores = h @ weight.T + bias`, C = len(weight) columns."""

    name: str
    site: str
    weight: Tensor  # (C, d)
    bias: Tensor  # (C,)
    classes: list[Any] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None  # identity of the model it was trained on, if known

    @property
    def columns(self) -> list[str]:
        """Column names in the score buffer: the probe name, or 'name:class' per class."""
        if self.weight.shape[0] == 1:
            return [self.name]
        labels = (
            self.classes
            if len(self.classes) == self.weight.shape[0]
            else range(self.weight.shape[0])
        )
        return [f"{self.name}:{c}" for c in labels]

    @property
    def labels(self) -> list[Any]:
        """The class of each column (its index where the probe names no classes)."""
        C = int(self.weight.shape[0])
        return list(self.classes) if len(self.classes) == C else list(range(C))


@dataclass
class SitePack:
    """The probes of one site, packed: scores[..., start:stop] = F.linear(h, weight, bias)."""

    site: Site
    weight: Tensor  # (P_site, d), model dtype and device
    bias: Tensor  # (P_site,)
    start: int
    stop: int


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
        start = len(names)
        for p in members:
            cols = p.columns
            probe_columns[p.name] = list(range(len(names), len(names) + len(cols)))
            names += cols
        weight = torch.cat([p.weight for p in members]).to(device, wdtype)  # (P_site, d)
        bias = torch.cat([p.bias for p in members]).to(device, wdtype)  # (P_site,)
        packs.append(SitePack(site, weight, bias, start, len(names)))
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
