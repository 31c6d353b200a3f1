"""Many linear probes read inside the forward pass, one fused matmul per site.

    bank = ProbeBank().add("refusal", W, b, site="layers.4")    # W (C, d) or (d,), b (C,)
    with bank.attach(model, max_tokens=64) as run:               # positions="generated"
        model.generate(**batch, max_new_tokens=64)
    run.results()["refusal"]                                     # (B, 64, C): one per new token

Design (see docs in the project's issue 6):
- All probes reading one site are packed into one weight (P_site, d) and bias (P_site,); a
  forward costs one `F.linear` per site plus one slice copy into a preallocated score buffer
  (B, T_max, P_total). There is no Python work per probe.
- Nothing in the forward synchronises with the device: slots come from Python ints the engine
  derives from shapes (`step.past`, `step.length`); masks, aggregates and early-exit state are
  device tensors updated with tensor ops. The instrumented forward compiles with
  `torch.compile(fullgraph=True)`.
- Buffers have fixed addresses for the life of the attachment (CUDA-graph friendly); each new
  run (a forward without KV cache: a plain forward or a generate's prefill) starts over at slot 0.

Positions ("which tokens get a score"):
    "generated"    slot k is read at the forward that picks new token k: the prompt's last real
                   token for k = 0, then the token fed at decode step k. (B, max_new_tokens, P)
    "prompt_last"  the prompt's last real token only. (B, 1, P)
    "prompt"       every prompt position, pads included (marked invalid). (B, T_prompt, P)
    "all"          every position fed: prompt then each decode step. (B, T_prompt + new - 1, P)

Aggregates over the scored tokens (pads and rows stopped early are skipped), in device buffers:
"max", "mean" and "ema" (exponential moving average, bias-corrected so the first token counts
fully: ema = sum_t a(1-a)^(n-1-t) x_t / (1 - (1-a)^n)).
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residtap.engine import Step, TapBlock
from residtap.sites import Arch, Site, resolve_site

log = logging.getLogger(__name__)

BankPositions = Literal["generated", "prompt_last", "prompt", "all"]
Aggregate = Literal["max", "mean", "ema"]
POSITION_MODES: tuple[str, ...] = ("generated", "prompt_last", "prompt", "all")
AGGREGATES: tuple[str, ...] = ("max", "mean", "ema")


@dataclass
class BankProbe:
    """One probe of a bank: `scores = h @ weight.T + bias`, C = len(weight) columns."""

    name: str
    site: str
    weight: Tensor  # (C, d)
    bias: Tensor  # (C,)
    classes: list[Any] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        """Column names in the score buffer: the probe name, or 'name:class' per class."""
        if self.weight.shape[0] == 1:
            return [self.name]
        labels = (
            self.classes
            if len(self.classes) == self.weight.shape[0]
            else range(self.weight.shape[0])
        )
        return [f"{self.name}:{c}" for c in labels]


class ProbeBank:
    """A set of linear probes, packed per site when attached to a model.

    bank = ProbeBank().add("toxic", W, b, site="layers.6")
    bank.add_probe(trained_probe, name="mood")      # a residtap.probes Probe (or look-alike)
    with bank.attach(model, max_tokens=32) as run:
        model.generate(**batch, max_new_tokens=32)
    """

    def __init__(self, probes: Iterable[BankProbe] = ()) -> None:
        self.probes: list[BankProbe] = []
        self._layouts: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Layout]] = (
            weakref.WeakKeyDictionary())
        for p in probes:
            self._append(p)

    def __len__(self) -> int:
        return len(self.probes)

    def __repr__(self) -> str:
        sites = sorted({p.site for p in self.probes})
        return f"ProbeBank({len(self.probes)} probes, {self.n_columns} columns, sites={sites})"

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.probes]

    @property
    def n_columns(self) -> int:
        return sum(int(p.weight.shape[0]) for p in self.probes)

    def add(
        self,
        name: str,
        weight: Tensor,
        bias: Tensor | float | None = None,
        *,
        site: str,
        classes: Sequence[Any] = (),
        metadata: dict[str, Any] | None = None,
    ) -> ProbeBank:
        """Add a probe from raw tensors: weight (C, d) or (d,), bias (C,), scalar or None."""
        if not isinstance(weight, Tensor):
            raise TypeError(
                f"weight of probe {name!r} must be a torch.Tensor (C, d) or (d,), "
                f"got {type(weight).__name__}"
            )
        if weight.dim() == 1:
            weight = weight[None]
        if weight.dim() != 2 or weight.shape[0] == 0 or not weight.is_floating_point():
            raise ValueError(
                f"weight of probe {name!r} must be a float tensor (C, d) or (d,) "
                f"with C >= 1, got {weight.dtype} {tuple(weight.shape)}"
            )
        C = weight.shape[0]
        if bias is None:
            bias = torch.zeros(C, dtype=weight.dtype)
        bias = torch.as_tensor(bias, dtype=weight.dtype).reshape(-1)
        if bias.numel() == 1 and C > 1:
            bias = bias.expand(C)
        if tuple(bias.shape) != (C,):
            raise ValueError(
                f"bias of probe {name!r} must have shape ({C},) like weight's first "
                f"dimension, got {tuple(bias.shape)}"
            )
        if not isinstance(site, str):
            raise TypeError(
                f"site of probe {name!r} must be a site name such as 'layers.3', "
                f"got {type(site).__name__}"
            )
        self._append(
            BankProbe(
                name,
                site,
                weight.detach(),
                bias.detach().clone(),
                list(classes),
                dict(metadata or {}),
            )
        )
        return self

    def add_probe(self, probe: Any, name: str | None = None, site: str | None = None) -> ProbeBank:
        """Add a trained probe object (weight (C, d), bias (C,), classes, site, metadata)."""
        for attr in ("weight", "bias"):
            if not hasattr(probe, attr):
                raise TypeError(
                    f"expected a probe with .weight (C, d) and .bias (C,), got "
                    f"{type(probe).__name__} without .{attr}"
                )
        site = site or getattr(probe, "site", None)
        if site is None:
            raise ValueError("the probe records no site; pass site='layers.N' to add_probe")
        meta = dict(getattr(probe, "metadata", None) or {})
        if getattr(probe, "kind", None) is not None:
            meta.setdefault("kind", probe.kind)
        name = name or meta.get("name") or f"probe{len(self.probes)}"
        classes = list(getattr(probe, "classes", None) or [])
        if probe.weight.shape[0] == 1 and len(classes) == 2:
            classes = classes[1:]  # binary: the single column scores the positive class
        return self.add(name, probe.weight, probe.bias, site=site, classes=classes, metadata=meta)

    def layout(self, model: nn.Module, arch: Arch | None = None) -> _Layout:
        """The probes packed per resolved site for `model` (cached until the bank changes):
        (packs, column names, {probe: its columns}, device). Columns run site by site."""
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        wdtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        key = (len(self.probes), device, wdtype, arch)
        per_model = self._layouts.setdefault(model, {})
        if key not in per_model:
            per_model.clear()
            per_model[key] = self._pack(model, arch, device, wdtype)
        return per_model[key]

    def _pack(self, model: nn.Module, arch: Arch | None, device: torch.device,
              wdtype: torch.dtype) -> _Layout:
        groups: dict[Site, list[BankProbe]] = {}
        resolved: dict[str, Site] = {}
        for p in self.probes:
            if p.site not in resolved:  # LookupError names close matches
                resolved[p.site] = resolve_site(model, p.site, arch)
            groups.setdefault(resolved[p.site], []).append(p)
        packs: list[_Pack] = []
        names: list[str] = []
        probe_columns: dict[str, list[int]] = {}
        for site, members in groups.items():
            widths = {p.name: int(p.weight.shape[1]) for p in members}
            expected = _site_width(model, site)
            for name, d in widths.items():
                if expected is not None and d != expected:
                    raise ValueError(
                        f"probe {name!r} has d_model={d} but site {site.name!r} of "
                        f"{type(model).__name__} is {expected} wide; use a probe trained on "
                        "this model's activations at that site")
            if len(set(widths.values())) > 1:
                raise ValueError(f"probes at site {site.name!r} disagree on d_model: {widths}; "
                                 "every probe at one site must have the site's width")
            start = len(names)
            for p in members:
                cols = p.columns
                probe_columns[p.name] = list(range(len(names), len(names) + len(cols)))
                names += cols
            weight = torch.cat([p.weight for p in members]).to(device, wdtype)  # (P_site, d)
            bias = torch.cat([p.bias for p in members]).to(device, wdtype)  # (P_site,)
            packs.append(_Pack(site, weight, bias, start, len(names)))
        log.info("packed %d probes into %d site matrices (%d columns)", len(self.probes),
                 len(packs), len(names))
        return packs, names, probe_columns, device

    def add_file(self, path: str | os.PathLike[str], name: str | None = None, *,
                 model: nn.Module | None = None) -> ProbeBank:
        """Add a linear probe saved with `residtap.probes.save_probe` (name: the file's stem).
        With `model`, the file's recorded model identity is checked against it."""
        from residtap.probes.files import load_probe

        probe = load_probe(path, model=model)
        if getattr(probe, "kind", None) == "attention":
            raise TypeError(f"{path} holds an attention probe, which pools over a whole "
                            "sequence; a probe bank reads linear probes per token (logistic, "
                            "multinomial, ridge, diff_means)")
        return self.add_probe(probe, name=name or Path(path).stem)

    def _append(self, probe: BankProbe) -> None:
        if any(p.name == probe.name for p in self.probes):
            raise ValueError(
                f"the bank already has a probe named {probe.name!r}; names must be "
                "unique, pick another name"
            )
        self.probes.append(probe)

    def attach(
        self,
        model: nn.Module,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        positions: BankPositions = "generated",
        aggregate: Aggregate | Sequence[Aggregate] = (),
        ema_alpha: float = 0.1,
        dtype: torch.dtype = torch.float32,
        timed: bool = False,
        arch: Arch | None = None,
    ) -> BankRun:
        """A context manager that reads every probe during the forwards run inside it.

        batch_size / max_tokens size the score buffer (B, max_tokens, P_total); pass both to
        allocate it now (needed under torch.compile or CUDA graphs), otherwise it is allocated at
        the first forward (batch from the input, max_tokens = the prompt length for the prompt
        modes). max_tokens counts slots: max_new_tokens for "generated", 1 for "prompt_last".
        timed: accumulate wall time spent in the bank's own tap code (`run.tap_seconds`)."""
        return BankRun(
            self,
            model,
            batch_size=batch_size,
            max_tokens=max_tokens,
            positions=positions,
            aggregate=aggregate,
            ema_alpha=ema_alpha,
            dtype=dtype,
            timed=timed,
            arch=arch,
        )


def _site_width(model: nn.Module, site: Site) -> int | None:
    """The feature width a canonical site produces, when the config says; None: unknown."""
    config = getattr(model, "config", None)
    if site.name == "logits":
        return getattr(config, "vocab_size", None)
    canonical = site.name in ("embed", "norm") or site.name.startswith("layers.")
    return getattr(config, "hidden_size", None) if canonical else None


@dataclass
class _Pack:
    """The probes of one site, packed: scores[..., start:stop] = F.linear(h, weight, bias)."""

    site: Site
    weight: Tensor  # (P_site, d), model dtype and device
    bias: Tensor  # (P_site,)
    start: int
    stop: int


_Layout = tuple[list[_Pack], list[str], dict[str, list[int]], torch.device]


class BankRun(TapBlock):
    """An attached bank: a tap block whose buffers hold the latest run's scores.

    Attributes (device tensors, fixed addresses once allocated):
        scores (B, max_tokens, P)  valid (B, max_tokens) bool  active (B,) bool
        aggregates {name: (B, P)}
    Python ints: `filled` (slots written in this run), `prompt_len`, `run_id`."""

    def __init__(
        self,
        bank: ProbeBank,
        model: nn.Module,
        *,
        batch_size: int | None,
        max_tokens: int | None,
        positions: BankPositions,
        aggregate: Aggregate | Sequence[Aggregate],
        ema_alpha: float,
        dtype: torch.dtype,
        timed: bool,
        arch: Arch | None,
    ) -> None:
        if not isinstance(bank, ProbeBank) or len(bank) == 0:
            raise ValueError(
                "the probe bank is empty; add probes with bank.add(name, weight, "
                "bias, site=...) before attaching it"
            )
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        aggs = (aggregate,) if isinstance(aggregate, str) else tuple(aggregate)
        for a in aggs:
            if a not in AGGREGATES:
                raise ValueError(f"aggregate must be among {AGGREGATES}, got {a!r}")
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        for label, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{label} must be a positive int or None, got {value!r}")
        self.bank, self.positions, self.aggregate_names = bank, positions, aggs
        self.ema_alpha, self.dtype, self.timed = float(ema_alpha), dtype, timed
        layout = bank.layout(model, arch)
        self.packs, self.names, self.probe_columns, self.device = layout
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.scores: Tensor | None = None
        self.valid: Tensor | None = None
        self.active: Tensor | None = None
        self.aggregates: dict[str, Tensor] = {}
        self.filled = 0
        self.prompt_len = 0
        self.run_id = -1
        self.tap_seconds = 0.0
        self.tap_calls = 0
        self._step: Step | None = None
        self._slots: tuple[int, int] | None = None
        self._pick: Tensor | None = None  # (B,) position read per row, or None: a slice
        self._weights: Tensor | None = None  # (B, t) aggregation weight of each scored token
        self._ema: tuple[Tensor, Tensor] | None = None  # per-token weights, total decay
        self._sum_w: Tensor | None = None  # (B, 1) tokens aggregated (mean)
        self._ema_left: Tensor | None = None  # (B, 1) weight of the ema's zero start
        if batch_size is not None and max_tokens is not None:
            self._allocate(batch_size, max_tokens)
        taps = {pack.site: _SiteReadout(self, pack) for pack in self.packs}
        super().__init__(model, taps, arch=arch)

    def _allocate(self, batch: int, max_tokens: int) -> None:
        P = self.packs[-1].stop
        dev = self.device
        self.scores = torch.zeros(batch, max_tokens, P, dtype=self.dtype, device=dev)
        self.valid = torch.zeros(batch, max_tokens, dtype=torch.bool, device=dev)
        self.active = torch.ones(batch, dtype=torch.bool, device=dev)
        self.aggregates = {
            a: torch.zeros(batch, P, dtype=self.dtype, device=dev) for a in self.aggregate_names
        }
        self._sum_w = torch.zeros(batch, 1, dtype=self.dtype, device=dev)
        self._ema_left = torch.ones(batch, 1, dtype=self.dtype, device=dev)
        self.batch_size, self.max_tokens = batch, max_tokens
        log.info(
            "probe bank buffers: scores (%d, %d, %d) %s on %s",
            batch,
            max_tokens,
            P,
            self.dtype,
            dev,
        )

    def __enter__(self) -> BankRun:
        super().__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            for stream in getattr(self, "_streams", []):
                stream.flush()
        finally:
            swallowed = super().__exit__(exc_type, exc, tb)
        return swallowed

    # -- per forward -------------------------------------------------------------------------
    def _begin(self, step: Step) -> None:
        """Once per forward: work out the slots and positions, reset on a new run."""
        self._step = step
        B, T, past = step.batch, step.length, step.past
        if self.scores is None:
            if self.max_tokens is None and self.positions in ("generated", "all"):
                raise ValueError(
                    f"positions={self.positions!r} needs max_tokens (the number of "
                    "slots, e.g. max_new_tokens) to size the buffer; pass "
                    "bank.attach(model, max_tokens=...)"
                )
            default = 1 if self.positions == "prompt_last" else T
            self._allocate(self.batch_size or B, self.max_tokens or default)
        if B != self.batch_size:
            raise ValueError(
                f"the bank's buffers hold batch_size={self.batch_size} rows but this "
                f"forward has {B}; attach with batch_size={B}"
            )
        mask = step.attention_mask
        needs_real = past == 0 or self.positions == "all"
        # (B, T): which of this forward's tokens are real (None: all of them)
        real = mask[:, past:].bool() if mask is not None and needs_real else None
        if past == 0:
            self._new_run(T)
        elif self.run_id < 0:
            raise ValueError(
                "the bank saw a decode step without the prefill before it (the "
                "forward received a KV cache); attach the bank before the first "
                "forward of the sequence"
            )
        mode = self.positions
        self._pick = None
        if mode == "generated" or mode == "prompt_last":
            if past == 0:
                self._slots = (0, 1)
                self._pick = self._last_real(real, T)
                weights = self.active[:, None]
            elif mode == "generated":
                first = past - self.prompt_len + 1
                self._slots = (first, first + T)
                weights = self.active[:, None].expand(B, T)
            else:
                self._slots = None
        elif mode == "prompt":
            self._slots = (0, T) if past == 0 else None
            weights = real if real is not None else self.active[:, None].expand(B, T)
        else:  # "all"
            self._slots = (past, past + T)
            w = self.active[:, None].expand(B, T)
            weights = w & real if real is not None else w
        if self._slots is None:
            return
        lo, hi = self._slots
        if hi > self.max_tokens:
            raise ValueError(
                f"the probe bank's buffer has {self.max_tokens} slots per row but this forward "
                f"needs slots {lo}..{hi - 1} (positions={mode!r}); attach with a larger "
                "max_tokens (>= max_new_tokens for 'generated')"
            )
        self.valid[:, lo:hi] = weights
        self.filled = hi
        if self.aggregate_names:
            self._prepare_aggregates(weights.to(self.dtype))

    def _new_run(self, T: int) -> None:
        self.run_id += 1
        self.prompt_len = T
        self.filled = 0
        self.valid.zero_()
        self.active.fill_(True)
        for name, buf in self.aggregates.items():
            buf.fill_(-math.inf if name == "max" else 0.0)
        self._sum_w.zero_()
        self._ema_left.fill_(1.0)

    def _last_real(self, real: Tensor | None, T: int) -> Tensor | None:
        if real is None:
            return None  # the last position of every row
        arange = torch.arange(T, device=real.device)
        return torch.where(real, arange, -1).amax(dim=1).clamp(min=0)  # (B,)

    def _prepare_aggregates(self, w: Tensor) -> None:
        """Per-forward terms shared by every site: token weights, mean counts, ema decay."""
        self._weights = w  # (B, t) in {0, 1}
        if "mean" in self.aggregate_names:
            self._sum_w.add_(w.sum(dim=1, keepdim=True))
        if "ema" in self.aggregate_names:
            decay = 1.0 - self.ema_alpha * w  # (B, t)
            # weight of token t in this update: a * w_t * prod_{u > t} decay_u
            later = torch.flip(torch.cumprod(torch.flip(decay, [1]), dim=1), [1])  # prod_{u>=t}
            total = later[:, :1]  # (B, 1) prod over all tokens
            after = torch.cat([later[:, 1:], torch.ones_like(total)], dim=1)  # prod_{u>t}
            self._ema = (self.ema_alpha * w * after, total)
            self._ema_left.mul_(total)

    def read(self, pack: _Pack, hidden: Tensor, step: Step) -> None:
        """The tap body: one fused matmul for the site, written into the buffers."""
        if step is not self._step:
            self._begin(step)
        if self._slots is None:
            return
        if hidden.shape[-1] != pack.weight.shape[1]:
            raise ValueError(
                f"probes at site {pack.site.name!r} expect width {pack.weight.shape[1]} but the "
                f"site produced {tuple(hidden.shape)}; attach probes trained at this site"
            )
        if self._pick is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            h = hidden[rows, self._pick][:, None]  # (B, 1, d)
        elif self.positions in ("generated", "prompt_last") and step.past == 0:
            h = hidden[:, -1:]  # (B, 1, d)
        else:
            h = hidden  # (B, t, d)
        s = F.linear(h.to(pack.weight.dtype), pack.weight, pack.bias)  # (B, t, P_site)
        lo, hi = self._slots
        self.scores[:, lo:hi, pack.start : pack.stop] = s
        if self.aggregate_names:
            self._aggregate(pack, s.to(self.dtype))

    def _aggregate(self, pack: _Pack, s: Tensor) -> None:
        w = self._weights[..., None]  # (B, t, 1)
        cols = slice(pack.start, pack.stop)
        if "max" in self.aggregates:
            buf = self.aggregates["max"][:, cols]
            buf.copy_(torch.maximum(buf, torch.where(w > 0, s, -math.inf).amax(dim=1)))
        if "mean" in self.aggregates:
            self.aggregates["mean"][:, cols].add_((s * w).sum(dim=1))
        if "ema" in self.aggregates:
            per_token, total = self._ema
            buf = self.aggregates["ema"][:, cols]
            buf.mul_(total).add_((s * per_token[..., None]).sum(dim=1))

    # -- reading results ---------------------------------------------------------------------
    def aggregate(self, name: Aggregate) -> Tensor:
        """The aggregate (B, P) over the run so far (mean/ema normalised; NaN: no tokens yet)."""
        if name not in self.aggregates:
            raise LookupError(
                f"aggregate {name!r} was not requested; attach with "
                f"aggregate={name!r} (requested: {list(self.aggregates)})"
            )
        buf = self.aggregates[name]
        if name == "max":
            return buf.clone()
        denom = self._sum_w if name == "mean" else 1.0 - self._ema_left
        return buf / denom

    def results(self, copy: bool = True) -> ProbeResults:
        """The latest run's scores, moved to the CPU (copied unless copy=False on CPU)."""
        if self.scores is None:
            raise LookupError(
                "no forward has run with this bank attached; call the model "
                "inside the `with bank.attach(...)` block first"
            )
        scores = self.scores[:, : self.filled]
        valid = self.valid[:, : self.filled]
        aggs = {a: self.aggregate(a).cpu() for a in self.aggregates}
        if copy:
            scores, valid = scores.clone(), valid.clone()
        return ProbeResults(
            self.names, dict(self.probe_columns), self.positions, scores.cpu(), valid.cpu(), aggs
        )

    def column(self, name: str, cls: Any = None) -> int:
        """Buffer column of probe `name` (class `cls` for multi-class probes)."""
        if name not in self.probe_columns:
            raise LookupError(f"no probe named {name!r} in the bank; probes: {self.bank.names}")
        cols = self.probe_columns[name]
        if len(cols) == 1:
            return cols[0]
        probe = next(p for p in self.bank.probes if p.name == name)
        labels = probe.classes if len(probe.classes) == len(cols) else list(range(len(cols)))
        if cls is None or cls not in labels:
            raise LookupError(
                f"probe {name!r} has {len(cols)} classes {labels}; pass "
                f"cls=<one of them> (got {cls!r})"
            )
        return cols[labels.index(cls)]

    def early_exit(
        self,
        probe: str,
        threshold: float,
        *,
        patience: int = 1,
        cls: Any = None,
        direction: Literal["above", "below", "either"] = "above",
    ):
        """A transformers StoppingCriteria stopping each row whose probe score passes
        `threshold` (direction "above", "below" or "either": |score|) for `patience`
        consecutive generated tokens (see early_exit.py)."""
        from residtap.probes.early_exit import EarlyExit

        return EarlyExit(self, probe, threshold, patience=patience, cls=cls, direction=direction)

    def streamer(self, callback):
        """A transformers StoppingCriteria (never stops) that hands each step's new scores to
        `callback(StepScores)` while generate runs (see early_exit.py)."""
        from residtap.probes.early_exit import ScoreStream

        stream = ScoreStream(self, callback)
        if not hasattr(self, "_streams"):
            self._streams = []
        self._streams.append(stream)
        return stream


class _SiteReadout:
    """The tap installed at one site: hands the hidden state to the run's fused readout."""

    def __init__(self, run: BankRun, pack: _Pack) -> None:
        self.run, self.pack = run, pack

    def __call__(self, hidden: Tensor, step: Step) -> None:
        run = self.run
        if run.timed:
            t0 = time.perf_counter()
            run.read(self.pack, hidden, step)
            run.tap_seconds += time.perf_counter() - t0
            run.tap_calls += 1
        else:
            run.read(self.pack, hidden, step)
        return None


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
