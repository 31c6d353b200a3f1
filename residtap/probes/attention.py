"""Attention probes over a sequence's token activations (Shabalin & Belrose, 2025).

    from residtap.probes import train_attention_probe
    probe = train_attention_probe(X, y, mask=mask)   # X (N, T, d) padded, mask (N, T) bool
    probe.predict(X_test, mask=mask_test)            # (N,) class indices
    probe.attention(X_test, mask=mask_test)          # (N, H, T) where each head looked

Each head h has one learned query vector q_h and a position slope p_h. Over the valid tokens t
of a sequence, a_ht = softmax_t(x_t · q_h + p_h * pos_t), where pos_t counts valid tokens from
the start or (default) from the end. The head's output is sum_t a_ht (x_t @ V_hᵀ) with a value
projection V_h (C, d); outputs are summed over heads plus a bias (C,). C = 1 for binary tasks
(a logit) and the number of classes otherwise. Padding never reaches the output: padded
positions are zeroed and get no attention. Queries start at zero (mean pooling).

Training standardises the features (over valid training tokens) and folds the standardisation
into the final tensors exactly, so the probe applies to raw activations. Adam, minibatches of
sequences, weight decay `l2`; the epoch with the lowest validation loss (a split grouped by
`groups`) is kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .logistic import ClassWeight, class_weights, log_loss
from .metrics import Labels, classification_metrics, encode_labels
from .probe import probe_repr
from .ridge import safe_std
from .splits import GroupIds, grouped_split, row_split

log = logging.getLogger(__name__)

Position = Literal["from_start", "from_end"]
_CHUNK_SEQS = 256  # sequences per chunk when scoring


@dataclass
class AttentionProbe:
    """A trained attention probe; `scores(x, mask)` gives one logit row per sequence."""

    query: Tensor  # (H, d)
    position_weight: Tensor  # (H,)
    value: Tensor  # (H, C, d)
    bias: Tensor  # (C,)
    classes: list[Any]
    position: Position = "from_end"
    site: str | None = None
    threshold: float = 0.0  # binary: predict classes[1] where score > threshold
    label_column: str | None = None
    model: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: Literal["attention"] = field(default="attention", init=False)

    @property
    def d_model(self) -> int:
        return int(self.query.shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.query.shape[0])

    @property
    def n_outputs(self) -> int:
        return int(self.value.shape[1])

    def __repr__(self) -> str:  # never the weights
        return probe_repr(self, f"heads={self.n_heads}, position={self.position!r}")

    def attention(self, x: Tensor | Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        """Attention weights (N, H, T); zero at padded positions."""
        x, mask = as_padded(x, mask, self.d_model)
        return torch.cat(
            [
                _attend(x[i : i + _CHUNK_SEQS], mask[i : i + _CHUNK_SEQS], *self._tensors(x))[
                    1
                ].transpose(1, 2)
                for i in range(0, x.shape[0], _CHUNK_SEQS)
            ]
        )

    def scores(self, x: Tensor | Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        """Logits (N,) for binary probes, (N, C) otherwise."""
        x, mask = as_padded(x, mask, self.d_model)
        tensors = self._tensors(x)
        out = torch.cat(
            [
                _attend(x[i : i + _CHUNK_SEQS], mask[i : i + _CHUNK_SEQS], *tensors)[0]
                for i in range(0, x.shape[0], _CHUNK_SEQS)
            ]
        )  # (N, C)
        return out.squeeze(-1) if self.n_outputs == 1 else out

    def predict(self, x: Tensor | Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        """Class indices into `classes` (N,)."""
        s = self.scores(x, mask)
        return s.argmax(dim=-1) if self.n_outputs > 1 else (s > self.threshold).long()

    def predict_proba(self, x: Tensor | Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        """Class probabilities (N, C); binary probes give C = 2 ([1 - p, p])."""
        s = self.scores(x, mask)
        if self.n_outputs > 1:
            return s.softmax(dim=-1)
        p = torch.sigmoid(s)
        return torch.stack([1.0 - p, p], dim=-1)

    def _tensors(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
        dev = x.device
        return (
            self.query.to(dev),
            self.position_weight.to(dev),
            self.value.to(dev),
            self.bias.to(dev),
            self.position == "from_end",
        )


def _attend(
    x: Tensor,
    mask: Tensor,
    query: Tensor,
    position_weight: Tensor,
    value: Tensor,
    bias: Tensor,
    from_end: bool,
) -> tuple[Tensor, Tensor]:
    """(outputs (B, C), attention (B, T, H)) for x (B, T, d) and mask (B, T) bool."""
    x = torch.where(mask[..., None], x.to(query.dtype), 0.0)  # padding never reaches the output
    pos = mask.long().cumsum(-1) - 1  # (B, T) index among valid tokens
    if from_end:
        pos = mask.sum(-1, keepdim=True) - 1 - pos
    logits = x @ query.T + pos[..., None].to(query.dtype) * position_weight  # (B, T, H)
    logits = logits.masked_fill(~mask[..., None], -math.inf)
    attn = logits.softmax(dim=1)  # (B, T, H)
    pooled = attn.transpose(1, 2) @ x  # (B, H, d)
    h, c, d = value.shape
    out = pooled.reshape(-1, h * d) @ value.transpose(1, 2).reshape(h * d, c)  # (B, C)
    return out + bias, attn


def as_padded(
    x: Tensor | Sequence[Tensor], mask: Tensor | None, d_model: int | None = None
) -> tuple[Tensor, Tensor]:
    """(X (N, T, d), mask (N, T) bool) from padded X + mask, padded X alone, or a list of (T_i, d).

    A list is right-padded with zeros into a new tensor of its dtype.
    """
    if not isinstance(x, Tensor):
        seqs = list(x)
        if not seqs or any(not isinstance(s, Tensor) or s.ndim != 2 for s in seqs):
            raise TypeError("expected a non-empty list of (T_i, d) tensors, one per sequence")
        if mask is not None:
            raise ValueError("pass mask only with a padded (N, T, d) tensor, not with a list")
        lengths = torch.tensor([s.shape[0] for s in seqs])
        x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    if x.ndim != 3:
        raise ValueError(
            f"expected sequences X of shape (N, T, d), got {tuple(x.shape)}; for one sequence "
            "use X[None]"
        )
    if d_model is not None and x.shape[-1] != d_model:
        raise ValueError(f"probe expects d_model={d_model}, got X of shape {tuple(x.shape)}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"mask must have shape (N, T) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}"
        )
    mask = mask.to(device=x.device, dtype=torch.bool)
    if not mask.any(dim=1).all():
        raise ValueError("some sequences have no valid token (mask all False); drop them")
    return x, mask


def train_attention_probe(
    X: Tensor | Sequence[Tensor],
    y: Labels,
    *,
    mask: Tensor | None = None,
    n_heads: int = 4,
    position: Position = "from_end",
    l2: float = 1e-4,
    class_weight: ClassWeight = None,
    groups: GroupIds | None = None,
    val_fraction: float = 0.2,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    site: str | None = None,
    label_column: str | None = None,
    progress: bool = True,
) -> AttentionProbe:
    """Train an attention probe on sequences X (padded (N, T, d) + mask (N, T), or a list of
    (T_i, d) tensors) with one label per sequence.

    groups: one id per sequence for the validation split (None: every sequence is its own
        group); val_fraction=0 trains on everything for all epochs.
    progress: show a progress bar over epochs (only when stderr is a terminal).
    """
    x, mask = as_padded(X, mask)
    if position not in ("from_start", "from_end"):
        raise ValueError(f"unknown position {position!r}; expected 'from_start' or 'from_end'")
    y_idx, classes = encode_labels(y)
    n, n_classes = x.shape[0], len(classes)
    if y_idx.shape[0] != n:
        raise ValueError(f"X has {n} sequences but y has {y_idx.shape[0]} labels")
    if n_classes < 2:
        raise ValueError(f"y has a single class {classes}; a classifier needs at least two")
    if val_fraction == 0:
        train_idx, val_idx = torch.arange(n), torch.arange(0)
    elif groups is None:
        train_idx, val_idx = row_split(n, val_fraction, seed)
    elif len(groups) != n:
        raise ValueError(f"X has {n} sequences but groups has {len(groups)} ids; pass one each")
    else:
        train_idx, val_idx = grouped_split(groups, val_fraction, seed)
    dev = x.device
    y_idx = y_idx.to(dev)
    mean, std = _token_stats(x, mask)
    n_out = 1 if n_classes == 2 else n_classes
    d = x.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    query = torch.zeros(n_heads, d, device=dev, requires_grad=True)
    position_weight = torch.zeros(n_heads, device=dev, requires_grad=True)
    value = (torch.randn(n_heads, n_out, d, generator=generator) / math.sqrt(d)).to(dev)
    value.requires_grad_(True)
    bias = torch.zeros(n_out, device=dev, requires_grad=True)
    params = [query, position_weight, value, bias]
    opt = torch.optim.Adam(params, lr=lr)
    cw = class_weights(torch.bincount(y_idx[train_idx].cpu(), minlength=n_classes), class_weight)
    cw = None if cw is None else cw.to(dev)
    mean32, std32 = mean.float(), std.float()

    def batch_loss(idx: Tensor) -> Tensor:
        idx = idx.to(dev)
        z = (x[idx].float() - mean32) / std32  # (B, T, d), padding zeroed inside _attend
        out, _ = _attend(z, mask[idx], query, position_weight, value, bias, position == "from_end")
        return log_loss(out, y_idx[idx], cw)

    best = (math.inf, [p.detach().clone() for p in params], 0)
    history: list[float] = []
    with torch.enable_grad():
        epoch_bar = tqdm(range(epochs), desc="attention probe", disable=not progress or None)
        for epoch in epoch_bar:
            for batch in torch.randperm(train_idx.numel(), generator=generator).split(batch_size):
                loss = batch_loss(train_idx[batch])
                loss = loss + 0.5 * l2 * (query.pow(2).sum() + value.pow(2).sum())
                opt.zero_grad()
                loss.backward()
                opt.step()
            if val_idx.numel():
                with torch.no_grad():
                    val_loss = (
                        sum(float(batch_loss(b)) * b.numel() for b in val_idx.split(_CHUNK_SEQS))
                        / val_idx.numel()
                    )
                history.append(val_loss)
                if val_loss < best[0]:
                    best = (val_loss, [p.detach().clone() for p in params], epoch + 1)
    if val_idx.numel():
        with torch.no_grad():
            for p, kept in zip(params, best[1], strict=True):
                p.copy_(kept)
        log.info(
            "attention probe: kept epoch %d of %d (validation loss %.4g)", best[2], epochs, best[0]
        )
    probe = _folded(query, position_weight, value, bias, mean, std, classes, position)
    probe.site, probe.label_column = site, label_column
    probe.metadata = {
        "l2": l2,
        "n_heads": n_heads,
        "epochs": epochs,
        "best_epoch": best[2] or epochs,
        "val_loss": history,
        "lr": lr,
        "batch_size": batch_size,
        "class_weight": class_weight,
        "n_sequences": n,
        "seed": seed,
    }
    with torch.no_grad():
        proba, pred = probe.predict_proba(x, mask).cpu(), probe.predict(x, mask).cpu()
    y_idx = y_idx.cpu()
    probe.metrics = {
        "train": classification_metrics(y_idx[train_idx], proba[train_idx], pred[train_idx])
    }
    if val_idx.numel():
        probe.metrics["val"] = classification_metrics(y_idx[val_idx], proba[val_idx], pred[val_idx])
    return probe


def _token_stats(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population std (d,) float64 over valid tokens, chunked over sequences."""
    total = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    sq = torch.zeros_like(total)
    count = int(mask.sum())
    for i in range(0, x.shape[0], _CHUNK_SEQS):
        total += x[i : i + _CHUNK_SEQS][mask[i : i + _CHUNK_SEQS]].double().sum(0)
    mean = total / count
    for i in range(0, x.shape[0], _CHUNK_SEQS):
        sq += (x[i : i + _CHUNK_SEQS][mask[i : i + _CHUNK_SEQS]].double() - mean).pow(2).sum(0)
    return mean, safe_std((sq / count).sqrt())


def _folded(
    query: Tensor,
    position_weight: Tensor,
    value: Tensor,
    bias: Tensor,
    mean: Tensor,
    std: Tensor,
    classes: list[Any],
    position: Position,
) -> AttentionProbe:
    """Standardised-feature tensors -> raw-feature probe (exact: attention sums to 1 per head).

    x·(q/std) differs from z·q by a per-head constant, which softmax ignores; each head's value
    output differs by (v_h/std)·mean, which moves into the bias.
    """
    query_raw = query.detach().double() / std  # (H, d)
    value_raw = value.detach().double() / std  # (H, C, d)
    bias_raw = bias.detach().double() - torch.einsum("hcd,d->c", value_raw, mean)
    return AttentionProbe(
        query=query_raw.float(),
        position_weight=position_weight.detach().float().clone(),
        value=value_raw.float(),
        bias=bias_raw.float(),
        classes=classes,
        position=position,
    )
