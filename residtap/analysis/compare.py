"""Site x site similarity of two stores on disk (the library behind `residtap compare`).

    from residtap.analysis import store_similarity
    result = store_similarity("acts_a/", "acts_b/", method="cka")   # two aligned stores
    result.matrix[i, j]   # similarity of result.sites_a[i] (store A) and result.sites_b[j]

The two stores must hold the same rows: the same samples (ids) and the same token positions in
the same order, e.g. the same data extracted from two models (or checkpoints) that share a
tokenizer. Anything else is refused with the first row that differs. The stores must also
record the same data fingerprint (a hash of every sample's id, text or token ids and metadata):
two data sets with the same ids and lengths but other texts are not aligned.
`allow_other_data=True` skips only that check, e.g. for the same texts saved with other
metadata columns.

CKA ("cka", "cka_debiased") is streamed over row batches with `LinearCKA`, so the number of rows
is not limited by memory: every pair of sites needs O(d_a² + d_b² + d_a d_b) float64 sums, and
pairs are grouped into passes over the stores that fit `memory_budget` bytes. SVCCA and PWCCA
need all rows of a pair in memory (one site of each store at a time).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from residtap.analysis.cca import ConstantActivationsError, pwcca, svcca
from residtap.analysis.cka import LinearCKA
from residtap.analysis.similarity import METHODS, Method, warn_undefined
from residtap.store.reader import Store

log = logging.getLogger(__name__)

_SYMMETRIC = ("cka", "cka_debiased", "svcca")


@dataclass
class StoreSimilarity:
    """`matrix[i, j]`: similarity of `sites_a[i]` (store A) and `sites_b[j]` (store B)."""

    matrix: Tensor  # (len(sites_a), len(sites_b)) float64
    sites_a: list[str]
    sites_b: list[str]
    method: str
    rows: int
    store_a: str
    store_b: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "rows": self.rows, "store_a": self.store_a,
            "store_b": self.store_b, "sites_a": self.sites_a, "sites_b": self.sites_b,
            "matrix": [[None if math.isnan(v) else v for v in row]
                       for row in self.matrix.tolist()],
        }

    def table(self, digits: int = 3) -> list[dict[str, Any]]:
        return [{"site": a, **{b: "nan" if math.isnan(v) else f"{v:.{digits}f}"
                               for b, v in zip(self.sites_b, row, strict=True)}}
                for a, row in zip(self.sites_a, self.matrix.tolist(), strict=True)]


def check_aligned(a: Store, b: Store, *, allow_other_data: bool = False) -> None:
    """Raise ValueError unless `a` and `b` hold the same samples and positions, row by row, made
    from the same data (the data fingerprints the stores record; allow_other_data skips it)."""
    fix = ("extract both stores from the same data with the same positions and the same "
           "tokenizer (residtap.extract(..., positions=...)), then compare again")
    if len(a) != len(b):
        raise ValueError(
            f"the stores are not aligned: {a.folder} has {len(a)} rows, {b.folder} has "
            f"{len(b)} (positions {a.positions!r} vs {b.positions!r}); {fix}"
        )
    rows_a, rows_b = a.rows, b.rows
    for column in ("sample", "position"):
        differs = (rows_a[column] != rows_b[column]).nonzero().flatten()
        if differs.numel():
            i = int(differs[0])
            raise ValueError(
                f"the stores are not aligned: row {i} is (sample {int(rows_a['sample'][i])}, "
                f"position {int(rows_a['position'][i])}) in {a.folder} but (sample "
                f"{int(rows_b['sample'][i])}, position {int(rows_b['position'][i])}) in "
                f"{b.folder}; {fix}"
            )
    ids_a = [r.get("id") for r in a.samples]
    ids_b = [r.get("id") for r in b.samples]
    for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)):
        if x != y:
            raise ValueError(
                f"the stores are not aligned: sample {i} has id {x!r} in {a.folder} but "
                f"{y!r} in {b.folder}; {fix}"
            )
    data_a, data_b = (s.manifest.get("settings", {}).get("data") for s in (a, b))
    if data_a is None or data_b is None:
        log.warning("compare: %s records no data fingerprint; only ids and positions were "
                    "checked", a.folder if data_a is None else b.folder)
    elif data_a != data_b and not allow_other_data:
        raise ValueError(
            f"the stores hold different data: the same ids and positions, but {a.folder} was "
            f"made from data with fingerprint {data_a} and {b.folder} from {data_b} (other texts "
            f"or metadata); {fix}, or pass allow_other_data=True (--allow-other-data) if only "
            "the metadata differs"
        )


def _pair_bytes(d_a: int, d_b: int) -> int:
    return 8 * (d_a * d_a + d_b * d_b + d_a * d_b + 4 * (d_a + d_b))


def _width(store: Store, site: str) -> int:
    shape = store.manifest["sites"][site].get("shape") or []
    if len(shape) != 1:
        raise ValueError(f"site {site!r} has per-row shape {shape}; compare needs vectors (d,)")
    return int(shape[0])


def store_similarity(store_a: Store | str | os.PathLike[str],
                     store_b: Store | str | os.PathLike[str] | None = None, *,
                     method: Method = "cka", sites_a: list[str] | None = None,
                     sites_b: list[str] | None = None, batch_rows: int = 4096,
                     memory_budget: int = 2**30, progress: bool = True,
                     allow_other_data: bool = False) -> StoreSimilarity:
    """Site x site similarity between two aligned stores (default: `store_a` with itself).

    method: "cka" (linear, biased), "cka_debiased", "svcca" or "pwcca". CKA streams batches of
    `batch_rows` rows; its per-pair sums are grouped into passes that fit `memory_budget` bytes.
    The stores must be aligned (`check_aligned`; allow_other_data skips the data fingerprint).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    a = store_a if isinstance(store_a, Store) else Store.open(store_a)
    b = a if store_b is None else store_b if isinstance(store_b, Store) else Store.open(store_b)
    same = b is a or Path(b.folder).resolve() == Path(a.folder).resolve()
    if not same:
        check_aligned(a, b, allow_other_data=allow_other_data)
    sites_a, sites_b = list(sites_a or a.sites), list(sites_b or b.sites)
    for store, sites in ((a, sites_a), (b, sites_b)):
        missing = [s for s in sites if s not in store]
        if missing:
            raise LookupError(f"sites {missing} are not in {store.folder}; it holds "
                              f"{store.sites}")
    pairs = [(i, j) for i, j in product(range(len(sites_a)), range(len(sites_b)))
             if not (same and sites_a == sites_b and method in _SYMMETRIC and j < i)]
    if method in ("cka", "cka_debiased"):
        values = _streamed_cka(a, b, sites_a, sites_b, pairs, method == "cka_debiased",
                               batch_rows, memory_budget, progress)
    else:
        values = _in_memory(a, b, sites_a, sites_b, pairs, method, progress)
    matrix = torch.full((len(sites_a), len(sites_b)), math.nan, dtype=torch.float64)
    for (i, j), v in values.items():
        matrix[i, j] = v
        if same and sites_a == sites_b and method in _SYMMETRIC:
            matrix[j, i] = v
    warn_undefined(matrix, sites_a, sites_b, method)  # one line, naming the sites
    return StoreSimilarity(matrix, sites_a, sites_b, method, len(a), str(a.folder),
                           str(b.folder))


