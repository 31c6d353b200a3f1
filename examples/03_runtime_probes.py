"""Runtime probes: a ProbeBank read inside `generate`, streamed scores, probe-driven early exit.

Run top to bottom (`python examples/03_runtime_probes.py`) or cell by cell (`# %%`).
Uses the bundled organism: a truth probe trained on `truth.jsonl` reads, while the model
writes, whether an arithmetic statement is true, before the model writes its verdict.
Outputs go under $RESIDTAP_EXAMPLES_OUT (default: a fresh temporary folder).
"""

# %% Set-up: the bundled model and a folder for outputs.
import os
import tempfile
from pathlib import Path

import torch

import residtap
from residtap import organism
from residtap.probes.sweep import sweep

OUT = Path(os.environ.get("RESIDTAP_EXAMPLES_OUT") or tempfile.mkdtemp(prefix="residtap-ex-"))
OUT = OUT / "03_runtime_probes"
OUT.mkdir(parents=True, exist_ok=True)

model, tok = organism.load()

# %% A truth probe: extract two late layers at "... that is" and keep the better probe.
store = residtap.extract(model, tok, organism.DATA_DIR / "truth.jsonl", ["layers.4", "layers.5"],
                         OUT / "store-truth", positions="last", overwrite=True, progress=False)
truth = sweep(store, "label", progress=False)
probe = truth.probes[truth.best_site]  # binary logistic: score > 0 means "true"
print(f"truth probe at {truth.best_site}: held-out accuracy {truth.score(truth.best_site):.3f}")

# %% Pack it into a ProbeBank. Any number of probes at any sites cost one matmul per site.
bank = residtap.ProbeBank().add_probe(probe, name="truth")
print(bank)

# Prompts: held-out early-exit statements cut at the first filler word ("... is six . hmm").
# The model goes on with filler words, then writes its verdict; the probe can read it earlier.
rows = [r for r in organism.read_jsonl("early_exit") if r["split"] == "test"][:8]
prompts = [" ".join(r["text"].split()[:r["filler_start"]]) for r in rows]
answers = [r["answer"] for r in rows]
batch = tok(prompts, return_tensors="pt", padding=True)
new = 10

# %% Read the bank during generate, and stream each step's scores as they are written.
seen = []
with torch.no_grad(), bank.attach(model, max_tokens=new) as run:
    live = run.streamer(lambda s: seen.append(s.scores[:, :, 0].clone()))  # (B, n, P) views
    out = model.generate(**batch, max_new_tokens=new, do_sample=False,
                         pad_token_id=tok.pad_token_id, stopping_criteria=[live])
    scores = run.results()["truth"][..., 0]  # (B, new): one score per generated token
print(f"streamed {len(seen)} updates; scores {tuple(scores.shape)} (rows, generated tokens)")
generated = out[:, batch["input_ids"].shape[1]:].tolist()
full_tokens = [row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
               for row in generated]  # tokens each row wrote, up to and including <eos>
for b in range(3):
    text = tok.decode(generated[b], skip_special_tokens=True)
    first = "true" if scores[b, 0] > 0 else "false"
    print(f"  [{answers[b]:>5}] probe at token 0 says {first:<5} | model wrote: {text}")

# %% Early exit: stop a row once |score| > 4 on one token, and answer with the probe's class.
with torch.no_grad(), bank.attach(model, max_tokens=new) as run:
    stop = run.early_exit("truth", threshold=4.0, direction="either")
    out = model.generate(**batch, max_new_tokens=new, do_sample=False,
                         pad_token_id=tok.pad_token_id, stopping_criteria=[stop])
    scores = run.results()["truth"][..., 0]
report = stop.report(new)
said = ["true" if scores[b, k] > 0 else "false" for b, k in enumerate(report.stop_token)]
hits = [s == a for s, a, st in zip(said, answers, report.stopped, strict=True) if st]
print(f"early exit: {sum(report.stopped)}/{len(rows)} rows stopped; tokens written "
      f"{sum(report.tokens_kept)} against {sum(full_tokens)} in full generation; "
      f"{sum(hits)}/{len(hits)} stopped rows answered correctly")
(OUT / "early_exit.txt").write_text(f"{report}\n", encoding="utf-8")
print("wrote", OUT / "early_exit.txt")
