"""Scores of a saved probe on texts: one row per text (or per token), as `residtap probe score`.

    from residtap.probes import load_probe
    from residtap.probes.scoring import score_texts
    probe = load_probe("mood.safetensors", model=model)
    rows = list(score_texts(model, tok, probe, "mood.jsonl", positions="last"))
    rows[0]   # {"sample": 0, "id": "m-0", "position": 11, "score": 2.3, "probability": 0.91,
              #  "prediction": "positive", "text": "...", "label": "positive", ...}

The model runs once per batch of texts with `residtap.capture` at the probe's site; positions
follow residtap.positions ("last": each text's last real token, "all": every real token,
indices such as [0, -1]), counted over each text's real tokens, and position ids over the real
tokens, so a text scores the same whatever it is batched with, and the same as in a store
written by `residtap capture` (which is how `residtap probe train` trained it). An attention
probe reads every token of a text and gives one row per text. SAE features
(residtap.sae.features.SAEFeatures: an SAE folder's selected features, or a probe folded onto
them; residtap.probes.files.load_any_probe opens both) score like a linear probe: their
activations per position (score: a list, one per feature; no prediction), or the folded probe's
scores and predictions.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from residtap.capture import capture
from residtap.inputs import forward_inputs, pad_id_of, pad_left
from residtap.positions import Positions, check_positions
from residtap.probes.attention import AttentionProbe
from residtap.probes.probe import Probe
from residtap.sae.features import SAEFeatures
from residtap.store.batches import token_ids
from residtap.store.data import Sample, load_samples

Scorer = Probe | AttentionProbe | SAEFeatures


def default_positions(probe: Scorer) -> str | list[int]:
    """The positions of the store the probe was trained on (recorded by `probe train`), else
    "last"; "all" for an attention probe; for SAE features, their folded probe's, else "last"."""
    if isinstance(probe, AttentionProbe):
        return "all"
    if isinstance(probe, SAEFeatures):
        return default_positions(probe.probe) if probe.probe is not None else "last"
    recorded = probe.metadata.get("positions")
    if recorded == "last" or recorded == "all":
        return recorded
    if isinstance(recorded, list) and recorded and all(isinstance(i, int) for i in recorded):
        return recorded
    return "last"


def score_texts(
    model: nn.Module, tokenizer: Any, probe: Scorer, data: Any, *,
    positions: Positions | None = None, batch_size: int = 16, max_length: int | None = None,
    text_column: str = "text", max_samples: int | None = None, progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """One dict per scored (text, position), in data order; see the module docstring.

    data: whatever `residtap.extract` takes (a .jsonl/.json/.csv/.txt path, a list of texts,
    ...). positions: default `default_positions(probe)`. Keys: sample, id, position (index
    among the text's real tokens; None for an attention probe), token, score (a float, or a
    list for several outputs), probability (classifiers: of classes[1] when binary, else a
    list), prediction (a class label, or the value for ridge), text, and the data's other
    columns (label, split, ...)."""
    if probe.site is None:
        raise ValueError("the probe records no site, so it is unknown where to read it; "
                         "fix: set probe.site = 'layers.N' (where it was trained) and save it")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size!r}")
    if positions is None:
        positions = default_positions(probe)
    check_positions(positions)
    attention = isinstance(probe, AttentionProbe)
    if attention and positions != "all":
        raise ValueError(f"an attention probe reads every token of a text; got positions "
                         f"{positions!r}; fix: drop --positions (or pass all)")
    samples = load_samples(data, text_column, max_samples)
    pad = pad_id_of(tokenizer) if tokenizer is not None else 0
    bar = tqdm(total=len(samples), desc=f"probe score ({probe.site})", unit="text",
               disable=not progress or None)
    try:
        with torch.inference_mode():
            for start in range(0, len(samples), batch_size):
                batch = samples[start:start + batch_size]
                yield from _score_batch(model, tokenizer, probe, batch, positions, pad,
                                        max_length, attention)
                bar.update(len(batch))
    finally:
        bar.close()


