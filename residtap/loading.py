"""Loading a local model for residtap: the device, the dtype, and the class its config names.

    from residtap.loading import load_local
    model, tok = load_local("./my-model")                          # CPU, float32
    model, tok = load_local("./my-model", device="auto")           # cuda, else mps, else cpu
    model, tok = load_local("./gpt2", device="cuda:1", dtype="float16")
    model, tok = load_local("./big", device_map="auto")            # accelerate spreads it

dtype defaults per device: float32 on the CPU, bfloat16 on CUDA where the GPU supports it (else
float16), float16 on MPS; "auto" keeps the checkpoint's own dtype. The class is the one the
config's `architectures` names (GPT2LMHeadModel, LlamaForCausalLM, BertForMaskedLM, ...), so a
language model keeps its head. Nothing is downloaded, and the folder's own code runs only with
`trust_remote_code=True`. `residtap.organism.load` uses the same device and dtype rules.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "double": torch.float64,
}  # fmt: skip
DEVICE_FORMS = "cpu, cuda, cuda:N, mps or auto"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json",
                   "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch.device from "cpu", "cuda", "cuda:N", "mps" or "auto" (cuda > mps > cpu).

    None means "cpu". ValueError, in one line, for a device this machine does not have."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"expected a device ({DEVICE_FORMS}), got {device!r}; fix: pass one of those, e.g. "
            "cuda:0 (CLI: --device cuda:0)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(
                f"expected a CUDA GPU for device {str(dev)!r}, but torch {torch.__version__} "
                f"({build}) sees none; fix: use device cpu or auto (CLI: --device cpu), or "
                "install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"expected a CUDA device index below {count} (this machine has {count} GPU(s)), "
                f"got {str(dev)!r}; fix: use cuda:0 ... cuda:{count - 1}"
            )
    elif dev.type == "mps":
        if not _mps_available():
            raise ValueError(
                "expected an Apple GPU for device 'mps', but torch.backends.mps is not "
                "available here; fix: use device cpu or auto (CLI: --device cpu)"
            )
    elif dev.type != "cpu":
        raise ValueError(f"expected a device ({DEVICE_FORMS}), got {str(dev)!r}")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | str:
    """The dtype to load weights in: a floating torch.dtype, or "auto" (the checkpoint's own).

    None picks the device's default: float32 on cpu, bfloat16 on CUDA where supported (else
    float16), float16 on mps. Names: float32/fp32, bfloat16/bf16, float16/fp16/half, float64."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(
                f"expected a floating dtype for the model's weights, got {dtype}; fix: use one "
                f"of {', '.join(sorted(set(DTYPES)))}"
            )
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(
        f"expected a model dtype ({', '.join(DTYPES)} or auto), got {dtype!r}; fix: use one "
        "of those names, e.g. bfloat16 (CLI: --model-dtype bfloat16)"
    )


def check_model_folder(path: Path, *, tokenizer: bool = True) -> None:
    """FileNotFoundError naming what a local model folder lacks: config.json, weights, a
    tokenizer. Checked before anything is loaded."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"expected a local model folder, got {str(path)!r}, which is not a folder; pass the "
            "path of a folder with config.json and weights (residtap never downloads)"
        )
    held = sorted(p.name for p in path.iterdir())
    listing = ", ".join(held[:8]) + (", ..." if len(held) > 8 else "") or "nothing"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"expected config.json in the model folder {str(path)!r}, found {listing}; is it a "
            "Hugging Face model folder (model.save_pretrained(folder))?"
        )
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise FileNotFoundError(
            f"expected weights (model.safetensors, pytorch_model.bin or a sharded index) in "
            f"{str(path)!r}, found only {listing}; fix: copy the checkpoint's weight files "
            "into the folder (model.save_pretrained(folder) writes them)"
        )
    if tokenizer and not (any((path / n).is_file() for n in TOKENIZER_FILES)
                          or any(path.glob("*.tiktoken"))):
        raise FileNotFoundError(
            f"expected a tokenizer in {str(path)!r} ({', '.join(TOKENIZER_FILES[:4])}), found "
            f"only {listing}; fix: save the tokenizer into the folder "
            "(tokenizer.save_pretrained(folder))"
        )


def model_class(config: Any, trust_remote_code: bool = False) -> Any:
    """The transformers class that loads the model the config describes, head included.

    A causal LM named in `architectures` (GPT2LMHeadModel, LlamaForCausalLM, ...) loads through
    AutoModelForCausalLM; another class transformers ships (BertForMaskedLM) loads as itself;
    anything else (no architectures, custom code) through AutoModel."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update(value if isinstance(value, (list, tuple)) else [value])
    archs = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    for arch in archs:
        if arch in causal:
            return transformers.AutoModelForCausalLM
        if trust_remote_code and "AutoModelForCausalLM" in auto_map:
            return transformers.AutoModelForCausalLM
        named = getattr(transformers, arch, None)
        if isinstance(named, type) and issubclass(named, transformers.PreTrainedModel):
            return named
    if archs:
        log.info("config names %s, which transformers does not ship; loading with AutoModel",
                 archs)
    return transformers.AutoModel


def load_local(
    path: str | os.PathLike[str], *, device: str | torch.device | None = None,
    device_map: str | None = None, dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False, tokenizer: bool = True, **from_pretrained: Any,
) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer or None) from a local folder; see the module docstring.

    device_map="auto" spreads the model over the GPUs (and CPU) with accelerate; it cannot be
    combined with `device`. Extra keyword arguments go to `from_pretrained`."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    check_model_folder(path, tokenizer=tokenizer)
    target = check_placement(device, device_map)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, target), "local_files_only": True,
                              "trust_remote_code": trust_remote_code, **from_pretrained}
    if device_map is not None:
        kwargs["device_map"] = device_map
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                        local_files_only=True)
    model = model_class(config, trust_remote_code).from_pretrained(path, **kwargs)
    if device_map is None and "distributed_config" not in from_pretrained:
        model = model.to(target)
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                local_files_only=True)
        except (OSError, ValueError, ImportError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"expected a tokenizer transformers can load from {str(path)!r}, but loading "
                f"it failed: {first}; fix: save a working tokenizer into the folder "
                "(tokenizer.save_pretrained(folder))"
            ) from err
    return model.eval(), tok


def check_placement(device: str | torch.device | None, device_map: str | None) -> torch.device:
    """The device weights go to (for device_map="auto": where the first layers land)."""
    if device_map is None:
        return resolve_device(device)
    if device_map != "auto":
        raise ValueError(f"expected device_map 'auto', got {device_map!r}")
    if device is not None:
        raise ValueError(
            f"got both device {str(device)!r} and device_map 'auto'; pass one: a device puts "
            "the whole model there, device_map auto spreads it over the GPUs"
        )
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ImportError(
            "device_map 'auto' needs the accelerate package, which is not installed; fix: "
            "pip install 'residtap[distributed]' (or pip install accelerate)"
        ) from None
    return resolve_device("auto")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
