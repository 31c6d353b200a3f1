"""Representation similarity between activations: linear CKA (biased, debiased, streaming),
SVCCA and PWCCA, of tensors in memory or of two stores on disk.

    from residtap.analysis import layer_similarity, store_similarity
    sim = layer_similarity(acts_model_a, acts_model_b, method="cka")   # dicts of (N, d) tensors
    sim[i, j]   # similarity of the i-th site of acts_model_a and the j-th of acts_model_b
    store_similarity("acts_a/", "acts_b/").matrix   # the same for two aligned stores, streamed

All inputs are (rows, features) tensors or arrays whose rows are the same inputs in the same
order (e.g. the same tokens of the same texts); computation is in float64.

cka.py (linear CKA, streaming `LinearCKA`), cca.py (SVCCA, PWCCA), similarity.py (site x site
over dicts of tensors), compare.py (site x site over two stores: `residtap compare`).
"""

from .cca import ConstantActivationsError, canonical_correlations, pwcca, svcca
from .cka import LinearCKA, linear_cka
from .compare import StoreSimilarity, check_aligned, store_similarity
from .similarity import METHODS, Method, layer_similarity, warn_undefined

__all__ = [
    "METHODS",
    "ConstantActivationsError",
    "LinearCKA",
    "Method",
    "StoreSimilarity",
    "canonical_correlations",
    "check_aligned",
    "layer_similarity",
    "linear_cka",
    "pwcca",
    "store_similarity",
    "svcca",
    "warn_undefined",
]
