"""`residtap serve`: an OpenAI-compatible HTTP server on transformers' continuous batching, with
probe scores, steering and early exit per request.

    app = build_app(model, tok, bank=bank, vectors={"mood": vec}, name="organism")
    uvicorn.run(app, host="127.0.0.1", port=8000)

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="organism", prompt="the cook", max_tokens=8,
        extra_body={"residtap": {"probes": ["mood"], "steer": {"vector": "mood", "strength": 1},
                                 "early_exit": {"probe": "mood", "threshold": 3.0}}})

The web stack is FastAPI on uvicorn (streaming by server-sent events); the scheduler is
transformers' ContinuousBatchingManager, run in its own thread, with a residtap ServingRun
attached (run.py). Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer's
chat template, or `chat_template=`; a model without one refuses chat with a 400 saying so),
GET /v1/models, GET /metrics (Prometheus text: requests by outcome, tokens, forwards, time in
residtap's handlers), GET /health. Request and response bodies: protocol.py.

A request is added to the manager under its own id with a result handler on the event loop
(the manager's register_result_handler); a client that disconnects has its request cancelled
(manager.cancel_request), which frees its slot and KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from transformers import GenerationConfig

from residtap.engine import timing
from residtap.serving import protocol
from residtap.serving import transformers_cb as cb
from residtap.serving.protocol import Ask, BadRequest
from residtap.serving.run import ServingRun
from residtap.serving.spec import NOTHING, RequestSpec

log = logging.getLogger(__name__)
_IDS = itertools.count()


@dataclass
class Update:
    """A request's state after one output of the manager."""

    tokens: list[int]
    scores: list[list[float]]
    finished: bool
    exit: dict[str, float] | None = None