def _streamed_cka(a: Store, b: Store, sites_a: list[str], sites_b: list[str],
                  pairs: list[tuple[int, int]], debiased: bool, batch_rows: int,
                  memory_budget: int, progress: bool) -> dict[tuple[int, int], float]:
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive int, got {batch_rows}")
    passes: list[list[tuple[int, int]]] = [[]]
    used = 0
    for i, j in pairs:  # group pairs into passes whose sums fit the budget
        need = _pair_bytes(_width(a, sites_a[i]), _width(b, sites_b[j]))
        if passes[-1] and used + need > memory_budget:
            passes.append([])
            used = 0
        passes[-1].append((i, j))
        used += need
    batches = math.ceil(len(a) / batch_rows)
    log.info("compare: %d site pairs in %d pass(es) over %d rows", len(pairs), len(passes),
             len(a))
    bar = tqdm(total=len(passes) * batches, desc="compare (CKA)", unit="batch",
               disable=not progress or None)
    out: dict[tuple[int, int], float] = {}
    try:
        for group in passes:
            need_a = sorted({i for i, _ in group})
            need_b = sorted({j for _, j in group})
            readers = [a.iter_batches(sites_a[i], batch_rows) for i in need_a]
            readers += [b.iter_batches(sites_b[j], batch_rows) for j in need_b]
            acc = {pair: LinearCKA() for pair in group}
            for batch in zip(*readers, strict=True):  # the same rows of every site, in step
                xa = dict(zip(need_a, batch[:len(need_a)], strict=True))
                xb = dict(zip(need_b, batch[len(need_a):], strict=True))
                for (i, j), cka in acc.items():
                    cka.update(xa[i], xb[j])
                bar.update()
            out |= {pair: cka.value(debiased=debiased) for pair, cka in acc.items()}
    finally:
        bar.close()
    return out


def _in_memory(a: Store, b: Store, sites_a: list[str], sites_b: list[str],
               pairs: list[tuple[int, int]], method: str, progress: bool
               ) -> dict[tuple[int, int], float]:
    fn = svcca if method == "svcca" else pwcca
    out: dict[tuple[int, int], float] = {}
    cached: tuple[int, Tensor] | None = None
    for i, j in tqdm(pairs, desc=f"compare ({method})", unit="pair",
                     disable=not progress or None):
        if cached is None or cached[0] != i:
            cached = (i, a[sites_a[i]].double())  # (N, d_a): one site of A in memory
        try:
            out[(i, j)] = float(fn(cached[1], b[sites_b[j]]))
        except ConstantActivationsError as err:
            site, store = (sites_a[i], a) if err.side == "x" else (sites_b[j], b)
            raise ValueError(
                f"{method}: site {site!r} of {store.folder} is constant over its {err.rows} rows, "
                "so CCA is undefined for it (CKA gives NaN); leave it out with --sites-a / "
                "--sites-b"
            ) from err
    return out
