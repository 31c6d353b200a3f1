"""Serving on transformers' continuous batching: the adapter, the Python API and `residtap serve`.

Oracles: the forward's own arguments (cu_seq_lens_q, position_ids, logits_indices) for the
adapter's layout; each prompt generated alone with Hugging Face `generate` (residtap.steer and a
probe bank attached, greedy) for every served response's tokens and scores; a server / manager
with no residtap attached for the unsteered requests (tokens, and log-probabilities bit for bit
where the schedule is the same). Clients: the official `openai` package, and httpx for bodies
that no client would send. Every test here needs transformers' continuous batching as the
adapter reads it; on another release (4.57) they skip with the adapter's own reason, and the
last test checks that `residtap serve` refuses there.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from residtap import ProbeBank, SteeringVector, organism, steer
from residtap.cli import build_parser, main
from residtap.cli.common import help_examples
from residtap.engine import count_hooks, engine_of
from residtap.serving import PackedLayout, Segment, attach
from residtap.serving import transformers_cb as cb

REASON = cb.unsupported_reason()
needs_cb = pytest.mark.skipif(REASON is not None, reason=f"{REASON}")
SIZES = dict(num_blocks=128, page_size=32, max_batch_tokens=512)
EOS = 2


def _generation_config(n: int):
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=EOS)


@pytest.fixture(scope="module")
def parts():
    """The organism, a bank of three linear probes (one multi-class) and a two-head attention
    probe, and its mood vector."""
    from residtap.probes.attention import AttentionProbe

    model, tok = organism.load()
    g = torch.Generator().manual_seed(0)
    bank = ProbeBank()
    bank.add("early", torch.randn(1, 128, generator=g) / 4, torch.tensor([0.5]), site="layers.1")
    bank.add("mid", torch.randn(1, 128, generator=g) / 4, site="layers.3")
    bank.add("topic", torch.randn(3, 128, generator=g) / 4, site="layers.5",
             classes=["a", "b", "c"])
    bank.add_probe(AttentionProbe(
        query=torch.randn(2, 128, generator=g) / 4, position_weight=torch.tensor([0.3, -0.2]),
        value=torch.randn(2, 1, 128, generator=g) / 4, bias=torch.tensor([0.1]), classes=[0, 1],
        site="layers.2", position="from_start"), name="pool")
    mood = SteeringVector.from_pairs(model, tok, organism.read_jsonl("mood_pairs")[:64],
                                     site="layers.3")
    return model, tok, bank, {"mood": mood}


def alone(parts, ids: list[int], n: int, strength: float = 0.0) -> tuple[list[int], dict]:
    """One prompt generated alone by `generate` (greedy), steered at `strength` with the mood
    vector, the bank attached: its tokens and {column: (tokens,) scores}."""
    model, _, bank, vectors = parts
    ctx = steer(model, vectors["mood"], strength) if strength else contextlib.nullcontext()
    with ctx, bank.attach(model, max_tokens=n) as run:
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=EOS, pad_token_id=0)
    return out[0, len(ids):].tolist(), run.results().rows()[0]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Scores from a packed forward vs generate's (B, T) forward: the same up to float32
    rounding of different kernels (observed <= 2e-5 on scores of size ~10)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4)


# -- the layout and the adapter --------------------------------------------------------------
def test_packed_layout_refuses_segments_that_do_not_tile_the_rows():
    ok = PackedLayout((Segment("a", 0, 3, 0, 0), Segment("b", 3, 1, 7, 2)), 4)
    assert ok.new_token_rows() == [2, 3] and ok.positions() == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="without gaps"):
        PackedLayout((Segment("a", 0, 3, 0, 0), Segment("b", 4, 1, 7, 2)), 5)
    with pytest.raises(ValueError, match="cover 3 rows but the forward has 4"):
        PackedLayout((Segment("a", 0, 3, 0, 0),), 4)


@needs_cb
def test_adapter_assumptions(parts):
    """What transformers_cb reads of the manager agrees, forward by forward, with what the
    model's forward itself is given: rows, cu_seq_lens_q, position_ids, logits_indices; token
    indices run 0, 1, ... per request up to its output; a long prompt split over forwards
    (chunked prefill) has segments that pick no token; finish_after ends a request through
    the manager with the tokens kept. A release that changes these fails here."""
    model, tok, bank, _ = parts
    prompts = [[1] + list(range(10, 10 + k)) for k in (3, 14, 40, 6)]
    config = cb.serving_config(num_blocks=64, page_size=16, max_batch_tokens=24)
    manager = model.init_continuous_batching(generation_config=_generation_config(6),
                                             continuous_batching_config=config)
    seen: list[tuple[PackedLayout, dict]] = []

    def look(module, args, kwargs):  # runs after the engine's own pre-hook, which set packed
        seen.append((engine_of(model).step.packed, {
            k: kwargs[k].tolist() for k in ("cu_seq_lens_q", "position_ids", "logits_indices")}
            | {"rows": kwargs["input_ids"].shape[1]}))

    run = attach(manager, bank=bank)
    with run:
        handle = model.register_forward_pre_hook(look, with_kwargs=True)
        try:
            rids = [run.add_request(p, max_new_tokens=6, probes=["mid"]) for p in prompts]
            ended = run.add_request(prompts[0], max_new_tokens=6,
                                    early_exit=("mid", -1e30, "above"))  # crosses at token 0
            outputs = _run_to_end(manager, [*rids, ended])
        finally:
            handle.remove()
    assert seen and all(isinstance(layout, PackedLayout) for layout, _ in seen)
    tokens_seen: dict[str, list[int]] = {}
    for layout, given in seen:
        lengths = [seg.length for seg in layout.segments]
        assert layout.rows == given["rows"] == sum(lengths)
        assert given["cu_seq_lens_q"] == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
        assert given["position_ids"] == [layout.positions()]
        picked = layout.new_token_rows()  # logits_indices has one slot per request: the rest
        assert given["logits_indices"][: len(picked)] == picked  # are stale entries
        assert len(given["logits_indices"]) == len(layout.segments)
        for seg in layout.segments:
            if seg.token >= 0:
                tokens_seen.setdefault(seg.request_id, []).append(seg.token)
    assert any(seg.token == -1 for layout, _ in seen for seg in layout.segments)  # chunked
    for rid in rids:
        n = len(outputs[rid].generated_tokens)
        assert tokens_seen[rid] == list(range(n)), (rid, outputs[rid].generated_tokens)
        assert n == 6 or outputs[rid].generated_tokens[-1] == EOS
        assert len(run.scores(rid)["mid"]) == n
    assert outputs[ended].status.name == "FINISHED" and len(outputs[ended].generated_tokens) == 1
    assert outputs[ended].generated_tokens == outputs[rids[0]].generated_tokens[:1]


def _run_to_end(manager, rids: list[str], *, start: bool = True, stop: bool = True) -> dict:
    """Start the manager (if asked), wait for every request's final output, stop it (if asked,
    and whenever the wait fails)."""
    if start:
        manager.start()
    outputs: dict = {}
    deadline = time.monotonic() + 120
    try:
        while len(outputs) < len(rids) and time.monotonic() < deadline:
            out = manager.get_result(timeout=1)
            if out is not None and out.is_finished():
                outputs[out.request_id] = out
    finally:
        if stop or len(outputs) < len(rids):
            manager.stop(block=True, timeout=60)
    assert set(outputs) == set(rids), f"missing outputs: {set(rids) - set(outputs)}"
    assert all(o.error is None for o in outputs.values()), [o.error for o in outputs.values()]
    return outputs


def _logprobs_manager(model, n: int):
    """A manager of `n` greedy tokens per request that returns their log-probabilities."""
    config = cb.serving_config(**SIZES)
    config.return_logprobs = True
    return model.init_continuous_batching(generation_config=_generation_config(n),
                                          continuous_batching_config=config)


# -- the Python API on a manager the user runs -------------------------------------------------
def _prompts(tok, k: int) -> list[list[int]]:
    """k prompts of different lengths (2 to ~16 tokens) from the organism's mood texts."""
    texts = [row["text"] for row in organism.read_jsonl("mood")[:k]]
    return [tok(" ".join(t.split()[: 1 + (i * 5) % 15]))["input_ids"]
            for i, t in enumerate(texts)]


