r"""`residtap lens MODEL --prompt TEXT --max-new-tokens N --out DIR`: logit lens of a generation.

Writes lens.json (every statistic), lens.png (heatmap of one batch row; needs matplotlib) and
lens.html (self-contained, hover for the top-k) into DIR, and prints a per-site summary.
With `--tuned FILE` the sites it has translators for decode through them (the tuned lens).

`residtap tuned-lens MODEL --store DIR --out FILE`: train that file from a store of block
outputs (see residtap.lens.tuned); prints each site's held-out KL with and without it.

examples:
  residtap lens organism --prompt "the cook" --prompt "today i am sad , and then the coach" \
      --max-new-tokens 8 --out lens/
  residtap capture organism --data organism:mood --sites all-layers \
      --positions all --max-samples 100 --out lens-acts/
  residtap tuned-lens organism --store lens-acts/ --steps 100 --out tuned.safetensors
  residtap lens organism --prompt "the cook" --tuned tuned.safetensors --out tuned-lens/ --json
"""

from __future__ import annotations

import logging

import torch

from residtap.cli.common import (
    MODEL_HELP,
    add_allow_other_weights,
    add_json_flag,
    add_model_flags,
    add_out,
    add_progress_flag,
    check_out,
    command_help,
    emit_json,
    format_table,
    load_model_from_args,
    progress,
)
from residtap.lens import LensResult, TunedLens, run_lens, train_tuned_lens
from residtap.lens.plot import write_files

log = logging.getLogger(__name__)


def register(sub) -> None:
    doc = command_help(__doc__)
    p = sub.add_parser("lens", help="logit lens over prompts and their greedy continuation",
                       **doc)
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt; repeat for a batch (left-padded; commas stay in the text)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (16)")
    add_out(p, "folder", "lens.json, lens.png and lens.html")
    p.add_argument("--top-k", type=int, default=5, help="tokens kept per cell (5)")
    p.add_argument("--sublayers", action="store_true", help="also lens attn and mlp outputs")
    p.add_argument("--color", choices=("prob", "kl"), default="prob",
                   help="colour cells by top-1 probability or by KL to the final layer")
    p.add_argument("--row", type=int, default=0, help="batch row drawn in lens.png (0)")
    p.add_argument("--memory-budget-mb", type=int, default=256,
                   help="work space for the deferred decode, MiB (256)")
    p.add_argument("--tuned", default=None, metavar="FILE",
                   help="a tuned-lens file (from `residtap tuned-lens`): decode through it")
    add_allow_other_weights(p)
    add_model_flags(p)
    add_progress_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)

    t = sub.add_parser("tuned-lens", help="train tuned-lens translators from a store", **doc)
    t.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    t.add_argument("--store", required=True, help="a store of block outputs incl. the last")
    add_out(t, "file", "the tuned lens (.safetensors)")
    t.add_argument("--steps", type=int, default=300, help="Adam steps (300)")
    t.add_argument("--batch-size", type=int, default=256, help="rows per step (256)")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate (1e-3)")
    add_model_flags(t)
    add_progress_flag(t)
    add_json_flag(t)
    t.set_defaults(func=run_train)


def site_summary(result: LensResult) -> list[dict]:
    """Per site, over real positions: mean entropy, mean KL to the final layer, and how often
    the top-1 guess is the token that came next."""
    real = result.attention_mask.bool()  # (B, T)
    known = real & (result.actual_rank[0] >= 0)
    rows = []
    for i, site in enumerate(result.sites):
        rows.append({
            "site": site,
            "entropy": round(float(result.entropy[i][real].mean()), 4),
            "kl_to_final": round(float(result.kl[i][real].mean()), 4),
            "top1_is_next": round(float((result.actual_rank[i][known] == 0).float().mean()), 4),
        })
    return rows


def run(args) -> int:
    if args.max_new_tokens < 0 or args.top_k < 1 or args.memory_budget_mb < 1:
        raise ValueError(
            "expected --max-new-tokens >= 0, --top-k >= 1 and --memory-budget-mb >= 1; got "
            f"{args.max_new_tokens}, {args.top_k}, {args.memory_budget_mb}"
        )
    check_out(args.out, "folder")
    model, tokenizer = load_model_from_args(args)
    tuned = (TunedLens.load(args.tuned, model, allow_other_weights=args.allow_other_weights)
             if args.tuned else None)
    with torch.no_grad():
        result = run_lens(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                          top_k=args.top_k, sublayers=args.sublayers,
                          memory_budget=args.memory_budget_mb * 2**20,
                          progress=progress(args), translators=tuned)
    paths = write_files(result, args.out, row=args.row, color=args.color)
    summary = site_summary(result)
    generated = [tokenizer.decode(row[result.prompt_length:])
                 for row in result.sequences.tolist()]
    if args.json:
        emit_json({
            "model": args.model,
            "files": {k: str(v) for k, v in paths.items()},
            "shape": dict(zip("LBTk", result.topk_ids.shape, strict=True)),
            "generated": generated,
            "sites": summary,
        })
        return 0
    for b, text in enumerate(generated):
        print(f"row {b} generated: {text!r}")
    print(format_table(summary, ["site", "entropy", "kl_to_final", "top1_is_next"]))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def run_train(args) -> int:
    check_out(args.out, "file")
    model, _ = load_model_from_args(args, tokenizer=False)
    tuned = train_tuned_lens(model, args.store, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, progress=progress(args))
    path = tuned.save(args.out)
    rows = [{"site": s, **{k: round(v, 5) if isinstance(v, float) else v for k, v in m.items()}}
            for s, m in tuned.metrics.items()]
    if args.json:
        emit_json({"file": str(path), "sites": rows})
        return 0
    print(format_table(rows, ["site", "logit_lens_kl", "tuned_lens_kl", "held_out_rows"]))
    print(f"wrote {path}")
    return 0
