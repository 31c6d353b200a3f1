r"""`residtap serve MODEL`: an OpenAI-compatible server (/v1/completions, /v1/chat/completions,
streaming by server-sent events) on transformers' continuous batching, with probe scores,
steering and early exit per request.

Probe files (--probe NAME=FILE) and steering vectors (--vector NAME=FILE) are loaded at start-up;
each request may ask, in an extension field,
  "residtap": {"probes": ["mood"], "steer": {"vector": "mood", "strength": 1.0},
               "early_exit": {"probe": "mood", "threshold": 3.0, "direction": "above"}}
and gets back, in the response and in every streamed chunk,
  "residtap": {"token_ids": [...], "scores": [{"mood": 1.7}, ...], "early_exit": null}
(one score per generated token). GET /metrics: requests, tokens, time in residtap's handlers.
Decoding is greedy. Chat needs a chat template: the tokenizer's, or --chat-template FILE (the
organism has none, so its chat is refused with a message saying so). Needs the `serve` extra
(pip install 'residtap[serve]') and transformers >= 5.24 (its continuous batching as
residtap.serving.transformers_cb reads it).

examples:
  residtap capture organism --data organism:mood --sites layers.3 --positions last \
      --max-samples 200 --out acts/
  residtap probe train acts/ --label label --site layers.3 --out mood-probe.safetensors
  residtap steer make organism --pairs organism:mood_pairs --site layers.3 --out mood.safetensors
  residtap serve organism --probe mood=mood-probe.safetensors --vector mood=mood.safetensors \
      --port 8000
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from residtap.cli.common import (
    MODEL_HELP,
    add_allow_other_weights,
    add_list,
    add_model_flags,
    command_help,
    load_model_from_args,
)

# transformers sizes its paged cache for accelerators (768 blocks of 256 tokens, 8192 tokens
# per forward): on the CPU that takes ~20 s to allocate and slows every step (its attention
# mask is reset at full size), so the CPU gets a small cache: 8192 tokens, 512 per forward.
CPU_SIZES = {"max_batch_tokens": 512, "num_blocks": 256, "page_size": 32}


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible server with probes, steering "
                              "and early exit per request", **command_help(__doc__))
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    add_list(p, "--probe", item_type=named_file, default=[], metavar="NAME=FILE",
             help="a probe file (residtap probe train), served as NAME")
    add_list(p, "--vector", item_type=named_file, default=[], metavar="NAME=FILE",
             help="a steering vector file (residtap steer make), served as NAME")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", help="the model name clients pass (default: 'organism', or the "
                   "model folder's name)")
    p.add_argument("--chat-template", type=Path, metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions (default: the "
                   "tokenizer's own)")
    p.add_argument("--max-tokens", type=int, default=16,
                   help="tokens generated when a request gives no max_tokens (default 16)")
    p.add_argument("--max-batch-tokens", type=int,
                   help=f"tokens per packed forward (default on the CPU "
                   f"{CPU_SIZES['max_batch_tokens']}, elsewhere transformers chooses)")
    p.add_argument("--num-blocks", type=int,
                   help=f"KV cache blocks (default on the CPU {CPU_SIZES['num_blocks']}, "
                   "elsewhere transformers sizes the cache from free memory)")
    p.add_argument("--page-size", type=int, help=f"tokens per KV cache block (default on the "
                   f"CPU {CPU_SIZES['page_size']}, elsewhere 256)")
    add_model_flags(p)
    add_allow_other_weights(p)
    p.set_defaults(func=run)


def named_file(text: str) -> tuple[str, Path]:
    """'mood=mood.safetensors' -> ('mood', Path('mood.safetensors'))."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(text)
    return name, Path(path)


named_file.__name__ = "NAME=FILE"  # the list action's error: "expected NAME=FILE values, got"


def make_app(args: argparse.Namespace) -> tuple[Any, str]:
    """(the FastAPI app, a one-line summary) for parsed `residtap serve` arguments."""
    from residtap.serving import transformers_cb

    transformers_cb.require_supported()  # before loading anything
    try:
        from residtap.serving.server import build_app
    except ImportError as err:
        raise ImportError(f"residtap serve needs FastAPI and uvicorn ({err}); install them "
                          "with: pip install 'residtap[serve]'") from None
    from residtap.inputs import device_of
    from residtap.probes.bank import ProbeBank
    from residtap.steering.vector import SteeringVector

    for flag, pairs in (("--probe", args.probe), ("--vector", args.vector)):
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"{flag} names must be unique, got {names}")
        for name, path in pairs:
            if not path.is_file():
                raise FileNotFoundError(f"{flag} {name}={path}: no such file")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    model, tokenizer = load_model_from_args(args)
    bank = ProbeBank()
    for name, path in args.probe:
        bank.add_file(path, name=name, model=model, allow_other_weights=args.allow_other_weights)
    vectors = {name: SteeringVector.load(path, model,
                                         allow_other_weights=args.allow_other_weights)
               for name, path in args.vector}
    template = args.chat_template.read_text() if args.chat_template is not None else None
    sizes = {k: getattr(args, k) for k in CPU_SIZES}
    if device_of(model).type == "cpu":
        sizes = {k: CPU_SIZES[k] if v is None else v for k, v in sizes.items()}
    served = args.name or ("organism" if args.model == "organism" else Path(args.model).name)
    app = build_app(model, tokenizer, bank=bank, vectors=vectors, name=served,
                    chat_template=template, default_max_tokens=args.max_tokens, **sizes)
    summary = (f"serving {served!r} at http://{args.host}:{args.port}/v1 (probes: "
               f"{bank.names or 'none'}; vectors: {list(vectors) or 'none'})")
    return app, summary


def run(args: argparse.Namespace) -> int:
    app, summary = make_app(args)
    import uvicorn

    print(summary, flush=True)
    uvicorn.run(app, host=args.host, port=args.port,
                log_level="info" if getattr(args, "verbose", False) else "warning")
    return 0
