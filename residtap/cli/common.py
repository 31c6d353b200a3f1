"""What every CLI command shares: one definition per option, model loading, bundled data names,
quiet output, JSON and tables.

Conventions (the same in every command that takes the option):
    lists         comma-separated, repeated, or both: `--sites a,b --sites c` is [a, b, c]
                  (free texts such as --prompt are repeated only: commas stay in the text)
    --sites       site names; `all` or `all-layers`: every decoder layer (layers.0 ... N-1)
    --positions   all | last | prompt | generated | token indices (0,-1); see POSITION_WORDS
    --out         the help says whether it is a FOLDER or a FILE
    --data ...    a file path, or `organism:NAME` for a data set bundled with the organism
    --device auto|cpu|cuda|cuda:N|mps, --device-map auto, --model-dtype NAME,
    --trust-remote-code, --no-progress, --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from residtap.positions import WORDS

MODEL_HELP = "a local Hugging Face model folder, or 'organism' for the bundled model"
ORGANISM_PREFIX = "organism:"
ALL_LAYERS = ("all", "all-layers")
SITES_HELP = ("site names, comma-separated or repeated (layers.0,layers.3); 'all' or "
              "'all-layers': every decoder layer, layers.0 ... layers.N-1")
POSITION_WORDS: dict[str, str] = WORDS  # residtap.positions: one meaning per word
INDEX_HELP = ("token indices, comma-separated or repeated (0,-1): counted from each text's "
              "first real token, negative from its last")


# -- help -------------------------------------------------------------------------------------
EXAMPLES_HEADER = "examples:"


def command_help(doc: str | None) -> dict[str, Any]:
    """Parser keywords from a command module's docstring: the text before `examples:` is the
    description, the `examples:` section (one runnable command per indented line; tests run
    every one) is the epilog, printed after the options."""
    doc = doc or ""
    head, sep, examples = doc.partition("\n" + EXAMPLES_HEADER)
    return {"description": head.strip(),
            "epilog": (EXAMPLES_HEADER + examples.rstrip()) if sep else None,
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def help_examples(parser: argparse.ArgumentParser) -> list[str]:
    """The command lines in a parser's `examples:` section, as printed by --help (a line that
    ends in a backslash continues on the next, as in a shell)."""
    epilog = parser.epilog or ""
    if not epilog.startswith(EXAMPLES_HEADER):
        return []
    joined = epilog.removeprefix(EXAMPLES_HEADER).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("residtap ")]


# -- lists ------------------------------------------------------------------------------------
def split_list(values: Iterable[str]) -> list[str]:
    """Every comma-separated part of every value, in order; empty parts dropped."""
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


class ListAction(argparse.Action):
    """Collects a list option given comma-separated, repeated, or both; converts each item."""

    def __init__(self, option_strings, dest, item_type: Callable[[str], Any] = str,
                 split: bool = True, **kwargs) -> None:
        self.item_type, self.split = item_type, split
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        raw = values if isinstance(values, list) else [values]
        parts = split_list(raw) if self.split else [str(v) for v in raw]
        items = []
        for part in parts:
            try:
                items.append(self.item_type(part))
            except (TypeError, ValueError):
                name = getattr(self.item_type, "__name__", "value")
                raise argparse.ArgumentError(
                    self, f"expected {name} values, got {part!r}") from None
        if not items:
            raise argparse.ArgumentError(self, "expected at least one value, got none")
        previous = getattr(namespace, self.dest, None)
        # the first use replaces the default; later uses add to it
        seen = getattr(namespace, f"_{self.dest}_given", False)
        setattr(namespace, self.dest, (list(previous or []) if seen else []) + items)
        setattr(namespace, f"_{self.dest}_given", True)


def add_list(p: argparse.ArgumentParser, flag: str, *, help: str, item_type=str,
             split: bool = True, nargs: str | None = None, **kwargs) -> None:
    """A list option: `--flag a,b`, `--flag a --flag b` (and with nargs='+', `--flag a b`)."""
    how = "comma-separated or repeated" if split else "repeatable"
    p.add_argument(flag, action=ListAction, item_type=item_type, split=split, nargs=nargs,
                   help=f"{help} ({how})" if "comma-separated" not in help else help, **kwargs)


def add_sites(p: argparse.ArgumentParser, flag: str = "--sites", *, required: bool = False,
              default_help: str = "") -> None:
    add_list(p, flag, required=required, metavar="SITES",
             help=SITES_HELP + (f" (default: {default_help})" if default_help else ""))


def expand_all_layers(names: list[str] | None, layer_names: list[str]) -> list[str] | None:
    """`all` / `all-layers` replaced by `layer_names` (in place, without repeats)."""
    if names is None:
        return None
    out: list[str] = []
    for name in names:
        for item in (layer_names if name in ALL_LAYERS else [name]):
            if item not in out:
                out.append(item)
    return out


def layer_sites_of(sites: Iterable[str]) -> list[str]:
    """The `layers.{i}` names among `sites`, by i (e.g. the block outputs a store holds)."""
    found = [s for s in sites if s.startswith("layers.") and s.removeprefix("layers.").isdigit()]
    return sorted(found, key=lambda s: int(s.removeprefix("layers.")))


# -- positions --------------------------------------------------------------------------------
def add_positions(p: argparse.ArgumentParser, *, words: tuple[str, ...], indices: bool,
                  default: str, note: str = "", index_help: str = INDEX_HELP) -> None:
    """`--positions` with the words this command accepts, each with its one shared meaning."""
    forms = [f"'{w}': {POSITION_WORDS[w]}" for w in words]
    if indices:
        forms.append(index_help)
    add_list(p, "--positions", default=default.split(","), metavar="POSITIONS",
             help="which tokens: " + "; ".join(forms) + f" (default {default})"
                  + (f"; {note}" if note else ""))


def parse_positions(values: list[str] | str, *, words: tuple[str, ...], indices: bool,
                    single: bool = False) -> str | list[int] | int:
    """A word from `words`, or a list of ints (one int when `single`). ValueError otherwise."""
    values = split_list([values] if isinstance(values, str) else values)
    allowed = " or ".join([", ".join(repr(w) for w in words)]
                          + (["token indices such as 0,-1" if not single else "an index"]
                             if indices else []))
    if len(values) == 1 and values[0] in words:
        return values[0]
    if indices and values and not (single and len(values) > 1):
        try:
            ints = [int(v) for v in values]
            return ints[0] if single else ints
        except ValueError:
            pass
    raise ValueError(f"expected --positions {allowed}, got {','.join(values)!r}; fix: pass one "
                     "of those (see --help)")


# -- outputs and flags ------------------------------------------------------------------------
def add_out(p: argparse.ArgumentParser, kind: Literal["folder", "file"], what: str, *,
            flag: str = "--out", required: bool = True, default: str | None = None) -> None:
    """`--out FOLDER` or `--out FILE`, said the same way in every command."""
    tail = f" (default {default})" if default else "" if required else " (default: none)"
    p.add_argument(flag, required=required, default=default,
                   metavar="DIR" if kind == "folder" else "FILE",
                   help=f"{kind} to write: {what}{tail}")


def check_out(path: str | os.PathLike[str] | None, kind: Literal["folder", "file"],
              flag: str = "--out") -> None:
    """ValueError, before any expensive work, for an output path that cannot be written."""
    if path is None:
        return
    path = Path(path)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ValueError(f"expected {flag} to be a folder, got the existing file {str(path)!r}; "
                         "fix: pass a new folder path")
    if kind == "file" and path.is_dir():
        raise ValueError(f"expected {flag} to be a file, got the existing folder {str(path)!r}; "
                         "fix: pass a file path inside it")
    parent = path if kind == "folder" and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"expected {flag} in a writable place, got {str(path)!r} ({parent} is "
                         "not writable); fix: pass a path you can write to")


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print machine-readable JSON only (no progress bars)")


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (--json implies it)")


def progress(args: argparse.Namespace) -> bool:
    """Whether to show residtap's progress bars: not with --json or --no-progress."""
    return not getattr(args, "json", False) and not getattr(args, "no_progress", False)


