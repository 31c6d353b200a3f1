"""Probes, steering, capture and early exit per request, on transformers' continuous batching.

    run = attach(manager, bank=bank, vectors={"mood": vec}, capture=["layers.3"])
    with run:                                   # taps open (between two forwards)
        manager.start()
        rid = run.add_request(ids, max_new_tokens=16, probes=["mood"], steer=("mood", 2.0),
                              early_exit=("mood", 3.0), capture=["layers.3"])
        ...                                     # the manager's output for rid, as usual
        run.scores(rid)["mood"]                 # (n_tokens,): one score per generated token
        run.exit_token(rid)                     # the token whose score ended it, or None
        run.captured(rid)["layers.3"]           # (positions, d) of this request, in order
        run.forget(rid)
        manager.stop(block=True)

One tap block (residtap.engine) on the manager's model, opened with any_thread=True (the
manager runs forwards on its own thread). Before each forward the block's on_forward asks the
adapter (transformers_cb.py) for the forward's PackedLayout, puts it on `step.packed` and
plans the forward from host-side ints (while no registered request asks for anything, it only
counts the forward, and every tap leaves it alone); inside the forward the taps use only
tensors:
- probe scores: token k's score is read at the row that picks token k (the bank's
  "generated"), for requests that asked for scores or early exit. A tap at each site of the
  bank runs one `F.linear` of the packed probes (probes/bank_layout.py) over those rows (every
  row at a site with attention probes, below); SAE feature columns then go through their
  activation (and folded probe) row by row (bank_readouts.SAESegment). (Keeping each site's
  whole output for one matmul pass at the end of the forward measured the same time in the
  taps but ~3% more CPU in the model's own ops: held outputs cannot be reused by the
  allocator.) Attention probes pool over every token:
  while a request that reads them is in the forward, a site with them multiplies every row,
  and each such request has its rows (prompt chunks and generated tokens) fed to its own state,
  carried from forward to forward in a slot table (serving/streams.py); the score at its
  token-picking row is read.
- steering: at each steered site one writer adds strength * vector to every row of each
  steered request (prompt and generated: the steer(...) default positions="all"), through
  torch.where as steering/inject.py does, so rows of unsteered requests are bit-identical.
  Writers run before readers at a site: probes and capture see the steered stream.
- capture: the rows of requests that asked for it, at the sites given to attach.
- end of forward (a reader at the `logits` site, the last thing the forward runs): when some
  request of this forward is scored, the packed matmuls, then the forward's one host read:
  the (R, U) scores of the U columns its requests asked for. Each row goes to its request id
  and token index, and an early-exit rule that crosses its threshold ends the request after
  this token (transformers_cb.finish_after: the manager's own finish, tokens kept). A forward
  with no scored request reads nothing back, and computes nothing but the attention probes of
  requests whose prompt chunk picks no token yet.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from residtap.engine import Step, TapBlock
from residtap.identity import check_same_model
from residtap.inputs import device_of
from residtap.probes.bank_layout import SitePack
from residtap.probes.bank_readouts import AttentionReadout
from residtap.serving import transformers_cb as cb
from residtap.serving.layout import PackedLayout, Segment
from residtap.serving.spec import NOTHING, Catalogue, RequestRecord, RequestSpec
from residtap.serving.streams import Group, RequestStreams
from residtap.serving.taps import CaptureTap, ScoreTap, steer_taps
from residtap.sites import Arch, Site, resolve_site
from residtap.steering.direction import Direction

log = logging.getLogger(__name__)
_IDS = itertools.count()


@dataclass
class _Plan:
    """One forward, planned before it runs (host ints, and the few index tensors it needs)."""

    layout: PackedLayout
    states: dict[str, Any]
    scored: list[tuple[Segment, RequestSpec]]  # the rows read back, in order
    rows: Tensor | None  # (R,) long: their rows in the forward; None: every row, in order
    columns: Tensor | None  # (U,) long: the score columns read back
    slot: dict[int, int]  # score column -> its place among them
    outputs: list[Tensor | None]  # per bank site: its (1, R, P_site) scores, once it has run
    steer: tuple[Tensor, Tensor, Tensor] | None  # per segment: vector (S,), strength, length
    steer_sites: frozenset[Site]
    capture: list[tuple[Segment, RequestSpec]]
    feed: list[Group] | None  # the rows of requests reading attention probes, by request slot


class ServingRun(TapBlock):
    """Taps on a ContinuousBatchingManager's model, configured per request (see the module
    docstring). bank: a residtap ProbeBank; vectors: {name: SteeringVector}; capture: sites
    whose rows a request may ask to record."""

    def __init__(self, manager: Any, *, bank: Any = None,
                 vectors: Mapping[str, Direction] | None = None, capture: Sequence[str] = (),
                 arch: Arch | None = None, allow_other_weights: bool = False) -> None:
        cb.require_supported()
        if vectors is not None and not isinstance(vectors, Mapping):
            raise TypeError(f"vectors must be a mapping name -> SteeringVector, got "
                            f"{type(vectors).__name__}; e.g. vectors={{'mood': vec}}")
        vectors = dict(vectors or {})
        attention = bank is not None and any(isinstance(p.readout, AttentionReadout)
                                             for p in bank.probes)
        cb.check_manager(manager, steering=bool(vectors), capture=bool(capture),
                         streams=attention)
        self.manager = manager
        model = manager.model
        self.device = device_of(model)
        self._specs: dict[str, RequestSpec] = {}
        self._records: dict[str, RequestRecord] = {}
        self._lock = threading.Lock()
        self._asking = 0  # registered requests that ask for something (spec.asks)
        self._plan: _Plan | None = None
        self._column_index: dict[tuple[int, ...], Tensor] = {}
        self.forwards = 0  # packed forwards seen
        self.host_reads = 0  # forwards whose scores were read back
        with cb.paused(manager):  # resolving sites may run residtap's validation forward
            packs, columns, probe_columns = _packs(bank, model, arch, allow_other_weights)
            writers = steer_taps(self, model, vectors, arch)
            capture_sites = {name: resolve_site(model, name, arch) for name in capture}
            end = resolve_site(model, "logits", arch)
        self.catalogue = Catalogue(columns, probe_columns, list(vectors), list(capture_sites))
        self.n_columns = len(columns)
        self.n_vectors = len(vectors)
        taps: dict[Site, list] = {}
        for site, writer in writers.items():
            taps.setdefault(site, []).append(writer)
        self.packs = packs
        self._streams(packs)
        for i, pack in enumerate(packs):
            taps.setdefault(pack.site, []).append(ScoreTap(self, i))
        for name, site in capture_sites.items():
            taps.setdefault(site, []).append(CaptureTap(self, name))
        taps.setdefault(end, []).append(self._end_of_forward)
        super().__init__(model, taps, arch=arch, any_thread=True, on_forward=self._on_forward)

    def __enter__(self) -> ServingRun:
        with cb.paused(self.manager):
            super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool:
        with cb.paused(self.manager):
            return super().__exit__(*exc)

    # -- requests -------------------------------------------------------------------------------
    def spec(self, **asks: Any) -> RequestSpec:
        """A RequestSpec checked against what was attached (see serving/spec.py)."""
        return self.catalogue.spec(**asks)

    def register(self, request_id: str, spec: RequestSpec) -> None:
        """Say what `request_id` asks for; call before the manager's add_request."""
        with self._lock:
            if request_id in self._specs:
                raise ValueError(f"request id {request_id!r} is already registered; use a new "
                                 "id per request (or forget the old one first)")
            self._specs[request_id] = spec
            self._records[request_id] = RequestRecord(spec)
            self._asking += spec.asks

    def add_request(self, input_ids: Sequence[int], *, request_id: str | None = None,
                    max_new_tokens: int | None = None, streaming: bool = False,
                    probes: Sequence[str] | None = None, steer: Any = None,
                    early_exit: Any = None, capture: Sequence[str] | None = None,
                    **kwargs: Any) -> str:
        """Register what the request asks residtap for, then add it to the manager; its id."""
        spec = self.spec(probes=probes, steer=steer, early_exit=early_exit, capture=capture)
        request_id = request_id or f"residtap-{next(_IDS)}"
        self.register(request_id, spec)
        added = self.manager.add_request(list(input_ids), request_id=request_id,
                                         max_new_tokens=max_new_tokens, streaming=streaming,
                                         **kwargs)
        if added is None:
            self.forget(request_id)
            raise RuntimeError("the continuous batching manager refused the request (it is "
                               "stopping or stopped); start it before adding requests")
        return request_id

    def record(self, request_id: str) -> RequestRecord:
        try:
            return self._records[request_id]
        except KeyError:
            raise LookupError(f"no request {request_id!r} is registered with this run (or it "
                              "was forgotten)") from None

    def scores(self, request_id: str) -> dict[str, Tensor]:
        """{column name: (n_tokens,) float32}: each generated token's score so far."""
        record = self.record(request_id)
        values = torch.tensor(record.scores, dtype=torch.float32).reshape(
            len(record.scores), len(record.spec.names))  # (n_tokens, columns)
        return {name: values[:, j] for j, name in enumerate(record.spec.names)}

    def exit_token(self, request_id: str) -> int | None:
        return self.record(request_id).exit_token

    def captured(self, request_id: str) -> dict[str, Tensor]:
        """{site: (positions, d)} on the CPU, in position order (a re-run position keeps its
        latest rows)."""
        record = self.record(request_id)
        return {site: torch.stack([rows[p] for p in sorted(rows)]).cpu()
                for site, rows in record.captured.items() if rows}

    def forget(self, request_id: str) -> None:
        """Drop a request's spec and results (the server does this when a response ends)."""
        with self._lock:
            spec = self._specs.pop(request_id, None)
            self._records.pop(request_id, None)
            self._asking -= spec is not None and spec.asks
        if self.streams is not None and spec is not None and self._streamed(spec):
            self.streams.release(request_id)

    # -- per forward ----------------------------------------------------------------------------
    def _on_forward(self, step: Step) -> None:
        self._plan = None
        if step.packed is None or not cb.in_manager_thread(self.manager):
            return  # not this manager's forward: the taps leave it alone
        self.forwards += 1
        if self.streams is not None:
            self.streams.collect()  # before any spec is read: a forgotten request's slot
        if not self._asking:
            return  # no request asks for anything: no layout to read, the taps leave it alone
        layout, states = cb.read_forward(self.manager)
        if layout.rows != step.length:
            raise RuntimeError(
                f"transformers {cb.transformers_version()}'s continuous batching packed "
                f"{step.length} tokens into this forward but its batch lists {layout.rows} "
                f"({layout.request_ids}); residtap.serving.transformers_cb no longer matches "
                "this release, so rows cannot be attributed to requests")
        step.packed = layout
        pairs = [(seg, self._specs.get(seg.request_id, NOTHING)) for seg in layout.segments]
        specs = [s for _, s in pairs]
        scored = [(seg, s) for seg, s in pairs if s.scored and seg.token >= 0]
        every = len(scored) == layout.rows  # decode only, every request scored: all rows
        rows = (torch.tensor([seg.last_row for seg, _ in scored], device=self.device)
                if scored and not every else None)
        wanted = sorted({c for _, s in scored for c in s.read_columns})
        columns = self._columns(tuple(wanted)) if scored else None
        steer, sites = None, frozenset()
        if any(s.steered for s in specs):
            K = self.n_vectors
            picks = [s.vector if s.steered else K for s in specs]
            steer = (torch.tensor(picks, device=self.device),
                     torch.tensor([s.strength if s.steered else 0.0 for s in specs],
                                  dtype=torch.float32, device=self.device),
                     torch.tensor([seg.length for seg in layout.segments], device=self.device))
            sites = frozenset(site for site, writer in self._writers.items()
                              if any(k < K and writer.here[k] for k in picks))
        capture = [(seg, s) for seg, s in pairs if s.capture]
        feed = None
        fed = ([seg for seg, s in pairs if s.scored and self._streamed(s)]
               if self.streams is not None else [])
        if fed:  # requests reading attention probes: every row of theirs goes to their states
            where = {seg.request_id: r for r, (seg, _) in enumerate(scored)}
            feed = self.streams.plan(fed, [where.get(seg.request_id) for seg in fed],
                                     len(scored))
        self._plan = _Plan(layout, states, scored, rows, columns,
                           {c: j for j, c in enumerate(wanted)}, [None] * len(self.packs),
                           steer, sites, capture, feed)

    def _streams(self, packs: list[SitePack]) -> None:
        """The attention segments' per-request states (serving/streams.py) and their columns."""
        segments: list[Any] = []
        self._tables: list[dict[int, int]] = []  # per site: attention segment -> its table
        attention: set[int] = set()
        for pack in packs:
            self._tables.append({})
            column = pack.start + pack.n_linear
            for j, segment in enumerate(pack.segments):
                if segment.streams:
                    self._tables[-1][j] = len(segments)
                    segments.append(segment)
                    attention.update(range(column, column + segment.width))
                column += segment.width
        self.streams = RequestStreams(segments, self.device) if segments else None
        self._attention_columns = frozenset(attention)

    def _streamed(self, spec: RequestSpec) -> bool:
        """Does the request read a column of an attention probe (then its rows all feed it)?"""
        return not self._attention_columns.isdisjoint(spec.read_columns)

    def _columns(self, wanted: tuple[int, ...]) -> Tensor:
        found = self._column_index.get(wanted)
        if found is None:
            if len(self._column_index) > 256:
                self._column_index.clear()
            found = self._column_index[wanted] = torch.tensor(wanted, device=self.device)
        return found

    def _rows(self, hidden: Tensor, plan: _Plan) -> Tensor:
        """The forward's (N, d) rows of a site's (1, N, d) tensor."""
        return self._checked(hidden, plan)[0]

    def _checked(self, hidden: Tensor, plan: _Plan) -> Tensor:
        """A site's tensor, once seen to be the forward's (1, N, d)."""
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] != plan.layout.rows:
            raise RuntimeError(f"a packed forward of {plan.layout.rows} tokens gave this site "
                               f"a tensor of shape {tuple(hidden.shape)}, expected (1, "
                               f"{plan.layout.rows}, d)")
        return hidden

    def site_scores(self, index: int, hidden: Tensor, plan: _Plan) -> Tensor | None:
        """(1, R, P_site) scores of bank site `index` for the forward's scored rows, from its
        (1, N, d) output (kept 3-D: taking out the 1 is a Python-level op per site). A site with
        attention probes first feeds every row of the streamed requests to their states; then
        it returns None when no row is scored."""
        pack = self.packs[index]
        tables = self._tables[index]  # {segment: table} of its attention probes
        every_row = bool(tables) and plan.feed is not None  # pooled over every row
        if not plan.scored and not every_row:
            return None
        hidden = self._checked(hidden, plan)
        chosen = hidden if every_row or plan.rows is None else hidden.index_select(1, plan.rows)
        proj = F.linear(chosen, pack.weight, pack.bias)  # (1, N or R, M_site) matmul columns
        if not pack.segments:
            return proj  # (1, R, P_site): linear probes' columns are their scores
        proj = proj[0]  # (N or R, M_site)
        pooled = {j: [(group, self.streams.update(k, proj[:, pack.segments[j].cols], group))
                      for group in plan.feed]  # (S_read, O) per group
                  for j, k in tables.items()} if every_row else {}
        if not plan.scored:
            return None
        read = proj if plan.rows is None or not every_row else proj.index_select(0, plan.rows)
        R = read.shape[0]
        parts = [read[:, :pack.n_linear].float()] if pack.n_linear else []
        for j, segment in enumerate(pack.segments):
            if not segment.streams:  # SAE features: the activation (and a folded probe)
                parts.append(segment(read[None, :, segment.cols], None, None)[0])
            elif len(pooled.get(j, ())) == 1 and pooled[j][0][0].into is None:
                parts.append(pooled[j][0][1])  # every scored row, in order
            else:  # rows not read here (or no request of this forward reads it): 0
                part = read.new_zeros(R, segment.width, dtype=torch.float32)
                for group, scores in pooled.get(j, ()):
                    if group.into is not None:
                        part.index_copy_(0, group.into, scores)
                    elif R:
                        part.copy_(scores)
                parts.append(part)
        return torch.cat(parts, dim=1)[None]  # (1, R, P_site) float32: pooled not rounded

    def _end_of_forward(self, hidden: Tensor, step: Step) -> None:
        plan, self._plan = self._plan, None
        if plan is None or not plan.scored:
            return None
        per_site = plan.outputs  # (1, R, P_site) each, from the score taps
        scores = torch.cat(per_site, dim=2) if len(per_site) > 1 else per_site[0]  # (1, R, P)
        host = scores.index_select(2, plan.columns).float().tolist()[0]  # the one host read
        self.host_reads += 1
        for r, (seg, spec) in enumerate(plan.scored):
            record = self._records.get(seg.request_id)
            if record is None:
                continue  # forgotten while running (a cancelled request)
            if len(record.scores) < seg.token:
                raise RuntimeError(f"request {seg.request_id!r}: token {seg.token} was scored "
                                   f"but only {len(record.scores)} tokens before it were; the "
                                   "forward's layout and the request's tokens disagree")
            del record.scores[seg.token:]  # a soft-reset request re-prefills its tokens
            row = host[r]
            record.scores.append([row[plan.slot[c]] for c in spec.columns])
            if spec.exit_column is not None and record.exit_token is None:
                score = row[plan.slot[spec.exit_column]]
                if spec.crosses(score):
                    record.exit_token, record.exit_score = seg.token, score
                    cb.finish_after(plan.states[seg.request_id], seg.token + 1)
        return None


def _packs(bank: Any, model: Any, arch: Arch | None, allow_other_weights: bool
           ) -> tuple[list[SitePack], list[str], dict[str, list[int]]]:
    if bank is None or len(bank) == 0:
        return [], [], {}
    for p in bank.probes:
        if p.model is not None and p.model.get("config_hash"):
            check_same_model(p.model, model, f"probe {p.name!r}",
                             allow_other_weights=allow_other_weights)
    packs, columns, probe_columns, _ = bank.layout(model, arch)
    for pack in packs:
        if pack.site.field is not None:
            raise ValueError(f"probes at {pack.site.name!r} cannot be served: under continuous "
                             "batching the model computes logits only for the rows that pick "
                             "a token; probe 'norm' (the final norm's output) instead")
    return packs, columns, probe_columns


def attach(manager: Any, **kwargs: Any) -> ServingRun:
    """ServingRun(manager, bank=..., vectors=..., capture=...): see the module docstring."""
    return ServingRun(manager, **kwargs)
