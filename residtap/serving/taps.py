"""The taps of a serving run (serving/run.py): each reads the run's plan of the current forward
(`run._plan`, made by its on_forward from the adapter's layout) and does its part per request.

    ScoreTap     a bank site's packed matmul over the rows whose scores are read (every row,
                 to feed their states, where requests read the site's attention probes)
    SteerTap     adds each steered request's own vector * strength to its rows
    CaptureTap   keeps the rows of requests that asked to capture a site
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from residtap.engine import Step
from residtap.sites import Arch, Site, resolve_site
from residtap.steering.direction import Direction, check_model

if TYPE_CHECKING:
    from residtap.serving.run import ServingRun


class ScoreTap:
    """Reader: bank site i's scores for the forward's scored rows (one packed matmul; see
    ServingRun.site_scores)."""

    def __init__(self, run: ServingRun, index: int) -> None:
        self.run, self.index = run, index

    def __call__(self, hidden: Tensor, step: Step) -> None:
        plan = self.run._plan
        if plan is not None and (plan.scored or plan.feed is not None):
            plan.outputs[self.index] = self.run.site_scores(self.index, hidden,
                                                            plan)  # (1, R, P_site) or None
        return None


class SteerTap:
    """Writer: row r of segment s gets + strength[s] * vectors[pick[s]] where that vector is
    at this site and the strength is not 0; every other row is returned as it came."""

    def __init__(self, run: ServingRun, site: Site, table: Tensor, here: list[bool]) -> None:
        self.run, self.site = run, site
        self.table = table  # (K + 1, d) float32: vector k where it is at this site, else 0
        self.here = here  # (K + 1) bools: is vector k at this site?
        self.here_t = torch.tensor(here)
        self._on: dict[tuple, tuple[Tensor, Tensor]] = {}

    def __call__(self, hidden: Tensor, step: Step) -> Tensor | None:
        plan = self.run._plan
        if plan is None or self.site not in plan.steer_sites:
            return None
        rows = self.run._rows(hidden, plan)  # (N, d)
        key = (rows.device, rows.dtype)
        if key not in self._on:
            self._on[key] = (self.table.to(rows.device), self.here_t.to(rows.device))
        table, here = self._on[key]
        picks, strengths, lengths = plan.steer
        delta = (strengths[:, None] * table[picks]).to(rows.dtype)  # (S, d), as inject.py
        active = (strengths != 0) & here[picks]  # (S,)
        N = plan.layout.rows
        delta = delta.repeat_interleave(lengths, dim=0, output_size=N)  # (N, d)
        active = active.repeat_interleave(lengths, output_size=N)  # (N,)
        return torch.where(active[:, None], rows + delta, rows)[None]  # (1, N, d)


class CaptureTap:
    """Reader: the rows of requests that asked to capture this site."""

    def __init__(self, run: ServingRun, name: str) -> None:
        self.run, self.name = run, name

    def __call__(self, hidden: Tensor, step: Step) -> None:
        plan = self.run._plan
        if plan is None or not plan.capture:
            return None
        rows = None
        for seg, spec in plan.capture:
            record = self.run._records.get(seg.request_id)
            if self.name not in spec.capture or record is None:
                continue
            rows = self.run._rows(hidden, plan) if rows is None else rows
            kept = rows[seg.start:seg.stop].detach().clone()  # (length, d)
            store = record.captured.setdefault(self.name, {})
            for i in range(seg.length):
                store[seg.position + i] = kept[i]
        return None


def steer_taps(run: ServingRun, model: Any, vectors: dict[str, Direction],
                arch: Arch | None) -> dict[Site, SteerTap]:
    run._writers = {}
    if not vectors:
        return run._writers
    for name, vec in vectors.items():
        if not isinstance(vec, Direction):
            raise TypeError(f"vectors[{name!r}] must be a SteeringVector, got "
                            f"{type(vec).__name__}")
        check_model(vec, model)
    sites = [resolve_site(model, vec.site, arch) for vec in vectors.values()]
    K, d = len(sites), next(iter(vectors.values())).vector.shape[-1]
    for site in dict.fromkeys(sites):
        here = [s == site for s in sites] + [False]
        table = torch.zeros(K + 1, d)  # (K + 1, d) float32
        for k, vec in enumerate(vectors.values()):
            if here[k]:
                table[k] = vec.vector.float()
        run._writers[site] = SteerTap(run, site, table, here)
    return run._writers
