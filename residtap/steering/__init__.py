"""Steering vectors: make them from contrast pairs or probes, add them inside the forward pass
with a strength per batch row, and measure per-example steerability.

    vec = SteeringVector.from_pairs(model, tok, positive, negative, site="layers.3")
    with steer(model, vec, strengths=torch.tensor([0.0, 4.0])):   # row 0 unsteered
        model.generate(**batch)
    steerability(model, tok, ab_rows, vec).summary()

Modules: vector (SteeringVector: making, saving, loading, applying), contrast (the arithmetic
of vectors from contrastive texts), ab (A/B items, tokenised), files (the vector file format),
direction (what the injection needs of a vector: check_model), inject (steer: the writer taps),
steerability (batched strength sweeps and per-example slopes), generation (side-by-side steered
generations), plot (PNG/HTML of a sweep: called by the command line and the demo).
"""

from residtap.steering.ab import ab_items
from residtap.steering.direction import check_model
from residtap.steering.generation import compare_generations
from residtap.steering.inject import Steering, coefficient_matrix, steer
from residtap.steering.steerability import (
    DEFAULT_STRENGTHS,
    SteerabilityResult,
    per_example_slopes,
    steerability,
)
from residtap.steering.vector import SteeringVector

__all__ = [
    "DEFAULT_STRENGTHS", "Steering", "SteerabilityResult", "SteeringVector", "ab_items",
    "check_model", "coefficient_matrix", "compare_generations", "per_example_slopes", "steer",
    "steerability",
]