class Backend:
    """The model, its manager and the attached run; counts what /metrics shows."""

    def __init__(self, model: Any, tokenizer: Any, *, bank: Any = None,
                 vectors: dict[str, Any] | None = None, name: str = "model",
                 chat_template: str | None = None, default_max_tokens: int = 16,
                 max_batch_tokens: int | None = None, num_blocks: int | None = None,
                 page_size: int | None = None) -> None:
        cb.require_supported()
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.default_max_tokens = default_max_tokens
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = {eos} if isinstance(eos, int) else set()
        config = GenerationConfig(do_sample=False, max_new_tokens=default_max_tokens,
                                  eos_token_id=eos if eos is not None else -1)
        self.manager = model.init_continuous_batching(
            generation_config=config, continuous_batching_config=cb.serving_config(
                max_batch_tokens=max_batch_tokens, num_blocks=num_blocks, page_size=page_size))
        self.run = (ServingRun(self.manager, bank=bank, vectors=vectors)
                    if (bank is not None and len(bank)) or vectors else None)
        self.counts: Counter[str] = Counter()
        self.running = 0
        self._stack = contextlib.ExitStack()
        self.clock = None

    def start(self) -> None:
        if self.run is not None:
            self._stack.enter_context(self.run)
            self.clock = self._stack.enter_context(timing(self.model))
        self.manager.warmup()  # builds the paged cache now, not at the first request
        self.manager.start()
        log.info("serving %s (residtap %s)", self.name,
                 "attached" if self.run is not None else "not attached")

    def stop(self) -> None:
        try:
            self.manager.stop(block=True, timeout=60)
        finally:
            self._stack.close()
            self.manager.destroy()

    # -- one request ------------------------------------------------------------------------
    def prompt_ids(self, ask: Ask) -> list[int]:
        if not ask.chat:
            if isinstance(ask.prompt, list):
                vocab = getattr(self.model.config, "vocab_size", None)
                bad = [t for t in ask.prompt if t < 0 or (vocab is not None and t >= vocab)]
                if bad:
                    raise BadRequest(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}",
                                     "prompt")
                return list(ask.prompt)
            return list(self.tokenizer(ask.prompt)["input_ids"])
        if not self.chat_template:
            raise BadRequest(
                f"model {self.name!r} has no chat template (its tokenizer defines none), so "
                "residtap serve cannot turn messages into a prompt; use /v1/completions with "
                "the text, or start the server with --chat-template FILE", "messages")
        ids = self.tokenizer.apply_chat_template(
            ask.messages, chat_template=self.chat_template, add_generation_prompt=True,
            tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def spec(self, ask: Ask) -> RequestSpec:
        if not any(ask.residtap.get(k) is not None for k in protocol.RESIDTAP_KEYS):
            return NOTHING
        if self.run is None:
            raise BadRequest("this server was started without probes or steering vectors, so "
                             'it cannot honour "residtap"; start it with --probe NAME=FILE '
                             "and/or --vector NAME=FILE", "residtap")
        try:
            return self.run.spec(**{k: ask.residtap.get(k) for k in protocol.RESIDTAP_KEYS})
        except (TypeError, LookupError, ValueError) as err:
            raise BadRequest(f"residtap: {err}", "residtap") from None

    def budget(self, ask: Ask, prompt: list[int]) -> int:
        n = ask.max_tokens or self.default_max_tokens
        if self.max_positions is not None and len(prompt) + n > self.max_positions:
            raise BadRequest(f"the prompt ({len(prompt)} tokens) plus max_tokens ({n}) exceed "
                             f"the model's {self.max_positions} positions; ask for at most "
                             f"{self.max_positions - len(prompt)} tokens", "max_tokens")
        return n

    async def generate(self, rid: str, prompt: list[int], n: int, spec: RequestSpec,
                       stream: bool) -> AsyncIterator[Update]:
        """The request's updates as the manager delivers them; cancels it if left early."""
        queue: asyncio.Queue = asyncio.Queue()
        self.manager.register_result_handler(rid, queue.put_nowait)
        if self.run is not None:
            self.run.register(rid, spec)
        finished = False
        self.running += 1
        try:
            if self.manager.add_request(prompt, request_id=rid, max_new_tokens=n,
                                        streaming=stream) is None:
                raise BadRequest("the server is shutting down; retry later", status=503)
            self.counts["prompt_tokens"] += len(prompt)
            while not finished:
                out = await queue.get()
                if out.error is not None:
                    raise RuntimeError(f"generation failed: {out.error}")
                finished = out.is_finished()
                yield self._update(rid, list(out.generated_tokens), finished)
        finally:
            self.running -= 1
            if not finished:
                self.manager.cancel_request(rid)
                cb.drop_result_handler(self.manager, rid)
                self.counts["requests_cancelled"] += 1
            if self.run is not None:
                self.run.forget(rid)

    def _update(self, rid: str, tokens: list[int], finished: bool) -> Update:
        if self.run is None:
            return Update(tokens, [], finished)
        record = self.run.record(rid)
        exit_info = None
        if record.exit_token is not None and record.exit_token < len(tokens):
            tokens = tokens[: record.exit_token + 1]
            exit_info = {"token": record.exit_token, "score": record.exit_score}
        if record.spec.columns and len(record.scores) < len(tokens):
            raise RuntimeError(f"request {rid}: {len(tokens)} tokens but {len(record.scores)} "
                               "scores (residtap's end-of-forward read did not run)")
        return Update(tokens, record.scores[: len(tokens)], finished, exit_info)

    def finish_reason(self, update: Update, n: int) -> str:
        if update.exit is not None or (update.tokens and update.tokens[-1] in self.eos):
            return "stop"
        return "length" if len(update.tokens) >= n else "stop"

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def metrics(self) -> str:
        """Prometheus text exposition of the counters."""
        c, run, clock = self.counts, self.run, self.clock
        rows = [
            ("residtap_requests_total", "counter", "requests answered, by outcome",
             [(f'{{outcome="{o}"}}', c[f"requests_{o}"])
              for o in ("ok", "early_exit", "cancelled", "rejected", "failed")]),
            ("residtap_requests_running", "gauge", "requests in flight", [("", self.running)]),
            ("residtap_prompt_tokens_total", "counter", "prompt tokens added",
             [("", c["prompt_tokens"])]),
            ("residtap_generated_tokens_total", "counter", "tokens sent to clients",
             [("", c["generated_tokens"])]),
            ("residtap_forwards_total", "counter", "packed forwards the taps saw",
             [("", run.forwards if run else 0)]),
            ("residtap_score_reads_total", "counter", "forwards whose scores were read back",
             [("", run.host_reads if run else 0)]),
            ("residtap_handler_seconds_total", "counter",
             "time in residtap's hooks (engine.timing)", [("", clock.seconds if clock else 0.0)]),
            ("residtap_handler_calls_total", "counter", "residtap hook calls",
             [("", clock.hook_calls if clock else 0)]),
        ]
        lines = []
        for name, kind, help_text, samples in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels} {value}" for labels, value in samples]
        return "\n".join(lines) + "\n"


