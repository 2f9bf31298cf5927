"""Measured costs of a model (as opposed to the expected costs of ``prune.structures``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .allocator import steady
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


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """Seconds of each call, ``repeats`` times round-robin after ``warmup`` calls each, so drift
    and other load on the machine hit every function alike. ``clock``: wall time by default;
    ``time.thread_time`` counts only this thread's CPU time (one torch thread: the work itself,
    without the time other processes held the core). The allocator is made steady first
    (``prune.allocator.steady``: otherwise a pass's page faults depend on the process's history)."""
    steady()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def fastest(times: Sequence[float]) -> float:
    """The figure a timing is reported by: the fastest repeat. On a shared machine noise only ever
    adds time, so the minimum is the least disturbed measurement (as timeit)."""
    return min(times)


def spread(times: Sequence[float]) -> str:
    """The median and the max above the fastest, in percent ("+3/+12%"): how noisy the repeats were."""
    m = min(times)
    return f"+{(statistics.median(times) - m) / m * 100:.0f}/+{(max(times) - m) / m * 100:.0f}%"


@torch.no_grad()
def latency(model: nn.Module, *inputs: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of ``model(*inputs)`` after one warm-up call."""
    return statistics.median(interleaved({"model": lambda: model(*inputs)}, repeats)["model"])
