"""Run under `torchrun --nproc-per-node 2 tests/_dist_worker.py MODE MODEL_DIR OUT` by
tests/test_distributed.py. Modes:
  tp       tensor-parallel model: capture (canonical + a column-parallel raw path) and a store
           written by rank 0; saves rank-R.pt with what it saw
  dp       data-parallel extraction into OUT/store (KILL_AFTER=n: rank 1 SIGKILLs itself after
           n forwards, to test resume)
  fail     rank 1 raises mid-run while rank 0 waits at a barrier
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

import residtap
import residtap.distributed as rd

IDS = [[5, 9, 13, 22, 40, 7], [8, 31, 4], [11, 12, 60, 4, 3], [7, 7, 8], [50, 51, 52, 53],
       [9, 10], [33, 34, 35, 36, 37, 38], [21, 22, 23]]
CAPTURE_SITES = ["embed", "layers.0", "layers.1.attn", "layers.2.mlp", "layers.1.ln2", "norm",
                 "logits", "model.layers.0.self_attn.q_proj"]


def main(mode: str, model_dir: str, out: str) -> None:
    rank, world = rd.init(timeout_s=60)
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    if mode == "tp":
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, distributed_config=DistributedConfig(tp_plan="auto")).eval()
        ids = torch.tensor([[5, 9, 13, 22, 40, 7], [8, 31, 4, 3, 2, 1]])
        with torch.no_grad(), residtap.capture(model, CAPTURE_SITES) as acts:
            model(input_ids=ids)
        seen = {site: acts[site] for site in CAPTURE_SITES}
        local_q = model.model.layers[0].self_attn.q_proj.weight.to_local().shape
        residtap.extract(model, None, IDS, ["layers.0", "layers.2"], f"{out}/tp-store",
                         positions="all", batch_size=3, shard_rows=10, progress=False,
                         distributed="tensor")
        torch.save({"acts": seen, "local_q": tuple(local_q), "world": world},
                   f"{out}/rank-{rank}.pt")
    elif mode == "dp":
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        kill_after = int(os.environ.get("KILL_AFTER", "0"))
        if kill_after and rank == 1:
            calls = []

            part = Path(out) / "dp-store" / f"part-00001-of-{world:05d}" / "manifest.json"

            def die(module, args):  # once a shard is recorded as complete, die mid-run
                calls.append(1)
                if len(calls) > kill_after:
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline and not json.loads(
                            part.read_text())["shards"]:
                        time.sleep(0.05)
                    os.kill(os.getpid(), signal.SIGKILL)

            model.register_forward_pre_hook(die)
        residtap.extract(model, None, IDS, ["layers.0", "layers.2"], f"{out}/dp-store",
                         positions="all", batch_size=1, shard_rows=4, progress=False,
                         distributed="data")
    elif mode == "fail":
        if rank == 1:
            raise RuntimeError("rank 1 failed on purpose")
        rd.barrier(timeout_s=20)
    rd.barrier(timeout_s=60)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