@needs_cb
def test_python_api_per_request_steering_and_scores(parts):
    """Eight requests queued before the manager starts (so both runs schedule them alike), odd
    ones steered: with residtap attached, every unsteered request's tokens and log-probabilities
    are bit-identical to a manager with nothing attached; every request's tokens and scores
    equal its prompt generated alone (steered alike) by `generate`."""
    model, tok, bank, vectors = parts
    prompts, n = _prompts(tok, 8), 8
    strengths = [1.5 if i % 2 else 0.0 for i in range(len(prompts))]

    plain = _logprobs_manager(model, n)
    plain_ids = [plain.add_request(p, request_id=f"plain-{i}", max_new_tokens=n)
                 for i, p in enumerate(prompts)]
    plain_out = _run_to_end(plain, plain_ids)

    served, hooks = _logprobs_manager(model, n), count_hooks(model)
    run = attach(served, bank=bank, vectors=vectors)
    with run:
        rids = [run.add_request(p, max_new_tokens=n, probes=["early", "topic"],
                                steer=("mood", s) if s else None)
                for p, s in zip(prompts, strengths, strict=True)]
        out = _run_to_end(served, rids)
    assert count_hooks(model) == hooks
    changed = 0
    for i, (p, s) in enumerate(zip(prompts, strengths, strict=True)):
        got, base = out[rids[i]], plain_out[plain_ids[i]]
        if not s:
            assert got.generated_tokens == base.generated_tokens
            assert got.logprobs == base.logprobs  # float for float: bit-identical
        changed += got.generated_tokens != base.generated_tokens
        tokens, scores = alone(parts, p, n, s)
        assert got.generated_tokens == tokens, i
        mine = run.scores(rids[i])
        assert close(mine["early"], scores["early"])
        for c in "abc":
            assert close(mine[f"topic:{c}"], scores[f"topic:{c}"])
    assert changed >= 2  # the steered requests really were steered


