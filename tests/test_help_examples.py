"""Every example in every command's --help runs exactly as written.

The examples are the `examples:` section at the end of each `residtap ... --help`. A section
runs top to bottom, in-process through `residtap.cli.main`, in a fresh empty working folder, so
relative output paths land in a temporary folder and a later line may use an earlier line's
output (e.g. `probe train` reads the store that `capture` wrote). Sections shared by several
parsers (steer make / eval / generate) run once. No example needs torchrun or a GPU (those are
described in prose, and tested in tests/test_distributed.py); only the sections in SKIPPED are
skipped, each with its reason.
"""

from __future__ import annotations

import argparse
import json
import shlex

import pytest

from residtap.cli import build_parser, main
from residtap.cli.common import help_examples
from residtap.organism import MOOD_WORDS


def _sections() -> dict[str, list[str]]:
    """{name of the first parser showing it: example lines}, one entry per distinct section."""
    found: dict[tuple[str, ...], str] = {}

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        lines = tuple(help_examples(parser))
        if lines and lines not in found:
            found[lines] = " ".join(path)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, path + (name,))

    walk(build_parser(), ())
    return {name: list(lines) for lines, name in found.items()}


SECTIONS = _sections()
# Sections that cannot run as written in a test, and why.
SKIPPED = {"serve": "`residtap serve` runs a server until it is stopped; tests/test_serving.py "
                    "starts the same app from the command's parser and queries it"}


def test_every_command_has_examples_in_its_help():
    commands = {a.dest: a for a in build_parser()._actions
                if isinstance(a, argparse._SubParsersAction)}["command"].choices
    shown = {name for name, parser in commands.items() if help_examples(parser)}
    nested = {name for name, parser in commands.items()
              if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)}
    assert shown | nested == set(commands), set(commands) - shown - nested
    for name in nested:  # a group's sub-commands show the group's examples
        assert help_examples(commands[name]), name
    printed = commands["capture"].format_help()
    assert printed.rstrip().endswith(help_examples(commands["capture"])[-1].split()[-1])


@pytest.mark.parametrize("section", [pytest.param(s, marks=pytest.mark.slow) if s == "demo"
                                     else pytest.param(s, marks=pytest.mark.skip(SKIPPED[s]))
                                     if s in SKIPPED else s for s in SECTIONS], ids=list(SECTIONS))
def test_help_examples_run_as_written(section, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for line in SECTIONS[section]:
        argv = shlex.split(line)
        assert argv[0] == "residtap"
        rc = main(argv[1:])
        captured = capsys.readouterr()
        assert rc == 0, f"`{line}` exited {rc}:\n{captured.err[-3000:]}"
        if "--json" in argv:
            json.loads(captured.out)  # JSON only on stdout
        else:
            assert captured.out.strip(), f"`{line}` printed nothing"


def test_steer_generate_example_strength_reads_well(tmp_path, monkeypatch, capsys):
    """The strength the help shows gives readable, steered text on the organism: the sad
    prompt turns positive, and no word repeats over and over (strength 4, the old example,
    printed "loved loved loved ...")."""
    monkeypatch.chdir(tmp_path)
    lines = SECTIONS["steer"]
    make = next(line for line in lines if " make " in line)
    generate = next(line for line in lines if " generate " in line and "--json" not in line)
    assert main(shlex.split(make)[1:]) == 0
    capsys.readouterr()
    assert main(shlex.split(generate)[1:] + ["--json"]) == 0
    generations = json.loads(capsys.readouterr().out)[0]["generations"]
    by_strength = {g["strength"]: g["text"].split() for g in generations}
    shown = float(shlex.split(generate)[shlex.split(generate).index("--strength") + 1])
    steered, plain = by_strength[shown], by_strength[0.0]
    positive, negative = set(MOOD_WORDS["positive"]), set(MOOD_WORDS["negative"])
    assert negative & set(plain) and not positive & set(plain), plain
    assert positive & set(steered) and not negative & set(steered), steered
    longest_run = max(sum(1 for _ in group) for group in _runs(steered))
    assert longest_run <= 2, steered
    assert max(steered.count(w) for w in set(steered)) <= len(steered) // 3, steered


def _runs(words: list[str]):
    from itertools import groupby

    return (list(g) for _, g in groupby(words))
