"""One CLI convention everywhere: list options never drop a value, shared options are defined
once and mean the same in every command, every error is one line with exit code 2, libraries
stay quiet unless -v, and models load where asked."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, word_tokenizer

import residtap
from residtap.cli import build_parser, main
from residtap.cli.common import load_model
from residtap.organism import DATA_DIR
from residtap.store.reader import Store

ROOT = Path(__file__).parents[1]


def parsers(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ()):
    """(command path, parser) for the top level and every (nested) sub-command."""
    parser = parser or build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from parsers(child, path + (name,))


def leaves() -> dict[str, argparse.ArgumentParser]:
    return {" ".join(path): p for path, p in parsers()
            if path and not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)}


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def loads_a_model(parser: argparse.ArgumentParser) -> bool:
    return any(a.dest == "model" for a in parser._actions)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", layers=2).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    rows = [{"id": f"t{i}", "text": " ".join(f"w{4 + (i * 7 + j) % 90}" for j in range(3 + i % 4)),
             "label": i % 2, "split": "test" if i % 4 == 0 else "train"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- lists: comma-separated, repeated, or both; never a dropped value ---------------------------
LIST_CASES = [
    (["capture", "M", "--data", "organism:mood", "--out", "o", "--sites", "a", "--sites", "b"],
     "sites", ["a", "b"]),
    (["capture", "M", "--data", "organism:mood", "--out", "o", "--sites", "a,b"],
     "sites", ["a", "b"]),
    (["capture", "M", "--data", "organism:mood", "--out", "o", "--sites", "a,b", "--sites", "c"],
     "sites", ["a", "b", "c"]),
    (["capture", "M", "--data", "organism:mood", "--out", "o", "--sites", "a", "--positions", "0",
      "--positions", "-1"], "positions", ["0", "-1"]),
    (["probe", "sweep", "S", "--label", "y", "--sites", "a", "--sites", "b"], "sites", ["a", "b"]),
    (["compare", "A", "--sites-a", "a", "--sites-a", "b", "--sites-b", "c,d"], "sites_a",
     ["a", "b"]),
    (["compare", "A", "--sites-a", "a", "--sites-b", "c", "--sites-b", "d"], "sites_b", ["c", "d"]),
    (["cost", "organism", "--assume", "sync_s=1", "--assume", "launch_s=2"], "assume",
     ["sync_s=1", "launch_s=2"]),
    (["bench", "probes", "--batch", "1", "--batch", "4,8"], "batch", [1, 4, 8]),
    (["bench", "probes", "--probes", "1", "2", "--probes", "3"], "probes", [1, 2, 3]),
    (["bench", "probes", "--scopes", "one", "--scopes", "all"], "scopes", ["one", "all"]),
    (["steer", "generate", "M", "--vector", "v", "--prompt", "p", "--strength", "1",
      "--strength", "-1,2"], "strength", [1.0, -1.0, 2.0]),
    (["steer", "eval", "M", "--vector", "v", "--data", "organism:mood_ab", "--strengths", "-1",
      "0", "--strengths", "1"], "strengths", [-1.0, 0.0, 1.0]),
    (["demo", "--labelled", "a=organism:mood", "--labelled", "b=organism:topic"], "labelled",
     ["a=organism:mood", "b=organism:topic"]),
]


@pytest.mark.parametrize("argv,dest,want", LIST_CASES,
                         ids=[f"{c[0][0]}-{c[1]}-{i}" for i, c in enumerate(LIST_CASES)])
def test_list_options_keep_every_value(argv, dest, want):
    assert getattr(build_parser().parse_args(argv), dest) == want


def test_every_list_option_uses_the_one_list_action():
    """No option in any command collects values with argparse's own append / nargs (which keep
    only the last of repeated flags); free texts (--prompt) are the one exception."""
    from residtap.cli.common import ListAction

    for name, parser in leaves().items():
        for action in parser._actions:
            if isinstance(action, argparse._AppendAction):
                assert action.dest == "prompt", f"{name} {action.option_strings} appends"
            elif action.nargs in ("+", "*") and action.option_strings:
                assert isinstance(action, ListAction), f"{name} {action.option_strings}"


def test_capture_with_repeated_sites_stores_both(model_dir, texts_file, tmp_path, capsys):
    """Behaviour, not just parsing: both sites land in the store (was: only the last)."""
    out = tmp_path / "store"
    assert main(["capture", str(model_dir), "--data", str(texts_file), "--sites", "layers.0",
                 "--sites", "layers.1", "--positions", "0", "--positions", "-1", "--out",
                 str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["sites"]) == ["layers.0", "layers.1"]
    assert Store.open(out).positions == [0, -1]


def test_sites_all_means_every_layer_in_capture_sweep_compare_and_cost(model_dir, texts_file,
                                                                       tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["capture", str(model_dir), "--data", str(texts_file), "--sites", "all",
                 "--positions", "last", "--out", str(out), "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["sites"]) == ["layers.0", "layers.1"]
    assert main(["probe", "sweep", str(out), "--label", "label", "--sites", "all-layers",
                 "--json"]) == 0
    assert [s["site"] for s in json.loads(capsys.readouterr().out)["sites"]] == [
        "layers.0", "layers.1"]
    assert main(["compare", str(out), "--sites-a", "all", "--sites-b", "layers.1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sites_a"] == ["layers.0", "layers.1"] and result["sites_b"] == ["layers.1"]
    for word in ("all", "all-layers"):
        assert main(["cost", str(model_dir), "--sites", word, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["n_sites"] == 2


# -- shared options: defined once, the same words everywhere -----------------------------------
SHARED = ("--trust-remote-code", "--no-progress", "--device", "--device-map", "--model-dtype",
          "--json", "--allow-other-weights")


@pytest.mark.parametrize("flag", SHARED)
def test_shared_flags_have_one_meaning(flag):
    helps = {name: option(p, flag).help for name, p in leaves().items() if option(p, flag)}
    assert len(helps) >= 2, helps
    assert len(set(helps.values())) == 1, helps


def test_every_command_that_loads_a_model_takes_the_model_flags():
    for name, parser in leaves().items():
        if loads_a_model(parser) and name != "cost":
            for flag in ("--device", "--device-map", "--model-dtype", "--trust-remote-code"):
                assert option(parser, flag), f"`residtap {name}` lacks {flag}"
    assert option(leaves()["cost"], "--device")  # for --measure


def test_out_says_folder_or_file_in_every_command():
    seen = {}
    for name, parser in leaves().items():
        out = option(parser, "--out")
        if out is not None:
            kind = out.help.split(" to write")[0]
            assert kind in ("folder", "file") and out.metavar == {"folder": "DIR",
                                                                  "file": "FILE"}[kind], name
            seen[name] = kind
    assert seen["capture"] == "folder" and seen["probe train"] == "file"
    assert seen["probe score"] == "file" and seen["lens"] == "folder"
    assert seen["tuned-lens"] == "file" and seen["steer make"] == "file"


def test_positions_words_mean_the_same_in_every_command():
    """Each --positions help explains a word the same way wherever it is accepted."""
    from residtap.cli.common import POSITION_WORDS

    found = 0
    for name, parser in leaves().items():
        positions = option(parser, "--positions")
        if positions is None:
            continue
        found += 1
        for word, meaning in POSITION_WORDS.items():
            if f"'{word}'" in positions.help:
                assert f"'{word}': {meaning}" in positions.help, name
    assert found >= 5


def test_every_data_option_resolves_bundled_names():
    from residtap.cli.common import _data_type

    for name, parser in leaves().items():
        for action in parser._actions:
            if action.dest in ("data", "pairs", "ab", "early_exit"):
                assert action.type is _data_type, f"{name} {action.option_strings}"
    ns = build_parser().parse_args(["steer", "make", "organism", "--pairs",
                                    "organism:mood_pairs", "--out", "v.safetensors"])
    assert ns.pairs == DATA_DIR / "mood_pairs.jsonl" and ns.pairs.is_file()


def test_unknown_bundled_name_lists_the_available_ones(capsys):
    assert main(["capture", "organism", "--data", "organism:moods", "--sites", "layers.0",
                 "--out", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "organism:mood," in err and "organism:mood_pairs" in err


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"residtap {residtap.__version__}") and "torch" in out


# -- errors: one line, exit 2, traceback only with -v --------------------------------------------
def one_line_error(capsys, argv: list[str], *needles: str, code: int = 2) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == code, (rc, err)
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("residtap") and ": error: " in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_argparse_errors_are_one_line(capsys):
    one_line_error(capsys, ["capture", "organism", "--sites", "layers.0", "--out", "x"],
                   "--data", "--help")
    one_line_error(capsys, ["compare", "A", "--method", "bogus"], "invalid choice")
    one_line_error(capsys, ["bench", "probes", "--batch", "one"], "--batch", "'one'")
    one_line_error(capsys, ["nosuchcommand"], "invalid choice")


def test_library_errors_are_one_line_in_several_commands(model_dir, tmp_path, capsys):
    one_line_error(capsys, ["probe", "sweep", str(tmp_path / "nostore"), "--label", "y"],
                   "nostore")
    one_line_error(capsys, ["sites", str(model_dir), "--model-dtype", "int8"], "int8",
                   "float32")
    one_line_error(capsys, ["capture", "organism", "--data", "organism:mood", "--sites",
                            "layers.0", "--positions", "first", "--out", str(tmp_path / "s")],
                   "--positions", "'first'")
    one_line_error(capsys, ["steer", "generate", str(model_dir), "--vector",
                            str(tmp_path / "none.safetensors"), "--prompt", "w5",
                            "--positions", "last"], "'prompt'", "'last'")
    one_line_error(capsys, ["cost", "organism", "--positions", "prompt", "--measure"],
                   "--measure")
    (tmp_path / "a-file").write_text("x")
    one_line_error(capsys, ["capture", str(model_dir), "--data", "organism:mood", "--sites",
                            "layers.0", "--out", str(tmp_path / "a-file")], "folder")


def test_verbose_adds_the_traceback(tmp_path, capsys):
    assert main(["-v", "probe", "sweep", str(tmp_path / "nostore"), "--label", "y"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["probe", "sweep", str(tmp_path / "nostore"), "--label", "y", "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_model_dtype_is_applied_or_refused_for_the_organism(capsys):
    """Regression: `--model-dtype notadtype` was once silently ignored for 'organism'."""
    one_line_error(capsys, ["sites", "organism", "--model-dtype", "notadtype"], "notadtype",
                   "bfloat16")
    assert main(["sites", "organism", "--model-dtype", "bfloat16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["sites"]
    assert {r["dtype"] for r in rows} == {"bfloat16"}


def test_model_folder_without_weights_or_tokenizer_names_what_is_missing(model_dir, tmp_path,
                                                                         capsys):
    no_weights, no_tokenizer = tmp_path / "no-weights", tmp_path / "no-tokenizer"
    no_weights.mkdir()
    no_tokenizer.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (no_weights / f.name).write_bytes(f.read_bytes())
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (no_tokenizer / f.name).write_bytes(f.read_bytes())
    one_line_error(capsys, ["lens", str(no_weights), "--prompt", "w5", "--out",
                            str(tmp_path / "l")], "weights", "model.safetensors")
    err = one_line_error(capsys, ["lens", str(no_tokenizer), "--prompt", "w5", "--out",
                                  str(tmp_path / "l")], "tokenizer", "save_pretrained")
    assert "sentencepiece" not in err.lower()


def test_distributed_without_torchrun_is_one_line(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for mode in ("data", "tensor"):
        one_line_error(capsys, ["capture", "organism", "--data", "organism:mood", "--sites",
                                "layers.0", "--out", "x", "--distributed", mode], "torchrun",
                       f"--distributed {mode}")


def test_steer_make_refuses_logits_up_front(tmp_path, capsys):
    out = tmp_path / "v.safetensors"
    one_line_error(capsys, ["steer", "make", "organism", "--pairs", "organism:mood_pairs",
                            "--site", "logits", "--out", str(out)], "logits",
                   "steer generate", "layers.3")
    assert not out.exists()


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    import residtap.cli.sites as sites_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sites_cli, "load_model_from_args", interrupted)
    assert main(["sites", "organism"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "residtap sites: interrupted (Ctrl-C)"


def test_an_unexpected_exception_is_still_one_line(monkeypatch, capsys):
    import residtap.cli.sites as sites_cli

    def broken(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'weight'")

    monkeypatch.setattr(sites_cli, "load_model_from_args", broken)
    err = one_line_error(capsys, ["sites", "organism"], "internal error (AttributeError)",
                         "-v", code=1)
    assert "'weight'" in err


# -- quiet by default ------------------------------------------------------------------------
def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                 "")])}
    return subprocess.run([sys.executable, "-m", "residtap", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_capture_json_prints_only_json_and_nothing_on_stderr(tmp_path):
    """No 'Loading weights' bar, no warnings, no progress bar with --json."""
    proc = _run_cli(["capture", "organism", "--data", str(DATA_DIR / "mood.jsonl"), "--sites",
                     "layers.1", "--out", str(tmp_path / "store"), "--max-samples", "16",
                     "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout)["complete"] is True


def test_verbose_brings_the_library_output_back(tmp_path):
    proc = _run_cli(["-v", "sites", "organism", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "loading" in proc.stderr.lower()  # transformers' own log and bars
    json.loads(proc.stdout)


def test_quiet_is_restored_after_the_command(capsys):
    import transformers.utils.logging as tf_logging

    before = (tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled())
    assert main(["cost", "--list-presets", "--json"]) == 0
    capsys.readouterr()
    assert (tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()) == before


# -- devices and dtypes ----------------------------------------------------------------------
def test_organism_load_takes_device_and_dtype():
    from residtap import organism

    model, _ = organism.load()
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    model, _ = organism.load(dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="notadtype"):
        organism.load("notadtype")
    with pytest.raises(ValueError, match="floating"):
        organism.load(torch.int8)


def test_dtype_defaults_per_device(monkeypatch):
    from residtap.loading import resolve_dtype

    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("mps")) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) == "auto"
    assert resolve_dtype("torch.float16", torch.device("cpu")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(capsys):
    for device in ("cuda", "cuda:1"):
        one_line_error(capsys, ["sites", "organism", "--device", device], "CUDA", "--device cpu")
    one_line_error(capsys, ["sites", "organism", "--device", "tpu"], "cpu, cuda, cuda:N, mps")


def test_device_map_auto_loads_and_excludes_device(capsys):
    pytest.importorskip("accelerate", reason="--device-map auto needs accelerate")
    assert main(["sites", "organism", "--device-map", "auto", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class"] == "LlamaForCausalLM"
    one_line_error(capsys, ["sites", "organism", "--device-map", "auto", "--device", "cpu"],
                   "device_map")


def test_cpu_device_gives_the_same_activations_as_python(model_dir):
    model, tok = load_model(str(model_dir), device="cpu")
    ref = tiny_model("llama", layers=2)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_capture_on_cuda_matches_cpu(tmp_path, capsys):
    stores = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32")):
        out = tmp_path / device
        assert main(["capture", "organism", "--data", "organism:mood", "--sites", "layers.2",
                     "--positions", "last", "--max-samples", "32", "--device", device,
                     "--model-dtype", dtype, "--out", str(out), "--json"]) == 0
        capsys.readouterr()
        stores[device] = Store.open(out)["layers.2"].float()
    assert torch.allclose(stores["cpu"], stores["cuda"], atol=1e-3, rtol=1e-3)
    assert main(["sites", "organism", "--device", "cuda", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["sites"]
    assert {r["dtype"] for r in rows} == {"bfloat16" if torch.cuda.is_bf16_supported()
                                          else "float16"}


# -- GPT-2 checkpoints keep their LM head ---------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_model("gpt2", layers=2).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    return path


def test_gpt2_folder_loads_with_its_head(gpt2_dir):
    model, _ = load_model(str(gpt2_dir))
    ref = tiny_model("gpt2", layers=2)
    assert type(model).__name__ == "GPT2LMHeadModel"
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_lens_and_steer_generate_on_a_gpt2_folder(gpt2_dir, tmp_path, capsys):
    assert main(["lens", str(gpt2_dir), "--prompt", "w5 w6 w7", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "lens"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sites"][-1]["kl_to_final"] == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"positive": f"w{i} w9", "negative": f"w{i} w30"}) + "\n"
                             for i in range(5, 9)))
    vec = tmp_path / "v.safetensors"
    assert main(["steer", "make", str(gpt2_dir), "--pairs", str(pairs), "--site", "layers.1",
                 "--out", str(vec)]) == 0
    capsys.readouterr()
    assert main(["steer", "generate", str(gpt2_dir), "--vector", str(vec), "--prompt", "w5 w6",
                 "--max-new-tokens", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [g["strength"] for g in rows[0]["generations"]] == [0.0, -1.0, 1.0]
