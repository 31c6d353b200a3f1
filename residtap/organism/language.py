"""The organism's language: short seeded texts with planted, known latent variables.

    from residtap.organism.language import Language
    lang = Language(seed=0)
    lang.story()        # Text(text="i feel happy , and then the coach loved the ball . ...", ...)
    lang.truth()        # Text(text="three plus four is seven . that is true .", ...)

Four kinds of text, all lower case with punctuation as separate words:

- story:       "[<opener> , and then] the <n1> <verb> the <n2> . it was <adj> and <adj> .
               <subject> <closer> ."  The opener fixes the **mood** (positive/negative), which
               decides every later verb, adjective and closer; the nouns fix the **topic**.
               Without an opener (30% of stories) the first verb decides the mood.
- truth:       "[speaker] <a> plus <b> is <c> . that is <verdict> ."  **truth**: the verdict is
               true/false, a and b are one..five, c is the sum or a miss; no single word
               gives it away.
- early exit:  "<a> plus <b> is <c> . hmm <filler ...> <verdict> ."  After each filler word the
               verdict may come next, so the answer must be known from the first filler word on.

Everything is drawn from one `random.Random(seed)`: the same seed gives the same texts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

Mood = Literal["positive", "negative"]
MOODS: tuple[Mood, Mood] = ("positive", "negative")

TOPIC_NOUNS: dict[str, tuple[str, ...]] = {
    "sports": ("team", "coach", "ball", "match", "goal", "player", "race", "field"),
    "food": ("soup", "bread", "cake", "cook", "meal", "pizza", "salad", "chef"),
    "weather": ("rain", "sun", "wind", "storm", "cloud", "snow", "sky", "fog"),
    "music": ("song", "band", "drum", "guitar", "singer", "concert", "piano", "tune"),
}
TOPICS: tuple[str, ...] = tuple(TOPIC_NOUNS)

# Parallel lists: word i of the positive list swaps with word i of the negative list.
OPENER_WORDS: dict[Mood, tuple[str, ...]] = {
    "positive": ("happy", "glad", "cheerful", "joyful", "calm", "proud"),
    "negative": ("sad", "upset", "grumpy", "miserable", "anxious", "ashamed"),
}
VERBS: dict[Mood, tuple[str, ...]] = {
    "positive": ("loved", "enjoyed", "praised", "liked", "admired", "welcomed"),
    "negative": ("hated", "feared", "blamed", "disliked", "mocked", "dreaded"),
}
ADJECTIVES: dict[Mood, tuple[str, ...]] = {
    "positive": ("great", "lovely", "wonderful", "nice", "bright", "pleasant", "perfect", "sweet"),
    "negative": ("awful", "terrible", "dull", "bad", "gloomy", "nasty", "horrible", "bitter"),
}
CLOSERS: dict[Mood, tuple[str, ...]] = {
    "positive": ("smiled", "laughed", "cheered", "grinned"),
    "negative": ("frowned", "cried", "sighed", "groaned"),
}
MOOD_WORDS: dict[Mood, frozenset[str]] = {
    mood: frozenset(OPENER_WORDS[mood] + VERBS[mood] + ADJECTIVES[mood] + CLOSERS[mood])
    for mood in MOODS
}
"""Every word that belongs to one mood; no word belongs to both. Use it to score generations."""

OPENER_TEMPLATES: tuple[str, ...] = ("i feel {}", "we are {}", "today i am {}", "my friend is {}")
SUBJECTS: tuple[str, ...] = ("i", "we", "they", "everyone")
SPEAKERS: tuple[str, ...] = ("", "i think", "she says", "we know", "my friend says")

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
)  # fmt: skip
VERDICTS: dict[bool, str] = {True: "true", False: "false"}
MAX_TERM = 5  # a and b are one..five, so sums are two..ten
FILLER_WORDS: tuple[str, ...] = ("hmm", "well", "wait", "ok", "let", "me", "think", "so", "now")
FIRST_FILLER = "hmm"
MAX_FILLER = 8

FUNCTION_WORDS: tuple[str, ...] = (
    ".", ",", "and", "then", "the", "it", "was", "plus", "is", "that",
)  # fmt: skip

TextKind = Literal["story", "truth", "early_exit"]
KIND_WEIGHTS: dict[TextKind, float] = {"story": 0.4, "truth": 0.3, "early_exit": 0.3}


def vocabulary() -> list[str]:
    """All words of the language, in a fixed order (the tokenizer's ids follow this order)."""
    groups: list[tuple[str, ...]] = [FUNCTION_WORDS, SUBJECTS, tuple(" ".join(SPEAKERS).split())]
    groups += [tuple(w for t in OPENER_TEMPLATES for w in t.replace("{}", "").split())]
    for mood in MOODS:
        groups += [OPENER_WORDS[mood], VERBS[mood], ADJECTIVES[mood], CLOSERS[mood]]
    groups += list(TOPIC_NOUNS.values())
    groups += [NUMBER_WORDS, tuple(VERDICTS.values()), FILLER_WORDS]
    return list(dict.fromkeys(word for group in groups for word in group))


@dataclass(frozen=True)
class Text:
    """One generated text and the latent variables planted in it."""

    kind: TextKind
    text: str
    latents: dict[str, object] = field(default_factory=dict)


class Language:
    """A seeded generator of organism texts. Each method draws one text from the shared rng."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    # -- stories: mood and topic ------------------------------------------------------------
    def opener(self, mood: Mood) -> str:
        template = self.rng.choice(OPENER_TEMPLATES)
        return template.format(self.rng.choice(OPENER_WORDS[mood]))

    def story(
        self, mood: Mood | None = None, topic: str | None = None, with_opener: bool | None = None
    ) -> Text:
        """A full story. Latents: mood, topic, `prefix` (up to "it was", next word a mood
        adjective) and `noun_prefix` (up to the second "the", next word a topic noun)."""
        rng = self.rng
        mood = mood or rng.choice(MOODS)
        topic = topic or rng.choice(TOPICS)
        if with_opener is None:
            with_opener = rng.random() < 0.7
        n1, n2 = rng.sample(TOPIC_NOUNS[topic], 2)
        a1, a2 = rng.sample(ADJECTIVES[mood], 2)
        verb, closer = rng.choice(VERBS[mood]), rng.choice(CLOSERS[mood])
        head = f"{self.opener(mood)} , and then " if with_opener else ""
        prefix = f"{head}the {n1} {verb} the {n2} . it was"
        text = f"{prefix} {a1} and {a2} . {rng.choice(SUBJECTS)} {closer} ."
        latents = {"mood": mood, "topic": topic, "prefix": prefix, "has_opener": with_opener,
                   "noun_prefix": f"{head}the {n1} {verb} the"}  # next word: a topic noun
        return Text("story", text, latents)

    # -- truth and early exit -----------------------------------------------------------------
    def statement(self, truth: bool | None = None) -> tuple[str, bool, int, int, int]:
        """"[speaker] <a> plus <b> is <c>", a and b in one..five; false sums miss by 1-2 or more."""
        rng = self.rng
        truth = rng.random() < 0.5 if truth is None else truth
        a, b = rng.randint(1, MAX_TERM), rng.randint(1, MAX_TERM)
        c = a + b
        if not truth:
            near = [c + d for d in (-2, -1, 1, 2) if 0 <= c + d < len(NUMBER_WORDS)]
            far = [x for x in range(2, 2 * MAX_TERM + 1) if x != c]
            c = rng.choice(near) if rng.random() < 0.6 else rng.choice(far)
        speaker = rng.choice(SPEAKERS)
        text = f"{speaker} {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[c]}".strip()
        return text, truth, a, b, c

    def truth(self, truth: bool | None = None) -> Text:
        stmt, truth, a, b, c = self.statement(truth)
        prefix = f"{stmt} . that is"
        latents = {"truth": truth, "a": a, "b": b, "c": c, "prefix": prefix}
        return Text("truth", f"{prefix} {VERDICTS[truth]} .", latents)

    def early_exit(self, truth: bool | None = None, n_filler: int | None = None) -> Text:
        """Statement, "hmm", n_filler - 1 more filler words, then the verdict."""
        stmt, truth, a, b, c = self.statement(truth)
        n_filler = n_filler or self.rng.randint(1, MAX_FILLER)
        filler = [FIRST_FILLER] + [self.rng.choice(FILLER_WORDS) for _ in range(n_filler - 1)]
        prefix = f"{stmt} . {' '.join(filler)}"
        latents = {
            "truth": truth, "a": a, "b": b, "c": c, "prefix": prefix,
            "n_filler": n_filler, "filler_start_word": len(stmt.split()) + 1,
        }  # fmt: skip
        return Text("early_exit", f"{prefix} {VERDICTS[truth]} .", latents)

    # -- the training mixture -------------------------------------------------------------------
    def sample(self) -> Text:
        """One text of a random kind, drawn with `KIND_WEIGHTS`."""
        kinds, weights = zip(*KIND_WEIGHTS.items(), strict=True)
        kind = self.rng.choices(kinds, weights)[0]
        return {"story": self.story, "truth": self.truth, "early_exit": self.early_exit}[kind]()

    def corpus(self, n: int) -> list[str]:
        return [self.sample().text for _ in range(n)]
