"""Capture activations at canonical sites, across `generate`, and stop a forward early.

Run top to bottom (`python examples/01_capture.py`) or cell by cell (`# %%`) in an editor.
Uses the bundled organism (a 6-layer, d_model 128 Llama); offline, a few seconds on a CPU.
Outputs go under $RESIDTAP_EXAMPLES_OUT (default: a fresh temporary folder).
"""

# %% Set-up: the bundled model, its tokenizer and a folder for outputs.
import os
import tempfile
from pathlib import Path

import torch

import residtap
from residtap import organism

OUT = Path(os.environ.get("RESIDTAP_EXAMPLES_OUT") or tempfile.mkdtemp(prefix="residtap-ex-"))
OUT = OUT / "01_capture"
OUT.mkdir(parents=True, exist_ok=True)

model, tok = organism.load()  # offline, eval mode, float32
texts = ["i feel happy , and then the band", "the fog dreaded the storm ."]
batch = tok(texts, return_tensors="pt", padding=True)  # the organism pads on the left
print("sites of this model:", residtap.site_names(model)[:8], "...")

# %% Canonical sites: the same names work on every supported architecture.
# positions="last" keeps each row's last real token, so left padding does not matter.
with torch.no_grad(), residtap.capture(model, ["embed", "layers.3", "logits"],
                                       positions="last") as acts:
    model(**batch)
h3 = acts["layers.3"]  # (B, d_model) = (2, 128)
print("layers.3 at the last token:", tuple(h3.shape))
print(acts)  # every site with its shape, the runs and forwards; never the values

# The canonical names line up with Hugging Face's own hidden_states:
# embed == hidden_states[0] and layers.i == hidden_states[i + 1].
with torch.no_grad():
    hf = model(**batch, output_hidden_states=True).hidden_states
assert torch.allclose(h3, hf[4][:, -1], atol=1e-5), "layers.3 should equal hidden_states[4]"

# %% Positions: "all" keeps every position; per_sequence drops each row's pads.
with torch.no_grad(), residtap.capture(model, ["layers.1"], positions="all") as acts:
    model(**batch)
lengths = [t.shape[0] for t in acts.per_sequence("layers.1")]  # list of (n_tokens_b, d_model)
print("layers.1, all positions:", tuple(acts["layers.1"].shape), "real tokens per row:", lengths)

# %% Across generate: the prefill and every decode step, joined along time per sequence.
new = 8
with torch.no_grad(), residtap.capture(model, ["layers.5"]) as acts:
    out = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=tok.pad_token_id)
T = batch["input_ids"].shape[1] + new - 1  # the last new token is never fed back
assert acts["layers.5"].shape[1] == T, (acts["layers.5"].shape, T)
print("generate:", tok.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                    skip_special_tokens=True))
print("layers.5 across generate:", tuple(acts["layers.5"].shape), "(B, prompt + new - 1, d)")

# %% Early stop: reading layers.1 only needs the first two blocks.
# The forward is cut right after the deepest site asked for; the model produces no output.
with torch.no_grad(), residtap.capture(model, ["layers.1"], positions="last",
                                       stop_early=True) as acts:
    model(**batch)
assert torch.allclose(acts["layers.1"], hf[2][:, -1], atol=1e-5)
print("early stop: layers.1 read without running blocks 2-5")

# %% Save what we captured (plain torch file) to show where outputs go.
torch.save({"layers.3_last": h3}, OUT / "layers3_last.pt")
print("wrote", OUT / "layers3_last.pt")
