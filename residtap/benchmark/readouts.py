"""What attention probes and SAE features cost during greedy decode, measured side by side.

    result = bench_readouts(ReadoutConfig(model="organism"))    # the bundled model
    result = bench_readouts(ReadoutConfig(model="reference"))   # the random 8-layer Llama
    result = bench_readouts(ReadoutConfig.quick())              # a tiny model, seconds

Two banks, each at the model's middle layer, each attached read every step ("packed") and with
`defer` ("deferred": decode steps staged, read `defer` at a time; scores identical):
    attention  `attention_probes` binary attention probes of `heads` heads (random weights,
               position slopes on): heads + heads columns each
    sae        `sae_features` features of an SAE: the organism's own TopK SAE (a subset, so read
               as relu of the pre-activation: residtap.sae.features), or for the reference model
               a random ReLU SAE of `reference_d_sae` features
Per repeat and batch size, every (bank, mode) runs as an ABBA block against the baseline (no
bank): baseline, variant, variant, baseline, the variants taking turns to go first, as in
residtap.benchmark.probes. One more block, the control ("none", "a/a"), times the baseline in
the variant's place: its "overhead" is this machine's noise in the same run. Overhead is the
median over repeats of the block's variant / baseline time - 1, with its 25th-75th
percentiles; `handler` is the time inside residtap's hooks (`residtap.engine.timing`, with the
deferred run's final flush) over the variant's generate time. Targets (issue #17): overhead
<= 3%, handlers <= 2%.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from residtap.benchmark.probes import progress_bar, quartiles, time_variant, torch_threads
from residtap.benchmark.reference import reference_model
from residtap.probes.attention import AttentionProbe
from residtap.probes.bank import ProbeBank
from residtap.sae.model import SAE
from residtap.sites import layer_sites

log = logging.getLogger(__name__)

MODES = ("packed", "deferred")
BANKS = ("attention", "sae")
TARGETS = {"overhead_pct": 3.0, "handler_pct": 2.0}
CONTROL = ("none", "a/a")  # the baseline timed in a variant's place: the run's own noise


@dataclass
class ReadoutConfig:
    model: Literal["organism", "reference", "tiny"] = "organism"
    batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 64
    prompt_len: int = 16
    repeats: int = 5
    threads: int = 1
    seed: int = 0
    defer: int = 16
    attention_probes: int = 8
    heads: int = 4
    sae_features: int = 100
    reference_d_sae: int = 4096

    @classmethod
    def quick(cls) -> ReadoutConfig:
        return cls(model="tiny", batches=(1, 2), new_tokens=4, prompt_len=6, repeats=2,
                   attention_probes=2, heads=2, sae_features=8, reference_d_sae=64)


def load_model(cfg: ReadoutConfig) -> tuple[nn.Module, SAE]:
    """The model and the SAE the `sae` bank reads (module docstring)."""
    if cfg.model == "organism":
        from residtap import organism
        from residtap.sae.saelens import load_sae

        model, _ = organism.load()
        return model, load_sae(Path(organism.__file__).parent / "sae", model=model)
    if cfg.model == "reference":
        model = reference_model(max_positions=cfg.prompt_len + cfg.new_tokens + 8,
                                seed=cfg.seed)
    elif cfg.model == "tiny":
        model = reference_model(layers=2, d_model=64, intermediate=128, heads=4, vocab=256,
                                max_positions=cfg.prompt_len + cfg.new_tokens + 8, seed=cfg.seed)
    else:
        raise ValueError(f"model must be 'organism', 'reference' or 'tiny', got {cfg.model!r}")
    return model, random_sae(model.config.hidden_size, cfg.reference_d_sae,
                             middle_site(model), cfg.seed)


def middle_site(model: nn.Module) -> str:
    sites = layer_sites(model)
    return sites[len(sites) // 2]


def random_sae(d_in: int, d_sae: int, site: str, seed: int = 0) -> SAE:
    """A random ReLU SAE of the given width (unit-norm decoder rows, W_enc = W_decᵀ)."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return SAE(W_enc=W_dec.T.contiguous(), b_enc=-0.1 * torch.rand(d_sae, generator=g),
               W_dec=W_dec, b_dec=torch.zeros(d_in), site=site)


