"""The tap engine: generate, hook hygiene, early stop, positions, and user errors."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_ids, left_padded, right_padded, tiny_model

import residtap
from residtap.engine import count_hooks, engine_of
from residtap.sites import blocks

PROMPTS = [[5, 9, 13, 22, 40, 7], [8, 31], [11, 12, 60, 4]]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_capture_equals_full_forward(arch):
    model = tiny_model(arch)
    ids, mask = left_padded(PROMPTS)
    sites = ["embed", "layers.0", "layers.2", "layers.1.ln1", "layers.1.mlp"]
    with torch.no_grad(), residtap.capture(model, sites) as acts:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                             do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    assert len(acts.runs) == 1 and len(acts.runs[0].lengths) == 6  # prefill + 5 decode steps
    T_total = out.shape[1] - 1  # the last generated token is never fed back
    assert acts["layers.0"].shape[:2] == (3, T_total)
    for site in sites:
        rows = acts.per_sequence(site)
        for b, prompt in enumerate(PROMPTS):
            full = out[b, ids.shape[1] - len(prompt):]  # this row's real tokens, unpadded
            with torch.no_grad(), residtap.capture(model, [site]) as ref:
                model(input_ids=full[None, :-1])
            assert rows[b].shape == ref[site][0].shape
            assert torch.allclose(rows[b], ref[site][0], atol=1e-5), (site, b)


def test_positions_last_indices_mask_agree_across_padding(llama):
    with torch.no_grad():
        caps = {}
        for name, pad in (("left", left_padded), ("right", right_padded)):
            ids, mask = pad(PROMPTS)
            for pos in ("last", [0, -1], "all"):
                with residtap.capture(llama, ["layers.1"], positions=pos) as acts:
                    llama(input_ids=ids, attention_mask=mask)
                caps[name, str(pos)] = (acts, mask)
        # independent oracle: each prompt alone
        singles = []
        for p in PROMPTS:
            with residtap.capture(llama, ["layers.1"]) as a:
                llama(input_ids=torch.tensor([p]))
            singles.append(a["layers.1"][0])
    for side in ("left", "right"):
        last = caps[side, "last"][0]["layers.1"]
        ends = caps[side, "[0, -1]"][0]["layers.1"]
        rows = caps[side, "all"][0].per_sequence("layers.1")
        for b, s in enumerate(singles):
            assert torch.allclose(last[b], s[-1], atol=1e-5)
            assert torch.allclose(ends[b, 0], s[0], atol=1e-5)
            assert torch.allclose(ends[b, 1], s[-1], atol=1e-5)
            assert torch.allclose(rows[b], s, atol=1e-5)
    ids, mask = right_padded(PROMPTS)
    with torch.no_grad(), residtap.capture(llama, ["layers.1"], positions=mask.bool()) as acts:
        llama(input_ids=ids, attention_mask=mask)
    assert torch.allclose(acts["layers.1"], torch.cat(singles), atol=1e-5)


def test_index_out_of_range_is_an_error(llama):
    ids, mask = right_padded(PROMPTS)
    with torch.no_grad(), residtap.capture(llama, ["layers.1"], positions=[3]) as acts:
        llama(input_ids=ids, attention_mask=mask)
    with pytest.raises(IndexError, match="row 1, which has 2 real tokens"):
        acts["layers.1"]


def test_no_hook_remains_after_exit_exception_and_nesting(llama):
    before = count_hooks(llama)
    ids = batch_ids()
    with residtap.capture(llama, ["layers.0", "layers.1.attn", "embed", "logits"]):
        assert count_hooks(llama) > before
        llama(input_ids=ids)
    assert count_hooks(llama) == before and engine_of(llama) is None

    with pytest.raises(RuntimeError, match="boom"):
        with residtap.capture(llama, ["layers.0"]):
            llama(input_ids=ids)
            raise RuntimeError("boom")
    assert count_hooks(llama) == before and engine_of(llama) is None

    outer = residtap.capture(llama, ["layers.0", "layers.1"])
    inner = residtap.capture(llama, ["layers.1", "layers.2"])
    with outer as a:
        with inner as b:
            # one root hook + one handler per distinct site, shared by both blocks
            assert count_hooks(llama) == before + 1 + 3
            llama(input_ids=ids)
        assert count_hooks(llama) == before + 1 + 2
        llama(input_ids=ids)
    assert count_hooks(llama) == before and engine_of(llama) is None
    assert len(a.runs) == 2 and len(b.runs) == 1
    assert torch.equal(a.run(0)["layers.1"], b["layers.1"])

    # overlapping (not nested) blocks, closed out of order
    first = residtap.capture(llama, ["layers.0"]).__enter__
    blk1 = residtap.capture(llama, ["layers.0"])
    blk2 = residtap.capture(llama, ["layers.0", "layers.3"])
    del first
    blk1.__enter__()
    blk2.__enter__()
    blk1.__exit__(None, None, None)
    assert count_hooks(llama) == before + 1 + 2
    blk2.__exit__(None, None, None)
    assert count_hooks(llama) == before and engine_of(llama) is None


def test_error_in_a_tap_removes_hooks(llama):
    before = count_hooks(llama)

    def bad_tap(hidden, step):
        raise ValueError("tap failed")

    with pytest.raises(ValueError, match="tap failed"):
        with residtap.tap(llama, {"layers.1": bad_tap}):
            llama(input_ids=batch_ids())
    assert count_hooks(llama) == before


def test_early_stop_runs_only_needed_blocks():
    model = tiny_model("llama", layers=8)
    calls = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
               for i, b in enumerate(blocks(model))]
    try:
        forward = model.forward
        with torch.no_grad(), residtap.capture(model, ["layers.1"], stop_early=True) as acts:
            assert model(input_ids=batch_ids()) is None  # the stopped forward returns None
        assert calls == [0, 1]
        assert acts["layers.1"].shape == (2, 7, 32)
        assert "forward" not in vars(model) and model.forward == forward  # put back
        # early stop ends each forward, never the code after it: a loop runs to its end
        calls.clear()
        done = []
        with torch.no_grad(), residtap.capture(model, ["layers.1"], stop_early=True) as acts:
            for i in range(3):
                model(input_ids=batch_ids(seed=i))
                done.append(i)
        assert done == [0, 1, 2] and calls == [0, 1] * 3 and len(acts.runs) == 3
        with torch.no_grad(), residtap.capture(model, ["layers.1"]) as full:
            model(input_ids=batch_ids(seed=2))
        assert torch.equal(acts.run(2)["layers.1"], full["layers.1"])
        calls.clear()
        with torch.no_grad(), residtap.capture(model, ["layers.1"]):
            model(input_ids=batch_ids())
        assert calls == list(range(8))
    finally:
        for h in handles:
            h.remove()
    assert count_hooks(model) == 0


def test_writer_tap_replaces_output(llama):
    ids = batch_ids()
    with torch.no_grad():
        clean = llama(input_ids=ids).logits
        with residtap.capture(llama, ["layers.1", "layers.2"]) as acts, \
             residtap.tap(llama, {"layers.1": lambda h, s: h * 0}):
            steered = llama(input_ids=ids).logits
    assert not torch.allclose(clean, steered)
    assert torch.count_nonzero(acts["layers.1"]) > 0  # the reader ran before the writer
    with torch.no_grad(), residtap.tap(llama, {"embed": lambda h, s: h * 0}):
        zeroed = llama(input_ids=ids).logits
    with torch.no_grad():
        ref = llama(inputs_embeds=torch.zeros(2, 7, 32)).logits
    assert torch.allclose(zeroed, ref, atol=1e-5)


def test_unknown_site_suggests_close_matches(llama):
    with pytest.raises(LookupError, match=r"did you mean 'layers\.3'"):
        residtap.capture(llama, ["layer.3"])
    with pytest.raises(LookupError, match="has 4 layers"):
        residtap.capture(llama, ["layers.9"])
    with pytest.raises(LookupError, match="found no list of identical transformer blocks"):
        residtap.site_names(torch.nn.Linear(2, 2))


def test_wrong_types_are_type_errors(llama):
    with pytest.raises(TypeError, match="site name must be a str"):
        residtap.capture(llama, [3])
    with pytest.raises(TypeError, match="torch nn.Module"):
        residtap.capture("not a model", ["layers.0"])
    with pytest.raises(TypeError, match="torch.dtype"):
        residtap.capture(llama, ["layers.0"], dtype="bf16")
    with pytest.raises(ValueError, match="positions must be"):
        residtap.capture(llama, ["layers.0"], positions="first")
    with pytest.raises(ValueError, match="sites is empty"):
        residtap.capture(llama, [])


def test_site_that_never_fired_or_is_not_a_tensor(llama):
    with residtap.capture(llama, ["layers.0"]) as acts:
        pass
    with pytest.raises(LookupError, match="nothing was captured"):
        acts["layers.0"]
    with pytest.raises(TypeError, match="not a tensor"):
        with residtap.capture(llama, ["model"]):  # LlamaModel returns a ModelOutput
            llama(input_ids=batch_ids())
    assert count_hooks(llama) == 0


def test_several_runs_are_kept_not_overwritten(llama):
    with torch.no_grad(), residtap.capture(llama, ["layers.0"]) as acts:
        llama(input_ids=batch_ids(seed=1))
        llama(input_ids=batch_ids(seed=2))
    with pytest.raises(ValueError, match="2 separate runs"):
        acts["layers.0"]
    assert not torch.equal(acts.run(0)["layers.0"], acts.run(1)["layers.0"])


def test_reentering_a_capture_starts_a_new_run(llama):
    """Entering the same capture object again records a new run, never glued onto the old."""
    cap = residtap.capture(llama, ["layers.1"])
    with torch.no_grad():
        with cap as acts:
            llama(input_ids=batch_ids(length=4))
        with cap:
            llama(input_ids=batch_ids(length=6, seed=2))
    assert [r.lengths for r in acts.runs] == [[4], [6]]
    assert acts.run(1)["layers.1"].shape == (2, 6, 32)


def in_thread(fn):
    """("ok", result) or ("error", exception) of fn() run in another thread."""
    import threading

    box = []

    def run():
        try:
            box.append(("ok", fn()))
        except Exception as err:  # noqa: BLE001 - handed back to the test
            box.append(("error", err))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return box[0]


def test_taps_never_see_another_threads_forwards(llama):
    """A forward from another thread while a block is open raises; it is not read or steered;
    a block opened from another thread is refused."""
    seen = []
    ids = batch_ids()
    with torch.no_grad():
        plain = llama(input_ids=ids).logits
        with residtap.tap(llama, {"layers.1": lambda h, s: seen.append(1) or h * 0}):
            kind, err = in_thread(lambda: llama(input_ids=ids))
            assert kind == "error" and "in another thread" in str(err) and not seen
            kind, err = in_thread(lambda: residtap.capture(llama, ["layers.0"]).__enter__())
            assert kind == "error" and "already open on this LlamaForCausalLM" in str(err)
        kind, out = in_thread(lambda: llama(input_ids=ids).logits)  # after the block: plain
    assert kind == "ok" and torch.equal(out, plain)


def test_a_compiled_forward_needs_hook_guards_and_then_follows_taps(llama):
    """torch.compile does not guard module hooks by default: residtap refuses rather than let a
    graph built without taps ignore them (or one built with taps keep running them)."""
    import torch._dynamo as dynamo

    ids = batch_ids()
    dynamo.reset()
    llama.forward = torch.compile(llama.forward, backend="eager")
    try:
        with pytest.raises(RuntimeError, match="skip_nnmodule_hook_guards = False"):
            residtap.capture(llama, ["layers.1"]).__enter__()
        assert engine_of(llama) is None and count_hooks(llama) == 0
        with dynamo.config.patch(skip_nnmodule_hook_guards=False), torch.no_grad():
            llama(input_ids=ids)  # the graph is built without taps
            calls = []
            with residtap.tap(llama, {"layers.1": lambda h, s: calls.append(1)}):
                llama(input_ids=ids)
            llama(input_ids=ids)  # after the block: the tap is gone from the graph too
        assert calls == [1]
    finally:
        del llama.forward
        dynamo.reset()
