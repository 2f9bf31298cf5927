"""What the reports show of each structure kind: one table read by ``export.describe``,
``prune inspect`` and the pruning report's layer chart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

from ..models.config import EncoderConfig

CONV_LAYER, TRANSFORMER_LAYER = "conv layer", "transformer layer"


@dataclass(frozen=True)
class Shown:
    """kind: the structure kind; key: its entry in ``describe()``; label: the chart title; column:
    the ``prune inspect`` column header (transformer layers; the conv extractor has its own line);
    config_field: the ``EncoderConfig`` field it reads; per: one value per conv layer or per
    transformer layer; sizes: the kept units per layer (None: the block was removed whole)."""

    kind: str
    key: str
    label: str
    column: str
    config_field: str
    per: str
    sizes: Callable[[EncoderConfig], List[Optional[int]]]


def _kept(sizes: List[int], kept: List[bool]) -> List[Optional[int]]:
    return [n if k else None for n, k in zip(sizes, kept)]


SHOWN = (
    Shown("conv_channels", "conv_channels", "conv channels", "channels", "extractor_conv_layer_config", CONV_LAYER,
          lambda c: [spec[0] for spec in c.extractor_conv_layer_config]),
    Shown("attention", "heads", "attention heads", "heads", "encoder_num_heads", TRANSFORMER_LAYER,
          lambda c: _kept(c.encoder_num_heads, c.encoder_attention_kept)),
    Shown("feed_forward", "ffn_units", "FFN units", "ffn units", "encoder_ff_interm_features", TRANSFORMER_LAYER,
          lambda c: _kept(c.encoder_ff_interm_features, c.encoder_ff_kept)),
)


def shown_per(per: str) -> List[Shown]:
    return [s for s in SHOWN if s.per == per]
