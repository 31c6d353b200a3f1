"""Run under `torchrun --nproc-per-node 2 tests/_dist_worker.py MODE MODEL_DIR OUT` by
tests/test_distributed.py. Modes:
  tp       tensor-parallel model: capture (canonical + a column-parallel raw path), a store
           written by rank 0, the logit lens (HF's vocabulary-sharded lm_head, and an unevenly
           sharded soft-capped readout), a probe bank and steering during generate; saves
           rank-R.pt with what it saw. The test runs the same functions in one process.
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
from torch import nn

import residtap
import residtap.distributed as rd
from residtap.lens import Readout
from residtap.lens.decode import decode

IDS = [[5, 9, 13, 22, 40, 7], [8, 31, 4], [11, 12, 60, 4, 3], [7, 7, 8], [50, 51, 52, 53],
       [9, 10], [33, 34, 35, 36, 37, 38], [21, 22, 23]]
CAPTURE_SITES = ["embed", "layers.0", "layers.1.attn", "layers.2.mlp", "layers.1.ln2", "norm",
                 "logits", "model.layers.0.self_attn.q_proj"]


GEN_IDS = torch.tensor([[5, 9, 13, 22, 40, 7], [8, 31, 4, 3, 2, 1]])
GEN_TOKENS = 5


def generation_features(model: nn.Module) -> dict[str, torch.Tensor]:
    """Lens, probe bank and steering on one short greedy generation of `model`."""
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    lens = residtap.LogitLens(model, sublayers=True).run(GEN_IDS, max_new_tokens=GEN_TOKENS)
    out = {f"lens.{k}": getattr(lens, k) for k in (
        "topk_ids", "topk_probs", "entropy", "kl", "actual_rank", "sequences")}
    bank = (residtap.ProbeBank()
            .add("a", torch.randn(3, d, generator=g), torch.randn(3, generator=g), site="layers.0")
            .add("b", torch.randn(d, generator=g), 0.5, site="layers.2.mlp"))
    with torch.no_grad(), bank.attach(model, max_tokens=GEN_IDS.shape[1] + GEN_TOKENS,
                                             positions="all") as run:
        model.generate(input_ids=GEN_IDS, max_new_tokens=GEN_TOKENS, do_sample=False)
    out["bank.scores"] = run.results().scores
    vector = residtap.SteeringVector(torch.randn(d, generator=g), "layers.1", "random")
    with torch.no_grad(), residtap.steer(model, vector, strengths=torch.tensor([4.0, -4.0])):
        out["steered"] = model.generate(input_ids=GEN_IDS, max_new_tokens=GEN_TOKENS,
                                        do_sample=False)
    return out


def uneven_readout_decode(sharded: bool) -> dict[str, torch.Tensor]:
    """decode() through a soft-capped readout with a bias and 93 tokens: under torchrun split
    47 + 46 over 2 ranks (top_k=50 exceeds a shard; a small budget gives several chunks)."""
    g = torch.Generator().manual_seed(3)
    V, d = 93, 32
    unembed = nn.Linear(d, V)
    unembed.weight.data = torch.randn(V, d, generator=g)
    unembed.bias.data = torch.randn(V, generator=g)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (rd.rank_world()[1],))
        for name in ("weight", "bias"):
            full = getattr(unembed, name).data
            setattr(unembed, name, nn.Parameter(distribute_tensor(full, mesh, [Shard(0)])))
    hidden = torch.randn(2, 3, 5, d, generator=g)  # (B, S, T, d)
    next_ids = torch.randint(-1, V, (2, 5), generator=g)
    stats = decode(hidden, length=5, readout=Readout(None, unembed, softcap=5.0),
                   next_ids=next_ids, top_k=50, memory_budget=4000)
    return vars(stats)


def main(mode: str, model_dir: str, out: str) -> None:
    rank, world = rd.init(timeout_s=60)
    from transformers import AutoModelForCausalLM
    if mode == "tp":
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, **rd.tensor_parallel_kwargs()).eval()
        ids = torch.tensor([[5, 9, 13, 22, 40, 7], [8, 31, 4, 3, 2, 1]])
        with torch.no_grad(), residtap.capture(model, CAPTURE_SITES) as acts:
            model(input_ids=ids)
        seen = {site: acts[site] for site in CAPTURE_SITES}
        local_q = model.model.layers[0].self_attn.q_proj.weight.to_local().shape
        head = model.get_output_embeddings().weight  # a DTensor from 5.x, a local shard in 4.57
        local_lm_head = head.to_local().shape if hasattr(head, "to_local") else head.shape
        residtap.extract(model, None, IDS, ["layers.0", "layers.2"], f"{out}/tp-store",
                         positions="all", batch_size=3, shard_rows=10, progress=False,
                         distributed="tensor")
        torch.save({"acts": seen, "local_q": tuple(local_q), "world": world,
                    "local_lm_head": tuple(local_lm_head),
                    "generation": generation_features(model),
                    "uneven": uneven_readout_decode(sharded=True)}, f"{out}/rank-{rank}.pt")
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
