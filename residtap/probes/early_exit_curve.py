"""Tokens saved against answer accuracy when a probe ends generation early, for one probe or
several side by side.

    prompts, labels = exit_prompts(rows)     # early-exit rows: {"text", "answer", "filler_start"}
    curve = early_exit_curve(model, tok, prompts, labels, bank, "truth", [8, 4, 2],
                             classes=("false", "true"))
    best_exit(curve)                          # the threshold saving most within 0.02 accuracy
    curves = compare_exit_curves(model, tok, test_rows, {"linear": (bank, "truth"), ...},
                                 [8, 4, 2], classes=("false", "true"), choose_rows=train_rows)
    banks = exit_probes(model, tok, "early_exit.jsonl", "layers.4", "work/", sae=sae)

Any bank column can drive the exit: a linear probe, an attention probe (pooled over the whole
prefix after each token) or SAE features / a probe folded on them (residtap.probes.
bank_readouts). `compare_exit_curves` measures each probe on the same prompts, and picks each
probe's threshold on other rows (`choose_rows`, e.g. the training split) so that the chosen
point on the measured curve is an honest estimate, not the best of several tries on it.
`exit_probes` trains the three kinds side by side on one labelled set (what the demo shows).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from residtap.probes.attention_store import train_store_attention_probe
from residtap.probes.bank import ProbeBank
from residtap.probes.sweep import train_site_probe
from residtap.sae.model import SAE
from residtap.sae.store import encode_store, train_feature_probe
from residtap.store.extract import extract
from residtap.store.reader import Store

log = logging.getLogger(__name__)


class Attachable(Protocol):
    """A probe bank (residtap.probes.bank.ProbeBank), as early_exit_curve uses it."""

    def attach(self, model: nn.Module, **kwargs: Any) -> AbstractContextManager[Any]: ...


def exit_prompts(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(prompts, labels) of early-exit rows: each text up to its first filler word (token
    `filler_start`, with <bos> at 0, is word `filler_start - 1`), and its answer."""
    prompts = [" ".join(r["text"].split()[:r["filler_start"]]) for r in rows]
    return prompts, [r["answer"] for r in rows]


def best_exit(curve: Sequence[Mapping[str, Any]], tolerance: float = 0.02
              ) -> Mapping[str, Any] | None:
    """The entry of `curve` (early_exit_curve's) saving the most tokens with accuracy within
    `tolerance` of full generation's (the first entry); None if no threshold saves any."""
    good = [c for c in curve[1:] if c["accuracy"] >= curve[0]["accuracy"] - tolerance
            and c["tokens_saved_frac"] > 0]
    return max(good, key=lambda c: c["tokens_saved_frac"]) if good else None


def exit_probes(model: nn.Module, tokenizer: Any, data: Any, site: str,
                out: str | os.PathLike, *, sae: SAE | None = None,
                features: Sequence[int] | None = None, approximate_topk: bool = False,
                label: str = "label", store_last: Store | None = None,
                ) -> dict[str, tuple[ProbeBank, str]]:
    """Probes of three kinds trained on the same labelled texts (data: a JSONL path or rows with
    "text", `label` and "split"), each alone in a bank under the name "exit":
        linear     a logistic probe at `site` on each text's last token
        attention  residtap's attention probe at `site` over every token of each text
        sae        (with `sae`) a logistic probe on `features` of the SAE (at its site, last
                   token; None: all), folded into the bank (residtap.sae.features)
    Stores go under `out`; `store_last` (positions "last", holding `site` and the SAE's site)
    is reused instead of capturing one. Returns {kind: (bank, "exit")} for compare_exit_curves.
    """
    out = Path(out)
    sites = [site] + ([sae.site] if sae is not None and sae.site != site else [])
    if store_last is None or any(s not in store_last.sites for s in sites):
        store_last = extract(model, tokenizer, data, sites, out / "store-last", positions="last",
                             overwrite=True, progress=False)
    store_all = extract(model, tokenizer, data, [site], out / "store-all", positions="all",
                        overwrite=True, progress=False)
    banks = {
        "linear": ProbeBank().add_probe(train_site_probe(store_last, label, site), name="exit"),
        "attention": ProbeBank().add_probe(
            train_store_attention_probe(store_all, label, site, progress=False), name="exit"),
    }
    if sae is not None:
        feats = encode_store(store_last, sae, out / "store-sae", features=features,
                             approximate_topk=approximate_topk, overwrite=True, progress=False)
        probe = train_feature_probe(feats, label)
        banks["sae"] = ProbeBank().add_sae(sae, features, probe=probe, name="exit",
                                           approximate_topk=approximate_topk)
    return {kind: (bank, "exit") for kind, bank in banks.items()}


