"""Hostile and careless use: SIGKILL at random moments then resume, tampered
manifests, a concurrent --overwrite from another process, and NaN or edited artefact files.

Each test checks an outcome against an independent oracle: an uninterrupted store's bytes, the
files a tampered manifest points at (never read), the holder's pid, the loaders' refusals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open
from safetensors.torch import save_file
from test_store import SITES, texts, word_tokenizer, write_jsonl

from residtap.cli import main
from residtap.identity import model_identity
from residtap.lens import TunedLens
from residtap.probes import Probe, load_probe, save_probe
from residtap.steering import SteeringVector
from residtap.store import Store, extract

WORKER = Path(__file__).with_name("_store_worker.py")
SHARD_ROWS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model, a data file and the store an uninterrupted run writes."""
    root = tmp_path_factory.mktemp("adversarial")
    model, tok = tiny_model("llama"), word_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = write_jsonl(root / "d.jsonl", texts(30))  # 15 batches of 2, a shard each
    from residtap.cli.common import load_model

    model, tok = load_model(str(root / "model"))
    full = extract(model, tok, data, SITES, root / "full", batch_size=2, shard_rows=SHARD_ROWS,
                   progress=False)
    return root, model, tok, data, full


def _start_worker(root: Path, data: Path, out: Path, sleep_s: float,
                  gate: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                          os.environ.get("PYTHONPATH", "")]),
           "RESIDTAP_WORKER_THREADS": str(torch.get_num_threads())}  # the same numerics
    extra = [str(gate)] if gate is not None else []
    return subprocess.Popen([sys.executable, str(WORKER), str(root / "model"), str(data),
                             str(out), str(SHARD_ROWS), str(sleep_s), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_until(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the worker never got there"
        time.sleep(0.01)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "manifest.json"}


def _shards_done(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return -1  # no manifest yet (or being replaced): nothing complete


def test_sigkill_at_random_moments_then_resume_is_byte_identical(setup):
    """Three captures, each killed at a random moment: after a random number of complete shards
    (-1: as soon as it holds the folder's lock, before its first shard) plus a random part of
    a forward, so mid-shard, mid-write or between shards. Each is resumed in this process and
    must hold the uninterrupted run's shards byte for byte, with an equal manifest."""
    root, model, tok, data, full = setup
    rng = random.Random(14)  # a seed whose three moments fall after -1, 3 and 1 shards
    moments = [(rng.choice([-1, 0, 1, 2, 3]), rng.uniform(0.0, 0.1)) for _ in range(3)]
    outs = [root / f"killed-{i}" for i in range(3)]
    procs = [_start_worker(root, data, out, 0.1) for out in outs]  # in parallel: less wall time
    try:
        due: dict[int, float] = {}  # worker -> when to kill it (its moment has come)
        deadline = time.monotonic() + 180
        while len(due) < 3 or any(p.poll() is None for p in procs):
            for i, (proc, out, (shards, extra)) in enumerate(zip(procs, outs, moments,
                                                                 strict=True)):
                assert proc.poll() is None or proc.returncode == -signal.SIGKILL, \
                    proc.stderr.read().decode()[-2000:]
                if i not in due and (out / ".residtap.lock").exists() \
                        and _shards_done(out) >= shards:
                    due[i] = time.monotonic() + extra
                if i in due and time.monotonic() >= due[i] and proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
            assert time.monotonic() < deadline, "the workers never got there"
            time.sleep(0.005)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 3
    for out in outs:
        partial = Store.open(out) if (out / "manifest.json").exists() else None
        assert partial is None or not partial.complete  # killed mid-run (15 shards to write)
        if partial is not None and len(partial):  # what survived is a prefix of the full store
            assert torch.equal(partial["layers.0"], full["layers.0"][:len(partial)])
        resumed = extract(model, tok, data, SITES, out, batch_size=2, shard_rows=SHARD_ROWS,
                          progress=False)
        assert resumed.complete and resumed.manifest["shards"] == full.manifest["shards"]
        assert _files(out) == _files(full.folder), out.name
        assert resumed.samples == full.samples


@pytest.mark.parametrize("tamper", [
    "file-parent", "file-absolute", "samples-absolute", "symlink-out", "part-out",
    "rows-short", "rows-long", "samples-count", "first-sample", "no-shards",
])
def test_tampered_manifests_never_read_outside_the_store_or_misplace_rows(setup, tmp_path,
                                                                           tamper):
    root, *_ = setup
    out = tmp_path / "s"
    for f in root.joinpath("full").iterdir():
        (out / f.name).parent.mkdir(exist_ok=True)
        (out / f.name).write_bytes(f.read_bytes())
    decoy = tmp_path / "decoy.safetensors"  # a valid shard outside: a reader must not use it
    decoy.write_bytes((out / "shard-00001.safetensors").read_bytes())
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["shards"][0]
    match = "outside the store"
    if tamper == "file-parent":
        shard["file"] = "../decoy.safetensors"
    elif tamper == "file-absolute":
        shard["file"] = str(decoy)
    elif tamper == "samples-absolute":
        shard["samples_file"] = "/etc/hostname"
    elif tamper == "symlink-out":
        (out / "inner.safetensors").symlink_to(decoy)
        shard["file"] = "inner.safetensors"
    elif tamper == "part-out":
        manifest["parts"] = ["part-00000-of-00001", "../../"]
    elif tamper in ("rows-short", "rows-long"):
        delta = -1 if tamper == "rows-short" else 1
        shard["rows"] += delta
        manifest["rows"] += delta
        match = "tensor 'layers.0' is .* but the manifest says"
    elif tamper == "samples-count":
        manifest["shards"][-1]["samples"] += 1
        manifest["samples"] += 1
        match = "samples file.*holds .* records but the manifest lists"
    elif tamper == "first-sample":
        manifest["shards"][2]["first_sample"] += 1
        match = "shard 2 starts at sample"
    else:
        manifest["shards"] = []
        match = "'rows' is"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        _ = Store.open(out).samples


def test_overwrite_from_another_process_while_a_capture_runs_is_refused(setup, capsys):
    """Before: the running capture reported `complete` while the other process's --overwrite
    had replaced its data. Now the overwrite (API and CLI) is refused naming the writer's pid,
    and the running capture finishes with exactly the uninterrupted run's bytes."""
    root, model, tok, data, full = setup
    out, gate = root / "contested", root / "gate"
    gate.touch()  # the writer waits at its first forward while this file exists
    proc = _start_worker(root, data, out, 0.0, gate)
    try:
        _wait_until(lambda: (out / ".residtap.lock").exists() and
                    b"pid" in (out / ".residtap.lock").read_bytes(), proc)
        with pytest.raises(ValueError, match=f"another capture \\(pid {proc.pid} on host"):
            extract(model, tok, data, SITES, out, positions="last", overwrite=True,
                    progress=False)
        argv = ["capture", str(root / "model"), "--data", str(data), "--sites", "layers.0",
                "--out", str(out), "--overwrite", "--no-progress"]
        assert main(argv) == 2
        assert f"pid {proc.pid}" in capsys.readouterr().err
        assert proc.poll() is None  # the writer never noticed
    finally:
        gate.unlink()
        proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    store = Store.open(out)
    assert store.complete and store.positions == "all"
    assert _files(out) == _files(full.folder)
    assert not (out / ".residtap.lock").exists()


def _retensor(path: Path, change) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(meta, tensors)
    save_file(tensors, str(path), metadata=meta)


def _nan(meta, tensors) -> None:
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[-1] = float("nan")


def test_nan_files_are_refused_by_every_loader(tmp_path):
    """Probe files and tuned lenses loaded NaN weights; steering vectors already refused."""
    model = tiny_model("llama", layers=3)
    probe = Probe("logistic", torch.randn(1, 32), torch.zeros(1), classes=[0, 1],
                  site="layers.1")
    files = {
        "probe": (save_probe(probe, tmp_path / "p.safetensors", model=model), load_probe),
        "tuned": (TunedLens.identity(model, ["layers.0"]).save(tmp_path / "t.safetensors"),
                  TunedLens.load),
        "vector": (SteeringVector(torch.randn(32), "layers.1", "tensor", model_identity(model))
                   .save(tmp_path / "v.safetensors"), SteeringVector.load),
    }
    for path, load in files.values():
        load(path, model)  # loads before the damage
        _retensor(path, _nan)
        with pytest.raises(ValueError, match="NaN|nan"):
            load(path, model)


@pytest.mark.parametrize(("change", "match"), [
    (lambda m, t: m.update(site="layers.9"), "steers site 'layers.9', which this model lacks"),
    (lambda m, t: m.pop("site"), "metadata 'site' is None"),
    (lambda m, t: m.update(extra="{not json"), "metadata 'extra' is not valid JSON"),
    (lambda m, t: m.update(model="[1, 2]"), "metadata 'model' is .*wrong type"),
    (lambda m, t: m.update(normalized='"yes"'), "metadata 'normalized'"),
    (lambda m, t: t.update(vector=torch.arange(32)), "is torch.int64, expected a float vector"),
])
def test_edited_steering_vector_files_are_refused_with_the_reason(tmp_path, change, match):
    model = tiny_model("llama", layers=3)
    path = SteeringVector(torch.randn(32), "layers.1", "tensor", model_identity(model)).save(
        tmp_path / "v.safetensors")
    _retensor(path, change)
    with pytest.raises(ValueError, match=match):
        SteeringVector.load(path, model)


def test_a_vector_from_another_checkpoint_needs_the_override_once(tmp_path):
    """The override is explicit, and once given for a model it holds for later checks of the
    same vector on that model (steer() re-checks what load() accepted)."""
    from residtap.steering import steer

    model, other = tiny_model("llama", layers=3), tiny_model("llama", layers=3, seed=1)
    path = SteeringVector(torch.randn(32), "layers.1", "tensor", model_identity(model)).save(
        tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="other weights.*allow_other_weights"):
        SteeringVector.load(path, other)
    vec = SteeringVector.load(path, other, allow_other_weights=True)
    with steer(other, vec, 1.0), torch.no_grad():
        other(input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="other weights"):  # a third model: not allowed
        steer(tiny_model("llama", layers=3, seed=2), vec, 1.0)


def test_cli_refuses_a_vector_of_another_checkpoint_unless_allow_other_weights(tmp_path, capsys):
    from conftest import word_tokenizer as bos_tokenizer

    model, other = tiny_model("llama", layers=3), tiny_model("llama", layers=3, seed=1)
    model.save_pretrained(tmp_path / "m")
    bos_tokenizer().save_pretrained(tmp_path / "m")
    path = SteeringVector(torch.randn(32), "layers.1", "tensor", model_identity(other)).save(
        tmp_path / "v.safetensors")
    argv = ["steer", "generate", str(tmp_path / "m"), "--vector", str(path), "--prompt",
            "w5 w6", "--strength", "2", "--max-new-tokens", "2", "--json"]
    assert main(argv) == 2
    assert "other weights" in capsys.readouterr().err
    assert main([*argv, "--allow-other-weights"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["prompt"] == "w5 w6"


def test_artefact_saves_to_unusable_paths_are_clear_errors(tmp_path):
    model = tiny_model("llama", layers=3)
    (tmp_path / "file").write_text("x")
    vec = SteeringVector(torch.randn(32), "layers.1", "tensor", model_identity(model))
    lens = TunedLens.identity(model, ["layers.0"])
    for save in (vec.save, lens.save):
        with pytest.raises(ValueError, match="is a folder"):
            save(tmp_path)
        with pytest.raises(ValueError, match="cannot be created.*is a file"):
            save(tmp_path / "file" / "x.safetensors")


def test_weights_fingerprint_tells_checkpoints_apart_but_not_dtypes_or_the_head():
    import transformers as tf

    from residtap.identity import weights_fingerprint

    model = tiny_model("llama", layers=3)
    same = weights_fingerprint(model)
    assert weights_fingerprint(tiny_model("llama", layers=3)) == same  # deterministic
    assert weights_fingerprint(tiny_model("llama", layers=3, seed=1)) != same
    for dtype in (torch.bfloat16, torch.float16):
        assert weights_fingerprint(tiny_model("llama", layers=3).to(dtype)) == same, dtype
    assert weights_fingerprint(model.model) == same  # the base model, without the LM head
    with torch.no_grad():  # a "fine-tune" of one block: the cached value is not reused
        w = model.model.layers[1].mlp.down_proj.weight
        w.copy_(-w)
    assert weights_fingerprint(model) != same
    with torch.device("meta"):
        meta = tf.AutoModelForCausalLM.from_config(model.config)
    assert weights_fingerprint(meta) is None  # nothing to read: checked by config only


def test_two_threads_on_one_model_never_record_or_steer_each_others_forwards():
    """Thread A captures (and steers) in a loop while thread B runs plain forwards of the same
    model at the same time: B's forwards inside A's block are refused, never recorded or
    steered; A records exactly its own inputs; after A's block B runs plain again."""
    import threading

    from conftest import batch_ids

    import residtap

    model = tiny_model("llama", layers=2)
    vector = SteeringVector(torch.ones(32), site="layers.0", method="tensor")
    a_open, b_done = threading.Event(), threading.Event()
    refused, b_out, a_inputs = [], [], []

    def thread_a():
        with torch.no_grad(), residtap.capture(model, ["layers.1"]) as acts, \
                residtap.steer(model, vector, 2.0):
            a_open.set()
            for i in range(8):
                ids = batch_ids(seed=i)
                a_inputs.append(ids)
                model(input_ids=ids)
            b_done.wait(timeout=60)
        thread_a.acts = acts

    def thread_b():
        a_open.wait(timeout=60)
        for i in range(8):
            try:
                with torch.no_grad():
                    b_out.append(model(input_ids=batch_ids(seed=100 + i)).logits)
            except RuntimeError as err:
                refused.append(str(err))
        b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(refused) == 8 and not b_out and "another thread" in refused[0]
    acts = thread_a.acts
    assert len(acts.runs) == 8  # A's own forwards, nothing of B's
    with torch.no_grad(), residtap.steer(model, vector, 2.0), \
            residtap.capture(model, ["layers.1"]) as again:
        model(input_ids=a_inputs[3])
    assert torch.equal(acts.run(3)["layers.1"], again["layers.1"])
    plain = []
    worker = threading.Thread(target=lambda: plain.append(model(input_ids=batch_ids(seed=1))))
    worker.start()
    worker.join()
    with torch.no_grad():
        assert torch.equal(plain[0].logits.detach(), model(input_ids=batch_ids(seed=1)).logits)
