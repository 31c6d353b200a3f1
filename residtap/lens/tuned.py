"""Tuned lens (Belrose et al. 2023): per-layer affine translators, trained from a store, that map
a layer's residual vector to what the final layer would decode, then read through the model's
own final norm and unembedding like the logit lens.

    store = residtap.extract(model, tok, data, "all-layers", "acts/")   # block outputs
    tuned = residtap.train_tuned_lens(model, store, steps=300)
    tuned.save("tuned.safetensors")                   # tuned = TunedLens.load(path, model)
    result = LogitLens(model, translators=tuned).run(ids, mask, max_new_tokens=8)

A translator is h -> h + A h + b with A and b starting at zero, so an untrained tuned lens is the
logit lens exactly. Training minimises KL(p_final || p_site) over the store's rows (the tuned-lens
objective), every site at once, with Adam; the model's weights are frozen. The final layer has no
translator (its lens is the model's output). A held-out tenth of the samples (grouped by
sample, so no text is on both sides) gives each site's KL with and without its translator:
`tuned.metrics`.

Files are residtap artefacts (residtap.artefacts: safetensors, JSON metadata, atomic writes) of
format "residtap.tuned_lens", format_version 2: tensors `A.<site>`, `b.<site>` and the fields
sites, model identity and metrics (version 1 files, format "residtap.tuned_lens/1", still
load). Loading never unpickles and checks the file whole before use: metadata, one (d, d) and
(d,) float pair per site, no NaN/Inf; with `model`, that it was trained
on that model (config and weights fingerprint, residtap.identity), that d is its width and that
the model has every site. `train_tuned_lens(..., out=path)` checks the path is writable before
training.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residtap.artefacts import check_out_file, read_artefact, write_artefact
from residtap.identity import check_same_model, model_identity
from residtap.lens.readout import Readout, readout_of
from residtap.probes.splits import grouped_split
from residtap.sites import num_layers, resolve_site
from residtap.store.reader import Store

log = logging.getLogger(__name__)

FORMAT = "residtap.tuned_lens"
FORMAT_VERSION = 2  # 2: residtap.artefacts' layout; 1 ("residtap.tuned_lens/1") is still read
LEGACY = {"residtap.tuned_lens/1": 1}
MAKE = "train one with residtap.train_tuned_lens(...) or `residtap tuned-lens`"


@dataclass
class TunedLens:
    """Translators per site: `A[site]` (d, d) and `b[site]` (d,); sites without one pass through."""

    A: dict[str, Tensor]
    b: dict[str, Tensor]
    model: dict[str, Any] | None = None  # identity of the model it was trained on
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return list(self.A)

    @classmethod
    def identity(cls, model: nn.Module, sites: list[str]) -> TunedLens:
        """Untrained translators (A = 0, b = 0): decodes exactly as the logit lens."""
        d = model.config.hidden_size
        return cls({s: torch.zeros(d, d) for s in sites}, {s: torch.zeros(d) for s in sites},
                   model_identity(model))

    def translate(self, site: str, hidden: Tensor) -> Tensor:
        """hidden (..., d) of `site` through its translator (unchanged if it has none)."""
        if site not in self.A:
            return hidden
        A, b = self.A[site].to(hidden), self.b[site].to(hidden)
        return hidden + F.linear(hidden, A, b)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file atomically (missing parent folders are created)."""
        tensors = {f"A.{s}": t for s, t in self.A.items()}
        tensors |= {f"b.{s}": t for s, t in self.b.items()}
        return write_artefact(path, FORMAT, FORMAT_VERSION, tensors, {
            "sites": self.sites, "model": self.model, "metrics": self.metrics})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None, *,
             allow_other_weights: bool = False) -> TunedLens:
        """Read a tuned-lens file (see the module docstring for what is checked). With `model`,
        check it was trained on that model; allow_other_weights=True accepts a lens trained on
        another checkpoint of the same config (with a warning)."""
        path = Path(path)
        meta, tensors = read_artefact(path, FORMAT, FORMAT_VERSION, "tuned-lens file", MAKE,
                                      legacy=LEGACY)
        sites = meta.get("sites", list)
        identity = meta.get("model", (dict, type(None)))
        metrics = meta.get("metrics", dict, {})
        if not sites or not all(isinstance(s, str) for s in sites) or len(set(sites)) < len(sites):
            raise ValueError(f"{path}: metadata 'sites' is {sites!r}, expected a list of distinct "
                             "site names; the file was damaged or edited, train it again")
        expected = {f"{k}.{s}" for s in sites for k in ("A", "b")}
        if set(tensors) != expected:
            raise ValueError(f"{path}: tensors {sorted(tensors)} do not match its sites {sites}; "
                             "the file was damaged or edited, train it again")
        d = tensors[f"b.{sites[0]}"].shape[0] if tensors[f"b.{sites[0]}"].dim() == 1 else -1
        for s in sites:
            A, b = tensors[f"A.{s}"], tensors[f"b.{s}"]
            if (tuple(A.shape), tuple(b.shape)) != ((d, d), (d,)) or not (
                    A.is_floating_point() and b.is_floating_point()):
                raise ValueError(
                    f"{path}: the translator of site {s!r} is A {tuple(A.shape)} {A.dtype}, b "
                    f"{tuple(b.shape)} {b.dtype}; expected float A ({d}, {d}) and b ({d},) like "
                    "every site's; the file was damaged or edited, train it again")
        lens = cls({s: tensors[f"A.{s}"] for s in sites}, {s: tensors[f"b.{s}"] for s in sites},
                   identity, metrics)
        if model is not None:
            if lens.model is not None:
                check_same_model(lens.model, model, "tuned lens",
                                 allow_other_weights=allow_other_weights)
            width = model.config.hidden_size
            if d != width:
                raise ValueError(f"{path}: translators are ({d}, {d}), but this model is {width} "
                                 "wide; use a tuned lens trained on this model")
            for s in sites:
                try:
                    resolve_site(model, s)
                except LookupError as err:
                    raise ValueError(f"{path} has a translator for site {s!r}, which this model "
                                     f"lacks ({err}); use a tuned lens trained on this model"
                                     ) from err
        return lens


