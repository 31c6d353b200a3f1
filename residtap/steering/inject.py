"""Adding steering vectors inside the forward pass, with a strength per vector and per batch row.

    with residtap.steer(model, vec, strengths=4.0):
        model.generate(**batch)
    with residtap.steer(model, [mood, topic], strengths=[torch.tensor([0., 4.]), 2.0]):
        model(**batch)                     # row 0: topic only; row 1: mood and topic

Each vector is added at its own site (`layers.{i}`: the residual stream after block i; the
post-LayerNorm sites `layers.{i}.ln1` / `ln2`: the normalised input of attention / the MLP only,
which leaves the residual stream itself alone). Several vectors may share a site; they are
summed into one delta per row, added by one writer tap per site.

strengths: one value for every vector, or a list with one entry per vector. An entry is a float
(every row) or a (B,) tensor (one strength per row). A (B, K) tensor gives row b the sum
over k of strengths[b, k] * vectors[k]. `vector_index` (B,) instead picks one vector per row:
row b gets vectors[vector_index[b]] at strengths[b]. Several vectors per row is the sum.

Rows whose strengths are all 0, and positions outside the policy, are left untouched, bit for
bit: the tap writes them back unchanged (`torch.where`), so no 0 * v term is ever added.

positions (the words of residtap.positions, checked there; counted in each row's real tokens
from its first one, so left padding shifts nothing):
    "all"        every position of every forward (pads too: no real token attends to them)
    "prompt"     the first forward of a sequence only (the prompt, under generate's KV cache)
    "generated"  the decode steps only: the tokens generate feeds back. A writer leaves the
                 state the first new token came from alone, so that token is the unsteered
                 prompt's (residtap.positions says why; -1 includes it)
    i >= 0       every token at index >= i (BOS, if any, is index 0)
    i < 0        from the prompt's i-th last token on: -1 steers the last prompt token and
                 everything generated (CAA's "after the prompt")
"prompt", "generated" and negative i rely on the KV cache to tell the prompt from generated
tokens (generate's default); with use_cache=False every step re-runs the whole sequence as a
new prompt. Beam search and num_return_sequences multiply the rows: give per-row strengths for
the expanded batch, or use float strengths.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from residtap.engine import Step, TapBlock
from residtap.positions import check_positions, real_index
from residtap.sites import Arch, Site, resolve_site
from residtap.steering.direction import Direction, check_model

log = logging.getLogger(__name__)

PositionPolicy = Literal["all", "prompt", "generated"] | int
POSITION_WORDS: tuple[str, ...] = ("all", "prompt", "generated")  # and an int: from there on
StrengthSpec = float | int | Tensor
Strengths = StrengthSpec | Sequence[StrengthSpec]


class _SiteTap:
    """The writer tap at one site: hidden (B, T, d) + delta[row] where the row and the position
    are active. delta = coef (R, K) @ vectors (K, d), R = B rows or 1 (the same for all)."""

    def __init__(self, site: Site, vectors: Tensor, coef: Tensor, positions: PositionPolicy):
        self.site = site
        self.delta = coef @ vectors  # (R, d) float32 on the CPU
        self.row_active = (coef != 0).any(dim=1)  # (R,)
        self.all_rows = bool(self.row_active.all())
        self.positions = positions
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _on_device(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        key = (hidden.device, hidden.dtype)
        found = self._cache.get(key)
        if found is None:
            delta = self.delta.to(device=hidden.device, dtype=hidden.dtype)
            found = self._cache[key] = (delta, self.row_active.to(hidden.device))
        return found

    def __call__(self, hidden: Tensor, step: Step) -> Tensor | None:
        B, T, d = hidden.shape[0], hidden.shape[1], hidden.shape[-1]
        if d != self.delta.shape[1] or hidden.dim() != 3:
            raise ValueError(
                f"steering at site {self.site.name!r} expects activations (B, T, "
                f"{self.delta.shape[1]}), got {tuple(hidden.shape)}; steer a residual-stream "
                "site such as 'layers.3' or 'layers.3.ln1'"
            )
        R = self.delta.shape[0]
        if R not in (1, B):
            raise ValueError(
                f"per-row steering strengths cover {R} rows but this forward has {B} rows "
                "(beam search and num_return_sequences expand the batch); give strengths for "
                "every row of the forward, or a float for all rows"
            )
        position_mask = self._position_mask(step, B, T, hidden.device)  # (B, T) | True | False
        if position_mask is False:
            return None
        delta, row_active = self._on_device(hidden)
        steered = hidden + delta[:, None, :]  # (B, T, d)
        if position_mask is True:
            if self.all_rows:
                return steered
            return torch.where(row_active[:, None, None], steered, hidden)
        active = position_mask & row_active[:, None]  # (B, T)
        return torch.where(active[:, :, None], steered, hidden)

    def _position_mask(self, step: Step, B: int, T: int, device) -> Tensor | bool:
        policy = self.positions
        if policy == "all":
            return True
        if policy == "prompt":
            return step.index == 0
        if policy == "generated":
            return step.index > 0
        if policy < 0 and step.index > 0:
            return True  # a decode step feeds only generated tokens, all after the prompt
        index = real_index(step.attention_mask, step.past, B, T, device)  # (B, T)
        if policy >= 0:
            return index >= policy
        n_prompt = index[:, -1:] + 1  # (B, 1): this is the prompt's forward, its last is real
        return index >= n_prompt + policy


class Steering(TapBlock):
    """`with steer(...):` — a tap block holding one writer tap per steered site."""

    def __init__(
        self,
        model: nn.Module,
        vectors: Direction | Sequence[Direction],
        strengths: Strengths = 1.0,
        *,
        positions: PositionPolicy = "all",
        vector_index: Tensor | Sequence[int] | None = None,
        arch: Arch | None = None,
    ) -> None:
        self.vectors = _as_vector_list(vectors)
        check_positions(positions, words=POSITION_WORDS, indices="start", mask=False)
        for vec in self.vectors:
            check_model(vec, model)
        sites = [resolve_site(model, vec.site, arch) for vec in self.vectors]
        self.coefficients = coefficient_matrix(strengths, len(self.vectors), vector_index)
        taps: dict[Site, _SiteTap] = {}
        for site in dict.fromkeys(sites):
            ks = [k for k, s in enumerate(sites) if s == site]
            stacked = torch.stack([self.vectors[k].vector for k in ks])  # (K_s, d)
            taps[site] = _SiteTap(site, stacked, self.coefficients[:, ks], positions)
        self.site_taps = taps
        log.debug("steering %d vector(s) at %s", len(self.vectors), [s.name for s in taps])
        super().__init__(model, taps, arch=arch)

    def __enter__(self) -> Steering:
        super().__enter__()
        return self


def steer(
    model: nn.Module,
    vectors: Direction | Sequence[Direction],
    strengths: Strengths = 1.0,
    *,
    positions: PositionPolicy = "all",
    vector_index: Tensor | Sequence[int] | None = None,
    arch: Arch | None = None,
) -> Steering:
    """Add `vectors` (at their sites) during the forwards run inside the `with` block; see the
    module docstring for strengths, per-row vectors and positions."""
    return Steering(model, vectors, strengths, positions=positions, vector_index=vector_index,
                    arch=arch)


def _as_vector_list(vectors: object) -> list[Direction]:
    items = [vectors] if isinstance(vectors, Direction) else vectors
    if not isinstance(items, Sequence) or isinstance(items, (str, Tensor)):
        raise TypeError(
            f"expected a SteeringVector or a list of them, got {type(vectors).__name__}; wrap a "
            "raw tensor with SteeringVector.from_probe(tensor, site='layers.N')"
        )
    items = list(items)
    if not items:
        raise ValueError("no steering vectors given; pass at least one SteeringVector")
    bad = [type(v).__name__ for v in items if not isinstance(v, Direction)]
    if bad:
        raise TypeError(f"expected SteeringVector items, got {bad[0]}")
    return items


def coefficient_matrix(
    strengths: Strengths, n_vectors: int, vector_index: Tensor | Sequence[int] | None = None
) -> Tensor:
    """(R, K) float32: the strength of vector k in row r (R = 1 when every row is the same)."""
    if vector_index is not None:
        index = torch.as_tensor(vector_index).long().cpu().reshape(-1)  # (B,)
        if bool(((index < 0) | (index >= n_vectors)).any()):
            raise IndexError(
                f"vector_index must pick one of the {n_vectors} vectors (0..{n_vectors - 1}), "
                f"got {index.tolist()}"
            )
        per_row = _column(strengths, "strengths")
        if per_row.shape[0] not in (1, index.shape[0]):
            raise ValueError(
                f"vector_index has {index.shape[0]} rows but strengths has {per_row.shape[0]}; "
                "give one strength per row, or a float"
            )
        per_row = per_row.expand(index.shape[0])
        coef = torch.zeros(index.shape[0], n_vectors)
        coef[torch.arange(index.shape[0]), index] = per_row
        return _finite(coef)
    if isinstance(strengths, Tensor) and strengths.dim() == 2:
        if strengths.shape[1] != n_vectors:
            raise ValueError(
                f"a (B, K) strengths tensor needs K = {n_vectors} columns (one per vector), got "
                f"shape {tuple(strengths.shape)}"
            )
        return _finite(strengths.detach().float().cpu())
    if isinstance(strengths, (list, tuple)):
        if len(strengths) != n_vectors:
            raise ValueError(
                f"a list of strengths has one entry per vector: expected {n_vectors}, got "
                f"{len(strengths)}; for per-row strengths pass a tensor, e.g. "
                "torch.tensor([0.0, 4.0])"
            )
        columns = [_column(s, f"strengths[{k}]") for k, s in enumerate(strengths)]
    else:
        columns = [_column(strengths, "strengths")] * n_vectors
    rows = {c.shape[0] for c in columns} - {1}
    if len(rows) > 1:
        raise ValueError(f"per-row strengths disagree on the number of rows: {sorted(rows)}")
    R = rows.pop() if rows else 1
    return _finite(torch.stack([c.expand(R) for c in columns], dim=1))


def _column(spec: object, what: str) -> Tensor:
    if isinstance(spec, bool) or not isinstance(spec, (int, float, Tensor)):
        raise TypeError(
            f"{what} must be a float or a (B,) tensor of per-row strengths, got "
            f"{type(spec).__name__}"
        )
    col = torch.as_tensor(spec).detach().float().cpu()
    if col.dim() > 1:
        raise ValueError(f"{what} must be a float or a (B,) tensor, got shape {tuple(col.shape)}")
    return col.reshape(-1) if col.dim() == 1 else col.reshape(1)


def _finite(coef: Tensor) -> Tensor:
    if not torch.isfinite(coef).all():
        raise ValueError("steering strengths must be finite numbers (found inf or nan)")
    return coef
