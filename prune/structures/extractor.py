"""The conv extractor's structures: each conv layer's output channels, and the feature projection's
input features (the last conv layer's channels, seen through the projection's LayerNorm)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from ..models.config import EncoderConfig
from .base import CONV_CHANNELS, GateConfig, Structure, keep_of, kept_index, make_gate, soft_values
from .costs import conv_macs, conv_params, projection_params
from .cut_plan import CutPlan
from .hidden import HiddenDim

CONV = "feature_extractor.conv_layers.{}."
PROJECTION = "encoder.feature_projection."


def has_conv_norm(config: EncoderConfig, index: int) -> bool:
    return config.extractor_mode == "layer_norm" or index == 0


def exact_in_transformers(config: EncoderConfig) -> List[bool]:
    """Per conv layer: can a standard transformers model hold it with channels removed, exactly?
    A removed channel must leave no trace but in its own rows and the next layer's columns. That
    holds where no LayerNorm over the channels follows: conv layer 0's GroupNorm has one group per
    channel (transformers' ``Wav2Vec2GroupNormConvLayer``: num_groups = channels), so it slices;
    layers 1.. of a ``group_norm`` extractor have no norm. It fails for a LayerNorm over the
    channels, whose mean and variance counted the removed channels as zeros (prune keeps them with
    ``PhantomLayerNorm``, transformers' ``nn.LayerNorm`` cannot): every layer of a ``layer_norm``
    extractor, and the last layer of any extractor, which the feature projection's LayerNorm reads
    (prune also carries the removed channels' normalised value in ``feature_projection.phantom``)."""
    n = len(config.extractor_conv_layer_config)
    if config.extractor_mode == "layer_norm":
        return [False] * n
    return [i < n - 1 for i in range(n)]


class ConvChannels(Structure):
    """Output channels of conv layer ``index``. Its cut slices that layer's rows and the next
    layer's input columns; the last layer's channels also shape the feature projection
    (``FeatureProjectionInput``)."""

    kind = "conv_channels"
    group = "conv"

    def __init__(self, config: EncoderConfig, index: int, gates: GateConfig, previous: Optional["ConvChannels"],
                 gated: bool = True):
        super().__init__(config)
        self.index = index
        self.channels, self.kernel, _ = config.extractor_conv_layer_config[index]
        # gated=False: this layer's channels are not pruned (uniform mode: a layer transformers cannot cut exactly)
        self.gate = make_gate(self.channels, gates.conv_channels and gated, gates.init_mean, gates.init_std)
        self._previous = (previous,)  # a reference, not a submodule: the gate belongs to its own layer

    def gates(self):
        return {} if self.gate is None else {CONV_CHANNELS: self.gate}

    def channel_keep(self, like: Tensor) -> Tensor:
        """(channels,) keep vector of the output channels."""
        return keep_of(self.gate, self.channels, like)

    def keep(self, like: Tensor) -> Dict[str, Tensor]:
        return {CONV_CHANNELS: self.channel_keep(like)}

    def input_keep(self, like: Tensor) -> Tensor:
        """The input channels' keep vector: the previous layer's, or the waveform's one channel."""
        previous = self._previous[0]
        return like.new_ones(1) if previous is None else previous.channel_keep(like)

    def params(self, like: Tensor) -> Tensor:
        return conv_params(self.kernel, self.input_keep(like).sum(), self.channel_keep(like).sum(),
                           self.config.extractor_conv_bias, has_conv_norm(self.config, self.index))

    def macs(self, frames: List[int], like: Tensor) -> Tensor:
        return conv_macs(frames[self.index], self.kernel, self.input_keep(like).sum(), self.channel_keep(like).sum())

    def eval_mask(self) -> Optional[Tensor]:
        return None if self.gate is None else self.gate()

    def kept(self) -> Tensor:
        return kept_index(self.eval_mask(), self.channels)

    @torch.no_grad()
    def plan(self, plan: CutPlan) -> None:
        """Keep this layer's open channels and fold the gate's soft values into what precedes the
        GELU: the GroupNorm's affine map (per channel, so slicing is exact), else the conv itself
        (and the channel LayerNorm's affine map, gated before and after it)."""
        mask = self.eval_mask()
        kept, scale = kept_index(mask, self.channels), soft_values(mask, self.channels)
        prefix = CONV.format(self.index)
        conv = [prefix + "conv.weight"] + ([prefix + "conv.bias"] if self.config.extractor_conv_bias else [])
        norm = [prefix + "layer_norm.weight", prefix + "layer_norm.bias"] \
            if has_conv_norm(self.config, self.index) else []
        group_norm = bool(norm) and self.config.extractor_mode != "layer_norm"  # GroupNorm: layer 0 only
        for name in conv + norm:
            plan.select(name, 0, kept)
        for name in norm + ([] if group_norm else conv):
            plan.scale(name, scale, dim=0)
        if self.index + 1 < len(self.config.extractor_conv_layer_config):
            plan.select(CONV.format(self.index + 1) + "conv.weight", 1, kept)
        spec = plan.config["extractor_conv_layer_config"][self.index]
        plan.config["extractor_conv_layer_config"][self.index] = [len(kept), spec[1], spec[2]]


class FeatureProjectionInput(Structure):
    """The feature projection's input features: the last conv layer's channels. It has no gate
    of its own; removed channels stay in its LayerNorm's statistics as zeros, and their
    normalised value reaches the projection through the ``phantom`` vector."""

    kind = "projection_input"
    group = "projection"

    def __init__(self, config: EncoderConfig, last_conv: ConvChannels, hidden: HiddenDim):
        super().__init__(config)
        self._last_conv = (last_conv,)
        self._hidden = (hidden,)  # its output rows are the hidden dimension's channels

    def params(self, like: Tensor) -> Tensor:
        keep = self._last_conv[0].channel_keep(like)
        had_phantom = float(self.config.extractor_norm_channels[-1] > keep.numel())
        phantom = 1.0 - (1.0 - had_phantom) * torch.prod(keep)
        return projection_params(keep.sum(), self._hidden[0].embed(like), phantom)

    def macs(self, frames: List[int], like: Tensor) -> Tensor:
        return frames[-1] * self._last_conv[0].channel_keep(like).sum() * self._hidden[0].embed(like)

    @torch.no_grad()
    def plan(self, plan: CutPlan) -> None:
        """Keep the last conv layer's open channels' LayerNorm entries and projection columns; a
        removed channel's normalised value is ``shift * w + b``: b folds into the bias, w into phantom."""
        last = self._last_conv[0]
        kept = last.kept()
        removed = torch.ones(last.channels, dtype=torch.bool)
        removed[kept] = False
        src = plan.source
        W = src[PROJECTION + "projection.weight"]
        for name in (PROJECTION + "layer_norm.weight", PROJECTION + "layer_norm.bias"):
            plan.select(name, 0, kept)
        plan.select(PROJECTION + "projection.weight", 1, kept)
        if self.config.extractor_output_scale:
            plan.select("feature_extractor.output_scale", 0, kept)
        plan.replace(PROJECTION + "projection.bias", src[PROJECTION + "projection.bias"]
                     + W[:, removed] @ src[PROJECTION + "layer_norm.bias"][removed])
        phantom = W[:, removed] @ src[PROJECTION + "layer_norm.weight"][removed]
        had_phantom = PROJECTION + "phantom" in src
        if had_phantom:
            phantom = phantom + src[PROJECTION + "phantom"]
        if had_phantom or removed.any():
            plan.replace(PROJECTION + "phantom", phantom)
