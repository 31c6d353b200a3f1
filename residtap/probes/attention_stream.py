"""Attention probes scored after every token while a model generates, one matmul per site.

    pack = pack_attention_probes({"mood": probe})       # AttentionProbes reading one site
    stream = AttentionStream(pack, batch_size=B)         # preallocated state, on pack's device
    proj = F.linear(h, pack.weight, pack.bias)           # (B, T, K): extra columns of the site
    scores = stream.update(proj, valid)                  # (B, T, O): score after each token

After token t, `scores[:, t]` equals `AttentionProbe.scores` on that row's tokens 0..t (its valid
ones), whether the tokens arrive one per decode step, as a prefill chunk, or any mix.

Why this works. An attention probe (residtap.probes.attention) computes, over the valid tokens
s of a sequence, per head h: a_hs = softmax_s(x_s . q_h + p_h * pos_s), output
sum_h sum_s a_hs (V_h x_s) + bias. Both x . q_h and V_h x are linear in the hidden state, so they
are K extra columns of the site's packed matmul. The position term needs only a counter per row:
with i_s the index of token s among the row's valid tokens, "from_start" uses pos_s = i_s and
"from_end" pos_s = N - 1 - i_s for a prefix of N valid tokens, which is -i_s plus a constant
shared by every token of the prefix; softmax ignores that constant, so both are
`slope_h * i_s` with slope +p_h or -p_h, fixed once a token is seen. The probe's bias rides in
head 0's value columns (attention weights sum to 1), so the output is a plain sum over heads.

State per (row, head) and (row, value column) -- O(heads x outputs), preallocated:
    den (B, G)   log of the softmax denominator, log sum_s exp(z_s) (the running max and sum
                 of the usual online softmax in one number)
    mean (B, V)  each value column's softmax-weighted mean so far, sum_s a_s v_s
A decode step adds one token: den' = logaddexp(den, z); its weight is w = exp(z - den') in
[0, 1], the old tokens' weights shrink by 1 - w = exp(den - den'), so mean' = mean + w (v - mean),
one `lerp`. About eight small kernels in all (on a CPU each costs microseconds whatever its
size, and more the first time in a step, when the model's own kernels have just run, so their
number and kinds are what a decode step pays). A chunk of T tokens (a prefill, or a deferred
readout) gets the exact value after every one of its tokens without a Python loop, from
`logcumsumexp` over time: den_t = logaddexp(den, logcumsumexp(z)_t), and the new tokens'
weighted sum in log form, split into positive and negative parts (log sum_s exp(z_s)
relu(+-v_s)), so logits inside a chunk may differ by hundreds without underflow; then
mean_t = mean exp(den - den_t) + exp(pos_t - den_t) - exp(neg_t - den_t), each term bounded by
max |v|. The score is the sum over heads of the means. When every probe has the same heads and
outputs, the value columns are a (P, H, C) grid: a head's weight reaches its value columns by
broadcasting and the sum over heads is a reshape; otherwise an `index_select` and an
`index_add`. Either way O(V) per token, not a (G, V) matmul.

`den` starts at the dtype's lowest finite value, not -inf, and `mean` at 0: a row that has seen
no valid token scores exactly 0, and the first valid token gets weight exp(0) = 1 with no NaN
(any real logit is far above that floor and absorbs it exactly).
Padding: invalid tokens (the `valid` mask: left padding, rows that stopped) get logit -inf,
weight 0, so they never enter the softmax and do not advance the position counter. No host
synchronisation, no data-dependent Python control flow: `torch.compile(stream.update,
fullgraph=True)` compiles it.

Column layout of `pack.weight` (K, d) / `pack.bias` (K,), for probes p = 0..P-1 in the order
given, each with H_p heads and C_p outputs (C = 1 for a binary probe, the classes otherwise):
    [0, G)          query logits, one per (probe, head), probe-major: column
                    head_offset[p] + h holds q_h of probe p, bias 0.   G = sum_p H_p
    [G, G + V)      values, one per (probe, head, output): column
                    G + value_offset[p] + h * C_p + c holds V_h[c] of probe p; its bias is the
                    probe's bias[c] for h = 0, else 0.                V = sum_p H_p * C_p
Output columns of `update` (O = sum_p C_p): out_offset[p] + c, named like a bank's columns
("name" for C = 1, "name:class" otherwise); `pack.columns` lists them.

What an attention probe may hold beyond this: residtap's AttentionProbe has per-head position
slopes (from the start or the end), several heads and class outputs, all supported. The
published design's options that residtap's probe does not have (a post-attention MLP, tanh in
place of softmax) cannot come in: anything but an AttentionProbe is refused with a TypeError.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from residtap.probes.attention import AttentionProbe

__all__ = ["AttentionPack", "AttentionStream", "pack_attention_probes"]


@dataclass
class AttentionPack:
    """Attention probes of one site packed as matmul columns (layout: module docstring)."""

    names: list[str]
    site: str | None
    weight: Tensor  # (K, d) = (G + V, d)
    bias: Tensor  # (K,)
    slope: Tensor  # (G,) position slope per (probe, head), sign folded in
    value_head: Tensor  # (V,) long: the (probe, head) column in [0, G) of each value column
    value_output: Tensor  # (V,) long: the output column in [0, O) each value column adds to
    head_offset: list[int]  # per probe: its first query column
    value_offset: list[int]  # per probe: its first value column, counted from G
    out_offset: list[int]  # per probe: its first output column
    columns: list[str]  # (O,) output column names
    probes: list[AttentionProbe] = field(repr=False, default_factory=list)

    @property
    def n_heads(self) -> int:
        """G: query columns, one per (probe, head)."""
        return int(self.slope.shape[0])

    @property
    def n_values(self) -> int:
        """V: value columns, one per (probe, head, output)."""
        return int(self.value_head.shape[0])

    @property
    def n_columns(self) -> int:
        """K = G + V: the columns this pack adds to the site's matmul."""
        return int(self.weight.shape[0])

    @property
    def n_outputs(self) -> int:
        """O: score columns, one per (probe, output)."""
        return len(self.columns)

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[1])

    def outputs_of(self, name: str) -> slice:
        """The output columns of probe `name` in `update`'s result."""
        if name not in self.names:
            raise LookupError(f"no attention probe {name!r} in this pack; it has {self.names}")
        p = self.names.index(name)
        return slice(self.out_offset[p], self.out_offset[p] + self.probes[p].n_outputs)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> AttentionPack:
        """A copy with weight, bias and slope on `device` in `dtype` (indices only moved)."""
        def cast(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)
        return AttentionPack(
            self.names, self.site, cast(self.weight), cast(self.bias), cast(self.slope),
            self.value_head.to(device), self.value_output.to(device), self.head_offset,
            self.value_offset, self.out_offset, self.columns, self.probes)


