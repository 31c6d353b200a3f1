"""The on-disk activation store: contents against `residtap.capture`, resume after SIGKILL,
bf16, .npz export, bad inputs, settings checks, write failures, the reader and the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import residtap
from residtap.cli import main
from residtap.cli.common import load_model
from residtap.engine import count_hooks
from residtap.store import Store, StoreWriteError, extract
from residtap.store import writer as writer_mod

SITES = ["layers.0", "layers.2"]
WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def word_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   padding_side=padding_side)


def texts(n: int = 11, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(2, 10, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (length,), generator=g)]
        rows.append({"id": f"t{i}", "text": " ".join(words), "label": i % 3,
                     "split": "test" if i % 4 == 0 else "train", "topic": f"k{i % 2}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference(model, tok, rows, sites, positions, batch_size, dtype=None):
    """What residtap.capture returns, batch by batch, on the same padded inputs."""
    out = {s: [] for s in sites}
    for lo in range(0, len(rows), batch_size):
        enc = tok([r["text"] for r in rows[lo:lo + batch_size]], padding=True,
                  return_tensors="pt")
        mask = enc["attention_mask"]
        pos_ids = (mask.cumsum(1) - 1).clamp(min=0)
        policy = "all" if positions == "all" else positions
        with torch.no_grad(), residtap.capture(model, sites, positions=policy,
                                               dtype=dtype) as acts:
            model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos_ids)
        for s in sites:
            if positions == "all":
                out[s] += acts.per_sequence(s)
            else:
                out[s].append(acts[s].reshape(-1, acts[s].shape[-1]))
    return {s: torch.cat(v) for s, v in out.items()}


@pytest.mark.parametrize("positions", ["all", "last", [0, -1]])
@pytest.mark.parametrize("side", ["left", "right"])
def test_store_equals_capture(tmp_path, positions, side):
    model, tok, rows = tiny_model("llama"), word_tokenizer(side), texts()
    store = extract(model, tok, rows, SITES, tmp_path / "s", positions=positions, batch_size=3,
                    shard_rows=9, progress=False)
    ref = reference(model, tok, rows, SITES, positions, 3)
    assert store.complete and len(store.manifest["shards"]) > 1
    for s in SITES:
        assert torch.equal(store[s], ref[s]), s
        assert store.manifest["sites"][s] == {"shape": [32], "dtype": "float32"}
    n_tok = [len(r["text"].split()) for r in rows]
    per_sample = n_tok if positions == "all" else [1 if positions == "last" else 2] * len(rows)
    expect_sample = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(per_sample))
    assert torch.equal(store.groups(), expect_sample)
    if positions == "all":
        expect_pos = torch.cat([torch.arange(n) for n in n_tok])
    elif positions == "last":
        expect_pos = torch.tensor(n_tok) - 1
    else:
        expect_pos = torch.stack([torch.zeros(len(rows), dtype=torch.long),
                                  torch.tensor(n_tok) - 1], 1).reshape(-1)
    assert torch.equal(store.rows["position"], expect_pos)
    labels = store.labels("label")
    assert labels == [rows[i]["label"] for i in expect_sample.tolist()]
    assert store.metadata("id")[0] == "t0" and store.metadata("split")[0] == "test"


def test_left_padding_matches_unpadded_forward(tmp_path):
    """Position ids from the mask: a sample's rows do not depend on its batch neighbours."""
    model, tok, rows = tiny_model("llama"), word_tokenizer("left"), texts(6)
    store = extract(model, tok, rows, ["layers.2"], tmp_path / "s", batch_size=6,
                    progress=False)
    alone = []
    for r in rows:
        with torch.no_grad(), residtap.capture(model, ["layers.2"]) as acts:
            model(input_ids=tok(r["text"], return_tensors="pt")["input_ids"])
        alone.append(acts["layers.2"][0])
    torch.testing.assert_close(store["layers.2"], torch.cat(alone), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_other_architectures_and_token_ids(tmp_path, arch):
    model = tiny_model(arch)
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    store = extract(model, None, ids, "all-layers", tmp_path / "s", batch_size=2,
                    progress=False)
    assert store.sites == ["layers.0", "layers.1", "layers.2"]
    with torch.no_grad(), residtap.capture(model, ["layers.1"]) as acts:
        model(input_ids=torch.tensor([ids[2]]))
    torch.testing.assert_close(store["layers.1"][5:], acts["layers.1"][0], atol=1e-5, rtol=1e-4)
    assert store.metadata("id") == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_file_formats(tmp_path):
    model, tok = tiny_model("llama"), word_tokenizer()
    rows = texts(5)
    (tmp_path / "d.txt").write_text("\n".join(r["text"] for r in rows) + "\n\n")
    (tmp_path / "d.csv").write_text("body,label\n" + "".join(
        f"{r['text']},{r['label']}\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps([r["text"] for r in rows]))
    stores = [extract(model, tok, tmp_path / f"d.{ext}", ["layers.1"], tmp_path / ext,
                      text_column="body" if ext == "csv" else "text", positions="last",
                      progress=False) for ext in ("txt", "csv", "json")]
    for s in stores[1:]:
        assert torch.equal(s["layers.1"], stores[0]["layers.1"])
    assert stores[1].labels() == [str(r["label"]) for r in rows]  # csv values are strings


def test_bf16_round_trips_exactly(tmp_path):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(7)
    store = extract(model, tok, rows, SITES, tmp_path / "s", dtype="bfloat16", batch_size=4,
                    progress=False)
    ref = reference(model, tok, rows, SITES, "all", 4, dtype=torch.bfloat16)
    for s in SITES:
        assert store[s].dtype == torch.bfloat16
        assert torch.equal(store[s], ref[s])
    first = store.folder / store.manifest["shards"][0]["file"]
    with safe_open(str(first), framework="pt") as f:
        assert f.get_slice("layers.0").get_dtype() == "BF16"


def test_npz_loads_with_plain_numpy(tmp_path):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(5)
    store = extract(model, tok, rows, SITES, tmp_path / "s", dtype=torch.bfloat16,
                    progress=False)
    path = store.to_npz(tmp_path / "acts.npz")
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == sorted([*SITES, "sample", "position"])
        assert z["layers.0"].dtype == np.float32
        np.testing.assert_array_equal(z["layers.0"], store["layers.0"].float().numpy())
        np.testing.assert_array_equal(z["sample"], store.groups().numpy())


def test_shard_file_format(tmp_path):
    """Golden layout: u64 header length, JSON header, 8-byte aligned data, loadable by
    safetensors, with exactly the stored bytes."""
    a = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    b = torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)
    path = tmp_path / "x.safetensors"
    n = writer_mod.write_safetensors(path, {"a": [a[:2], a[2:]], "b": [b]}, {"k": "v"})
    raw = path.read_bytes()
    assert n == len(raw)
    (size,) = struct.unpack("<Q", raw[:8])
    assert (8 + size) % 8 == 0
    header = json.loads(raw[8:8 + size])
    assert header == {"__metadata__": {"k": "v"},
                      "a": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 24]},
                      "b": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [24, 28]}}
    assert raw[8 + size:] == a.numpy().tobytes() + b.view(torch.int16).numpy().tobytes()
    loaded = load_file(path)
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)


