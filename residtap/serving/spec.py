"""What one request asks residtap for, checked against what the server loaded.

    names = Catalogue(columns=["mood", "topic:sports", ...], probes={"mood": [0], ...},
                      vectors=["mood"], sites=["layers.3"])
    spec = names.spec(probes=["mood"], steer=("mood", 2.0), early_exit=("mood", 3.0))

Every bad value is a TypeError / LookupError / ValueError saying what was expected, what came
and how to fix it; the HTTP server answers those with 400 and the message. A RequestRecord
holds what a serving run (run.py) collected for one request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any, get_args

from torch import Tensor

from residtap.probes.early_exit import Direction

DIRECTIONS: tuple[str, ...] = get_args(Direction)  # "above", "below", "either"


@dataclass(frozen=True)
class RequestSpec:
    """columns: bank columns whose scores come back per generated token (names: theirs);
    vector / strength: the steering vector (index into the run's vectors) added at every
    position of the request, None for none; exit_column / threshold / direction: end the
    request after the first token whose score crosses the threshold; capture: sites whose rows
    of this request are recorded."""

    columns: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    vector: int | None = None
    strength: float = 0.0
    exit_column: int | None = None
    threshold: float = 0.0
    direction: str = "above"
    capture: tuple[str, ...] = ()

    @property
    def scored(self) -> bool:
        """Does the run read this request's scores on the host (to return or to exit)?"""
        return bool(self.columns) or self.exit_column is not None

    @property
    def read_columns(self) -> tuple[int, ...]:
        """The columns read back for this request: its scores and its early-exit column."""
        if self.exit_column is None or self.exit_column in self.columns:
            return self.columns
        return (*self.columns, self.exit_column)

    @property
    def steered(self) -> bool:
        return self.vector is not None and self.strength != 0.0

    @property
    def asks(self) -> bool:
        """Does the request ask the run for anything (scores, early exit, steering, capture)?"""
        return self.scored or self.steered or bool(self.capture)

    def crosses(self, score: float) -> bool:
        if self.direction == "above":
            return score > self.threshold
        if self.direction == "below":
            return score < self.threshold
        return abs(score) > self.threshold


NOTHING = RequestSpec()


@dataclass
class RequestRecord:
    """What the run collected for one request (written by the manager's thread)."""

    spec: RequestSpec
    scores: list[list[float]] = field(default_factory=list)  # per token: spec.names' values
    exit_token: int | None = None
    exit_score: float | None = None
    captured: dict[str, dict[int, Tensor]] = field(default_factory=dict)  # site -> pos -> (d,)


@dataclass
class Catalogue:
    """The names a request may use: the bank's score columns (and which belong to each probe),
    the loaded steering vectors, the sites capture was opened at."""

    columns: list[str] = field(default_factory=list)
    probes: Mapping[str, list[int]] = field(default_factory=dict)
    vectors: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)

    def spec(self, *, probes: Sequence[str] | None = None, steer: Any = None,
             early_exit: Any = None, capture: Sequence[str] | None = None) -> RequestSpec:
        """A RequestSpec from plain values (the Python API's arguments, or the fields of an
        HTTP request's "residtap" object). steer: ("name", strength) or {"vector", "strength"};
        early_exit: ("probe", threshold[, direction]) or {"probe", "threshold", "direction"}."""
        columns = self._columns(probes)
        vector, strength = self._steer(steer)
        exit_column, threshold, direction = self._early_exit(early_exit)
        sites = tuple(self._names(capture, "capture", "site", self.sites, "capture sites"))
        return RequestSpec(tuple(columns), tuple(self.columns[c] for c in columns), vector,
                           strength, exit_column, threshold, direction, sites)

    # -- parts --------------------------------------------------------------------------------
    def _columns(self, probes: Sequence[str] | None) -> list[int]:
        columns: list[int] = []
        for name in self._names(probes, "probes", "probe", [*self.probes, *self.columns],
                                "probes"):
            for c in self.probes.get(name, [self.columns.index(name)]
                                     if name in self.columns else []):
                if c not in columns:
                    columns.append(c)
        return columns

    def _steer(self, steer: Any) -> tuple[int | None, float]:
        if steer is None:
            return None, 0.0
        if isinstance(steer, Mapping):
            _only(steer, ("vector", "strength"), "steer")
            if "vector" not in steer:
                raise ValueError('steer needs a "vector" (the name of a loaded steering vector); '
                                 f'got the keys {sorted(steer)}')
            name, strength = steer["vector"], steer.get("strength", 1.0)
        elif isinstance(steer, (tuple, list)) and len(steer) == 2:
            name, strength = steer
        else:
            raise TypeError('steer must be {"vector": NAME, "strength": NUMBER} (or a (name, '
                            f"strength) pair in Python), got {type(steer).__name__} {steer!r}")
        [name] = self._names([name], "steer", "vector", self.vectors, "steering vectors")
        return self.vectors.index(name), _number(strength, "steer.strength")

    def _early_exit(self, rule: Any) -> tuple[int | None, float, str]:
        if rule is None:
            return None, 0.0, "above"
        if isinstance(rule, Mapping):
            _only(rule, ("probe", "threshold", "direction"), "early_exit")
            missing = [k for k in ("probe", "threshold") if k not in rule]
            if missing:
                raise ValueError(f'early_exit needs "probe" and "threshold"; missing {missing}')
            probe, threshold = rule["probe"], rule["threshold"]
            direction = rule.get("direction", "above")
        elif isinstance(rule, (tuple, list)) and len(rule) in (2, 3):
            probe, threshold, direction = (*rule, "above")[:3]
        else:
            raise TypeError('early_exit must be {"probe": NAME, "threshold": NUMBER, '
                            '"direction": "above"|"below"|"either"} (or a (probe, threshold) '
                            f"pair in Python), got {type(rule).__name__} {rule!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"early_exit.direction must be one of {list(DIRECTIONS)}, got "
                             f"{direction!r}")
        columns = self._columns([probe])
        if len(columns) != 1:
            names = [self.columns[c] for c in columns]
            raise ValueError(f"early_exit needs one score column, but probe {probe!r} has "
                             f"{len(columns)}: {names}; name one of them")
        return columns[0], _number(threshold, "early_exit.threshold"), direction

    @staticmethod
    def _names(values: Any, field_name: str, what: str, known: Sequence[str],
               plural: str) -> list[str]:
        if values is None:
            return []
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise TypeError(f"{field_name} must be a list of {what} names, got "
                            f"{type(values).__name__} {values!r}")
        out = []
        for value in values:
            if not isinstance(value, str):
                raise TypeError(f"{field_name} must hold {what} names (strings), got "
                                f"{type(value).__name__} {value!r}")
            if value not in known:
                close = get_close_matches(value, list(known), n=3)
                hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
                loaded = list(dict.fromkeys(known))
                raise LookupError(f"unknown {what} {value!r}{hint}; the {plural} loaded are: "
                                  f"{loaded or 'none'}")
            out.append(value)
        return out


def _only(given: Mapping, allowed: tuple[str, ...], field_name: str) -> None:
    extra = sorted(set(given) - set(allowed))
    if extra:
        raise ValueError(f"{field_name} takes the keys {list(allowed)}; unknown: {extra}")


def _number(value: Any, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field_name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{field_name} must be a finite number, got {value!r}")
    return float(value)
