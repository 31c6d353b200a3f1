"""Steering vectors: a direction in one site's activation space, where it came from, on disk.

    vec = SteeringVector.from_pairs(model, tok, [(pos, neg), ...], site="layers.3")
    with vec.apply(model, 4.0):                                  # = residtap.steer(model, vec, 4.0)
        model.generate(**batch)
    vec.save("mood.safetensors")
    vec = SteeringVector.load("mood.safetensors", model=model)   # checks it is the same model

Methods:
- "mean_diff" (CAA): mean activation of the positive texts minus that of the negative texts, read
  at one token of each text (the last by default; an int is an index into the text's tokens,
  BOS included, negative from the end; for A/B data the answer token is the last).
- "pca" (repeng's "pca_diff"): the first principal component of the paired differences
  positive_i - negative_i, sign-aligned with the mean difference, uncentred, and as long as the
  average pair's separation along it, so strength 1 is on the scale of "mean_diff"
  (residtap.steering.contrast says why).
`from_ab` applies CAA's recipe to A/B rows: each side is read at its answer token.
`normalize=True` makes any vector unit length (strengths are then distances in activation units).
The arithmetic is in residtap.steering.contrast, the file format in residtap.steering.files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from residtap.identity import check_same_model, model_identity
from residtap.inputs import encode, pad_id_of
from residtap.sites import Arch, resolve_site
from residtap.steering.ab import ab_items
from residtap.steering.contrast import explained, pca_direction, read_activations, split_pairs
from residtap.steering.direction import check_model
from residtap.steering.files import read_vector_file, write_vector_file
from residtap.steering.inject import PositionPolicy, Steering, steer

log = logging.getLogger(__name__)

Method = Literal["mean_diff", "pca"]


@dataclass
class SteeringVector:
    """A direction to add at `site`: `vector` is float32 (d,) on the CPU.

    method: how it was made ("mean_diff", "pca", "probe", "tensor", "random").
    model: the identity of the model it was made on (None when unknown, e.g. a raw tensor).
    """

    vector: Tensor  # (d,)
    site: str
    method: str
    model: dict[str, Any] | None = None
    position: str | int | None = None
    normalized: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.vector, Tensor):
            raise TypeError(f"vector must be a torch.Tensor, got {type(self.vector).__name__}")
        if self.vector.dim() != 1 or self.vector.numel() == 0:
            raise ValueError(
                f"a steering vector is 1-D (d,), got shape {tuple(self.vector.shape)}; pass one "
                "direction, e.g. tensor[0] for the first row of a (1, d) weight"
            )
        if not torch.isfinite(self.vector).all():
            raise ValueError("the steering vector has inf/nan entries; check how it was made")
        if not isinstance(self.site, str) or not self.site:
            raise TypeError(f"site must be a site name such as 'layers.3', got {self.site!r}")
        self.vector = self.vector.detach().to(device="cpu", dtype=torch.float32).contiguous()

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def __repr__(self) -> str:
        name = (self.model or {}).get("name", "?")
        made = f", pairs={self.extra['n_pairs']}" if "n_pairs" in self.extra else ""
        unit = ", normalized" if self.normalized else ""
        return (f"SteeringVector(site={self.site!r}, method={self.method!r}{made}, "
                f"d_model={self.d_model}, norm={self.norm:.4g}{unit}, model={name!r})")

    def apply(self, model: nn.Module, strength: float | Tensor = 1.0, *,
              positions: PositionPolicy = "all", arch: Arch | None = None) -> Steering:
        """Add this vector during the forwards run inside a `with` block:

            with vec.apply(model, 4.0):
                model.generate(**batch)

        The same as `residtap.steer(model, vec, strength, positions=...)` (see it for per-row
        strengths and positions); the hook is removed when the block ends, even on an error."""
        return steer(model, self, strength, positions=positions, arch=arch)

    # -- making ----------------------------------------------------------------------------
    @classmethod
    def from_pairs(
        cls,
        model: nn.Module,
        tokenizer: Any,
        positive: Sequence[str] | Sequence[tuple[str, str]],
        negative: Sequence[str] | None = None,
        site: str = "layers.3",
        position: Literal["last"] | int = "last",
        method: Method = "mean_diff",
        normalize: bool = False,
        batch_size: int = 32,
    ) -> SteeringVector:
        """The direction from `negative` to `positive` texts at `site`, read at `position` of
        each text; see the module docstring for `method`. Pairs come as one list of
        (positive, negative) tuples (or {"positive", "negative"} rows), or as two lists:

            SteeringVector.from_pairs(model, tok, [("i love it", "i hate it"), ...])
            SteeringVector.from_pairs(model, tok, ["i love it", ...], ["i hate it", ...])"""
        if negative is None:
            positive, negative = split_pairs(positive)
        if method not in ("mean_diff", "pca"):
            raise ValueError(f"method must be 'mean_diff' or 'pca', got {method!r}")
        is_index = isinstance(position, int) and not isinstance(position, bool)
        if not (position == "last" or is_index):
            raise ValueError(
                f"position must be 'last' or an int token index (negative: from the end), got "
                f"{position!r}"
            )
        pos_ids = encode(tokenizer, positive, "positive")
        neg_ids = encode(tokenizer, negative, "negative")
        if len(pos_ids) != len(neg_ids):
            raise ValueError(
                f"positive and negative are pairs and must have the same length; got "
                f"{len(pos_ids)} positive and {len(neg_ids)} negative texts"
            )
        return cls._from_token_ids(model, pos_ids, neg_ids, site, position, method, normalize,
                                   pad_id_of(tokenizer), batch_size)

    @classmethod
    def from_ab(
        cls,
        model: nn.Module,
        tokenizer: Any,
        rows: Sequence[dict[str, str]],
        site: str = "layers.3",
        method: Method = "mean_diff",
        normalize: bool = False,
        batch_size: int = 32,
    ) -> SteeringVector:
        """CAA's recipe on A/B rows ({question, answer_matching_behavior,
        answer_not_matching_behavior}): read each side at its answer token, the first token
        where the two answers differ (the letter in " (A)" / " (B)"; residtap.steering.ab)."""
        if method not in ("mean_diff", "pca"):
            raise ValueError(f"method must be 'mean_diff' or 'pca', got {method!r}")
        items = ab_items(tokenizer, rows)
        pos_ids = [it.prompt + [it.matching] for it in items]
        neg_ids = [it.prompt + [it.other] for it in items]
        vec = cls._from_token_ids(model, pos_ids, neg_ids, site, "last", method, normalize,
                                  pad_id_of(tokenizer), batch_size)
        vec.position = "answer"
        return vec

    @classmethod
    def _from_token_ids(cls, model, pos_ids, neg_ids, site, position, method, normalize,
                        pad_id, batch_size) -> SteeringVector:
        resolve_site(model, site)  # unknown sites fail here, before any forward
        pos = read_activations(model, pos_ids, site, position, pad_id, batch_size)
        neg = read_activations(model, neg_ids, site, position, pad_id, batch_size)
        diffs = pos - neg  # (N, d)
        mean_diff = diffs.mean(dim=0)
        vector = mean_diff if method == "mean_diff" else pca_direction(diffs, mean_diff)
        extra = {"n_pairs": len(pos_ids), "mean_diff_norm": float(mean_diff.norm())}
        if method == "pca":
            extra["explained"] = explained(diffs, vector)
        vec = cls(vector.float(), site, method, model_identity(model), position, False, extra)
        log.info("made %r from %d pairs", vec, len(pos_ids))
        return vec.normalized_copy() if normalize else vec

    @classmethod
    def from_probe(
        cls,
        probe: Any,
        site: str | None = None,
        *,
        row: int | None = None,
        model: nn.Module | None = None,
        normalize: bool = False,
    ) -> SteeringVector:
        """The direction of a probe's weights (a residtap Probe, or a raw (d,) / (C, d) tensor).

        For a probe with several rows (multinomial), `row` picks the class. The site defaults to
        the probe's own; `model` records (and for a Probe checks) which model it belongs to."""
        is_tensor = isinstance(probe, Tensor)
        weight = probe if is_tensor else getattr(probe, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(
                f"expected a residtap Probe (with a (C, d) .weight) or a tensor, got "
                f"{type(probe).__name__}"
            )
        weight = weight.detach().float().cpu()
        if weight.dim() == 1:
            weight = weight[None]
        if weight.dim() != 2:
            raise ValueError(f"probe weights must be (d,) or (C, d), got {tuple(weight.shape)}")
        if row is None:
            if weight.shape[0] != 1:
                raise ValueError(
                    f"the probe has {weight.shape[0]} weight rows (one per class); pass row=i "
                    "to choose which class direction to steer toward"
                )
            row = 0
        if not -weight.shape[0] <= row < weight.shape[0]:
            raise IndexError(f"row {row} out of range for {weight.shape[0]} probe weight rows")
        site = site if site is not None else (None if is_tensor else getattr(probe, "site", None))
        if site is None:
            raise ValueError("the probe records no site; pass site='layers.N' (where it was read)")
        identity = None if is_tensor else getattr(probe, "model", None)
        if model is not None:
            if identity is not None:
                check_same_model(identity, model, "the probe")
            identity = model_identity(model)
            resolve_site(model, site)
        method = "tensor" if is_tensor else "probe"
        extra = {} if is_tensor else {"probe_kind": str(getattr(probe, "kind", "")), "row": row}
        vec = cls(weight[row], site, method, identity, None, False, extra)
        return vec.normalized_copy() if normalize else vec

    def normalized_copy(self) -> SteeringVector:
        """This vector scaled to unit length."""
        norm = self.vector.norm()
        if float(norm) == 0.0:
            raise ValueError("cannot normalise a zero vector: the two sides gave equal activations")
        return SteeringVector(self.vector / norm, self.site, self.method, self.model,
                              self.position, True, dict(self.extra))

    def random_like(self, seed: int = 0) -> SteeringVector:
        """A random direction of the same norm at the same site (a baseline), reproducible."""
        gen = torch.Generator().manual_seed(seed)
        direction = torch.randn(self.d_model, generator=gen, dtype=torch.float32)
        vector = direction * (self.vector.norm() / direction.norm())
        return SteeringVector(vector, self.site, "random", self.model, None, self.normalized,
                              {"seed": seed, "like": self.method})

    # -- files (residtap.steering.files) ---------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the vector file (missing parent folders are created); a path that cannot be
        written (a folder, a file where a folder should be, read-only) is a ValueError."""
        return write_vector_file(path, self.vector, {
            "site": self.site, "method": self.method, "position": self.position,
            "normalized": self.normalized, "model": self.model, "extra": self.extra})

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, *,
             allow_other_weights: bool = False) -> SteeringVector:
        """Read a vector saved by `save`, checking its metadata; with `model`, raise if it was
        made on another model (config, weights fingerprint, width) or for a site the model
        lacks. allow_other_weights=True accepts another checkpoint of the same config."""
        tensor, fields = read_vector_file(path)
        vec = cls(tensor, fields["site"], fields["method"], fields["model"], fields["position"],
                  fields["normalized"], fields["extra"])
        if model is not None:
            check_model(vec, model, allow_other_weights=allow_other_weights)
            try:
                resolve_site(model, vec.site)
            except LookupError as err:
                raise ValueError(f"{path} steers site {vec.site!r}, which this model lacks "
                                 f"({err}); use a vector made on this model") from err
        return vec
