"""Probe files: one safetensors file per probe, tensors plus JSON-encoded string metadata.

    from residtap.probes import save_probe, load_probe
    save_probe(probe, "layer12_sentiment.safetensors", model=model)  # records the model
    probe = load_probe("layer12_sentiment.safetensors", model=model)  # checks it is that model

Layout (format "residtap.probe", format_version 1):
    tensors   linear kinds: weight (C, d), bias (C,)
              attention:    query (H, d), position_weight (H,), value (H, C, d), bias (C,)
    metadata  every value is a JSON document: format, format_version, kind, site, d_model,
              n_outputs, classes, label_column, threshold, metrics, model (identity or null),
              metadata (training details), residtap_version, and for attention probes position.

`load_any_probe` opens whatever a bank or `residtap probe score` accepts: a probe file (linear or
attention), an SAE folder (SAELens's layout: its selected features), or a probe trained on SAE
features (its metadata["sae"] names them; the SAE itself comes from `sae=`).

Loading never unpickles anything, checks every tensor against the metadata (shape, float dtype,
no NaN/Inf), and raises ValueError naming what is wrong for a file that is not a probe, is
damaged or was edited. With `model`, the recorded identity must match: the same config and the
same weights (residtap.identity; allow_other_weights=True accepts another checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..artefacts import check_finite, check_out_file, read_safetensors, write_artefact
from ..identity import check_same_model, model_identity
from .attention import AttentionProbe
from .probe import Probe

log = logging.getLogger(__name__)

FORMAT = "residtap.probe"
FORMAT_VERSION = 1
LINEAR_KINDS = ("logistic", "multinomial", "ridge", "diff_means")
TENSORS = {
    **{kind: ("weight", "bias") for kind in LINEAR_KINDS},
    "attention": ("query", "position_weight", "value", "bias"),
}
AnyProbe = Probe | AttentionProbe


def save_probe(
    probe: AnyProbe, path: str | os.PathLike[str], *, model: nn.Module | None = None
) -> Path:
    """Write `probe` to `path` (a .safetensors file). With `model`, record that model's identity
    (checked against the probe's d_model). Returns the path. A path that cannot be written (a
    folder, a file where a folder should be, read-only) is a ValueError before anything else;
    the file is written atomically (residtap.artefacts.write_artefact)."""
    if not isinstance(probe, (Probe, AttentionProbe)):
        raise TypeError(f"expected a Probe or AttentionProbe, got {type(probe).__name__}")
    check_out_file(Path(path))
    identity = probe.model
    if model is not None:
        _check_d_model(probe, model)
        identity = model_identity(model)
    if probe.kind == "attention":
        tensors = {
            "query": probe.query,
            "position_weight": probe.position_weight,
            "value": probe.value,
            "bias": probe.bias,
        }
    else:
        tensors = {"weight": probe.weight, "bias": probe.bias}
    meta: dict[str, Any] = {
        "kind": probe.kind,
        "site": probe.site,
        "d_model": probe.d_model,
        "n_outputs": probe.n_outputs,
        "classes": probe.classes,
        "label_column": probe.label_column,
        "threshold": probe.threshold,
        "metrics": probe.metrics,
        "model": identity,
        "metadata": probe.metadata,
    }
    if isinstance(probe, AttentionProbe):
        meta["position"] = probe.position
    fields = {key: _plain(value) for key, value in meta.items()}
    return write_artefact(path, FORMAT, FORMAT_VERSION,
                          {name: t.detach().cpu() for name, t in tensors.items()}, fields)


def load_probe(path: str | os.PathLike[str], model: nn.Module | None = None, *,
               allow_other_weights: bool = False) -> AnyProbe:
    """Read a probe file. With `model`, raise ValueError unless the probe was made for it
    (same config hash, weights fingerprint and d_model); allow_other_weights=True accepts a
    probe made on another checkpoint of the same config (with a warning)."""
    path = Path(path)
    raw_meta, tensors = read_safetensors(path, "probe file")
    meta = _decode(raw_meta, path)
    kind = meta["kind"]
    expected = TENSORS[kind]
    missing = [name for name in expected if name not in tensors]
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{path}: a {kind!r} probe file holds tensors {list(expected)}, but this one has "
            f"{sorted(tensors)} (missing {missing}, unexpected {extra}); the file was damaged "
            "or edited, re-save the probe"
        )
    common = {
        "site": meta["site"],
        "threshold": float(meta["threshold"]),
        "label_column": meta["label_column"],
        "model": meta["model"],
        "metrics": meta["metrics"],
        "metadata": meta["metadata"],
    }
    _check_shapes(path, kind, tensors, meta)
    probe: AnyProbe
    if kind == "attention":
        if meta.get("position") not in ("from_start", "from_end"):
            raise ValueError(f"{path}: unknown attention position {meta.get('position')!r}")
        probe = AttentionProbe(
            query=tensors["query"],
            position_weight=tensors["position_weight"],
            value=tensors["value"],
            bias=tensors["bias"],
            classes=meta["classes"],
            position=meta["position"],
            **common,
        )
    else:
        probe = Probe(
            kind=kind,
            weight=tensors["weight"],
            bias=tensors["bias"],
            classes=meta["classes"],
            **common,
        )
    if model is not None:
        _check_model(probe, model, path, allow_other_weights)
    return probe


def _check_model(probe: AnyProbe, model: nn.Module, path: Path, allow_other_weights: bool,
                 d_model: bool = True) -> None:
    if d_model:
        _check_d_model(probe, model)
    if probe.model is None:
        log.warning("%s records no model identity; only d_model was checked", path)
    else:
        check_same_model(probe.model, model, "probe", allow_other_weights=allow_other_weights)


def load_any_probe(path: str | os.PathLike[str], model: nn.Module | None = None, *,
                   allow_other_weights: bool = False, sae: Any = None,
                   features: Any = None, approximate_topk: bool = False) -> Any:
    """A Probe, an AttentionProbe, or a residtap.sae.features.SAEFeatures (an SAE folder's
    `features` (None: all), or a probe file trained on SAE features, folded onto the SAE given
    as `sae`: an SAE or its folder). Identities are checked against `model` when given."""
    from residtap.sae.features import SAEFeatures
    from residtap.sae.model import SAE
    from residtap.sae.saelens import CFG_FILE, load_sae

    path = Path(path)
    if path.is_dir() and (path / CFG_FILE).is_file():
        loaded = load_sae(path, model=model, allow_other_weights=allow_other_weights)
        return SAEFeatures.select(loaded, features, approximate_topk=approximate_topk)
    probe = load_probe(path)
    info = probe.metadata.get("sae")
    if model is not None:  # a probe on SAE features is as wide as its features, not the site
        _check_model(probe, model, path, allow_other_weights, d_model=not isinstance(info, dict))
    if not isinstance(info, dict):
        if sae is not None or features is not None:
            raise ValueError(f"{path} is a probe on a site's activations, not on SAE "
                             "features; drop sae= / features= (--sae, --features)")
        return probe
    if sae is None:
        raise ValueError(
            f"{path} holds a probe trained on {len(info['features'])} features of an SAE at "
            f"{info['site']!r}; pass that SAE: sae='sae-folder' (CLI: --sae FOLDER)")
    if not isinstance(sae, SAE):
        sae = load_sae(sae, site=info["site"], model=model,
                       allow_other_weights=allow_other_weights)
    if sae.d_sae != info["d_sae"]:
        raise ValueError(f"{path} was trained on features of an SAE with d_sae={info['d_sae']}, "
                         f"but the SAE given has d_sae={sae.d_sae}; pass the SAE its feature "
                         "store was encoded with")
    return SAEFeatures.select(sae, info["features"], probe=probe, site=info["site"],
                              approximate_topk=bool(info.get("approximate_topk")))


def _decode(raw: dict[str, str], path: Path) -> dict[str, Any]:
    """JSON-decode and validate the metadata that every probe file carries."""
    if "format" not in raw:
        raise ValueError(
            f"{path} is a safetensors file but not a residtap probe (no 'format' metadata); "
            "probe files are written by residtap.probes.save_probe"
        )
    meta: dict[str, Any] = {}
    for key, text in raw.items():
        try:
            meta[key] = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: metadata {key!r} is not valid JSON ({err}): {text[:80]!r}"
            ) from err
    if meta["format"] != FORMAT:
        raise ValueError(f"{path}: format is {meta['format']!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has probe format_version {version}, this residtap reads up to "
            f"{FORMAT_VERSION}; upgrade residtap"
        )
    required = {
        "kind": str,
        "d_model": int,
        "n_outputs": int,
        "classes": list,
        "threshold": (int, float),
        "metrics": dict,
        "metadata": dict,
    }
    for key, types in required.items():
        if not isinstance(meta.get(key), types) or isinstance(meta.get(key), bool):
            raise ValueError(
                f"{path}: metadata {key!r} is {meta.get(key)!r}, of the wrong type or missing"
            )
    for key in ("site", "label_column"):
        if not isinstance(meta.setdefault(key, None), (str, type(None))):
            raise ValueError(
                f"{path}: metadata {key!r} must be a string or null, got {meta[key]!r}"
            )
    if not isinstance(meta.setdefault("model", None), (dict, type(None))):
        raise ValueError(f"{path}: metadata 'model' must be an identity object or null")
    if meta["kind"] not in TENSORS:
        raise ValueError(
            f"{path}: unknown probe kind {meta['kind']!r}; this residtap knows {list(TENSORS)}"
        )
    return meta


def _check_shapes(path: Path, kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    d, c, classes = meta["d_model"], meta["n_outputs"], meta["classes"]
    if kind == "attention":
        h = tensors["query"].shape[0] if tensors["query"].ndim == 2 else -1
        expected = {"query": (h, d), "position_weight": (h,), "value": (h, c, d), "bias": (c,)}
    else:
        expected = {"weight": (c, d), "bias": (c,)}
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise ValueError(
                f"{path}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, but the metadata "
                f"(d_model={d}, n_outputs={c}) requires a float tensor of shape {shape}; "
                "the file was damaged or edited"
            )
    check_finite(path, {name: tensors[name] for name in expected}, "probe file")
    binary_outputs = kind in ("logistic", "diff_means") or (kind == "attention" and c == 1)
    if kind == "ridge":
        consistent = classes == []
    elif binary_outputs:
        consistent = c == 1 and len(classes) == 2
    else:
        consistent = c == len(classes) and c > 2 - (kind == "multinomial")
    if not consistent:
        raise ValueError(
            f"{path}: a {kind!r} probe with n_outputs={c} cannot have classes {classes[:10]}; "
            "the file was damaged or edited"
        )


def _check_d_model(probe: AnyProbe, model: nn.Module) -> None:
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    if hidden is not None and int(hidden) != probe.d_model:
        raise ValueError(
            f"probe has d_model={probe.d_model} but the model's hidden_size is {hidden}; "
            "this probe was trained on a different model's activations"
        )


def _plain(value: Any) -> Any:
    """JSON-safe copy: tensors and numpy scalars to Python, NaN/inf to null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return _plain(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.dtype):
        return str(value)
    return value
