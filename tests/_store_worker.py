"""Subprocess helper for test_store's kill test: run `extract` slowly so it can be SIGKILLed.

    python tests/_store_worker.py MODEL_DIR DATA_FILE OUT_DIR SHARD_ROWS SLEEP_S
"""

from __future__ import annotations

import sys
import time

import torch

from residtap.cli.common import load_model
from residtap.store import extract


def main(model_dir: str, data: str, out: str, shard_rows: str, sleep_s: str) -> None:
    # As many threads as conftest gives the test process: the matmuls' reduction order (and so
    # the activations' last bits) depends on it, and resume is checked byte for byte.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tokenizer = load_model(model_dir)
    delay = float(sleep_s)
    model.register_forward_pre_hook(lambda module, args: time.sleep(delay))  # slow each forward
    extract(model, tokenizer, data, ["layers.0", "layers.2"], out, batch_size=2,
            shard_rows=int(shard_rows), progress=False)


if __name__ == "__main__":
    main(*sys.argv[1:6])
