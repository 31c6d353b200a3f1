"""SAELens's on-disk SAE format, read and written without the sae-lens package.

    sae = load_sae("folder")                    # cfg.json + sae_weights.safetensors
    sae = load_sae("folder", site="layers.3")   # when cfg.json's hook name says no site
    save_sae(sae, "out_folder", model=model)    # readable by SAELens's SAE.load_from_disk

The folder (SAELens 6; older flat cfg.json files are read too):
    cfg.json                   {"architecture": "standard" | "jumprelu" | "topk", "d_in", "d_sae",
                               "dtype", "apply_b_dec_to_input", "normalize_activations",
                               "reshape_activations", "k" and "rescale_acts_by_decoder_norm"
                               (topk), "metadata": {"model_name", "hook_name", ...,
                               "sae_lens_version"}}
    sae_weights.safetensors    W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in),
                               b_dec (d_in,), threshold (d_sae,) for jumprelu
A file without metadata.sae_lens_version >= 6 is read as SAELens's older flat layout, with its
defaults: "hook_point" for hook_name, "activation_fn" relu or topk (k in
"activation_fn_kwargs"), apply_b_dec_to_input true, a boolean normalize_activations (true is
"expected_average_only_in"), and a "scaling_factor" tensor, accepted only when all ones.
Tensors are cast to cfg.json's dtype, as SAELens does.

Refused with a ValueError that says why: other architectures (gated, abstopk, transcoders,
...), hook_z reshaping or a head index (per-head SAEs), unknown, missing or misshapen tensors,
NaN/Inf, an unknown dtype or normalisation.

Sites. A TransformerLens hook name maps to a residtap site where that is unambiguous:
`blocks.{i}.hook_resid_post` is `layers.{i}` (block i's output, HF hidden_states[i+1]),
`blocks.{i}.hook_resid_pre` is `layers.{i-1}`, or `embed` for i = 0 (hidden_states[0]).
Anything else (hook_resid_mid, attention or MLP outputs, a module path) needs `site=`. Caveat:
TransformerLens's default loading centres the residual stream of LayerNorm models
(center_writing_weights), so an SAE trained on those reads per-token-centred activations.
Files written here record the residtap site and model identity in a top-level "residtap" key
(SAELens ignores keys it does not know) and a TransformerLens hook name for residual sites.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from residtap.artefacts import atomic_write_bytes, check_finite, read_safetensors
from residtap.identity import check_same_model, model_identity
from residtap.sae.model import ARCHITECTURES, NORMALIZATIONS, SAE

log = logging.getLogger(__name__)

__all__ = ["CFG_FILE", "WEIGHTS_FILE", "hook_of_site", "load_sae", "save_sae", "site_of_hook"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"  # the SAELens layout written (metadata.sae_lens_version)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
# metadata keys every SAELens 6 release accepts (early 6.x kept them in a fixed dataclass)
_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index",
                  "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens",
                  "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
                  "sae_lens_version", "sae_lens_training_version")
_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def site_of_hook(hook_name: str | None) -> str | None:
    """The residtap site of a TransformerLens hook name, or None where it is not unambiguous."""
    m = _RESID.match(hook_name or "")
    if m is None:
        return None
    i = int(m.group(1))
    if m.group(2) == "post":
        return f"layers.{i}"
    return "embed" if i == 0 else f"layers.{i - 1}"


def hook_of_site(site: str | None) -> str | None:
    """The TransformerLens hook name of a residtap residual site, else None."""
    if site == "embed":
        return "blocks.0.hook_resid_pre"
    m = re.match(r"^layers\.(\d+)$", site or "")
    return f"blocks.{m.group(1)}.hook_resid_post" if m else None


def load_sae(path: str | os.PathLike, *, site: str | None = None, model: nn.Module | None = None,
             allow_other_weights: bool = False, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> SAE:
    """Read an SAE folder (module docstring). site: the residtap site it reads, required when
    cfg.json records none this module can map. model: check d_in (and the residtap identity
    the folder records, if any) against it. dtype: override cfg.json's dtype."""
    folder = Path(path)
    if not (folder / CFG_FILE).is_file():
        what = "a file, not a folder" if folder.is_file() else "a folder without it"
        raise FileNotFoundError(
            f"expected an SAE folder with {CFG_FILE} and {WEIGHTS_FILE} (SAELens's layout) at "
            f"{folder}, got {what if folder.exists() else 'nothing'}; pass the folder that "
            "holds both files")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / CFG_FILE} is not valid JSON ({err}); re-save the SAE") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{folder / CFG_FILE} holds a {type(cfg).__name__}, expected an object")
    fields = _read_cfg(cfg, folder / CFG_FILE)
    _, tensors = read_safetensors(folder / WEIGHTS_FILE, "SAE weights file",
                                  f" (SAELens names it {WEIGHTS_FILE}, beside {CFG_FILE})")
    tensors = _check_tensors(tensors, fields["architecture"], cfg["d_in"], cfg["d_sae"],
                             folder / WEIGHTS_FILE)
    cfg_dtype = fields.pop("dtype")
    cast = dtype or cfg_dtype
    tensors = {name: t.to(device=device, dtype=cast) for name, t in tensors.items()}
    ours = cfg.get("residtap") if isinstance(cfg.get("residtap"), dict) else {}
    mapped = ours.get("site") or site_of_hook(fields["hook_name"])
    if site is None and mapped is None:
        raise LookupError(
            f"{folder}: cannot tell which residtap site this SAE reads (hook name "
            f"{fields['hook_name']!r}; only blocks.N.hook_resid_post / hook_resid_pre map "
            "unambiguously); pass site=, e.g. load_sae(path, site='layers.3'), naming the "
            "site whose activations it was trained on")
    if site is not None and mapped is not None and site != mapped:
        log.warning("%s: cfg.json says site %r (hook %r); using site=%r as given", folder,
                    mapped, fields["hook_name"], site)
    sae = SAE(**tensors, **fields, site=site or mapped, model=ours.get("model"),
              info={k: v for k, v in ours.items() if k not in ("site", "model", "written_by")})
    if model is not None:
        check_model(sae, model, allow_other_weights=allow_other_weights)
    return sae


