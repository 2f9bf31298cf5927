"""The cost formulas: parameters and MACs of each prunable part as functions of how many of its
units are kept.

Each formula is written once and serves both a plain (possibly already pruned) model, counted
from its config with integer counts, and a gated model, counted from its gates' keep vectors
(probabilities in training, the eval mask's 0/1 pattern in eval mode, where the count is exactly
the compiled model's ``sum(p.numel())``). Costs of parts that depend on each other multiply (a
conv layer's weight scales with the channels kept on both sides; a block's cost with its block
gate), i.e. expectations under independent gates. ``embed_dim`` is the expected kept width of the
hidden dimension (``HiddenDim``), exactly the config's where it is not gated.

MACs count multiply-accumulates of matrix products (convs, linears, attention scores and
values) for one utterance of ``seconds`` of 16 kHz audio, with exact frame counts. Element-wise
work is not counted: norms, activations, the waveform normalisation (``normalize_waveform``, no
parameters, a few operations per sample: under 1e-5 of the MACs).
"""

from __future__ import annotations

from typing import List, Union

import torch
from torch import Tensor

from ..models.config import SAMPLE_RATE, EncoderConfig

Count = Union[int, float, Tensor]


def any_kept(keep: Tensor) -> Tensor:
    """P(at least one unit kept) for independent keep probabilities (n,)."""
    return 1.0 - torch.prod(1.0 - keep)


def conv_params(kernel: int, n_in: Count, n_out: Count, bias: bool, norm: bool) -> Count:
    return kernel * n_in * n_out + (n_out if bias else 0) + (2 * n_out if norm else 0)


def projection_params(n_in: Count, embed_dim: Count, phantom: Count) -> Count:
    """LayerNorm affine + Linear + the phantom vector (present once any channel was removed)."""
    return 2 * n_in + embed_dim * n_in + embed_dim + embed_dim * phantom


def attention_params(embed_dim: Count, head_dim: int, heads: Count, any_head: Count, wavlm: bool,
                     layer_norm_first: bool, qk_dim: Count = None, v_dim: Count = None) -> Count:
    """q/k weights and biases of ``qk_dim`` dims per head, v weights and biases of ``v_dim`` dims per
    head, out_proj's ``v_dim`` columns per head, out bias; WavLM's per-head gate constant and shared
    gate linear (it reads the input in chunks of the original ``head_dim``); the pre-norm LayerNorm.
    The last two only while a head is left. ``heads * qk_dim``: with independent gates the
    expectation of the product is the product of the expectations. qk_dim / v_dim: ``head_dim``
    when None (not cut)."""
    qk_dim = head_dim if qk_dim is None else qk_dim
    v_dim = head_dim if v_dim is None else v_dim
    per_head = (2 * embed_dim + 2) * qk_dim + (2 * embed_dim + 1) * v_dim + (1 if wavlm else 0)
    shared = (8 * head_dim + 8 if wavlm else 0) + (2 * embed_dim if layer_norm_first else 0)
    return per_head * heads + embed_dim + shared * any_head


def feed_forward_params(embed_dim: Count, units: Count, any_unit: Count, layer_norm_first: bool) -> Count:
    return (2 * embed_dim + 1) * units + embed_dim + (2 * embed_dim if layer_norm_first else 0) * any_unit


def fixed_params(config: EncoderConfig) -> int:
    """Parameters no gate touches: WavLM's bias table (one column per original head)."""
    return config.encoder_num_buckets * config.original_num_heads if config.is_wavlm else 0


def pos_conv_params(kernel: int, sum_sq: Count, channels: Count, weight_norm: bool) -> Count:
    """The positional conv: ``kernel * sum_sq`` weights (sum_sq: the sum over groups of each group's
    channels squared, a group maps its channels to themselves), a bias per channel, and weight
    norm's one factor per kernel position while the conv is the weight-normed grouped one."""
    return kernel * sum_sq + channels + (kernel if weight_norm else 0)


def post_norm_params(embed_dim: Count) -> Count:
    """A post-norm layer's two LayerNorms (``layer_norm``, ``final_layer_norm``), weight and bias each."""
    return 4 * embed_dim


def hidden_norm_params(embed_dim: Count, layer_norm_first: bool, num_layers: int) -> Count:
    """The LayerNorms over the hidden dimension no block owns: the transformer's, and post-norm's
    two per layer for ``num_layers`` layers (those that are layers, ``encoder_layer_kept``, and
    whose LayerNorms no whole-layer gate owns)."""
    return 2 * embed_dim + (0 if layer_norm_first else post_norm_params(embed_dim) * num_layers)


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


def pos_conv_macs(frames: int, kernel: int, sum_sq: Count) -> Count:
    out_frames = frames + 2 * (kernel // 2) - kernel + 1  # before the "same" trim of even kernels
    return out_frames * kernel * sum_sq


def attention_macs(frames: int, embed_dim: Count, head_dim: int, heads: Count, wavlm: bool,
                   qk_dim: Count = None, v_dim: Count = None) -> Count:
    """Per head: the q/k projections (2 T D d_qk), v and out (2 T D d_v), the scores (T^2 d_qk),
    the context (T^2 d_v), WavLM's gate linear (8 T head_dim: it reads the original chunks)."""
    qk_dim = head_dim if qk_dim is None else qk_dim
    v_dim = head_dim if v_dim is None else v_dim
    per_head = (2 * frames * embed_dim + frames * frames) * (qk_dim + v_dim)
    if wavlm:
        per_head += 8 * frames * head_dim
    return per_head * heads


def feed_forward_macs(frames: int, embed_dim: Count, units: Count) -> Count:
    return 2 * frames * embed_dim * units
