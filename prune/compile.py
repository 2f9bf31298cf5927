"""Gated model -> plain, physically smaller encoder that computes what the gated model computes in eval."""

from __future__ import annotations

import copy

import torch

from .models import EncoderConfig, Wav2Vec2Model, build_encoder
from .structures import CutPlan, GatedEncoder


@torch.no_grad()
def compile_encoder(gated: GatedEncoder) -> Wav2Vec2Model:
    """Cut every gated structure to its eval-mode survivors and fold their soft gate values
    into the weights. Returns a new ``Wav2Vec2Model`` (eval mode, on the CPU) whose config
    records the per-layer shapes; ``gated`` is left as it was.

    Each structure records its cut into one ``CutPlan`` (index selections per tensor dimension,
    scales, config edits); the plan is then applied to the source state dict at once, so several
    structures may slice one tensor, and the plain model loads it strictly."""
    was_training = gated.training
    src = gated if next(gated.parameters()).device.type == "cpu" else copy.deepcopy(gated).cpu()
    src.eval()
    try:
        model = src.model
        plan = CutPlan(model.state_dict(), copy.deepcopy(model.config.to_dict()))
        for structure in src.structures:
            structure.plan(plan)
        compiled = build_encoder(EncoderConfig.from_dict(plan.config))
        compiled.load_state_dict(plan.apply(compiled.state_dict()), strict=True)
    finally:
        gated.train(was_training)
    return compiled.eval()