def add_model_flags(p: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """--device, --device-map, --model-dtype and --trust-remote-code for a command that loads."""
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where to run the model: auto (cuda, else mps, else cpu), cpu, cuda, "
                        "cuda:N or mps (default cpu, as in Python)")
    p.add_argument("--device-map", choices=["auto"], default=None,
                   help="'auto': spread the model over the GPUs with accelerate (instead of "
                        "--device)")
    if dtype:
        p.add_argument("--model-dtype", default=None, metavar="DTYPE",
                       help="dtype to load the weights in: float32, bfloat16, float16 or auto "
                            "(the checkpoint's); default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder's own code to run (off by default)")


def add_allow_other_weights(p: argparse.ArgumentParser) -> None:
    """For a command that loads a saved artefact (probe, vector, tuned lens) onto a model."""
    p.add_argument("--allow-other-weights", action="store_true",
                   help="use a file made on another checkpoint of this model's config "
                        "(its weights fingerprint differs)")


# -- bundled data -----------------------------------------------------------------------------
def data_path(value: str | os.PathLike[str]) -> Path:
    """A data file: `organism:NAME` -> the bundled residtap/organism/data/NAME.jsonl; any other
    value is a path, which must exist. ValueError (one line) lists the bundled names."""
    from residtap.organism import DATA_DIR, DATASETS

    text = str(value)
    names = ", ".join(ORGANISM_PREFIX + n for n in DATASETS)
    if text.startswith(ORGANISM_PREFIX):
        name = text.removeprefix(ORGANISM_PREFIX).removesuffix(".jsonl")
        if name not in DATASETS:
            raise ValueError(f"expected a bundled data set ({names}), got {text!r}; fix: pass "
                             "one of those names or a file path")
        return DATA_DIR / f"{name}.jsonl"
    path = Path(text)
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(f"expected a data file, got {text!r}, which {why}; fix: pass a .jsonl, "
                         f".json, .csv or .txt file, or a bundled set ({names})")
    return path


