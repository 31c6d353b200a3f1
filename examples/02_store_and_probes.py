"""Extract an activation store from a labelled data set, sweep probes by layer, save a probe.

Run top to bottom (`python examples/02_store_and_probes.py`) or cell by cell (`# %%`).
Uses the bundled organism and its `mood` data set (labelled texts, split by text); offline.
Outputs go under $RESIDTAP_EXAMPLES_OUT (default: a fresh temporary folder).
"""

# %% Set-up: the bundled model, its data and a folder for outputs.
import os
import tempfile
from pathlib import Path

import residtap
from residtap import organism
from residtap.probes import load_probe, save_probe
from residtap.probes.plot import write_files
from residtap.probes.sweep import sweep

OUT = Path(os.environ.get("RESIDTAP_EXAMPLES_OUT") or tempfile.mkdtemp(prefix="residtap-ex-"))
OUT = OUT / "02_store_and_probes"
OUT.mkdir(parents=True, exist_ok=True)

model, tok = organism.load()
data = organism.DATA_DIR / "mood.jsonl"  # {"text", "label", "split", ...} per line
sites = ["embed", *residtap.layer_sites(model)]  # embed, layers.0 .. layers.5

# %% Extract: run the texts once, keep every site at each text's last token.
# The store is safetensors shards plus a manifest; samples' labels travel with it.
# max_samples keeps this example quick; drop it to use the whole file.
store = residtap.extract(model, tok, data, sites, OUT / "store-mood", positions="last",
                         max_samples=200, overwrite=True, progress=False)
print(f"store: {len(store)} rows, sites {store.sites}")
print("layers.3 rows:", tuple(store["layers.3"].shape), "(rows, d_model)")

# %% Sweep: one logistic probe per site, trained on split=train, scored on split=test.
result = sweep(store, "label", progress=False)
for row in result.table():
    print(f"  {row['site']:<9} accuracy {row['accuracy']:.3f} {row['best']}")
print("best site:", result.best_site, "| chance:", result.chance)
# 'embed' is the last token's embedding alone ('was' in every text): it carries no mood,
# so its accuracy sits near chance; every block after it reads mood perfectly.

# %% Save the sweep (JSON, PNG, HTML) and the best probe as a probe file.
paths = write_files(result, OUT / "sweep")  # the sweep returns data; probes.plot writes it
probe = result.probes[result.best_site]
probe_file = save_probe(probe, OUT / "mood.safetensors", model=model)  # records the model
print("wrote", paths["json"].name, "and", Path(probe_file).name)

# %% Load it back: the file is checked against the model it was trained on.
loaded = load_probe(OUT / "mood.safetensors", model=model)
print("loaded:", loaded)  # kind, site, d_model, classes, metrics; never the weights
