"""In-process CLI tests for the core commands."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

from residtap.cli import main


@pytest.fixture
def model_dir(tmp_path):
    model = tiny_model("llama", layers=2)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0").save_pretrained(path)
    return path


def test_sites_json(model_dir, capsys):
    assert main(["sites", str(model_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [r["site"] for r in out["sites"]]
    assert names[0] == "embed" and names[-1] == "logits" and "layers.1.ln2" in names
    by = {r["site"]: r for r in out["sites"]}
    assert by["layers.0"]["shape"] == [1, 4, 32]
    assert by["logits"]["shape"] == [1, 4, 96]
    assert by["layers.0.ln1"]["module"] == "model.layers.0.input_layernorm"


def test_sites_table(model_dir, capsys):
    assert main(["sites", str(model_dir)]) == 0
    text = capsys.readouterr().out
    assert "layers.1.mlp" in text and "model.layers.1.mlp" in text


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["sites", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "not a folder" in err and "never downloads" in err
