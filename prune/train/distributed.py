"""torchrun support: DDP switches on when torchrun's environment variables are present."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; start the process group (nccl on GPU,
    gloo on CPU) when there is more than one process."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device: cuda was asked for but no GPU is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(rank, world_size, local_rank, dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_ranks(ok: bool, env: DistEnv) -> bool:
    """Whether ``ok`` holds on every rank (one small all-reduce): lets all ranks stop together
    when one of them cannot go on, instead of the others waiting in the next collective."""
    if not env.enabled:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=env.device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0