def readout_banks(model: nn.Module, sae: SAE, cfg: ReadoutConfig) -> dict[str, ProbeBank]:
    """{"attention": ..., "sae": ...}: the two banks of the module docstring."""
    site, d = middle_site(model), model.config.hidden_size
    g = torch.Generator().manual_seed(cfg.seed)
    attention = ProbeBank()
    for i in range(cfg.attention_probes):
        attention.add_probe(AttentionProbe(
            query=torch.randn(cfg.heads, d, generator=g) / d**0.5,
            position_weight=0.1 * torch.randn(cfg.heads, generator=g),
            value=torch.randn(cfg.heads, 1, d, generator=g) / d**0.5,
            bias=torch.zeros(1), classes=[False, True], site=site), name=f"attention{i}")
    features = torch.randperm(sae.d_sae, generator=g)[:cfg.sae_features].sort().values
    approximate = sae.architecture == "topk" and cfg.sae_features < sae.d_sae
    banks = {"attention": attention,
             "sae": ProbeBank().add_sae(sae, features, name="sae", approximate_topk=approximate)}
    for bank in banks.values():
        bank.layout(model)  # pack once, outside the timings (attach reuses it)
    return banks


def _time(model: nn.Module, bank: str, mode: str, banks: dict[str, ProbeBank], ids: Tensor,
          cfg: ReadoutConfig) -> dict[str, float]:
    """One timed generate of a variant; the control's handler times are 0 (nothing attached)."""
    if (bank, mode) == CONTROL:
        return {**time_variant(model, "baseline", None, ids, cfg.new_tokens),
                "handler_seconds": 0.0, "tap_seconds": 0.0}
    return time_variant(model, mode, banks[bank], ids, cfg.new_tokens, cfg.defer)


def bench_readouts(cfg: ReadoutConfig, progress: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-ready dict (rows, config, environment)."""
    with torch_threads(cfg.threads):
        return _bench(cfg, progress)


def _bench(cfg: ReadoutConfig, progress: bool) -> dict[str, Any]:
    model, sae = load_model(cfg)
    banks = readout_banks(model, sae, cfg)
    vocab = model.get_input_embeddings().weight.shape[0]
    variants = [(b, m) for b in BANKS for m in MODES] + [CONTROL]
    g = torch.Generator().manual_seed(cfg.seed)
    times: dict[tuple, list[dict[str, float]]] = {}
    bar = progress_bar(len(cfg.batches) * cfg.repeats, progress)
    with torch.no_grad():
        for B in cfg.batches:
            ids = torch.randint(3, vocab, (B, cfg.prompt_len), generator=g)
            time_variant(model, "baseline", None, ids, 2)  # warm-up
            for r in range(cfg.repeats):
                k = r % len(variants)
                for bank, mode in variants[k:] + variants[:k]:  # each leads in turn
                    b0 = time_variant(model, "baseline", None, ids, cfg.new_tokens)
                    t0, t1 = (_time(model, bank, mode, banks, ids, cfg) for _ in range(2))
                    b1 = time_variant(model, "baseline", None, ids, cfg.new_tokens)
                    base = (b0["seconds"] + b1["seconds"]) / 2
                    got = {key: (t0[key] + t1[key]) / 2 for key in t0}
                    times.setdefault((B, bank, mode), []).append({**got, "base": base})
                bar.update(1)
    bar.close()
    rows = []
    for (B, bank, mode), ts in times.items():
        control = (bank, mode) == CONTROL
        lo, med, hi = quartiles([100 * (t["seconds"] / t["base"] - 1) for t in ts])
        handler = 100 * statistics.median(t["handler_seconds"] / t["seconds"] for t in ts)
        base = statistics.median(t["base"] for t in ts)
        rows.append({
            "model": cfg.model, "batch": B, "bank": bank, "mode": mode,
            "columns": 0 if control else banks[bank].n_columns,
            "scores": 0 if control else banks[bank].n_scores,
            "baseline_tok_s": B * cfg.new_tokens / base,
            "baseline_ms_per_token": 1000 * base / cfg.new_tokens,
            "overhead_pct": med, "spread_pct": [lo, hi], "handler_pct": handler,
            "tap_body_pct": 100 * statistics.median(t["tap_seconds"] / t["seconds"] for t in ts),
            "pass_overhead": None if control else med <= TARGETS["overhead_pct"],
            "pass_handlers": None if control else handler <= TARGETS["handler_pct"],
        })
    return {"config": asdict(cfg), "rows": rows, "sae": repr(sae),
            "environment": {"torch": torch.__version__, "threads": cfg.threads, "device": "cpu"}}
