"""Input data for `extract`: files, lists of strings, token-id lists, or a HF `datasets.Dataset`.

    samples = load_samples("mood.jsonl", text_column="text", max_samples=1000)
    samples[0]   # Sample(index=0, id='m-0', text='...', input_ids=None, meta={'label': 1, ...})

Accepted data:
    a path to .jsonl (one JSON object per line), .json (a list of objects or strings), .csv
        (header row) or .txt (one text per non-empty line)
    a list of strings                 texts
    a list of lists of ints / a 2-D integer tensor    token ids (no tokenizer needed)
    a list of dicts, or anything with `column_names` and integer indexing (a HF Dataset)

A row's text comes from `text_column`; a row without one but with `input_ids` is token ids.
`id` is the row's own "id" when it has one, else its index. Every other column (label, split,
...) travels into the store as per-sample metadata. The project-wide schema for labelled texts
is {"id", "text", "label", "split": "train"|"test", ...metadata}.

Everything is validated here, before any file is written. The data set is held in memory as
Python objects (texts, not activations); `fingerprint` hashes it for resume checks.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from residtap.inputs import read_jsonl, utf8_lines

IDS_COLUMN = "input_ids"


@dataclass
class Sample:
    index: int
    id: Any
    text: str | None = None
    input_ids: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The sample's line in a shard's samples JSONL."""
        return {"sample": self.index, "id": self.id, **self.meta}


def load_samples(data: Any, text_column: str = "text", max_samples: int | None = None
                 ) -> list[Sample]:
    """Validate and normalise `data` into a list of Samples (see the module docstring)."""
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    rows, source = _rows(data, max_samples)
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise ValueError(f"the data set {source} is empty; give at least one text")
    samples = [_sample(i, row, text_column, source) for i, row in enumerate(rows)]
    _check_column_kinds(samples, source)
    return samples


def check_one_label_kind(values: list[Any], where: str) -> None:
    """ValueError when `values` mix kinds of labels: bools, numbers, strings, None. (True == 1
    in Python, so `True` and `1` would silently become one class.)"""
    first: dict[str, tuple[int, Any]] = {}
    for i, v in enumerate(values):
        first.setdefault(_label_kind(v), (i, v))
    if len(first) > 1:
        seen = ", ".join(f"{kind} ({v!r} at row {i})" for kind, (i, v) in first.items())
        raise ValueError(
            f"{where} mixes label types: {seen}; Python counts True == 1, so such labels "
            "merge or split classes silently. Give every row the same type (e.g. all 0/1)"
        )


def _label_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else "string" if isinstance(value, str) else "other"


def _check_column_kinds(samples: list[Sample], source: str) -> None:
    """The label column holds one kind of value; no column mixes bools with numbers (null,
    a missing value, is allowed beside any kind)."""
    columns = {key for s in samples for key in s.meta}
    for column in sorted(columns):
        values = [s.meta[column] for s in samples if s.meta.get(column) is not None]
        kinds = {_label_kind(v) for v in values}
        if column == "label" or {"bool", "number"} <= kinds:
            check_one_label_kind(values, f"column {column!r} of {source}")


