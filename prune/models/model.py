"""The general builder and the named presets."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List

from torch import nn

from .components import (ConvLayerBlock, ConvolutionalPositionalEmbedding, Encoder, EncoderLayer, FeatureExtractor,
                         FeatureProjection, FeedForward, PhantomLayerNorm, RelativePositionBias, SelfAttention,
                         Transformer, Wav2Vec2Model, WavLMSelfAttention)
from .config import BASE_CONV, EncoderConfig


def build_encoder(config: EncoderConfig) -> Wav2Vec2Model:
    """Build a randomly initialised encoder from its config (pruned or not)."""
    with warnings.catch_warnings():  # a fully pruned conv layer has zero-size weights
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        return _build(config)


def _build(config: EncoderConfig) -> Wav2Vec2Model:
    eps = config.layer_norm_eps
    convs = []
    in_channels = 1
    for i, ((out, kernel, stride), total) in enumerate(zip(config.extractor_conv_layer_config,
                                                           config.extractor_norm_channels)):
        norm = None
        if config.extractor_mode == "layer_norm":
            norm = PhantomLayerNorm(out, total, eps)
        elif i == 0:
            # one group per channel; max(.., 1): a layer pruned to no channel keeps an empty norm
            norm = nn.GroupNorm(num_groups=max(out, 1), num_channels=out, affine=True, eps=eps)
        convs.append(ConvLayerBlock(in_channels, out, kernel, stride, config.extractor_conv_bias, norm))
        in_channels = out
    feature_extractor = FeatureExtractor(nn.ModuleList(convs), config.extractor_output_scale)

    D = config.encoder_embed_dim
    projection = FeatureProjection(in_channels, D, config.encoder_projection_dropout,
                                   config.extractor_norm_channels[-1], eps)
    layers = []
    for i in range(config.encoder_num_layers):
        attention = None
        if config.encoder_attention_kept[i]:
            heads = config.encoder_num_heads[i]
            if config.is_wavlm:
                attention = WavLMSelfAttention(D, heads, config.encoder_head_dim, config.encoder_attention_dropout,
                                               config.encoder_head_index[i], config.hidden_index, config.hidden_total,
                                               config.qk_dims[i], config.v_dims[i])
            else:
                attention = SelfAttention(D, heads, config.encoder_head_dim, config.encoder_attention_dropout,
                                          config.qk_dims[i], config.v_dims[i])
        feed_forward = None
        if config.encoder_ff_kept[i]:
            feed_forward = FeedForward(D, config.encoder_ff_interm_features[i], config.encoder_ff_interm_dropout,
                                       config.encoder_dropout)
        layers.append(EncoderLayer(attention, feed_forward, D, config.encoder_dropout,
                                   config.encoder_layer_norm_first, eps, config.hidden_total, config.layer_kept[i]))
    rel_pos_bias = None
    if config.is_wavlm:
        rel_pos_bias = RelativePositionBias(config.encoder_num_buckets, config.encoder_max_distance,
                                            config.original_num_heads)
    pos_conv = ConvolutionalPositionalEmbedding(D, config.encoder_pos_conv_kernel, config.encoder_pos_conv_groups,
                                                config.encoder_pos_conv_group_sizes)
    transformer = Transformer(pos_conv, D, config.encoder_dropout, nn.ModuleList(layers),
                              config.encoder_layer_norm_first, config.encoder_layer_drop, rel_pos_bias, eps,
                              config.hidden_total)
    return Wav2Vec2Model(config, feature_extractor, Encoder(projection, transformer))


def wav2vec2_model(**kwargs: Any) -> Wav2Vec2Model:
    """torchaudio-style builder: ``wav2vec2_model(extractor_mode=..., encoder_embed_dim=..., ...)``."""
    return build_encoder(EncoderConfig(**kwargs))


# ---------------------------------------------------------------------------------- presets
# The Large models were pre-trained on per-utterance normalised waveforms (fairseq task.normalize)
_LARGE = dict(extractor_mode="layer_norm", encoder_embed_dim=1024, encoder_num_layers=24, encoder_num_heads=16,
              encoder_ff_interm_features=4096, encoder_layer_norm_first=True, normalize_waveform=True)

PRESETS: Dict[str, Dict[str, Any]] = {
    "hubert_base": dict(architecture="hubert", encoder_layer_drop=0.05),
    "hubert_large": dict(architecture="hubert", encoder_layer_drop=0.0, **_LARGE),
    "wav2vec2_base": dict(architecture="wav2vec2", encoder_layer_drop=0.1),
    "wav2vec2_large_lv60k": dict(architecture="wav2vec2", extractor_conv_bias=True, encoder_layer_drop=0.1,
                                 **_LARGE),
    "wavlm_base": dict(architecture="wavlm", encoder_layer_drop=0.05),
    "wavlm_base_plus": dict(architecture="wavlm", encoder_layer_drop=0.05),
    "wavlm_large": dict(architecture="wavlm", encoder_layer_drop=0.0, **_LARGE),
}

# Tiny variants keep the conv kernels and strides (so frame counts are real) and shrink widths.
_TINY = dict(extractor_conv_layer_config=[(16, k, s) for _, k, s in BASE_CONV], encoder_embed_dim=32,
             encoder_num_heads=4, encoder_ff_interm_features=48, encoder_pos_conv_kernel=16,
             encoder_pos_conv_groups=4, encoder_num_buckets=16, encoder_max_distance=32)
for _name in list(PRESETS):
    PRESETS[_name + "_tiny"] = {**PRESETS[_name], **_TINY,
                                "encoder_num_layers": 3 if PRESETS[_name].get("encoder_layer_norm_first") else 2}


def preset_config(name: str, **overrides: Any) -> EncoderConfig:
    """The config of a named preset (see ``PRESETS``), with optional overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return EncoderConfig(**{**PRESETS[name], **overrides})


def build_preset(name: str, **overrides: Any) -> Wav2Vec2Model:
    return build_encoder(preset_config(name, **overrides))


def _preset_builder(name: str) -> Callable[..., Wav2Vec2Model]:
    def builder(**overrides: Any) -> Wav2Vec2Model:
        return build_preset(name, **overrides)
    builder.__name__ = name
    builder.__doc__ = f"Build the ``{name}`` preset (random weights)."
    return builder


hubert_base = _preset_builder("hubert_base")
hubert_large = _preset_builder("hubert_large")
wav2vec2_base = _preset_builder("wav2vec2_base")
wav2vec2_large_lv60k = _preset_builder("wav2vec2_large_lv60k")
wavlm_base = _preset_builder("wavlm_base")
wavlm_base_plus = _preset_builder("wavlm_base_plus")
wavlm_large = _preset_builder("wavlm_large")

__all__: List[str] = ["build_encoder", "wav2vec2_model", "PRESETS", "preset_config", "build_preset",
                      "hubert_base", "hubert_large", "wav2vec2_base", "wav2vec2_large_lv60k", "wavlm_base",
                      "wavlm_base_plus", "wavlm_large"]
