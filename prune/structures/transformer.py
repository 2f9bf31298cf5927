"""A transformer layer's structures: the attention block (its heads and the block as a whole) and
the feed-forward block (its intermediate units and the block as a whole)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ..gates import HardConcrete
from ..models.config import EncoderConfig
from .base import (ATTENTION_BLOCK, FFN_BLOCK, FFN_UNITS, HEADS, GateConfig, Structure, keep_of, kept_index,
                   make_gate, open_index, soft_values)
from .costs import any_kept, attention_macs, attention_params, feed_forward_macs, feed_forward_params
from .cut_plan import CutPlan

LAYER = "encoder.transformer.layers.{}."


class _GatedBlock(Structure):
    """A block of transformer layer ``layer`` with a group of ``n`` unit gates (``unit_kind``) and
    one gate on the whole block (``block_kind``). Subclasses name the gate attributes (their
    state-dict names) and write the costs and the cut."""

    unit_kind: str
    block_kind: str
    unit_attr: str  # the gates' attribute names, i.e. their state-dict names
    block_attr: str
    unit_field: str  # the LayerGates fields this block fills
    block_field: str

    def __init__(self, config: EncoderConfig, layer: int, exists: bool, n: int, units_on: bool, units_init: float,
                 block_on: bool, gates: GateConfig):
        super().__init__(config)
        self.layer = layer
        self.exists = exists
        self.n = n if exists else 0
        setattr(self, self.unit_attr, make_gate(self.n, units_on, units_init, gates.init_std))
        setattr(self, self.block_attr, make_gate(1, block_on and exists, gates.init_mean, gates.init_std))

    def _gate_of(self, kind: str) -> Optional[HardConcrete]:
        return getattr(self, self.unit_attr if kind == self.unit_kind else self.block_attr)

    def gates(self) -> Dict[str, HardConcrete]:
        found = {kind: self._gate_of(kind) for kind in (self.unit_kind, self.block_kind)}
        return {kind: gate for kind, gate in found.items() if gate is not None}

    def keep(self, like: Tensor) -> Dict[str, Tensor]:
        return {self.unit_kind: keep_of(self._gate_of(self.unit_kind), self.n, like),
                self.block_kind: keep_of(self._gate_of(self.block_kind), 1, like)}

    def _counts(self, like: Tensor):
        """(expected kept units, P(any unit kept), P(block kept))."""
        keep = self.keep(like)
        units = keep[self.unit_kind]
        return units.sum(), any_kept(units), keep[self.block_kind][0]

    def _cut_masks(self):
        """The eval masks: (unit mask or None, the block's scale: 1.0 or its soft value)."""
        masks = self.masks()
        block = masks.get(self.block_kind)
        return masks.get(self.unit_kind), 1.0 if block is None else block[0]

    def layer_fields(self, masks: Dict[str, Tensor], flags: Optional[Dict[str, Tensor]],
                     min_closed: float) -> Dict[str, Any]:
        units, block = masks.get(self.unit_kind), masks.get(self.block_kind)
        fields = {self.unit_field: units, self.block_field: None if block is None else block[0]}
        if flags is not None:
            fields[self.unit_field + "_active"] = None if units is None else \
                open_index(flags.get(self.unit_kind), min_closed, units.device)
            block_flag = flags.get(self.block_kind)
            fields[self.block_field + "_on"] = True if block_flag is None else bool(block_flag)
        return fields


class AttentionBlock(_GatedBlock):
    """The attention block of transformer layer ``layer``: its heads and the block as a whole."""

    kind = "attention"
    group = "attention"
    unit_kind, block_kind, unit_field, block_field = HEADS, ATTENTION_BLOCK, "heads", "attention"
    unit_attr, block_attr = "head_gate", "layer_gate"

    def __init__(self, config: EncoderConfig, layer: int, gates: GateConfig):
        exists = config.encoder_attention_kept[layer]
        super().__init__(config, layer, exists, config.encoder_num_heads[layer], gates.attention_heads,
                         gates.init_mean, gates.attention_layers, gates)
        self.num_heads = self.n

    def params(self, like: Tensor) -> Tensor:
        if not self.exists:
            return like
        heads, any_head, kept = self._counts(like)
        c = self.config
        return kept * attention_params(c.encoder_embed_dim, c.encoder_head_dim, heads, any_head, c.is_wavlm,
                                       c.encoder_layer_norm_first)

    def macs(self, frames: List[int], like: Tensor) -> Tensor:
        if not self.exists:
            return like
        heads, _, kept = self._counts(like)
        c = self.config
        return kept * attention_macs(frames[-1], c.encoder_embed_dim, c.encoder_head_dim, heads, c.is_wavlm)

    @torch.no_grad()
    def plan(self, plan: CutPlan) -> None:
        """Keep the open heads' q/k/v rows and out_proj columns, folding each head's soft gate value
        and the block's into out_proj; a closed block leaves the layer's residual path only."""
        if not self.exists:
            return
        head_mask, block_scale = self._cut_masks()
        cfg, layer = plan.config, self.layer
        if block_scale == 0:
            cfg["encoder_attention_kept"][layer] = False
            cfg["encoder_num_heads"][layer] = 0
            if cfg.get("encoder_head_index") is not None:
                cfg["encoder_head_index"][layer] = []
            return
        kept = kept_index(head_mask, self.num_heads)
        prefix = LAYER.format(layer) + "attention."
        plan.scale(prefix + "out_proj.bias", block_scale)
        if len(kept) > 0:
            d = self.config.encoder_head_dim
            rows = (kept[:, None] * d + torch.arange(d)).flatten()
            for name in ("q_proj", "k_proj", "v_proj"):
                plan.select(prefix + name + ".weight", 0, rows)
                plan.select(prefix + name + ".bias", 0, rows)
            plan.scale(prefix + "out_proj.weight", soft_values(head_mask, self.num_heads).repeat_interleave(d)
                       * block_scale, dim=1)
            plan.select(prefix + "out_proj.weight", 1, rows)
            if self.config.is_wavlm:
                plan.select(prefix + "gru_rel_pos_const", 1, kept)
        cfg["encoder_num_heads"][layer] = len(kept)
        if cfg.get("encoder_head_index") is not None:
            cfg["encoder_head_index"][layer] = [cfg["encoder_head_index"][layer][i] for i in kept.tolist()]


class FeedForwardBlock(_GatedBlock):
    """The feed-forward block of transformer layer ``layer``: its units and the block as a whole."""

    kind = "feed_forward"
    group = "feed_forward"
    unit_kind, block_kind, unit_field, block_field = FFN_UNITS, FFN_BLOCK, "units", "ffn"
    unit_attr, block_attr = "unit_gate", "layer_gate"

    def __init__(self, config: EncoderConfig, layer: int, gates: GateConfig):
        exists = config.encoder_ff_kept[layer]
        super().__init__(config, layer, exists, config.encoder_ff_interm_features[layer], gates.ffn_units,
                         gates.ffn_units_init_mean, gates.ffn_layers, gates)
        self.num_units = self.n

    def params(self, like: Tensor) -> Tensor:
        if not self.exists:
            return like
        units, any_unit, kept = self._counts(like)
        c = self.config
        return kept * feed_forward_params(c.encoder_embed_dim, units, any_unit, c.encoder_layer_norm_first)

    def macs(self, frames: List[int], like: Tensor) -> Tensor:
        if not self.exists:
            return like
        units, _, kept = self._counts(like)
        return kept * feed_forward_macs(frames[-1], self.config.encoder_embed_dim, units)

    @torch.no_grad()
    def plan(self, plan: CutPlan) -> None:
        """Keep the open units' intermediate rows and output columns, folding their soft gate values
        and the block's into output_dense."""
        if not self.exists:
            return
        unit_mask, block_scale = self._cut_masks()
        cfg, layer = plan.config, self.layer
        if block_scale == 0:
            cfg["encoder_ff_kept"][layer] = False
            cfg["encoder_ff_interm_features"][layer] = 0
            return
        kept = kept_index(unit_mask, self.num_units)
        prefix = LAYER.format(layer) + "feed_forward."
        plan.scale(prefix + "output_dense.bias", block_scale)
        if len(kept) > 0:
            plan.select(prefix + "intermediate_dense.weight", 0, kept)
            plan.select(prefix + "intermediate_dense.bias", 0, kept)
            plan.scale(prefix + "output_dense.weight", soft_values(unit_mask, self.num_units) * block_scale, dim=1)
            plan.select(prefix + "output_dense.weight", 1, kept)
        cfg["encoder_ff_interm_features"][layer] = len(kept)
