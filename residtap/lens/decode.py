"""Deferred logit-lens decode: captured hidden states -> the model's own readout -> statistics.

    readout = readout_of(model)          # residtap.lens.readout: the model's own readout
    stats = decode(hidden, length=T, readout=readout, next_ids=ids, final_slot=-1)
    stats.topk_probs                     # (S, B, T, k) full-vocabulary probabilities

Every (site, position) row goes through exactly what the model applies after its last block
(`Readout`: final norm, projection, unembedding, logit transform).

Rows are decoded in chunks sized by a memory budget, so only one chunk's full-vocabulary logits
exist at a time. A chunk holds every site of a few positions, so the final layer's
distribution (the reference for KL) is always in the same chunk. Per row we keep:

    topk_ids, topk_probs  the k most likely tokens; probabilities are softmax over the FULL
                          vocabulary (never re-normalised over the top k)
    entropy               of the full distribution, in nats
    kl                    KL(p_final || p_site) in nats (the tuned-lens convention)
    actual_rank           rank of the token that actually came next (0 = top-1; ties count in
                          its favour; -1 where no next token is known)

All statistics are computed in float32 from one unnormalised exponent buffer: with
m = max(logits), e = exp(logits - m), z = sum(e): lse = m + log z; entropy = lse - E_p[logits];
KL = (E_pf[logits_f] - lse_f) - (E_pf[logits_s] - lse_s). Every E_p[logits] of a position comes
from one small (S x V) @ (V x S) GEMM. Two CPU-minded helpers keep the passes over the
full-vocabulary rows few and cheap: `blocked_topk` (exact top-k from block maxima) and
`count_greater` (the rank, counting comparison flags 8 at a time).

Tensor parallelism: when the unembedding weight is a DTensor sharded on the vocabulary (Hugging
Face's `tp_plan="auto"` leaves `lm_head` so), each rank decodes with its own weight shard only,
logits (R, V_local), and full-vocabulary logits are never gathered. Per chunk only small tensors
cross ranks: each rank's top k (global id = local id + the rank's offset), all-gathered and
merged, whose first value is the global max m; z and the E_p[logits] GEMM (partial sums over
each slice, one all_reduce(SUM)); the next token's logit, sent by the rank that owns it
(all_reduce(SUM) of a value that is 0.0 elsewhere); and the per-slice counts of logits above it
(all_reduce(SUM)). Soft-capping is elementwise, so it applies per shard. Every rank gets the
same statistics; chunk sizes come from the widest shard so all ranks run the same collectives.
The single-process path (`_full_vocab_sums`) does no communication.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from residtap.distributed import VocabShard, vocab_shard
from residtap.lens.readout import Readout

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes of full-vocabulary work space per chunk


@dataclass
class LensStats:
    """Per (site, row, position) statistics; shapes (S, B, T, ...)."""

    topk_ids: Tensor  # (S, B, T, k) int64
    topk_probs: Tensor  # (S, B, T, k) float32, full-vocabulary probabilities
    entropy: Tensor  # (S, B, T) float32, nats
    kl: Tensor  # (S, B, T) float32, KL(final || site) in nats
    actual_rank: Tensor  # (S, B, T) int64, -1 where the next token is unknown


def chunk_cells(n_sites: int, vocab: int, memory_budget: int, logits_itemsize: int = 4) -> int:
    """How many positions (each with all `n_sites` rows) fit one chunk of `memory_budget` bytes.

    Per row: float32 logits, float32 exponents, a bool compare mask, and the logits in the
    readout's dtype when that is not float32."""
    per_row = vocab * (4 + 4 + 1 + (logits_itemsize if logits_itemsize != 4 else 0))
    cells = memory_budget // (per_row * n_sites)
    if cells < 1:
        log.warning("memory budget %d B is below one position (%d sites x %d B); using one",
                    memory_budget, n_sites, per_row)
    return max(1, int(cells))