def test_reader(tmp_path):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(9)
    store = extract(model, tok, rows, SITES, tmp_path / "s", batch_size=2, shard_rows=7,
                    progress=False)
    store = Store.open(tmp_path / "s")
    X = store["layers.2"]
    batches = list(store.iter_batches("layers.2", 5))
    assert torch.equal(torch.cat(batches), X)
    seen = torch.cat([x for x in store.iter_batches("layers.2", 4, shuffle=True, seed=1,
                                                    buffer_rows=8)])
    assert not torch.equal(seen, X)
    assert torch.equal(seen[seen[:, 0].argsort()], X[X[:, 0].argsort()])  # same rows, once
    again = torch.cat(list(store.iter_batches("layers.2", 4, shuffle=True, seed=1,
                                              buffer_rows=8)))
    assert torch.equal(seen, again)
    xb, yb = next(iter(store.iter_batches("layers.2", 3, label="label")))
    assert yb.tolist() == store.labels()[:3]
    ds = store.dataset("layers.2", label="topic")
    x, y = ds[len(ds) - 1]
    assert torch.equal(x, X[-1]) and ds.classes == ["k0", "k1"] and int(y) == 0  # sample 8: k0
    assert len(ds) == len(store) == X.shape[0]
    idx = torch.tensor([len(store) - 1, 0, 3])
    assert torch.equal(store.rows_of("layers.2", idx), X[idx])
    with pytest.raises(KeyError, match="layers.1"):
        store["layers.1"]
    with pytest.raises(KeyError, match="columns"):
        store.labels("nope")


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(40)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    model, tok = load_model(str(model_dir))
    full = extract(model, tok, data, SITES, tmp_path / "full", batch_size=2, shard_rows=10,
                   progress=False)
    out = tmp_path / "killed"
    worker = Path(__file__).with_name("_store_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                          os.environ.get("PYTHONPATH", "")]),
           "RESIDTAP_WORKER_THREADS": str(torch.get_num_threads())}  # the same numerics
    proc = subprocess.Popen([sys.executable, str(worker), str(model_dir), str(data), str(out),
                             "10", "0.1"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 2:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    partial = Store.open(out)
    assert not partial.complete and 2 <= len(partial.manifest["shards"]) < 8
    assert torch.equal(partial["layers.0"], full["layers.0"][:len(partial)])
    resumed = extract(model, tok, data, SITES, out, batch_size=2, shard_rows=10,
                      progress=False)
    assert resumed.complete
    assert resumed.manifest["shards"] == full.manifest["shards"]
    for s in SITES:
        assert torch.equal(resumed[s], full[s])
    assert resumed.samples == full.samples
    for f in full.folder.iterdir():  # byte-identical shards
        if f.name != "manifest.json":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("when", ["mid-shard", "at-fsync"])
def test_write_failure_is_clear_and_leaves_complete_shards(tmp_path, monkeypatch, when):
    """Disk full while shard 2 streams in (or when it is fsynced): a clear error, shards 0-1
    and the manifest readable, no temporary file left, and the same call resumes."""
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(12)
    stream = writer_mod.SafetensorsStream
    real = stream.write if when == "mid-shard" else stream.close

    def failing(self, *args):
        if self.path.name == "shard-00002.safetensors":
            raise OSError(28, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(stream, "write" if when == "mid-shard" else "close", failing)
    out = tmp_path / "s"
    with pytest.raises(StoreWriteError, match="shard 2 .*No space left.*resume"):
        extract(model, tok, rows, SITES, out, batch_size=2, shard_rows=5, progress=False)
    assert not any(t.name == "residtap-store-writer" for t in threading.enumerate())
    partial = Store.open(out)
    assert len(partial.manifest["shards"]) == 2 and partial["layers.0"].shape[0] == len(partial)
    assert not list(out.glob("*.tmp")) and not (out / "shard-00002.safetensors").exists()
    monkeypatch.undo()
    resumed = extract(model, tok, rows, SITES, out, batch_size=2, shard_rows=5, progress=False)
    full = extract(model, tok, rows, SITES, tmp_path / "full", batch_size=2, shard_rows=5,
                   progress=False)
    assert torch.equal(resumed["layers.2"], full["layers.2"])


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


@pytest.mark.parametrize("case", ["no-text-column", "empty", "unknown-site", "out-is-file",
                                  "other-model", "not-a-store", "no-tokenizer", "bad-dtype"])
def test_bad_inputs_fail_before_writing(tmp_path, case):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(4)
    out = tmp_path / "s"
    kwargs = dict(progress=False)
    data, sites, tokenizer = rows, SITES, tok
    if case == "no-text-column":
        data, match = [{"id": 1, "body": "w1 w2"}], "no text column 'text'.*text_column"
    elif case == "empty":
        data, match = write_jsonl(tmp_path / "e.jsonl", []), "empty"
    elif case == "unknown-site":
        sites, match = ["layers.0", "layer.3"], "unknown site 'layer.3'.*did you mean"
    elif case == "out-is-file":
        out.write_text("x")
        match = "existing file"
    elif case == "other-model":
        extract(tiny_model("llama", layers=3, d=16), tok, rows, SITES, out, progress=False)
        match = "store of another model.*overwrite"
    elif case == "not-a-store":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        match = "not a residtap store"
    elif case == "no-tokenizer":
        tokenizer, match = None, "tokenizer is None"
    else:
        kwargs["dtype"], match = "float33", "dtype"
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else None
    with pytest.raises((ValueError, TypeError, LookupError, FileNotFoundError), match=match):
        extract(model, tokenizer, data, sites, out, **kwargs)
    after = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else None
    if case == "out-is-file":
        assert out.read_text() == "x"
    else:
        assert after == before  # nothing written, nothing changed


def test_other_settings_refuse_without_overwrite(tmp_path):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(5)
    out = tmp_path / "s"
    extract(model, tok, rows, SITES, out, progress=False)
    with pytest.raises(ValueError, match="positions: store has \"all\", this call has \"last\""):
        extract(model, tok, rows, SITES, out, positions="last", progress=False)
    with pytest.raises(ValueError, match="data: store has"):
        extract(model, tok, rows[:3], SITES, out, progress=False)
    with pytest.raises(ValueError, match="sites"):
        extract(model, tok, rows, ["layers.1"], out, progress=False)
    assert Store.open(out).positions == "all"
    again = extract(model, tok, rows, SITES, out, progress=False)  # same settings: no-op
    assert again.complete
    replaced = extract(model, tok, rows, SITES, out, positions="last", overwrite=True,
                       progress=False)
    assert replaced.positions == "last" and len(replaced) == 5
    assert _listing(out) == ["manifest.json", "shard-00000.safetensors",
                             "shard-00000.samples.jsonl"]


def test_cli_capture_json(tmp_path, capsys):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(6)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    argv = ["capture", str(tmp_path / "m"), "--data", str(data), "--sites", "layers.0,layers.1",
            "--out", str(tmp_path / "s"), "--positions", "last", "--dtype", "bfloat16", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 6 and summary["complete"] and summary["positions"] == "last"
    assert summary["sites"]["layers.1"] == {"shape": [32], "dtype": "bfloat16"}
    store = Store.open(tmp_path / "s")
    assert store.labels() == [r["label"] for r in rows]
    other = [("all" if a == "last" else a) for a in argv[:-1]]  # --positions all
    assert main(other) == 2  # other settings: refused
    assert "overwrite" in capsys.readouterr().err
    assert main(["capture", str(tmp_path / "m"), "--data", str(data), "--sites", "layers.9",
                 "--out", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t").exists()


def test_ctrl_c_resumes_and_leaves_no_hooks(tmp_path):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(12)
    seen = []

    def interrupt(module, args, kwargs):
        seen.append(1)
        if len(seen) == 4:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt, with_kwargs=True)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        extract(model, tok, rows, SITES, out, batch_size=2, shard_rows=4, progress=False)
    handle.remove()
    assert count_hooks(model) == 0
    assert not any(t.name == "residtap-store-writer" for t in threading.enumerate())
    assert 1 <= len(Store.open(out).manifest["shards"]) <= 3
    resumed = extract(model, tok, rows, SITES, out, batch_size=2, shard_rows=4, progress=False)
    full = extract(model, tok, rows, SITES, tmp_path / "full", batch_size=2, shard_rows=4,
                   progress=False)
    assert count_hooks(model) == 0
    assert torch.equal(resumed["layers.0"], full["layers.0"])
    assert resumed.manifest["shards"] == full.manifest["shards"]


def test_resume_refuses_model_loaded_in_another_dtype(tmp_path):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(4)
    extract(model, tok, rows, SITES, tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="dtype: store has \"model:float32\""):
        extract(model.to(torch.bfloat16), tok, rows, SITES, tmp_path / "s", progress=False)


def test_unpadded_batches_match_capture(tmp_path):
    """Equal-length texts: no padding, the tap keeps the batch without a gather."""
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (6, 5), generator=torch.Generator().manual_seed(3))
    store = extract(model, None, ids, SITES, tmp_path / "s", batch_size=3, progress=False)
    with torch.no_grad(), residtap.capture(model, SITES) as acts:
        model(input_ids=ids)
    for s in SITES:
        torch.testing.assert_close(store[s], acts[s].reshape(-1, 32), atol=1e-5, rtol=1e-4)


# -- trust: identity, paths, counts, dtypes, locks, damaged files, bad data --------------------
def test_resume_with_another_checkpoint_of_the_same_config_is_refused(tmp_path):
    model, other, tok, rows = tiny_model("llama"), tiny_model("llama", seed=1), word_tokenizer(), \
        texts(8)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):  # interrupted after the first shard
        handle = model.register_forward_pre_hook(_interrupt_after(3))
        try:
            extract(model, tok, rows, SITES, out, batch_size=2, shard_rows=4, progress=False)
        finally:
            handle.remove()
    before = _bytes(out)
    for complete in (False, True):
        with pytest.raises(ValueError, match="other weights.*another checkpoint.*overwrite"):
            extract(other, tok, rows, SITES, out, batch_size=2, shard_rows=4, progress=False)
        assert _bytes(out) == before
        if not complete:
            extract(model, tok, rows, SITES, out, batch_size=2, shard_rows=4, progress=False)
            before = _bytes(out)
    replaced = extract(other, tok, rows, SITES, out, batch_size=2, shard_rows=4,
                       overwrite=True, progress=False)
    fresh = extract(other, tok, rows, SITES, tmp_path / "fresh", batch_size=2, shard_rows=4,
                    progress=False)
    assert torch.equal(replaced["layers.2"], fresh["layers.2"])


def _interrupt_after(n: int):
    seen = []

    def hook(module, args):
        seen.append(1)
        if len(seen) == n:
            raise KeyboardInterrupt
    return hook


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_store_made_before_weights_fingerprints_still_opens_and_resumes(tmp_path, caplog):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(6)
    out = tmp_path / "s"
    full = extract(model, tok, rows, SITES, out, batch_size=2, shard_rows=4, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["model"]["weights_fingerprint"]  # as residtap wrote it before
    manifest["shards"], manifest["rows"], manifest["complete"] = manifest["shards"][:1], \
        manifest["shards"][0]["rows"], False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        resumed = extract(model, tok, rows, SITES, out, batch_size=2, shard_rows=4,
                          progress=False)
    assert "not recorded" in caplog.text
    assert resumed.complete and torch.equal(resumed["layers.0"], full["layers.0"])


def _tamper(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("path", ["../../etc/hostname", "/etc/hostname", "link/x",
                                  "sub/../../outside.safetensors"])
@pytest.mark.parametrize("key", ["file", "samples_file"])
def test_manifest_paths_outside_the_store_are_refused(tmp_path, path, key):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(4)
    out = tmp_path / "s"
    extract(model, tok, rows, SITES, out, progress=False)
    (tmp_path / "elsewhere").mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "x").write_bytes((out / "shard-00000.safetensors").read_bytes())

    def point_elsewhere(m):
        m["shards"][0][key] = path
    _tamper(out, point_elsewhere)
    with pytest.raises(ValueError, match=f"{re.escape(repr(path))}.*outside the store"):
        Store.open(out)


def test_data_parallel_part_paths_are_checked_too(tmp_path):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(4)
    out = tmp_path / "s"
    extract(model, tok, rows, SITES, out, progress=False)
    _tamper(out, lambda m: m.update(parts=["../s2"]))
    with pytest.raises(ValueError, match="'../s2'.*outside the store"):
        Store.open(out)


@pytest.mark.parametrize("where", ["shard", "total"])
def test_wrong_row_counts_in_the_manifest_are_refused(tmp_path, where):
    """Before: rows_of / dataset[i] returned other rows than asked, silently."""
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(9)
    out = tmp_path / "s"
    extract(model, tok, rows, SITES, out, batch_size=2, shard_rows=7, progress=False)

    def miscount(m):
        m["shards"][0]["rows"] -= 1
        if where == "shard":
            m["rows"] -= 1
    _tamper(out, miscount)
    match = "shard 0 file.*is \\[\\d+, 32\\].*manifest says" if where == "shard" else \
        "'rows' is"
    with pytest.raises(ValueError, match=match):
        Store.open(out)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "bool", "int32", "float8_e4m3fn"])
def test_only_floating_storage_dtypes_are_accepted(tmp_path, dtype, capsys):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(3)
    with pytest.raises(ValueError, match=f"floating dtype.*got {dtype}"):
        extract(model, tok, rows, SITES, tmp_path / "s", dtype=dtype, progress=False)
    assert not (tmp_path / "s").exists()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(["capture", str(tmp_path / "m"), "--data", str(data), "--sites", "layers.0",
                 "--out", str(tmp_path / "s"), "--dtype", dtype]) == 2
    assert "floating dtype" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_second_capture_into_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    """Two captures in one process (two threads): the second is refused while the first
    writes, with the holder's pid; --overwrite is refused too; afterwards the lock is gone."""
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(6)
    out = tmp_path / "s"
    started, release, errors = threading.Event(), threading.Event(), []

    def slow(module, args):
        if (out / ".residtap.lock").exists():  # a forward of the capture (not of a site check)
            started.set()
            release.wait(30)

    handle = model.register_forward_pre_hook(slow)
    first = threading.Thread(target=lambda: extract(model, tok, rows, SITES, out,
                                                    progress=False))
    first.start()
    try:
        assert started.wait(30)
        other = tiny_model("llama", seed=2)
        for kwargs in ({}, {"overwrite": True, "positions": "last"}):
            try:
                extract(other, tok, rows, SITES, out, progress=False, **kwargs)
            except ValueError as err:
                errors.append(str(err))
    finally:
        release.set()
        first.join()
        handle.remove()
    assert len(errors) == 2
    for err in errors:
        assert f"pid {os.getpid()} on host" in err and "another capture" in err
    store = Store.open(out)
    assert store.complete and not (out / ".residtap.lock").exists()
    assert torch.equal(store["layers.0"], reference(model, tok, rows, ["layers.0"], "all", 8)[
        "layers.0"])


def _shard_file(out: Path) -> Path:
    return out / "shard-00000.safetensors"


DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-40]), "is truncated"),
    "corrupt-header": (lambda p: p.write_bytes(p.read_bytes()[:8] + b"{nonsense" +
                                               p.read_bytes()[17:]), "corrupt safetensors"),
    "pickle": (lambda p: torch.save({"layers.0": torch.zeros(3, 32)}, p),
               "not a safetensors file.*pickle"),
    "missing-tensor": (lambda p: _rewrite_shard(p, drop="layers.2"), "has no tensor 'layers.2'"),
    "width": (lambda p: _rewrite_shard(p, widen="layers.0"),
              "tensor 'layers.0' is \\[\\d+, 33\\]"),
    "lost": (lambda p: p.unlink(), "missing.*re-run the same capture"),
}


