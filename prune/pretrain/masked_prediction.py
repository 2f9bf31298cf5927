"""HuBERT-style masked prediction: the model that pre-trains an encoder from scratch.

Spans of frames are replaced by a learned mask embedding after the feature projection; the
transformer's last hidden state is projected and scored against one embedding per cluster by
cosine similarity / temperature (HuBERT's ``final_proj`` and ``label_embs_concat``); the loss
is cross-entropy on the masked frames (HuBERT's default: unmasked frames weigh 0).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import Wav2Vec2Model

IGNORE = -100  # label of padding frames


def span_mask(frame_lengths: Tensor, total_frames: int, prob: float, span: int,
              generator: Optional[torch.Generator] = None) -> Tensor:
    """Random spans to mask, as HuBERT/wav2vec 2.0 draw them: per row of ``T`` valid frames,
    ``prob * T / span`` (randomly rounded) spans of ``span`` frames start uniformly at random;
    spans may overlap, so somewhat less than ``prob`` of the frames end up masked.

    frame_lengths: (batch,) -> mask (batch, total_frames), True = masked; padding is never masked.
    """
    mask = torch.zeros(len(frame_lengths), total_frames, dtype=torch.bool)
    for row, t in enumerate(frame_lengths.tolist()):
        if t <= 0:
            continue
        width = min(span, t)
        count = int(prob * t / span + torch.rand((), generator=generator))
        starts = torch.randint(0, t - width + 1, (count,), generator=generator)
        for s in starts.tolist():
            mask[row, s:s + width] = True
    return mask


class MaskedPrediction(nn.Module):
    """An encoder with HuBERT's pre-training head.

    Args:
        encoder: the ``Wav2Vec2Model`` being pre-trained (what is exported afterwards).
        num_clusters: number of target classes (k-means clusters).
        final_dim: size of the space where frames and cluster embeddings are compared.
        logit_temp: temperature of the cosine-similarity logits (HuBERT: 0.1).
        feature_grad_mult: scale of the gradient reaching the conv feature extractor (HuBERT Base: 0.1).
    """

    def __init__(self, encoder: Wav2Vec2Model, num_clusters: int, final_dim: int = 256, logit_temp: float = 0.1,
                 feature_grad_mult: float = 0.1):
        super().__init__()
        dim = encoder.config.encoder_embed_dim
        self.encoder = encoder
        self.mask_embedding = nn.Parameter(torch.empty(dim).uniform_())
        self.final_proj = nn.Linear(dim, final_dim)
        self.label_embeddings = nn.Parameter(torch.empty(num_clusters, final_dim).uniform_())
        self.logit_temp = logit_temp
        self.feature_grad_mult = feature_grad_mult

    def forward(self, waveforms: Tensor, lengths: Tensor, mask: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tensor, Tensor]:
        """waveforms: (batch, samples), lengths: (batch,) samples, mask: (batch, frames) or None ->
        logits (batch, frames, num_clusters), feature penalty (scalar: mean square of the conv
        features, which HuBERT adds to the loss), valid frames per row (batch,)."""
        waveforms = self.encoder.prepare_waveforms(waveforms, lengths)  # as the encoder's own forward does
        feats, frames = self.encoder.feature_extractor(waveforms, lengths)
        penalty = feats.float().pow(2).mean()
        if self.feature_grad_mult != 1.0:  # same value, scaled gradient
            feats = feats * self.feature_grad_mult + feats.detach() * (1.0 - self.feature_grad_mult)
        x, key_padding_mask = self.encoder.encoder.preprocess(feats, frames)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_embedding.to(x.dtype), x)
        hiddens = self.encoder.encoder.transformer(x, key_padding_mask)
        proj = F.normalize(self.final_proj(hiddens[-1]), dim=-1)
        logits = proj @ F.normalize(self.label_embeddings, dim=-1).T / self.logit_temp
        return logits, penalty, frames


def masked_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """logits: (batch, frames, classes), labels: (batch, frames) (``IGNORE`` on padding),
    mask: (batch, frames) -> cross-entropy and accuracy over the masked, labelled frames."""
    chosen = mask & (labels != IGNORE)
    picked, target = logits[chosen], labels[chosen]
    loss = F.cross_entropy(picked, target)
    accuracy = (picked.argmax(-1) == target).float().mean()
    return loss, accuracy.detach()
