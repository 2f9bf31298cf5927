"""``GatedEncoder``: an encoder with HardConcrete gates on every prunable structure, and the plain
models' costs, both summed over the same ordered list of structures."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..models.components import Wav2Vec2Model
from ..models.config import EncoderConfig
from ..models.gating import ExtractorGates, Gates, LayerGates
from .base import CONV_CHANNELS, HIDDEN, NO_GATES, GateConfig, Structure, open_index
from .costs import conv_frames, fixed_params
from .extractor import ConvChannels, FeatureProjectionInput, exact_in_transformers
from .hidden import HiddenDim
from .transformer import AttentionBlock, FeedForwardBlock


def structures_of(config: EncoderConfig, gates: GateConfig = NO_GATES, uniform: bool = False) -> List[Structure]:
    """Every prunable structure of a model with ``config``, in cost-summation order: the conv layers'
    channels, the feature projection's input, each layer's attention block, each layer's FFN block,
    the hidden dimension (last: its gate is drawn after the others, so runs without it draw as before).
    With ``NO_GATES`` they only count the plain model's costs. ``uniform``: the structures of a
    transformers-shaped cut (``prune.shape``): conv channels gated only where transformers can hold
    the cut exactly, and one gate per layer (the attention block's) deciding both its blocks; post-norm,
    it gates the whole layer, LayerNorms included (``AttentionBlock.own_layer``: removed, an identity)."""
    if uniform and (gates.head_qk_dims or gates.head_v_dims):  # transformers holds head_dim = hidden / heads only
        raise ValueError("uniform structures keep transformers' head width: set head_qk_dims and head_v_dims "
                         "to false in the GateConfig (pruning.gates.*)")
    exact = exact_in_transformers(config) if uniform else [True] * len(config.extractor_conv_layer_config)
    convs: List[ConvChannels] = []
    for i in range(len(config.extractor_conv_layer_config)):
        convs.append(ConvChannels(config, i, gates, convs[-1] if convs else None, gated=exact[i]))
    hidden = HiddenDim(config, gates)
    layers = range(config.encoder_num_layers)
    attention = [AttentionBlock(config, l, gates, hidden) for l in layers]
    feed_forward = [FeedForwardBlock(config, l, gates, hidden) for l in layers]
    if uniform:
        for a, f in zip(attention, feed_forward):
            if a.exists and f.exists:
                f.tie_block_to(a)
                if not config.encoder_layer_norm_first:
                    a.own_layer()
    return [*convs, FeatureProjectionInput(config, convs[-1], hidden), *attention, *feed_forward, hidden]


def total_params(config: EncoderConfig, structures: Iterable[Structure], like: Tensor) -> Tensor:
    total = like + fixed_params(config)
    for structure in structures:
        total = total + structure.params(like)
    return total


def total_macs(config: EncoderConfig, structures: Iterable[Structure], seconds: float, like: Tensor) -> Tensor:
    frames = conv_frames(config, seconds)
    total = like
    for structure in structures:
        total = total + structure.macs(frames, like)
    return total


def _float64() -> Tensor:
    return torch.zeros((), dtype=torch.float64)


def count_params(config: EncoderConfig) -> int:
    """Parameters of a plain model built from ``config`` (equals ``sum(p.numel())``)."""
    return int(round(total_params(config, structures_of(config), _float64()).item()))


def count_macs(config: EncoderConfig, seconds: float = 1.0) -> int:
    """MACs of a plain model on one utterance of ``seconds``."""
    return int(round(total_macs(config, structures_of(config), seconds, _float64()).item()))


class GatedEncoder(nn.Module):
    """An encoder with HardConcrete gates on every prunable structure.

    ``structures`` is the ordered list of them; each is registered in the ModuleList named by its
    ``group`` (``conv``, ``projection``, ``attention``, ``feed_forward``, ``hidden``), which keeps the gates'
    state-dict names (``attention.3.head_gate.log_alpha``). ``forward`` draws the gates (a sample in
    training, the deterministic mask in eval) and runs the encoder with them. ``expected_params`` /
    ``expected_macs`` are differentiable in the gates' ``log_alpha``; ``prune.compile.compile_encoder``
    cuts it to a plain model.
    """

    def __init__(self, model: Wav2Vec2Model, gates: Optional[GateConfig] = None, skip_closed: bool = True,
                 skip_min_closed: float = 0.3, uniform: bool = False):
        super().__init__()
        self.model = model
        self.skip_closed = skip_closed  # compute only the open units of each pass (same numbers, less work)
        # below this closed fraction, gathering a group's open rows costs more than it saves
        # (scripts/benchmark.py: +15% step time with ~17% of FFN units closed, at HuBERT Base shape)
        self.skip_min_closed = skip_min_closed
        self.gate_config = gates = gates or GateConfig()
        self.uniform = uniform  # the structures of a transformers-shaped cut (structures_of)
        structures = structures_of(model.config, gates, uniform)
        groups: Dict[str, List[Structure]] = {}
        for structure in structures:
            groups.setdefault(structure.group, []).append(structure)
        for group, members in groups.items():
            self.add_module(group, nn.ModuleList(members))
        self.structures: Sequence[Structure] = tuple(structures)  # registered above, once

    @property
    def config(self) -> EncoderConfig:
        return self.model.config

    def gate_groups(self, kinds: Optional[Iterable[str]] = None) -> List[nn.Parameter]:
        """The ``log_alpha`` of every gate whose kind is in ``kinds`` (None: all), in structure
        order (the order of ``named_parameters``)."""
        wanted = None if kinds is None else set(kinds)
        return [gate.log_alpha for s in self.structures for kind, gate in s.gates().items()
                if wanted is None or kind in wanted]

    def gate_parameters(self) -> List[nn.Parameter]:
        return self.gate_groups()

    def model_parameters(self) -> List[nn.Parameter]:
        return list(self.model.parameters())

    def sample_gates(self) -> Gates:
        """This pass's gate values, one ``LayerGates`` per transformer layer; with ``skip_closed``
        also the open units (one device-to-host copy for all gates together)."""
        masks = self._draw()
        flags = open_flags(masks) if self.skip_closed else [None] * len(masks)
        convs = [(m, f) for s, m, f in zip(self.structures, masks, flags) if s.kind == ConvChannels.kind]
        hidden = next((m[HIDDEN] for m in masks if HIDDEN in m), None)  # the model's one hidden gate
        hidden_active = None
        if self.skip_closed and hidden is not None:  # the transformer runs on the open channels alone
            flag = next(f[HIDDEN] for f in flags if HIDDEN in f)
            hidden_active = open_index(flag, self.skip_min_closed, hidden.device)
        narrow = hidden if hidden_active is None else hidden.index_select(0, hidden_active)
        fields: List[dict] = [{"hidden": narrow, "hidden_active": hidden_active}
                              for _ in range(self.config.encoder_num_layers)]
        for structure, m, f in zip(self.structures, masks, flags):
            if structure.layer is not None:
                fields[structure.layer].update(structure.layer_fields(m, f, self.skip_min_closed))
        for structure in self.structures:  # a tied block takes its owner's draw: one decision per layer
            owner = getattr(structure, "block_owner", None)
            if owner is not None:
                f = fields[structure.layer]
                f[structure.block_field] = f[owner.block_field]
                if self.skip_closed:
                    f[structure.block_field + "_on"] = f[owner.block_field + "_on"]
        return Gates(extractor=self._extractor_gates(convs), layers=[LayerGates(**f) for f in fields],
                     skipping=self.skip_closed, hidden=hidden, hidden_active=hidden_active)

    def _draw(self) -> List[Dict[str, Tensor]]:
        """Each structure's masks. The samples are drawn transformer blocks first, then the conv
        layers, as before the structures shared one list: seeded runs reproduce their numbers."""
        order = sorted(range(len(self.structures)), key=lambda i: self.structures[i].layer is None)
        drawn = {i: self.structures[i].masks() for i in order}
        return [drawn[i] for i in range(len(self.structures))]

    def _extractor_gates(self, convs) -> ExtractorGates:
        channels = [m.get(CONV_CHANNELS) for m, _ in convs]
        if not self.skip_closed:
            return ExtractorGates(channels)
        opened = [f.get(CONV_CHANNELS) for _, f in convs]
        active = [None if c is None else open_index(o, self.skip_min_closed, c.device)
                  for c, o in zip(channels, opened)]
        closed = None if active[-1] is None else torch.nonzero(~opened[-1]).flatten().to(channels[-1].device)
        return ExtractorGates(channels, active, closed)

    def forward(self, waveforms: Tensor, lengths: Optional[Tensor] = None):
        """Same signature and outputs as ``Wav2Vec2Model.forward``."""
        return self.model(waveforms, lengths, self.sample_gates())

    def _like(self) -> Tensor:
        return next(self.model.parameters()).new_zeros((), dtype=torch.float64)

    def expected_params(self) -> Tensor:
        """Expected parameter count, a differentiable scalar."""
        return total_params(self.config, self.structures, self._like())

    def expected_macs(self, seconds: float = 1.0) -> Tensor:
        """Expected MACs on one utterance of ``seconds``, a differentiable scalar."""
        return total_macs(self.config, self.structures, seconds, self._like())


def open_flags(masks: List[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
    """Which gates the drawn masks leave open, per structure and gate kind (bool, on the CPU). A gate
    is either exactly 0 (the clamp, which also passes no gradient to its log_alpha) or not, so
    skipping the zeros changes no number. One device-to-host copy for all gates together."""
    present = [m.detach().reshape(-1) for group in masks for m in group.values()]
    if not present:
        return [{} for _ in masks]
    flags = iter(torch.cat(present).ne(0).cpu().split([m.numel() for m in present]))
    return [{kind: next(flags) for kind in group} for group in masks]