def check_model(sae: SAE, model: nn.Module, *, allow_other_weights: bool = False) -> None:
    """ValueError unless `sae` fits `model`: d_in equals the hidden size, and the model identity
    the SAE records (if any) is this model's (residtap.identity.check_same_model)."""
    _check_d_in(sae, model)
    if sae.model is not None:
        check_same_model(sae.model, model, "SAE", allow_other_weights=allow_other_weights)


def save_sae(sae: SAE, path: str | os.PathLike, *, model: nn.Module | None = None) -> Path:
    """Write `sae` as a SAELens folder at `path` (created; existing files replaced). Each file
    is written to a temporary name, fsynced and renamed, so it is the old or the new one, never
    a torn mix. model: record its residtap identity (after checking d_in). Returns the folder."""
    folder = Path(path)
    if folder.is_file():
        raise ValueError(f"out {str(folder)!r} is a file; an SAE is a folder ({CFG_FILE} + "
                         f"{WEIGHTS_FILE}); pass a folder path")
    identity = sae.model
    if model is not None:
        _check_d_in(sae, model)
        identity = model_identity(model)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    atomic_write_bytes(folder / WEIGHTS_FILE, safetensors_bytes(tensors))
    atomic_write_bytes(folder / CFG_FILE, json.dumps(_cfg(sae, identity), indent=2).encode())
    return folder


def _check_d_in(sae: SAE, model: nn.Module) -> None:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is not None and hidden != sae.d_in:
        raise ValueError(f"the SAE reads d_in={sae.d_in} activations but this model's hidden "
                         f"size is {hidden}; use the model it was trained on")


def _cfg(sae: SAE, identity: dict[str, Any] | None) -> dict[str, Any]:
    from residtap.version import __version__

    metadata = {k: v for k, v in sae.metadata.items() if k in _METADATA_KEYS}
    metadata["model_name"] = sae.model_name or (identity or {}).get("name")
    metadata["hook_name"] = sae.hook_name or hook_of_site(sae.site) or sae.site
    metadata.setdefault("sae_lens_version", FORMAT_VERSION)
    metadata.setdefault("sae_lens_training_version", None)
    cfg: dict[str, Any] = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": sae.normalize_activations,
        "reshape_activations": "none",
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = sae.rescale_acts_by_decoder_norm
    cfg["metadata"] = metadata
    cfg["residtap"] = {"site": sae.site, "model": identity, "written_by":
                       f"residtap {__version__}", **sae.info}
    return cfg