def _rewrite_shard(path: Path, drop: str | None = None, widen: str | None = None) -> None:
    from safetensors.torch import save_file
    tensors = load_file(path)
    if drop:
        del tensors[drop]
    if widen:
        tensors[widen] = torch.cat([tensors[widen], tensors[widen][:, :1]], 1)
    save_file(tensors, str(path))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_shards_give_clear_errors_and_a_rerun_repairs_them(tmp_path, damage):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(6)
    out = tmp_path / "s"
    full = extract(model, tok, rows, SITES, out, batch_size=2, shard_rows=4, progress=False)
    want = _bytes(out)
    change, match = DAMAGE[damage]
    change(_shard_file(out))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        Store.open(out)
    assert main(["compare", str(out)]) == 2  # the CLI says it in one line too
    repaired = extract(model, tok, rows, SITES, out, batch_size=2, shard_rows=4,
                       progress=False)
    assert repaired.complete and _bytes(out) == want
    assert torch.equal(repaired["layers.2"], full["layers.2"])


@pytest.mark.parametrize("damage", ["json", "counts", "not-a-list", "samples-json",
                                    "samples-count"])
def test_damaged_manifest_and_samples_files_give_clear_errors(tmp_path, damage):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(6)
    out = tmp_path / "s"
    extract(model, tok, rows, SITES, out, batch_size=2, shard_rows=4, progress=False)
    samples = out / "shard-00000.samples.jsonl"
    if damage == "json":
        (out / "manifest.json").write_text('{"format": "residtap.store", "vers')
        match = "not valid JSON"
    elif damage == "counts":
        _tamper(out, lambda m: m["shards"][1].update(first_sample=0))
        match = "shard 1 starts at sample 0"
    elif damage == "not-a-list":
        _tamper(out, lambda m: m.update(shards={"0": "x"}))
        match = "'shards' is .*expected a list"
    elif damage == "samples-json":
        samples.write_text(samples.read_text().replace("}", "", 1))
        match = "samples.jsonl:1 is not valid JSON"
    else:
        samples.write_text(samples.read_text().splitlines()[0] + "\n")
        match = "holds 1 records but the manifest lists"
    with pytest.raises(ValueError, match=match):
        _ = Store.open(out).samples