def pack_attention_probes(
    probes: Mapping[str, AttentionProbe], *, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> AttentionPack:
    """Pack named AttentionProbes that read one site into matmul columns (module docstring)."""
    if not isinstance(probes, Mapping) or not probes:
        raise ValueError(
            "expected a non-empty mapping name -> AttentionProbe, got "
            f"{type(probes).__name__}{'' if probes else ' (empty)'}; pass {{'name': probe}}")
    names = list(probes)
    items = [probes[n] for n in names]
    for name, probe in zip(names, items, strict=True):
        if not isinstance(probe, AttentionProbe):
            raise TypeError(
                f"probe {name!r} is a {type(probe).__name__}, not an AttentionProbe; only "
                "softmax attention probes with a linear read-out stream (residtap's "
                "AttentionProbe); linear probes go to the bank as plain columns")
        for key in ("query", "position_weight", "value", "bias"):
            t = getattr(probe, key)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"attention probe {name!r} has NaN/Inf in {key}; retrain it")
        if probe.position not in ("from_start", "from_end"):
            raise ValueError(f"attention probe {name!r} has position {probe.position!r}; "
                             "expected 'from_start' or 'from_end'")
    d = items[0].d_model
    if any(p.d_model != d for p in items):
        raise ValueError("attention probes of one pack read one site, so one d_model; got "
                         f"{ {n: p.d_model for n, p in zip(names, items, strict=True)} }")
    sites = {p.site for p in items} - {None}
    if len(sites) > 1:
        raise ValueError(f"attention probes of one pack read one site; got sites {sorted(sites)}"
                         "; pack each site's probes separately")
    queries, slopes, values, value_bias = [], [], [], []
    value_head, value_output, columns = [], [], []
    head_offset, value_offset, out_offset = [], [], []
    g = v = o = 0
    for name, p in zip(names, items, strict=True):
        h, c = p.n_heads, p.n_outputs
        head_offset.append(g)
        value_offset.append(v)
        out_offset.append(o)
        queries.append(p.query.detach().to(torch.float64))  # (H, d)
        sign = 1.0 if p.position == "from_start" else -1.0
        slopes.append(sign * p.position_weight.detach().to(torch.float64))  # (H,)
        values.append(p.value.detach().to(torch.float64).reshape(h * c, d))  # (H*C, d)
        vb = torch.zeros(h, c, dtype=torch.float64)
        vb[0] = p.bias.detach().to(torch.float64)  # the bias rides in head 0
        value_bias.append(vb.reshape(-1))
        value_head += [g + head for head in range(h) for _ in range(c)]
        value_output += [o + out for _ in range(h) for out in range(c)]
        columns += [name] if c == 1 else [f"{name}:{label}" for label in _labels(p)]
        g, v, o = g + h, v + h * c, o + c
    weight = torch.cat(queries + values)  # (G + V, d)
    bias = torch.cat([torch.zeros(g, dtype=torch.float64)] + value_bias)  # (G + V,)
    return AttentionPack(
        names=names, site=next(iter(sites), None),
        weight=weight.to(device=device, dtype=dtype), bias=bias.to(device=device, dtype=dtype),
        slope=torch.cat(slopes).to(device=device, dtype=dtype),
        value_head=torch.tensor(value_head, dtype=torch.long, device=device),
        value_output=torch.tensor(value_output, dtype=torch.long, device=device),
        head_offset=head_offset, value_offset=value_offset, out_offset=out_offset,
        columns=columns, probes=items)


