"""Shared test fixtures: tiny random models of every supported architecture, built offline."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as tf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/test_gpu.py; bench/GPU.md)")

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


def family_config(name: str, layers: int = 3, d: int = 32):
    """Tiny configs of the decoder families residtap must handle, most without a table entry,
    in the layouts that differ (parallel / sequential residual, post-LN, projected embeddings,
    output norms, MoE, scalar multipliers)."""
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ll = dict(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, **common)
    neox = dict(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                num_attention_heads=4, **common)
    opt = dict(hidden_size=d, ffn_dim=2 * d, num_hidden_layers=layers, num_attention_heads=4,
               **common)
    falcon = dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=4, **common)
    make = {
        "llama": lambda: tf.LlamaConfig(**ll),
        "qwen3": lambda: tf.Qwen3Config(head_dim=8, **ll),
        "gemma2": lambda: tf.Gemma2Config(head_dim=8, final_logit_softcapping=5.0, **ll),
        "gpt2": lambda: tf.GPT2Config(n_embd=d, n_layer=layers, n_head=4, **common),
        "gpt_neox_parallel": lambda: tf.GPTNeoXConfig(use_parallel_residual=True, **neox),
        "gpt_neox_sequential": lambda: tf.GPTNeoXConfig(use_parallel_residual=False, **neox),
        "opt_pre_ln": lambda: tf.OPTConfig(word_embed_proj_dim=d, **opt),
        "opt_post_ln": lambda: tf.OPTConfig(word_embed_proj_dim=d // 2,
                                            do_layer_norm_before=False, **opt),
        "phi": lambda: tf.PhiConfig(**neox),
        "phi3": lambda: tf.Phi3Config(**ll),
        "olmo": lambda: tf.OlmoConfig(**ll),
        "olmo2": lambda: tf.Olmo2Config(**ll),
        "falcon_parallel": lambda: tf.FalconConfig(**falcon),
        "falcon_new_arch": lambda: tf.FalconConfig(new_decoder_architecture=True, num_kv_heads=2,
                                                   **falcon),
        "falcon_sequential": lambda: tf.FalconConfig(parallel_attn=False, **falcon),
        "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **ll),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=d,
                                               shared_expert_intermediate_size=d, **ll),
        "gptj": lambda: tf.GPTJConfig(n_embd=d, n_layer=layers, n_head=4, rotary_dim=4,
                                      **common),
        "bloom": lambda: tf.BloomConfig(hidden_size=d, n_layer=layers, n_head=4, **common),
        "cohere": lambda: tf.CohereConfig(logit_scale=0.5, **ll),
        "granite": lambda: tf.GraniteConfig(embedding_multiplier=2.0, residual_multiplier=0.5,
                                            logits_scaling=4.0, **ll),
        "starcoder2": lambda: tf.Starcoder2Config(**ll),
        "stablelm": lambda: tf.StableLmConfig(**ll),
    }
    return make[name]()


FAMILIES = ["llama", "qwen3", "gemma2", "gpt2", "gpt_neox_parallel", "gpt_neox_sequential",
            "opt_pre_ln", "opt_post_ln", "phi", "phi3", "olmo", "olmo2", "falcon_parallel",
            "falcon_new_arch", "falcon_sequential", "mixtral", "qwen2_moe", "gptj", "bloom",
            "cohere", "granite", "starcoder2", "stablelm"]


def family_model(name: str, layers: int = 3, d: int = 32, seed: int = 0):
    """A tiny random model of a family, every parameter perturbed (norm weights too, so two
    norms never compute the same function by accident)."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(family_config(name, layers, d)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


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


def left_padded(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths as input ids and attention mask (B, T), padding on the
    left (as `generate` wants): row b is [pad] * (T - len) + seqs[b], mask 0 over the pads."""
    T = max(map(len, seqs))
    ids = torch.tensor([[pad] * (T - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def right_padded(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """As left_padded, the padding on the right: row b is seqs[b] + [pad] * (T - len)."""
    T = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    return ids, mask


def stop_tokens(score: torch.Tensor, threshold: float, patience: int) -> list[int]:
    """Closed form of early exit: per row of score (B, n), the first step k where the score has
    been > threshold for `patience` steps in a row (-1: never)."""
    stop_at = [-1] * score.shape[0]
    streak = torch.zeros(score.shape[0], dtype=torch.int)
    for k in range(score.shape[1]):
        streak = (streak + 1) * (score[:, k] > threshold).int()
        for b in range(score.shape[0]):
            if stop_at[b] < 0 and streak[b] >= patience:
                stop_at[b] = k
    return stop_at


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
