"""The cost formulas: parameters and MACs of each prunable part as functions of how many of its
units are kept.

Each formula is written once and serves both a plain (possibly already pruned) model, counted
from its config with integer counts, and a gated model, counted from its gates' keep vectors
(probabilities in training, the eval mask's 0/1 pattern in eval mode, where the count is exactly
the compiled model's ``sum(p.numel())``). Costs of parts that depend on each other multiply (a
conv layer's weight scales with the channels kept on both sides; a block's cost with its block
gate), i.e. expectations under independent gates.

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
