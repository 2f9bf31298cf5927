"""Seeded, non-uniform gate states at a chosen sparsity: for demos, benchmarks and tests,
where no trained gates exist yet."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .calibrate import shift_to_size
from .structures import GatedEncoder, count_params


@torch.no_grad()
def set_random_gates(gated: GatedEncoder, sparsity: float, seed: int = 0, spread: float = 2.0,
                     size: Optional[Callable[[GatedEncoder], Tensor]] = None) -> float:
    """Draw every gate's ``log_alpha`` around a per-group random level, then shift them all
    together until the eval-mode parameter count is ``(1 - sparsity)`` of the unpruned model.
    Returns the sparsity reached (exact up to one unit of the coarsest structure). ``size``: the
    parameter count to calibrate (default ``expected_params``; a ``Shaper.sized`` one for uniform
    states, which it leaves forced)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    g = torch.Generator().manual_seed(seed)
    groups = gated.gate_groups()
    # whole-layer gates (one gate each) start well open: trained runs close few whole layers,
    # and a single flip would move the size in one big step
    base = [torch.randn(1, generator=g) * spread + torch.randn(p.shape, generator=g) * spread
            + (3 * spread if p.numel() == 1 else 0.0) for p in groups]
    full = count_params(gated.config)
    was_training = gated.training
    reached = shift_to_size(gated, size or GatedEncoder.expected_params, (1.0 - sparsity) * full, base)
    gated.train(was_training)
    return 1.0 - reached / full
