"""Subprocess helper for the kill and lock tests: run `extract` slowly so it can be SIGKILLed,
or hold it at a gate while another process tries the same folder.

    python tests/_store_worker.py MODEL_DIR DATA_FILE OUT_DIR SHARD_ROWS SLEEP_S [GATE_FILE]

Each forward of the capture sleeps SLEEP_S; with GATE_FILE, each forward of the capture (once
it holds the folder's lock) also waits while that file exists. It runs on as many threads as
RESIDTAP_WORKER_THREADS says (the test process's count: resume is checked byte for byte, and the
matmuls' reduction order, so the activations' last bits, depends on it).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from residtap.cli.common import load_model
from residtap.store import extract


def main(model_dir: str, data: str, out: str, shard_rows: str, sleep_s: str,
         gate: str | None = None) -> None:
    threads = os.environ.get("RESIDTAP_WORKER_THREADS")
    torch.set_num_threads(int(threads) if threads else min(2, torch.get_num_threads()))
    model, tokenizer = load_model(model_dir)
    delay = float(sleep_s)
    lock = Path(out) / ".residtap.lock"

    def slow(module, args) -> None:
        time.sleep(delay)
        while gate is not None and lock.exists() and Path(gate).exists():
            time.sleep(0.01)

    model.register_forward_pre_hook(slow)
    extract(model, tokenizer, data, ["layers.0", "layers.2"], out, batch_size=2,
            shard_rows=int(shard_rows), progress=False)


if __name__ == "__main__":
    main(*sys.argv[1:7])
