"""Layer-to-layer distillation: prediction heads and the L1 + cosine loss (DPHuBERT)."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COS_TYPES = ("raw", "log_sig")
MODES = ("layer2layer", "prediction")


class DistillHeads(nn.Module):
    """One Linear per group of student layers, initialised to the identity.

    ``groups``: lists of hidden-state indices sharing a head, e.g. ``[[0], [4, 8, 12]]``
    (DPHuBERT: layer 0 with its own head, 4, 8 and 12 sharing one). The prediction for
    teacher layer ``i`` is made from student layer ``i`` ("layer2layer"), or from the student's
    last layer ("prediction", DistilHuBERT-style; every target then needs its own head).
    """

    def __init__(self, embed_dim: int, groups: Sequence[Sequence[int]], mode: str = "layer2layer"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"distill.mode must be one of {MODES}, got {mode!r}")
        if mode == "prediction" and any(len(g) != 1 for g in groups):
            raise ValueError("distill.mode=prediction predicts every layer from the same input: "
                             "give each layer its own head, e.g. [[4], [8], [12]]")
        self.mode = mode
        self.groups = [list(g) for g in groups]
        self.layers = [layer for g in self.groups for layer in g]
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"distill.layers lists a layer twice: {self.groups}")
        self.heads = nn.ModuleList(nn.Linear(embed_dim, embed_dim) for _ in self.groups)
        for head in self.heads:
            nn.init.eye_(head.weight)
            nn.init.zeros_(head.bias)
        self._head_of: Dict[int, int] = {layer: i for i, g in enumerate(self.groups) for layer in g}

    def forward(self, hiddens: List[Tensor]) -> List[Tensor]:
        """hiddens: the student's hidden states -> predictions, (batch, frames, dim), for ``self.layers``"""
        if self.mode == "prediction":
            return [self.heads[self._head_of[layer]](hiddens[-1]) for layer in self.layers]
        return [self.heads[self._head_of[layer]](hiddens[layer]) for layer in self.layers]


def distill_loss(predictions: List[Tensor], targets: List[Tensor], frame_mask: Tensor, cos_weight: float = 1.0,
                 cos_type: str = "raw") -> Tuple[Tensor, Dict[str, float]]:
    """Sum over layers of L1 + cos_weight * cosine term, averaged over valid frames.

    predictions, targets: (batch, frames, dim) each; frame_mask: (batch, frames), True = valid.
    cos term: ``-cos`` ("raw") or ``-log sigmoid(cos)`` ("log_sig").
    Returns the loss and detached per-part values (for logging; they sync with the device).
    """
    if cos_type not in COS_TYPES:
        raise ValueError(f"cos_type must be one of {COS_TYPES}, got {cos_type!r}")
    valid = frame_mask.to(predictions[0].dtype)
    count = valid.sum().clamp(min=1)
    l1_total = predictions[0].new_zeros(())
    cos_total = predictions[0].new_zeros(())
    for pred, target in zip(predictions, targets):
        l1 = ((pred - target).abs().mean(-1) * valid).sum() / count
        cos = F.cosine_similarity(pred, target, dim=-1)
        cos_term = -cos if cos_type == "raw" else -F.logsigmoid(cos)
        l1_total = l1_total + l1
        cos_total = cos_total + (cos_term * valid).sum() / count
    loss = l1_total + cos_weight * cos_total
    return loss, {"l1": l1_total.detach(), "cos": cos_total.detach()}


def frame_mask(lengths: Tensor, frames: int) -> Tensor:
    """lengths: (batch,) valid frames -> (batch, frames) bool, True = valid."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]
