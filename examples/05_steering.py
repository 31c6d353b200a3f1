"""Steering: a vector from contrastive pairs, its per-example steerability, steered text.

Run top to bottom (`python examples/05_steering.py`) or cell by cell (`# %%`).
Uses the bundled organism: its stories carry a planted mood (positive / negative), and
`mood_pairs.jsonl` holds the same story prefix with every mood word swapped.
Outputs go under $RESIDTAP_EXAMPLES_OUT (default: a fresh temporary folder).
"""

# %% Set-up: the bundled model, its steering data and a folder for outputs.
import os
import tempfile
from pathlib import Path

import residtap
from residtap import organism
from residtap.steering import compare_generations
from residtap.steering.plot import save_steerability_plot

OUT = Path(os.environ.get("RESIDTAP_EXAMPLES_OUT") or tempfile.mkdtemp(prefix="residtap-ex-"))
OUT = OUT / "05_steering"
OUT.mkdir(parents=True, exist_ok=True)

model, tok = organism.load()
# (positive, negative): the same story prefix with every mood word swapped
pairs = [(p["positive"], p["negative"]) for p in organism.read_jsonl("mood_pairs")]
ab = organism.read_jsonl("mood_ab")[:60]  # CAA-style A/B prompts; a subset keeps this quick

# %% A steering vector: the mean difference of positive minus negative at layers.3,
# read at each text's last token.
vec = residtap.SteeringVector.from_pairs(model, tok, pairs, site="layers.3")
print(vec)  # SteeringVector(site='layers.3', method='mean_diff', pairs=..., d_model=128, ...)
vec.save(OUT / "mood.safetensors")

# %% The vector added inside a `with` block (removed on exit, even on an error).
prompt = tok(["the fog"], return_tensors="pt")
with vec.apply(model, 1.0):
    steered = model.generate(**prompt, max_new_tokens=8, do_sample=False)
print("steered +1:", tok.decode(steered[0, prompt["input_ids"].shape[1]:]))

# %% Steerability: propensity (logit of the matching answer minus the other) against strength,
# per example. All strengths run as batched rows, each row with its own strength; a random
# direction of the same norm is the baseline.
result = residtap.steerability(model, tok, ab, vec, [-1.0, -0.5, 0.0, 0.5, 1.0], positions=-1)
stats = result.summary()
v, r = stats["vector"], stats["random_baseline"]
print(f"slope per unit strength: vector {v['mean']:.2f} ({100 * v['wrong_way']:.0f}% wrong way),"
      f" random direction {r['mean']:.2f}")
png = save_steerability_plot(result, OUT / "steering.png", OUT / "steering.html")[0]
print("wrote", png.name)

# %% Steered generations side by side: strength -1 (negative), 0 (unsteered), +1 (positive).
for g in compare_generations(model, tok, ["the fog", "i feel sad , and then the"], vec,
                             strengths=[-1.0, 0.0, 1.0], max_new_tokens=10):
    print(f"prompt: {g['prompt']}")
    for strength, text in g["generations"].items():
        print(f"  {strength:+.1f}: {text}")
