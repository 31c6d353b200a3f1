"""Two CPU processes with gloo under torchrun: tensor- and data-parallel runs give the
single-process results, with full tensors; a killed rank resumes; a failed rank ends the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_model

import residtap
from residtap.store import Store

pytest.importorskip("accelerate", reason="Hugging Face tensor parallelism needs accelerate "
                    "(installed by the dev extra)")
WORKER = Path(__file__).with_name("_dist_worker.py")
sys.path.insert(0, str(WORKER.parent))
from _dist_worker import (  # noqa: E402
    CAPTURE_SITES,
    IDS,
    generation_features,
    uneven_readout_decode,
)


def torchrun(mode: str, model_dir: Path, out: Path, timeout: int = 240, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29500 + os.getpid() % 1000), str(WORKER), mode, str(model_dir),
           str(out)]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "llama"
    tiny_model("llama", layers=3).save_pretrained(path)
    return path


TP_NEEDS_5 = int(transformers.__version__.split(".")[0]) < 5


@pytest.fixture(scope="module")
def tp_run(model_dir, tmp_path_factory):
    """One `tp` launch shared by the tensor-parallel tests: the folder with rank-R.pt."""
    if TP_NEEDS_5:
        pytest.skip(f"tensor parallelism needs transformers >= 5 (DistributedConfig(tp_plan)); "
                    f"this is {transformers.__version__}: test_tp_on_4x_is_refused_clearly")
    out = tmp_path_factory.mktemp("tp_run")
    proc = torchrun("tp", model_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.skipif(not TP_NEEDS_5, reason="transformers >= 5 has DistributedConfig(tp_plan)")
def test_tp_on_4x_is_refused_clearly():
    from residtap.distributed import tensor_parallel_kwargs

    with pytest.raises(RuntimeError, match=r"needs transformers >= 5.*this is transformers 4"):
        tensor_parallel_kwargs()


def single_process_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_tensor_parallel_capture_and_store_equal_single_process(model_dir, tp_run, tmp_path):
    model = single_process_model(model_dir)
    ids = torch.tensor([[5, 9, 13, 22, 40, 7], [8, 31, 4, 3, 2, 1]])
    with torch.no_grad(), residtap.capture(model, CAPTURE_SITES) as ref:
        model(input_ids=ids)
    for rank in (0, 1):
        got = torch.load(tp_run / f"rank-{rank}.pt")
        assert got["world"] == 2 and got["local_q"][0] == 16  # q_proj really is sharded
        for site in CAPTURE_SITES:  # full tensors on every rank, gathered where sharded
            assert got["acts"][site].shape == ref[site].shape, site
            assert torch.allclose(got["acts"][site], ref[site], atol=1e-5), site
    store = Store.open(tp_run / "tp-store")
    single = residtap.extract(model, None, IDS, ["layers.0", "layers.2"], tmp_path / "single",
                              positions="all", batch_size=3, shard_rows=10, progress=False)
    assert store.complete and len(store) == len(single)
    for site in ("layers.0", "layers.2"):
        assert torch.allclose(store[site], single[site], atol=1e-5)
    assert not list((tp_run / "tp-store").glob("part-*"))  # one writer, no parts


def assert_lens_stats_equal(got: dict, ref: dict, prefix: str = "") -> None:
    """Top-k ids identical, probabilities within 1e-5, entropy/KL within 1e-5, ranks equal."""
    assert torch.equal(got[f"{prefix}topk_ids"], ref[f"{prefix}topk_ids"])
    for key in ("topk_probs", "entropy", "kl"):
        assert torch.allclose(got[prefix + key], ref[prefix + key], atol=1e-5, rtol=0), key
    assert torch.equal(got[f"{prefix}actual_rank"], ref[f"{prefix}actual_rank"])


def test_tensor_parallel_lens_bank_and_steering_equal_single_process(model_dir, tp_run):
    ref = generation_features(single_process_model(model_dir))
    uneven = uneven_readout_decode(sharded=False)
    steered, plain = ref["steered"], ref["lens.sequences"]
    assert not torch.equal(steered[0], plain[0]) and not torch.equal(steered[1], plain[1])
    for rank in (0, 1):
        got = torch.load(tp_run / f"rank-{rank}.pt")
        assert got["local_lm_head"] == (48, 32)  # lm_head really is split on the vocabulary
        gen = got["generation"]
        assert torch.equal(gen["lens.sequences"], ref["lens.sequences"])
        assert_lens_stats_equal(gen, ref, prefix="lens.")
        assert torch.allclose(gen["bank.scores"], ref["bank.scores"], atol=1e-5, rtol=0)
        assert torch.equal(gen["steered"], steered)  # same steered greedy tokens
        assert_lens_stats_equal(got["uneven"], uneven)  # 47 + 46 columns, top_k=50


def test_data_parallel_store_survives_a_killed_rank(model_dir, tmp_path):
    killed = torchrun("dp", model_dir, tmp_path, KILL_AFTER="2")
    assert killed.returncode != 0
    assert not (tmp_path / "dp-store" / "manifest.json").exists()  # not merged yet
    part1 = Store.open(tmp_path / "dp-store" / "part-00001-of-00002")
    assert not part1.complete and len(part1.manifest["shards"]) >= 1  # kept its done shards
    resumed = torchrun("dp", model_dir, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    store = Store.open(tmp_path / "dp-store")
    single = residtap.extract(single_process_model(model_dir), None, IDS,
                              ["layers.0", "layers.2"], tmp_path / "single", positions="all",
                              batch_size=1, shard_rows=4, progress=False)
    assert store.complete and store.manifest["samples"] == len(IDS)
    assert torch.equal(store.rows["sample"], single.rows["sample"])
    assert torch.equal(store.rows["position"], single.rows["position"])
    for site in ("layers.0", "layers.2"):
        assert torch.allclose(store[site], single[site], atol=1e-6)
    assert store.metadata("id") == single.metadata("id")


def test_failed_rank_ends_the_run_with_an_error(model_dir, tmp_path):
    proc = torchrun("fail", model_dir, tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stderr + proc.stdout
