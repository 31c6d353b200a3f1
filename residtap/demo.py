"""`residtap demo`: the whole story on one model, written as a self-contained HTML report.

    result = run_demo(DemoInputs.organism(), out="residtap-demo")
    result["report"]            # path of report.html

Stages, each from real runs (nothing here is a placeholder):
  1. capture   every layer at each text's last token into an on-disk store, per labelled set
  2. probes    one probe per layer and latent, held-out accuracy by layer
  3. runtime   early exit driven by probes read during generation: a linear probe, an
               attention probe and a probe on SAE features, each packed into a ProbeBank;
               tokens saved against answer accuracy, side by side
  4. lens      a logit lens of one generation, captured in the generate pass, decoded after
  5. steering  a mood vector from contrastive pairs, its per-example steerability slopes
               against a random direction of equal norm, and steered generations
  6. cost      predicted arithmetic floor vs the bank's measured time inside its own taps
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from residtap.inputs import read_jsonl
from residtap.lens import run_lens, train_tuned_lens
from residtap.report.page import Figure, Link, Report, Section
from residtap.sites import layer_sites
from residtap.steering import SteeringVector, steerability
from residtap.store.extract import extract
from residtap.store.reader import Store
from residtap.version import __version__

log = logging.getLogger(__name__)


@dataclass
class DemoInputs:
    """What the demo runs on: a model, labelled data sets, steering pairs and A/B prompts.

    labelled: {name: JSONL path} in the labelled-texts schema ({"text", "label", "split"}).
    truth: the name in `labelled` whose probe drives early exit (binary, read where the
    answer is settled but not yet written); early_exit: a JSONL of statements whose answer
    comes after filler ({"text", "answer", "filler_start"}). sae: an SAE folder whose
    `sae_features` (None: all) feed the third early-exit probe.
    pairs / ab: JSONL of {"positive", "negative"} / CAA {"question", "answer_matching_behavior",
    "answer_not_matching_behavior"}; lens_prompts and steer_prompts: short prompts."""

    model: nn.Module
    tokenizer: Any
    name: str
    labelled: dict[str, Path]
    pairs: Path | None = None
    ab: Path | None = None
    truth: str | None = None
    early_exit: Path | None = None
    lens_prompts: Sequence[str] = ()
    steer_prompts: Sequence[str] = ()
    classes: tuple[str, str] = ("false", "true")
    steer_site: str | None = None  # default: the middle layer, where steering usually works
    sae: Path | None = None
    sae_features: Sequence[int] | None = None

    @classmethod
    def organism(cls, path: str | Path | None = None) -> DemoInputs:
        from residtap import organism

        model, tok = organism.load(path=path)
        data, sae = organism.DATA_DIR, Path(organism.__file__).parent / "sae"
        found = json.loads((sae / "cfg.json").read_text())["residtap"]["latent_features"]
        features = [f["feature"] for fs in found["early_exit"].values() for f in fs]
        return cls(
            model=model, tokenizer=tok, name="residtap organism",
            labelled={k: data / f"{k}.jsonl" for k in ("mood", "topic", "truth", "early_exit")},
            pairs=data / "mood_pairs.jsonl", ab=data / "mood_ab.jsonl", truth="early_exit",
            early_exit=data / "early_exit.jsonl",
            lens_prompts=["i feel happy , and then the band"],
            steer_prompts=["the fog", "i feel sad , and then the"], sae=sae, sae_features=features)


def run_demo(inputs: DemoInputs, out: str | Path, *, max_samples: int = 600,
             progress: bool = True) -> dict[str, Any]:
    """Run every stage, write `out/report.html` and `out/summary.json`; return the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = ["capture + probes", "runtime probes", "logit lens", "steering", "cost"]
    summary: dict[str, Any] = {"model": inputs.name}
    report = Report(f"residtap demo — {inputs.name}",
                    subtitle=f"torch {torch.__version__}, residtap {__version__}")
    t0 = time.perf_counter()
    sweeps = {}
    for i, stage in enumerate(stages, 1):
        if progress:  # one line per stage and one bar at a time: no nested bars in a log
            tqdm.write(f"residtap demo [{i}/{len(stages)}] {stage}", file=sys.stderr)
        t = time.perf_counter()
        if stage == "capture + probes":
            sweeps, section = _probes(inputs, out, max_samples, progress)
            summary["probes"] = {k: _sweep_summary(s) for k, s in sweeps.items()}
        elif stage == "runtime probes":
            part, section = _early_exit(inputs, sweeps, out)
            summary.update(part or {})  # early_exit: the linear probe's curve; _by_probe: all
        elif stage == "logit lens":
            summary["lens"], section = _lens(inputs, out)
        elif stage == "steering":
            layers = layer_sites(inputs.model)
            site = inputs.steer_site or layers[len(layers) // 2]
            summary["steering"], section = _steering(inputs, site, out, progress)
        else:
            summary["cost"], section = _cost(inputs, sweeps, out)
        summary.setdefault("seconds", {})[stage] = round(time.perf_counter() - t, 2)
        if section is not None:
            report.add(section)
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    summary["report"] = str(report.write(out / "report.html"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


# -- 1 + 2: capture a store per labelled set, sweep probes by layer ---------------------------
def _probes(inputs: DemoInputs, out: Path, max_samples: int, progress: bool):
    from residtap.probes.sweep import sweep
    from residtap.report.plots import line_html, line_png

    model, tok = inputs.model, inputs.tokenizer
    sites = ["embed", *layer_sites(model)]
    sweeps = {}
    for name, path in inputs.labelled.items():
        store = extract(model, tok, path, sites, out / f"store-{name}",
                        positions="last", max_samples=max_samples, overwrite=True,
                        progress=progress)
        sweeps[name] = sweep(store, "label", progress=False)
    series = {name: [s.score(site) for site in sites] for name, s in sweeps.items()}
    plot = dict(xlabel="site", ylabel="held-out accuracy",
                title="What is decodable where: one linear probe per layer and latent")
    png = line_png(out / "probes.png", sites, series, **plot)
    line_html(out / "probes.html", sites, series, **plot, back="report.html")
    rows = [{"latent": n, "readable from": _readable_from(s), "best site": s.best_site,
             "best accuracy": s.score(s.best_site), "embed accuracy": s.score("embed"),
             "chance": s.chance} for n, s in sweeps.items()]
    readable = ", ".join(f"{r['latent']} from {r['readable from']} ({r['best accuracy']:.2f})"
                         for r in rows)
    at_chance = all(abs(r["embed accuracy"] - (r["chance"] or 0)) <= 0.05 for r in rows)
    embed = ("stays at chance" if at_chance else
             f"reaches up to {max(r['embed accuracy'] for r in rows):.2f}")
    lead = (f"Held-out accuracy of one linear probe per layer and latent: {readable}, while "
            f"the token embedding alone {embed}.")
    text = ("Each labelled set was run through the model once; every layer's residual stream at "
            "each text's last token went to an on-disk store (safetensors shards). One logistic "
            "probe per layer was trained on the train split and scored on the held-out test "
            "split (split by text). 'Readable from' is the first site within 0.02 of the "
            "latent's best accuracy. 'embed' is the token embedding alone: at the last token it "
            "carries no label, so its accuracy should be near chance.")
    return sweeps, Section(
        "Probes by layer", lead=lead, text=text, table=rows,
        links=[Link("probes.html", "interactive plot (probes.html)")],
        figures=[Figure(png, "Held-out accuracy by site, one line per latent; chance is 0.5 "
                             "for the binary latents (topic has 4 classes: 0.25).",
                        id="probe-plot")])


def _readable_from(s) -> str:
    best = s.score(s.best_site)
    return next(site for site in s.site_names if s.score(site) >= best - 0.02)


def _sweep_summary(s) -> dict[str, Any]:
    return {"best_site": s.best_site, "best_accuracy": round(s.score(s.best_site), 4),
            "embed_accuracy": round(s.score("embed"), 4), "chance": s.chance}


# -- 3: runtime probes and early exit --------------------------------------------------------
def _threshold_label(threshold: float | None) -> str:
    """How the plot and the table name a threshold: 'off' is full generation."""
    return "off" if threshold is None else f"{threshold:g}"


def _early_exit(inputs: DemoInputs, sweeps: dict, out: Path):
    from residtap.probes.early_exit_curve import compare_exit_curves, exit_probes
    from residtap.report.plots import line_png
    from residtap.sae import load_sae

    if inputs.truth is None or inputs.early_exit is None or inputs.truth not in sweeps:
        return None, None
    site, model = sweeps[inputs.truth].best_site, inputs.model
    sae = load_sae(inputs.sae, model=model) if inputs.sae is not None else None
    banks = exit_probes(model, inputs.tokenizer, inputs.labelled[inputs.truth], site,
                        out / "early-exit", sae=sae, features=inputs.sae_features,
                        approximate_topk=inputs.sae_features is not None,
                        store_last=Store.open(out / f"store-{inputs.truth}"))
    rows = read_jsonl(inputs.early_exit)
    test = [r for r in rows if r.get("split") == "test"]
    curves = compare_exit_curves(model, inputs.tokenizer, test, banks, [8.0, 6.0, 4.0, 2.0, 1.0],
                                 classes=inputs.classes, patience=1, max_new_tokens=12,
                                 choose_rows=[r for r in rows if r.get("split") == "train"][:200])
    x = [_threshold_label(c["threshold"]) for c in curves["linear"]["curve"]]
    series = {f"{kind} {what}": [c[key] for c in v["curve"]] for kind, v in curves.items()
              for what, key in (("accuracy", "accuracy"), ("tokens saved", "tokens_saved_frac"))}
    png = line_png(out / "early_exit.png", x, series, xlabel="probe threshold (|logit|); off = "
                   "full generation", ylabel="fraction (dashed: tokens saved)",
                   title="Early exit by probe kind", dashed=[k for k in series if "saved" in k])
    table = [{"probe threshold (|logit|)": label} | {
        f"{kind} {what}": fmt(v["curve"][i]) for kind, v in curves.items()
        for what, fmt in (("accuracy", lambda c: round(c["accuracy"], 3)),
                          ("saved", lambda c: _pct(c["tokens_saved_frac"], 0)))}
        for i, label in enumerate(x)]
    picks = "; ".join(_exit_pick(kind, v["chosen"]) for kind, v in curves.items())
    lead = (f"Tokens saved and answer accuracy when a probe may stop generation early, at the "
            f"threshold each probe chose on the training split: {picks}; full generation "
            f"answers with accuracy {curves['linear']['curve'][0]['accuracy']:.2f}.")
    text = ("Probes trained on the training texts (ending on the last filler word), each packed "
            f"into a ProbeBank read during generate: a logistic probe at {site} on the last "
            f"token; an attention probe at {site} over every token (after each generated token "
            "it pools the whole prefix)" + ("" if sae is None else "; a logistic probe on "
            f"{len(inputs.sae_features or []) or 'all'} SAE features at {sae.site}, folded into "
            "the bank (a matmul column per feature, the activation, one small matmul)")
            + f". Generation of {len(test)} held-out statements starts at the first filler word;"
            " a row stops once the probe's |score| passes the threshold and answers with the "
            "probe's class ('off': full generation, the model writes its verdict). Thresholds "
            "were chosen on the training split: the most tokens saved within 0.02 of full "
            "generation's accuracy there.")
    return {"early_exit": curves["linear"]["curve"], "early_exit_by_probe": curves}, \
        Section("Runtime probes and early exit", lead=lead, text=text, table=table,
                figures=[Figure(png, "Answer accuracy and tokens saved by threshold and probe "
                                     "kind; 'off' is full generation.", id="early-exit")])


def _exit_pick(kind: str, c: dict[str, Any] | None) -> str:
    return f"{kind}: no threshold qualified" if c is None else (
        f"{kind} saves {_pct(c['tokens_saved_frac'], 0)} at accuracy {c['accuracy']:.2f} "
        f"(|logit| > {_threshold_label(c['threshold'])})")


# -- 4: logit lens ---------------------------------------------------------------------------
def _lens(inputs: DemoInputs, out: Path):
    from residtap.lens.plot import heatmap_svg, write_files

    if not inputs.lens_prompts:
        return None, None
    model, tok, prompts = inputs.model, inputs.tokenizer, list(inputs.lens_prompts[:1])
    result = run_lens(model, tok, prompts, max_new_tokens=10, top_k=5)
    write_files(result, out / "lens", back="../report.html")
    real = result.attention_mask[0].bool()
    kl = result.kl[:, 0][:, real].mean(dim=1)  # (L,)
    rows = [{"site": s, "mean KL to final (nats)": round(float(v), 4),
             "mean entropy (nats)": round(float(e), 4)}
            for s, v, e in zip(result.sites, kl, result.entropy[:, 0].mean(dim=1), strict=True)]
    text = ("Every layer's residual stream was captured into preallocated buffers during one "
            "generate call with the KV cache, then decoded afterwards in chunked batches through "
            "the model's own final norm and unembedding, with full-vocabulary probabilities.")
    summary = {"sites": result.sites, "kl_by_layer": [r["mean KL to final (nats)"] for r in rows]}
    tuned_clause = ""
    if inputs.labelled:  # a tuned lens, trained on every position of the first labelled set
        name, data = next(iter(inputs.labelled.items()))
        t = time.perf_counter()
        store = extract(model, tok, data, "all-layers", out / "store-tuned-lens",
                        positions="all", max_samples=200, overwrite=True,
                        progress=False)
        tuned = train_tuned_lens(model, store, steps=150)
        seconds = time.perf_counter() - t
        tuned_result = run_lens(model, tok, prompts, max_new_tokens=10, top_k=5,
                                translators=tuned)
        tuned_kl = tuned_result.kl[:, 0][:, real].mean(dim=1)
        for row, v in zip(rows, tuned_kl, strict=True):
            row["tuned lens KL (nats)"] = round(float(v), 4)
        summary["tuned_kl_by_layer"] = [r["tuned lens KL (nats)"] for r in rows]
        text += (f" A tuned lens (one affine translator per layer, trained on {len(store)} "
                 f"positions of {name!r} in {seconds:.0f} s, checked on held-out texts) reads "
                 "each layer through a learned translation instead of the raw residual stream.")
        tuned_clause = (f", and a tuned lens reads {rows[0]['site']} at "
                        f"{rows[0]['tuned lens KL (nats)']:.2f}")
    first, before_last = rows[0], rows[-2] if len(rows) > 1 else rows[0]
    lead = (f"What each layer would predict as the next token if the model stopped there: KL "
            f"to the final prediction falls from {first['mean KL to final (nats)']:.2f} nats "
            f"at {first['site']} to {before_last['mean KL to final (nats)']:.3f} at "
            f"{before_last['site']}{tuned_clause}.")
    caption = ("Rows: sites, last layer on top; columns: input tokens (generated ones in red). "
               "Each cell is the logit lens's top-1 guess for the next token, bold where it is "
               "the token that came next; colour: its probability. Hover a cell for its top-5.")
    links = [Link("lens/lens.html", "interactive lens (lens/lens.html)"),
             Link("lens/lens.png", "heatmap PNG"), Link("lens/lens.json", "data (JSON)")]
    figure = Figure(svg=heatmap_svg(result, 0, "prob", chars=6), caption=caption,
                    id="lens-heatmap")
    return summary, Section("Logit lens", lead=lead, text=text, table=rows, links=links,
                            figures=[figure])


# -- 5: steering -----------------------------------------------------------------------------
def _steering(inputs: DemoInputs, site: str, out: Path, progress: bool):
    from residtap.steering.generation import compare_generations
    from residtap.steering.plot import reading, save_steerability_plot

    if inputs.pairs is None or inputs.ab is None:
        return None, None
    pairs = [(p["positive"], p["negative"]) for p in read_jsonl(inputs.pairs)]
    vec = SteeringVector.from_pairs(inputs.model, inputs.tokenizer, pairs, site=site)
    strengths = [-1.0, -0.5, 0.0, 0.5, 1.0]
    result = steerability(inputs.model, inputs.tokenizer, read_jsonl(inputs.ab), vec,
                          strengths, positions=-1, progress=progress)
    png = save_steerability_plot(result, out / "steering" / "steering.png",
                                 out / "steering" / "steering.html", back="../report.html")[0]
    stats = result.summary()
    gens = compare_generations(inputs.model, inputs.tokenizer, list(inputs.steer_prompts), vec,
                               strengths=[-1.0, 0.0, 1.0], max_new_tokens=10)
    text = (f"A mood vector (mean difference of {len(pairs)} contrastive pairs at {site}, norm "
            f"{vec.norm:.1f}) was added after each prompt. A whole sweep of strengths ran as "
            "batched rows, each row with its own strength. Per-example slopes of propensity "
            "(logit of the matching answer minus the other) against strength are compared "
            "with a random direction of the same norm. Below the table: generations from the "
            "same prompts at strengths -1, 0 and +1.")
    keys = {"mean": "mean slope", "std": "std", "median": "median", "iqr": "IQR",
            "wrong_way": "wrong way", "mean_curve_r2": "R² of mean curve"}
    rows = [{"direction": name.replace("_", " "),
             **{label: round(stats[name][k], 4) for k, label in keys.items()},
             "wrong way": _pct(stats[name]["wrong_way"], 0)}  # as the lead says it
            for name in ("vector", "random_baseline") if name in stats]
    v, r = stats["vector"], stats.get("random_baseline")
    lead = (f"How far the mood vector moves the model's A/B answer per unit of strength: mean "
            f"slope {v['mean']:.2f} logits ({_pct(v['wrong_way'], 0)} of examples the wrong "
            "way)")
    if r is not None:
        by_direction = abs(v["mean"]) > 3 * abs(r["mean"]) and v["wrong_way"] < 0.1
        lead += (f" against {r['mean']:.2f} for a random direction of the same norm, so "
                 + ("the effect comes from the direction, not from the size of the push"
                    if by_direction else "the vector is not clearly better than a random push"))
    return {"site": site, **stats}, Section(
        "Steering", lead=lead + ".", text=text, table=rows, pre=_format_generations(gens),
        links=[Link("steering/steering.html", "steering page (steering/steering.html)")],
        figures=[Figure(png, reading(result), id="steering-curve")])


def _format_generations(gens: list[dict[str, Any]]) -> str:
    """Steered generations side by side, one block per prompt."""
    lines = []
    for g in gens:
        lines.append(f"prompt: {g['prompt']}")
        for strength, text in sorted(g["generations"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"  strength {float(strength):+.1f}: {text}")
    return "\n".join(lines)


# -- 6: cost ---------------------------------------------------------------------------------
def _cost(inputs: DemoInputs, sweeps: dict, out: Path):
    from residtap.benchmark.reference import random_bank
    from residtap.cost import estimate_cost

    model, tok = inputs.model, inputs.tokenizer
    n_layers = len(layer_sites(model))
    bank = random_bank(model, 100, "all")  # 100 probes per layer, as a monitor would run
    prompt = list(inputs.lens_prompts[:1]) or ["hello"]
    batch = tok(prompt * 8, return_tensors="pt", padding=True)
    new = 32
    kwargs = dict(max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id,
                  min_new_tokens=new)
    with torch.no_grad():
        model.generate(**batch, **kwargs)  # warm-up
        t = time.perf_counter()
        with bank.attach(model, max_tokens=new, timed=True) as run:
            model.generate(**batch, **kwargs)
        gen_s = time.perf_counter() - t
    predicted = estimate_cost(model.config.to_dict(), n_probes=100, sites="all",
                              positions="generated", batch_size=8, new_tokens=new,
                              dtype_bytes=4, hardware="cpu").to_dict()
    inside = run.tap_seconds / gen_s
    floor = predicted.get("arithmetic_overhead")
    rows = [
        {"quantity": "probes read per token", "value": 100 * n_layers},
        {"quantity": "arithmetic floor (probe FLOPs / forward FLOPs)", "value": _pct(floor)},
        {"quantity": "bytes overhead (predicted)", "value": _pct(predicted.get("bytes_overhead"))},
        {"quantity": "time inside residtap's bank taps / generate (measured)",
         "value": _pct(inside)},
        {"quantity": "generate seconds (batch 8, 32 new tokens, measured)",
         "value": round(gen_s, 3)},
    ]
    lead = (f"What runtime probes cost on this model: {100 * n_layers} probes per token have an "
            f"arithmetic floor of {_pct(floor, 2)} of the forward's FLOPs, and "
            f"{_pct(inside, 2)} of generate time was measured inside residtap's taps")
    if isinstance(floor, (int, float)) and inside > floor:
        lead += (", above the floor: on a model this small the per-layer hook call weighs more "
                 "than the arithmetic")
    text = ("The arithmetic floor is the probes' FLOPs against the forward's; the measured "
            "number is the time spent inside residtap's own packed-probe taps during one "
            "generate call. On a model this small (a few million parameters) a forward takes "
            "milliseconds, so the fixed cost of one Python hook call per layer is comparable to "
            "the probe arithmetic; on models of practical size it is negligible against the "
            "forward. bench/ and BENCHMARKS.md hold the side-by-side comparison with naive "
            "per-probe hooks on a larger model.")
    summary = {"predicted": predicted, "measured_inside_fraction": inside, "generate_s": gen_s}
    return summary, Section("Cost", lead=lead + ".", text=text, table=rows, id="cost-table")


def _pct(v: Any, digits: int = 3) -> str:
    return f"{100 * v:.{digits}f}%" if isinstance(v, (int, float)) else str(v)
