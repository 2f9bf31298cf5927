"""Measured costs of a model (as opposed to the expected costs of ``prune.structures``)."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .models.config import SAMPLE_RATE


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # the counter passes shapes


# torch's counter knows the CUDA attention kernels but not the CPU one
_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measured_macs(model: nn.Module, seconds: float = 1.0) -> int:
    """Multiply-accumulates of one forward pass on ``seconds`` of audio, counted by
    ``torch.utils.flop_counter`` (matrix products and convs; FLOPs / 2)."""
    param = next(model.parameters())
    x = torch.randn(1, int(round(seconds * SAMPLE_RATE)), device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def latency(model: nn.Module, *inputs: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of ``model(*inputs)`` after one warm-up call."""
    model(*inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(*inputs)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
