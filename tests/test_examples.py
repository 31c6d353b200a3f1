"""Every examples/*.py runs top to bottom on the bundled organism, offline, in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))


def test_there_is_an_example_per_capability() -> None:
    names = [p.stem for p in EXAMPLES]
    assert names == ["01_capture", "02_store_and_probes", "03_runtime_probes", "04_logit_lens",
                     "05_steering", "06_cost"], names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path: Path, tmp_path: Path) -> None:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                        "RESIDTAP_EXAMPLES_OUT": str(tmp_path / "out")}
    (tmp_path / "cwd").mkdir()
    proc = subprocess.run([sys.executable, str(path)], env=env, cwd=tmp_path / "cwd",
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip(), f"{path.name} printed nothing"
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written, f"{path.name} wrote nothing under RESIDTAP_EXAMPLES_OUT"
    stray = list((tmp_path / "cwd").iterdir())
    assert not stray, f"{path.name} wrote outside RESIDTAP_EXAMPLES_OUT: {stray}"
