"""Logit lens over a whole generation, captured in the one `generate` call the model already runs.

    result = residtap.run_lens(model, tokenizer, ["The capital of France is"], max_new_tokens=8)
    result.topk_probs              # (L, B, T, k) full-vocabulary probabilities per layer/position
    from residtap.lens.plot import write_files
    write_files(result, "out/")    # lens.json, lens.png, lens.html

How it works:
1. Capture: one tap per site (block outputs `layers.{i}`, optionally their `attn`/`mlp`
   sublayers) writes each forward's hidden states into a preallocated buffer
   (B, n_sites, T_max, d) at `[:, slot, past:past+length]`: the prefill writes the prompt, each
   decode step one position. No list growth, no host synchronisation, KV cache on.
2. Deferred decode (`residtap.lens.decode`): afterwards every (site, position) row goes through
   the model's own final norm, unembedding and soft-cap in chunks sized by a memory budget.

Positions: T = prompt length + new tokens - 1. The last generated token is never fed back, so
it has no hidden state; it is the "next token" of position T-1. With left padding, pad
positions are in the tensors too; `attention_mask` (B, T) says which are real.
Greedy decoding is the default (`do_sample=False`) so runs are reproducible.

Tensor parallelism (under `torchrun`, Hugging Face `tp_plan="auto"`): the residual stream is
full on every rank, so capture is unchanged; the decode uses each rank's vocabulary shard of
`lm_head` and merges the statistics across ranks (see residtap.lens.decode). Every rank returns
the same LensResult; run the lens on every rank, and save it from rank 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from residtap.engine import Step, tap
from residtap.identity import check_same_model
from residtap.inputs import encode, forward_inputs, pad_id_of, pad_left
from residtap.lens.decode import DEFAULT_MEMORY_BUDGET, decode
from residtap.lens.readout import Readout, readout_of
from residtap.lens.result import LensResult
from residtap.sites import Arch, layer_sites, num_layers, resolve_site

log = logging.getLogger(__name__)

_NOT_LENSABLE = ("logits", "norm")


@dataclass
class LensCapture:
    """Hidden states captured during one generation, before decoding."""

    sites: list[str]  # reported sites, in slot order
    hidden: Tensor  # (B, S, T_max, d); S may include one extra slot: the final block
    length: int  # positions filled: T
    sequences: Tensor  # (B, T_total) prompt + generated tokens
    attention_mask: Tensor  # (B, T) 1 at real (non-pad) positions
    prompt_length: int
    final_slot: int  # slot of the last block's output, the KL reference

    def next_ids(self) -> Tensor:
        """(B, T) the token that followed each position; -1 where none is known."""
        nxt = self.sequences[:, 1 : self.length + 1]
        missing = self.length - nxt.shape[1]
        if missing > 0:
            nxt = torch.cat([nxt, nxt.new_full((nxt.shape[0], missing), -1)], dim=1)
        return nxt


class _SlotWriter:
    """A reader tap that copies each forward's (B, length, d) into its slot of the buffer."""

    def __init__(self, buffer: Tensor, slot: int, site: str) -> None:
        self.buffer, self.slot, self.site = buffer, slot, site

    def __call__(self, hidden: Tensor, step: Step) -> None:
        B, _, T_max, d = self.buffer.shape
        end = step.past + hidden.shape[1]
        if hidden.shape[0] != B or hidden.shape[-1] != d or end > T_max:
            raise ValueError(
                f"lens site {self.site!r} produced {tuple(hidden.shape)} at position "
                f"{step.past}, but the buffer holds (B={B}, T={T_max}, d={d}); beam search, "
                "num_return_sequences > 1 and sites whose output is not (B, T, d_model) are "
                "not supported, and max_new_tokens must match the generate call"
            )
        self.buffer[:, self.slot, step.past : end].copy_(hidden.detach())