@needs_cb
def test_requests_that_ask_nothing_are_left_alone(parts):
    """A run with probes and vectors attached whose requests ask for nothing: its forwards are
    counted, nothing is read back, tokens and log-probabilities are bit-identical to a manager
    with nothing attached; the count of asking requests goes back to 0 as they are forgotten."""
    model, tok, bank, vectors = parts
    prompts, n = _prompts(tok, 3), 4

    plain = _logprobs_manager(model, n)
    base = _run_to_end(plain, [plain.add_request(p, request_id=f"p{i}", max_new_tokens=n)
                               for i, p in enumerate(prompts)])
    served = _logprobs_manager(model, n)
    run = attach(served, bank=bank, vectors=vectors)
    with run:
        asking = run.add_request(prompts[0], max_new_tokens=n, probes=["early"])
        run.forget(asking)  # registered, then forgotten before it runs: asks nothing any more
        served.cancel_request(asking)
        rids = [run.add_request(p, request_id=f"p{i}", max_new_tokens=n, steer=("mood", 0.0))
                for i, p in enumerate(prompts)]
        out = _run_to_end(served, rids)
    assert run._asking == 0 and run.host_reads == 0 and run.forwards >= n
    for rid in rids:
        assert out[rid].generated_tokens == base[rid].generated_tokens
        assert out[rid].logprobs == base[rid].logprobs


@needs_cb
def test_capture_records_only_the_requests_that_ask(parts):
    """Capture at layers.2 for two of three requests: each holds its own rows, prompt and fed
    tokens in position order, equal to HF's hidden_states[3] of its full sequence alone."""
    model, tok, bank, _ = parts
    prompts, n = _prompts(tok, 3), 5
    manager = model.init_continuous_batching(
        generation_config=_generation_config(n),
        continuous_batching_config=cb.serving_config(**SIZES))
    run = attach(manager, capture=["layers.2"])
    with run:
        rids = [run.add_request(p, max_new_tokens=n, capture=["layers.2"] if i != 1 else None)
                for i, p in enumerate(prompts)]
        out = _run_to_end(manager, rids)
    assert run.captured(rids[1]) == {}
    for i in (0, 2):
        fed = prompts[i] + out[rids[i]].generated_tokens[:-1]  # the last token is never fed
        with torch.no_grad():
            hf = model(torch.tensor([fed]), output_hidden_states=True).hidden_states[3][0]
        got = run.captured(rids[i])["layers.2"]
        assert got.shape == hf.shape
        torch.testing.assert_close(got, hf, rtol=1e-4, atol=1e-4)


@needs_cb
def test_taps_leave_no_hook_after_an_exception(parts):
    model, _, bank, vectors = parts
    manager = model.init_continuous_batching(
        generation_config=_generation_config(4),
        continuous_batching_config=cb.serving_config(**SIZES))
    before = count_hooks(model)
    with pytest.raises(KeyError, match="boom"), attach(manager, bank=bank, vectors=vectors):
        assert count_hooks(model) > before
        raise KeyError("boom")
    assert count_hooks(model) == before and engine_of(model) is None