def _score_batch(model: nn.Module, tokenizer: Any, probe: Scorer,
                 batch: list[Sample], positions: Positions, pad: int, max_length: int | None,
                 attention: bool) -> Iterator[dict[str, Any]]:
    seqs = token_ids(batch, tokenizer, max_length)  # as the store reads them
    ids, mask = pad_left(seqs, pad)  # (B, T) each
    read = "all" if attention or positions == "all" else positions
    inputs = forward_inputs(model, ids, mask)
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False
    with capture(model, [probe.site], positions=read, stop_early=True) as acts:
        model(**inputs)
    if attention:
        per_text = acts.per_sequence(probe.site)  # B x (n_b, d)
        scores = probe.scores(per_text)  # (B,) or (B, C)
        for b, sample in enumerate(batch):
            yield _row(probe, sample, None, None, scores[b])
        return
    if positions == "all":
        for b, (sample, hidden) in enumerate(zip(batch, acts.per_sequence(probe.site),
                                                 strict=True)):
            scores = probe.scores(hidden)  # (n_b,) or (n_b, C)
            for i in range(hidden.shape[0]):
                yield _row(probe, sample, i, _token(tokenizer, seqs[b][i]), scores[i])
        return
    hidden = acts[probe.site]  # (B, d) for "last", (B, K, d) for indices
    scores = probe.scores(hidden)
    for b, sample in enumerate(batch):
        n = len(seqs[b])
        if positions == "last":
            yield _row(probe, sample, n - 1, _token(tokenizer, seqs[b][-1]), scores[b])
            continue
        for k, index in enumerate(positions):
            i = index if index >= 0 else n + index
            token = _token(tokenizer, seqs[b][i]) if 0 <= i < n else None
            yield _row(probe, sample, i, token, scores[b, k])


def _token(tokenizer: Any, token_id: int) -> str | None:
    if tokenizer is None or not hasattr(tokenizer, "convert_ids_to_tokens"):
        return None
    return str(tokenizer.convert_ids_to_tokens(int(token_id)))


def _row(probe: Scorer, sample: Sample, position: int | None,
         token: str | None, score: Tensor) -> dict[str, Any]:
    """The output row of one score: (C,) or () tensor -> plain Python values."""
    score = score.float().cpu()
    row: dict[str, Any] = {"sample": sample.index, "id": sample.id, "position": position,
                           "token": token, "score": _plain(score)}
    if isinstance(probe, SAEFeatures):
        if probe.probe is None:  # feature activations: no prediction
            row["text"] = sample.text
            return row | {k: v for k, v in sample.meta.items() if k not in row}
        probe = probe.probe
    kind = getattr(probe, "kind", "attention")
    if kind == "ridge":
        row["prediction"] = _plain(score)
    elif score.dim() == 0:  # one output: binary, classes[1] where score > threshold
        row["probability"] = _plain(torch.sigmoid(score))
        row["prediction"] = probe.classes[int(bool(score > probe.threshold))]
    else:
        row["probability"] = _plain(score.softmax(-1))
        row["prediction"] = probe.classes[int(score.argmax())]
    row["text"] = sample.text
    for key, value in sample.meta.items():
        row.setdefault(key, value)
    return row


def _plain(t: Tensor) -> float | list[float] | None:
    if t.dim() == 0:
        v = float(t)
        return None if math.isnan(v) else v
    return [None if math.isnan(v) else v for v in t.tolist()]


def agreement(rows: Sequence[dict[str, Any]], column: str) -> dict[str, Any] | None:
    """How often `prediction` equals the data's `column` (compared as text), over the rows
    that have it; None when no row has it."""
    labelled = [r for r in rows if r.get(column) is not None and "prediction" in r]
    if not labelled or any(isinstance(r["prediction"], (float, list)) for r in labelled):
        return None
    same = sum(str(r["prediction"]) == str(r[column]) for r in labelled)
    return {"column": column, "rows": len(labelled), "accuracy": same / len(labelled)}
