"""OpenAI request bodies in, OpenAI response bodies out, with residtap's extension field.

    ask = parse_request(body_bytes, chat=False, served="organism")   # BadRequest on bad input
    completion_body(ask, served, rid, text, tokens, finish, extension)  # the JSON response
    chunk_body(ask, served, rid, delta, finish, extension)           # one server-sent event

The extension, in a request: "residtap": {"probes": [NAME, ...], "steer": {"vector": NAME,
"strength": NUMBER}, "early_exit": {"probe": NAME, "threshold": NUMBER, "direction":
"above"|"below"|"either"}}. In a response and in each streamed chunk: "residtap":
{"token_ids": [...], "scores": [{COLUMN: score, ...} per token], "early_exit": {"token": i,
"score": s} or null}. Decoding is greedy; sampling fields are accepted only at their neutral
values (temperature 0, top_p 1, n 1, ...), so no request silently gets something it did not
ask for.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any


class BadRequest(ValueError):
    """A request the server answers with an HTTP error and this message (400 unless said)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class Ask:
    """One parsed request. prompt: text (completions) or messages (chat) or token ids."""

    chat: bool
    model: str
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    residtap: dict[str, Any] = field(default_factory=dict)


# Fields that change nothing in greedy decoding at these values: accepted, and refused
# (naming the field) at any other value.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "temperature": (None, 0, 0.0), "top_p": (None, 1, 1.0), "n": (None, 1),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "stop": (None, [], ""), "echo": (None, False),
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "best_of": (None, 1),
    "suffix": (None, ""), "user": (), "seed": (), "parallel_tool_calls": (),
}
_COMMON = {"model", "max_tokens", "stream", "stream_options", "residtap"}
_FIELDS = {False: _COMMON | {"prompt"}, True: _COMMON | {"messages", "max_completion_tokens"}}
RESIDTAP_KEYS = ("probes", "steer", "early_exit")


def parse_request(raw: bytes, *, chat: bool, served: str) -> Ask:
    """An Ask from the body of a /v1/completions (chat=False) or /v1/chat/completions call."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"the request body is not valid JSON ({err}); send a JSON object such "
                         'as {"model": "...", "prompt": "..."}') from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _FIELDS[chat] - set(NEUTRAL))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; this endpoint takes "
                         f"{sorted(_FIELDS[chat])} (and {sorted(NEUTRAL)} at neutral values)",
                         unknown[0])
    for name, neutral in NEUTRAL.items():
        if name in body and neutral and body[name] not in neutral:
            raise BadRequest(f"{name}={body[name]!r} is not supported: residtap serve decodes "
                             f"greedily, one sequence per request; omit {name} or pass "
                             f"{neutral[1]!r}", name)
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequest(f'"model" must be a string naming the served model ({served!r})',
                         "model")
    if model != served:
        raise BadRequest(f"model {model!r} is not served here; this server serves {served!r}",
                         "model", status=404)
    ask = Ask(chat=chat, model=model)
    ask.max_tokens = _max_tokens(body, chat)
    ask.stream = _bool(body.get("stream", False), "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest('"stream_options" must be an object such as {"include_usage": true}',
                         "stream_options")
    ask.include_usage = _bool(options.get("include_usage", False), "stream_options.include_usage")
    extension = body.get("residtap") or {}
    if not isinstance(extension, dict):
        raise BadRequest(f'"residtap" must be an object with keys {list(RESIDTAP_KEYS)}, got '
                         f"{type(extension).__name__}", "residtap")
    extra = sorted(set(extension) - set(RESIDTAP_KEYS))
    if extra:
        raise BadRequest(f'"residtap" takes the keys {list(RESIDTAP_KEYS)}; unknown: {extra}',
                         "residtap")
    ask.residtap = extension
    if chat:
        ask.messages = _messages(body.get("messages"))
    else:
        ask.prompt = _prompt(body.get("prompt"))
    return ask


def _max_tokens(body: dict[str, Any], chat: bool) -> int | None:
    name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f'"{name}" must be a positive integer, got {value!r}', name)
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f'"{name}" must be true or false, got {value!r}', name)
    return value


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str) and value:
        return value
    if (isinstance(value, list) and value
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
        return value
    raise BadRequest('"prompt" must be one non-empty string (or one list of token ids); this '
                     f"server takes one prompt per request, got {_short(value)}", "prompt")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest('"messages" must be a non-empty list of {"role", "content"} objects, '
                         f"got {_short(value)}", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f'messages[{i}] must be an object with a string "role", got '
                             f"{_short(message)}", "messages")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported",
                                 "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string, got {_short(content)}",
                             "messages")
        out.append({"role": message["role"], "content": content})
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# -- responses --------------------------------------------------------------------------------
def completion_body(ask: Ask, rid: str, text: str, finish: str, usage: dict[str, int],
                    extension: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a finished, non-streamed completion or chat completion."""
    if ask.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if ask.chat else "text_completion",
            "created": int(time.time()), "model": ask.model, "choices": [choice],
            "usage": usage, "residtap": extension}


def chunk_body(ask: Ask, rid: str, delta: str, finish: str | None, extension: dict[str, Any],
               first: bool = False) -> dict[str, Any]:
    """One streamed chunk: the new text, and the residtap extension for its tokens."""
    if ask.chat:
        message = {"role": "assistant", "content": delta} if first else {"content": delta}
        choice = {"index": 0, "delta": message, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk" if ask.chat else "text_completion",
            "created": int(time.time()), "model": ask.model, "choices": [choice],
            "residtap": extension}


def usage_chunk(ask: Ask, rid: str, usage: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if ask.chat else "text_completion",
            "created": int(time.time()), "model": ask.model, "choices": [], "usage": usage}


def error_body(message: str, param: str | None = None,
               kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def scores_json(names: tuple[str, ...], rows: list[list[float]]) -> list[dict[str, float | None]]:
    """Per token {column: score}; a non-finite score is null (JSON has no inf/nan)."""
    return [{n: (v if math.isfinite(v) else None) for n, v in zip(names, row, strict=True)}
            for row in rows]


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON (or the literal [DONE])."""
    data = obj if isinstance(obj, str) else json.dumps(obj)
    return f"data: {data}\n\n".encode()
