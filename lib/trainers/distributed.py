"""torch.distributed set-up for any world size: torchrun or a plain process; gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else run as a single process.

    The backend follows the device: NCCL when each rank has a GPU, gloo otherwise, so the same
    code path (and the same tests) run on a laptop CPU and on a GPU node.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))
        target = torch.device("cuda", torch.cuda.current_device())
    else:
        target = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def shutdown(context: DistContext) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], context: DistContext, pad: bool = True) -> list[T]:
    """This rank's share, round-robin. ``pad`` repeats items so every rank takes the same number of steps."""
    items = list(items)
    if pad and items and len(items) % context.world_size:
        items += items[: context.world_size - len(items) % context.world_size]
    return items[context.rank :: context.world_size]


def all_reduce_sum(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Sum over ranks (in place on a copy); identity for a single process."""
    result = tensor.detach().clone().to(context.device)
    if context.distributed:
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result.cpu()


def gather_objects(value: object, context: DistContext) -> list:
    """Every rank's ``value``, in rank order (a one-element list for a single process)."""
    if not context.distributed:
        return [value]
    gathered: list = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def state_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter: equal on all ranks iff DDP kept the replicas' weights identical.

    Buffers are left out on purpose: BatchNorm running statistics are updated from each rank's own
    batch after DDP's per-forward broadcast (standard DDP behaviour), and this U-Net never reads them.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def barrier(context: DistContext) -> None:
    if context.distributed:
        dist.barrier()


def configure_logging() -> int:
    """Rank-aware logging for torchrun commands: INFO on rank 0, warnings only elsewhere; returns the rank."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    return rank
