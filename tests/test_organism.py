"""The bundled model organism: its language, data, training script and the shipped checkpoint."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from residtap import organism
from residtap.organism import build_data, evaluate, train
from residtap.organism.language import MOOD_WORDS, TOPIC_NOUNS, Language, vocabulary
from residtap.organism.tokenizer import build_tokenizer

LABELLED = ("mood", "topic", "truth", "early_exit")


# -- the language and tokenizer -----------------------------------------------------------------
def test_language_is_deterministic_per_seed() -> None:
    assert Language(3).corpus(50) == Language(3).corpus(50)
    assert Language(3).corpus(50) != Language(4).corpus(50)


def test_mood_words_are_disjoint_and_in_vocabulary() -> None:
    assert not MOOD_WORDS["positive"] & MOOD_WORDS["negative"]
    assert MOOD_WORDS["positive"] | MOOD_WORDS["negative"] <= set(vocabulary())


def test_tokenizer_adds_bos_and_decodes_words() -> None:
    tok = build_tokenizer()
    text = Language(0).story().text
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert len(ids) == len(text.split()) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_shipped_data_is_what_the_generator_writes() -> None:
    built = build_data.build()
    for name in organism.DATASETS:
        assert organism.read_jsonl(name) == built[name], name


# -- data-set contract ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", LABELLED)
def test_labelled_schema_and_split_by_text(name: str) -> None:
    rows = organism.read_jsonl(name)
    assert all({"id", "text", "label", "split"} <= row.keys() for row in rows)
    assert len({r["id"] for r in rows}) == len({r["text"] for r in rows}) == len(rows)
    by_split = defaultdict(set)
    for row in rows:
        by_split[row["split"]].add(row["label"])
    assert set(by_split) == {"train", "test"} and by_split["train"] == by_split["test"]


@pytest.mark.parametrize("name", LABELLED)
def test_last_token_is_not_a_giveaway(name: str) -> None:
    """The probe position's own word says nothing: every class ends on the same words."""
    last = defaultdict(set)
    for row in organism.read_jsonl(name):
        last[row["label"]].add(row["text"].split()[-1])
    assert len({frozenset(words) for words in last.values()}) == 1, dict(last)


def test_early_exit_positions_point_at_filler() -> None:
    tok = build_tokenizer()
    for row in organism.read_jsonl("early_exit")[:50]:
        tokens = tok.convert_ids_to_tokens(tok(row["text"]).input_ids)
        assert tokens[row["filler_start"]] == "hmm"
        assert row["filler_end"] == len(tokens) - 1
        assert row["full_text"] == f"{row['text']} {row['answer']} ."


def test_mood_pairs_differ_only_in_mood_words() -> None:
    for pair in organism.read_jsonl("mood_pairs"):
        pos, neg = pair["positive"].split(), pair["negative"].split()
        assert len(pos) == len(neg)
        diff = [(p, n) for p, n in zip(pos, neg, strict=True) if p != n]
        assert diff and all(p in MOOD_WORDS["positive"] and n in MOOD_WORDS["negative"]
                            for p, n in diff)  # fmt: skip


def test_mood_ab_is_caa_format() -> None:
    for row in organism.read_jsonl("mood_ab"):
        match, other = row["answer_matching_behavior"], row["answer_not_matching_behavior"]
        assert match[0] == other[0] == " "
        assert match[1:] in MOOD_WORDS["positive"] and other[1:] in MOOD_WORDS["negative"]


def test_read_jsonl_unknown_name_says_what_exists() -> None:
    with pytest.raises(LookupError, match="mood_pairs"):
        organism.read_jsonl("moods")


# -- training script ------------------------------------------------------------------------------
def test_short_training_run_lowers_the_loss_and_loads(tmp_path, monkeypatch) -> None:
    out = tmp_path / "tiny"
    tiny = "--steps 40 --d-model 32 --layers 1 --heads 2 --batch-size 16 --eval-texts 64"
    argv = ["--out", str(out), *tiny.split(), "--warmup", "5", "--lr", "1e-2"]
    assert train.main(argv) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["final_eval_loss"] < record["initial_eval_loss"] - 1.0, record
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model, tok = organism.load(path=out)
    assert model.config.num_hidden_layers == 1 and tok.pad_token == "<pad>"


# -- the shipped checkpoint -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        torch.manual_seed(0)
        return organism.load()


def test_shipped_checkpoint_loads_offline_in_eval_mode(shipped) -> None:
    model, tok = shipped
    assert not model.training
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.padding_side == "left" and tok.pad_token_id == model.config.pad_token_id
    size = sum(p.stat().st_size for p in organism.MODEL_DIR.iterdir())
    assert size < 10_000_000, f"checkpoint is {size} bytes; expected a few MB"
    record = json.loads((organism.MODEL_DIR / "training.json").read_text())
    assert record["final_eval_loss"] < record["initial_eval_loss"]


def test_left_padding_keeps_logits(shipped) -> None:
    model, tok = shipped
    texts = ["two plus two is four . that is", "the coach"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = model(**batch).logits[1, -1]
        alone = model(**tok(texts[1:], return_tensors="pt")).logits[0, -1]
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def probe_curves(shipped) -> dict[str, list[float]]:
    model, tok = shipped
    return {name: evaluate.probe_layers(model, tok, organism.read_jsonl(name), None)
            for name in ("mood", "topic", "truth")}  # fmt: skip


@pytest.mark.parametrize("name, chance", [("mood", 0.5), ("topic", 0.25), ("truth", 0.5)])
def test_probe_reads_latent_mid_network_not_from_embedding(probe_curves, name, chance) -> None:
    curve = probe_curves[name]  # accuracy at hidden_states[0] (embedding) ... [L]
    best = max(curve[1:])
    assert best >= 0.95, f"{name}: best layer accuracy {best:.3f}; per layer {curve}"
    assert curve[0] <= chance + 0.1, f"{name}: embedding probe {curve[0]:.3f} beats chance"


def test_early_exit_probe_reads_verdict_at_first_filler(shipped) -> None:
    model, tok = shipped
    curve = evaluate.probe_layers(model, tok, organism.read_jsonl("early_exit"), "filler_start")
    assert max(curve[1:]) >= 0.9, f"per layer {curve}"
    assert curve[0] <= 0.6


def test_greedy_generation_follows_the_prompt_mood(shipped) -> None:
    model, tok = shipped
    rate, samples = evaluate.mood_match_rate(model, tok, n=60)
    assert rate >= 0.9, f"mood-match rate {rate:.3f}; samples {samples[:4]}"


def test_topic_nouns_follow_the_prompt_topic(shipped) -> None:
    model, tok = shipped
    prompts = [f"the {nouns[0]} loved the" for nouns in TOPIC_NOUNS.values()]
    out = model.generate(**tok(prompts, padding=True, return_tensors="pt"), max_new_tokens=1)
    nxt = tok.batch_decode(out[:, -1:])
    assert all(w in nouns for w, nouns in zip(nxt, TOPIC_NOUNS.values(), strict=True)), nxt
