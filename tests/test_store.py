"""The on-disk activation store: contents against `residtap.capture`, resume after SIGKILL,
bf16, .npz export, bad inputs, settings checks, write failures, the reader and the CLI."""

from __future__ import annotations

import json
import os
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
                                                          os.environ.get("PYTHONPATH", "")])}
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
    assert main(argv[:-1] + ["--positions", "all"]) == 2  # other settings: refused
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
