"""The structure protocol: what every prunable structure of an encoder provides.

A structure owns the gate(s) of one part of the model (a conv layer's channels, a layer's
attention or feed-forward block), and provides, written once:

* ``keep(like)``: each of its gates' keep vector (ones where a part is not gated);
* ``params(like)`` / ``macs(frames, like)``: its cost as a function of those kept counts (the
  formulas of ``prune.structures.costs``), the same for a plain config (no gates) and a gated model;
* ``plan(cut_plan)``: its physical cut, recorded as index selections per tensor dimension and
  per-index scales into a shared ``CutPlan`` (plus its edits of the plain model's config);
* ``layer_fields(masks, flags, min_closed)``: what its drawn gates put into the ``LayerGates`` of
  its transformer layer (structures of the conv extractor feed ``ExtractorGates`` instead).

Gate kinds (what calibration selects by): ``conv_channels``, ``heads``, ``attention_block``,
``ffn_units``, ``ffn_block``, ``hidden`` (the residual stream's channels), ``head_qk_dims`` /
``head_v_dims`` (the query/key and value dimensions inside a layer's heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..gates import HardConcrete
from ..models.config import EncoderConfig
from .costs import Count
from .cut_plan import CutPlan

CONV_CHANNELS, HEADS, ATTENTION_BLOCK, FFN_UNITS, FFN_BLOCK, HIDDEN = (
    "conv_channels", "heads", "attention_block", "ffn_units", "ffn_block", "hidden")
HEAD_QK_DIMS, HEAD_V_DIMS = "head_qk_dims", "head_v_dims"
GATE_KINDS = (CONV_CHANNELS, HEADS, ATTENTION_BLOCK, FFN_UNITS, FFN_BLOCK, HIDDEN, HEAD_QK_DIMS, HEAD_V_DIMS)


@dataclass
class GateConfig:
    """Which structures get gates, and their initial drop rates (Louizos et al., ICLR 2018: m = 0.01
    keeps nearly every gate open at the start; DPHuBERT, Peng et al., Interspeech 2023, starts the FFN units
    at 0.5)."""

    conv_channels: bool = True  # each conv layer's output channels
    attention_heads: bool = True  # each layer's heads
    attention_layers: bool = True  # whole attention blocks
    ffn_units: bool = True  # each FFN's intermediate units
    ffn_layers: bool = True  # whole FFN blocks
    # its compiled model's LayerNorms count the removed channels: no transformers checkpoint holds it
    hidden_dim: bool = False  # the hidden dimension: one gate over the residual stream's channels, all layers
    # the dims inside the heads (Wang et al., 2023, prune them too): per layer one gate vector of
    # head_dim, shared by the layer's heads, so the compiled layer keeps one batched attention call;
    # transformers holds only head_dim = hidden / heads, so a cut one has no transformers checkpoint
    head_qk_dims: bool = False  # each layer's query/key dims (one gate per dim, all heads)
    head_v_dims: bool = False  # each layer's value dims (one gate per dim, all heads)
    init_mean: float = 0.01  # initial drop rate of every gate but the FFN units'
    ffn_units_init_mean: float = 0.5  # initial drop rate of the FFN unit gates
    init_std: float = 0.01  # std of the initial log_alpha


NO_GATES = GateConfig(conv_channels=False, attention_heads=False, attention_layers=False, ffn_units=False,
                      ffn_layers=False)  # a plain config's structures: costs only


class Structure(nn.Module):
    """Base of every prunable structure (see the module docstring for the protocol).

    ``kind``: the structure's kind (the key of ``prune.structures.shown.SHOWN``); ``group``: the
    ``GatedEncoder`` attribute whose ModuleList holds it, i.e. its gates' state-dict prefix
    (``attention.3.head_gate.log_alpha``); ``layer``: its transformer layer, None for the extractor."""

    kind: ClassVar[str]
    group: ClassVar[str]
    layer: Optional[int] = None

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config

    def gates(self) -> Dict[str, HardConcrete]:
        """Gate kind -> gate, for the gates this structure has (none where switched off)."""
        return {}

    def masks(self) -> Dict[str, Tensor]:
        """Gate kind -> this pass's gate values (a sample in training, the eval mask in eval)."""
        return {kind: gate() for kind, gate in self.gates().items()}

    def keep(self, like: Tensor) -> Dict[str, Tensor]:
        """Gate kind -> keep vector (float64, like ``like``), ones where not gated."""
        return {}

    def params(self, like: Tensor) -> Count:
        raise NotImplementedError

    def macs(self, frames: List[int], like: Tensor) -> Count:
        """frames: each conv layer's output frames (the transformer runs at the last)."""
        raise NotImplementedError

    def plan(self, plan: CutPlan) -> None:
        raise NotImplementedError

    def layer_fields(self, masks: Dict[str, Tensor], flags: Optional[Dict[str, Tensor]],
                     min_closed: float) -> Dict[str, Any]:
        """Fields of its layer's ``LayerGates``; ``flags``: which gates are open (None: no skipping)."""
        return {}


def make_gate(n: int, enabled: bool, init_mean: float, init_std: float) -> Optional[HardConcrete]:
    return HardConcrete(n, init_mean, init_std) if enabled and n > 0 else None


def keep_of(gate: Optional[HardConcrete], n: int, like: Tensor) -> Tensor:
    """Float64 (like ``like``): costs reach 1e9-1e11, beyond float32's exact integers."""
    return like.new_ones(n) if gate is None else gate.expected_keep().to(like.dtype)


def kept_index(mask: Optional[Tensor], n: int) -> Tensor:
    """The indices of the units an eval mask keeps (all n without a gate)."""
    return torch.arange(n) if mask is None else torch.nonzero(mask).flatten()


def soft_values(mask: Optional[Tensor], n: int) -> Tensor:
    """(n,) the gate values to fold into the weights (ones without a gate), in source positions."""
    return torch.ones(n) if mask is None else mask


def open_index(flag: Optional[Tensor], min_closed: float, device: torch.device) -> Optional[Tensor]:
    """The open units' indices, or None for the plain path: nothing gated, all open, or fewer
    than ``min_closed`` of them closed (then gathering the open rows costs more than it saves)."""
    if flag is None or bool(flag.all()) or (1.0 - flag.float().mean().item()) < min_closed:
        return None
    return torch.nonzero(flag).flatten().to(device)
