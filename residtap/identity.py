"""Model identity: a short, stable description of which model produced an artefact.

    identity = model_identity(model)    # {'name', 'class', 'model_type', 'config_hash',
                                        #  'weights_fingerprint', 'd_model'}
    check_same_model(identity, model, "probe")   # ValueError when made on another model

Stores, probe files, steering vectors and tuned lenses record it, and loaders compare it, so
that an artefact made on one model is never silently used on another: neither on a model of
another config, nor on another checkpoint of the same config (`weights_fingerprint`).

The weights fingerprint hashes the signs of 256 evenly spaced entries of every parameter of the
base model (the weights the residual stream depends on; the LM head is left out, so a
checkpoint loaded with or without its head has one fingerprint). Signs survive every float
conversion, so the same checkpoint loaded in float32, bfloat16 or float16 has one fingerprint,
while another checkpoint (another seed, a fine-tune) flips the signs of some of the thousands of
sampled entries. It is computed once per model (cached until a sampled parameter changes),
reads a few kilobytes from the device, and is None where the weights cannot be read (meta or
tensor-parallel parameters): then it is not checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Config keys that do not change what the network computes; left out of the hash.
_VOLATILE_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
    "_attn_implementation", "_attn_implementation_autoset", "use_cache", "output_hidden_states",
    "output_attentions", "return_dict", "_commit_hash", "name_or_path",
}
# Keys transformers 4.x writes into every config (generation and legacy defaults) that 5.x
# dropped: not part of the network, and they would tie a hash to the release that made it.
_RELEASE_KEYS = {
    "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample",
    "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
    "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "id2label",
    "is_decoder", "is_encoder_decoder", "label2id", "length_penalty", "max_length",
    "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_scores", "prefix", "problem_type", "pruned_heads",
    "remove_invalid_values", "repetition_penalty", "return_dict_in_generate", "sep_token_id",
    "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss",
    "tie_encoder_decoder", "tokenizer_class", "top_k", "top_p", "torchscript", "typical_p",
    "use_bfloat16",
}
SAMPLES_PER_TENSOR = 256
_TINY = 1e-6  # |w| below this counts as zero (float16 flushes the smallest values to zero)

# model -> (what the cached value was computed from, fingerprint)
_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str | None]] = (
    weakref.WeakKeyDictionary())
# model -> fingerprints of other weights the user allowed on it (allow_other_weights=True)
_ALLOWED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def config_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the model's config, without the keys that do not change
    what the network computes and without those a transformers release adds or drops by
    itself (4.x's generation defaults; `rope_theta` beside `rope_parameters`), so the same
    model has the same hash under every supported release."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"expected a Hugging Face model with a .config, got {type(model).__name__}; "
            "pass a transformers PreTrainedModel"
        )
    raw = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_KEYS | _RELEASE_KEYS}
    return _hash(_canonical_rope(raw))


def _canonical_rope(raw: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings in one form: 5.x keeps them in `rope_parameters`, 4.57 in
    `rope_theta`, `rope_scaling` and `partial_rotary_factor` (GPT-NeoX: `rotary_emb_base`,
    `rotary_pct`), written beside rope_parameters when it reads a 5.x config."""
    keys = ("rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor",
            "rotary_emb_base", "rotary_pct")  # the last two: GPT-NeoX's 4.57 names
    if not any(k in raw for k in keys):
        return raw
    rope = dict(raw.get("rope_parameters") or {})
    if not rope:
        scaling = dict(raw.get("rope_scaling") or {})
        if "type" in scaling:
            scaling.setdefault("rope_type", scaling.pop("type"))
        rope = {"rope_type": "default", **scaling}
        theta = raw.get("rope_theta", raw.get("rotary_emb_base"))
        if theta is not None:
            rope["rope_theta"] = theta
    partial = raw.get("partial_rotary_factor", raw.get("rotary_pct"))
    if partial is not None:
        rope.setdefault("partial_rotary_factor", partial)
    return {**{k: v for k, v in raw.items() if k not in keys}, "rope": rope}


def _hash(raw: dict[str, Any]) -> str:
    text = json.dumps(raw, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def same_config(recorded: str | None, model: nn.Module) -> bool:
    """True when an identity's recorded config hash is this model's (or, for an artefact of
    residtap 0.1 up to session 3, the hash of its whole config dict, under the same release)."""
    if recorded is None:
        return False
    legacy = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_KEYS}
    return recorded in (config_hash(model), _hash(legacy))


