"""residtap: read, probe, lens and steer a transformer's activations inside its own forward pass.

    import residtap
    with residtap.capture(model, ["layers.3", "logits"]) as acts:
        model(**batch)
    acts["layers.3"]            # (B, T, d_model), the residual stream after block 3
"""

from residtap.capture import Activations, capture
from residtap.engine import Step, StopForward, tap
from residtap.lens import LensResult, LogitLens, TunedLens, run_lens, train_tuned_lens
from residtap.probes.bank import ProbeBank
from residtap.sites import ARCHITECTURES, Arch, layer_sites, resolve_site, site_names
from residtap.steering import SteerabilityResult, SteeringVector, steer, steerability
from residtap.store import Store, extract
from residtap.version import __version__  # noqa: F401  (one definition, in version.py)

__all__ = [
    "ARCHITECTURES", "Activations", "Arch", "Step", "StopForward", "capture", "layer_sites",
    "resolve_site", "site_names", "tap",
]
__all__ += ["Store", "extract"]
__all__ += ["LensResult", "LogitLens", "run_lens"]
__all__ += ["SteerabilityResult", "SteeringVector", "steer", "steerability"]
__all__ += ["ProbeBank"]
__all__ += ["TunedLens", "train_tuned_lens"]