def fingerprint(samples: list[Sample]) -> str:
    """sha256 (16 hex digits) of every sample's id, text or token ids, and metadata."""
    h = hashlib.sha256()
    for s in samples:
        line = [s.id, s.text, s.input_ids, s.meta]
        h.update(json.dumps(line, sort_keys=True, default=_jsonable).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# -- sources ----------------------------------------------------------------------------------
def _rows(data: Any, limit: int | None) -> tuple[list[Any], str]:
    if isinstance(data, (str, os.PathLike)):
        return _file_rows(Path(data), limit), repr(str(data))
    if isinstance(data, Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                "a tensor of data must be (N, T) integer token ids; got dtype "
                f"{data.dtype} with shape {tuple(data.shape)}"
            )
        return [{IDS_COLUMN: row} for row in data.tolist()], "(token-id tensor)"
    if hasattr(data, "column_names") and hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        n = len(data) if limit is None else min(limit, len(data))
        return [dict(data[i]) for i in range(n)], f"({type(data).__name__})"
    if isinstance(data, (list, tuple)):
        return list(data), f"(a {type(data).__name__} of {len(data)})"
    raise TypeError(
        "data must be a file path (.jsonl/.json/.csv/.txt), a list of strings, a list of "
        f"token-id lists, a list of dicts or a datasets.Dataset; got {type(data).__name__}"
    )


def _file_rows(path: Path, limit: int | None) -> list[Any]:
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"data {str(path)!r} is a folder; pass a .jsonl, .json, .csv or .txt file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".txt"):
        raise ValueError(
            f"data file {str(path)!r} has suffix {suffix!r}; expected .jsonl, .json, .csv or "
            ".txt (or pass a list of strings)"
        )
    rows: list[Any] = []
    if suffix == ".jsonl":
        rows = read_jsonl(path, limit)
    elif suffix == ".json":
        text = "".join(line for _, line in utf8_lines(path))
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from err
        if not isinstance(loaded, list):
            raise ValueError(
                f"{path} holds a JSON {type(loaded).__name__}; expected a list of objects "
                "or strings (or use .jsonl, one object per line)"
            )
        rows = loaded
    elif suffix == ".csv":
        rows = _csv_rows(path, limit)
    else:
        lines = (line.rstrip("\r\n") for _, line in utf8_lines(path) if line.strip())
        rows = list(_take(lines, limit))
    return rows


def _csv_rows(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header row; a row with more or fewer fields than the header
    is an error naming its line."""
    numbered = utf8_lines(path)
    line_of = [0]

    def lines() -> Iterable[str]:
        for n, line in numbered:
            line_of[0] = n
            yield line

    reader = csv.reader(lines())
    header = next(reader, None)
    if header is None:
        return []
    rows = []
    for fields in reader:
        if limit is not None and len(rows) >= limit:
            break
        if not fields:  # a blank line
            continue
        if len(fields) != len(header):
            raise ValueError(
                f"{path}:{line_of[0]} has {len(fields)} fields but the header has "
                f"{len(header)} ({header}); quote fields that contain commas, and give every "
                "row one value per column"
            )
        rows.append(dict(zip(header, fields, strict=True)))
    return rows


def _take(items: Iterable[Any], limit: int | None) -> Iterable[Any]:
    for n, item in enumerate(items):
        if limit is not None and n >= limit:
            return
        yield item


# -- one row ----------------------------------------------------------------------------------
def _sample(index: int, row: Any, text_column: str, source: str) -> Sample:
    if isinstance(row, str):
        return Sample(index, index, text=_check_text(row, index, source))
    if isinstance(row, (list, tuple, Tensor)):
        return Sample(index, index, input_ids=_check_ids(row, index, source))
    if not isinstance(row, Mapping):
        raise TypeError(
            f"row {index} of {source} is a {type(row).__name__}; expected a string, a list of "
            "token ids, or a mapping with a text column"
        )
    meta = {str(k): _jsonable_value(v, index, k) for k, v in row.items()}
    sample_id = meta.pop("id", index)
    if text_column in meta:
        text = _check_text(meta.pop(text_column), index, source, text_column)
        meta.pop(IDS_COLUMN, None)
        return Sample(index, sample_id, text=text, meta=meta)
    if IDS_COLUMN in meta:
        ids = _check_ids(meta.pop(IDS_COLUMN), index, source)
        return Sample(index, sample_id, input_ids=ids, meta=meta)
    raise ValueError(
        f"row {index} of {source} has no text column {text_column!r} (its columns: "
        f"{sorted(row)}); pass text_column=<the column holding the text> "
        f"(--text-column on the command line), or give token ids in {IDS_COLUMN!r}"
    )


def _check_text(text: Any, index: int, source: str, column: str = "text") -> str:
    if not isinstance(text, str):
        raise TypeError(
            f"row {index} of {source}: column {column!r} must hold a string, got "
            f"{type(text).__name__} {text!r:.60}"
        )
    if not text.strip():
        raise ValueError(f"row {index} of {source} has an empty or whitespace-only text "
                         f"({text!r:.20}); remove it or fill it in")
    return text


def _check_ids(ids: Any, index: int, source: str) -> list[int]:
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    ids = list(ids)
    if not ids:
        raise ValueError(f"row {index} of {source} has no token ids; remove it")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise TypeError(
            f"row {index} of {source}: token ids must be non-negative ints, got {ids[:8]!r}..."
        )
    return ids


def _jsonable_value(value: Any, index: int, key: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=_jsonable))
    except TypeError as err:
        raise TypeError(
            f"row {index}: column {key!r} holds a {type(value).__name__}, which cannot be stored "
            "as JSON metadata; convert it to str/int/float/list, or drop the column"
        ) from err


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