def _read_cfg(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """SAE constructor fields (no tensors) plus "dtype" from a cfg.json of either layout."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = re.match(r"\d+", str(cfg.get("sae_lens_version") or meta.get("sae_lens_version")))
    if version is not None and int(version.group(0)) >= 6:
        architecture = cfg.get("architecture")
        k = cfg.get("k")
        hook_name = meta.get("hook_name")
        head = meta.get("hook_head_index")
    else:  # SAELens < 6: flat keys
        meta = {key: cfg[key] for key in _METADATA_KEYS if key in cfg}
        hook_name = cfg.get("hook_name", cfg.get("hook_point"))
        meta["hook_name"] = hook_name
        head = cfg.get("hook_head_index", cfg.get("hook_point_head_index"))
        fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        architecture = cfg.get("architecture", "standard")
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        if fn == "topk":
            architecture = "topk"
        elif fn != "relu":
            raise ValueError(f"{where}: activation_fn {fn!r} is not supported; residtap reads "
                             "'relu' (standard, jumprelu) and 'topk' SAEs")
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{where}: SAE architecture {architecture!r} is not supported; residtap reads "
            f"{list(ARCHITECTURES)} (gated SAEs, transcoders and others are refused)")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"{where}: expected a positive integer {key!r}, got "
                             f"{cfg.get(key)!r}")
    norm = cfg.get("normalize_activations", "none")
    norm = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm)
    if norm not in NORMALIZATIONS:
        raise ValueError(f"{where}: normalize_activations {norm!r} is not supported; expected "
                         f"one of {list(NORMALIZATIONS)}")
    reshape = cfg.get("reshape_activations", "none")
    if reshape != "none" or head is not None or "hook_z" in (hook_name or ""):
        raise ValueError(f"{where}: per-head SAEs (hook_z reshaping, head index {head!r}) are "
                         "not supported; residtap reads SAEs over a whole site's vector")
    dtype_name = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype_name not in DTYPES:
        raise ValueError(f"{where}: dtype {cfg.get('dtype')!r} is unknown; expected one of "
                         f"{list(DTYPES)}")
    if architecture == "topk" and not isinstance(k, int):
        raise ValueError(f"{where}: a topk SAE needs an integer 'k', got {k!r}")
    if norm in ("expected_average_only_in", "covariance_whitening"):
        log.info("%s: normalize_activations=%r is applied by SAELens only while training (the "
                 "factor is folded into the saved weights); nothing is applied here either",
                 where, norm)
    return {
        "architecture": architecture, "k": k if architecture == "topk" else None,
        "rescale_acts_by_decoder_norm": bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
        "normalize_activations": norm, "hook_name": hook_name,
        "model_name": meta.get("model_name"), "metadata": dict(meta),
        "dtype": DTYPES[dtype_name],
    }


def _check_tensors(tensors: dict[str, Tensor], architecture: str, d_in: int, d_sae: int,
                   where: Path) -> dict[str, Tensor]:
    """The SAE's tensors, checked for names, shapes and finiteness (ValueError otherwise)."""
    tensors = dict(tensors)
    scale = tensors.pop("scaling_factor", None)
    if scale is not None and not bool((scale == 1).all()):
        raise ValueError(f"{where}: a 'scaling_factor' tensor that is not all ones (SAELens's "
                         "old fine-tuning scale) is not supported; fold it into W_dec first")
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    expected = list(shapes)
    missing = [n for n in expected if n not in tensors]
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        hint = (" (log_threshold is a training checkpoint's; SAELens saves threshold = "
                "exp(log_threshold) for inference)" if "log_threshold" in tensors else "")
        raise ValueError(
            f"{where}: a {architecture!r} SAE holds tensors {expected}, this file has "
            f"{sorted(tensors)} (missing {missing}, unexpected {extra}){hint}; re-save it")
    for name, shape in shapes.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            flipped = " (stored transposed?)" if got == shape[::-1] and len(shape) == 2 else ""
            raise ValueError(f"{where}: tensor {name} has shape {got}{flipped}, expected {shape} "
                             f"for cfg.json's d_in={d_in}, d_sae={d_sae}; the file does not "
                             "match its cfg.json")
        if not tensors[name].is_floating_point():
            raise ValueError(f"{where}: tensor {name} is {tensors[name].dtype}, expected floats")
    check_finite(where, tensors, "SAE")
    return tensors
