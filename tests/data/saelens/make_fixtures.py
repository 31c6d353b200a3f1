"""Write the SAELens-made fixtures that tests/test_sae.py reads (needs the sae-lens package).

    python -m venv --system-site-packages /tmp/sl && /tmp/sl/bin/pip install sae-lens
    /tmp/sl/bin/python tests/data/saelens/make_fixtures.py

Each folder is written by SAELens's own `save_model` (v6 layout) or, for `pre6_topk`, is an
old flat cfg.json that SAELens's own loader reads; `expected.safetensors` in each holds inputs
`x` (32, 8) and what SAELens computed: `acts` = sae.encode(x), `out` = sae(x) (encode then
decode, with the row statistics of a per-row normalisation).
"""

import json
import shutil
from pathlib import Path

import sae_lens
import torch
from sae_lens.saes import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from safetensors.torch import save_file

HERE = Path(__file__).parent
D_IN, D_SAE = 8, 24


def randomise(sae, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name != "threshold" else 0.3))
            if name == "threshold":
                p.abs_()
    return sae


def write(name, sae, seed, hook_name=None):
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name
        sae.cfg.metadata.model_name = "gpt2-small"
    sae.save_model(folder)
    finish(name, sae, seed)


def finish(name, sae, seed):
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(100 + seed)) * 2
    with torch.no_grad():
        acts = sae.encode(x)
        out = sae(x)
    save_file({"x": x, "acts": acts.contiguous(), "out": out.contiguous()},
              HERE / name / "expected.safetensors",
              metadata={"sae_lens_version": sae_lens.__version__})


write("standard", randomise(StandardSAE(StandardSAEConfig(D_IN, D_SAE)), 1), 1,
      "blocks.3.hook_resid_post")
write("jumprelu", randomise(JumpReLUSAE(JumpReLUSAEConfig(D_IN, D_SAE)), 2), 2,
      "blocks.0.hook_resid_pre")
write("topk", randomise(TopKSAE(TopKSAEConfig(D_IN, D_SAE, k=4)), 3), 3)
write("topk_rescaled", randomise(TopKSAE(TopKSAEConfig(
    D_IN, D_SAE, k=5, rescale_acts_by_decoder_norm=True)), 4), 4)
write("no_b_dec_input", randomise(StandardSAE(StandardSAEConfig(
    D_IN, D_SAE, apply_b_dec_to_input=False)), 5), 5)
write("layer_norm", randomise(StandardSAE(StandardSAEConfig(
    D_IN, D_SAE, normalize_activations="layer_norm")), 6), 6)
write("constant_norm_rescale", randomise(JumpReLUSAE(JumpReLUSAEConfig(
    D_IN, D_SAE, normalize_activations="constant_norm_rescale")), 7), 7)

# An old (SAELens < 6) flat cfg.json, as SAELens's own loader reads it.
name = "pre6_topk"
folder = HERE / name
shutil.rmtree(folder, ignore_errors=True)
folder.mkdir()
src = randomise(TopKSAE(TopKSAEConfig(D_IN, D_SAE, k=3)), 8)
save_file({k: v.detach().contiguous() for k, v in src.state_dict().items()},
          folder / "sae_weights.safetensors")
(folder / "cfg.json").write_text(json.dumps({
    "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
    "device": "cpu", "model_name": "gpt2-small", "hook_point": "blocks.2.hook_resid_pre",
    "hook_point_layer": 2, "hook_point_head_index": None, "activation_fn_str": "topk",
    "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True,
    "normalize_activations": False, "context_size": 128, "prepend_bos": True,
}, indent=2))
loaded = sae_lens.SAE.load_from_disk(folder)
assert loaded.cfg.architecture() == "topk" and loaded.cfg.k == 3
finish(name, loaded, 8)
print("wrote", sorted(p.name for p in HERE.iterdir() if p.is_dir()))
