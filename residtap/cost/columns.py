"""What probes cost in a forward, counted in matmul columns, for any kind a bank reads.

    count = count_columns(["mood.safetensors", "answer.safetensors", "sae-folder/"],
                          features=[3, 17])
    count.columns, count.per_site                  # {site: columns}
    estimate_cost(config, n_probes=count.columns, sites=1, positions="generated",
                  readout_flops=count.readout_flops)

A column is one dot product with the site's hidden state per token read: one row of the site's
packed weight (residtap.probes.bank_layout). What each kind costs:
- linear probe: C columns (one per output; 1 for a binary probe);
- attention probe: H + H*C columns (a query logit per head, a value per head and output), then
  the online-softmax update per token (residtap.probes.attention_stream): about
  ATTENTION_FLOPS = (per head, per value column) FLOPs in `readout_flops`;
- SAE features: 1 column each (only the selected encoder rows are packed), then the activation
  (1 FLOP per feature; TopK over all d_sae: about log2(k) comparisons per feature), and for a
  probe folded onto them, its (C, k) matmul: 2kC FLOPs.
Inputs: probe files, SAE folders (their `features`, default all), or the objects themselves
(Probe, AttentionProbe, residtap.sae.features.SAEFeatures) or a whole ProbeBank.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTENTION_FLOPS = (8, 16)  # per token: per head (logit, running denominator), per value column


@dataclass
class ColumnCount:
    """Matmul columns and post-matmul FLOPs per token read, in all and per site and item."""

    columns: int = 0
    readout_flops: float = 0.0
    per_site: dict[str, int] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)  # name, kind, site, columns, ...

    def add(self, name: str, kind: str, site: str | None, columns: int, outputs: int,
            flops: float) -> None:
        self.columns += columns
        self.readout_flops += flops
        key = site or "?"
        self.per_site[key] = self.per_site.get(key, 0) + columns
        self.items.append({"name": name, "kind": kind, "site": site, "columns": columns,
                           "outputs": outputs, "readout_flops": flops})


def count_columns(items: Iterable[Any], *, features: Sequence[int] | None = None
                  ) -> ColumnCount:
    """Count the columns of each item (module docstring); `features` selects an SAE folder's."""
    count = ColumnCount()
    for item in items:
        _count(count, item, features)
    return count


def attention_columns(heads: int, outputs: int) -> tuple[int, float]:
    """(columns, readout FLOPs per token) of an attention probe."""
    per_head, per_value = ATTENTION_FLOPS
    return heads + heads * outputs, per_head * heads + per_value * heads * outputs


def sae_columns(k: int, architecture: str, topk: int | None = None,
                probe_outputs: int = 0) -> tuple[int, float]:
    """(columns, readout FLOPs per token) of k SAE features (+ a folded probe's outputs);
    architecture "topk" means TopK over these k columns (all of the SAE's features)."""
    act = k * (math.log2(max(topk or 2, 2)) if architecture == "topk" else 1.0)
    return k, act + 2.0 * k * probe_outputs


def _count(count: ColumnCount, item: Any, features: Sequence[int] | None) -> None:
    from residtap.probes.attention import AttentionProbe
    from residtap.probes.bank import ProbeBank
    from residtap.probes.bank_readouts import AttentionReadout, SAEReadout
    from residtap.sae.features import SAEFeatures

    if isinstance(item, ProbeBank):
        for p in item.probes:
            if isinstance(p.readout, AttentionReadout):
                _count(count, p.readout.probe, None)
                count.items[-1]["name"] = p.name
            elif isinstance(p.readout, SAEReadout):
                _count(count, p.readout.features, None)
                count.items[-1]["name"] = p.name
            else:
                C = int(p.weight.shape[0])
                count.add(p.name, "linear", p.site, C, C, 0.0)
        return
    if isinstance(item, (str, os.PathLike)):
        _count_path(count, Path(item), features)
        return
    if isinstance(item, AttentionProbe):
        cols, flops = attention_columns(item.n_heads, item.n_outputs)
        count.add(str(item.metadata.get("name", "attention")), "attention", item.site, cols,
                  item.n_outputs, flops)
        return
    if isinstance(item, SAEFeatures):
        C = int(item.probe.weight.shape[0]) if item.probe is not None else 0
        arch = "topk" if item.sae.architecture == "topk" and item.all_features else "relu"
        cols, flops = sae_columns(item.n_features, arch, item.sae.k, C)
        count.add("sae", "sae" if C == 0 else "sae probe", item.site, cols, item.n_outputs,
                  flops)
        return
    weight = getattr(item, "weight", None)
    if weight is None or getattr(weight, "dim", lambda: 0)() != 2:
        raise TypeError(f"cannot count the columns of a {type(item).__name__}; expected a probe "
                        "file, an SAE folder, a Probe, AttentionProbe, SAEFeatures or ProbeBank")
    info = (getattr(item, "metadata", None) or {}).get("sae")
    C = int(weight.shape[0])
    if isinstance(info, dict):  # a probe on SAE features
        topk = info["architecture"] == "topk" and len(info["features"]) == info["d_sae"]
        cols, flops = sae_columns(len(info["features"]), "topk" if topk else "relu",
                                  info.get("k"), C)
        count.add("sae probe", "sae probe", info["site"], cols, C, flops)
    else:
        count.add(str(getattr(item, "kind", "linear")), "linear", getattr(item, "site", None),
                  C, C, 0.0)


def _count_path(count: ColumnCount, path: Path, features: Sequence[int] | None) -> None:
    from residtap.probes.files import load_probe
    from residtap.sae.saelens import CFG_FILE, site_of_hook

    if path.is_dir() and (path / CFG_FILE).is_file():  # an SAE folder: its config is enough
        cfg = json.loads((path / CFG_FILE).read_text(encoding="utf-8"))
        k = len(features) if features is not None else int(cfg["d_sae"])
        topk = cfg.get("architecture") == "topk" and k == int(cfg["d_sae"])
        cols, flops = sae_columns(k, "topk" if topk else "relu", cfg.get("k"))
        hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
        site = (cfg.get("residtap") or {}).get("site") or site_of_hook(hook)
        count.add(path.name, "sae", site, cols, k, flops)
        return
    probe = load_probe(path)
    start = len(count.items)
    _count(count, probe, None)
    count.items[start]["name"] = path.stem
