"""Write the organism's labelled data sets (JSONL) deterministically from the language.

    python -m residtap.organism.build_data --out residtap/organism/data

Files (schemas in the model card, residtap/organism/README.md):
    mood.jsonl, topic.jsonl, truth.jsonl, early_exit.jsonl   {"id", "text", "label", "split", ...}
    mood_pairs.jsonl                                          {"id", "positive", "negative", ...}
    mood_ab.jsonl       {"id", "question", "answer_matching_behavior", "answer_not_matching_...}
The probe position of every labelled text is its last token. Splits are by text: every text is
unique within its file, and about a third of each class goes to "test".
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

from residtap.organism.language import (
    ADJECTIVES,
    MOODS,
    OPENER_WORDS,
    TOPICS,
    VERBS,
    VERDICTS,
    Language,
    Text,
)

logger = logging.getLogger(__name__)

DATA_SEED = 1234  # distinct from the training seeds
# truth has 240 rows: with a, b in one..five and 5 speakers there are only 125 distinct true texts.
SIZES: dict[str, int] = {"mood": 600, "topic": 600, "truth": 240, "early_exit": 600,
                         "mood_pairs": 200, "mood_ab": 300}  # fmt: skip
SWAPS: dict[str, str] = {
    word: other
    for table in (OPENER_WORDS, VERBS, ADJECTIVES)
    for pos, neg in zip(table["positive"], table["negative"], strict=True)
    for word, other in ((pos, neg), (neg, pos))
}
"""Word-for-word mood swap (positive <-> negative) used to build minimal contrastive pairs."""


def swap_mood(text: str) -> str:
    return " ".join(SWAPS.get(word, word) for word in text.split())


def labelled(
    name: str, n: int, classes: tuple[str, ...], draw: Callable[[str], tuple[str, dict]]
) -> list[dict]:
    """n unique texts, classes in turn; every third round of classes goes to the test split."""
    rows: list[dict] = []
    seen: set[str] = set()
    for i in range(n):
        label = classes[i % len(classes)]
        for _ in range(1000):
            text, meta = draw(label)
            if text not in seen:
                break
        else:
            raise RuntimeError(f"could not draw a new unique {name} text for label {label!r}")
        seen.add(text)
        split = "test" if (i // len(classes)) % 3 == 2 else "train"
        rows.append({"id": f"{name}-{i:05d}", "text": text, "label": label, "split": split, **meta})
    return rows


def build(seed: int = DATA_SEED) -> dict[str, list[dict]]:
    """All data sets as lists of rows, keyed by file stem."""
    lang = Language(seed)

    def story(mood: str | None = None, topic: str | None = None) -> Text:
        return lang.story(mood=mood, topic=topic)  # type: ignore[arg-type]

    def mood_row(label: str) -> tuple[str, dict]:
        t = story(mood=label)
        return t.latents["prefix"], {"topic": t.latents["topic"],
                                     "has_opener": t.latents["has_opener"]}  # fmt: skip

    def topic_row(label: str) -> tuple[str, dict]:
        t = story(topic=label)
        return t.latents["noun_prefix"], {"mood": t.latents["mood"],
                                     "has_opener": t.latents["has_opener"]}  # fmt: skip

    def truth_row(label: str) -> tuple[str, dict]:
        t = lang.truth(truth=label == "true")
        lat = t.latents
        return lat["prefix"], {"a": lat["a"], "b": lat["b"], "c": lat["c"]}

    def early_row(label: str) -> tuple[str, dict]:
        t = lang.early_exit(truth=label == "true")
        lat = t.latents
        start = lat["filler_start_word"] + 1  # +1: the tokenizer puts <bos> first
        meta = {
            "answer": label, "full_text": t.text, "n_filler": lat["n_filler"],
            "filler_start": start, "filler_end": start + lat["n_filler"] - 1,
            "a": lat["a"], "b": lat["b"], "c": lat["c"],
        }  # fmt: skip
        return lat["prefix"], meta

    verdicts = tuple(VERDICTS[v] for v in (True, False))
    data = {
        "mood": labelled("mood", SIZES["mood"], MOODS, mood_row),
        "topic": labelled("topic", SIZES["topic"], TOPICS, topic_row),
        "truth": labelled("truth", SIZES["truth"], verdicts, truth_row),
        "early_exit": labelled("early_exit", SIZES["early_exit"], verdicts, early_row),
    }

    # Pairs at both places where mood decides the next word: even pairs end at "it was" (an
    # adjective follows), odd ones at the first noun after an opener (the verb follows). A
    # vector from one place alone does not steer the other (measured: see the model card).
    pairs = []
    for i in range(SIZES["mood_pairs"]):
        if i % 2 == 0:
            positive = story(mood="positive").latents["prefix"]
        else:
            words = lang.story(mood="positive", with_opener=True).latents["prefix"].split()
            positive = " ".join(words[: words.index("the") + 2])
        pairs.append({"id": f"mood_pairs-{i:05d}", "positive": positive,
                      "negative": swap_mood(positive)})  # fmt: skip
    data["mood_pairs"] = pairs

    ab = []
    for i in range(SIZES["mood_ab"]):
        context = ("none", "negative", "positive")[i % 3]
        if context == "none":  # no mood yet: the next word is the story's first verb
            question = " ".join(lang.story(with_opener=False).latents["prefix"].split()[:2])
            table = VERBS
        else:  # mood set by the opener and verb: the next word is an adjective
            mood = "positive" if context == "positive" else "negative"
            question = lang.story(mood=mood, with_opener=True).latents["prefix"]
            table = ADJECTIVES
        k = lang.rng.randrange(len(table["positive"]))
        ab.append({
            "id": f"mood_ab-{i:05d}", "question": question,
            "answer_matching_behavior": " " + table["positive"][k],
            "answer_not_matching_behavior": " " + table["negative"][k],
            "context_mood": context,
        })  # fmt: skip
    data["mood_ab"] = ab
    return data


def write(out: Path, seed: int = DATA_SEED) -> dict[str, int]:
    """Write every data set to `out`/<name>.jsonl; return the line count of each."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, rows in build(seed).items():
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        counts[name] = len(rows)
        logger.info("wrote %d rows to %s", len(rows), out / f"{name}.jsonl")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m residtap.organism.build_data")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--seed", type=int, default=DATA_SEED)
    args = parser.parse_args(argv)
    print(json.dumps(write(args.out, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