def test_read_only_or_file_outputs_are_refused_before_any_forward(tmp_path):
    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(3)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot be created.*is a file"):
        extract(model, tok, rows, SITES, tmp_path / "file" / "s", progress=False)
    if os.geteuid() == 0:  # root writes into read-only folders, so use a place nobody writes
        if not Path("/proc/self").is_dir():
            pytest.skip("running as root without /proc: no read-only folder to write into")
        readonly = Path("/proc/self/residtap-store")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        readonly = tmp_path / "ro" / "s"
    with pytest.raises(ValueError, match="not writable"):
        extract(model, tok, rows, SITES, readonly, progress=False)
    assert forwards == []


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=f"token id {VOCAB}.*embedding has {VOCAB} rows"):
        extract(model, None, [[5, 6], [7, VOCAB]], SITES, tmp_path / "s", progress=False)
    tok = word_tokenizer()
    tok.add_tokens(["brandnew"])  # a tokenizer with an id the model has no embedding for
    with pytest.raises(ValueError, match=f"tokenizes to id {VOCAB}.*own tokenizer"):
        extract(model, tok, ["w1 brandnew", "w2"], SITES, tmp_path / "t", progress=False)


def test_non_utf8_data_names_file_and_line(tmp_path):
    model, tok = tiny_model("llama"), word_tokenizer()
    for suffix, body in ((".jsonl", b'{"text": "w1"}\n{"text": "w2 \xe9t\xe9"}\n'),
                         (".txt", b"w1\nw2\n\xff w3\n"), (".csv", b"text\nw1\nw2 \xe9\n")):
        path = tmp_path / f"d{suffix}"
        path.write_bytes(body)
        line = 3 if suffix != ".jsonl" else 2
        with pytest.raises(ValueError, match=f"d{re.escape(suffix)}:{line} is not UTF-8"):
            extract(model, tok, path, SITES, tmp_path / "s", progress=False)


