"""Many probes read inside the forward pass, one fused matmul per site.

    bank = ProbeBank().add("refusal", W, b, site="layers.4")    # W (C, d) or (d,), b (C,)
    bank.add_probe(attention_probe, name="answer")              # an AttentionProbe: pooled
    bank.add_sae(sae, features=[132, 233], name="sae")          # SAE feature activations
    with bank.attach(model, max_tokens=64) as run:               # positions="generated"
        model.generate(**batch, max_new_tokens=64)
    run.results()["refusal"]                                     # (B, 64, C): one per new token

Kinds: linear probes (their columns are their scores); attention probes (residtap.probes.
attention: each token's query and value columns join the site's matmul, and an online softmax
per row gives the probe's score after every token, equal to `AttentionProbe.scores` on that
prefix; H + H*C columns); SAE features (k encoder columns, the activation, optionally a linear
probe trained on those features folded in as one small matmul; residtap.sae.features says what
is exact). See bank_readouts.py. Probe files, attention-probe files and SAE folders all go in
through `add_file`.

Design:
- All probes reading one site are packed into one weight (P_site, d) and bias (P_site,); a
  forward costs one `F.linear` per site plus one write into a preallocated score buffer
  (B, T_max, P_total). There is no Python work per probe (bank_layout.py).
- Nothing in the forward synchronises with the device. The slots a forward fills come from
  Python ints the engine derives from shapes (`step.past`, `step.length`), worked out once per
  forward by the slot planner, which the engine calls before the forward (bank_slots.py); the
  readout at each site writes at a device slot index, so a compiled `model.forward` does not
  recompile per decode step (bank_run.py). Masks, aggregates and early-exit state are device
  tensors updated with tensor ops. The instrumented forward compiles with
  `torch.compile(fullgraph=True)`.
- Buffers have fixed addresses for the life of the attachment (CUDA-graph friendly); each new
  run (a forward without KV cache: a plain forward or a generate's prefill) starts over at slot 0.
- This file holds the bank; bank_layout.py the packing; bank_run.py the attached run and its
  results, made of the slot planner (bank_slots.py), the aggregates (bank_aggregates.py) and
  the deferred readout (bank_deferred.py).

Positions ("which tokens get a score", the words of residtap.positions):
    "generated"  slot k is read at the forward that picks new token k: the prompt's last real
                 token for k = 0, then the token fed at decode step k. (B, max_new_tokens, P)
    "last"       the prompt's last real token only ("prompt_last", its former name, still
                 works). (B, 1, P)
    "prompt"     every prompt position, pads included (marked invalid). (B, T_prompt, P)
    "all"        every position fed: prompt then each decode step. (B, T_prompt + new - 1, P)
A row with no real token has no last token: in "generated" and "last" its slot 0 is marked not
valid (see bank_slots.py).

Model identity: a probe that records the model it was trained on (a trained Probe, a probe file)
is checked at `attach` against the model it is attached to, config and weights fingerprint
(residtap.identity), as a steering vector is; `allow_other_weights=True` accepts probes made on
another checkpoint of the same config. Raw tensors (`add`) record no model unless given one.

Aggregates over the scored tokens (pads and rows stopped early are skipped), in device buffers:
"max", "mean" and "ema" (exponential moving average, bias-corrected so the first token counts
fully: ema = sum_t a(1-a)^(n-1-t) x_t / (1 - (1-a)^n)).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from residtap.identity import check_same_model
from residtap.probes.attention import AttentionProbe
from residtap.probes.bank_layout import BankProbe, Layout, pack_probes
from residtap.probes.bank_readouts import AttentionReadout, SAEReadout
from residtap.probes.bank_run import (
    AGGREGATES,
    POSITION_MODES,
    Aggregate,
    BankPositions,
    BankRun,
    ProbeResults,
)
from residtap.sae.model import SAE
from residtap.sites import Arch

log = logging.getLogger(__name__)

__all__ = ["AGGREGATES", "POSITION_MODES", "Aggregate", "BankPositions", "BankProbe",
           "BankRun", "ProbeBank", "ProbeResults"]


class ProbeBank:
    """A set of linear probes, packed per site when attached to a model.

    bank = ProbeBank().add("toxic", W, b, site="layers.6")
    bank.add_probe(trained_probe, name="mood")      # a residtap.probes Probe (or look-alike)
    with bank.attach(model, max_tokens=32) as run:
        model.generate(**batch, max_new_tokens=32)
    """

    def __init__(self, probes: Iterable[BankProbe] = ()) -> None:
        self.probes: list[BankProbe] = []
        self._layouts: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Layout]] = (
            weakref.WeakKeyDictionary())
        for p in probes:
            self._append(p)

    def __len__(self) -> int:
        return len(self.probes)

    def __repr__(self) -> str:
        sites = sorted({p.site for p in self.probes})
        return f"ProbeBank({len(self.probes)} probes, {self.n_columns} columns, sites={sites})"

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.probes]

    @property
    def n_columns(self) -> int:
        """Matmul columns: C per linear probe, H + H*C per attention probe, 1 per SAE feature
        (what the probes cost in the forward; see residtap.cost.columns)."""
        return sum(int(p.weight.shape[0]) for p in self.probes)

    @property
    def n_scores(self) -> int:
        """Score columns in the run's buffer: one per output (class, feature) of each probe."""
        return sum(p.n_outputs for p in self.probes)

    def add(
        self,
        name: str,
        weight: Tensor,
        bias: Tensor | float | None = None,
        *,
        site: str,
        classes: Sequence[Any] = (),
        metadata: dict[str, Any] | None = None,
        model: dict[str, Any] | None = None,
    ) -> ProbeBank:
        """Add a probe from raw tensors: weight (C, d) or (d,), bias (C,), scalar or None.
        model: the identity (residtap.identity.model_identity) of the model it was made on,
        checked at `attach`."""
        if not isinstance(weight, Tensor):
            raise TypeError(
                f"weight of probe {name!r} must be a torch.Tensor (C, d) or (d,), "
                f"got {type(weight).__name__}"
            )
        if weight.dim() == 1:
            weight = weight[None]
        if weight.dim() != 2 or weight.shape[0] == 0 or not weight.is_floating_point():
            raise ValueError(
                f"weight of probe {name!r} must be a float tensor (C, d) or (d,) "
                f"with C >= 1, got {weight.dtype} {tuple(weight.shape)}"
            )
        C = weight.shape[0]
        if bias is None:
            bias = torch.zeros(C, dtype=weight.dtype)
        bias = torch.as_tensor(bias, dtype=weight.dtype).reshape(-1)
        if bias.numel() == 1 and C > 1:
            bias = bias.expand(C)
        if tuple(bias.shape) != (C,):
            raise ValueError(
                f"bias of probe {name!r} must have shape ({C},) like weight's first "
                f"dimension, got {tuple(bias.shape)}"
            )
        if not isinstance(site, str):
            raise TypeError(
                f"site of probe {name!r} must be a site name such as 'layers.3', "
                f"got {type(site).__name__}"
            )
        self._append(
            BankProbe(
                name,
                site,
                weight.detach(),
                bias.detach().clone(),
                list(classes),
                dict(metadata or {}),
                model,
            )
        )
        return self

    def add_probe(self, probe: Any, name: str | None = None, site: str | None = None) -> ProbeBank:
        """Add a trained probe object (weight (C, d), bias (C,), classes, site, metadata, and
        the model identity it records, checked at `attach`), or an AttentionProbe."""
        if isinstance(probe, AttentionProbe):
            return self.add_attention(probe, name=name, site=site)
        if isinstance(getattr(probe, "metadata", None), dict) and "sae" in probe.metadata:
            raise ValueError(
                f"this probe reads SAE features ({len(probe.metadata['sae'].get('features', []))}"
                " of them), not the residual stream; add it with bank.add_sae(sae, features="
                "probe.metadata['sae']['features'], probe=probe) or bank.add_file(path, sae=...)")
        for attr in ("weight", "bias"):
            if not hasattr(probe, attr):
                raise TypeError(
                    f"expected a probe with .weight (C, d) and .bias (C,), got "
                    f"{type(probe).__name__} without .{attr}"
                )
        site = site or getattr(probe, "site", None)
        if site is None:
            raise ValueError("the probe records no site; pass site='layers.N' to add_probe")
        meta = dict(getattr(probe, "metadata", None) or {})
        if getattr(probe, "kind", None) is not None:
            meta.setdefault("kind", probe.kind)
        name = name or meta.get("name") or f"probe{len(self.probes)}"
        classes = list(getattr(probe, "classes", None) or [])
        if probe.weight.shape[0] == 1 and len(classes) == 2:
            classes = classes[1:]  # binary: the single column scores the positive class
        identity = getattr(probe, "model", None)
        return self.add(name, probe.weight, probe.bias, site=site, classes=classes, metadata=meta,
                        model=identity if isinstance(identity, dict) else None)

    def add_attention(self, probe: AttentionProbe, name: str | None = None,
                      site: str | None = None) -> ProbeBank:
        """Add an attention probe: its H query and H*C value columns join the site's matmul, and
        its score after each token pools every token seen so far (attention_stream.py)."""
        if not isinstance(probe, AttentionProbe):
            raise TypeError(f"expected an AttentionProbe, got {type(probe).__name__}")
        site = site or probe.site
        if site is None:
            raise ValueError("the attention probe records no site; pass site='layers.N'")
        name = name or probe.metadata.get("name") or f"probe{len(self.probes)}"
        readout = AttentionReadout(probe)
        weight, bias = readout.columns(name)  # (H + H*C, d): its share of the site's matmul
        self._append(BankProbe(name, site, weight, bias, list(probe.classes),
                               {"kind": "attention", **probe.metadata},
                               probe.model if isinstance(probe.model, dict) else None, readout))
        return self

    def add_sae(self, sae: SAE, features: Sequence[int] | Tensor | None = None, *,
                name: str = "sae", probe: Any = None, approximate_topk: bool = False,
                site: str | None = None) -> ProbeBank:
        """Add SAE features: only the selected encoder rows are packed (k columns), then the
        SAE's activation; scores are the features' activations per token (columns
        'name:feature'). probe: a linear probe trained on these features' activations (weight
        (C, k)), folded in as one small matmul; its scores replace the activations. TopK SAEs:
        a strict subset needs approximate_topk=True (residtap.sae.features says what is
        exact). features None: all d_sae."""
        from residtap.sae.features import SAEFeatures

        feats = SAEFeatures.select(sae, features, probe=probe, approximate_topk=approximate_topk,
                                   site=site)
        pk = feats.packed()
        meta = {"kind": "sae", "sae": feats.describe()}
        if probe is not None:
            meta["probe_kind"] = getattr(probe, "kind", None)
        classes = list(getattr(probe, "classes", None) or []) if probe is not None else []
        identity = sae.model
        if identity is None and probe is not None and isinstance(probe.model, dict):
            identity = probe.model
        self._append(BankProbe(name, feats.site, pk.weight.detach(), pk.bias.detach(), classes,
                               meta, identity, SAEReadout(feats)))
        return self

    def layout(self, model: nn.Module, arch: Arch | None = None) -> Layout:
        """The probes packed per resolved site for `model` (cached until the bank changes):
        (packs, column names, {probe: its columns}, device). Columns run site by site."""
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        wdtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        key = (len(self.probes), device, wdtype, arch)
        per_model = self._layouts.setdefault(model, {})
        if key not in per_model:
            per_model.clear()
            per_model[key] = pack_probes(model, self.probes, arch, device, wdtype)
        return per_model[key]

    def add_file(self, path: str | os.PathLike[str], name: str | None = None, *,
                 model: nn.Module | None = None, allow_other_weights: bool = False,
                 sae: SAE | str | os.PathLike[str] | None = None,
                 features: Sequence[int] | None = None, approximate_topk: bool = False
                 ) -> ProbeBank:
        """Add what a file holds (name: the file's stem): a probe file from
        `residtap.probes.save_probe` or `residtap probe train` (linear or attention), or an SAE
        folder in SAELens's layout (its `features`, or all of them). A probe trained on SAE
        features (from a feature store, residtap.sae.store) needs its SAE: `sae` (an SAE or
        its folder). Recorded model identities are checked now against `model` if given, and
        in any case at `attach` (residtap.probes.files.load_any_probe)."""
        from residtap.probes.files import load_any_probe
        from residtap.sae.features import SAEFeatures

        got = load_any_probe(path, model=model, allow_other_weights=allow_other_weights, sae=sae,
                             features=features, approximate_topk=approximate_topk)
        name = name or Path(path).stem
        if isinstance(got, SAEFeatures):
            indices = None if got.all_features else got.indices
            return self.add_sae(got.sae, indices, name=name, probe=got.probe, site=got.site,
                                approximate_topk=got.approximate_topk)
        return self.add_probe(got, name=name)

    def _append(self, probe: BankProbe) -> None:
        if any(p.name == probe.name for p in self.probes):
            raise ValueError(
                f"the bank already has a probe named {probe.name!r}; names must be "
                "unique, pick another name"
            )
        self.probes.append(probe)

    def attach(
        self,
        model: nn.Module,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        positions: BankPositions = "generated",
        aggregate: Aggregate | Sequence[Aggregate] = (),
        ema_alpha: float = 0.1,
        dtype: torch.dtype = torch.float32,
        timed: bool = False,
        arch: Arch | None = None,
        defer: int = 0,
        allow_other_weights: bool = False,
    ) -> BankRun:
        """A context manager that reads every probe during the forwards run inside it.

        batch_size / max_tokens size the score buffer (B, max_tokens, P_total); pass both to
        allocate it now (needed under torch.compile or CUDA graphs), otherwise it is allocated at
        the first forward (batch from the input, max_tokens = the prompt length for the prompt
        modes). max_tokens counts slots: max_new_tokens for "generated", 1 for "last".
        timed: accumulate wall time spent in the bank's own tap code (`run.tap_seconds`).
        defer: stage up to this many one-token decode steps and read them with one matmul per
        site (see bank_run.py); scores are the same, read through results(), aggregate(),
        early exit or the streamer (or run.scores after run.flush()). 0: read every forward.
        Each probe's recorded model must be `model` (config and weights fingerprint);
        allow_other_weights=True accepts probes made on another checkpoint of its config."""
        if len(self) == 0:
            raise ValueError(
                "the probe bank is empty; add probes with bank.add(name, weight, "
                "bias, site=...) before attaching it"
            )
        for p in self.probes:
            if p.model is not None and p.model.get("config_hash"):
                check_same_model(p.model, model, f"probe {p.name!r}",
                                 allow_other_weights=allow_other_weights)
        return BankRun(
            self.layout(model, arch),
            {p.name: p.labels for p in self.probes},
            model,
            batch_size=batch_size,
            max_tokens=max_tokens,
            positions=positions,
            aggregate=aggregate,
            ema_alpha=ema_alpha,
            dtype=dtype,
            timed=timed,
            arch=arch,
            defer=defer,
        )
