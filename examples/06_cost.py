"""Probe cost: predict what a probe bank adds to inference, for a public model and ours.

Run top to bottom (`python examples/06_cost.py`) or cell by cell (`# %%`).
Predictions come from the model's config alone (no weights are loaded for a preset); the last
cell measures the organism to put a real number beside the prediction.
Outputs go under $RESIDTAP_EXAMPLES_OUT (default: a fresh temporary folder).
"""

# %% Set-up: a folder for outputs.
import json
import os
import tempfile
from pathlib import Path

from residtap import organism
from residtap.benchmark import measure_overhead, random_bank
from residtap.cost import estimate_cost, percent

OUT = Path(os.environ.get("RESIDTAP_EXAMPLES_OUT") or tempfile.mkdtemp(prefix="residtap-ex-"))
OUT = OUT / "06_cost"
OUT.mkdir(parents=True, exist_ok=True)

# %% A preset: 1000 probes at every layer of Llama-3.1-8B, read at every generated token.
# Arithmetic: probe FLOPs against the forward's. Latency: a packed bank (one matmul per site)
# against naive hooks (a Python hook and a host sync per probe), on H100 assumptions.
r = estimate_cost("Llama-3.1-8B", n_probes=1000, sites="all", positions="generated")
print(f"Llama-3.1-8B, {r.n_readouts:,} probes per token: arithmetic "
      f"{percent(r.arithmetic_overhead)}, bytes {percent(r.bytes_overhead)}")
print("  verdict:", r.verdict)

# %% The organism: a 1.6M-parameter model, where d_model is small against the whole forward.
# CPU assumptions, float32 weights, batch 8.
o = estimate_cost("organism", n_probes=100, sites="all", positions="generated", batch_size=8,
                  new_tokens=32, dtype_bytes=4, hardware="cpu")
print(f"organism, {o.n_readouts:,} probes per token: arithmetic "
      f"{percent(o.arithmetic_overhead)}, packed latency +{percent(o.packed_overhead)}")

# %% Measure it: the same bank on the real model, timed against plain generate.
# (`residtap cost organism --probes 100 --sites all --measure` does this from the shell.)
model, _ = organism.load()
measured = measure_overhead(model, random_bank(model, 100, "all"), batch_size=8,
                            new_tokens=16, repeats=2)
print(f"organism measured: packed bank {measured['packed_overhead_pct']:+.1f}% over plain "
      f"generate ({measured['baseline_s'] * 1e3:.0f} ms -> {measured['packed_s'] * 1e3:.0f} ms), "
      f"{measured['deferred_overhead_pct']:+.1f}% with defer=16")

# %% Keep both reports as JSON.
(OUT / "cost.json").write_text(json.dumps({"llama-3.1-8b": r.to_dict(),
                                           "organism": o.to_dict() | {"measured": measured}},
                                          indent=1), encoding="utf-8")
print("wrote", OUT / "cost.json")