class LogitLens:
    """Capture a generation's residual stream, then decode it through the model's readout.

        lens = LogitLens(model)                                  # all block outputs
        result = lens.run(input_ids, attention_mask, max_new_tokens=16, tokenizer=tok)

    sites: site names (default every `layers.{i}`); sublayers=True adds each layer's `attn` and
    `mlp` outputs. dtype: buffer dtype (default the model's). readout: override the table.
    translators: a `residtap.TunedLens`; sites it has a translator for decode through it (the
    tuned lens), the others as the logit lens."""

    def __init__(
        self,
        model: nn.Module,
        sites: Iterable[str] | None = None,
        *,
        sublayers: bool = False,
        dtype: torch.dtype | None = None,
        readout: Readout | None = None,
        arch: Arch | None = None,
        translators: Any = None,
    ) -> None:
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
        self.model = model
        self.arch = arch
        if translators is not None and translators.model is not None:
            check_same_model(translators.model, model, "tuned lens")
        self.translators = translators
        self.readout = readout if readout is not None else readout_of(model)
        if isinstance(sites, str):
            sites = [sites]
        names = list(layer_sites(model, arch)) if sites is None else list(sites)
        if not names:
            raise ValueError("sites is empty; name at least one site, e.g. ['layers.0']")
        if sublayers:
            names = [f"{n}.{sub}" if sub else n for n in names for sub in ("attn", "mlp", "")]
        resolved = [resolve_site(model, n, arch) for n in names]
        for site in resolved:
            if site.name in _NOT_LENSABLE:
                raise ValueError(
                    f"site {site.name!r} is already past the final norm; lens the residual "
                    "stream instead: 'layers.{i}' (or its 'attn'/'mlp' outputs)"
                )
        self.sites = [s.name for s in resolved]
        last = f"layers.{num_layers(model, arch) - 1}"
        self._slots = self.sites + ([] if last in self.sites else [last])
        self.final_slot = self._slots.index(last)
        param = next(model.parameters())
        self.dtype = dtype or param.dtype
        self.device = param.device

    # -- capture ---------------------------------------------------------------------------
    @torch.no_grad()
    def capture(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        max_new_tokens: int,
        **generate_kwargs: Any,
    ) -> LensCapture:
        """Run `model.generate` once (or one forward when max_new_tokens=0) with the taps on."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(
                "input_ids must be a (B, T) LongTensor; for text use residtap.run_lens(model, "
                f"tokenizer, prompts), got {type(input_ids).__name__}"
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        for key in ("num_beams", "num_return_sequences"):
            if generate_kwargs.get(key, 1) != 1:
                raise ValueError(
                    f"{key}={generate_kwargs[key]} is not supported by the lens: it needs one "
                    "sequence per batch row; run it with the default of 1"
                )
        input_ids = input_ids.to(self.device)
        B, T_prompt = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        T_max = T_prompt + max(max_new_tokens - 1, 0)
        d = _hidden_size(self.model)
        hidden = torch.zeros(B, len(self._slots), T_max, d, dtype=self.dtype, device=self.device)
        taps = {s: _SlotWriter(hidden, i, s) for i, s in enumerate(self._slots)}
        with tap(self.model, taps, arch=self.arch):
            if max_new_tokens == 0:  # position ids as generate counts them, padded rows too
                self.model(**forward_inputs(self.model, input_ids, attention_mask),
                           use_cache=False)
                sequences = input_ids
            else:
                kwargs = {"do_sample": False, "use_cache": True, **generate_kwargs}
                sequences = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens, **kwargs,
                )
                if not isinstance(sequences, Tensor):  # return_dict_in_generate=True
                    sequences = sequences.sequences
        length = T_prompt if max_new_tokens == 0 else sequences.shape[1] - 1
        mask = torch.cat([attention_mask, attention_mask.new_ones(B, length - T_prompt)], dim=1)
        return LensCapture(self.sites, hidden, length, sequences, mask, T_prompt, self.final_slot)

    # -- decode ----------------------------------------------------------------------------
    def decode(
        self,
        captured: LensCapture,
        *,
        top_k: int = 5,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        tokenizer: Any = None,
        progress: bool = False,
    ) -> LensResult:
        """Decode a capture through the model's readout (see residtap.lens.decode)."""
        hidden = captured.hidden
        if self.translators is not None:  # the tuned lens: translate, then the same decode
            hidden = hidden.clone()
            for i, site in enumerate(self._slots):
                hidden[:, i] = self.translators.translate(site, hidden[:, i])
        stats = decode(
            hidden, length=captured.length, readout=self.readout,
            next_ids=captured.next_ids(), final_slot=captured.final_slot, top_k=top_k,
            memory_budget=memory_budget, progress=progress,
        )
        keep = [i for i, s in enumerate(self._slots) if s in captured.sites]
        result = LensResult(
            sites=list(captured.sites),
            topk_ids=stats.topk_ids[keep], topk_probs=stats.topk_probs[keep],
            entropy=stats.entropy[keep], kl=stats.kl[keep], actual_rank=stats.actual_rank[keep],
            sequences=captured.sequences, attention_mask=captured.attention_mask,
            prompt_length=captured.prompt_length,
        )
        if tokenizer is not None:
            result.add_token_text(tokenizer)
        return result

    def run(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        max_new_tokens: int = 16,
        top_k: int = 5,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        tokenizer: Any = None,
        progress: bool = False,
        **generate_kwargs: Any,
    ) -> LensResult:
        """capture(...) then decode(...)."""
        captured = self.capture(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                **generate_kwargs)
        return self.decode(captured, top_k=top_k, memory_budget=memory_budget,
                           tokenizer=tokenizer, progress=progress)


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise LookupError(
            f"cannot tell d_model of {type(model).__name__}: its config has no hidden_size"
        )
    return int(size)


def tokenize_left_padded(tokenizer: Any, prompts: Sequence[str] | str) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both (B, T), padded on the left (what generate needs) with
    the tokenizer's pad id (else its eos id, else 0); the same encoding as steering's."""
    texts = [prompts] if isinstance(prompts, str) else prompts
    return pad_left(encode(tokenizer, texts, "prompts"), pad_id_of(tokenizer))


def run_lens(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | str,
    *,
    max_new_tokens: int = 16,
    top_k: int = 5,
    sites: Iterable[str] | None = None,
    sublayers: bool = False,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    translators: Any = None,
    **generate_kwargs: Any,
) -> LensResult:
    """Logit lens over prompts and their greedy continuation, in one generate call
    (the tuned lens where `translators`, a residtap.TunedLens, has a translator)."""
    ids, mask = tokenize_left_padded(tokenizer, prompts)
    generate_kwargs.setdefault("pad_token_id", pad_id_of(tokenizer))
    lens = LogitLens(model, sites, sublayers=sublayers, dtype=dtype, translators=translators)
    return lens.run(ids, mask, max_new_tokens=max_new_tokens, top_k=top_k,
                    memory_budget=memory_budget, tokenizer=tokenizer, progress=progress,
                    **generate_kwargs)
