"""The logit lens and the tuned lens: what each layer would predict if the model stopped there.

    result = residtap.run_lens(model, tok, ["The capital of France is"], max_new_tokens=8)
    result.kl[:, 0]                        # (L, T) KL to the final layer, batch row 0
    from residtap.lens.plot import write_files
    write_files(result, "lens/")           # lens.json, lens.png, lens.html

Modules, in the order the data flows:
    capture   LogitLens, run_lens: one tap per site fills a preallocated buffer during generate
    readout   Readout, readout_of: the model's own final norm, projection, unembedding, soft-cap
    decode    decode: every captured row through the readout, in chunks, to top-k / entropy / KL
    result    LensResult: what the lens saw (tensors and their JSON form)
    tuned     TunedLens, train_tuned_lens: per-layer affine translators read through the same
              readout (Belrose et al. 2023)
    plot      PNG heatmap, self-contained HTML and lens.json; called by the command line and
              the demo, never by the modules above
"""

from residtap.lens.capture import LensCapture, LogitLens, run_lens, tokenize_left_padded
from residtap.lens.decode import DEFAULT_MEMORY_BUDGET, LensStats
from residtap.lens.readout import Readout, readout_of
from residtap.lens.result import JSON_FORMAT, LensResult
from residtap.lens.tuned import TunedLens, train_tuned_lens

__all__ = [
    "DEFAULT_MEMORY_BUDGET", "JSON_FORMAT", "LensCapture", "LensResult", "LensStats", "LogitLens",
    "Readout", "TunedLens", "readout_of", "run_lens", "tokenize_left_padded", "train_tuned_lens",
]
