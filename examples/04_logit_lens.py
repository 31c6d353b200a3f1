"""Logit lens over a whole generation, captured in the one `generate` call the model runs.

Run top to bottom (`python examples/04_logit_lens.py`) or cell by cell (`# %%`).
Uses the bundled organism; offline, a few seconds on a CPU.
Outputs go under $RESIDTAP_EXAMPLES_OUT (default: a fresh temporary folder).
"""

# %% Set-up: the bundled model and a folder for outputs.
import os
import tempfile
from pathlib import Path

import residtap
from residtap import organism
from residtap.lens.plot import write_files

OUT = Path(os.environ.get("RESIDTAP_EXAMPLES_OUT") or tempfile.mkdtemp(prefix="residtap-ex-"))
OUT = OUT / "04_logit_lens"
OUT.mkdir(parents=True, exist_ok=True)

model, tok = organism.load()

# %% Run the lens: every block's output is copied into a preallocated buffer while generate
# runs (KV cache on), then decoded afterwards through the model's own final norm and
# unembedding, with full-vocabulary probabilities.
result = residtap.run_lens(model, tok, ["i feel happy , and then the band"], max_new_tokens=10,
                           top_k=5)
L, B, T, k = result.topk_ids.shape  # (layers, rows, positions, top-k)
print(f"lens: {L} layers x {T} positions, top-{k}; sites {result.sites}")

# %% Read it: the top-1 guess of each layer at the last prompt token ("band" -> a verb).
pos = result.prompt_length - 1
for i, site in enumerate(result.sites):
    top = int(result.topk_ids[i, 0, pos, 0])
    p = float(result.topk_probs[i, 0, pos, 0])
    kl = float(result.kl[i, 0, pos])
    print(f"  {site:<9} top-1 {result.text(top)!r:<12} p={p:.2f}  KL to final {kl:.2f} nats")
# The last layer's lens is the model's own prediction (KL 0): that is a residtap test.

# %% Save the heatmap (PNG), the interactive page (HTML) and the numbers (JSON): the lens
# returns data, residtap.lens.plot draws it.
paths = write_files(result, OUT)
print("wrote", ", ".join(p.name for p in paths.values()), "in", OUT)
