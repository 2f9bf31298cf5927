"""Layer-to-layer distillation: prediction heads and the L1 + cosine loss (DPHuBERT,
Peng et al., Interspeech 2023)."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COS_TYPES = ("raw", "log_sig")
MODES = ("layer2layer", "prediction")
REDUCTIONS = ("sum", "mean")  # over the distilled layers
# what "layer 0" means as a target: transformers' hidden_states[0] (after the positional conv and,
# post-norm, the LayerNorm), or the feature projection's output before the positional conv
# (DPHuBERT: its Encoder.extract_features returns [x] + layer outputs, x = feature_projection(...))
LAYER0 = ("hidden", "projection")


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

    @torch.no_grad()
    def keep_inputs(self, index: Sequence[int]) -> None:
        """After a cut of the student's hidden dimension: each head reads only the kept channels
        (``index``: their positions in its input). The removed ones were exact zeros in the gated
        student, so their columns contributed nothing and the predictions are unchanged."""
        for head in self.heads:
            rows = torch.as_tensor(list(index), dtype=torch.long, device=head.weight.device)
            head.weight = nn.Parameter(head.weight.index_select(1, rows).clone())
            head.in_features = len(rows)

    def forward(self, hiddens: List[Tensor]) -> List[Tensor]:
        """hiddens: the student's hidden states -> predictions, (batch, frames, dim), for ``self.layers``"""
        if self.mode == "prediction":
            return [self.heads[self._head_of[layer]](hiddens[-1]) for layer in self.layers]
        return [self.heads[self._head_of[layer]](hiddens[layer]) for layer in self.layers]


def distill_loss(predictions: List[Tensor], targets: List[Tensor], frame_mask: Tensor, cos_weight: float = 1.0,
                 cos_type: str = "raw", reduction: str = "sum") -> Tuple[Tensor, Dict[str, float]]:
    """L1 + cos_weight * cosine term per layer, averaged over valid frames, then summed
    ("sum") or averaged ("mean", DPHuBERT's ``DistillLoss`` on the layers stacked) over layers.

    predictions, targets: (batch, frames, dim) each; frame_mask: (batch, frames), True = valid.
    cos term: ``-cos`` ("raw") or ``-log sigmoid(cos)`` ("log_sig").
    Returns the loss and detached per-part values (for logging; they sync with the device):
    ``l1`` and ``cos`` as in the loss, and ``layer_l1`` and ``layer_cos``, (layers,): each
    layer's L1 and raw cosine similarity to its target (the quality figures of the report).
    """
    if cos_type not in COS_TYPES:
        raise ValueError(f"cos_type must be one of {COS_TYPES}, got {cos_type!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    valid = frame_mask.to(predictions[0].dtype)
    count = valid.sum().clamp(min=1)
    l1_total = predictions[0].new_zeros(())
    cos_total = predictions[0].new_zeros(())
    layer_l1, layer_cos = [], []
    for pred, target in zip(predictions, targets):
        l1 = ((pred - target).abs().mean(-1) * valid).sum() / count
        cos = F.cosine_similarity(pred, target, dim=-1)
        cos_term = -cos if cos_type == "raw" else -F.logsigmoid(cos)
        l1_total = l1_total + l1
        cos_total = cos_total + (cos_term * valid).sum() / count
        layer_l1.append(l1.detach())
        layer_cos.append((cos.detach() * valid).sum() / count)
    if reduction == "mean":
        l1_total, cos_total = l1_total / len(predictions), cos_total / len(predictions)
    loss = l1_total + cos_weight * cos_total
    return loss, {"l1": l1_total.detach(), "cos": cos_total.detach(), "layer_l1": torch.stack(layer_l1),
                  "layer_cos": torch.stack(layer_cos)}


def frame_mask(lengths: Tensor, frames: int) -> Tensor:
    """lengths: (batch,) valid frames -> (batch, frames) bool, True = valid."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


def _plain(model: nn.Module) -> nn.Module:
    """The Wav2Vec2Model inside a gated encoder (or the model itself)."""
    return getattr(model, "model", model)


@contextlib.contextmanager
def projection_as_layer0(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, ``model``'s hidden state 0 is its feature projection's output (the
    transformer's input before the positional conv), as DPHuBERT distils it. Padded frames are
    not zeroed in it; the loss masks them."""
    if not enabled:
        yield
        return
    taken: List[Optional[Tensor]] = [None]
    projection = _plain(model).encoder.feature_projection
    tap = projection.register_forward_hook(lambda module, args, out: taken.__setitem__(0, out))
    encoder = _plain(model).encoder
    swap = encoder.register_forward_hook(lambda module, args, hiddens: [taken[0], *hiddens[1:]])
    try:
        yield
    finally:
        tap.remove()
        swap.remove()
