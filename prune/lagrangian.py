"""The Lagrangian size controller (CoFi / DPHuBERT): drives the expected size to a target."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from . import measures
from .models.config import EncoderConfig
from .structures import GatedEncoder


def __getattr__(name: str):
    if name == "TARGET_KINDS":  # the registry's names now, including measures registered since import
        return measures.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Lagrangian(nn.Module):
    """penalty = l1 * (s - t) + l2 * (s - t)^2, where s is the expected sparsity (1 - expected
    size / full size, size in the target's measure) and t the target, warmed up linearly from 0.

    ``lambda1`` and ``lambda2`` are trained by gradient *ascent*: call ``flip_grads()`` after
    ``backward()`` and before the optimizer step, so a plain minimiser maximises in them.

    kind: a registered size measure (``prune.measures``): "params" (target = fraction of params
    removed), "param_count" (target = params to keep, absolute), or "macs" (target = fraction of
    MACs removed, on ``seconds`` of audio), "latency" / "latency_ms" (fraction of the latency
    removed / milliseconds to keep, read from the latency table in ``settings["table"]``).
    ``settings``: what the measure ``needs`` (``prune.measures.Need``), by name.
    """

    def __init__(self, gated: GatedEncoder, kind: str, target: float, warmup_steps: int, seconds: float = 1.0,
                 settings: Optional[Mapping[str, Any]] = None, shape_terms: Optional[nn.Module] = None,
                 target_size: Optional[float] = None):
        """shape_terms: ``prune.shape.ShapeTerms`` toward an explicit shape's counts (their
        multipliers train with these); target_size: the size to reach instead of ``target``'s (an
        explicit shape that fixes every count has its own size)."""
        super().__init__()
        self.measure = measures.get(kind).bind(settings or {})
        self.kind = kind
        self.seconds = seconds
        self.warmup_steps = warmup_steps
        self.full = self.measure.size_of(gated.config, seconds)
        self.target_sparsity = (self.measure.target_sparsity(target, self.full) if target_size is None
                                else 1.0 - target_size / self.full)
        self.shape_terms = shape_terms
        if not 0.0 < self.target_sparsity < 1.0:
            raise ValueError(f"pruning.target gives a sparsity of {self.target_sparsity:.4f}, outside (0, 1)")
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))

    @property
    def target_size(self) -> float:
        """The size the target keeps, in the measure's unit."""
        return (1.0 - self.target_sparsity) * self.full

    def target_at(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.target_sparsity
        return self.target_sparsity * min(1.0, step / self.warmup_steps)

    def expected_size(self, gated: GatedEncoder) -> Tensor:
        return self.measure.expected_of(gated, self.seconds)

    def size_of(self, config: EncoderConfig) -> float:
        """The size of a plain (cut) model, in the target's unit."""
        return self.measure.size_of(config, self.seconds)

    def forward(self, gated: GatedEncoder, step: int) -> Dict[str, Tensor]:
        size = self.expected_size(gated)
        sparsity = 1.0 - size / self.full
        diff = sparsity - self.target_at(step)
        penalty = self.lambda1 * diff + self.lambda2 * diff * diff
        if self.shape_terms is not None:
            progress = 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)
            penalty = penalty + self.shape_terms(gated, progress)
        return {"penalty": penalty, "expected_sparsity": sparsity, "expected_size": size}

    def flip_grads(self) -> None:
        for p in self.parameters():
            if p.grad is not None:
                p.grad.neg_()