def _labels(probe: AttentionProbe) -> list[Any]:
    c = probe.n_outputs
    return list(probe.classes) if len(probe.classes) == c else list(range(c))


class AttentionStream:
    """The online-softmax state of a pack's probes for `batch_size` rows (module docstring).

    stream.update(proj, valid)   # proj (B, T, K) the pack's columns; returns (B, T, O)
    stream.update(proj)          # every token real (no padding)
    stream.current()             # (B, O): each row's score after the tokens seen so far
    stream.reset()               # a new run: forget every token (in place, same buffers)
    sub = stream.select(rows)    # rows (S,) long of it, as a stream of S rows: feed it, then
    stream.put(rows, sub)        # write their state back (a table of request slots, serving)

    State dtype: float32 by default, whatever the model's (bf16 projections are upcast);
    buffers live on `device` (default: the pack's) and keep their addresses for the stream's
    life, so captured CUDA graphs stay valid.
    """

    def __init__(self, pack: AttentionPack, batch_size: int, *,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the stream's state is float32 or float64, got {dtype}; pass "
                             "dtype=torch.float32 (the default) or torch.float64")
        device = torch.device(device) if device is not None else pack.weight.device
        self.pack = pack
        self.batch_size = batch_size
        G, V = pack.n_heads, pack.n_values
        self.slope = pack.slope.to(device=device, dtype=dtype)  # (G,)
        self.value_head = pack.value_head.to(device)  # (V,)
        self.value_output = pack.value_output.to(device)  # (V,)
        # every probe with the same heads H and outputs C: the value columns are a (P, H, C)
        # grid, reached from the heads by broadcasting and summed over H by a reshape
        shapes = {(p.n_heads, p.n_outputs) for p in pack.probes}
        self._grid = (len(pack.probes), *shapes.pop()) if len(shapes) == 1 else None
        self.floor = torch.finfo(dtype).min  # where `den` starts (module docstring)
        self.den = torch.full((batch_size, G), self.floor, dtype=dtype, device=device)
        self.mean = torch.zeros(batch_size, V, dtype=dtype, device=device)
        self.count = torch.zeros(batch_size, 1, dtype=dtype, device=device)  # valid tokens seen

    def __repr__(self) -> str:
        return (f"AttentionStream({self.pack.names}, batch_size={self.batch_size}, "
                f"heads={self.pack.n_heads}, outputs={self.pack.n_outputs})")

    def reset(self) -> None:
        """Forget every token of every row (a new run), in place."""
        self.den.fill_(self.floor)
        self.mean.zero_()
        self.count.zero_()

    def select(self, rows: Tensor) -> AttentionStream:
        """A stream of the same probes over `rows` (long (S,)) of this one, with a copy of their
        state; after feeding it, `put(rows, it)` writes the state back."""
        sub = copy.copy(self)  # shares the probes' constants, not the state
        sub.batch_size = int(rows.shape[0])
        sub.den, sub.mean, sub.count = (t.index_select(0, rows) for t in self._state())
        return sub

    def put(self, rows: Tensor, sub: AttentionStream) -> None:
        """Write `sub`'s state (a select(rows), fed since) back into `rows`."""
        for mine, theirs in zip(self._state(), sub._state(), strict=True):
            mine.index_copy_(0, rows, theirs)

    def reset_rows(self, rows: Tensor) -> None:
        """Forget every token of `rows` (long (S,)), in place: new sequences start there."""
        self.den.index_fill_(0, rows, self.floor)
        self.mean.index_fill_(0, rows, 0.0)
        self.count.index_fill_(0, rows, 0.0)

    def grown(self, batch_size: int) -> AttentionStream:
        """A stream of `batch_size` rows whose first rows hold this one's state."""
        if batch_size < self.batch_size:
            raise ValueError(f"a grown stream keeps this one's {self.batch_size} rows, so it needs "
                             f"at least that many; got batch_size={batch_size}")
        new = AttentionStream(self.pack, batch_size, dtype=self.den.dtype, device=self.den.device)
        for mine, theirs in zip(new._state(), self._state(), strict=True):
            mine[: self.batch_size] = theirs
        return new

    def _state(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.den, self.mean, self.count

    def update(self, proj: Tensor, valid: Tensor | None = None) -> Tensor:
        """Feed T tokens: proj (B, T, K) the pack's columns of the site's matmul, valid (B, T)
        bool (False: padding, never seen; None: every token is real). Updates the state in
        place and returns the scores (B, T, O) after each token; a row's score stays unchanged
        across its invalid tokens."""
        B, G = self.batch_size, self.pack.n_heads
        if proj.dim() != 3 or proj.shape[0] != B or proj.shape[2] != self.pack.n_columns:
            raise ValueError(
                f"expected proj of shape (B={B}, T, K={self.pack.n_columns}), got "
                f"{tuple(proj.shape)}; pass the pack's columns of F.linear(h, weight, bias)")
        if valid is not None and valid.shape != proj.shape[:2]:
            raise ValueError(f"expected valid of shape {tuple(proj.shape[:2])} (B, T), got "
                             f"{tuple(valid.shape)}")
        proj = proj.to(self.den.dtype)
        if proj.shape[1] == 1:  # a decode step: one token, fewer kernels
            return self._update_one(proj[:, 0], valid)[:, None]
        T = proj.shape[1]
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=proj.device)
        valid = valid.to(torch.bool)
        q, v = proj[..., :G], proj[..., G:]
        index = self.count + valid.cumsum(1).to(proj.dtype) - 1  # (B, T) among valid tokens
        z = torch.addcmul(q, index[..., None], self.slope)  # (B, T, G) attention logits
        z = z.masked_fill(~valid[..., None], -math.inf)
        den = torch.logaddexp(self.den[:, None], torch.logcumsumexp(z, 1))  # (B, T, G)
        z_v = z.index_select(-1, self.value_head)  # (B, T, V): each value column's logit
        den_v = den.index_select(-1, self.value_head)
        pos_neg = torch.logcumsumexp(  # (B, T, 2V): log sum exp(z) relu(v), then relu(-v)
            torch.cat([v, -v], dim=-1).clamp_(min=0).log_() + torch.cat([z_v, z_v], dim=-1), 1)
        pos, neg = pos_neg.chunk(2, dim=-1)
        old = (self.den[:, None] - den).exp().index_select(-1, self.value_head)  # (B, T, V)
        mean = self.mean[:, None] * old + (pos - den_v).exp() - (neg - den_v).exp()
        self.den.copy_(den[:, -1])
        self.mean.copy_(mean[:, -1])
        self.count.add_(valid.sum(1, keepdim=True))
        return self._scores(mean.reshape(B * T, -1)).reshape(B, T, -1)

    def _update_one(self, proj: Tensor, valid: Tensor | None) -> Tensor:
        """One token per row: proj (B, K), valid (B, 1) or None (all real) -> scores (B, O).
        Mostly kinds of kernel the model has just run itself (mul, add): on a CPU a kernel's
        first call in a step costs more than its size (module docstring)."""
        G = self.pack.n_heads
        z = proj[:, :G] + self.count * self.slope  # (B, G): this token's index is count
        if valid is None:
            self.count.add_(1.0)
        else:
            z.masked_fill_(~valid.to(torch.bool), -math.inf)
            self.count.add_(valid)
        torch.logaddexp(self.den, z, out=self.den)
        weight = z.sub_(self.den).exp_()  # (B, G): the new token's softmax weight
        v = proj[:, G:]  # (B, V)
        if self._grid is None:
            self.mean.lerp_(v, weight.index_select(1, self.value_head))
        else:
            P, H, C = self._grid
            self.mean.view(-1, P, H, C).lerp_(v.view(-1, P, H, C), weight.view(-1, P, H, 1))
        return self._scores(self.mean)

    def current(self) -> Tensor:
        """(B, O): each row's scores after all tokens fed so far (0 where none was valid)."""
        return self._scores(self.mean)

    def _scores(self, mean: Tensor) -> Tensor:
        """(N, O) from the per-value-column means (N, V): summed over each probe's heads."""
        N = mean.shape[0]
        if self._grid is not None:
            P, H, C = self._grid
            return mean.view(N, P, H, C).sum(2).view(N, P * C)
        return mean.new_zeros(N, self.pack.n_outputs).index_add_(1, self.value_output, mean)
