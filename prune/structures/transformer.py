"""A transformer layer's structures: the attention block (its heads, the query/key and value dims
inside them, and the block as a whole) and the feed-forward block (its intermediate units and the
block as a whole)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ..gates import HardConcrete
from ..models.config import EncoderConfig
from .base import (ATTENTION_BLOCK, FFN_BLOCK, FFN_UNITS, HEAD_QK_DIMS, HEAD_V_DIMS, HEADS, GateConfig, Structure,
                   keep_of, kept_index, make_gate, open_index, soft_values)
from .costs import any_kept, attention_macs, attention_params, feed_forward_macs, feed_forward_params, post_norm_params
from .cut_plan import CutPlan
from .hidden import HiddenDim

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
    kept_config: str  # the config fields of the block's presence and of its unit count
    count_config: str

    def __init__(self, config: EncoderConfig, layer: int, exists: bool, n: int, units_on: bool, units_init: float,
                 block_on: bool, gates: GateConfig, hidden: HiddenDim):
        super().__init__(config)
        self.layer = layer
        self._hidden = (hidden,)  # a reference, not a submodule: the model's one hidden-dimension gate
        self.exists = exists
        self.n = n if exists else 0
        setattr(self, self.unit_attr, make_gate(self.n, units_on, units_init, gates.init_std))
        setattr(self, self.block_attr, make_gate(1, block_on and exists, gates.init_mean, gates.init_std))
        self._block_owner: tuple = ()  # (block,) whose block gate also decides this one (``tie_block_to``)

    def tie_block_to(self, owner: "_GatedBlock") -> None:
        """Let ``owner``'s block gate decide this block too (uniform mode: a layer is removed whole,
        one decision for its attention and FFN blocks). This block's own block gate goes; the
        owner keeps the gate (its state-dict name, its place in the gate groups), this block reads
        its keep probability, its eval mask and, through ``GatedEncoder.sample_gates``, its sample."""
        setattr(self, self.block_attr, None)
        self._block_owner = (owner,)

    @property
    def block_owner(self) -> Optional["_GatedBlock"]:
        return self._block_owner[0] if self._block_owner else None

    def _gate_of(self, kind: str) -> Optional[HardConcrete]:
        if kind == self.block_kind and self._block_owner:
            return self._block_owner[0]._gate_of(self._block_owner[0].block_kind)
        return getattr(self, self.unit_attr if kind == self.unit_kind else self.block_attr)

    def gates(self) -> Dict[str, HardConcrete]:
        """Its own gates (a tied block gate belongs to its owner)."""
        found = {self.unit_kind: getattr(self, self.unit_attr), self.block_kind: getattr(self, self.block_attr)}
        return {kind: gate for kind, gate in found.items() if gate is not None}

    def keep(self, like: Tensor) -> Dict[str, Tensor]:
        return {self.unit_kind: keep_of(self._gate_of(self.unit_kind), self.n, like),
                self.block_kind: keep_of(self._gate_of(self.block_kind), 1, like)}

    def _counts(self, like: Tensor):
        """(expected kept units, P(any unit kept), P(block kept))."""
        keep = self.keep(like)
        units = keep[self.unit_kind]
        return units.sum(), any_kept(units), keep[self.block_kind][0]

    def params(self, like: Tensor) -> Tensor:
        """The block's cost formula at the expected kept units, times P(block kept)."""
        if not self.exists:
            return like
        units, any_unit, kept = self._counts(like)
        return kept * self.block_params(self._hidden[0].embed(like), units, any_unit)

    def macs(self, frames: List[int], like: Tensor) -> Tensor:
        if not self.exists:
            return like
        units, _, kept = self._counts(like)
        return kept * self.block_macs(frames[-1], self._hidden[0].embed(like), units)

    def block_params(self, embed: Tensor, units: Tensor, any_unit: Tensor) -> Tensor:
        """Params of the block with ``units`` kept (``any_unit``: P(at least one)) at the expected
        hidden width ``embed`` (independent gates: the product of expectations)."""
        raise NotImplementedError

    def block_macs(self, frames: int, embed: Tensor, units: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def plan(self, plan: CutPlan) -> None:
        """A closed block leaves the layer's residual path only; an open one keeps its open units
        (``plan_units``), with their soft gate values times the block's folded into its output."""
        if not self.exists:
            return
        unit_mask, block_scale = self._cut_masks()
        if block_scale == 0:
            plan.config[self.kept_config][self.layer] = False
            self.record_kept(plan.config, torch.zeros(0, dtype=torch.long))
            return
        kept = kept_index(unit_mask, self.n)
        self.plan_units(plan, kept, soft_values(unit_mask, self.n) * block_scale, block_scale)
        self.record_kept(plan.config, kept)

    def plan_units(self, plan: CutPlan, kept: Tensor, scales: Tensor, block_scale) -> None:
        """kept: the open units' indices; scales (n,): each unit's soft value x the block's."""
        raise NotImplementedError

    def record_kept(self, config: Dict[str, Any], kept: Tensor) -> None:
        config[self.count_config][self.layer] = len(kept)

    def _cut_masks(self):
        """The eval masks: (unit mask or None, the block's scale: 1.0 or its soft value)."""
        units, block = self._gate_of(self.unit_kind), self._gate_of(self.block_kind)
        return None if units is None else units(), 1.0 if block is None else block()[0]

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
    kept_config, count_config = "encoder_attention_kept", "encoder_num_heads"
    unit_attr, block_attr = "head_gate", "layer_gate"

    def __init__(self, config: EncoderConfig, layer: int, gates: GateConfig, hidden: HiddenDim):
        exists = config.encoder_attention_kept[layer]
        super().__init__(config, layer, exists, config.encoder_num_heads[layer], gates.attention_heads,
                         gates.init_mean, gates.attention_layers, gates, hidden)
        self.num_heads = self.n
        self.whole_layer = False  # its layer gate gates the whole layer, LayerNorms included (own_layer)
        # the dims inside the heads: one gate per dim, shared by the layer's heads (docs/design.md)
        self.qk_dim, self.v_dim = config.qk_dims[layer], config.v_dims[layer]
        self.qk_gate = make_gate(self.qk_dim if self.n else 0, gates.head_qk_dims, gates.init_mean, gates.init_std)
        self.v_gate = make_gate(self.v_dim if self.n else 0, gates.head_v_dims, gates.init_mean, gates.init_std)

    def gates(self) -> Dict[str, HardConcrete]:
        found = super().gates()
        for kind, gate in ((HEAD_QK_DIMS, self.qk_gate), (HEAD_V_DIMS, self.v_gate)):
            if gate is not None:
                found[kind] = gate
        return found

    def keep(self, like: Tensor) -> Dict[str, Tensor]:
        keep = super().keep(like)
        keep[HEAD_QK_DIMS] = keep_of(self.qk_gate, self.qk_dim, like)
        keep[HEAD_V_DIMS] = keep_of(self.v_gate, self.v_dim, like)
        return keep

    def dims(self, like: Tensor):
        """(E[d_qk], E[d_v]): the expected kept dims of each head (exactly the config's without gates)."""
        return keep_of(self.qk_gate, self.qk_dim, like).sum(), keep_of(self.v_gate, self.v_dim, like).sum()

    def own_layer(self) -> None:
        """Let this block's layer gate z gate the whole (post-norm) layer: the forward blends
        ``x + z (layer(x) - x)`` (``LayerGates.layer``), so a removed layer is an identity, its two
        LayerNorms gone with it; they are counted here (z x their params) instead of by the hidden
        dimension. The eval mask is hard (a kept layer's z is exactly 1: a blend with a soft z
        cannot fold into weights), so the cut is the plain layer or nothing. Uniform mode, post-norm
        only (a pre-norm layer without its blocks is already an identity)."""
        self.whole_layer = True
        self._hidden[0].release_norms(self.layer)
        if self.layer_gate is not None:
            self.layer_gate.set_hard()

    def block_params(self, embed: Tensor, heads: Tensor, any_head: Tensor) -> Tensor:
        c = self.config
        qk, v = self.dims(embed)
        params = attention_params(embed, c.encoder_head_dim, heads, any_head, c.is_wavlm, c.encoder_layer_norm_first,
                                  qk, v)
        return params + post_norm_params(embed) if self.whole_layer else params

    def plan(self, plan: CutPlan) -> None:
        super().plan(plan)
        if self.whole_layer and not plan.config["encoder_attention_kept"][self.layer]:
            n = self.config.encoder_num_layers
            kept = plan.config.get("encoder_layer_kept") or [True] * n
            kept[self.layer] = False  # an identity: its LayerNorms go too (the tied FFN block removes itself)
            plan.config["encoder_layer_kept"] = kept

    def layer_fields(self, masks: Dict[str, Tensor], flags: Optional[Dict[str, Tensor]],
                     min_closed: float) -> Dict[str, Any]:
        """With ``whole_layer`` the layer gate goes to ``LayerGates.layer`` (the blocks ungated);
        the dims gates to ``qk_dims`` / ``v_dims`` (their open dims to ``*_active``)."""
        fields = super().layer_fields(masks, flags, min_closed)
        for kind, field in ((HEAD_QK_DIMS, "qk_dims"), (HEAD_V_DIMS, "v_dims")):
            mask = masks.get(kind)
            fields[field] = mask
            if flags is not None and mask is not None:
                fields[field + "_active"] = open_index(flags.get(kind), min_closed, mask.device)
        if self.whole_layer:
            fields["layer"], fields[self.block_field] = fields[self.block_field], None
            if flags is not None:
                fields["layer_on"], fields[self.block_field + "_on"] = fields[self.block_field + "_on"], True
        return fields

    def block_macs(self, frames: int, embed: Tensor, heads: Tensor) -> Tensor:
        c = self.config
        qk, v = self.dims(embed)
        return attention_macs(frames, embed, c.encoder_head_dim, heads, c.is_wavlm, qk, v)

    def plan_units(self, plan: CutPlan, kept: Tensor, scales: Tensor, block_scale) -> None:
        """The open heads' q/k/v rows and out_proj columns (WavLM: their gate constants), of their
        open dims only: the query gate's soft values fold into q_proj's rows, the value gate's into
        v_proj's (the softmax scale stays 1 / sqrt(encoder_head_dim), the config keeps it)."""
        prefix = LAYER.format(self.layer) + "attention."
        plan.scale(prefix + "out_proj.bias", block_scale)
        qk_mask = None if self.qk_gate is None else self.qk_gate()
        v_mask = None if self.v_gate is None else self.v_gate()
        qk_kept, v_kept = kept_index(qk_mask, self.qk_dim), kept_index(v_mask, self.v_dim)
        if len(kept) > 0:
            qk_rows = (kept[:, None] * self.qk_dim + qk_kept).flatten()
            v_rows = (kept[:, None] * self.v_dim + v_kept).flatten()
            for name, rows in (("q_proj", qk_rows), ("k_proj", qk_rows), ("v_proj", v_rows)):
                plan.select(prefix + name + ".weight", 0, rows)
                plan.select(prefix + name + ".bias", 0, rows)
            for name, mask, n in (("q_proj", qk_mask, self.qk_dim), ("v_proj", v_mask, self.v_dim)):
                if mask is not None:  # per dim, the same in every head
                    per_row = soft_values(mask, n).repeat(self.num_heads)
                    plan.scale(prefix + name + ".weight", per_row, dim=0)
                    plan.scale(prefix + name + ".bias", per_row, dim=0)
            plan.scale(prefix + "out_proj.weight", scales.repeat_interleave(self.v_dim), dim=1)
            plan.select(prefix + "out_proj.weight", 1, v_rows)
            if self.config.is_wavlm:
                plan.select(prefix + "gru_rel_pos_const", 1, kept)
        for field, mask, counts, dims in (("encoder_head_qk_dims", qk_mask, self.config.qk_dims, qk_kept),
                                          ("encoder_head_v_dims", v_mask, self.config.v_dims, v_kept)):
            if mask is not None:
                counts = plan.config.get(field) or list(counts)
                counts[self.layer] = len(dims)
                plan.config[field] = counts

    def record_kept(self, config: Dict[str, Any], kept: Tensor) -> None:
        super().record_kept(config, kept)
        if config.get("encoder_head_index") is not None:  # which original heads remain (WavLM's bias)
            config["encoder_head_index"][self.layer] = [config["encoder_head_index"][self.layer][i]
                                                        for i in kept.tolist()]


class FeedForwardBlock(_GatedBlock):
    """The feed-forward block of transformer layer ``layer``: its units and the block as a whole."""

    kind = "feed_forward"
    group = "feed_forward"
    unit_kind, block_kind, unit_field, block_field = FFN_UNITS, FFN_BLOCK, "units", "ffn"
    kept_config, count_config = "encoder_ff_kept", "encoder_ff_interm_features"
    unit_attr, block_attr = "unit_gate", "layer_gate"

    def __init__(self, config: EncoderConfig, layer: int, gates: GateConfig, hidden: HiddenDim):
        exists = config.encoder_ff_kept[layer]
        super().__init__(config, layer, exists, config.encoder_ff_interm_features[layer], gates.ffn_units,
                         gates.ffn_units_init_mean, gates.ffn_layers, gates, hidden)
        self.num_units = self.n

    def block_params(self, embed: Tensor, units: Tensor, any_unit: Tensor) -> Tensor:
        return feed_forward_params(embed, units, any_unit, self.config.encoder_layer_norm_first)

    def block_macs(self, frames: int, embed: Tensor, units: Tensor) -> Tensor:
        return feed_forward_macs(frames, embed, units)

    def plan_units(self, plan: CutPlan, kept: Tensor, scales: Tensor, block_scale) -> None:
        """The open units' intermediate rows and output_dense columns."""
        prefix = LAYER.format(self.layer) + "feed_forward."
        plan.scale(prefix + "output_dense.bias", block_scale)
        if len(kept) > 0:
            plan.select(prefix + "intermediate_dense.weight", 0, kept)
            plan.select(prefix + "intermediate_dense.bias", 0, kept)
            plan.scale(prefix + "output_dense.weight", scales, dim=1)
            plan.select(prefix + "output_dense.weight", 1, kept)