@needs_cb
def test_attach_refuses_managers_it_cannot_follow(parts):
    model, _, _, vectors = parts
    g = torch.Generator().manual_seed(1)
    bank = (ProbeBank().add("mid", torch.randn(1, 128, generator=g), site="layers.3")
            .add("topic", torch.randn(3, 128, generator=g), site="layers.5", classes=[0, 1, 2]))
    shared = cb.serving_config(**SIZES)
    shared.allow_block_sharing = True
    manager = model.init_continuous_batching(generation_config=_generation_config(4),
                                             continuous_batching_config=shared)
    with pytest.raises(ValueError, match="prefix.*steering would miss the shared rows"):
        attach(manager, vectors=vectors)
    attach(manager, bank=bank)  # scores of generated tokens do not depend on shared prefixes
    from residtap.probes.attention import AttentionProbe

    d = model.config.hidden_size
    pooled = AttentionProbe(query=torch.ones(1, d), position_weight=torch.zeros(1),
                            value=torch.ones(1, 1, d), bias=torch.zeros(1), classes=[0, 1],
                            site="layers.2")
    with pytest.raises(ValueError, match="prefix.*attention probes .*would miss the shared"):
        attach(manager, bank=ProbeBank().add_probe(pooled, name="pooled"))
    with pytest.raises(TypeError, match="mapping name -> SteeringVector"):
        attach(manager, vectors=[vectors["mood"]])
    run = attach(manager, bank=bank)
    with pytest.raises(LookupError, match="unknown probe 'mdi' \\(did you mean 'mid'"):
        run.spec(probes=["mdi"])
    with pytest.raises(TypeError, match="strength must be a number, got bool"):
        attach(model.init_continuous_batching(
            generation_config=_generation_config(4),
            continuous_batching_config=cb.serving_config(**SIZES)),
            vectors=vectors).spec(steer=("mood", True))
    with pytest.raises(ValueError, match="probe 'topic' has 3"):
        run.spec(early_exit=("topic", 1.0))


# -- the HTTP server ---------------------------------------------------------------------------
TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


@contextlib.contextmanager
def serving(app):
    """The app on uvicorn in a thread, on a free localhost port; its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start (see the log above)")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(120)


def client(base: str):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def crossing(scores: torch.Tensor) -> tuple[float, int] | None:
    """(threshold, token): a threshold that the scores first cross, "above", at that token,
    with a margin far larger than any packing's rounding; None if no token stands out."""
    for j in range(1, len(scores) - 1):
        gap = float(scores[j] - scores[:j].max())
        if gap > 0.05:
            return float(scores[j]) - gap / 2, j
    return None


@pytest.fixture(scope="module")
def cases(parts):
    """32 requests (prompts of 2..16 tokens, 3..12 new tokens): every 4th plain, the others
    steered (strength +-1.5), asking for scores, early exit, or both; half streamed. Each with
    its prompt generated alone: the tokens and scores every response must equal."""
    model, tok, bank, _ = parts
    texts = [row["text"] for row in organism.read_jsonl("mood")[:32]]
    out = []
    for i, text in enumerate(texts):
        prompt = " ".join(text.split()[: 1 + (i * 7) % 15])
        ids, n = tok(prompt)["input_ids"], 3 + (i * 5) % 10
        strength = 0.0 if i % 4 in (0, 2) else (1.5 if i % 8 < 4 else -1.5)
        tokens, scores = alone(parts, ids, n, strength)
        ask: dict = {"probes": ["early", "topic", "pool"]} if i % 3 else {}
        if strength:
            ask["steer"] = {"vector": "mood", "strength": strength}
        exit_at = None
        if i % 4 in (2, 3) and (found := crossing(scores["mid"])) is not None:
            threshold, exit_at = found
            ask["early_exit"] = {"probe": "mid", "threshold": threshold}
            tokens = tokens[: exit_at + 1]
        out.append({"prompt": prompt, "n": n, "ask": ask, "stream": i % 2 == 1,
                    "tokens": tokens, "scores": scores, "exit": exit_at})
    assert sum(c["exit"] is not None for c in out) >= 6  # enough early exits to mean something
    return out


@pytest.fixture(scope="module")
def server(parts, cases):
    """The organism served with the bank and the mood vector (oracles are computed first: a
    model serving on its manager's thread takes no other forwards)."""
    from residtap.serving.server import build_app

    model, tok, bank, vectors = parts
    app = build_app(model, tok, bank=bank, vectors=vectors, name="organism",
                    chat_template=TEMPLATE, **SIZES)
    with serving(app) as base:
        yield base, app


def ask_served(base: str, case: dict, residtap: bool = True) -> dict:
    """One case through the openai client: token ids, scores, text, finish, early exit."""
    extra = {"residtap": case["ask"]} if residtap and case["ask"] else None
    c = client(base)
    request = dict(model="organism", prompt=case["prompt"], max_tokens=case["n"],
                   extra_body=extra)
    if not case["stream"]:
        r = c.completions.create(**request)
        ext = r.model_extra["residtap"]
        return {"tokens": ext["token_ids"], "scores": ext.get("scores"), "text":
                r.choices[0].text, "finish": r.choices[0].finish_reason,
                "exit": ext.get("early_exit")}
    got = {"tokens": [], "scores": [], "text": "", "finish": None, "exit": None}
    for chunk in c.completions.create(stream=True, **request):
        ext = chunk.model_extra["residtap"]
        got["tokens"] += ext["token_ids"]
        got["scores"] += ext.get("scores", [])
        got["text"] += chunk.choices[0].text
        got["finish"] = chunk.choices[0].finish_reason or got["finish"]
        got["exit"] = ext.get("early_exit") or got["exit"]
    got["scores"] = got["scores"] if "probes" in case["ask"] else None
    return got


