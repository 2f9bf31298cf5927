"""The Lagrangian size controller (CoFi / DPHuBERT): drives the expected size to a target."""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from .models.config import EncoderConfig
from .structures import GatedEncoder, count_macs, count_params

TARGET_KINDS = ("params", "param_count", "macs")


class Lagrangian(nn.Module):
    """penalty = l1 * (s - t) + l2 * (s - t)^2, where s is the expected sparsity (1 - expected
    size / full size, size in params or MACs) and t the target, warmed up linearly from 0.

    ``lambda1`` and ``lambda2`` are trained by gradient *ascent*: call ``flip_grads()`` after
    ``backward()`` and before the optimizer step, so a plain minimiser maximises in them.

    kind: "params" (target = fraction of params removed), "param_count" (target = params to
    keep, absolute), or "macs" (target = fraction of MACs removed, on ``seconds`` of audio).
    """

    def __init__(self, gated: GatedEncoder, kind: str, target: float, warmup_steps: int, seconds: float = 1.0):
        super().__init__()
        if kind not in TARGET_KINDS:
            raise ValueError(f"pruning.target_kind must be one of {TARGET_KINDS}, got {kind!r}")
        self.kind = kind
        self.seconds = seconds
        self.warmup_steps = warmup_steps
        self.full = float(count_macs(gated.config, seconds) if kind == "macs" else count_params(gated.config))
        self.target_sparsity = 1.0 - target / self.full if kind == "param_count" else float(target)
        if not 0.0 < self.target_sparsity < 1.0:
            raise ValueError(f"pruning.target gives a sparsity of {self.target_sparsity:.4f}, outside (0, 1)")
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))

    def target_at(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.target_sparsity
        return self.target_sparsity * min(1.0, step / self.warmup_steps)

    def expected_size(self, gated: GatedEncoder) -> Tensor:
        return gated.expected_macs(self.seconds) if self.kind == "macs" else gated.expected_params()

    def size_of(self, config: EncoderConfig) -> float:
        """The size of a plain (cut) model, in the target's unit."""
        return float(count_macs(config, self.seconds) if self.kind == "macs" else count_params(config))

    def forward(self, gated: GatedEncoder, step: int) -> Dict[str, Tensor]:
        size = self.expected_size(gated)
        sparsity = 1.0 - size / self.full
        diff = sparsity - self.target_at(step)
        penalty = self.lambda1 * diff + self.lambda2 * diff * diff
        return {"penalty": penalty, "expected_sparsity": sparsity, "expected_size": size}

    def flip_grads(self) -> None:
        for p in (self.lambda1, self.lambda2):
            if p.grad is not None:
                p.grad.neg_()
