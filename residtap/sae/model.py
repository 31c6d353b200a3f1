"""A sparse autoencoder's maths: encode (full width or selected features), decode, pack.

    sae = residtap.sae.load_sae("folder")        # SAELens layout (residtap/sae/saelens.py)
    acts = sae.encode(h)                         # (..., d_sae), chunked over rows and features
    some = sae.encode_features(h, [3, 17])       # (..., 2) == acts[..., [3, 17]]
    pk = sae.packed([3, 17])                     # pre = h @ pk.weight.T + pk.bias; pk.activate(pre)

The formula (SAELens's, for the architectures it saves for inference):
    x   = norm_in(h)                   "none" (also "expected_average_only_in" and
                                       "covariance_whitening": SAELens folds those into the
                                       weights before saving and applies nothing at inference),
                                       "constant_norm_rescale" (x = h sqrt(d_in) / |h|) or
                                       "layer_norm" (x = (h - mean) / (std + 1e-5), std with
                                       Bessel's correction), per row
    pre = (x - b_dec) @ W_enc + b_enc  b_dec subtracted only if apply_b_dec_to_input
          (TopK with rescale_acts_by_decoder_norm: pre *= |W_dec[i]| per feature)
    act = relu(pre)                                    "standard"
          relu(pre) where pre > threshold, else 0       "jumprelu"
          relu(pre) on the k largest pre of a row, else 0  "topk"
    out = act @ W_dec + b_dec, then norm_out (undoes norm_in: needs the row's statistics)

`packed` gives pre as an affine map of h, so a bank can add a feature as one matmul column:
weight = (W_enc[:, i] * s_i)ᵀ, bias = (b_enc[i] - b_dec @ W_enc[:, i]) * s_i (s_i the TopK
decoder-norm scale, else 1). It refuses what is not affine in h (per-row normalisation), and a
strict subset of a TopK SAE's features (whether a feature is among the k largest depends on all
d_sae pre-activations) unless `approximate_topk=True` reads relu(pre) instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Architecture = Literal["standard", "jumprelu", "topk"]
Normalization = Literal["none", "expected_average_only_in", "covariance_whitening",
                        "constant_norm_rescale", "layer_norm"]
ARCHITECTURES: tuple[str, ...] = ("standard", "jumprelu", "topk")
NORMALIZATIONS: tuple[str, ...] = ("none", "expected_average_only_in", "covariance_whitening",
                                   "constant_norm_rescale", "layer_norm")
_PER_ROW = ("constant_norm_rescale", "layer_norm")  # not affine in h
_ROWS = 4096  # rows per chunk
_FEATURES = 16384  # features per chunk
_LN_EPS = 1e-5


@dataclass
class PackedSAE:
    """Selected features as matmul columns: pre = h @ weight.T + bias, acts = activate(pre)."""

    indices: Tensor  # (k,) long: the SAE features, in column order
    weight: Tensor  # (k, d_in)
    bias: Tensor  # (k,)
    activation: Literal["relu", "jumprelu", "topk"]
    threshold: Tensor | None = None  # (k,) for "jumprelu"
    k: int | None = None  # for "topk" (all features packed)

    def activate(self, pre: Tensor) -> Tensor:
        """(..., k) feature activations from (..., k) pre-activations."""
        if self.activation == "relu":
            return pre.clamp(min=0)
        if self.activation == "jumprelu":
            assert self.threshold is not None
            return torch.where(pre > self.threshold.to(pre), pre.clamp(min=0), 0.0)
        assert self.k is not None
        return _topk_relu(pre, self.k)


@dataclass
class SAE:
    """A sparse autoencoder over one site's activations (formula: module docstring)."""

    W_enc: Tensor  # (d_in, d_sae)
    b_enc: Tensor  # (d_sae,)
    W_dec: Tensor  # (d_sae, d_in)
    b_dec: Tensor  # (d_in,)
    architecture: Architecture = "standard"
    threshold: Tensor | None = None  # (d_sae,) for "jumprelu"
    k: int | None = None  # for "topk"
    rescale_acts_by_decoder_norm: bool = False  # "topk" only
    apply_b_dec_to_input: bool = True
    normalize_activations: Normalization = "none"
    site: str | None = None
    hook_name: str | None = None  # SAELens's name of the site, as recorded
    model_name: str | None = None  # as recorded by SAELens (a TransformerLens or HF name)
    model: dict[str, Any] | None = None  # residtap identity of the model, if recorded
    metadata: dict[str, Any] = field(default_factory=dict)  # the rest of cfg.json's metadata
    info: dict[str, Any] = field(default_factory=dict)  # residtap's notes: training, features

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; residtap reads "
                             f"{list(ARCHITECTURES)}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"unknown normalize_activations {self.normalize_activations!r}; "
                             f"expected one of {list(NORMALIZATIONS)}")
        d_in, d_sae = self.W_enc.shape
        shapes = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if self.architecture == "jumprelu":
            shapes["threshold"] = (d_sae,)
            if self.threshold is None:
                raise ValueError("a 'jumprelu' SAE needs a threshold tensor (d_sae,)")
        for name, shape in shapes.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"SAE tensor {name} has shape {got}, expected {shape} for "
                                 f"W_enc (d_in={d_in}, d_sae={d_sae})")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 0 < self.k <= d_sae):
            raise ValueError(f"a 'topk' SAE needs k in 1..d_sae={d_sae}, got {self.k!r}")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def __repr__(self) -> str:  # never the weights
        extra = {"topk": f", k={self.k}", "jumprelu": "", "standard": ""}[self.architecture]
        return (f"SAE({self.architecture}{extra}, site={self.site!r}, d_in={self.d_in}, "
                f"d_sae={self.d_sae}, dtype={self.dtype}, hook_name={self.hook_name!r})")

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> SAE:
        """A copy with every tensor on `device` in `dtype`."""
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)
        return replace(self, W_enc=cast(self.W_enc), b_enc=cast(self.b_enc),
                       W_dec=cast(self.W_dec), b_dec=cast(self.b_dec),
                       threshold=cast(self.threshold))

    # ---- encoding -------------------------------------------------------------------------
    def encode(self, h: Tensor) -> Tensor:
        """Feature activations (..., d_sae) of activations h (..., d_in), in the SAE's dtype,
        on its device. Chunked over rows and features: besides the result, memory stays near
        rows_chunk x features_chunk."""
        flat = self._rows(h)  # (N, d_in)
        out = torch.zeros(flat.shape[0], self.d_sae, dtype=self.dtype, device=self.device)
        for r in range(0, flat.shape[0], _ROWS):
            x = self._input(flat[r : r + _ROWS])  # (n, d_in)
            if self.architecture == "topk":
                values, indices = self._topk(x)
                out[r : r + _ROWS].scatter_(1, indices, values.clamp(min=0))
                continue
            for f in range(0, self.d_sae, _FEATURES):
                cols = slice(f, f + _FEATURES)
                pre = self._pre(x, cols)  # (n, f)
                out[r : r + _ROWS, cols] = self._activate(pre, cols)
        return out.reshape(*h.shape[:-1], self.d_sae)

    def encode_features(self, h: Tensor, indices: Sequence[int] | Tensor) -> Tensor:
        """Activations (..., len(indices)) of the selected features only, equal to
        `encode(h)[..., indices]`. ReLU and JumpReLU read only those encoder columns; TopK
        needs every pre-activation of a row to know the k largest (a full-width pass)."""
        idx = self._indices(indices)
        flat = self._rows(h)
        if self.architecture == "topk":
            parts = [self.encode(flat[r : r + _ROWS])[:, idx.to(self.device)]
                     for r in range(0, flat.shape[0], _ROWS)]
            out = torch.cat(parts) if parts else self.W_enc.new_zeros(0, len(idx))
            return out.reshape(*h.shape[:-1], len(idx))
        idx = idx.to(self.device)
        parts = [self._activate(self._pre(self._input(flat[r : r + _ROWS]), idx), idx)
                 for r in range(0, flat.shape[0], _ROWS)]
        out = torch.cat(parts) if parts else self.W_enc.new_zeros(0, len(idx))
        return out.reshape(*h.shape[:-1], len(idx))

    def decode(self, acts: Tensor) -> Tensor:
        """Reconstruction (..., d_in) from feature activations (..., d_sae). Refused for a
        per-row input normalisation (its inverse needs each row's statistics): use
        `reconstruct(h)`."""
        if self.normalize_activations in _PER_ROW:
            raise ValueError(
                f"this SAE normalises each input row ({self.normalize_activations!r}), so "
                "decode needs the row's statistics; call sae.reconstruct(h) instead")
        return self._decode(acts)

    def reconstruct(self, h: Tensor) -> Tensor:
        """encode then decode h (..., d_in), undoing a per-row normalisation with h's own."""
        rec = self._decode(self.encode(h))
        if self.normalize_activations == "constant_norm_rescale":
            return rec * (h.to(rec).norm(dim=-1, keepdim=True) / self.d_in**0.5)
        if self.normalize_activations == "layer_norm":
            h = h.to(rec)
            return rec * h.std(dim=-1, keepdim=True) + h.mean(dim=-1, keepdim=True)
        return rec

    def packed(self, indices: Sequence[int] | Tensor | None = None, *,
               approximate_topk: bool = False) -> PackedSAE:
        """The selected features' pre-activation as an affine map of h, plus the activation
        (module docstring). indices None: all d_sae features."""
        if self.normalize_activations in _PER_ROW:
            raise ValueError(
                f"this SAE normalises each input row ({self.normalize_activations!r}), which "
                "is not an affine map of h, so its features cannot be packed as matmul "
                "columns; encode captured activations with sae.encode instead")
        idx = torch.arange(self.d_sae) if indices is None else self._indices(indices)
        idx = idx.to(self.device)
        W = self.W_enc.index_select(1, idx)  # (d_in, k)
        bias = self.b_enc.index_select(0, idx)
        if self.apply_b_dec_to_input:
            bias = bias - self.b_dec @ W
        scale = self._decoder_scale(idx)
        if scale is not None:
            W, bias = W * scale, bias * scale
        weight = W.T.contiguous()  # (k, d_in)
        if self.architecture == "standard":
            return PackedSAE(idx, weight, bias, "relu")
        if self.architecture == "jumprelu":
            assert self.threshold is not None
            return PackedSAE(idx, weight, bias, "jumprelu", self.threshold.index_select(0, idx))
        if len(idx) == self.d_sae and bool((idx == torch.arange(self.d_sae,
                                                                device=idx.device)).all()):
            return PackedSAE(idx, weight, bias, "topk", k=self.k)
        if approximate_topk:  # asked for by name: said at info level, not as a warning
            log.info("packing %d of %d features of a TopK SAE as relu(pre-activation): it "
                     "equals the TopK activation only where the feature is among the k=%s "
                     "largest of its row", len(idx), self.d_sae, self.k)
            return PackedSAE(idx, weight, bias, "relu")
        raise ValueError(
            f"a TopK SAE activates a feature only when it is among the k={self.k} largest of "
            f"all d_sae={self.d_sae} pre-activations of a row, so {len(idx)} selected features "
            "cannot be decided from their own columns; pack all features (indices=None), or "
            "pass approximate_topk=True to read relu(pre-activation) of the selected ones")

    # ---- internals ------------------------------------------------------------------------
    def _rows(self, h: Tensor) -> Tensor:
        if not isinstance(h, Tensor) or h.shape[-1:] != (self.d_in,):
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"expected activations (..., d_in={self.d_in}), got {got}; is "
                             f"this the SAE's site ({self.site!r})?")
        return h.reshape(-1, self.d_in)

    def _indices(self, indices: Sequence[int] | Tensor) -> Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.d_sae):
            raise ValueError(f"feature indices must be in 0..{self.d_sae - 1} (d_sae), got "
                             f"min {int(idx.min())}, max {int(idx.max())}")
        return idx

    def _input(self, h: Tensor) -> Tensor:
        """x = norm_in(h) - b_dec (n, d_in), on the SAE's device and dtype."""
        x = h.to(device=self.device, dtype=self.dtype)
        if self.normalize_activations == "constant_norm_rescale":
            x = x * (self.d_in**0.5 / x.norm(dim=-1, keepdim=True))
        elif self.normalize_activations == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + _LN_EPS)
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def _pre(self, x: Tensor, cols: slice | Tensor) -> Tensor:
        """Pre-activations (n, f) of features `cols` for prepared input x (n, d_in)."""
        if isinstance(cols, slice):
            pre = x @ self.W_enc[:, cols] + self.b_enc[cols]
        else:
            pre = x @ self.W_enc.index_select(1, cols) + self.b_enc.index_select(0, cols)
        scale = self._decoder_scale(cols)
        return pre if scale is None else pre * scale

    def _decoder_scale(self, cols: slice | Tensor) -> Tensor | None:
        if not (self.architecture == "topk" and self.rescale_acts_by_decoder_norm):
            return None
        W = self.W_dec[cols] if isinstance(cols, slice) else self.W_dec.index_select(0, cols)
        return W.norm(dim=-1)

    def _activate(self, pre: Tensor, cols: slice | Tensor) -> Tensor:
        if self.architecture == "standard":
            return pre.clamp(min=0)
        assert self.threshold is not None  # jumprelu; topk goes through _topk
        return torch.where(pre > self.threshold[cols], pre.clamp(min=0), 0.0)

    def _topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The k largest pre-activations (n, k) of each row and their features, merged over
        feature chunks."""
        assert self.k is not None
        best_v = best_i = None
        for f in range(0, self.d_sae, _FEATURES):
            cols = slice(f, f + _FEATURES)
            pre = self._pre(x, cols)  # (n, f)
            v, i = pre.topk(min(self.k, pre.shape[1]), dim=-1)
            i = i + f
            if best_v is not None:
                v, j = torch.cat([best_v, v], 1).topk(self.k, dim=-1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_v, best_i = v, i
        assert best_v is not None and best_i is not None
        return best_v, best_i

    def _decode(self, acts: Tensor) -> Tensor:
        if acts.shape[-1] != self.d_sae:
            raise ValueError(f"expected feature activations (..., d_sae={self.d_sae}), got "
                             f"{tuple(acts.shape)}")
        acts = acts.to(device=self.device, dtype=self.dtype)
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        return acts @ self.W_dec + self.b_dec


def _topk_relu(pre: Tensor, k: int) -> Tensor:
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.clamp(min=0))
