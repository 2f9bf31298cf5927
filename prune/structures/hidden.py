"""The hidden dimension: one gate over the D channels of the residual stream, shared by everything
that reads or writes it (docs/design.md, "The hidden dimension as a structure").

Channel c of one layer's output is channel c of the next layer's input, so one gate decides it
everywhere: the feature projection's output rows, the positional conv (both sides, per group),
every LayerNorm over D, the q/k/v input columns and out_proj rows, the FFN's input columns and
output rows. This structure owns the parts no block owns (the positional conv, the transformer's
LayerNorm, post-norm's per-layer LayerNorms) and gives the other structures the expected kept
width ``embed(like)`` their cost formulas read in place of ``encoder_embed_dim``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from ..models.config import EncoderConfig
from .base import HIDDEN, GateConfig, Structure, keep_of, kept_index, make_gate, soft_values
from .costs import hidden_norm_params, pos_conv_macs, pos_conv_params
from .cut_plan import CutPlan

PROJECTION = "encoder.feature_projection."
TRANSFORMER = "encoder.transformer."
POS_CONV = TRANSFORMER + "pos_conv_embed.conv."
LAYER = TRANSFORMER + "layers.{}."


class HiddenDim(Structure):
    """The residual stream's D channels (``encoder_embed_dim``), one ``HardConcrete(D)``.

    Once it has a gate the compiled positional conv is one plain conv per group (its groups keep
    different counts): ``pos_conv_params`` counts it so whether or not a channel was removed, so
    the count is a function of the gates' state, the same in training and in eval."""

    kind = "hidden"
    group = "hidden"

    def __init__(self, config: EncoderConfig, gates: GateConfig):
        super().__init__(config)
        self.channels = config.encoder_embed_dim
        self.gate = make_gate(self.channels, gates.hidden_dim, gates.init_mean, gates.init_std)
        # the post-norm layers whose two LayerNorms this structure counts: every layer that is one
        # (not an identity), less those a whole-layer gate owns (``release_norms``)
        self.norm_layers = [] if config.encoder_layer_norm_first else \
            [i for i, kept in enumerate(config.layer_kept) if kept]

    def release_norms(self, layer: int) -> None:
        """Layer ``layer``'s LayerNorms are counted by its whole-layer gate's structure from now on."""
        self.norm_layers.remove(layer)

    def gates(self):
        return {} if self.gate is None else {HIDDEN: self.gate}

    def hidden_keep(self, like: Tensor) -> Tensor:
        """(D,) keep vector of the hidden channels."""
        return keep_of(self.gate, self.channels, like)

    def keep(self, like: Tensor) -> Dict[str, Tensor]:
        return {HIDDEN: self.hidden_keep(like)}

    def embed(self, like: Tensor) -> Tensor:
        """E[D']: the expected kept width (exactly D without a gate)."""
        return self.hidden_keep(like).sum()

    @property
    def groupwise(self) -> bool:
        """Whether the compiled positional conv is one conv per group (a cut) or the weight-normed one."""
        return self.gate is not None or self.config.encoder_pos_conv_group_sizes is not None

    def group_bounds(self) -> List[int]:
        """The source positional conv's group boundaries: [0, n_0, n_0 + n_1, ..., D]."""
        c = self.config
        sizes = c.encoder_pos_conv_group_sizes or [c.encoder_embed_dim // c.encoder_pos_conv_groups] \
            * c.encoder_pos_conv_groups
        return [sum(sizes[:g]) for g in range(len(sizes) + 1)]

    def _sum_sq(self, keep: Tensor) -> Tensor:
        """E[sum over groups of n_g^2], n_g the kept channels of group g: a group maps its channels to
        themselves, so input and output are the same gates and E[n_g^2] = E[n_g]^2 + sum p (1 - p)."""
        bounds = self.group_bounds()
        total = keep.new_zeros(())
        for a, b in zip(bounds[:-1], bounds[1:]):
            p = keep[a:b]
            total = total + p.sum().square() + (p * (1.0 - p)).sum()
        return total

    def params(self, like: Tensor) -> Tensor:
        c = self.config
        keep = self.hidden_keep(like)
        D = keep.sum()
        conv = pos_conv_params(c.encoder_pos_conv_kernel, self._sum_sq(keep), D, not self.groupwise)
        return conv + hidden_norm_params(D, c.encoder_layer_norm_first, len(self.norm_layers))

    def macs(self, frames: List[int], like: Tensor) -> Tensor:
        return pos_conv_macs(frames[-1], self.config.encoder_pos_conv_kernel, self._sum_sq(self.hidden_keep(like)))

    def eval_mask(self) -> Optional[Tensor]:
        return None if self.gate is None else self.gate()

    @torch.no_grad()
    def plan(self, plan: CutPlan) -> None:
        """Keep the open channels everywhere along D, folding their soft values into every write
        into the residual stream and every LayerNorm over D; the positional conv (gated by the 0/1
        pattern) becomes one plain conv per group with its weight norm materialised. Tensors a
        block's cut removed are skipped (``optional``)."""
        if self.gate is None:
            return
        c = self.config
        mask = self.eval_mask()
        kept, scale = kept_index(mask, self.channels), soft_values(mask, self.channels)

        def rows(name: str, scaled: bool = True) -> None:  # dim 0 of a weight or a vector, along D
            plan.select(name, 0, kept, optional=True)
            if scaled:
                plan.scale(name, scale, dim=0, optional=True)

        for name in ("projection.weight", "projection.bias", "phantom"):
            rows(PROJECTION + name)
        self._plan_pos_conv(plan, kept)
        for name in ("layer_norm.weight", "layer_norm.bias"):
            rows(TRANSFORMER + name)
        for layer in range(c.encoder_num_layers):
            prefix = LAYER.format(layer)
            for name in ("layer_norm", "final_layer_norm"):
                rows(prefix + name + ".weight")
                rows(prefix + name + ".bias")
            for name in ("q_proj", "k_proj", "v_proj"):  # the input columns: the removed ones read zeros
                plan.select(prefix + "attention." + name + ".weight", 1, kept, optional=True)
            plan.select(prefix + "feed_forward.intermediate_dense.weight", 1, kept, optional=True)
            for name in ("attention.out_proj", "feed_forward.output_dense"):
                rows(prefix + name + ".weight")
                rows(prefix + name + ".bias")
        index = c.hidden_index
        plan.config["encoder_embed_dim"] = len(kept)
        plan.config["encoder_hidden_total"] = c.hidden_total
        plan.config["encoder_hidden_index"] = [index[i] for i in kept.tolist()]

    def _plan_pos_conv(self, plan: CutPlan, kept: Tensor) -> None:
        """Group g keeps its open channels on both sides of its weight (within-group positions)."""
        src = plan.source
        bounds = self.group_bounds()
        if self.config.encoder_pos_conv_group_sizes is None:  # materialise the weight norm once
            weight = torch._weight_norm(src[POS_CONV + "weight_v"], src[POS_CONV + "weight_g"], 2)
        sizes = []
        for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            local = kept[(kept >= a) & (kept < b)] - a
            name = POS_CONV + f"weights.{g}"
            if self.config.encoder_pos_conv_group_sizes is None:
                plan.replace(name, weight[a:b])
            plan.select(name, 0, local)
            plan.select(name, 1, local)
            sizes.append(len(local))
        plan.select(POS_CONV + "bias", 0, kept)
        plan.config["encoder_pos_conv_group_sizes"] = sizes
