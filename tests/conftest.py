"""Shared test fixtures: tiny random models of every supported architecture, built offline."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as tf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2", "gpt_neox",
            "phi3", "opt"]


def tiny_config(arch: str, layers: int = 3, d: int = 32):
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama_like = dict(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=8, **llama_like)
    if arch == "phi3":
        return tf.Phi3Config(**llama_like)
    if arch == "gemma2":
        return tf.Gemma2Config(head_dim=8, final_logit_softcapping=5.0, **llama_like)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(head_dim=8, sliding_window=4, final_logit_softcapping=5.0,
                                   **llama_like)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=d, n_layer=layers, n_head=4, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                                num_attention_heads=4, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=d, ffn_dim=2 * d, num_hidden_layers=layers,
                            num_attention_heads=4, word_embed_proj_dim=d, **common)
    if arch == "bert":
        return tf.BertConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                             num_attention_heads=4, vocab_size=VOCAB, pad_token_id=0)
    raise ValueError(arch)


def tiny_model(arch: str, layers: int = 3, d: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(arch, layers, d)
    if arch == "bert":
        return tf.BertForMaskedLM(config).eval()
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def llama():
    return tiny_model("llama", layers=4)


def batch_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: 'w4' ... 'w95' (ids 4..95; 0 pad,
    1 bos, 2 eos, 3 unk), BOS prepended, words decoded with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>", *[f"w{i}" for i in range(4, VOCAB)]]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                        special_tokens=[("<bos>", 1)])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])
