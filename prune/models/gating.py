"""Gate values for one forward pass: one object for the conv extractor, one per transformer layer.

A gated encoder (``prune.structures.GatedEncoder``) draws its HardConcrete masks and hands them
to the model in these shapes; given none, each block is the plain model. ``*_active`` /
``*_on`` fields say which units the drawn gates leave open (gate != 0), so that closed ones are
not computed at all (sparsity-aware training); the result is the same, up to float rounding.
``None`` everywhere means "not gated" or "every unit open".
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

from torch import Tensor


class ExtractorGates(NamedTuple):
    """channels[i]: (out_channels,) gate of conv layer i. active[i]: the open channels' indices
    (long) of conv layer i (None: all computed); closed: the closed channels of the last layer
    (the feature projection still sees them, as zeros)."""

    channels: List[Optional[Tensor]]
    active: Optional[List[Optional[Tensor]]] = None
    closed: Optional[Tensor] = None

    def active_of(self, i: int) -> Optional[Tensor]:
        return None if self.active is None else self.active[i]

    @property
    def last_active(self) -> Optional[Tensor]:
        return None if self.active is None else self.active[-1]


class LayerGates(NamedTuple):
    """One transformer layer's gates: heads (num_heads,), attention () on the attention block's
    output, units (ff_interm_features,), ffn () on the FFN block's output; heads_active /
    units_active: the open heads / units (long indices, None: all); attention_on / ffn_on: whether
    the block's own gate is open; hidden: (embed_dim,) the hidden-dimension gate (the model's one,
    shared by every layer); layer: () a gate on the whole layer, ``x + layer * (layer(x) - x)``
    (uniform mode, post-norm: a removed layer is an identity, LayerNorms included), layer_on:
    whether it is open (closed: the layer returns its input, nothing computed); qk_dims (qk_dim,) /
    v_dims (v_dim,): the gates on the query/key and value dims inside the heads, shared by the
    layer's heads; qk_dims_active / v_dims_active: their open dims (None: all); hidden_active: the
    open channels of the hidden dimension (None: all computed): then the layer's input and output
    hold only those channels and ``hidden`` is the gate at them (the narrow stream)."""

    heads: Optional[Tensor] = None
    attention: Optional[Tensor] = None
    units: Optional[Tensor] = None
    ffn: Optional[Tensor] = None
    heads_active: Optional[Tensor] = None
    units_active: Optional[Tensor] = None
    attention_on: bool = True
    ffn_on: bool = True
    hidden: Optional[Tensor] = None
    layer: Optional[Tensor] = None
    layer_on: bool = True
    qk_dims: Optional[Tensor] = None
    v_dims: Optional[Tensor] = None
    qk_dims_active: Optional[Tensor] = None
    v_dims_active: Optional[Tensor] = None
    hidden_active: Optional[Tensor] = None


class Gates(NamedTuple):
    """Every gate of one forward pass; ``skipping``: whether the active sets were computed;
    ``hidden``: (embed_dim,) the hidden-dimension gate (None: not gated); ``hidden_active``: its open
    channels when the transformer runs on them alone (None: all channels computed)."""

    extractor: ExtractorGates
    layers: List[LayerGates]
    skipping: bool = False
    hidden: Optional[Tensor] = None
    hidden_active: Optional[Tensor] = None
