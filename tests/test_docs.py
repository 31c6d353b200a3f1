"""Documentation that is executed: every ```python and ```bash block of README.md runs exactly as
written, in a fresh process whose working directory is an empty temporary folder, offline.

Blocks that need several processes (`torchrun`) or that run the set-up and the whole test suite
(`make ...`) are skipped here with their reason; tests/test_distributed.py runs the torchrun
paths and `make test` is this suite itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md"]
TIMEOUT_S = 1200  # the API tour captures two data sets and trains a tuned lens on 2 CPU cores


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    heading: str  # the nearest heading above
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}:{self.language}"

    def skip_reason(self) -> str | None:
        if "torchrun" in self.code or "residtap.distributed" in self.code:
            return "needs several processes (torchrun): tests/test_distributed.py runs them"
        if "residtap.serving" in self.code:
            from residtap.serving import transformers_cb

            reason = transformers_cb.unsupported_reason()
            if reason is not None:  # the serving tests skip alike; `residtap serve` refuses
                return f"serving needs transformers' continuous batching: {reason}"
        if self.language == "bash" and re.search(r"^\s*make\b", self.code, re.M):
            return ("`make` runs the install script and the whole suite (which holds this "
                    "test); CI runs it")
        return None


def code_blocks(path: Path) -> list[Block]:
    """Every fenced ```python / ```bash block of a Markdown file, in order."""
    blocks, heading, fence = [], "", None
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, start=1):
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            found = re.match(r"^```(\w+)\s*$", line)
            if found:
                fence, start, body = found.group(1), i, []
        elif line.startswith("```"):
            if fence in ("python", "bash", "sh"):
                blocks.append(Block(path, start, "bash" if fence == "sh" else fence, heading,
                                    "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    return blocks


BLOCKS = [b for path in DOCS for b in code_blocks(path)]


def test_the_readme_has_a_python_tour_that_is_run() -> None:
    run = [b for b in BLOCKS if b.skip_reason() is None]
    assert any(b.language == "python" and b.heading == "API tour" for b in run), \
        [(b.id, b.heading, b.skip_reason()) for b in BLOCKS]


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_code_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    reason = block.skip_reason()
    if reason:
        pytest.skip(f"{block.id} ({block.heading}): {reason}")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2",
                        "MPLBACKEND": "Agg"}
    script = tmp_path / ("block.py" if block.language == "python" else "block.sh")
    script.write_text(block.code, encoding="utf-8")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    command = [sys.executable, str(script)] if block.language == "python" else \
        ["bash", "-euo", "pipefail", str(script)]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, (
        f"{block.id} ({block.heading}) failed as written, exit {proc.returncode}:\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
