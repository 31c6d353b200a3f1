"""Running aggregates of a probe bank's scores over each row's scored tokens, on the device.

    agg = Aggregates(("max", "ema"), ema_alpha=0.1, dtype=torch.float32)
    agg.allocate(batch=3, columns=7, max_tokens=64, device=dev)
    agg.prepare(weights)          # once per readout: (B, t) 1 for tokens that count, else 0
    agg.add(cols, scores)         # per site: scores (B, t, P_site) into columns `cols`
    agg.value("ema")              # (B, P), normalised

"max", "mean" and "ema" (exponential moving average, bias-corrected so the first token counts
fully: ema = sum_t a(1-a)^(n-1-t) x_t / (1 - (1-a)^n)). Tokens with weight 0 (pads, rows that
stopped early) are skipped. The per-readout terms live in buffers allocated once and written in
place, so a compiled decode step always reads them at the same address (CUDA graphs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Aggregate = Literal["max", "mean", "ema"]
AGGREGATES: tuple[str, ...] = ("max", "mean", "ema")


class Aggregates:
    """The requested aggregates' buffers {name: (B, P)} and the terms of the current readout."""

    def __init__(self, names: Sequence[str], ema_alpha: float, dtype: torch.dtype) -> None:
        for a in names:
            if a not in AGGREGATES:
                raise ValueError(f"aggregate must be among {AGGREGATES}, got {a!r}")
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        self.names, self.ema_alpha, self.dtype = tuple(names), float(ema_alpha), dtype
        self.buffers: dict[str, Tensor] = {}

    def allocate(self, batch: int, columns: int, max_tokens: int, device: torch.device) -> None:
        z = dict(dtype=self.dtype, device=device)
        self.buffers = {a: torch.zeros(batch, columns, **z) for a in self.names}
        self._sum_w = torch.zeros(batch, 1, **z)  # tokens aggregated (mean)
        self._ema_left = torch.ones(batch, 1, **z)  # weight of the ema's zero start
        # the current readout's terms, (B, t) views of (B, max_tokens) buffers
        self._weights_buf = torch.zeros(batch, max_tokens, **z)
        self._ema_buf = torch.zeros(batch, max_tokens, **z)
        self._total = torch.ones(batch, 1, **z)
        self._weights, self._per_token = self._weights_buf[:, :1], self._ema_buf[:, :1]

    def reset(self) -> None:
        """A new run: nothing aggregated yet."""
        for name, buf in self.buffers.items():
            buf.fill_(-math.inf if name == "max" else 0.0)
        self._sum_w.zero_()
        self._ema_left.fill_(1.0)

    def prepare(self, w: Tensor) -> None:
        """Terms shared by every site of one readout of t tokens: w (B, t) in {0, 1}."""
        t = w.shape[1]
        self._weights = self._weights_buf[:, :t]
        self._weights.copy_(w)
        if "mean" in self.names:
            self._sum_w.add_(w.sum(dim=1, keepdim=True))
        if "ema" in self.names:
            decay = 1.0 - self.ema_alpha * w  # (B, t)
            # weight of token t in this update: a * w_t * prod_{u > t} decay_u
            later = torch.flip(torch.cumprod(torch.flip(decay, [1]), dim=1), [1])  # prod_{u>=t}
            total = later[:, :1]  # (B, 1) prod over all tokens
            after = torch.cat([later[:, 1:], torch.ones_like(total)], dim=1)  # prod_{u>t}
            self._per_token = self._ema_buf[:, :t]
            self._per_token.copy_(self.ema_alpha * w * after)
            self._total.copy_(total)
            self._ema_left.mul_(total)

    def add(self, cols: slice, s: Tensor) -> None:
        """Fold one site's scores s (B, t, P_site) of the prepared readout into `cols`."""
        w = self._weights[..., None]  # (B, t, 1)
        if "max" in self.buffers:
            buf = self.buffers["max"][:, cols]
            buf.copy_(torch.maximum(buf, torch.where(w > 0, s, -math.inf).amax(dim=1)))
        if "mean" in self.buffers:
            self.buffers["mean"][:, cols].add_((s * w).sum(dim=1))
        if "ema" in self.buffers:
            buf = self.buffers["ema"][:, cols]
            buf.mul_(self._total).add_((s * self._per_token[..., None]).sum(dim=1))

    def value(self, name: str) -> Tensor:
        """The aggregate (B, P) so far (mean/ema normalised; NaN: no tokens yet)."""
        if name not in self.buffers:
            raise LookupError(
                f"aggregate {name!r} was not requested; attach with "
                f"aggregate={name!r} (requested: {list(self.buffers)})"
            )
        buf = self.buffers[name]
        if name == "max":
            return buf.clone()
        denom = self._sum_w if name == "mean" else 1.0 - self._ema_left
        return buf / denom
