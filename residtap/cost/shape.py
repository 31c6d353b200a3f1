"""The numbers of a decoder that cost depends on, counted exactly from its config alone.

    from residtap.cost import model_shape
    shape = model_shape("Llama-3.1-8B")     # a preset, a config.json, a model folder, a dict
    shape.n_params, shape.matmul_params, shape.d_model, shape.windows

The model is built on the meta device (no memory, no weights) and its parameters are grouped
by the parts residtap.arch finds, the same entries sites and the lens use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from residtap.presets import config_dict

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder that cost depends on, counted exactly from its config: the
    model is built on the meta device (no memory, no weights) and its parameters are counted
    by the parts residtap.arch finds, the same entry sites and the lens use."""

    model_type: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    parts: dict[str, int]  # parameter count per component; sums to n_params
    lookup_params: int  # tables read by index: token embedding unless tied, learned positions
    unembedding_params: int  # the lm_head matrix (the embedding table when tied)
    windows: tuple[int | None, ...]  # per layer: sliding attention window, None for full
    expert_params: int = 0  # parameters of mixture-of-experts experts (all of them)
    active_experts: float = 1.0  # fraction of the experts each token runs (top-k / experts)

    @property
    def n_params(self) -> int:
        """Equals `sum(p.numel() for p in model.parameters())` (a tied table counted once)."""
        return sum(self.parts.values())

    @property
    def matmul_params(self) -> int:
        """Weights that multiply every token's activations: all but the lookup tables (for a
        mixture of experts, all experts: the weights a forward may read)."""
        return self.n_params - self.lookup_params

    @property
    def active_matmul_params(self) -> int:
        """Weights one token is multiplied by: a mixture of experts runs top-k experts only."""
        return self.matmul_params - round(self.expert_params * (1 - self.active_experts))

    @property
    def d_attn(self) -> int:
        return self.n_heads * self.head_dim


def _windows(cfg: PretrainedConfig, n_layers: int) -> tuple[int | None, ...]:
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * n_layers


def _first(cfg: PretrainedConfig, *keys: str) -> Any:
    return next((getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None), None)


def _kv_heads(cfg: PretrainedConfig, heads: int) -> int:
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        return 1  # Falcon-7B style
    return int(_first(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv") or heads)


def meta_model(cfg: PretrainedConfig) -> nn.Module:
    """The causal-LM model of `cfg` on the meta device: its modules and parameter shapes, no
    memory and no weights. LookupError when transformers has no causal LM for the config."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except ValueError as err:
        raise LookupError(
            f"cannot cost model_type {cfg.model_type!r}: transformers has no causal language "
            f"model for it ({str(err).splitlines()[0][:120]}); residtap costs decoders"
        ) from err


def model_shape(config: dict | PretrainedConfig | str | Path) -> ModelShape:
    """The exact parameter count and shape numbers of any decoder's config."""
    from residtap.arch import find
    from residtap.recording import kind_of

    cfg, _ = load_config(config)
    model = meta_model(cfg)
    layers = find(model).paths["layers"]
    blocks = model.get_submodule(layers)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    kinds = {id(m): ("unembedding", None) for m in [head] if m is not None and not tied}
    kinds[id(embed)] = ("embedding", None)
    for path, module in model.named_modules():
        if id(module) in kinds or path == layers or path.startswith(layers + "."):
            continue
        if isinstance(module, nn.Embedding):
            kinds[id(module)] = ("position_embedding", None)
        elif kind_of(path.rsplit(".", 1)[-1], type(module).__name__, False) == "norm":
            kinds[id(module)] = ("norms", None)
    for block in blocks:
        children = [(name, child, kind_of(name, type(child).__name__,
                                          any(True for _ in child.parameters())))
                    for name, child in block.named_children()]
        # no MLP module (OPT: fc1 and fc2 sit in the block): its other weights are the MLP
        rest = "mlp" if all(kind != "mlp" for *_, kind in children) else "other"
        for _, child, kind in children:
            group = {"attn": "attention", "mlp": "mlp", "norm": "norms"}.get(kind, rest)
            kinds.setdefault(id(child), (group, None))
    parts: dict[str, int] = {}
    lookup = expert = 0
    seen: set[int] = set()
    for path, param in _params_by_owner(model):
        if id(param[1]) in seen:
            continue
        seen.add(id(param[1]))
        group = next((kinds[id(m)][0] for m in param[0] if id(m) in kinds), "other")
        parts[group] = parts.get(group, 0) + param[1].numel()
        if group in ("embedding", "position_embedding") and not (tied and group == "embedding"):
            lookup += param[1].numel()
        if ".experts." in f".{path}.":
            expert += param[1].numel()
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    d = _d_model(text)  # the residual stream (OPT-350m's embeddings are narrower)
    heads = int(_first(text, "num_attention_heads", "n_head", "num_heads"))
    head_dim = int(_first(text, "head_dim") or d // heads)
    n_experts = _first(text, "num_local_experts", "num_experts", "n_routed_experts")
    top_k = _first(text, "num_experts_per_tok", "moe_topk", "top_k")
    active = float(top_k) / float(n_experts) if expert and n_experts and top_k else 1.0
    unembedding = (head.weight if head is not None else embed.weight).numel()
    return ModelShape(text.model_type, d, len(blocks), heads, _kv_heads(text, heads), head_dim,
                      int(head.weight.shape[0] if head is not None else embed.weight.shape[0]),
                      tied, parts, lookup, unembedding, _windows(text, len(blocks)), expert,
                      active)  # fmt: skip


def _d_model(cfg: PretrainedConfig) -> int:
    return int(_first(cfg, "hidden_size", "n_embd", "d_model"))


def _params_by_owner(model: nn.Module):
    """(path, (owner modules outermost-last, parameter)) for every parameter: the owners are the
    modules on its path, innermost first, so the first one with a kind decides its group."""
    modules = dict(model.named_modules())
    for path, param in model.named_parameters(remove_duplicate=False):
        names = path.split(".")[:-1]
        owners = [modules[".".join(names[:i])] for i in range(len(names), 0, -1)]
        yield path, (owners, param)


def load_config(source: dict | PretrainedConfig | str | Path) -> tuple[PretrainedConfig, str]:
    """(config with its architecture's defaults filled in, display name) for any model source:
    a config object or dict, a config.json, a model folder, a preset name, or 'organism'."""
    from transformers import PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source, getattr(source, "name_or_path", "") or source.model_type
    if isinstance(source, dict):
        return _config_from_dict(source), str(source.get("model_type", "config"))
    if isinstance(source, (str, Path)):
        raw, name = config_dict(source)
        return _config_from_dict(raw), name
    raise TypeError(
        f"expected a config (dict or PretrainedConfig), a path or a preset name, got "
        f"{type(source).__name__}"
    )


def _config_from_dict(raw: dict[str, Any]) -> PretrainedConfig:
    from transformers import AutoConfig

    raw = dict(raw)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise ValueError(
            f"expected a Hugging Face config with a 'model_type', got keys {sorted(raw)[:8]}...; "
            "pass the model's config.json"
        )
    try:
        return AutoConfig.for_model(model_type, **raw)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"could not read the {model_type!r} config: {err}") from err
