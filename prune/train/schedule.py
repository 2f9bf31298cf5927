"""The learning-rate schedule of both loops (``prune train``'s two stages and ``prune pretrain``):
a linear warm-up, then a linear decay to 0 at the end."""

from __future__ import annotations


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """The lr scale (peak 1.0) of the update made at ``step`` (counted from 0 in its stage): it
    rises as (step + 1) / warmup_steps, then falls linearly to 0 at ``total_steps``."""
    s = step + 1
    if s <= warmup_steps:
        return s / max(1, warmup_steps)
    return max(0.0, (total_steps - s) / max(1, total_steps - warmup_steps))
