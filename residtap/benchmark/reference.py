"""The reference benchmark model, built in this one place, and random probe banks for it.

    model = reference_model()                  # 8 layers, d_model 512, 8 heads, MLP 1376, V 32000
    model = reference_model(vocab=8192)        # the same shape with another vocabulary
    bank = random_bank(model, 125, "all")      # 125 binary probes at every layer

The reference model is a random `LlamaForCausalLM` (multi-head attention, untied embeddings,
float32, eval mode; pad/bos/eos ids 0/1/2) whose weights are drawn after
`torch.manual_seed(seed)`: 58.1M parameters, 83.4 MFLOP per token (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch import nn

from residtap.probes.bank import ProbeBank
from residtap.sites import layer_sites

REFERENCE = dict(layers=8, d_model=512, intermediate=1376, heads=8, vocab=32000)


def reference_model(*, layers: int = 8, d_model: int = 512, intermediate: int = 1376,
                    heads: int = 8, vocab: int = 32000, max_positions: int = 2048,
                    seed: int = 0) -> nn.Module:
    """A random Llama of the reference shape (or the one given), seeded, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=max_positions,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def forward_flops_per_token(model: nn.Module) -> int:
    """2 x the parameters used in matmuls (input embedding lookup excluded)."""
    embed = model.get_input_embeddings().weight.numel()
    return 2 * (sum(p.numel() for p in model.parameters()) - embed)


def random_bank(model: nn.Module, n_probes: int, scope: str, seed: int = 0) -> ProbeBank:
    """n_probes binary probes at one middle layer ('one') or at every layer ('all')."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    sites = layer_sites(model)
    sites = [sites[len(sites) // 2]] if scope == "one" else sites
    bank = ProbeBank()
    for site in sites:
        weight = torch.randn(n_probes, d, generator=g) / d**0.5
        for i in range(n_probes):
            bank.add(f"{site}/p{i}", weight[i], 0.0, site=site)
    return bank
