"""What an attached probe bank hands back: one run's scores, per row, token and probe.

    res = run.results()
    res["refusal"]          # (B, T, C) scores of one probe
    res.rows()              # per row: {column: its valid tokens' scores}
    res.to_dict()           # JSON-ready
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class ProbeResults:
    """Scores of one run, per row, token and probe column (CPU tensors).

    scores (B, T, P); valid (B, T) bool: real tokens scored while the row was running;
    names: the P column names ('probe' or 'probe:class'); aggregates {name: (B, P)}."""

    names: list[str]
    probe_columns: dict[str, list[int]]
    positions: str
    scores: Tensor
    valid: Tensor
    aggregates: dict[str, Tensor]

    def __getitem__(self, probe: str) -> Tensor:
        """(B, T, C) scores of one probe (C = its classes, 1 for a binary probe)."""
        if probe not in self.probe_columns:
            raise LookupError(
                f"no probe {probe!r} in these results; probes: {list(self.probe_columns)}"
            )
        return self.scores[..., self.probe_columns[probe]]

    def rows(self) -> list[dict[str, Tensor]]:
        """Per row (request): {column name: (n_b,) scores at its valid tokens}."""
        out = []
        for b in range(self.scores.shape[0]):
            kept = self.scores[b][self.valid[b]]  # (n_b, P)
            out.append({n: kept[:, i] for i, n in enumerate(self.names)})
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per row, per column, the list of valid-token scores, and aggregates."""
        rows = [{n: v.tolist() for n, v in r.items()} for r in self.rows()]
        aggs = {
            a: [dict(zip(self.names, row, strict=True)) for row in t.tolist()]
            for a, t in self.aggregates.items()
        }
        return {
            "positions": self.positions,
            "columns": self.names,
            "rows": rows,
            "aggregates": aggs,
        }