_BLOCK = 128  # columns per block in blocked_topk
EXP_SAFE = 40.0  # |row max| below which exp(logits) is taken without subtracting the max
_GROUP_WORDS = 255  # int64 words summed together in count_greater (no byte can overflow)


def blocked_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(logits, k) for (R, V) logits, exact, via block maxima.

    The k blocks of 128 columns with the largest maxima hold every top-k entry (an entry in any
    other block has k larger block maxima above it), so one cheap max pass plus a top-k over
    k * 128 candidates replaces a full-row selection, which is slow on CPU. Columns after the
    last whole block are always candidates. Values come sorted, largest first."""
    R, V = logits.shape
    n_blocks = V // _BLOCK
    if n_blocks <= k:
        return logits.topk(k, dim=-1)
    body = logits[:, : n_blocks * _BLOCK].view(R, n_blocks, _BLOCK)
    blocks = body.amax(dim=-1).topk(k, dim=-1).indices  # (R, k)
    offsets = torch.arange(_BLOCK, device=logits.device)
    cols = (blocks[..., None] * _BLOCK + offsets).flatten(1)  # (R, k * 128)
    if V > n_blocks * _BLOCK:
        tail = torch.arange(n_blocks * _BLOCK, V, device=logits.device).expand(R, -1)
        cols = torch.cat([cols, tail], dim=1)
    vals, idx = logits.gather(1, cols).topk(k, dim=-1)
    return vals, cols.gather(1, idx)


def _padded_width(vocab: int) -> int:
    """Width of count_greater's flag buffer: a whole number of 255-word groups of 8 bytes."""
    group = _GROUP_WORDS * 8
    return -(-vocab // group) * group


def count_greater(values: Tensor, threshold: Tensor, flags: Tensor) -> Tensor:
    """Per row of values (R, V), how many entries are > threshold (R, 1): (R,) int64.

    `flags` is a (R, _padded_width(V)) bool work buffer whose columns >= V are False. The
    comparison is written into it, then counted 8 flags at a time: the flags are read as int64
    words, groups of 255 words are summed (each of a word's 8 bytes sums 0/1 flags, so no byte
    reaches 256 and carries into the next), and the bytes of the group sums are added up.
    This is several times faster than bool.sum(dim) on CPU."""
    R, V = values.shape
    torch.gt(values, threshold, out=flags[:, :V])
    groups = flags.view(torch.int64).view(R, -1, _GROUP_WORDS).sum(dim=-1)  # (R, G)
    return groups.view(torch.uint8).view(R, -1).sum(dim=-1)


@torch.no_grad()
def decode(
    hidden: Tensor,
    *,
    length: int,
    readout: Readout,
    next_ids: Tensor,
    final_slot: int = -1,
    top_k: int = 5,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> LensStats:
    """Decode captured residual vectors `hidden` (B, S, T_max, d), positions [0, length).

    next_ids: (B, length) the token that came after each position (-1: unknown).
    final_slot: which of the S slots holds the last block's output (the KL reference)."""
    if hidden.dim() != 4:
        raise ValueError(
            f"expected hidden of shape (B, sites, T, d), got {tuple(hidden.shape)}"
        )
    B, S, T_max, d = hidden.shape
    V = readout.vocab_size
    if not 0 < length <= T_max:
        raise ValueError(f"length must be in 1..{T_max} (the buffer's T), got {length}")
    if tuple(next_ids.shape) != (B, length):
        raise ValueError(
            f"next_ids must be (B, length) = ({B}, {length}), got {tuple(next_ids.shape)}"
        )
    if not 1 <= top_k <= V:
        raise ValueError(f"top_k must be in 1..{V} (the vocabulary size), got {top_k}")
    f = final_slot % S
    device = hidden.device
    N = B * length
    shard = vocab_shard(readout.unembed)  # None: this process holds the whole vocabulary
    V_here = V if shard is None else shard.width  # columns of logits this process computes
    V_chunk = V if shard is None else max(shard.widths)  # equal on every rank: same chunks
    lowp = readout.weight.dtype != torch.float32
    P = min(N, chunk_cells(S, V_chunk, memory_budget, readout.weight.element_size()))
    R_max = P * S
    f32 = torch.empty(R_max, V_here, device=device)  # logits, float32
    raw = torch.empty(R_max, V_here, device=device, dtype=readout.weight.dtype) if lowp else f32
    exps = torch.empty(R_max, V_here, device=device)  # exp(logits - max), unnormalised
    flags = torch.zeros(R_max, _padded_width(V_here), device=device, dtype=torch.bool)

    out_ids = torch.empty(N, S, top_k, dtype=torch.long, device=device)
    out_probs = torch.empty(N, S, top_k, device=device)
    out_ent = torch.empty(N, S, device=device)
    out_kl = torch.empty(N, S, device=device)
    out_rank = torch.empty(N, S, dtype=torch.long, device=device)
    by_cell = hidden[:, :, :length].permute(0, 2, 1, 3)  # (B, T, S, d) view, no copy
    nxt = next_ids.reshape(N).to(device)

    starts = range(0, N, P)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="lens decode", unit="chunk")
    log.info("lens decode: %d rows in chunks of %d positions x %d sites%s", N * S, P, S,
             "" if shard is None else f", vocabulary split over {shard.world} ranks")
    for c0 in starts:
        c1 = min(c0 + P, N)
        p, R = c1 - c0, (c1 - c0) * S
        cells = torch.arange(c0, c1, device=device)
        x = by_cell[cells // length, cells % length].reshape(R, d)  # (R, d) gathered copy
        logits = readout.logits(x, out=raw[:R], shard=shard)  # (R, V_here)
        if lowp:
            logits = f32[:R].copy_(logits)
        target = nxt[c0:c1]  # (p,)
        tgt = target.clamp(min=0)[:, None].expand(p, S).reshape(R, 1)  # (R, 1) global ids
        if shard is None:
            sums = _full_vocab_sums(logits, top_k, tgt, S, exps[:R], flags[:R])
        else:
            sums = _sharded_vocab_sums(logits, top_k, tgt, S, exps[:R], flags[:R], shard)
        vals, ids, z, dots, rank = sums
        z, rank = z.view(p, S), rank.view(p, S)
        lse = vals[:, 0].view(p, S) + z.log()
        out_ids[c0:c1] = ids.view(p, S, top_k)
        out_probs[c0:c1] = (vals.view(p, S, top_k) - lse[..., None]).exp()
        out_ent[c0:c1] = lse - dots.diagonal(dim1=1, dim2=2) / z
        cross = dots[:, :, f] / z[:, f : f + 1]  # (p, S)
        kl = (cross[:, f : f + 1] - lse[:, f : f + 1]) - (cross - lse)
        out_kl[c0:c1] = kl.clamp_(min=0.0)
        out_rank[c0:c1] = torch.where(target[:, None] >= 0, rank, -1)

    def arrange(t: Tensor) -> Tensor:  # (N, S, ...) -> (S, B, T, ...)
        t = t.view(B, length, S, *t.shape[2:])
        return t.movedim(2, 0).contiguous()

    return LensStats(arrange(out_ids), arrange(out_probs), arrange(out_ent), arrange(out_kl),
                     arrange(out_rank))


# (top-k values (R, k), their token ids (R, k), z (R,), dots (p, S, S), rank (R,)): every sum
# over the vocabulary one chunk needs; `decode` turns them into probabilities, entropy and KL.
VocabSums = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _full_vocab_sums(logits: Tensor, k: int, tgt: Tensor, S: int, exps: Tensor,
                     flags: Tensor) -> VocabSums:
    """The sums for logits (R, V) over the whole vocabulary (R = p positions x S sites)."""
    R, V = logits.shape
    vals, ids = blocked_topk(logits, k)  # (R, k); vals[:, 0] is the row max
    m = vals[:, :1]
    # Where every row max is within +-EXP_SAFE, exp(logits) needs no shift (nothing overflows,
    # and what underflows is below e^-47 of the row's largest term), which saves a full pass;
    # the sums are rescaled by exp(-m) below, so the result is the same as with the shift.
    unshifted = bool(m.abs().max() < EXP_SAFE)
    if unshifted:
        e = torch.exp(logits, out=exps)  # (R, V) = exp(logits - m) * exp(m)
    else:
        e = torch.sub(logits, m, out=exps).exp_()  # (R, V)
    # dots[c, s, t] = sum_v logits_s(c)[v] * e_t(c)[v]: one small GEMM per position gives
    # E_p_s[logits_s] (the diagonal, for entropy) and E_p_final[logits_s] (column f, for KL)
    dots = torch.bmm(logits.view(-1, S, V), e.view(-1, S, V).transpose(1, 2))  # (p, S, S)
    z = e.sum(dim=-1)
    if unshifted:
        scale = torch.exp(-m[:, 0])  # (R,)
        z.mul_(scale)
        dots.mul_(scale.view(-1, 1, S))  # column t belongs to row t's distribution
    rank = count_greater(logits, logits.gather(1, tgt), flags)  # (R,)
    return vals, ids, z, dots, rank


def _sharded_vocab_sums(logits: Tensor, k: int, tgt: Tensor, S: int, exps: Tensor,
                        flags: Tensor, shard: VocabShard) -> VocabSums:
    """The same sums when each rank holds a slice of the vocabulary: logits (R, V_local).

    Only k candidates per row and the small partial sums cross ranks, never the logits."""
    R, V_local = logits.shape
    vals, ids = _merged_topk(logits, k, shard)  # (R, k) over the full vocabulary
    e = torch.sub(logits, vals[:, :1], out=exps).exp_()  # (R, V_local), global max
    dots = torch.bmm(logits.view(-1, S, V_local), e.view(-1, S, V_local).transpose(1, 2))
    partial = torch.cat([e.sum(dim=-1), dots.flatten()])  # (R + p*S*S,)
    dist.all_reduce(partial, group=shard.group)
    z, dots = partial[:R], partial[R:].view(dots.shape)
    rank = count_greater(logits, _owner_logit(logits, tgt, shard), flags)  # (R,) this slice
    dist.all_reduce(rank, group=shard.group)
    return vals, ids, z, dots, rank


def _merged_topk(logits: Tensor, k: int, shard: VocabShard) -> tuple[Tensor, Tensor]:
    """Full-vocabulary top-k of sharded logits (R, V_local): each rank's own top k (padded with
    -inf where its slice is narrower), all-gathered and merged. Global id = local id + offset."""
    R, V_local = logits.shape
    k_here = min(k, V_local)
    vals, ids = blocked_topk(logits, k_here)  # (R, k_here)
    if k_here < k:
        vals = torch.cat([vals, vals.new_full((R, k - k_here), -torch.inf)], dim=1)
        ids = torch.cat([ids, ids.new_zeros(R, k - k_here)], dim=1)
    ids = ids + shard.offset
    all_vals = [torch.empty_like(vals) for _ in range(shard.world)]
    all_ids = [torch.empty_like(ids) for _ in range(shard.world)]
    dist.all_gather(all_vals, vals.contiguous(), group=shard.group)
    dist.all_gather(all_ids, ids.contiguous(), group=shard.group)
    top, where = torch.cat(all_vals, dim=1).topk(k, dim=-1)  # (R, k) of world * k candidates
    return top, torch.cat(all_ids, dim=1).gather(1, where)


def _owner_logit(logits: Tensor, tgt: Tensor, shard: VocabShard) -> Tensor:
    """logits[r, tgt[r]] (R, 1) on every rank, for global ids `tgt` (R, 1): the rank that owns
    the id contributes its value and the others 0.0, summed (x + 0.0 is exact)."""
    local = tgt - shard.offset
    mine = (local >= 0) & (local < logits.shape[1])
    value = torch.where(mine, logits.gather(1, local.clamp(0, logits.shape[1] - 1)), 0.0)
    dist.all_reduce(value, group=shard.group)
    return value