def check_against_alone(case: dict, got: dict, tok) -> None:
    assert got["tokens"] == case["tokens"], case["prompt"]
    assert got["text"] == tok.decode(case["tokens"], skip_special_tokens=True)
    if case["exit"] is not None:
        assert got["exit"]["token"] == case["exit"] and got["finish"] == "stop"
    else:
        assert got["exit"] is None
    if "probes" in case["ask"]:
        n = len(case["tokens"])
        for column in ("early", "topic:a", "topic:b", "topic:c", "pool"):
            mine = torch.tensor([row[column] for row in got["scores"]])
            assert close(mine, case["scores"][column][:n]), (case["prompt"], column)
    else:
        assert got["scores"] is None


@needs_cb
def test_32_concurrent_requests_each_as_if_alone(server, cases, parts):
    """32 requests at once (steered, early exit, scores, streamed or not): every response's
    tokens, text and scores are those of its prompt generated alone; unsteered ones are the
    same tokens as from a server with no residtap attached (another copy of the organism)."""
    from residtap.serving.server import build_app

    base, app = server
    tok = parts[1]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda c: ask_served(base, c), cases))
    for case, got in zip(cases, results, strict=True):
        check_against_alone(case, got, tok)
    assert app.state.backend.counts["requests_early_exit"] == sum(
        c["exit"] is not None for c in cases)
    plain_cases = [c for c in cases if "steer" not in c["ask"]]
    model, tok2 = organism.load()
    with serving(build_app(model, tok2, name="organism", **SIZES)) as plain:
        with ThreadPoolExecutor(16) as pool:
            plain_results = list(pool.map(lambda c: ask_served(plain, c, residtap=False),
                                          plain_cases))
    by_prompt = {c["prompt"]: got for c, got in zip(cases, results, strict=True)}
    for case, got in zip(plain_cases, plain_results, strict=True):
        n = len(by_prompt[case["prompt"]]["tokens"])  # an early exit ends the residtap one
        assert got["tokens"][:n] == by_prompt[case["prompt"]]["tokens"]


@needs_cb
def test_chat_streamed_and_not_uses_the_template(server, parts):
    base, _ = server
    tok = parts[1]
    messages = [{"role": "user", "content": "the cook"}]
    assert tok.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=True,
                                   return_dict=False) == tok("the cook")["input_ids"]
    c = client(base)
    text = c.completions.create(model="organism", prompt="the cook", max_tokens=6).choices[0]
    chat = c.chat.completions.create(model="organism", messages=messages, max_tokens=6)
    assert chat.choices[0].message.content == text.text and chat.object == "chat.completion"
    chunks = list(c.chat.completions.create(model="organism", messages=messages, max_tokens=6,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text.text
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "length"


BAD = [  # (body, status, words the error message must contain)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"residtap": {"probes": ["nope"]}}, 400, "unknown probe 'nope'"),
    ({"residtap": {"steer": {"vector": "happy", "strength": 1}}}, 400, "unknown vector 'happy'"),
    ({"residtap": {"steer": {"vector": "mood", "strength": "1.5"}}}, 400,
     "strength must be a number, got str"),
    ({"residtap": {"steer": {"vector": "mood", "strength": [1]}}}, 400,
     "strength must be a number, got list"),
    ({"residtap": {"early_exit": {"probe": "mid", "threshold": "x"}}}, 400,
     "threshold must be a number"),
    ({"residtap": {"stear": {}}}, 400, "unknown: ['stear']"),
    ({"temperature": 0.7}, 400, "decodes greedily"),
    ({"max_tokens": 0}, 400, "positive integer"),
    ({"model": "gpt-4"}, 404, "not served here"),
]


@needs_cb
def test_bad_requests_get_400_and_the_others_are_served(server, cases, parts):
    """Bad and good requests interleaved, all at once: each bad one gets its status and a
    message saying what is wrong; each good one is answered as if alone."""
    import httpx

    base, app = server
    good = [c for c in cases if c["ask"]][: len(BAD)]
    rejected = app.state.backend.counts["requests_rejected"]

    def bad(item):
        body, status, words = item
        if isinstance(body, dict):
            body = json.dumps({"model": "organism", "prompt": "the cook", **body}).encode()
        r = httpx.post(f"{base}/v1/completions", content=body, timeout=120,
                       headers={"content-type": "application/json"})
        return r.status_code, r.json()["error"]["message"]

    jobs = [j for pair in zip(good, BAD, strict=True) for j in pair]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: bad(j) if isinstance(j, tuple) else
                                ask_served(base, j), jobs))
    for job, answer in zip(jobs, answers, strict=True):
        if isinstance(job, tuple):
            assert answer[0] == job[1] and job[2] in answer[1], (job, answer)
        else:
            check_against_alone(job, answer, parts[1])
    assert app.state.backend.counts["requests_rejected"] == rejected + len(BAD)


