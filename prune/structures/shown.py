"""What the reports show of each structure kind: one table read by ``export.describe``,
``prune inspect`` and the pruning report's layer chart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

from ..models.config import EncoderConfig

CONV_LAYER, TRANSFORMER_LAYER, POS_CONV_GROUP = "conv layer", "transformer layer", "positional conv group"
HEAD_WIDTH = "transformer layer (dims of each head)"  # not a column of inspect's table: its own line


@dataclass(frozen=True)
class Shown:
    """kind: the structure kind; key: its entry in ``describe()``; label: the chart title; column:
    the ``prune inspect`` column header (transformer layers; the conv extractor and the hidden
    dimension have their own lines); config_field: the ``EncoderConfig`` field it reads; per: one
    value per conv layer, per transformer layer, per positional-conv group (the hidden dimension's
    channels, one gate for the whole model) or per transformer layer for the width of its heads
    (the q/k and v dims each head keeps, ``HEAD_WIDTH``); sizes: the kept units per layer or group (None: the
    block was removed whole)."""

    kind: str
    key: str
    label: str
    column: str
    config_field: str
    per: str
    sizes: Callable[[EncoderConfig], List[Optional[int]]]


def _kept(sizes: List[int], kept: List[bool]) -> List[Optional[int]]:
    return [n if k else None for n, k in zip(sizes, kept)]


def hidden_per_group(c: EncoderConfig) -> List[Optional[int]]:
    """The hidden dimension's kept channels per group of the positional conv."""
    if c.encoder_pos_conv_group_sizes is not None:
        return list(c.encoder_pos_conv_group_sizes)
    return [c.encoder_embed_dim // c.encoder_pos_conv_groups] * c.encoder_pos_conv_groups


SHOWN = (
    Shown("conv_channels", "conv_channels", "conv channels", "channels", "extractor_conv_layer_config", CONV_LAYER,
          lambda c: [spec[0] for spec in c.extractor_conv_layer_config]),
    Shown("attention", "heads", "attention heads", "heads", "encoder_num_heads", TRANSFORMER_LAYER,
          lambda c: _kept(c.encoder_num_heads, c.encoder_attention_kept)),
    Shown("feed_forward", "ffn_units", "FFN units", "ffn units", "encoder_ff_interm_features", TRANSFORMER_LAYER,
          lambda c: _kept(c.encoder_ff_interm_features, c.encoder_ff_kept)),
    Shown("attention", "head_qk_dims", "q/k dims per head", "q/k dims", "encoder_head_qk_dims", HEAD_WIDTH,
          lambda c: _kept(c.qk_dims, c.encoder_attention_kept)),
    Shown("attention", "head_v_dims", "v dims per head", "v dims", "encoder_head_v_dims", HEAD_WIDTH,
          lambda c: _kept(c.v_dims, c.encoder_attention_kept)),
    Shown("hidden", "hidden_channels", "hidden channels", "hidden", "encoder_embed_dim", POS_CONV_GROUP,
          hidden_per_group),
)


def shown_per(per: str) -> List[Shown]:
    return [s for s in SHOWN if s.per == per]
