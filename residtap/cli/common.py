"""Helpers shared by the CLI commands: model loading, JSON output, tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MODEL_HELP = "a local Hugging Face model folder, or 'organism' for the bundled model"


def add_json_flag(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def load_model(name: str, *, trust_remote_code: bool = False, dtype: str | None = None,
               tensor_parallel: bool = False):
    """(model, tokenizer) from a local folder, or the bundled organism for 'organism'.

    Nothing is fetched from a hub: a name that is not a local folder is an error.
    tensor_parallel: shard the model over the torch.distributed ranks with Hugging Face's
    tensor parallelism (`DistributedConfig(tp_plan="auto")`; needs `accelerate`).
    """
    if name == "organism":
        from residtap import organism

        if not tensor_parallel:
            return organism.load()
        name = str(organism.MODEL_DIR)
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(
            f"expected a local model folder or 'organism', got {name!r}, which is not a folder; "
            "pass the path of a folder with config.json and weights (residtap never downloads)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model folder?")
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    if tensor_parallel:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    is_decoder = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    loader = AutoModelForCausalLM if is_decoder else AutoModel
    model = loader.from_pretrained(path, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