def train_tuned_lens(
    model: nn.Module,
    store: Store | str | os.PathLike,
    *,
    sites: list[str] | None = None,
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    readout: Readout | None = None,
    progress: bool = False,
    out: str | os.PathLike | None = None,
) -> TunedLens:
    """Train translators for `sites` (default: every stored `layers.{i}` but the last) on the
    store's rows; the store must hold the last block's output `layers.{L-1}` (the target).
    out: a file to save the lens to, checked writable before training starts."""
    if out is not None:
        check_out_file(Path(out))
    store = store if isinstance(store, Store) else Store.open(store)
    check_same_model(store.model, model, "store")
    final = f"layers.{num_layers(model) - 1}"
    if final not in store.sites:
        raise ValueError(
            f"the store holds {store.sites} but not {final!r}, the last block's output that the "
            "translators learn to match; extract with sites='all-layers'"
        )
    if sites is None:
        sites = [s for s in store.sites if s.startswith("layers.") and s.count(".") == 1
                 and s != final]
    missing = [s for s in sites if s not in store.sites]
    if not sites or missing:
        raise ValueError(f"sites {sites} must be stored sites other than {final!r} (missing: "
                         f"{missing}); the store holds {store.sites}")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"expected steps >= 1, batch_size >= 1, lr > 0; got {steps}, "
                         f"{batch_size}, {lr}")
    readout = readout if readout is not None else readout_of(model)
    train, test = grouped_split(store.groups(), test_fraction=0.1, seed=seed)
    lens = TunedLens.identity(model, sites)
    params = [t.requires_grad_() for t in (*lens.A.values(), *lens.b.values())]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    bar = _bar(steps, progress)
    try:
        for _ in range(steps):
            idx = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=gen)]
            loss = _kl_loss(lens, store, readout, sites, final, idx.sort().values)
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix_str(f"KL {loss.item() / len(sites):.4f}", refresh=False)
        for t in params:
            t.requires_grad_(False)
        with torch.no_grad():
            lens.metrics = _held_out(lens, store, readout, sites, final, test)
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
    log.info("tuned lens: held-out KL per site %s", lens.metrics)
    if out is not None:
        lens.save(out)
    return lens


def _log_probs(readout: Readout, hidden: Tensor) -> Tensor:
    return F.log_softmax(readout.logits(hidden).float(), dim=-1)


def _kl(target: Tensor, logp: Tensor) -> Tensor:
    """Mean over rows of KL(p || q) from log-probabilities (R, V)."""
    return (target.exp() * (target - logp)).sum(-1).mean()


def _kl_loss(lens, store, readout, sites, final, idx) -> Tensor:
    with torch.no_grad():
        target = _log_probs(readout, store.rows_of(final, idx).float())
    return sum(_kl(target, _log_probs(readout, lens.translate(s, store.rows_of(s, idx).float())))
               for s in sites)


def _held_out(lens, store, readout, sites, final, test, chunk: int = 1024) -> dict:
    totals = {s: [0.0, 0.0] for s in sites}
    for lo in range(0, len(test), chunk):
        idx = test[lo:lo + chunk]
        target = _log_probs(readout, store.rows_of(final, idx).float())
        for s in sites:
            h = store.rows_of(s, idx).float()
            totals[s][0] += float(_kl(target, _log_probs(readout, h))) * len(idx)
            totals[s][1] += float(_kl(target, _log_probs(readout, lens.translate(s, h)))) * len(idx)
    return {s: {"logit_lens_kl": a / len(test), "tuned_lens_kl": b / len(test),
                "held_out_rows": len(test)} for s, (a, b) in totals.items()}


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="tuned lens", unit="step", disable=not enabled)
