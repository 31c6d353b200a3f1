"""Model configs by name: public models' configs shipped with residtap, local files, the organism.

    from residtap.presets import config_dict, load_preset
    config = load_preset("Llama-3.1-8B")          # the model's config.json as a dict
    config, name = config_dict("path/to/model")   # a folder, a config.json, a preset, 'organism'

Each JSON file here holds the architecture values of the model's public `config.json` on the
Hugging Face Hub (repository in `PRESETS`). They were written from memory and cross-checked
against public copies of those configs; only keys that shape the network matter to residtap.
"""

from __future__ import annotations

import difflib
import json
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

ORGANISM_CONFIG = Path(__file__).parent.parent / "organism" / "model" / "config.json"


class Preset(NamedTuple):
    file: str  # JSON file in this package
    hub_id: str  # where the original config.json lives


# name -> preset. Names are matched case-insensitively; the hub id is accepted too.
PRESETS: dict[str, Preset] = {
    "Llama-3.1-8B": Preset("llama-3.1-8b.json", "meta-llama/Llama-3.1-8B"),
    "Llama-3.1-70B": Preset("llama-3.1-70b.json", "meta-llama/Llama-3.1-70B"),
    "Qwen3-4B": Preset("qwen3-4b.json", "Qwen/Qwen3-4B"),
    "Qwen3-14B": Preset("qwen3-14b.json", "Qwen/Qwen3-14B"),
    "Qwen3-32B": Preset("qwen3-32b.json", "Qwen/Qwen3-32B"),
    "Gemma-2-2B": Preset("gemma-2-2b.json", "google/gemma-2-2b"),
    "GPT-2": Preset("gpt2.json", "openai-community/gpt2"),
}


def _aliases() -> dict[str, str]:
    """lower-case alias -> preset name: the name, the hub id, and the hub id's last part."""
    out: dict[str, str] = {}
    for name, preset in PRESETS.items():
        for alias in (name, preset.hub_id, preset.hub_id.split("/")[-1]):
            out[alias.lower()] = name
    return out


def find_preset(name: str) -> str | None:
    """The preset's canonical name for `name` (any case, or its hub id), or None."""
    return _aliases().get(name.strip().lower())


def close_matches(name: str, n: int = 3) -> list[str]:
    """Preset names that look like `name`, best first."""
    aliases = _aliases()
    hits = difflib.get_close_matches(name.strip().lower(), list(aliases), n=2 * n, cutoff=0.5)
    return list(dict.fromkeys(aliases[h] for h in hits))[:n]


def load_preset(name: str) -> dict[str, Any]:
    """The preset's config as a dict. Raises LookupError naming close matches."""
    canonical = find_preset(name)
    if canonical is None:
        near = close_matches(name)
        hint = f"did you mean {', '.join(repr(m) for m in near)}? " if near else ""
        raise LookupError(
            f"unknown preset {name!r}; {hint}available presets: {', '.join(PRESETS)}; "
            "or pass a local config.json or model folder"
        )
    text = resources.files(__name__).joinpath(PRESETS[canonical].file).read_text("utf-8")
    return json.loads(text)


def config_dict(source: str | Path) -> tuple[dict[str, Any], str]:
    """(config dict, display name) for 'organism', a model folder, a config.json or a preset.

    Nothing is downloaded: a name that is neither a local path nor a preset is an error.
    """
    text = str(source)
    if text == "organism":
        if not ORGANISM_CONFIG.is_file():
            raise FileNotFoundError(
                f"expected the bundled organism's config at {ORGANISM_CONFIG}, but it is not "
                f"there (the organism is not built in this checkout); pass a preset "
                f"({', '.join(PRESETS)}) or a local config.json instead"
            )
        return _read_json(ORGANISM_CONFIG), "organism"
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"expected a model folder with config.json, got {path}, which has none; "
                "pass the folder of a Hugging Face checkpoint or its config.json"
            )
        return _read_json(path / "config.json"), path.name
    if path.is_file():
        return _read_json(path), path.stem
    name = find_preset(text)
    if name is None and (text.endswith(".json") or text.startswith((".", "/", "~"))):
        raise FileNotFoundError(
            f"expected a config.json or model folder, got {text!r}, which does not exist; "
            "check the path (residtap never downloads)"
        )
    return load_preset(text), name or text  # an unknown name raises LookupError


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"expected a JSON config in {path}, but it does not parse: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object in {path}, got {type(data).__name__}")
    return data
