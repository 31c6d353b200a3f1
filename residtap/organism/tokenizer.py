"""The organism's word-level tokenizer: one token per word of the language.

    from residtap.organism.tokenizer import build_tokenizer
    tok = build_tokenizer()
    tok("two plus two is four").input_ids     # [1, ...]: <bos> is added, <eos> is not
    tok.decode(ids, skip_special_tokens=True)  # "two plus two is four"

Special tokens: <pad>=0, <bos>=1, <eos>=2, <unk>=3; words follow in `language.vocabulary()` order.
Padding is on the left (what batched generation needs); the model uses rotary positions, which
only see relative offsets, so a left-padded row gives the same logits as the unpadded one.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from residtap.organism.language import vocabulary

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over `words` (default: the organism's vocabulary)."""
    words = vocabulary() if words is None else words
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    if len(vocab) != len(SPECIAL_TOKENS) + len(words):
        raise ValueError(
            f"expected distinct words, received {len(words)} words with duplicates; "
            "fix: deduplicate the word list"
        )
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=128,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids (4.57's default)
    )
