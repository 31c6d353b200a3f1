"""Readable reprs: what a thing is, its shapes, sites and runs; never its raw values."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import VOCAB, tiny_model

import residtap
from residtap.probes import train_probe
from residtap.probes.attention import train_attention_probe
from residtap.probes.sweep import sweep


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=3)


def _shapes_in(text: str) -> dict[str, tuple[int, ...]]:
    """{'site': shape} from "'site': (B, d) float32" entries of a repr."""
    return {site: tuple(int(v) for v in dims.split(",") if v.strip())
            for site, dims in re.findall(r"'([\w.]+)': \(([\d, ]*)\)", text)}


def test_activations_repr_shows_sites_shapes_and_runs(llama):
    ids = torch.randint(3, VOCAB, (2, 6))
    with residtap.capture(llama, ["layers.1", "logits"], positions="last") as acts:
        assert repr(acts) == ("Activations(no forward captured yet, sites=['layers.1', "
                              "'logits'], positions='last')")
        llama(input_ids=ids)
    text = repr(acts)
    assert text.startswith("Activations(runs=1, forwards=1, positions='last', sites={")
    assert _shapes_in(text) == {s: tuple(acts[s].shape) for s in ("layers.1", "logits")}
    assert "float32" in text and "tensor(" not in text and "\n" not in text


def test_activations_repr_counts_the_forwards_of_generate(llama):
    calls = []
    handle = llama.register_forward_pre_hook(lambda *_: calls.append(1))  # the oracle
    try:
        ids = torch.randint(3, VOCAB, (1, 4))
        with residtap.capture(llama, ["layers.0"]) as acts:
            llama.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                           pad_token_id=0)
    finally:
        handle.remove()
    text = repr(acts)
    assert f"runs=1, forwards={len(calls)}," in text, (text, len(calls))
    assert _shapes_in(text) == {"layers.0": tuple(acts["layers.0"].shape)}
    assert repr(acts.run(0)).startswith(f"RunView(forwards={len(calls)}, sites={{'layers.0'")


def test_activations_repr_with_several_runs_and_a_site_it_cannot_show(llama):
    ids = torch.randint(3, VOCAB, (1, 4))
    with residtap.capture(llama, ["layers.0"]) as acts:
        llama(input_ids=ids)
        llama(input_ids=ids)
    text = repr(acts)
    assert text.startswith("Activations(runs=2, forwards=2, positions='all'; shapes of run 0")
    assert "'layers.0': (1, 4, 32) float32" in text
    # during generate, logits cover one position per step: positions='last' cannot apply
    with residtap.capture(llama, ["layers.0", "logits"], positions="last") as acts:
        llama.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="positions cannot be matched"):
        acts["logits"]
    assert "'logits': not available" in repr(acts) and "'layers.0': (1, 32)" in repr(acts)


def _data(n: int = 120, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y


def test_probe_repr_is_kind_site_width_classes_and_metrics_not_weights():
    x, y = _data()
    probe = train_probe(x, [["neg", "pos"][int(v)] for v in y],
                        l2=1e-2)
    probe.site, probe.label_column = "layers.3", "label"
    text = repr(probe)
    assert text.startswith("Probe(kind='logistic', site='layers.3', d_model=16, outputs=1, "
                           "classes=['neg', 'pos'], label='label', train_accuracy=")
    assert f"train_accuracy={probe.metrics['train']['accuracy']:.4g}" in text
    assert "tensor(" not in text and "weight" not in text and len(text) < 300
    assert f"{float(probe.weight[0, 0]):.4f}" not in text


def test_attention_probe_repr_has_no_weights():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, 8, generator=g)
    y = (x[:, -1, 0] > 0).long().tolist()
    probe = train_attention_probe(x, y, n_heads=2, epochs=2, batch_size=16)
    text = repr(probe)
    assert text.startswith("AttentionProbe(kind='attention', site=None, d_model=8, heads=2, "
                           "position='from_end', classes=[0, 1]")
    assert "tensor(" not in text and "query" not in text and len(text) < 300


def test_sweep_repr_is_one_line(tmp_path, llama):
    rows = [{"id": f"t{i}", "input_ids": [5 + i % 7, 9, 70 + i % 2], "label": i % 2,
             "split": "test" if i % 4 == 0 else "train"} for i in range(40)]
    store = residtap.extract(llama, None, rows, ["embed", "layers.0"], tmp_path / "s",
                             positions="last", progress=False)
    result = sweep(store, "label", progress=False)
    text = repr(result)
    best = result.best.test["accuracy"]
    assert text == (f"SweepResult(label='label', kind='logistic', sites=2, "
                    f"best={result.best_site!r} (accuracy {best:.4g}), chance={result.chance}, "
                    f"store={result.store!r})")