@needs_cb
def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, cases, parts):
    """A stream of 100 tokens whose client leaves after the first chunk, while the manager's
    loop is held between two forwards: the server notices without another token, cancels the
    request, and once the loop goes on the manager holds no request; the next one is served."""
    import httpx

    base, app = server
    backend = app.state.backend
    cancelled, forwards = backend.counts["requests_cancelled"], backend.run.forwards
    body = {"model": "organism", "prompt": "the cook", "max_tokens": 100, "stream": True,
            "residtap": {"probes": ["mid"], "steer": {"vector": "mood", "strength": 1.0}}}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{base}/v1/completions", json=body) as response:
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["residtap"]["token_ids"]
            hold = backend.manager.pause()
            hold.__enter__()  # the loop waits between two forwards
        try:  # the stream is closed: the client has gone
            _wait(lambda: backend.counts["requests_cancelled"] == cancelled + 1)
        finally:
            hold.__exit__(None, None, None)
    _wait(lambda: not cb.active_request_ids(backend.manager) and backend.running == 0)
    assert backend.run.forwards - forwards < 50  # far from the 100 tokens it asked for
    check_against_alone(cases[1], ask_served(base, cases[1]), parts[1])


def _wait(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server did not get there in time"
        time.sleep(0.02)


@needs_cb
def test_metrics_count_requests_tokens_and_handler_time(server):
    import httpx

    base, app = server
    text = httpx.get(f"{base}/metrics", timeout=30).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    counts = app.state.backend.counts
    assert values['residtap_requests_total{outcome="ok"}'] == counts["requests_ok"] > 0
    assert values["residtap_generated_tokens_total"] == counts["generated_tokens"] > 0
    assert values["residtap_handler_seconds_total"] > 0
    assert values["residtap_handler_calls_total"] >= values["residtap_forwards_total"] > 0


# -- the command line --------------------------------------------------------------------------
def _serve_parser():
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices
               and "serve" in a.choices)
    return sub.choices["serve"]


@pytest.mark.slow
@needs_cb
def test_serve_example_serves_the_trained_probe_and_vector(tmp_path, monkeypatch, capsys):
    """The --help example as written: its lines make a mood probe and a mood vector, and the
    app `residtap serve` builds from its last line (started here on a free port rather than by
    uvicorn.run) scores with the probe, steers with the vector, and refuses chat (the
    organism has no chat template) with a 400 saying so."""
    import shlex

    import openai

    from residtap.cli import serve

    monkeypatch.chdir(tmp_path)
    *making, last = help_examples(_serve_parser())
    for line in making:
        assert main(shlex.split(line)[1:]) == 0, capsys.readouterr().err
    args = build_parser().parse_args(shlex.split(last)[1:])
    app, summary = serve.make_app(args)
    assert "probes: ['mood']" in summary and "vectors: ['mood']" in summary
    prompt = "today i am sad , and then the coach"
    with serving(app) as base:
        c = client(base)
        asks = {s: {"probes": ["mood"], "steer": {"vector": "mood", "strength": s}}
                for s in (0.0, 1.0)}
        got = {s: c.completions.create(model="organism", prompt=prompt, max_tokens=12,
                                       extra_body={"residtap": a}) for s, a in asks.items()}
        with pytest.raises(openai.BadRequestError, match="has no chat template"):
            c.chat.completions.create(model="organism", max_tokens=4,
                                      messages=[{"role": "user", "content": prompt}])
    words = {s: set(r.choices[0].text.split()) for s, r in got.items()}
    mean = {s: sum(t["mood"] for t in r.model_extra["residtap"]["scores"]) / 12
            for s, r in got.items()}
    assert words[1.0] & organism.MOOD_WORDS["positive"]  # steered toward the positive mood
    assert not words[0.0] & organism.MOOD_WORDS["positive"]
    assert mean[1.0] > mean[0.0]  # and the mood probe reads it


