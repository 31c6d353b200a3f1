"""Measure the organism against its planted latents: probes per layer, mood of generations.

    python -m residtap.organism.evaluate                 # the shipped checkpoint and data
    python -m residtap.organism.evaluate --model DIR     # another checkpoint, same data

Needs scikit-learn for the probes (a dev dependency). The numbers in the model card come from
this script. Layer 0 is the token embedding (`hidden_states[0]`); layer L is the output of block L
(the last entry has the final norm applied, as transformers returns it).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from residtap.organism.language import MOOD_WORDS, MOODS, Language, Mood

PROBED: tuple[str, ...] = ("mood", "topic", "truth", "early_exit")


@torch.no_grad()
def hidden_states(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    texts: Sequence[str],
    positions: Sequence[int] | None = None,
    batch_size: int = 128,
) -> torch.Tensor:
    """Residual stream at one token per text: (n_layers + 1, N, d). Default token: the last."""
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tok(list(texts[i : i + batch_size]), padding=True, padding_side="right",
                    return_tensors="pt")  # fmt: skip
        hs = model(**batch, output_hidden_states=True).hidden_states  # L+1 x (B, T, d)
        last = batch["attention_mask"].sum(1) - 1  # (B,)
        pos = last if positions is None else torch.tensor(positions[i : i + batch_size])
        rows = torch.arange(len(pos))
        out.append(torch.stack([h[rows, pos] for h in hs]).float())  # (L+1, B, d)
    return torch.cat(out, dim=1)


def probe_accuracy(x_train, y_train, x_test, y_test) -> float:
    """Held-out accuracy of a standardised logistic-regression probe."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as err:  # pragma: no cover - dev dependency
        raise ImportError(
            "probe evaluation needs scikit-learn; fix: pip install scikit-learn"
        ) from err
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(x_train, y_train)
    return float(clf.score(x_test, y_test))


def probe_layers(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, rows: list[dict], position: str | None
) -> list[float]:
    """Held-out probe accuracy at every layer; `position` names a row column (default: last)."""
    pos = None if position is None else [row[position] for row in rows]
    hs = hidden_states(model, tok, [row["text"] for row in rows], pos)  # (L+1, N, d)
    train = [i for i, row in enumerate(rows) if row["split"] == "train"]
    test = [i for i, row in enumerate(rows) if row["split"] == "test"]
    labels = [row["label"] for row in rows]
    return [
        probe_accuracy(h[train].numpy(), [labels[i] for i in train],
                       h[test].numpy(), [labels[i] for i in test])  # fmt: skip
        for h in hs
    ]


def mood_prompts(n: int = 100, seed: int = 7) -> list[tuple[str, Mood]]:
    """Prompts that set a mood and stop before any other mood word: "<opener> , and then the"."""
    lang = Language(seed)
    moods = [MOODS[i % 2] for i in range(n)]
    return [(f"{lang.opener(mood)} , and then the", mood) for mood in moods]


@torch.no_grad()
def mood_match_rate(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, n: int = 100, max_new_tokens: int = 16
) -> tuple[float, list[str]]:
    """Share of mood words in greedy continuations that match the prompt's mood."""
    prompts = mood_prompts(n)
    batch = tok([p for p, _ in prompts], padding=True, return_tensors="pt")  # left padding
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    match = total = 0
    for text, (_, mood) in zip(texts, prompts, strict=True):
        other = MOODS[1 - MOODS.index(mood)]
        words = text.split()
        match += sum(w in MOOD_WORDS[mood] for w in words)
        total += sum(w in MOOD_WORDS[mood] or w in MOOD_WORDS[other] for w in words)
    return match / max(total, 1), texts


def report(model: PreTrainedModel, tok: PreTrainedTokenizerBase, data: dict[str, list[dict]]):
    """Every measurement of the model card, as one JSON-able dict."""
    result: dict = {"probe_last_token": {}, "early_exit_by_filler_offset": {}}
    for name in PROBED:
        result["probe_last_token"][name] = probe_layers(model, tok, data[name], None)
    rows = data["early_exit"]
    for offset in range(4):
        kept = [{**r, "pos": r["filler_start"] + offset} for r in rows
                if r["n_filler"] > offset]  # fmt: skip
        result["early_exit_by_filler_offset"][offset] = probe_layers(model, tok, kept, "pos")
    rate, samples = mood_match_rate(model, tok)
    result["mood_match_rate"] = rate
    result["generation_samples"] = samples[:6]
    return result


def main(argv: list[str] | None = None) -> int:
    from residtap.organism import DATA_DIR, load, read_jsonl

    parser = argparse.ArgumentParser(prog="python -m residtap.organism.evaluate")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="folder of JSONL data")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load(path=args.model)
    if args.data == DATA_DIR:
        data = {name: read_jsonl(name) for name in PROBED}
    else:
        data = {name: [json.loads(line) for line in (args.data / f"{name}.jsonl").open()]
                for name in PROBED}  # fmt: skip
    result = report(model, tok, data)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
