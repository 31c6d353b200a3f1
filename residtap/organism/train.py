"""Train the organism from scratch, deterministically, on CPU.

    python -m residtap.organism.train --out residtap/organism/model            # the shipped run
    python -m residtap.organism.train --out /tmp/tiny --steps 50 --d-model 32 --layers 2

Writes model.safetensors, config.json, generation_config.json, the tokenizer files and
training.json (losses, steps, seed, time). The same seed, arguments and thread count give the same
weights: the data stream is `Language(seed)`, every random draw of torch is seeded and
deterministic algorithms are enforced. One thread is the default: the thread count changes the
order of float sums, and one thread also copes best with a busy shared CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from residtap.organism.language import Language
from residtap.organism.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 10_000  # eval texts come from Language(seed + EVAL_SEED_OFFSET)


@dataclass(frozen=True)
class TrainConfig:
    out: str
    steps: int = 1500
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    d_model: int = 128
    layers: int = 6
    heads: int = 4
    eval_texts: int = 512
    threads: int = 1


def model_config(cfg: TrainConfig, tok: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.d_model,
        intermediate_size=4 * cfg.d_model,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=tok.model_max_length,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,  # tied, the model took far longer to learn topic nouns
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def encode(tok: PreTrainedTokenizerFast, texts: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded batch of "<bos> text <eos>" with labels -100 on padding."""
    batch = tok([t + f" {tok.eos_token}" for t in texts], padding=True, padding_side="right",
                return_tensors="pt")  # fmt: skip
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # (B, T)
    return {**batch, "labels": labels}


def batches(tok: PreTrainedTokenizerFast, seed: int, size: int) -> Iterator[dict]:
    lang = Language(seed)
    while True:
        yield encode(tok, lang.corpus(size))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, eval_batch: dict) -> float:
    model.eval()
    loss = model(**eval_batch).loss.item()
    model.train()
    return loss


def train(cfg: TrainConfig) -> dict:
    """Train, save everything to `cfg.out`, and return the training record."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    tok = build_tokenizer()
    model = LlamaForCausalLM(model_config(cfg, tok))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("training %d parameters for %d steps", n_params, cfg.steps)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay,
          "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98),
    )  # fmt: skip
    eval_batch = encode(tok, Language(cfg.seed + EVAL_SEED_OFFSET).corpus(cfg.eval_texts))
    first_eval = evaluate(model, eval_batch)
    history: list[dict] = []
    start = time.time()
    stream = zip(range(cfg.steps), batches(tok, cfg.seed, cfg.batch_size), strict=False)
    bar = tqdm(stream, total=cfg.steps, desc="organism", mininterval=2.0)
    smooth = None
    for step, batch in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smooth:.3f}")
        if (step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == cfg.steps:
            record = {"step": step + 1, "train_loss": round(smooth, 4),
                      "eval_loss": round(evaluate(model, eval_batch), 4)}  # fmt: skip
            history.append(record)
            logger.info("step %(step)d train %(train_loss).4f eval %(eval_loss).4f", record)
            save(model, tok, cfg, {"initial_eval_loss": round(first_eval, 4), "n_params": n_params,
                                   "history": history, "seconds": round(time.time() - start, 1)})
    return json.loads((Path(cfg.out) / "training.json").read_text())


def save(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, cfg: TrainConfig, log: dict
) -> None:
    """Write the checkpoint, tokenizer and training.json (also at every evaluation, so a long
    run can be inspected while it trains; `steps_done` < `config.steps` marks a partial one)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=24,
    )  # fmt: skip
    model.save_pretrained(out)
    tok.save_pretrained(out)
    last = log["history"][-1]
    record = {
        "config": asdict(cfg),
        "steps_done": last["step"],
        "n_params": log["n_params"],
        "initial_eval_loss": log["initial_eval_loss"],
        "final_train_loss": last["train_loss"],
        "final_eval_loss": last["eval_loss"],
        "history": log["history"],
        "seconds": log["seconds"],
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m residtap.organism.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
    defaults = TrainConfig(out="")
    for name in ("steps", "seed", "batch_size", "warmup", "d_model", "layers", "heads",
                 "eval_texts", "threads"):  # fmt: skip
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    record = train(TrainConfig(**vars(args)))
    print(json.dumps({k: v for k, v in record.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
