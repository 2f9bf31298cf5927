"""Move gate thresholds together until the eval-mode size hits a target: seeded demo states
start from random levels; a trained run uses it to land on its target when the Lagrangian
stopped close to, but not at, it."""

from __future__ import annotations

from typing import Callable, Collection, List, Optional

import torch
from torch import Tensor

from .structures import CONV_CHANNELS, FFN_UNITS, GATE_KINDS, HEAD_QK_DIMS, HEAD_V_DIMS, HEADS, HIDDEN, GatedEncoder

# the gate kinds each calibration pass moves (prune.structures.base names them)
ALL_GATES = GATE_KINDS
# every kind but the whole-block gates; a hidden channel (every layer's width) and a dim inside a
# layer's heads (every head's width) are coarse steps, as a head is, so they move with the first pass
# and stay out of the fine ones
BUT_BLOCKS = (CONV_CHANNELS, HEADS, FFN_UNITS, HIDDEN, HEAD_QK_DIMS, HEAD_V_DIMS)
FINE_GRAINED = (CONV_CHANNELS, FFN_UNITS)
# the finest step in MACs: a conv channel costs its layer's frame rate, a unit the final one
FFN_UNITS_ONLY = (FFN_UNITS,)


@torch.no_grad()
def shift_to_size(gated: GatedEncoder, size: Callable[[GatedEncoder], Tensor], target: float,
                  base: Optional[List[Tensor]] = None, kinds: Collection[str] = ALL_GATES, iterations: int = 60
                  ) -> float:
    """Set the ``log_alpha`` of the gate groups of ``kinds`` (``prune.structures.GATE_KINDS``) to
    ``base + c`` (base: their current values by default) with the one shift ``c`` whose eval-mode ``size(gated)`` is nearest ``target``.
    Each group also gets a distinct offset of 1e-4 x its index, so groups that start out equal
    (fresh gates) cross their thresholds one at a time. Returns the size reached; the model is
    left in eval mode."""
    groups = gated.gate_groups(kinds)
    if base is None:
        base = [p.detach().clone() for p in groups]
    base = [b + 1e-4 * i for i, b in enumerate(base)]
    gated.eval()

    def size_at(shift: float) -> float:
        for p, b in zip(groups, base):
            p.copy_(b + shift)
        return size(gated).item()

    lo, hi = -50.0, 50.0  # the size grows with the shift
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if size_at(mid) < target:
            lo = mid
        else:
            hi = mid
    below, above = size_at(lo), size_at(hi)
    return size_at(lo) if abs(below - target) < abs(above - target) else above


@torch.no_grad()
def calibrate(gated: GatedEncoder, size: Callable[[GatedEncoder], Tensor], target: float,
              tolerance: float) -> float:
    """Bring the eval-mode size within ``tolerance`` (relative) of ``target``, keeping the
    learned order of the gates: first one shift of every group but the whole-block gates, then,
    with heads fixed (one head is a large step), one more of the FFN units and conv channels;
    only if whole blocks closed too many (or too few) for that, all gates together, then the
    fine ones again; last, the FFN units alone (conv channels are coarse steps in MACs). Each pass
    runs only while the size is still off. Leaves the model in eval mode."""
    passes = (BUT_BLOCKS, FINE_GRAINED, ALL_GATES, FINE_GRAINED, FFN_UNITS_ONLY)
    gated.eval()  # the eval masks are what gets cut
    reached = size(gated).item()
    for kinds in passes:
        if abs(reached - target) <= tolerance * target:
            break
        reached = shift_to_size(gated, size, target, kinds=kinds)
    return reached
