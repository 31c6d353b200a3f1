"""Selected features of a sparse autoencoder, as a probe bank reads them, optionally folded
into a linear probe trained on those features.

    feats = SAEFeatures.select(sae, [132, 233])          # two features of the SAE
    feats.encode(h)                                      # (..., 2): what the bank scores
    folded = SAEFeatures.select(sae, [132, 233], probe=probe)   # probe.weight (C, 2)
    folded.scores(h)                                     # (..., C): probe on the features
    bank.add_sae(sae, features=[132, 233], probe=probe, name="truth")   # the same, in a bank

In a bank the selected features cost one matmul column each (their encoder rows, residtap.sae.
model's `packed`), then the activation; a folded probe adds one small (C, k) matmul on the k
activations. What is exact and what is not:
- ReLU ("standard") and JumpReLU SAEs: any subset is exact (each feature's activation depends
  on its own pre-activation only).
- TopK SAEs: all d_sae features (`features=None`) are exact (the k largest of every row are
  chosen among all columns). A strict subset is refused unless `approximate_topk=True`, which
  reads relu(pre-activation) of the selected features: equal to the TopK activation where the
  feature is among its row's k largest, positive where TopK would give 0 otherwise. `encode`
  computes the same approximation, so a probe trained on `encode`'s output (a feature store
  written by residtap.sae.store with the same settings) is folded exactly into what it learned.
- Per-row input normalisations (constant_norm_rescale, layer_norm) are not affine in h and
  cannot be packed; `SAE.encode` still encodes them for analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from residtap.sae.model import SAE, PackedSAE

_ROWS = 4096  # rows per chunk


@dataclass
class SAEFeatures:
    """k features of `sae` (`indices`, column order), optionally followed by a linear probe
    (weight (C, k), bias (C,)) trained on their activations. Make one with `select`."""

    sae: SAE
    indices: Tensor  # (k,) long
    approximate_topk: bool = False
    probe: Any = None  # a residtap Probe over these k activations, or None
    site: str | None = None
    _packed: PackedSAE | None = field(default=None, repr=False, compare=False)

    @classmethod
    def select(cls, sae: SAE, features: Sequence[int] | Tensor | None = None, *,
               probe: Any = None, approximate_topk: bool = False,
               site: str | None = None) -> SAEFeatures:
        """Features `features` of `sae` (None: all d_sae), with an optional probe over them.
        Refuses what a bank cannot compute from the selected columns (module docstring)."""
        if not isinstance(sae, SAE):
            raise TypeError(f"expected a residtap.sae.SAE (load_sae(folder)), got "
                            f"{type(sae).__name__}")
        if features is None:
            idx = torch.arange(sae.d_sae)
        else:
            idx = sae._indices(features)
            if idx.numel() == 0:
                raise ValueError("features is empty; pass the indices of the SAE features to "
                                 "read, e.g. features=[132, 233], or None for all of them")
            if idx.unique().numel() != idx.numel():
                raise ValueError(f"features {idx.tolist()[:20]} repeat an index; list each once")
        feats = cls(sae, idx, bool(approximate_topk), probe, site or sae.site)
        feats.packed()  # refuses per-row normalisation and TopK subsets now, not at attach
        if feats.site is None:
            raise ValueError("the SAE records no site; load it with load_sae(folder, site="
                             "'layers.N') or pass site=")
        if probe is not None:
            w = getattr(probe, "weight", None)
            if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[1] != idx.numel():
                got = tuple(w.shape) if isinstance(w, Tensor) else type(probe).__name__
                raise ValueError(
                    f"a probe folded onto {idx.numel()} SAE features needs weight (C, "
                    f"{idx.numel()}), got {got}; train it on a store of exactly these features "
                    "(residtap.sae.store.encode_store with the same features)")
        return feats

    @property
    def n_features(self) -> int:
        """k: the matmul columns these features cost."""
        return int(self.indices.numel())

    @property
    def all_features(self) -> bool:
        return self.n_features == self.sae.d_sae and bool(
            (self.indices == torch.arange(self.sae.d_sae)).all())

    @property
    def n_outputs(self) -> int:
        """Score columns: the probe's outputs when folded, else one per feature."""
        return int(self.probe.weight.shape[0]) if self.probe is not None else self.n_features

    @property
    def labels(self) -> list[Any]:
        """The label of each score column: the probe's classes when folded, else the feature
        indices."""
        if self.probe is None:
            return self.indices.tolist()
        classes = list(getattr(self.probe, "classes", None) or [])
        C = self.n_outputs
        if C == 1 and len(classes) == 2:
            return classes[1:]  # binary: the single column scores the positive class
        return classes if len(classes) == C else list(range(C))

    def packed(self) -> PackedSAE:
        """The features' encoder columns and activation (SAE.packed), made once."""
        if self._packed is None:
            self._packed = self.sae.packed(None if self.all_features else self.indices,
                                           approximate_topk=self.approximate_topk)
        return self._packed

    def encode(self, h: Tensor) -> Tensor:
        """Activations (..., k) of the selected features for h (..., d_in): what the bank
        scores (exact, or TopK's approximation with approximate_topk; module docstring)."""
        if self.sae.architecture == "topk" and self.approximate_topk and not self.all_features:
            pk = self.packed()
            flat = self.sae._rows(h).to(device=pk.weight.device, dtype=pk.weight.dtype)
            parts = [pk.activate(flat[r:r + _ROWS] @ pk.weight.T + pk.bias)
                     for r in range(0, flat.shape[0], _ROWS)]  # (n, k) each
            acts = torch.cat(parts) if parts else flat.new_zeros(0, self.n_features)
            return acts.reshape(*h.shape[:-1], self.n_features)
        if self.all_features:
            return self.sae.encode(h)
        return self.sae.encode_features(h, self.indices)

    def scores(self, h: Tensor) -> Tensor:
        """The folded probe's scores on the encoded features ((...,) for one output, else
        (..., C), as `Probe.scores`), or the feature activations (..., k) themselves."""
        acts = self.encode(h)
        return acts if self.probe is None else self.probe.scores(acts)

    def describe(self) -> dict[str, Any]:
        """JSON-ready: what a feature store and a folded probe record of these features."""
        sae = self.sae
        return {"site": self.site, "features": self.indices.tolist(), "d_sae": sae.d_sae,
                "architecture": sae.architecture, "k": sae.k,
                "approximate_topk": self.approximate_topk, "hook_name": sae.hook_name,
                "model": sae.model}