def compare_exit_curves(model: nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]],
                        probes: Mapping[str, tuple[Attachable, str]],
                        thresholds: Sequence[float], *, classes: tuple[str, str],
                        choose_rows: Sequence[Mapping[str, Any]] = (), tolerance: float = 0.02,
                        **kwargs: Any) -> dict[str, dict[str, Any]]:
    """For each {label: (bank, probe name)}: {"curve": early_exit_curve on `rows`, "chosen":
    the entry of that curve at the threshold `best_exit` picks on `choose_rows`' curve (None
    without choose_rows, or when no threshold qualifies there), "choice_curve"}. kwargs go to
    early_exit_curve (patience, max_new_tokens, batch_size). Full generation (threshold
    None) runs once per set of rows, shared by every probe."""
    opts = {"patience": 2, "max_new_tokens": 12, "batch_size": 32} | kwargs
    args = (classes, opts["patience"], opts["max_new_tokens"], opts["batch_size"])
    sets = {"rows": exit_prompts(rows), "choose": exit_prompts(choose_rows)}
    full: dict[str, tuple] = {}
    out: dict[str, dict[str, Any]] = {}
    for label, (bank, probe) in probes.items():
        def curve_on(which: str, bank=bank, probe=probe) -> list[dict[str, Any]]:
            prompts, labels = sets[which]
            if which not in full:
                full[which] = _curve_point(model, tokenizer, prompts, bank, probe, None, *args)
            return _curve(model, tokenizer, prompts, labels, bank, probe, thresholds, *args,
                          full=full[which])

        curve = curve_on("rows")
        entry: dict[str, Any] = {"curve": curve, "chosen": None, "choice_curve": None}
        if choose_rows:
            choice = curve_on("choose")
            best = best_exit(choice, tolerance)
            entry["choice_curve"] = choice
            if best is not None:
                entry["chosen"] = next(c for c in curve if c["threshold"] == best["threshold"])
        out[label] = entry
    return out


def early_exit_curve(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[str],
    bank: Attachable,
    probe: str,
    thresholds: Sequence[float],
    *,
    classes: tuple[str, str],
    patience: int = 2,
    max_new_tokens: int = 12,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Tokens saved vs answer accuracy when a binary probe ends generation early.

    For each prompt the model generates greedily. At threshold t a row stops once |score| > t
    for `patience` consecutive tokens and answers classes[score > 0]; a row that runs on answers
    with the last word of `classes` it wrote. The curve's first entry (threshold None) is full
    generation. tokens: tokens generated per prompt (up to and including EOS, or the stop).

    With the organism: `exit_prompts(rows)` of its early-exit set, classes ("false",
    "true"), and a truth probe at a middle layer."""
    return _curve(model, tokenizer, prompts, labels, bank, probe, thresholds, classes,
                  patience, max_new_tokens, batch_size)


def _curve(model, tokenizer, prompts, labels, bank, probe, thresholds, classes, patience,
           max_new_tokens, batch_size, full: tuple | None = None) -> list[dict[str, Any]]:
    """early_exit_curve, reusing `full` (the threshold-None run) when given."""
    if len(prompts) != len(labels) or not prompts:
        raise ValueError(
            f"expected as many labels as prompts (>= 1), got {len(prompts)} prompts and "
            f"{len(labels)} labels; pass one label per prompt"
        )
    args = (classes, patience, max_new_tokens, batch_size)
    runs = [full or _curve_point(model, tokenizer, prompts, bank, probe, None, *args)]
    runs += [_curve_point(model, tokenizer, prompts, bank, probe, t, *args) for t in thresholds]
    full_tokens = sum(runs[0][1])
    curve = []
    for threshold, (answers, used, stopped) in zip([None, *thresholds], runs, strict=True):
        correct = sum(a == y for a, y in zip(answers, labels, strict=True))
        curve.append({
            "threshold": threshold, "accuracy": correct / len(labels),
            "tokens": sum(used) / len(used),
            "tokens_saved_frac": 1 - sum(used) / max(full_tokens, 1),
            "stopped_frac": sum(stopped) / len(stopped),
        })  # fmt: skip
        log.info("early exit at threshold %s: %s", threshold, curve[-1])
    return curve


def _curve_point(model, tokenizer, prompts, bank, probe, threshold, classes, patience,
                 max_new_tokens, batch_size) -> tuple[list, list[int], list[bool]]:
    """(answers, tokens used, stopped) per prompt at one threshold (None: never stop)."""
    eos = tokenizer.eos_token_id
    answers: list[str | None] = []
    used: list[int] = []
    stopped: list[bool] = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
        with torch.no_grad(), bank.attach(model, max_tokens=max_new_tokens) as run:
            stop = None if threshold is None else run.early_exit(
                probe, threshold, patience=patience, direction="either")
            out = model.generate(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 stopping_criteria=[stop] if stop is not None else [],
                                 pad_token_id=tokenizer.pad_token_id)
            scores = run.results()[probe][..., 0]  # (b, slots)
        report = stop.report(max_new_tokens) if stop is not None else None
        for b, row in enumerate(out[:, batch["input_ids"].shape[1]:].tolist()):
            if report is not None and report.stopped[b]:
                k = report.stop_token[b]
                answers.append(classes[int(scores[b, k] > 0)])
                used.append(k + 1)
                stopped.append(True)
                continue
            n = row.index(eos) + 1 if eos in row else len(row)
            said = [w for w in tokenizer.decode(row[:n], skip_special_tokens=True).split()
                    if w in classes]
            answers.append(said[-1] if said else None)
            used.append(n)
            stopped.append(False)
    return answers, used, stopped
