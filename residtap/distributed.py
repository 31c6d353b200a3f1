"""residtap under `torch.distributed` (launched by `torchrun`): full tensors, one writer.

    # torchrun --nproc-per-node 2 my_script.py
    residtap.distributed.init()                        # gloo on CPU, nccl on GPU; timeout set
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(
        tp_plan="auto"))                               # Hugging Face tensor parallelism
    with residtap.capture(model, ["layers.3"]) as acts:  # full tensors on every rank
        model(**batch)

Tensor parallelism (Hugging Face `tp_plan`, PyTorch DTensor plans): the residual stream, the
norms and the outputs of row-parallel modules (attention and MLP outputs) are already full and
identical on every rank, so canonical sites need nothing. A column-parallel module without an
output gather (e.g. `q_proj` read through a raw module path) leaves each rank with a slice of
the last dimension; the tap engine gathers it (`ShardedOutput`), shows taps the full tensor,
and hands a writer's result back as this rank's slice. Writers therefore run identically on
every rank: steering (residtap.steer) adds the same delta on each rank and probe banks read
full sites, so both give the single-process results. Stores are written by rank 0 only. The
logit lens decodes with each rank's vocabulary shard of `lm_head` (`vocab_shard`) and merges
top-k, log-sum-exp, entropy, KL and ranks with small collectives, never gathering full logits
(residtap.lens.decode). Every rank must make the same residtap calls, since they communicate.

Data parallelism: `residtap.extract(..., distributed="data")` splits the data set into one
contiguous block per rank; each rank writes its own resumable part, and rank 0 then writes a
manifest that merges the parts into one store.

Failure: `init()` sets a process-group timeout, and `barrier()` uses gloo's monitored barrier,
which names the ranks that did not arrive, so a rank that dies ends the others with an error
instead of a hang (torchrun also stops the remaining ranks when one fails).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment, if not done yet.

    backend: default "nccl" when CUDA is available, else "gloo". Returns (rank, world)."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        return rank_world()
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed is not initialised and {', '.join(missing)} are not set; "
            "launch with `torchrun --nproc-per-node N ...`, or call "
            "torch.distributed.init_process_group yourself"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rank_world()


def barrier(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Wait for every rank; raise (naming the missing ranks on gloo) after `timeout_s`."""
    if not is_distributed():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
    else:
        dist.barrier()


@dataclass(frozen=True)
class ShardedOutput:
    """A module whose output's last dimension is split across the ranks of `group`."""

    group: object
    world: int
    rank: int
    local: int  # this rank's width of the last dimension
    full: int

    def gather(self, hidden: Tensor) -> Tensor:
        """(…, local) on each rank -> (…, full) everywhere (ranks' slices in rank order)."""
        parts = [torch.empty_like(hidden) for _ in range(self.world)]
        dist.all_gather(parts, hidden.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def local_slice(self, hidden: Tensor) -> Tensor:
        """The inverse of `gather`: this rank's slice of a full tensor."""
        return hidden.narrow(-1, self.rank * self.local, self.local).contiguous()


def tensor_parallel_kwargs() -> dict[str, object]:
    """`from_pretrained` keywords for Hugging Face tensor parallelism:
    `distributed_config=DistributedConfig(tp_plan="auto")`. Imported here, lazily, so that only
    `--distributed tensor` needs that API: it exists from transformers 5 (tested on 5.17 and
    5.24); on 4.x this raises, naming the version, while everything else works there."""
    import transformers

    try:
        from transformers.distributed import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    except (ImportError, TypeError) as err:
        raise RuntimeError(
            f"tensor parallelism needs transformers >= 5 (DistributedConfig(tp_plan='auto')); "
            f"this is transformers {transformers.__version__}. Upgrade transformers, or run "
            "without --distributed tensor (data parallelism works on every supported version)"
        ) from err


def output_sharding(module: nn.Module) -> ShardedOutput | None:
    """How `module`'s output is sharded under tensor parallelism, or None when it is full.

    Detects column-parallel linear layers: a DTensor weight sharded on dim 0 (output features).
    Whether the output was gathered after all (e.g. `colwise_gather_output` for lm_head) is
    decided per call by the tensor's width (see `maybe_gather`)."""
    if not is_distributed():
        return None
    weight = getattr(module, "weight", None)
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    if not isinstance(weight, DTensor) or not isinstance(module, nn.Linear):
        return None
    placements = weight.placements
    if len(placements) != 1 or placements[0] != Shard(0):
        return None
    mesh = weight.device_mesh
    local = weight.to_local().shape[0]
    full = weight.shape[0]
    if local == full:
        return None
    return ShardedOutput(mesh.get_group(), mesh.size(), mesh.get_local_rank(), local, full)


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows of an unembedding whose weight is sharded on dim 0 (the vocabulary)."""

    group: object
    rank: int
    world: int
    weight: Tensor  # (V_local, d) this rank's rows
    bias: Tensor | None  # (V_local,) or None
    offset: int  # global token id of local row 0
    widths: tuple[int, ...]  # V_local of every rank, in rank order

    @property
    def width(self) -> int:
        return self.widths[self.rank]


def vocab_shard(module: nn.Module) -> VocabShard | None:
    """This rank's slice of a vocabulary-sharded unembedding, or None for an ordinary weight.

    The weight must be a DTensor on a 1-D mesh placed as Shard(0), as Hugging Face's
    `colwise` / `colwise_gather_output` plans leave `lm_head`. Collective: every rank of the
    mesh must call it (the ranks exchange their widths, so uneven shards work)."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, DTensor):
        return None
    if tuple(weight.placements) != (Shard(0),):
        raise ValueError(
            f"the unembedding weight is a DTensor placed as {tuple(weight.placements)}; the lens "
            "supports a full weight or one sharded on the vocabulary, (Shard(dim=0),) on a 1-D "
            "mesh; pass readout=residtap.lens.Readout(...) with such an unembedding"
        )
    group = weight.device_mesh.get_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local = weight.to_local()  # (V_local, d)
    mine = torch.tensor([local.shape[0]], device=local.device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    widths = tuple(int(w) for w in parts)
    offset = sum(widths[:rank])
    bias = getattr(module, "bias", None)
    if isinstance(bias, DTensor) and tuple(bias.placements) == (Shard(0),):
        bias = bias.to_local()
    elif bias is not None:  # a full bias (plain or replicated): keep this rank's rows
        full = bias.full_tensor() if isinstance(bias, DTensor) else bias
        bias = full.narrow(0, offset, widths[rank])
    return VocabShard(group, rank, world, local, bias, offset, widths)


def maybe_gather(sharding: ShardedOutput | None, hidden: Tensor) -> tuple[Tensor, bool]:
    """(full tensor, whether it was gathered)."""
    if sharding is None or hidden.shape[-1] != sharding.local:
        return hidden, False
    return sharding.gather(hidden), True


def block_of(n_items: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi): the contiguous block of `n_items` that `rank` of `world` takes."""
    base, extra = divmod(n_items, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)
