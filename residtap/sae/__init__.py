"""Sparse autoencoders: SAELens's folder format read and written without SAELens, and the
maths to encode full width, encode selected features, decode, and pack features as matmul
columns for a probe bank.

    from residtap.sae import load_sae
    sae = load_sae("folder")                  # cfg.json + sae_weights.safetensors
    acts = sae.encode(h)                      # (..., d_sae)
    some = sae.encode_features(h, [3, 17])    # (..., 2) == acts[..., [3, 17]]
    pk = sae.packed([3, 17])                  # pk.activate(h @ pk.weight.T + pk.bias)

model.py holds the SAE and its maths, saelens.py the folder format and the hook-name mapping.
"""

from residtap.sae.model import SAE, PackedSAE
from residtap.sae.saelens import check_model, hook_of_site, load_sae, save_sae, site_of_hook

__all__ = ["SAE", "PackedSAE", "check_model", "hook_of_site", "load_sae", "save_sae",
           "site_of_hook"]
