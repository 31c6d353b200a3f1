"""Which token positions a feature reads or writes: one vocabulary for capture, the store, probe
banks, steering, the cost calculator and every `--positions` flag.

    check_positions("last", words=("all", "last"))      # -> "last"; a clear error otherwise
    select_positions(hidden, attention_mask, "last")    # (B, T, ...) -> (B, ...)
    last_real_index(real)                               # (B,): each row's last real token

Words (each means one thing wherever it is accepted; WORDS holds the one-line meanings that
every `--positions` help shows):
    "all"        every position, padding included: capture keeps the (B, T) grid, a probe bank
                 marks pads not valid, steering writes them too (no real token attends to them)
    "last"       each row's last real prompt token; for a plain forward the whole input is the
                 prompt. (B, ...)
    "prompt"     every real prompt token: the first forward of a sequence (pads marked not real)
    "generated"  the state each generated token came from: the prompt's last real token for the
                 first, then the token each decode step feeds. Steering, which writes instead of
                 reads, leaves that last prompt token alone (changing it would change the first
                 token generated from the prompt): it writes the tokens decode steps feed; its
                 -1 is the reader's "generated"
Other forms:
    [i, j, ...] / LongTensor  indices into each row's real tokens, counted from its first real
                              token (negative: from its last), so left and right padding agree:
                              (B, K, ...)
    an int i (steering)       every real token from index i on (negative: from the prompt's
                              i-th last token on)
    BoolTensor (B, T)         the positions where the mask is True, row-major: (N, ...)
Each feature says which forms it takes (`check_positions(..., words=..., indices=..., mask=...)`);
"prompt_last", the probe bank's former name for "last", is accepted with a DeprecationWarning.

Real tokens are those where `attention_mask` is 1; without a mask every position is real.
A row with no real token (an all-padding row) has no last token and no k-th token. Capture and
the store (`select_positions`) refuse it for "last" and indices (ValueError / IndexError naming
the row: one host read per call, a clear error instead of a pad's row); a probe bank marks the
row's slots not valid instead (no score, nothing aggregated) and reads nothing back from the
device, so a generate stays free of host syncs. "all" and masks keep what they are given.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Word = Literal["all", "last", "prompt", "generated"]
Positions = Literal["all", "last"] | Sequence[int] | Tensor
# One line per word, as every --positions help prints it (the docstring above has the detail).
WORDS: dict[str, str] = {
    "all": "every real token",
    "last": "each text's last real token",
    "prompt": "the prompt's tokens",
    "generated": "the generated tokens",
}
ALIASES: dict[str, str] = {"prompt_last": "last"}  # deprecated names, kept for old code and files


def check_positions(
    positions: object,
    *,
    words: Sequence[str] = ("all", "last"),
    indices: bool | Literal["start"] = True,
    mask: bool = True,
    what: str = "positions",
    stacklevel: int = 3,
) -> str | int | Sequence[int] | Tensor:
    """The policy, checked against the forms a feature takes (a deprecated word mapped to its
    current name); TypeError/ValueError saying what was expected otherwise.

    words: the words the feature accepts; indices: True for a list / 1-D tensor of indices,
    "start" for one int (from that token on), False for none; mask: a (B, T) bool tensor;
    stacklevel: where the deprecation warning points (the user's call)."""
    forms = [repr(w) for w in words]
    if indices is True:
        forms.append("a list of token indices")
    elif indices == "start":
        forms.append("an int token index")
    if mask:
        forms.append("a (B, T) boolean mask")
    expected = ", ".join(forms[:-1]) + (" or " if len(forms) > 1 else "") + forms[-1]
    if isinstance(positions, str):
        if positions in ALIASES and ALIASES[positions] in words:
            new = ALIASES[positions]
            warnings.warn(f"{what}={positions!r} is now called {new!r}; use {what}={new!r}",
                          DeprecationWarning, stacklevel=stacklevel)
            return new
        if positions not in words:
            raise ValueError(f"{what} must be one of {expected}; got the string {positions!r}")
        return positions
    if isinstance(positions, Tensor):
        if mask and positions.dtype == torch.bool and positions.dim() == 2:
            return positions
        if indices is True and positions.dtype in (torch.int64, torch.int32) \
                and positions.dim() == 1:
            return positions
        raise TypeError(
            f"{what} must be {expected}; got a tensor of dtype {positions.dtype} with shape "
            f"{tuple(positions.shape)}"
        )
    if indices == "start" and isinstance(positions, int) and not isinstance(positions, bool):
        return positions
    if indices is True and isinstance(positions, Sequence) and not isinstance(positions, bool) \
            and all(isinstance(i, int) and not isinstance(i, bool) for i in positions):
        if len(positions) == 0:
            raise ValueError(f"{what} is an empty list; give at least one index, or 'all'")
        return positions
    number = isinstance(positions, (int, float))
    raise (ValueError if number and indices == "start" else TypeError)(
        f"{what} must be {expected}; got {positions!r} ({type(positions).__name__})"
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


def last_real_index(real: Tensor) -> Tensor:
    """(B,) long: the position of each row's last real token in `real` (B, T) bool, -1 for a
    row with none. Tensor ops only: nothing is read back to the host."""
    arange = torch.arange(real.shape[1], device=real.device)
    return torch.where(real, arange, -1).amax(dim=1)


def real_index(attention_mask: Tensor | None, past: int, B: int, T: int,
               device: torch.device) -> Tensor:
    """(B, T): the index of each of a forward's T positions among its row's real tokens, the
    mask covering the `past` cached tokens and these T (pads repeat a neighbour's index)."""
    if attention_mask is None:
        return (past + torch.arange(T, device=device)).expand(B, T)
    seen = attention_mask.to(device).cumsum(dim=1)[:, -T:]  # real tokens up to each position
    return seen - 1


def select_positions(
    hidden: Tensor, attention_mask: Tensor | None, positions: Positions
) -> Tensor:
    """Apply a positions policy to `hidden` (B, T, ...); see the module docstring."""
    positions = check_positions(positions)
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
    if isinstance(positions, str):  # "last": the highest real position of each row
        last = last_real_index(real)  # (B,); -1: no real token
        if bool((last < 0).any()):  # one sync, only to give a clear error instead of a pad's row
            row = int((last < 0).nonzero()[0])
            raise ValueError(
                f"row {row} has no real token (its attention mask is all zeros), so "
                "positions='last' has no token to read; remove empty rows from the batch"
            )
        return hidden[torch.arange(B, device=hidden.device), last]
    arange = torch.arange(T, device=hidden.device)
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
