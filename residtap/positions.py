"""Which token positions to keep, the same way for capture, the store and probe banks.

A positions policy is one of:
    "all"                  every position: (B, T, ...) unchanged (padding included)
    "last"                 each row's last real (non-pad) token: (B, ...)
    [i, j, ...] / LongTensor indices into each row's real tokens, counted from its first real
                           token (negative: from its last), so left and right padding agree:
                           (B, K, ...)
    BoolTensor (B, T)      the positions where the mask is True, row-major: (N, ...)

Real tokens are those where `attention_mask` is 1; without a mask every position is real.
A row with no real token (an all-padding row) has no last token and no k-th token: "last" and
indices refuse it (ValueError / IndexError naming the row) rather than read a pad, as the probe
bank's "prompt_last" and "generated" do; "all" and masks keep what they are given.
Everything is done with tensor ops on the activations' device; the only host synchronisation is
the one check per call behind those errors (a clear error instead of wrong rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Positions = Literal["all", "last"] | Sequence[int] | Tensor


def check_positions(positions: object) -> None:
    """TypeError/ValueError for a policy that is not one of the forms above."""
    if isinstance(positions, str):
        if positions not in ("all", "last"):
            raise ValueError(
                f"positions must be 'all', 'last', a list of indices or a boolean mask; "
                f"got the string {positions!r}"
            )
        return
    if isinstance(positions, Tensor):
        if positions.dtype == torch.bool and positions.dim() == 2:
            return
        if positions.dtype in (torch.int64, torch.int32) and positions.dim() == 1:
            return
        raise TypeError(
            "a positions tensor must be a (B, T) bool mask or a 1-D integer index tensor; got "
            f"dtype {positions.dtype} with shape {tuple(positions.shape)}"
        )
    if isinstance(positions, Sequence) and all(isinstance(i, int) for i in positions):
        if len(positions) == 0:
            raise ValueError("positions is an empty list; give at least one index, or 'all'")
        return
    raise TypeError(
        "positions must be 'all', 'last', a list of ints, or a tensor (bool mask / indices); "
        f"got {type(positions).__name__}"
    )


def real_mask(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, T) bool: which positions of `hidden` (B, T, ...) are real tokens."""
    B, T = hidden.shape[:2]
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=hidden.device)
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the activations cover "
            f"(B, T) = ({B}, {T}); pass the mask of the same batch"
        )
    return attention_mask.to(device=hidden.device).bool()


def select_positions(
    hidden: Tensor, attention_mask: Tensor | None, positions: Positions
) -> Tensor:
    """Apply a positions policy to `hidden` (B, T, ...); see the module docstring."""
    check_positions(positions)
    if isinstance(positions, str) and positions == "all":
        return hidden
    real = real_mask(hidden, attention_mask)
    B, T = real.shape
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != (B, T):
            raise ValueError(
                f"the positions mask has shape {tuple(positions.shape)}, expected (B, T) = "
                f"({B}, {T}) like the activations"
            )
        return hidden[positions.to(hidden.device)]
    arange = torch.arange(T, device=hidden.device)
    if isinstance(positions, str):  # "last": the highest real position of each row
        last = torch.where(real, arange, -1).amax(dim=1)  # (B,); -1: no real token
        if bool((last < 0).any()):  # one sync, only to give a clear error instead of a pad's row
            row = int((last < 0).nonzero()[0])
            raise ValueError(
                f"row {row} has no real token (its attention mask is all zeros), so "
                "positions='last' has no token to read; remove empty rows from the batch"
            )
        return hidden[torch.arange(B, device=hidden.device), last]
    index = torch.as_tensor(positions, device=hidden.device, dtype=torch.long)  # (K,)
    # Real positions of each row, in order: sort keys put real tokens first, stably.
    key = torch.where(real, arange, arange + T)
    order = key.argsort(dim=1)  # (B, T): order[b, k] = position of b's k-th real token
    n_real = real.sum(dim=1, keepdim=True)  # (B, 1)
    k = torch.where(index < 0, index + n_real, index.expand(B, -1))  # (B, K)
    bad = (k < 0) | (k >= n_real)
    if bool(bad.any()):  # one sync, only to give a clear error instead of wrong rows
        row = int(bad.any(dim=1).nonzero()[0])
        raise IndexError(
            f"positions {list(index.tolist())} out of range for row {row}, which has "
            f"{int(n_real[row])} real tokens; use indices within every row's length"
        )
    pos = order.gather(1, k)  # (B, K)
    return hidden[torch.arange(B, device=hidden.device)[:, None], pos]


def per_sequence(hidden: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
    """Each row's real tokens, in order: a list of B tensors (n_b, ...)."""
    real = real_mask(hidden, attention_mask)
    return [hidden[b][real[b]] for b in range(hidden.shape[0])]
