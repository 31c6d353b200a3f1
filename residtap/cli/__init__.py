"""The `residtap` command line. `main(argv=None)` so tests call it in-process.

Each sub-command lives in its own module in this package and exposes `register(subparsers)`,
which adds its parser and sets `func(args) -> int`. Options shared by several commands are
defined once in `residtap.cli.common`.

Errors: every error is one line on stderr (`residtap COMMAND: error: ...`: what was expected,
what came, how to fix it) and exit code 2; `-v` adds the traceback. Ctrl-C exits 130. An
exception of a kind residtap does not raise on purpose is reported the same way, as an
internal error, with exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import traceback

# Sub-command modules, in the order `residtap --help` lists them.
COMMANDS = ("sites", "capture", "cost", "lens", "steer", "bench", "probe", "compare", "demo",
            "serve")
# What residtap and the libraries it calls raise for bad input or an unusable environment.
USER_ERRORS = (ValueError, TypeError, LookupError, OSError, RuntimeError, ImportError)


class Parser(argparse.ArgumentParser):
    """argparse, with one-line errors (`residtap capture: error: ...; see ... --help`) and
    comma-separated negative numbers read as values (`--strength -1,1`, `--positions -2,-1`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        number = r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
        self._negative_number_matcher = re.compile(rf"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
                                                   rf"(,{number})*$")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see `{self.prog} --help`\n")


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _version() -> str:
    import torch
    import transformers

    from residtap.version import __version__

    return (f"residtap {__version__} (torch {torch.__version__}, transformers "
            f"{transformers.__version__}, Python {sys.version.split()[0]})")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="residtap",
        description="Capture, probe, lens and steer activations inside the forward pass.",
        epilog="run `residtap COMMAND --help` for a command's options and examples",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level, show library progress bars and warnings, and "
                             "print tracebacks")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"residtap.cli.{name}").register(sub)
    _verbose_everywhere(parser)
    return parser


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """`-v` also after the command name (`residtap capture ... -v`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if not any("-v" in a.option_strings for a in child._actions):
                    child.add_argument("-v", "--verbose", action="store_true",
                                       default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                _verbose_everywhere(child)


def main(argv: list[str] | None = None) -> int:
    from residtap.cli.common import quiet_libraries

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error (already printed)
        return int(stop.code or 0) if not isinstance(stop.code, str) else 2
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    logging.getLogger("residtap").setLevel(logging.INFO if verbose else logging.WARNING)
    name = " ".join(["residtap", args.command] + [
        getattr(args, f"{args.command.replace('-', '_')}_command", None) or ""]).strip()
    try:
        with quiet_libraries(verbose):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = "; re-run the same command to resume" if args.command == "capture" else ""
        print(f"{name}: interrupted (Ctrl-C){hint}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        _report(name, err, verbose)
        return 2
    except Exception as err:  # a bug: still one line, with how to get the traceback
        _report(name, err, verbose, internal=True)
        return 1


def _report(name: str, err: BaseException, verbose: bool, internal: bool = False) -> None:
    if verbose:
        traceback.print_exception(err, file=sys.stderr)
    text = one_line(err) or type(err).__name__
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1] if text[-1:] == text[:1] else text  # KeyError quotes its message
    if internal:
        text = (f"internal error ({type(err).__name__}): {text}; "
                + ("this is a residtap bug, please report it with the traceback above"
                   if verbose else "re-run with -v for the traceback and report it"))
    print(f"{name}: error: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
