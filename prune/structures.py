"""What can be pruned: each structure's gate, its expected cost and its physical cut, in one place.

A structure's cost is written once, as a function of how many of its units are kept. The
same function counts a plain (possibly already pruned) model from its config, and a gated
model from its gates' keep vectors (probabilities in training, the eval mask's 0/1 pattern
in eval mode, where the count is exactly the compiled model's ``sum(p.numel())``).
Costs of different structures multiply where they depend on each other (a conv layer's
weight scales with the channels kept on both sides; a block's cost with its layer gate),
i.e. expectations under independent gates.

MACs count multiply-accumulates of matrix products (convs, linears, attention scores and
values) for one utterance of ``seconds`` of 16 kHz audio, with exact frame counts. Element-wise
work is not counted: norms, activations, the waveform normalisation (``normalize_waveform``, no
parameters, a few operations per sample: under 1e-5 of the MACs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from .gates import HardConcrete
from .models.components import ActiveSets, Gates, Wav2Vec2Model
from .models.config import SAMPLE_RATE, EncoderConfig

Count = Union[int, float, Tensor]


# ------------------------------------------------------------------------------ cost formulas
def any_kept(keep: Tensor) -> Tensor:
    """P(at least one unit kept) for independent keep probabilities (n,)."""
    return 1.0 - torch.prod(1.0 - keep)


def conv_params(kernel: int, n_in: Count, n_out: Count, bias: bool, norm: bool) -> Count:
    return kernel * n_in * n_out + (n_out if bias else 0) + (2 * n_out if norm else 0)


def projection_params(n_in: Count, embed_dim: int, phantom: Count) -> Count:
    """LayerNorm affine + Linear + the phantom vector (present once any channel was removed)."""
    return 2 * n_in + embed_dim * n_in + embed_dim + embed_dim * phantom


def attention_params(embed_dim: int, head_dim: int, heads: Count, any_head: Count, wavlm: bool,
                     layer_norm_first: bool) -> Count:
    """q/k/v/out weights and q/k/v biases per head, out bias; WavLM's per-head gate constant and
    shared gate linear; the pre-norm LayerNorm. The last two only while a head is left."""
    per_head = 4 * embed_dim * head_dim + 3 * head_dim + (1 if wavlm else 0)
    shared = (8 * head_dim + 8 if wavlm else 0) + (2 * embed_dim if layer_norm_first else 0)
    return per_head * heads + embed_dim + shared * any_head


def feed_forward_params(embed_dim: int, units: Count, any_unit: Count, layer_norm_first: bool) -> Count:
    return (2 * embed_dim + 1) * units + embed_dim + (2 * embed_dim if layer_norm_first else 0) * any_unit


def fixed_params(config: EncoderConfig) -> int:
    """Parameters no gate touches: positional conv, transformer LayerNorm, post-norm LayerNorms,
    WavLM's bias table."""
    D, K, g = config.encoder_embed_dim, config.encoder_pos_conv_kernel, config.encoder_pos_conv_groups
    n = D * (D // g) * K + K + D + 2 * D
    if not config.encoder_layer_norm_first:
        n += 4 * D * config.encoder_num_layers
    if config.is_wavlm:
        n += config.encoder_num_buckets * config.original_num_heads
    return n


def conv_frames(config: EncoderConfig, seconds: float) -> List[int]:
    """Output frames of each conv layer for one utterance of ``seconds``."""
    n = int(round(seconds * SAMPLE_RATE))
    frames = []
    for _, kernel, stride in config.extractor_conv_layer_config:
        n = max((n - kernel) // stride + 1, 0)
        frames.append(n)
    return frames


def conv_macs(frames: int, kernel: int, n_in: Count, n_out: Count) -> Count:
    return frames * kernel * n_in * n_out


def pos_conv_macs(frames: int, config: EncoderConfig) -> int:
    D, K, g = config.encoder_embed_dim, config.encoder_pos_conv_kernel, config.encoder_pos_conv_groups
    out_frames = frames + 2 * (K // 2) - K + 1  # before the "same" trim of even kernels
    return out_frames * D * (D // g) * K


def attention_macs(frames: int, embed_dim: int, head_dim: int, heads: Count, wavlm: bool) -> Count:
    """Projections (4 T D d), scores and values (2 T^2 d), WavLM's gate linear (8 T d), per head."""
    per_head = 4 * frames * embed_dim * head_dim + 2 * frames * frames * head_dim
    if wavlm:
        per_head += 8 * frames * head_dim
    return per_head * heads


def feed_forward_macs(frames: int, embed_dim: int, units: Count) -> Count:
    return 2 * frames * embed_dim * units


# ------------------------------------------------------------------------------ plain models
def count_params(config: EncoderConfig) -> int:
    """Parameters of a plain model built from ``config`` (equals ``sum(p.numel())``)."""
    total = fixed_params(config)
    n_in = 1
    for i, (out, kernel, _) in enumerate(config.extractor_conv_layer_config):
        total += conv_params(kernel, n_in, out, config.extractor_conv_bias, _has_conv_norm(config, i))
        n_in = out
    total += projection_params(n_in, config.encoder_embed_dim, int(config.extractor_norm_channels[-1] > n_in))
    for layer in range(config.encoder_num_layers):
        total += _attention_params(config, layer, config.encoder_num_heads[layer])
        total += _feed_forward_params(config, layer, config.encoder_ff_interm_features[layer])
    return int(total)


def count_macs(config: EncoderConfig, seconds: float = 1.0) -> int:
    """MACs of a plain model on one utterance of ``seconds``."""
    frames = conv_frames(config, seconds)
    total = 0
    n_in = 1
    for (out, kernel, _), f in zip(config.extractor_conv_layer_config, frames):
        total += conv_macs(f, kernel, n_in, out)
        n_in = out
    T = frames[-1]
    total += T * n_in * config.encoder_embed_dim + pos_conv_macs(T, config)
    for layer in range(config.encoder_num_layers):
        total += _attention_macs(config, layer, T, config.encoder_num_heads[layer])
        total += _feed_forward_macs(config, layer, T, config.encoder_ff_interm_features[layer])
    return int(total)


def _has_conv_norm(config: EncoderConfig, i: int) -> bool:
    return config.extractor_mode == "layer_norm" or i == 0


def _attention_params(config: EncoderConfig, layer: int, heads: Count, any_head: Optional[Count] = None,
                      kept: Count = 1) -> Count:
    if not config.encoder_attention_kept[layer]:
        return 0
    if any_head is None:
        any_head = int(heads > 0)
    return kept * attention_params(config.encoder_embed_dim, config.encoder_head_dim, heads, any_head,
                                   config.is_wavlm, config.encoder_layer_norm_first)


def _feed_forward_params(config: EncoderConfig, layer: int, units: Count, any_unit: Optional[Count] = None,
                         kept: Count = 1) -> Count:
    if not config.encoder_ff_kept[layer]:
        return 0
    if any_unit is None:
        any_unit = int(units > 0)
    return kept * feed_forward_params(config.encoder_embed_dim, units, any_unit, config.encoder_layer_norm_first)


def _attention_macs(config: EncoderConfig, layer: int, frames: int, heads: Count, kept: Count = 1) -> Count:
    if not config.encoder_attention_kept[layer]:
        return 0
    return kept * attention_macs(frames, config.encoder_embed_dim, config.encoder_head_dim, heads, config.is_wavlm)


def _feed_forward_macs(config: EncoderConfig, layer: int, frames: int, units: Count, kept: Count = 1) -> Count:
    if not config.encoder_ff_kept[layer]:
        return 0
    return kept * feed_forward_macs(frames, config.encoder_embed_dim, units)


# ------------------------------------------------------------------------------ gated structures
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
    init_mean: float = 0.01  # initial drop rate of every gate but the FFN units'
    ffn_units_init_mean: float = 0.5  # initial drop rate of the FFN unit gates
    init_std: float = 0.01  # std of the initial log_alpha


def _gate(n: int, enabled: bool, init_mean: float, init_std: float) -> Optional[HardConcrete]:
    return HardConcrete(n, init_mean, init_std) if enabled and n > 0 else None


def _mask(gate: Optional[HardConcrete]) -> Optional[Tensor]:
    return None if gate is None else gate()


def _keep(gate: Optional[HardConcrete], n: int, like: Tensor) -> Tensor:
    """Float64 (like ``like``): costs reach 1e9-1e11, beyond float32's exact integers."""
    return like.new_ones(n) if gate is None else gate.expected_keep().to(like.dtype)


def _kept_index(mask: Optional[Tensor], n: int) -> Tensor:
    return torch.arange(n) if mask is None else torch.nonzero(mask).flatten()


class ConvChannels(nn.Module):
    """Output channels of conv layer ``index``; the last layer's also shape the feature projection."""

    def __init__(self, config: EncoderConfig, index: int, gates: GateConfig):
        super().__init__()
        self.index = index
        self.channels, self.kernel, _ = config.extractor_conv_layer_config[index]
        self.gate = _gate(self.channels, gates.conv_channels, gates.init_mean, gates.init_std)

    def mask(self) -> Optional[Tensor]:
        return _mask(self.gate)

    def keep(self, like: Tensor) -> Tensor:
        return _keep(self.gate, self.channels, like)

    def params(self, config: EncoderConfig, keep_in: Tensor, keep: Tensor) -> Tensor:
        return conv_params(self.kernel, keep_in.sum(), keep.sum(), config.extractor_conv_bias,
                           _has_conv_norm(config, self.index))

    def macs(self, frames: int, keep_in: Tensor, keep: Tensor) -> Tensor:
        return conv_macs(frames, self.kernel, keep_in.sum(), keep.sum())

    @torch.no_grad()
    def cut(self, model: Wav2Vec2Model, cfg: Dict, state: Dict[str, Tensor], kept_in: Tensor) -> Tensor:
        """Slice this layer to its kept channels and fold the gate's soft values into the weights
        that precede the activation. Returns the kept channel indices."""
        block = model.feature_extractor.conv_layers[self.index]
        mask = self.mask()
        kept = _kept_index(mask, self.channels)
        scale = torch.ones(len(kept)) if mask is None else mask[kept]
        prefix = f"feature_extractor.conv_layers.{self.index}."
        weight = block.conv.weight[kept][:, kept_in]
        bias = block.conv.bias[kept] if block.conv.bias is not None else None
        norm = block.layer_norm
        if isinstance(norm, nn.GroupNorm):  # per-channel: slicing is exact; the gate folds into its affine map
            state[prefix + "layer_norm.weight"] = norm.weight[kept] * scale
            state[prefix + "layer_norm.bias"] = norm.bias[kept] * scale
        elif norm is not None:  # LayerNorm over channels, gated before and after it
            weight = weight * scale[:, None, None]
            bias = None if bias is None else bias * scale
            state[prefix + "layer_norm.weight"] = norm.weight[kept] * scale
            state[prefix + "layer_norm.bias"] = norm.bias[kept] * scale
        else:
            weight = weight * scale[:, None, None]
            bias = None if bias is None else bias * scale
        state[prefix + "conv.weight"] = weight
        if bias is not None:
            state[prefix + "conv.bias"] = bias
        spec = cfg["extractor_conv_layer_config"][self.index]
        cfg["extractor_conv_layer_config"][self.index] = [len(kept), spec[1], spec[2]]
        return kept


class FeatureProjectionInput:
    """The feature projection's input features: the last conv layer's channels. It has no gate
    of its own; removed channels stay in its LayerNorm's statistics as zeros, and their
    normalised value reaches the projection through the ``phantom`` vector."""

    @staticmethod
    def params(config: EncoderConfig, keep: Tensor) -> Tensor:
        had_phantom = float(config.extractor_norm_channels[-1] > keep.numel())
        phantom = 1.0 - (1.0 - had_phantom) * torch.prod(keep)
        return projection_params(keep.sum(), config.encoder_embed_dim, phantom)

    @staticmethod
    def macs(config: EncoderConfig, frames: int, keep: Tensor) -> Tensor:
        return frames * keep.sum() * config.encoder_embed_dim

    @staticmethod
    @torch.no_grad()
    def cut(model: Wav2Vec2Model, state: Dict[str, Tensor], kept: Tensor) -> None:
        proj = model.encoder.feature_projection
        removed = torch.ones(proj.layer_norm.num_features, dtype=torch.bool)
        removed[kept] = False
        W = proj.projection.weight
        prefix = "encoder.feature_projection."
        state[prefix + "layer_norm.weight"] = proj.layer_norm.weight[kept]
        state[prefix + "layer_norm.bias"] = proj.layer_norm.bias[kept]
        state[prefix + "projection.weight"] = W[:, kept]
        if model.feature_extractor.output_scale is not None:
            state["feature_extractor.output_scale"] = model.feature_extractor.output_scale[kept]
        # a removed channel's normalised value is shift * w + b: b folds into the bias, w into phantom
        state[prefix + "projection.bias"] = proj.projection.bias + W[:, removed] @ proj.layer_norm.bias[removed]
        phantom = W[:, removed] @ proj.layer_norm.weight[removed]
        if proj.phantom is not None:
            phantom = phantom + proj.phantom
        if proj.phantom is not None or removed.any():
            state[prefix + "phantom"] = phantom


class AttentionBlock(nn.Module):
    """The attention block of transformer layer ``layer``: its heads and the block as a whole."""

    def __init__(self, config: EncoderConfig, layer: int, gates: GateConfig):
        super().__init__()
        self.layer = layer
        self.exists = config.encoder_attention_kept[layer]
        self.num_heads = config.encoder_num_heads[layer] if self.exists else 0
        self.head_gate = _gate(self.num_heads, gates.attention_heads, gates.init_mean, gates.init_std)
        self.layer_gate = _gate(1, gates.attention_layers and self.exists, gates.init_mean, gates.init_std)

    def masks(self) -> tuple:
        return _mask(self.head_gate), _mask(self.layer_gate)

    def _keeps(self, like: Tensor) -> tuple:
        return _keep(self.head_gate, self.num_heads, like), _keep(self.layer_gate, 1, like)[0]

    def params(self, config: EncoderConfig, like: Tensor) -> Tensor:
        heads, kept = self._keeps(like)
        return _attention_params(config, self.layer, heads.sum(), any_kept(heads), kept)

    def macs(self, config: EncoderConfig, frames: int, like: Tensor) -> Tensor:
        heads, kept = self._keeps(like)
        return _attention_macs(config, self.layer, frames, heads.sum(), kept)

    @torch.no_grad()
    def cut(self, model: Wav2Vec2Model, cfg: Dict, state: Dict[str, Tensor]) -> None:
        if not self.exists:
            return
        head_mask, layer_mask = self.masks()
        layer_scale = 1.0 if layer_mask is None else layer_mask[0]
        if layer_scale == 0:
            cfg["encoder_attention_kept"][self.layer] = False
            cfg["encoder_num_heads"][self.layer] = 0
            if cfg.get("encoder_head_index") is not None:
                cfg["encoder_head_index"][self.layer] = []
            return
        attn = model.encoder.transformer.layers[self.layer].attention
        kept = _kept_index(head_mask, self.num_heads)
        scale = torch.ones(len(kept)) if head_mask is None else head_mask[kept]
        prefix = f"encoder.transformer.layers.{self.layer}.attention."
        state[prefix + "out_proj.bias"] = attn.out_proj.bias * layer_scale
        if len(kept) > 0:
            d = attn.head_dim
            rows = (kept[:, None] * d + torch.arange(d)).flatten()
            for name in ("q_proj", "k_proj", "v_proj"):
                lin = getattr(attn, name)
                state[prefix + name + ".weight"] = lin.weight[rows]
                state[prefix + name + ".bias"] = lin.bias[rows]
            col_scale = scale.repeat_interleave(d) * layer_scale
            state[prefix + "out_proj.weight"] = attn.out_proj.weight[:, rows] * col_scale
            if hasattr(attn, "gru_rel_pos_const"):
                state[prefix + "gru_rel_pos_const"] = attn.gru_rel_pos_const[:, kept]
                state[prefix + "gru_rel_pos_linear.weight"] = attn.gru_rel_pos_linear.weight
                state[prefix + "gru_rel_pos_linear.bias"] = attn.gru_rel_pos_linear.bias
        cfg["encoder_num_heads"][self.layer] = len(kept)
        if cfg.get("encoder_head_index") is not None:
            cfg["encoder_head_index"][self.layer] = [cfg["encoder_head_index"][self.layer][i] for i in kept.tolist()]


class FeedForwardBlock(nn.Module):
    """The feed-forward block of transformer layer ``layer``: its units and the block as a whole."""

    def __init__(self, config: EncoderConfig, layer: int, gates: GateConfig):
        super().__init__()
        self.layer = layer
        self.exists = config.encoder_ff_kept[layer]
        self.num_units = config.encoder_ff_interm_features[layer] if self.exists else 0
        self.unit_gate = _gate(self.num_units, gates.ffn_units, gates.ffn_units_init_mean, gates.init_std)
        self.layer_gate = _gate(1, gates.ffn_layers and self.exists, gates.init_mean, gates.init_std)

    def masks(self) -> tuple:
        return _mask(self.unit_gate), _mask(self.layer_gate)

    def _keeps(self, like: Tensor) -> tuple:
        return _keep(self.unit_gate, self.num_units, like), _keep(self.layer_gate, 1, like)[0]

    def params(self, config: EncoderConfig, like: Tensor) -> Tensor:
        units, kept = self._keeps(like)
        return _feed_forward_params(config, self.layer, units.sum(), any_kept(units), kept)

    def macs(self, config: EncoderConfig, frames: int, like: Tensor) -> Tensor:
        units, kept = self._keeps(like)
        return _feed_forward_macs(config, self.layer, frames, units.sum(), kept)

    @torch.no_grad()
    def cut(self, model: Wav2Vec2Model, cfg: Dict, state: Dict[str, Tensor]) -> None:
        if not self.exists:
            return
        unit_mask, layer_mask = self.masks()
        layer_scale = 1.0 if layer_mask is None else layer_mask[0]
        if layer_scale == 0:
            cfg["encoder_ff_kept"][self.layer] = False
            cfg["encoder_ff_interm_features"][self.layer] = 0
            return
        ff = model.encoder.transformer.layers[self.layer].feed_forward
        kept = _kept_index(unit_mask, self.num_units)
        scale = torch.ones(len(kept)) if unit_mask is None else unit_mask[kept]
        prefix = f"encoder.transformer.layers.{self.layer}.feed_forward."
        state[prefix + "output_dense.bias"] = ff.output_dense.bias * layer_scale
        if len(kept) > 0:
            state[prefix + "intermediate_dense.weight"] = ff.intermediate_dense.weight[kept]
            state[prefix + "intermediate_dense.bias"] = ff.intermediate_dense.bias[kept]
            state[prefix + "output_dense.weight"] = ff.output_dense.weight[:, kept] * (scale * layer_scale)
        cfg["encoder_ff_interm_features"][self.layer] = len(kept)


class GatedEncoder(nn.Module):
    """An encoder with HardConcrete gates on every prunable structure.

    ``forward`` draws the gates (a sample in training, the deterministic mask in eval) and
    runs the encoder with them. ``expected_params`` / ``expected_macs`` are differentiable
    in the gates' ``log_alpha``; ``prune.compile.compile_encoder`` cuts it to a plain model.
    """

    def __init__(self, model: Wav2Vec2Model, gates: Optional[GateConfig] = None, skip_closed: bool = True,
                 skip_min_closed: float = 0.3):
        super().__init__()
        self.model = model
        self.skip_closed = skip_closed  # compute only the open units of each pass (same numbers, less work)
        # below this closed fraction, gathering a group's open rows costs more than it saves
        # (scripts/benchmark.py: +15% step time with ~17% of FFN units closed, at HuBERT Base shape)
        self.skip_min_closed = skip_min_closed
        self.gate_config = gates = gates or GateConfig()
        config = model.config
        self.conv = nn.ModuleList(ConvChannels(config, i, gates)
                                  for i in range(len(config.extractor_conv_layer_config)))
        self.attention = nn.ModuleList(AttentionBlock(config, l, gates) for l in range(config.encoder_num_layers))
        self.feed_forward = nn.ModuleList(FeedForwardBlock(config, l, gates)
                                          for l in range(config.encoder_num_layers))

    @property
    def config(self) -> EncoderConfig:
        return self.model.config

    def gate_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.endswith("log_alpha")]

    def model_parameters(self) -> List[nn.Parameter]:
        return list(self.model.parameters())

    def sample_gates(self) -> Gates:
        attention = [block.masks() for block in self.attention]
        feed_forward = [block.masks() for block in self.feed_forward]
        gates = Gates(conv=[c.mask() for c in self.conv],
                      heads=[h for h, _ in attention], attention=[_squeeze(a) for _, a in attention],
                      units=[u for u, _ in feed_forward], ffn=[_squeeze(f) for _, f in feed_forward])
        return gates._replace(active=open_units(gates, self.skip_min_closed)) if self.skip_closed else gates

    def forward(self, waveforms: Tensor, lengths: Optional[Tensor] = None):
        """Same signature and outputs as ``Wav2Vec2Model.forward``."""
        return self.model(waveforms, lengths, self.sample_gates())

    def _like(self) -> Tensor:
        return next(self.model.parameters()).new_zeros((), dtype=torch.float64)

    def expected_params(self) -> Tensor:
        """Expected parameter count, a differentiable scalar."""
        config, like = self.config, self._like()
        total = like + fixed_params(config)
        keep_in = like.new_ones(1)
        for conv in self.conv:
            keep = conv.keep(like)
            total = total + conv.params(config, keep_in, keep)
            keep_in = keep
        total = total + FeatureProjectionInput.params(config, keep_in)
        for block in list(self.attention) + list(self.feed_forward):
            total = total + block.params(config, like)
        return total

    def expected_macs(self, seconds: float = 1.0) -> Tensor:
        """Expected MACs on one utterance of ``seconds``, a differentiable scalar."""
        config, like = self.config, self._like()
        frames = conv_frames(config, seconds)
        T = frames[-1]
        total = like + pos_conv_macs(T, config)
        keep_in = like.new_ones(1)
        for conv, f in zip(self.conv, frames):
            keep = conv.keep(like)
            total = total + conv.macs(f, keep_in, keep)
            keep_in = keep
        total = total + FeatureProjectionInput.macs(config, T, keep_in)
        for block in list(self.attention) + list(self.feed_forward):
            total = total + block.macs(config, T, like)
        return total


def _squeeze(mask: Optional[Tensor]) -> Optional[Tensor]:
    return None if mask is None else mask[0]


def open_units(gates: Gates, min_closed: float = 0.0) -> ActiveSets:
    """Which units the drawn gates leave open. A gate is either exactly 0 (the clamp, which
    also passes no gradient to its log_alpha) or not, so skipping the zeros changes no number.
    Groups with less than ``min_closed`` of their units closed are computed whole (None).
    One device-to-host copy for all gates together."""
    groups = gates.conv + gates.heads + gates.units
    blocks = gates.attention + gates.ffn
    present = [g.detach().reshape(-1) for g in groups + blocks if g is not None]
    flags = iter(torch.cat(present).ne(0).cpu().split([g.numel() for g in present]) if present else [])
    opened = [None if g is None else next(flags) for g in groups]
    block_open = [True if g is None else bool(next(flags)) for g in blocks]

    def index(flag: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
        if flag is None or bool(flag.all()) or (1.0 - flag.float().mean().item()) < min_closed:
            return None  # the plain path
        return torch.nonzero(flag).flatten().to(like.device)

    indices = [index(f, g) for f, g in zip(opened, groups)]
    n_conv, n_layers = len(gates.conv), len(gates.heads)
    last = opened[n_conv - 1]
    closed = None if indices[n_conv - 1] is None else torch.nonzero(~last).flatten().to(gates.conv[-1].device)
    return ActiveSets(conv=indices[:n_conv], conv_closed=closed, heads=indices[n_conv:n_conv + n_layers],
                      units=indices[n_conv + n_layers:], attention_on=block_open[:n_layers],
                      ffn_on=block_open[n_layers:])
