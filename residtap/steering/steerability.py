"""How well a vector steers a behaviour, per example (Tan et al. 2024), in batched forwards.

    result = steerability(model, tok, ab_rows, vec, strengths=[-1.5, -1, -0.5, 0, 0.5, 1, 1.5])
    result.summary()["vector"]["mean"]       # mean per-example slope
    save_steerability_plot(result, "sweep.png", "sweep.html")   # residtap.steering.plot

Data rows are CAA-style A/B items: {"question", "answer_matching_behavior",
"answer_not_matching_behavior"}, tokenised by residtap.steering.ab (a shared prompt, and each
answer's first own token). The propensity of a row is logit(matching token) - logit(other
token) at the prompt's last position, in float32.

The sweep runs every (example, strength) pair, and the same for a random direction of equal norm
(the baseline), as rows of the same batches: each row carries its own vector and strength, so a
7-strength sweep with its baseline costs one forward per `batch_size` rows instead of 14
passes. The steerability of an example is the least-squares slope of its propensity against
strength; the summary reports the mean, spread, and the fraction with a negative slope (steered
the wrong way). Slopes are per unit of strength: they scale with the vector's norm (reported).

Positions default to -1, CAA's convention for A/B items: the vector is added "at all token
positions after the user's prompt", which for a next-token propensity is the answer position
(the prompt's last token). With positions=-k (steer the last k prompt tokens) the rest of each
prompt is the same for every strength: it runs once per example, its KV cache is repeated for
the example's rows, and only the last k tokens run per row. positions="all" (steer the whole
prompt, as steering-vectors does by default) makes every row differ from the first token, so
each row runs its whole prompt.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from residtap.inputs import cache_keyword, forward_inputs, pad_id_of, pad_left
from residtap.steering.ab import ab_items
from residtap.steering.direction import check_model
from residtap.steering.inject import PositionPolicy, steer
from residtap.steering.vector import SteeringVector

log = logging.getLogger(__name__)

DEFAULT_STRENGTHS: tuple[float, ...] = (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5)


@dataclass
class SteerabilityResult:
    """Propensities (N examples, S strengths) for the vector and the random baseline."""

    strengths: list[float]
    propensity: Tensor  # (N, S)
    baseline: Tensor | None  # (N, S), random direction of equal norm
    vector_norm: float
    site: str
    n_forwards: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def slopes(self) -> Tensor:
        return per_example_slopes(self.strengths, self.propensity)

    @property
    def baseline_slopes(self) -> Tensor | None:
        return None if self.baseline is None else per_example_slopes(self.strengths, self.baseline)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_examples": int(self.propensity.shape[0]), "strengths": self.strengths,
            "site": self.site, "vector_norm": self.vector_norm, "n_forwards": self.n_forwards,
            "vector": slope_stats(self.slopes, self.strengths, self.propensity),
        }
        if self.baseline is not None:
            out["random_baseline"] = slope_stats(self.baseline_slopes, self.strengths,
                                                 self.baseline)
        return {**out, **self.info}

    def to_dict(self) -> dict[str, Any]:
        """The summary plus every propensity, for JSON."""
        data = self.summary()
        data["propensity"] = self.propensity.tolist()
        if self.baseline is not None:
            data["baseline_propensity"] = self.baseline.tolist()
        return data


def per_example_slopes(strengths: Sequence[float], propensity: Tensor) -> Tensor:
    """(N,) least-squares slope of each row of `propensity` (N, S) against `strengths` (S,)."""
    x = torch.as_tensor(strengths, dtype=torch.float64)
    xc = x - x.mean()
    denom = float((xc**2).sum())
    if denom == 0.0:
        raise ValueError(f"need at least two different strengths for a slope, got {strengths}")
    y = propensity.double()
    return ((y - y.mean(dim=1, keepdim=True)) @ xc / denom).float()


def slope_stats(slopes: Tensor, strengths: Sequence[float], propensity: Tensor) -> dict:
    """Mean, spread and wrong-way fraction of per-example slopes, and the mean curve."""
    s = slopes.double()
    q25, median, q75 = (float(v) for v in torch.quantile(s, torch.tensor([0.25, 0.5, 0.75],
                                                                           dtype=torch.float64)))
    mean_curve = propensity.double().mean(dim=0)
    return {
        "mean": float(s.mean()),
        "std": float(s.std()) if s.numel() > 1 else 0.0,
        "median": median, "q25": q25, "q75": q75, "iqr": q75 - q25,
        "wrong_way": float((s < 0).double().mean()),
        "mean_propensity": [float(v) for v in mean_curve],
        "mean_curve_r2": _r2(strengths, mean_curve),
    }


def _r2(strengths: Sequence[float], y: Tensor) -> float:
    x = torch.as_tensor(strengths, dtype=torch.float64)
    xc, yc = x - x.mean(), y - y.mean()
    ss = float((yc**2).sum())
    if ss == 0.0:
        return 1.0
    slope = float(xc @ yc) / float((xc**2).sum())
    return 1.0 - float(((yc - slope * xc) ** 2).sum()) / ss


def steerability(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    vector: SteeringVector,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    *,
    positions: PositionPolicy = -1,
    baseline: bool = True,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> SteerabilityResult:
    """Per-example steerability of `vector` on A/B `rows` over `strengths`; see the module
    docstring. batch_size: rows (example x strength x vector) per forward."""
    if not isinstance(vector, SteeringVector):
        raise TypeError(f"vector must be a SteeringVector, got {type(vector).__name__}")
    strengths = [float(s) for s in strengths]
    if len({*strengths}) < 2 or not all(math.isfinite(s) for s in strengths):
        raise ValueError(f"need at least two different finite strengths, got {strengths}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_model(vector, model)
    items = ab_items(tokenizer, rows)
    vectors = [vector] + ([vector.random_like(seed)] if baseline else [])
    N, S, V = len(items), len(strengths), len(vectors)
    suffix = -positions if isinstance(positions, int) and positions < 0 else 0
    shared = suffix > 0 and all(len(it.prompt) > suffix for it in items)
    # Sweep rows: example-major (sorted by length, to pad little), then vector, then strength.
    order = sorted(range(N), key=lambda i: len(items[i].prompt))
    per_example = [(v, s) for v in range(V) for s in range(S)]
    step = max(1, batch_size // len(per_example)) if shared else batch_size
    plan = [[i] for i in order] if shared else [[(i, v, s)] for i in order for v, s in per_example]
    chunks = [sum(plan[k:k + step], []) for k in range(0, len(plan), step)]
    result = torch.empty(N, V, S)
    sweep = _SharedPrefixSweep(suffix) if shared else _FullSweep(positions)
    with torch.no_grad():
        for chunk in _progress(chunks, progress, "steerability sweep"):
            part = [(i, v, s) for i in chunk for v, s in per_example] if shared else chunk
            coef = torch.zeros(len(part), V)
            coef[torch.arange(len(part)), torch.tensor([v for _, v, _ in part])] = torch.tensor(
                [strengths[s] for _, _, s in part])
            last = sweep.last_logits(model, items, chunk if shared else [i for i, _, _ in part],
                                     vectors, coef, pad_id_of(tokenizer))  # (b, vocab)
            rows_ = torch.arange(len(part), device=last.device)
            match = torch.tensor([items[i].matching for i, _, _ in part], device=last.device)
            other = torch.tensor([items[i].other for i, _, _ in part], device=last.device)
            prop = (last[rows_, match] - last[rows_, other]).cpu()
            for (i, v, s), p in zip(part, prop.tolist(), strict=True):
                result[i, v, s] = p
    log.info("steerability: %d examples x %d strengths x %d vectors in %d forwards%s",
             N, S, V, sweep.forwards, " (shared prompt prefixes)" if shared else "")
    return SteerabilityResult(
        strengths, result[:, 0], result[:, 1] if baseline else None, vector.norm, vector.site,
        sweep.forwards, {"method": vector.method, "positions": positions, "seed": seed,
                         "shared_prefix": shared},
    )


class _FullSweep:
    """One forward per chunk: every row is its whole prompt, steered at `positions`."""

    def __init__(self, positions: PositionPolicy) -> None:
        self.positions, self.forwards = positions, 0

    def last_logits(self, model, items, examples, vectors, coef, pad_id) -> Tensor:
        ids, mask = pad_left([items[i].prompt for i in examples], pad_id)
        with steer(model, vectors, coef, positions=self.positions):
            logits = model(**forward_inputs(model, ids, mask, last_logits_only=True)).logits
        self.forwards += 1
        return logits[:, -1].float()


class _SharedPrefixSweep:
    """Steering only the last `suffix` prompt tokens leaves the rest of each prompt the same
    for every strength: run that prefix once per example (unsteered, keeping the KV cache),
    repeat the cache for the example's rows, and run only the suffix, steered, per row."""

    def __init__(self, suffix: int) -> None:
        self.suffix, self.forwards = suffix, 0

    def last_logits(self, model, items, examples, vectors, coef, pad_id) -> Tensor:
        k, copies = self.suffix, coef.shape[0] // len(examples)
        ids, mask = pad_left([items[i].prompt[:-k] for i in examples], pad_id)
        # the prefix is only needed for its KV cache: run the decoder without the LM head
        body = getattr(model, "base_model", model)
        out = body(**forward_inputs(body, ids, mask), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(copies)
        tail = torch.tensor([items[i].prompt[-k:] for i in examples]).repeat_interleave(copies, 0)
        full_mask = torch.cat([mask.repeat_interleave(copies, 0),
                               torch.ones(tail.shape, dtype=mask.dtype)], dim=1)
        inputs = forward_inputs(model, tail, full_mask, last_logits_only=True)
        if "position_ids" in inputs:
            inputs["position_ids"] = inputs["position_ids"][:, -k:]
        with steer(model, vectors, coef, positions="all"):  # every fed token is steered
            logits = model(**inputs, **{cache_keyword(model): cache}, use_cache=True).logits
        self.forwards += 2
        return logits[:, -1].float()


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="batch")
