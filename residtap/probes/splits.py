"""Train/test splits grouped by text, so no text's tokens land on both sides.

    from residtap.probes.splits import grouped_split
    train_idx, test_idx = grouped_split(text_ids, test_fraction=0.2, seed=0)
    probe = train_probe(X[train_idx], y[train_idx], groups=text_ids[train_idx])

Tokens of one text share much more than their label (topic, position pattern, the text's own
quirks), so a per-row random split lets a probe memorise texts and report inflated accuracy.
`grouped_split` assigns whole groups to one side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

GroupIds = Tensor | np.ndarray | Sequence[Any]


def group_codes(groups: GroupIds) -> Tensor:
    """Map group ids (ints, strings, ...) to codes 0..G-1, one per row: LongTensor (N,).

    Codes follow the sorted order of the distinct ids, so they do not depend on row order.
    """
    if isinstance(groups, Tensor):
        if groups.ndim != 1:
            raise ValueError(
                f"expected groups of shape (N,), got {tuple(groups.shape)}; pass one id per row"
            )
        return torch.unique(groups.cpu(), return_inverse=True)[1].long()
    values = groups.tolist() if isinstance(groups, np.ndarray) else list(groups)
    try:
        distinct = sorted(set(values))
    except TypeError as err:
        raise TypeError(
            f"group ids must be mutually comparable (all ints or all strings); got {err}; "
            "convert them to one type"
        ) from err
    code_of = {value: code for code, value in enumerate(distinct)}
    return torch.tensor([code_of[v] for v in values], dtype=torch.long)


def grouped_split(
    groups: GroupIds, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Split rows into (train_idx, test_idx) so that each group lies on one side only.

    `test_fraction` is the fraction of *groups* (texts) put in the test side, rounded and kept
    between 1 and G-1, as in sklearn's GroupShuffleSplit. Both index tensors are sorted
    LongTensors on the CPU. The same (groups, test_fraction, seed) always gives the same split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must be strictly between 0 and 1, got {test_fraction}; "
            "e.g. 0.2 puts a fifth of the texts in the test side"
        )
    codes = group_codes(groups)
    n_groups = int(codes.max()) + 1 if codes.numel() else 0
    if n_groups < 2:
        raise ValueError(
            f"a grouped split needs at least 2 distinct groups, got {n_groups}; "
            "pass one id per text (e.g. the text's row in the data set), not one id for all rows"
        )
    n_test = min(max(round(test_fraction * n_groups), 1), n_groups - 1)
    generator = torch.Generator().manual_seed(seed)
    test_groups = torch.randperm(n_groups, generator=generator)[:n_test]
    is_test = torch.zeros(n_groups, dtype=torch.bool)
    is_test[test_groups] = True
    row_is_test = is_test[codes]
    return torch.nonzero(~row_is_test).flatten(), torch.nonzero(row_is_test).flatten()


def row_split(n_rows: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A per-row random split (every row its own group). Leaks across texts; for baselines."""
    return grouped_split(torch.arange(n_rows), test_fraction, seed)