def test_serve_refuses_a_transformers_whose_continuous_batching_it_cannot_read(
        monkeypatch, capsys):
    """On 4.57 for real; on a supported release, with a part the adapter reads taken away
    (as a changed release would): exit code 2 and the adapter's reason, before any loading."""
    if REASON is None:
        from transformers.generation.continuous_batching import requests

        monkeypatch.delattr(requests, "FutureRequestState")
    assert main(["serve", "organism", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("residtap serve: error: residtap's serving adapter reads "
                          "transformers' continuous batching as laid out in transformers")
    assert "FutureRequestState" in err and "Install transformers>=" in err


@needs_cb
def test_probes_at_logits_are_refused(parts):
    model = parts[0]
    manager = model.init_continuous_batching(
        generation_config=_generation_config(4),
        continuous_batching_config=cb.serving_config(**SIZES))
    bank = ProbeBank().add("vocab", torch.randn(1, model.config.vocab_size), site="logits")
    with pytest.raises(ValueError, match="logits only for the rows that pick a token"):
        attach(manager, bank=bank)


def served_as_alone(model, bank, run, out, requests, n: int, eos: int = EOS) -> dict:
    """Every request {rid: (prompt, probes asked)}: its tokens and the scores it asked for equal
    its prompt generated alone on `generate` with the same bank attached. Returns each
    request's scores alone, {rid: {column: (tokens,)}}."""
    alone_rows = {}
    for rid, (prompt, asked) in requests.items():
        with bank.attach(model, max_tokens=n) as alone_run:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0)
        assert out[rid].generated_tokens == ids[0, len(prompt):].tolist()
        mine, theirs = run.scores(rid), alone_run.results().rows()[0]
        columns = [c for c in theirs if c.split(":")[0] in (asked or [])]
        assert sorted(mine) == sorted(columns)
        for column in columns:
            assert len(mine[column]) == len(out[rid].generated_tokens)
            assert close(mine[column], theirs[column]), (rid, column)
        alone_rows[rid] = theirs
    return alone_rows


@needs_cb
def test_sae_features_are_served():
    """The organism's TopK SAE, all its features (exact TopK) in the bank: every served request's
    feature activations equal its prompt generated alone with the same bank on `generate`."""
    from residtap.sae import load_sae

    model, tok = organism.load()  # its own copy: the module's server holds taps on parts[0]
    sae = load_sae(Path(organism.__file__).parent / "sae", model=model)
    bank = ProbeBank().add_sae(sae, name="sae")
    prompts, n = _prompts(tok, 3), 6
    manager = model.init_continuous_batching(
        generation_config=_generation_config(n),
        continuous_batching_config=cb.serving_config(**SIZES))
    run = attach(manager, bank=bank)
    with run:
        rids = [run.add_request(p, max_new_tokens=n, probes=["sae"]) for p in prompts]
        out = _run_to_end(manager, rids)
    requests = {rid: (p, ["sae"]) for rid, p in zip(rids, prompts, strict=True)}
    for rid, theirs in served_as_alone(model, bank, run, out, requests, n).items():
        assert set(run.scores(rid)) == set(theirs) and len(theirs) == sae.d_sae
        active = sum(int((theirs[c] > 0).sum()) for c in theirs)
        assert active >= n * sae.k // 2  # TopK: features really fire, and must match


def attention_bank(model) -> ProbeBank:
    """A linear probe and two attention probes of one shape (from the start / end) at layers.3,
    a three-class attention probe at layers.5."""
    from residtap.probes.attention import AttentionProbe

    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size

    def probe(heads: int, classes: list, site: str, position: str) -> AttentionProbe:
        c = 1 if len(classes) == 2 else len(classes)  # outputs: one logit when binary
        return AttentionProbe(query=torch.randn(heads, d, generator=g) / 4,
                              position_weight=torch.randn(heads, generator=g) / 4,
                              value=torch.randn(heads, c, d, generator=g) / 4,
                              bias=torch.randn(c, generator=g), classes=classes, site=site,
                              position=position)

    return (ProbeBank().add("lin", torch.randn(1, d, generator=g) / 4, site="layers.3")
            .add_probe(probe(2, [0, 1], "layers.3", "from_start"), name="att")
            .add_probe(probe(2, [0, 1], "layers.3", "from_end"), name="att2")
            .add_probe(probe(1, ["a", "b", "c"], "layers.5", "from_end"), name="topic"))


@needs_cb
@pytest.mark.parametrize("batch_tokens", [512, 8])
def test_attention_probes_are_served_each_request_pooling_its_own_tokens(batch_tokens):
    """Attention probes on 15 requests at once, 9 reading them (more than the first slot table
    holds): every request that reads them gets, per token, its prompt's scores generated alone
    with the same bank on `generate`, whatever else shares the forwards: requests reading only
    the linear probe, or nothing. batch_tokens=8 splits prompts over forwards (prefill chunks
    that pick no token)."""
    model, tok = organism.load()  # its own copy: the module's server holds taps on parts[0]
    bank = attention_bank(model)
    asks = [["att", "lin"], ["lin"], ["att2", "topic"], None, ["topic", "att", "att2"]] * 3
    prompts, n = _prompts(tok, len(asks)), 5
    manager = model.init_continuous_batching(
        generation_config=_generation_config(n), continuous_batching_config=cb.serving_config(
            num_blocks=128, page_size=32, max_batch_tokens=batch_tokens))
    run = attach(manager, bank=bank)
    with run:
        rids = [run.add_request(p, max_new_tokens=n, probes=a)
                for p, a in zip(prompts, asks, strict=True)]
        out = _run_to_end(manager, rids)
    assert run.streams.tables[0].batch_size == 16  # nine streamed requests outgrew 8 slots
    requests = dict(zip(rids, zip(prompts, asks, strict=True), strict=True))
    served_as_alone(model, bank, run, out, requests, n)


@needs_cb
def test_attention_probes_across_chunks_slot_reuse_and_soft_resets(monkeypatch):
    """Forwards that feed a prompt chunk and score nothing, or score only requests that do not
    read attention probes; requests forgotten and their slots reused; requests offloaded and
    re-prefilled from position 0 (a cache too small for all of them): each streamed request's
    scores equal its prompt generated alone."""
    from residtap.serving.streams import RequestStreams

    model, tok = organism.load()
    bank = attention_bank(model)
    plans, resets = [], []
    plan, slot = RequestStreams.plan, RequestStreams._slot

    def spy_plan(self, fed, places, n_scored):
        plans.append((n_scored, places))
        return plan(self, fed, places, n_scored)

    def spy_slot(self, seg):
        resets.append(seg.position == 0 and seg.request_id in self.fed)
        return slot(self, seg)

    monkeypatch.setattr(RequestStreams, "plan", spy_plan)
    monkeypatch.setattr(RequestStreams, "_slot", spy_slot)
    texts = [row["text"] for row in organism.read_jsonl("mood")[:4]]
    long = [tok(t)["input_ids"][:20] for t in texts[:2]]
    assert min(len(p) for p in long) > 8
    asks = {"A": (tok("the cook")["input_ids"], ["lin"]), "B": (long[0], ["att"]),
            "C": (tok(" ".join(texts[2].split()[:2]))["input_ids"], ["att", "lin"]),
            "D": (long[1], ["att"])}
    n = 4
    manager = model.init_continuous_batching(
        generation_config=_generation_config(n), continuous_batching_config=cb.serving_config(
            num_blocks=64, page_size=32, max_batch_tokens=8))
    run = attach(manager, bank=bank)
    with run:
        try:
            for wave in ("", "2"):  # the second wave (in reverse) after the first is forgotten
                requests = {rid + wave: asked for rid, asked in
                            (asks.items() if not wave else reversed(asks.items()))}
                for rid, (p, a) in requests.items():
                    run.add_request(p, request_id=rid, max_new_tokens=n, probes=a)
                out = _run_to_end(manager, list(requests), start=not wave, stop=False)
                served_as_alone(model, bank, run, out, requests, n)
                slots = set(run.streams.slot.values())  # wave 1's, then wave 2's: reused
                for rid in requests:
                    run.forget(rid)
        finally:
            manager.stop(block=True, timeout=60)
    assert run.streams.tables[0].batch_size == 8 and len(slots) == 3  # the streamed B, C, D
    assert set(run.streams.slot) == {"B2", "C2", "D2"} and set(run.streams.slot.values()) == slots
    assert any(scored == 0 for scored, _ in plans)  # a chunk fed, nothing scored
    assert any(scored and set(places) == {None} for scored, places in plans), plans  # none read

    from transformers import GenerationConfig

    prompts, n = [tok(t)["input_ids"][:12] for t in texts], 24  # 4 x 36 tokens, 64 in cache
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=-1),
        continuous_batching_config=cb.serving_config(num_blocks=8, page_size=8,
                                                     max_batch_tokens=64))
    run = attach(manager, bank=bank)
    with run:
        rids = [run.add_request(p, max_new_tokens=n, probes=["att", "lin"]) for p in prompts]
        out = _run_to_end(manager, rids)
    assert any(resets)  # some streamed request was re-prefilled from position 0
    served_as_alone(model, bank, run, out, {r: (p, ["att", "lin"]) for r, p in
                                             zip(rids, prompts, strict=True)}, n, eos=None)