def build_app(model: Any, tokenizer: Any, **backend: Any) -> FastAPI:
    """The FastAPI app; its lifespan starts the manager (and attaches residtap) and stops it.
    Keywords: Backend's (bank, vectors, name, chat_template, default_max_tokens, sizes)."""
    holder: dict[str, Backend] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder["backend"] = app.state.backend = Backend(model, tokenizer, **backend)
        app.state.backend.start()
        try:
            yield
        finally:
            app.state.backend.stop()

    app = FastAPI(title="residtap serve", lifespan=lifespan)

    async def answer(request: Request, chat: bool) -> Any:
        b = holder["backend"]
        try:
            ask = protocol.parse_request(await request.body(), chat=chat, served=b.name)
            prompt = b.prompt_ids(ask)
            spec, n = b.spec(ask), b.budget(ask, prompt)
        except BadRequest as err:
            b.counts["requests_rejected"] += 1
            return JSONResponse(protocol.error_body(str(err), err.param), status_code=err.status)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(_IDS)}"
        updates = b.generate(rid, prompt, n, spec, ask.stream)
        if ask.stream:
            return _ClosingStream(_events(b, ask, rid, prompt, n, spec, updates),
                                  media_type="text/event-stream")
        last = Update([], [], False)
        try:
            async for update in updates:
                last = update
        except (BadRequest, RuntimeError) as err:
            b.counts["requests_failed"] += 1
            status = err.status if isinstance(err, BadRequest) else 500
            return JSONResponse(protocol.error_body(str(err), kind="server_error"), status)
        _count(b, last)
        usage = _usage(prompt, last.tokens)
        return JSONResponse(protocol.completion_body(  # a plain dict: no jsonable_encoder pass
            ask, rid, b.text(last.tokens), b.finish_reason(last, n), usage,
            _extension(spec, last.tokens, last, 0)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await answer(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": holder["backend"].name, "object": "model",
                                            "owned_by": "residtap"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(holder["backend"].metrics(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok" if holder["backend"].manager.is_running() else "stopped"}

    return app


class _ClosingStream(StreamingResponse):
    """A streamed response that closes its body when it ends, also when the client has gone
    (so the request is cancelled at once, not when garbage collection gets to it)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _events(b: Backend, ask: Ask, rid: str, prompt: list[int], n: int, spec: RequestSpec,
                  updates: AsyncIterator[Update]) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per output (its new text, token ids and scores), a final
    chunk with the finish reason, the usage if asked, then [DONE]."""
    sent_tokens, sent_text, first = 0, "", True
    last = Update([], [], False)
    try:
        async for last in updates:
            text = b.text(last.tokens)
            delta = text[len(sent_text):] if text.startswith(sent_text) else ""
            sent_text += delta
            finish = b.finish_reason(last, n) if last.finished else None
            if len(last.tokens) > sent_tokens or finish is not None:
                yield protocol.sse(protocol.chunk_body(
                    ask, rid, delta, finish, _extension(spec, last.tokens, last, sent_tokens),
                    first))
                sent_tokens, first = len(last.tokens), False
    except (BadRequest, RuntimeError) as err:
        b.counts["requests_failed"] += 1
        yield protocol.sse(protocol.error_body(str(err), kind="server_error"))
        yield protocol.sse("[DONE]")
        return
    finally:
        await updates.aclose()
    _count(b, last)
    if ask.include_usage:
        yield protocol.sse(protocol.usage_chunk(ask, rid, _usage(prompt, last.tokens)))
    yield protocol.sse("[DONE]")


def _extension(spec: RequestSpec, tokens: list[int], update: Update, start: int
               ) -> dict[str, Any]:
    """residtap's field for tokens[start:]: their ids, scores (if asked) and the early exit."""
    out: dict[str, Any] = {"token_ids": tokens[start:]}
    if spec.columns:
        out["scores"] = protocol.scores_json(spec.names, update.scores[start:])
    if spec.exit_column is not None:
        out["early_exit"] = update.exit
    return out


def _usage(prompt: list[int], tokens: list[int]) -> dict[str, int]:
    return {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
            "total_tokens": len(prompt) + len(tokens)}


def _count(b: Backend, last: Update) -> None:
    b.counts["generated_tokens"] += len(last.tokens)
    b.counts["requests_early_exit" if last.exit is not None else "requests_ok"] += 1