def test_a_text_longer_than_the_model_is_refused_before_any_forward(tmp_path, capsys):
    model, tok = tiny_model("llama"), word_tokenizer()
    limit = model.config.max_position_embeddings
    lengths = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
        with_kwargs=True)
    huge = " ".join(["w5"] * (limit + 1))  # one token more than the model has positions
    with pytest.raises(ValueError, match=f"is {limit + 1} tokens long.*max_length={limit}"):
        extract(model, tok, ["w1 w2", huge], SITES, tmp_path / "s", progress=False)
    assert max(lengths, default=0) < limit  # no forward of the long text
    store = extract(model, tok, ["w1 w2", huge], SITES, tmp_path / "s", max_length=8,
                    progress=False)
    assert len(store) == 2 + 8


def test_ragged_csv_rows_whitespace_texts_and_mixed_labels_are_refused(tmp_path):
    model, tok = tiny_model("llama"), word_tokenizer()
    cases = {
        "ragged.csv": ("text,label\nw1 w2,1\nw3,1,extra\n", "ragged.csv:3 has 3 fields but the "
                                                           "header has 2"),
        "short.csv": ("text,label\nw1 w2,1\nw3\n", "short.csv:3 has 1 fields"),
        "blank.jsonl": ('{"text": "w1"}\n{"text": "  \\t "}\n', "row 1 .*whitespace-only"),
        "mixed.jsonl": ('{"text": "w1", "label": true}\n{"text": "w2", "label": 1}\n',
                        "column 'label' .*mixes label types: bool \\(True at row 0\\), number"),
        "mixed2.jsonl": ('{"text": "w1", "label": "a"}\n{"text": "w2", "label": 1}\n',
                         "mixes label types: string"),
    }
    for name, (body, match) in cases.items():
        (tmp_path / name).write_text(body)
        with pytest.raises(ValueError, match=match):
            extract(model, tok, tmp_path / name, SITES, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_compare_refuses_stores_of_other_texts_with_the_same_ids_and_lengths(tmp_path, capsys):
    """Before: only ids and (sample, position) rows were compared, so these were 'aligned'."""
    from residtap.analysis import store_similarity

    model, tok, rows = tiny_model("llama"), word_tokenizer(), texts(5)
    swapped = [{**r, "text": " ".join(WORDS[(WORDS.index(w) + 1) % len(WORDS)]
                                       for w in r["text"].split())} for r in rows]
    a = extract(model, tok, rows, SITES, tmp_path / "a", progress=False)
    b = extract(model, tok, swapped, SITES, tmp_path / "b", progress=False)
    assert torch.equal(a.groups(), b.groups()) and a.metadata("id") == b.metadata("id")
    with pytest.raises(ValueError, match="different data.*fingerprint"):
        store_similarity(a, b, progress=False)
    assert main(["compare", str(a.folder), str(b.folder)]) == 2
    assert "different data" in capsys.readouterr().err
    forced = store_similarity(a, b, allow_other_data=True, progress=False)
    assert forced.matrix.shape == (2, 2)
    other_model = extract(tiny_model("llama", seed=3), tok, rows, SITES, tmp_path / "c",
                          progress=False)  # same data, another model: aligned
    assert store_similarity(a, other_model, progress=False).rows == len(a)