def weights_fingerprint(model: nn.Module) -> str | None:
    """sha256 (16 hex digits) of the signs of fixed entries of the base model's weights (see
    the module docstring); None when the weights are not readable here (meta, tensor parallel).
    Cached per model until a sampled parameter is replaced or changed in place."""
    base = getattr(model, "base_model", None)
    params = list((base if isinstance(base, nn.Module) else model).parameters())
    state = tuple((p.data_ptr(), _version(p)) for p in params)
    cached = _FINGERPRINTS.get(model)
    if cached is not None and cached[0] == state and all(v is not None for _, v in state):
        return cached[1]
    fingerprint = _fingerprint(params)
    _FINGERPRINTS[model] = (state, fingerprint)
    return fingerprint


def _version(t: Tensor) -> int | None:
    try:
        return t._version  # bumped by every in-place change (optimizer steps, copy_)
    except RuntimeError:  # inference tensors keep no version counter: never cached
        return None


def _fingerprint(params: list[Tensor]) -> str | None:
    if not params:
        return None
    if any(p.is_meta or _is_dtensor(p) for p in params):
        log.info("model weights are on the meta device or tensor-parallel; no weights "
                 "fingerprint (artefacts are checked by config only)")
        return None
    h = hashlib.sha256()
    by_device: dict[torch.device, list[tuple[int, Tensor]]] = {}  # (parameter number, samples)
    with torch.no_grad():
        for i, p in enumerate(params):
            n = p.numel()
            h.update(str(tuple(p.shape)).encode())
            if n == 0:
                continue
            index = torch.linspace(0, n - 1, min(n, SAMPLES_PER_TENSOR), dtype=torch.float64)
            flat = p.detach().reshape(-1)  # a view for the (usual) contiguous parameter
            picked = flat[index.round().long().to(p.device)].float()  # (k,)
            by_device.setdefault(p.device, []).append((i, picked))
        parts: dict[int, Tensor] = {}
        for items in by_device.values():  # one copy to the host per device
            host = torch.cat([t for _, t in items]).cpu()
            parts |= zip([i for i, _ in items], host.split([len(t) for _, t in items]),
                         strict=True)
        values = torch.cat([parts[i] for i in sorted(parts)])  # in parameter order
    signs = torch.where(values.abs() < _TINY, 0, torch.sign(values)).to(torch.int8)
    h.update(signs.numpy().tobytes())
    return h.hexdigest()[:16]


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def model_identity(model: nn.Module) -> dict[str, Any]:
    """{'name', 'class', 'model_type', 'config_hash', 'weights_fingerprint', 'd_model'}."""
    config = model.config
    return {
        "name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", "unknown"),
        "config_hash": config_hash(model),
        "weights_fingerprint": weights_fingerprint(model),
        "d_model": getattr(config, "hidden_size", None),
    }


def check_same_model(recorded: dict[str, Any], model: nn.Module, what: str, *,
                     allow_other_weights: bool = False) -> None:
    """Raise ValueError when `recorded` (an identity) was not made on `model`: another config,
    or another checkpoint of this config (weights fingerprint). allow_other_weights=True
    accepts another checkpoint of the same config with a warning, and remembers that for this
    model (later checks of the same artefact on it pass). An identity recorded before residtap
    kept weights fingerprints is checked by config only, with a warning."""
    current = config_hash(model)
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    if not same_config(recorded.get("config_hash"), model):
        raise ValueError(
            f"{what} was made on model {recorded.get('name')!r} "
            f"(config hash {recorded.get('config_hash')}), but this model {name!r} has config "
            f"hash {current}; use the model it was made on, or re-create the {what} for this one"
        )
    theirs = recorded.get("weights_fingerprint")
    if theirs is None:
        log.warning("%s records no weights fingerprint (made before residtap recorded one, or "
                    "on weights it could not read); only the config was checked", what)
        return
    ours = weights_fingerprint(model)
    if ours is None:
        log.warning("the weights of %r cannot be read here (meta or tensor-parallel), so the "
                    "%s's weights fingerprint was not checked", name, what)
        return
    if theirs == ours or theirs in _ALLOWED.get(model, ()):
        return
    if allow_other_weights:
        log.warning("%s was made on other weights of this config (weights fingerprint %s, this "
                    "model %s); used anyway (allow_other_weights=True)", what, theirs, ours)
        _ALLOWED.setdefault(model, set()).add(theirs)
        return
    raise ValueError(
        f"{what} was made on other weights than this model's: same config (hash {current}) but "
        f"weights fingerprint {theirs}, this model {name!r} has {ours} (another checkpoint or a "
        f"fine-tune); use the checkpoint it was made on, re-create the {what}, or pass "
        "allow_other_weights=True (--allow-other-weights) to use it on these weights anyway"
    )
