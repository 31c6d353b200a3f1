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

State per (row, head) and (row, value column) -- O(heads x outputs) per token, preallocated:
the online softmax's running max m and denominator l, kept together as log_den = m + log l,
and the running weighted values, kept as log-sums of their positive and negative parts
(log sum_s exp(z_s) relu(v_s), likewise for -v). This is the same online softmax in log form,
chosen because a chunk of T tokens (a prefill) then gets the exact prefix value after every one
of its tokens from one `logcumsumexp` over time, with no Python loop and no loss when logits
inside a chunk differ by hundreds (where a shared reference maximum would underflow). The score
is exp(log_pos - log_den) - exp(log_neg - log_den), each term bounded by max |v|. The three
log-sums live side by side in one (B, G + 2V) tensor [den | pos | neg], so one token (a decode
step) is one `logaddexp` into it: about ten small kernels in all, in place, into preallocated
buffers (on a CPU each kernel costs microseconds whatever its size, so their count is what a
decode step pays). When every probe has the same heads and outputs, the value columns are a
(P, H, C) grid: a head's logit reaches its value columns by broadcasting and the sum over heads
is a reshape, not an `index_add`.

The log-sums start at the dtype's lowest finite value, not -inf: a row that has seen no valid
token then has log_pos = log_neg = log_den, and its score is exp(0) - exp(0) = 0 exactly, with
no NaN to clean up (any real term is far above that floor and absorbs it exactly).
Padding: invalid tokens (the `valid` mask: left padding, rows that stopped) get logit -inf, so
they never enter the softmax and do not advance the position counter. No host
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
            raise ValueError(f"the stream's state is float32 or float64, got {dtype}")
        device = torch.device(device) if device is not None else pack.weight.device
        self.pack = pack
        self.batch_size = batch_size
        G, V = pack.n_heads, pack.n_values
        self.slope = pack.slope.to(device=device, dtype=dtype)  # (G,)
        # each of the 2V [pos | neg] columns: its (probe, head) column in [0, G)
        self.head_of = pack.value_head.to(device).repeat(2)  # (2V,)
        self.value_output = pack.value_output.to(device)  # (V,)
        self.floor = torch.finfo(dtype).min  # where every log-sum starts (module docstring)
        self.state = torch.full((batch_size, G + 2 * V), self.floor, dtype=dtype, device=device)
        self.count = torch.zeros(batch_size, 1, dtype=dtype, device=device)  # valid tokens seen
        self._sign = torch.tensor([1.0, -1.0], dtype=dtype, device=device)[:, None]  # (2, 1)
        # every probe with the same heads H and outputs C: the value columns are a (P, H, C)
        # grid, reached from the heads by broadcasting and summed over H by a reshape
        shapes = {(p.n_heads, p.n_outputs) for p in pack.probes}
        self._uniform = (len(pack.probes), *shapes.pop()) if len(shapes) == 1 else None

    def __repr__(self) -> str:
        return (f"AttentionStream({self.pack.names}, batch_size={self.batch_size}, "
                f"heads={self.pack.n_heads}, outputs={self.pack.n_outputs})")

    def reset(self) -> None:
        """Forget every token of every row (a new run), in place."""
        self.state.fill_(self.floor)
        self.count.zero_()

    def update(self, proj: Tensor, valid: Tensor | None = None) -> Tensor:
        """Feed T tokens: proj (B, T, K) the pack's columns of the site's matmul, valid (B, T)
        bool (False: padding, never seen; None: every token is real). Updates the state in
        place and returns the scores (B, T, O) after each token; a row's score stays unchanged
        across its invalid tokens."""
        G, B = self.pack.n_heads, self.batch_size
        if proj.dim() != 3 or proj.shape[0] != B or proj.shape[2] != self.pack.n_columns:
            raise ValueError(
                f"expected proj of shape (B={B}, T, K={self.pack.n_columns}), got "
                f"{tuple(proj.shape)}; pass the pack's columns of F.linear(h, weight, bias)")
        if valid is not None and valid.shape != proj.shape[:2]:
            raise ValueError(f"expected valid of shape {tuple(proj.shape[:2])} (B, T), got "
                             f"{tuple(valid.shape)}")
        proj = proj.to(self.state.dtype)
        if proj.shape[1] == 1:  # a decode step: the same sums, fewer kernels
            return self._update_one(proj[:, 0], valid)[:, None]
        if valid is None:
            valid = torch.ones(proj.shape[:2], dtype=torch.bool, device=proj.device)
        valid = valid.to(torch.bool)
        T = proj.shape[1]
        index = self.count + valid.cumsum(1).to(proj.dtype) - 1  # (B, T) among valid tokens
        z = torch.addcmul(proj[..., :G], index[..., None], self.slope)  # (B, T, G) logits
        terms = torch.cat([z, self._value_terms(proj[..., G:], z)], dim=-1)  # (B, T, G + 2V)
        terms.masked_fill_(~valid[..., None], -math.inf)
        sums = torch.logaddexp(self.state[:, None], torch.logcumsumexp(terms, 1))
        self.state.copy_(sums[:, -1])
        self.count.add_(valid.sum(1, keepdim=True))
        return self._scores(sums.reshape(B * T, -1)).reshape(B, T, -1)

    def _update_one(self, proj: Tensor, valid: Tensor | None) -> Tensor:
        """One token per row: proj (B, K), valid (B, 1) or None (all real) -> scores (B, O).
        Each log-sum gains one term (one logaddexp into the state); an invalid token's terms
        are all -inf, so each adds exp(-inf) = 0."""
        G = self.pack.n_heads
        z = torch.addcmul(proj[:, :G], self.count, self.slope)  # (B, G): index = count
        both = (proj[:, None, G:] * self._sign).clamp_(min=0).log_()  # (B, 2, V): +v, -v
        terms = torch.cat([z, self._add_head_logits(both.view(self.batch_size, -1), z)], 1)
        if valid is None:
            self.count.add_(1.0)
        else:
            terms.masked_fill_(~valid.to(torch.bool), -math.inf)
            self.count.add_(valid)
        torch.logaddexp(self.state, terms, out=self.state)
        return self._scores(self.state)

    def _value_terms(self, v: Tensor, z: Tensor) -> Tensor:
        """(..., 2V): log(relu(v)) then log(relu(-v)), plus each value column's head logit,
        from v (..., V) and the logits z (..., G)."""
        return self._add_head_logits(torch.cat([v, -v], dim=-1).clamp_(min=0).log_(), z)

    def _add_head_logits(self, terms: Tensor, z: Tensor) -> Tensor:
        """terms (..., 2V) [pos | neg] += each column's head logit from z (..., G), in place."""
        if self._uniform is None:
            return terms.add_(z.index_select(-1, self.head_of))
        P, H, C = self._uniform
        lead = terms.shape[:-1]
        terms.view(*lead, 2, P, H, C).add_(z.view(*lead, 1, P, H, 1))
        return terms

    def current(self) -> Tensor:
        """(B, O): each row's scores after all tokens fed so far (0 where none was valid)."""
        return self._scores(self.state)

    def _scores(self, sums: Tensor) -> Tensor:
        """(N, O) from log-sums (N, G + 2V) [den | pos | neg]: per value column
        exp(pos - den) - exp(neg - den), summed over each probe's heads."""
        G, V, N = self.pack.n_heads, self.pack.n_values, sums.shape[0]
        den, pos_neg = sums[:, :G], sums[:, G:].view(N, 2, V)
        if self._uniform is not None:  # (N, 2, P, H, C) - (N, 1, P, H, 1)
            P, H, C = self._uniform
            ratio = (pos_neg.view(N, 2, P, H, C) - den.view(N, 1, P, H, 1)).exp_()
            return (ratio[:, 0] - ratio[:, 1]).sum(2).view(N, P * C)
        ratio = (pos_neg - den.index_select(1, self.head_of[:V])[:, None]).exp_()  # (N, 2, V)
        out = ratio.new_zeros(N, self.pack.n_outputs)  # (N, O)
        return out.index_add_(1, self.value_output, ratio[:, 0] - ratio[:, 1])
