"""`residtap sites MODEL`: a model's canonical sites, their modules and shapes, how each part
was found (the architecture table, or discovered from the module structure) and that it was
validated against the model's own hidden states and logits; parts refused, with the reason.

The names are what every other command takes as --sites / --site.

examples:
  residtap sites organism
  residtap sites organism --json
"""

from __future__ import annotations

import torch

from residtap.capture import capture
from residtap.cli.common import (
    MODEL_HELP,
    add_json_flag,
    add_model_flags,
    command_help,
    emit_json,
    format_table,
    load_model_from_args,
)
from residtap.inputs import device_of
from residtap.sites import SUBLAYERS, finding, resolve_site, site_names


def register(sub) -> None:
    p = sub.add_parser("sites", help="list a model's sites with their shapes",
                       **command_help(__doc__))
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    add_model_flags(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def describe_sites(model, tokenizer=None) -> list[dict]:
    """One row per canonical site: name, module path, hook kind, shape and dtype for a
    (1, 4)-token input, how its part was found and its validation."""
    names = site_names(model)
    found = finding(model)
    ids = torch.tensor([[1, 2, 3, 4]]) % model.config.vocab_size
    with torch.no_grad(), capture(model, names) as acts:
        model(input_ids=ids.to(device_of(model)))
    rows = []
    for name in names:
        site = resolve_site(model, name)
        t = acts[name]
        part = _part(name)
        rows.append({
            "site": name,
            "module": site.path or "(model output)",
            "reads": f"{site.field}" if site.field else f"module {site.hook}",
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "found": found.origin,
            "check": found.checks.get(part, "validated"),
        })
    return rows


def refused_parts(model) -> dict[str, str]:
    """Parts this model does not have or that validation refused: part -> why."""
    found = finding(model)
    parts = ["norm", *SUBLAYERS, "logits", "embed", "layers"]
    return {p: found.refusal(p) for p in parts if not found.usable(p)}


def _part(name: str) -> str:
    if name.startswith("layers."):
        rest = name.split(".")
        return rest[2] if len(rest) > 2 else "layers"
    return name


def run(args) -> int:
    model, tokenizer = load_model_from_args(args, tokenizer=False)
    rows = describe_sites(model, tokenizer)
    refused = refused_parts(model)
    origin = finding(model).origin
    if args.json:
        emit_json({"model": args.model, "class": type(model).__name__, "parts": origin,
                   "sites": rows, "refused": refused})
        return 0
    print(f"{type(model).__name__}: {len(rows)} sites (parts {origin}; shapes for a 1 x "
          "4-token input)")
    print(format_table(rows, ["site", "module", "reads", "shape", "dtype", "found", "check"]))
    for part, why in refused.items():
        print(f"no {part}: {why}")
    return 0
