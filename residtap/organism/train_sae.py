"""Train the organism's sparse autoencoder (TopK) on its own texts, deterministically, on CPU.

    python -m residtap.organism.train_sae --out residtap/organism/sae        # the shipped SAE
    python -m residtap.organism.train_sae --out /tmp/sae --steps 200 --d-sae 128 --texts 500

Reads the residual stream at one site (default `layers.4`, the output of block 4: the layer
where probes read every planted latent best, see the model card) at every real token but
`<bos>` of `--texts` texts drawn from the organism's training mixture (`Language(seed)`), and
trains a TopK SAE (Gao et al. 2024): pre = (h - b_dec) @ W_enc + b_enc, the k largest through a
ReLU, out = acts @ W_dec + b_dec; unit-norm decoder rows (renormalised after every step), W_enc
initialised as W_dec's transpose, b_dec as the data mean, Adam with a linear decay over the last
fifth, loss = the reconstruction's squared error over the data's variance plus 1/32 of the AuxK
loss (the `aux_k` largest pre-activations of features dead for `dead_tokens` tokens predict the
residual). Writes the SAE in SAELens's layout (residtap.sae.save_sae) with what it measured on
held-out texts (`Language(seed + 10000)`) and on the organism's labelled data sets: explained
variance, MSE, L0, dead features, and per planted latent the feature whose activation separates
the classes best on `split=train`, with its AUROC on `split=test`.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from residtap.capture import capture
from residtap.identity import model_identity
from residtap.organism.language import Language
from residtap.probes.metrics import auroc
from residtap.sae import SAE, save_sae

logger = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 10_000  # held-out texts come from Language(seed + EVAL_SEED_OFFSET)
LATENTS = ("mood", "topic", "truth", "early_exit")  # data sets; probe position: last token


@dataclass(frozen=True)
class SAETrainConfig:
    out: str
    site: str = "layers.4"
    d_sae: int = 512
    k: int = 8
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    texts: int = 8000
    eval_texts: int = 1000
    seed: int = 2024
    aux_k: int = 64
    aux_coef: float = 1 / 32
    dead_tokens: int = 200_000
    threads: int = 1


@torch.no_grad()
def token_activations(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: list[str],
                      site: str, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(X (N, d) float32, token ids (N,)): the site's activation at every real token but
    `<bos>` of each text, and the token there."""
    rows, ids = [], []
    for i in range(0, len(texts), batch_size):
        batch = tok(texts[i : i + batch_size], padding=True, return_tensors="pt")
        with capture(model, [site]) as acts:
            model(**batch)
        rows += [seq[1:].float() for seq in acts.per_sequence(site)]  # drop <bos>
        real = batch["attention_mask"].bool()
        ids += [row[keep][1:] for row, keep in zip(batch["input_ids"], real, strict=True)]
    return torch.cat(rows), torch.cat(ids)


@torch.no_grad()
def last_token_activations(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                           texts: list[str], site: str, batch_size: int = 256) -> Tensor:
    """(N, d) float32: the site's activation at each text's last token (the probe position)."""
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tok(texts[i : i + batch_size], padding=True, return_tensors="pt")
        with capture(model, [site], positions="last") as acts:
            model(**batch)
        out.append(acts[site].float())
    return torch.cat(out)