def _data_type(value: str) -> Path:
    try:
        return data_path(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_data(p: argparse.ArgumentParser, flag: str = "--data", *, help: str,
             required: bool = True) -> None:
    """A data-file option that also takes `organism:NAME`."""
    p.add_argument(flag, type=_data_type, required=required, metavar="FILE",
                   help=f"{help}; or organism:NAME for a bundled set (organism:mood, ...)")


# -- models -----------------------------------------------------------------------------------
def load_model(name: str, *, trust_remote_code: bool = False, dtype: str | None = None,
               device: str | None = None, device_map: str | None = None,
               tensor_parallel: bool = False, tokenizer: bool = True):
    """(model, tokenizer) from a local folder, or the bundled organism for 'organism'.

    Nothing is fetched from a hub: a name that is not a local folder is an error. The class
    is the one the config names (residtap.loading.model_class); device and dtype follow
    residtap.loading: no device means the CPU, as in Python, so results do not change with the
    machine; pass device="auto" for cuda, else mps, else cpu. tensor_parallel: shard the model
    over the torch.distributed ranks with Hugging Face's tensor parallelism
    (`DistributedConfig(tp_plan="auto")`; needs accelerate).
    """
    from residtap import organism
    from residtap.loading import load_local, resolve_device, resolve_dtype

    path = organism.MODEL_DIR if name == "organism" else Path(name)
    extra: dict[str, Any] = {}
    if tensor_parallel:
        if device is not None or device_map is not None:
            raise ValueError("--distributed tensor places each rank's shard itself; drop "
                             "--device / --device-map")
        from residtap.distributed import tensor_parallel_kwargs

        extra.update(tensor_parallel_kwargs())
        dtype = resolve_dtype(dtype, resolve_device(None))
    elif name == "organism" and device_map is None:
        return organism.load(dtype, device=device)
    return load_local(path, device=device, device_map=device_map, dtype=dtype,
                      trust_remote_code=trust_remote_code, tokenizer=tokenizer, **extra)


def load_model_from_args(args: argparse.Namespace, name: str | None = None, **kwargs):
    """load_model with the command's --device, --device-map, --model-dtype and
    --trust-remote-code."""
    return load_model(name if name is not None else args.model,
                      trust_remote_code=getattr(args, "trust_remote_code", False),
                      dtype=getattr(args, "model_dtype", None),
                      device=getattr(args, "device", None),
                      device_map=getattr(args, "device_map", None), **kwargs)


# -- output -----------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_libraries(verbose: bool) -> Iterator[None]:
    """Silence transformers' and huggingface_hub's own progress bars, warnings and advice (the
    "Loading weights" bar) and other libraries' Python warnings for the command's duration; with
    -v, show them. residtap's own bars follow --no-progress / --json. Restored afterwards."""
    import transformers.utils.logging as tf_logging

    try:
        import huggingface_hub.utils as hub
    except ImportError:  # pragma: no cover - transformers depends on it
        hub = None
    level, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    hub_bars = hub.are_progress_bars_disabled() if hub is not None else None
    with warnings.catch_warnings():
        if verbose:
            tf_logging.set_verbosity_info()
            tf_logging.enable_progress_bar()
            if hub is not None:
                hub.enable_progress_bars()
        else:
            tf_logging.set_verbosity_error()
            tf_logging.disable_progress_bar()
            if hub is not None:
                hub.disable_progress_bars()
            for module in ("transformers", "huggingface_hub", "accelerate", "torch"):
                warnings.filterwarnings("ignore", module=module)
        try:
            yield
        finally:
            tf_logging.set_verbosity(level)
            (tf_logging.enable_progress_bar if bars else tf_logging.disable_progress_bar)()
            if hub is not None:
                (hub.disable_progress_bars if hub_bars else hub.enable_progress_bars)()


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
