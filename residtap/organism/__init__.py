"""The bundled model organism: a small trained Llama with planted, known latent variables.

    from residtap import organism
    model, tok = organism.load()                   # offline, eval mode, CPU, float32
    model, tok = organism.load(device="auto")      # cuda (bfloat16), else mps, else cpu
    rows = organism.read_jsonl("mood")             # [{"id", "text", "label", "split", ...}, ...]
    organism.MOOD_WORDS["positive"]                # words that only positive texts use

See residtap/organism/README.md (the model card) for the language, the data schemas and the
measured probe accuracies.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from residtap import inputs
from residtap.organism.language import MOOD_WORDS, MOODS, TOPICS, Language

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = ["DATA_DIR", "MODEL_DIR", "MOOD_WORDS", "MOODS", "TOPICS", "Language", "load",
           "read_jsonl", "DATASETS"]  # fmt: skip

MODEL_DIR: Path = Path(__file__).parent / "model"
DATA_DIR: Path = Path(__file__).parent / "data"
DATASETS: tuple[str, ...] = ("mood", "topic", "truth", "early_exit", "mood_pairs", "mood_ab")


def load(
    dtype: torch.dtype | str | None = None, path: str | Path | None = None, *,
    device: str | torch.device | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load the shipped checkpoint (or the one at `path`) offline, in eval mode.

    device: "cpu" (default), "cuda", "cuda:N", "mps" or "auto" (cuda, else mps, else cpu).
    dtype: a floating torch.dtype or its name ("bfloat16", "fp16", ...); default float32 on
    the CPU, bfloat16 on CUDA where supported, float16 on mps; "auto": the checkpoint's own.
    A bad name or a device this machine lacks is a ValueError (see residtap.loading).
    """
    from residtap.loading import load_local

    path = Path(path) if path is not None else MODEL_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"expected a checkpoint with config.json in {path}, received a folder without one; "
            "fix: train it with `python -m residtap.organism.train --out "
            f"{path}` or reinstall residtap"
        )
    model, tok = load_local(path, device=device, dtype=dtype)
    return model, tok


def read_jsonl(name: str) -> list[dict]:
    """The rows of a shipped data set, e.g. `read_jsonl("mood")` reads data/mood.jsonl."""
    stem = name.removesuffix(".jsonl")
    path = DATA_DIR / f"{stem}.jsonl"
    if not path.is_file():
        raise LookupError(
            f"unknown organism data set {name!r}; expected one of {list(DATASETS)}; "
            "fix: pass one of those names"
        )
    return inputs.read_jsonl(path)
