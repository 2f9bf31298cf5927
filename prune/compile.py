"""Gated model -> plain, physically smaller encoder that computes what the gated model computes in eval."""

from __future__ import annotations

import copy
from typing import Dict

import torch
from torch import Tensor

from .models import EncoderConfig, Wav2Vec2Model, build_encoder
from .structures import FeatureProjectionInput, GatedEncoder


@torch.no_grad()
def compile_encoder(gated: GatedEncoder) -> Wav2Vec2Model:
    """Cut every gated structure to its eval-mode survivors and fold their soft gate values
    into the weights. Returns a new ``Wav2Vec2Model`` (eval mode, on the CPU) whose config
    records the per-layer shapes; ``gated`` is left as it was."""
    was_training = gated.training
    src = gated if next(gated.parameters()).device.type == "cpu" else copy.deepcopy(gated).cpu()
    src.eval()
    try:
        model = src.model
        cfg = copy.deepcopy(model.config.to_dict())
        state: Dict[str, Tensor] = {}
        kept = torch.zeros(1, dtype=torch.long)  # the waveform: one input channel
        for conv in src.conv:
            kept = conv.cut(model, cfg, state, kept)
        FeatureProjectionInput.cut(model, state, kept)
        for block in list(src.attention) + list(src.feed_forward):
            block.cut(model, cfg, state)
        compiled = build_encoder(EncoderConfig.from_dict(cfg))
        source_state = model.state_dict()
        for name in compiled.state_dict():  # what no gate touches: positional conv, LayerNorms, bias table
            if name not in state:
                state[name] = source_state[name]
        compiled.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    finally:
        gated.train(was_training)
    return compiled.eval()