def train_topk_sae(X: Tensor, cfg: SAETrainConfig) -> tuple[SAE, list[dict[str, float]]]:
    """Train on rows X (N, d); returns the SAE (float32) and the loss history."""
    g = torch.Generator().manual_seed(cfg.seed)
    N, d = X.shape
    mean = X.mean(0)
    variance = (X - mean).pow(2).sum(-1).mean()  # per-token total variance
    W_dec = torch.randn(cfg.d_sae, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.clone()  # (d, d_sae)
    b_enc, b_dec = torch.zeros(cfg.d_sae), mean.clone()
    params = [W_enc, b_enc, W_dec, b_dec]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    since_fired = torch.zeros(cfg.d_sae)  # tokens since each feature last fired
    history: list[dict[str, float]] = []
    order = torch.randperm(N, generator=g)
    cursor, smooth = 0, None
    bar = tqdm(range(cfg.steps), desc="organism SAE", mininterval=2.0)
    for step in bar:
        if cursor + cfg.batch_size > N:
            order, cursor = torch.randperm(N, generator=g), 0
        x = X[order[cursor : cursor + cfg.batch_size]]  # (n, d)
        cursor += cfg.batch_size
        decay = min(1.0, (cfg.steps - step) / (0.2 * cfg.steps))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * decay
        with torch.enable_grad():
            pre = (x - b_dec) @ W_enc + b_enc  # (n, d_sae)
            values, indices = pre.topk(cfg.k, dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
            rec = acts @ W_dec + b_dec
            loss = (rec - x).pow(2).sum(-1).mean() / variance
            fired = (acts > 0).any(0)
            since_fired = torch.where(fired, 0.0, since_fired + x.shape[0])
            dead = since_fired > cfg.dead_tokens
            total = loss
            if bool(dead.any()):
                residual = (x - rec).detach()
                aux_pre = pre.masked_fill(~dead, -torch.inf)
                k_aux = min(cfg.aux_k, int(dead.sum()))
                v_aux, i_aux = aux_pre.topk(k_aux, dim=-1)
                aux = torch.zeros_like(pre).scatter(-1, i_aux, v_aux.relu()) @ W_dec
                total = loss + cfg.aux_coef * (aux - residual).pow(2).sum(-1).mean() / variance
            opt.zero_grad(set_to_none=True)
            total.backward()
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.set_postfix(fvu=f"{smooth:.4f}", dead=int(dead.sum()), refresh=False)
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            history.append({"step": step + 1, "fvu": round(smooth, 5), "dead": int(dead.sum())})
            logger.info("step %(step)d fvu %(fvu).5f dead %(dead)d", history[-1])
    sae = SAE(W_enc=W_enc.detach().clone(), b_enc=b_enc.detach().clone(),
              W_dec=W_dec.detach().clone(), b_dec=b_dec.detach().clone(), architecture="topk",
              k=cfg.k, site=cfg.site)
    return sae, history


@torch.no_grad()
def reconstruction(sae: SAE, X: Tensor) -> dict[str, float]:
    """Explained variance, MSE per dimension, L0 and dead features on rows X (N, d)."""
    acts = sae.encode(X)
    rec = sae.decode(acts)
    err = (rec - X).pow(2).sum(-1).mean()
    var = (X - X.mean(0)).pow(2).sum(-1).mean()
    return {"explained_variance": round(float(1 - err / var), 5),
            "mse": round(float(err / X.shape[1]), 6),
            "l0": round(float((acts > 0).sum(-1).double().mean()), 3),
            "dead_features": int((~(acts > 0).any(0)).sum()),
            "tokens": int(X.shape[0])}


def feature_auroc(acts: Tensor, positive: Tensor) -> Tensor:
    """(F,) AUROC of each column of acts (N, F) for `positive` (N,) bool rows."""
    y = positive.long()
    return torch.tensor([auroc(y, acts[:, f]) for f in range(acts.shape[1])])


@torch.no_grad()
def latent_features(sae: SAE, model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                    X_eval: Tensor, ids_eval: Tensor, top: int = 3) -> dict[str, Any]:
    """Per planted latent and class c: the `top` features whose activation at the probe
    position separates c from the other classes best on split=train (highest AUROC for c),
    with their AUROC on split=test, `density` (the share of held-out tokens they fire on) and
    `fires_on` (the words they fire on most often there, with the share of their firings)."""
    from residtap.organism import read_jsonl

    fired = sae.encode(X_eval) > 0  # (N, d_sae)
    density = fired.double().mean(0)

    def words(f: int) -> dict[str, float]:
        hits = ids_eval[fired[:, f]]
        if hits.numel() == 0:
            return {}
        values, counts = hits.unique(return_counts=True)
        best = counts.argsort(descending=True)[:3]
        return {tok.convert_ids_to_tokens(int(values[j])): round(float(counts[j]) / hits.numel(), 3)
                for j in best}

    result: dict[str, Any] = {}
    for name in LATENTS:
        rows = read_jsonl(name)
        acts = sae.encode(last_token_activations(model, tok, [r["text"] for r in rows],
                                                 sae.site or "layers.4"))
        train = torch.tensor([r["split"] == "train" for r in rows])
        labels = [r["label"] for r in rows]
        result[name] = {}
        for c in sorted(set(labels)):
            positive = torch.tensor([label == c for label in labels])
            scores = feature_auroc(acts[train], positive[train]).nan_to_num(0.0)
            picked = scores.argsort(descending=True)[:top].tolist()
            test = feature_auroc(acts[~train][:, picked], positive[~train])
            result[name][str(c)] = [
                {"feature": f, "train_auroc": round(float(scores[f]), 4),
                 "test_auroc": round(float(t), 4), "density": round(float(density[f]), 4),
                 "fires_on": words(f)}
                for f, t in zip(picked, test.tolist(), strict=True)]
    return result


def train(cfg: SAETrainConfig) -> dict[str, Any]:
    """Capture, train, measure, save; returns the record written into cfg.json."""
    from residtap.organism import load

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    model, tok = load()
    X, _ = token_activations(model, tok, Language(cfg.seed).corpus(cfg.texts), cfg.site)
    X_eval, ids_eval = token_activations(
        model, tok, Language(cfg.seed + EVAL_SEED_OFFSET).corpus(cfg.eval_texts), cfg.site)
    logger.info("%d training tokens, %d held-out tokens at %s", len(X), len(X_eval), cfg.site)
    sae, history = train_topk_sae(X, cfg)
    seconds = round(time.time() - start, 1)
    record = {
        "training": {**{k: v for k, v in asdict(cfg).items() if k != "out"},
                     "tokens": int(X.shape[0]), "history": history, "seconds": seconds,
                     "torch": torch.__version__, "machine": platform.machine()},
        "held_out": reconstruction(sae, X_eval),
        "latent_features": latent_features(sae, model, tok, X_eval, ids_eval),
    }
    sae.model_name = "residtap-organism"
    sae.model = {**model_identity(model), "name": "residtap-organism"}  # not this machine's path
    sae.info = record
    save_sae(sae, cfg.out)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m residtap.organism.train_sae",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the SAE to")
    defaults = SAETrainConfig(out="")
    parser.add_argument("--site", default=defaults.site)
    for name in ("d_sae", "k", "steps", "batch_size", "texts", "eval_texts", "seed", "aux_k",
                 "dead_tokens", "threads"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            default=getattr(defaults, name))
    for name in ("lr", "aux_coef"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float,
                            default=getattr(defaults, name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    record = train(SAETrainConfig(**vars(args)))
    print(json.dumps({k: v for k, v in record.items() if k != "training"}, indent=1))
    print(json.dumps({k: v for k, v in record["training"].items() if k != "history"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
