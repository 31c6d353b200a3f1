"""What steering needs of a vector: a direction, the site it is added at, the model it fits.

    check_model(vec, model)       # ValueError unless vec fits model (width, recorded identity)
    isinstance(vec, Direction)    # True for every SteeringVector

`Direction` is the shape `steer` (residtap.steering.inject) accepts; `SteeringVector`
(residtap.steering.vector) is its one implementation, which also makes, saves and applies
vectors. The injection reads vectors through this module, so the vector module can offer
`vec.apply(model, 4.0)` (= `steer(model, vec, 4.0)`) without the two importing each other.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from residtap.identity import check_same_model


@runtime_checkable
class Direction(Protocol):
    """A steering direction: `vector` (d,) float32, added at `site`; `model` is the identity
    of the model it was made on (residtap.identity), or None when unknown."""

    vector: Tensor  # (d,)
    site: str
    model: dict[str, Any] | None

    @property
    def d_model(self) -> int: ...


def check_model(vec: Direction, model: nn.Module, *,
                allow_other_weights: bool = False) -> None:
    """ValueError when `vec` does not fit `model` (width, or the recorded model identity:
    config and weights fingerprint; allow_other_weights=True accepts another checkpoint)."""
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(d, int) and d != vec.d_model:
        raise ValueError(
            f"steering vector for site {vec.site!r} has d={vec.d_model}, but "
            f"{type(model).__name__} has hidden_size {d}; use a vector made on this model"
        )
    if vec.model is not None and vec.model.get("config_hash"):
        check_same_model(vec.model, model, "the steering vector",
                         allow_other_weights=allow_other_weights)
