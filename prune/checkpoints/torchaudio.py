"""torchaudio ``Wav2Vec2Model`` state dicts (``torchaudio.models.wav2vec2_model`` / ``wavlm_model``,
the pipelines' bundles, ``HuBERTPretrainModel``), read without torchaudio.

A state dict does not record the architecture. It comes from, in order: the ``config`` the caller
passes (an ``EncoderConfig``, or a dict of ``wav2vec2_model`` / ``wavlm_model`` arguments such as a
bundle's ``_params``; a partial dict overrides single values), else the tensor shapes, else the
convention of every published model for what shapes cannot tell (listed in the report's notes).
HuBERT and wav2vec 2.0 share one architecture, so a state dict of either is labelled "wav2vec2"
unless ``config`` says ``architecture="hubert"``; the label changes no computation.

A file may carry its arguments beside the weights (``{"state_dict": ..., "config": {...}}``): they
are read as if passed as ``config``, and a ``config`` given by the caller overrides them. DPHuBERT's
files have this layout with names of their own: ``dphubert.py`` reads them. torchaudio's bundles
keep the waveform normalisation outside the model (``bundle._normalize_waveform``); without it, it
is assumed on exactly for ``layer_norm`` extractors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple, Union

import torch

from ..models import EncoderConfig, Wav2Vec2Model, build_encoder
from ..models.config import BASE_CONV
from .keymap import CheckpointError, Ignore, LoadReport, Rule, as_flag, load_mapped, map_keys, pos_conv_rules

# torchaudio keys -> prune keys. The in-house encoder uses torchaudio's names, so most rows are
# the identity; WavLM differs: torchaudio keeps q/k/v in a torch.nn.MultiheadAttention
# (``attention.attention``, in_proj = [q; k; v] stacked on dim 0) and the bias table in layer 0.
TORCHAUDIO_KEY_MAP: List[Rule] = [
    Rule(r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    Rule(r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)",
         r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    Rule(r"encoder\.feature_projection\.layer_norm\.(weight|bias)", r"encoder.feature_projection.layer_norm.\1"),
    Rule(r"encoder\.feature_projection\.projection\.(weight|bias)", r"encoder.feature_projection.projection.\1"),
    *pos_conv_rules(r"encoder\.transformer\.pos_conv_embed\.conv"),
    Rule(r"encoder\.transformer\.layer_norm\.(weight|bias)", r"encoder.transformer.layer_norm.\1"),
    Rule(r"encoder\.transformer\.layers\.(\d+)\.attention\.(q|k|v|out)_proj\.(weight|bias)",
         r"encoder.transformer.layers.\1.attention.\2_proj.\3"),
    Rule(r"encoder\.transformer\.layers\.(\d+)\.attention\.attention\.in_proj_(weight|bias)",
         (r"encoder.transformer.layers.\1.attention.q_proj.\2", r"encoder.transformer.layers.\1.attention.k_proj.\2",
          r"encoder.transformer.layers.\1.attention.v_proj.\2")),
    Rule(r"encoder\.transformer\.layers\.(\d+)\.attention\.attention\.out_proj\.(weight|bias)",
         r"encoder.transformer.layers.\1.attention.out_proj.\2"),
    Rule(r"encoder\.transformer\.layers\.0\.attention\.rel_attn_embed\.weight",
         r"encoder.transformer.rel_pos_bias.rel_attn_embed.weight"),
    Rule(r"encoder\.transformer\.layers\.(\d+)\.attention\.gru_rel_pos_const",
         r"encoder.transformer.layers.\1.attention.gru_rel_pos_const"),
    Rule(r"encoder\.transformer\.layers\.(\d+)\.attention\.gru_rel_pos_linear\.(weight|bias)",
         r"encoder.transformer.layers.\1.attention.gru_rel_pos_linear.\2"),
    Rule(r"encoder\.transformer\.layers\.(\d+)\.layer_norm\.(weight|bias)",
         r"encoder.transformer.layers.\1.layer_norm.\2"),
    Rule(r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.(intermediate_dense|output_dense)\.(weight|bias)",
         r"encoder.transformer.layers.\1.feed_forward.\2.\3"),
    Rule(r"encoder\.transformer\.layers\.(\d+)\.final_layer_norm\.(weight|bias)",
         r"encoder.transformer.layers.\1.final_layer_norm.\2"),
]

TORCHAUDIO_IGNORED: List[Ignore] = [Ignore(r"aux\.(weight|bias)", "CTC head (aux_num_out)")]

# HuBERTPretrainModel keeps the Wav2Vec2Model under "wav2vec2." beside its pretraining heads
PRETRAIN_PREFIX = "wav2vec2."
PRETRAIN_IGNORED: List[Ignore] = [
    Ignore(r"mask_generator\.mask_embedding", "masking embedding (HuBERT pretraining only)"),
    Ignore(r"logit_generator\.(final_proj\.weight|final_proj\.bias|label_embeddings)", "HuBERT pretraining head"),
]

# What tensor shapes cannot tell, by the convention of all published models
STANDARD_KERNELS = [k for _, k, _ in BASE_CONV]
STANDARD_STRIDES = [s for _, _, s in BASE_CONV]
HEADS_BY_EMBED_DIM = {768: 12, 1024: 16, 1280: 16, 1920: 16}  # base, large, XLS-R 1B, XLS-R 2B
STANDARD_MAX_DISTANCE = 800  # WavLM base / base+ / large

TORCHAUDIO_ONLY_ARGS = ("aux_num_out",)  # wav2vec2_model arguments outside the encoder: accepted, unused
ConfigLike = Union[EncoderConfig, Dict[str, Any], None]


def is_torchaudio_state(keys: List[str]) -> bool:
    keys = [k[len(PRETRAIN_PREFIX):] if k.startswith(PRETRAIN_PREFIX) else k for k in keys]
    return any(k.startswith("encoder.transformer.") for k in keys) and any(
        k.startswith("encoder.feature_projection.") for k in keys)


def infer_config(mapped: Dict[str, torch.Tensor], where: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """wav2vec2_model arguments read from the (prune-named) tensor shapes, and the ones assumed by
    convention: (arguments, {argument: why it was assumed})."""
    def shape(key: str) -> Tuple[int, ...]:
        if key not in mapped:
            raise CheckpointError(f"{where}: cannot infer the architecture without {key}; pass config=")
        return tuple(mapped[key].shape)

    convs, i = [], 0
    while f"feature_extractor.conv_layers.{i}.conv.weight" in mapped:
        out, _, kernel = shape(f"feature_extractor.conv_layers.{i}.conv.weight")
        convs.append((out, kernel))
        i += 1
    layers = 0
    while f"encoder.transformer.layers.{layers}.final_layer_norm.weight" in mapped:
        layers += 1
    embed = shape("encoder.feature_projection.projection.weight")[0]
    pos_v = shape("encoder.transformer.pos_conv_embed.conv.weight_v")  # (embed, embed / groups, kernel)
    table = "encoder.transformer.rel_pos_bias.rel_attn_embed.weight"  # (buckets, heads)
    wavlm = table in mapped
    layer_norm = "feature_extractor.conv_layers.1.layer_norm.weight" in mapped
    params: Dict[str, Any] = dict(
        architecture="wavlm" if wavlm else "wav2vec2",
        extractor_mode="layer_norm" if layer_norm else "group_norm",
        extractor_conv_bias="feature_extractor.conv_layers.0.conv.bias" in mapped,
        encoder_embed_dim=embed,
        encoder_pos_conv_kernel=pos_v[2],
        encoder_pos_conv_groups=embed // pos_v[1],
        encoder_num_layers=layers,
        encoder_ff_interm_features=shape("encoder.transformer.layers.0.feed_forward.intermediate_dense.weight")[0],
        encoder_layer_norm_first=layer_norm,
    )
    params["normalize_waveform"] = layer_norm
    assumed = {"encoder_layer_norm_first": "pre-norm exactly when the conv extractor uses layer_norm, as in every "
                                           "published model",
               "normalize_waveform": "normalised waveforms exactly when the conv extractor uses layer_norm, as in "
                                     "every published model (torchaudio keeps it in bundle._normalize_waveform)"}
    if [k for _, k in convs] == STANDARD_KERNELS:
        params["extractor_conv_layer_config"] = [(c, k, s) for (c, k), s in zip(convs, STANDARD_STRIDES)]
        assumed["extractor_conv_layer_config"] = "strides of the standard extractor (5, 2, 2, 2, 2, 2, 2)"
    if wavlm:
        params["encoder_num_buckets"], params["encoder_num_heads"] = shape(table)
        params["encoder_max_distance"] = STANDARD_MAX_DISTANCE
        assumed["encoder_max_distance"] = f"{STANDARD_MAX_DISTANCE}, as in the published WavLM models"
    elif embed in HEADS_BY_EMBED_DIM:
        params["encoder_num_heads"] = HEADS_BY_EMBED_DIM[embed]
        assumed["encoder_num_heads"] = f"{HEADS_BY_EMBED_DIM[embed]} heads, as in the published models of width {embed}"
    return params, assumed


def params_from_file(config: Dict[str, Any], where: str) -> Dict[str, Any]:
    """The ``config`` saved beside a torchaudio state dict (``wav2vec2_model`` arguments) -> arguments
    for ``config_from_params`` (DPHuBERT's files, which add names of their own, are read by
    ``dphubert.load_dphubert``)."""
    params = dict(config)
    if "normalize_waveform" in params:
        params["normalize_waveform"] = as_flag(params["normalize_waveform"], where, "normalize_waveform")
    return params


def config_from_params(params: Dict[str, Any], where: str) -> EncoderConfig:
    """wav2vec2_model / wavlm_model keyword arguments (a bundle's ``_params``) -> EncoderConfig."""
    params = {k: v for k, v in params.items() if k not in TORCHAUDIO_ONLY_ARGS}
    if "extractor_conv_layer_config" in params and params["extractor_conv_layer_config"] is None:
        params["extractor_conv_layer_config"] = list(BASE_CONV)  # torchaudio's meaning of None
    fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise CheckpointError(f"{where}: config has arguments that wav2vec2_model does not take: {unknown}")
    try:
        return EncoderConfig(**params)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid config ({e})") from e


def load_torchaudio(state: Dict[str, Any], where: str, config: ConfigLike = None
                    ) -> Tuple[Wav2Vec2Model, LoadReport]:
    """A torchaudio state dict -> (encoder in eval mode, report). See the module docstring for
    where the architecture comes from."""
    ignored: Dict[str, str] = {}
    key_prefix = ""
    if any(k.startswith(PRETRAIN_PREFIX) for k in state):  # HuBERTPretrainModel
        heads = {k: v for k, v in state.items() if not k.startswith(PRETRAIN_PREFIX)}
        _, _, ignored = map_keys(heads, [], PRETRAIN_IGNORED, where, "torchaudio (HuBERTPretrainModel heads)")
        state = {k[len(PRETRAIN_PREFIX):]: v for k, v in state.items() if k.startswith(PRETRAIN_PREFIX)}
        key_prefix = PRETRAIN_PREFIX
    mapped, origin, encoder_ignored = map_keys(state, TORCHAUDIO_KEY_MAP, TORCHAUDIO_IGNORED, where, "torchaudio")
    ignored.update({key_prefix + k: reason for k, reason in encoder_ignored.items()})
    origin = {k: key_prefix + v for k, v in origin.items()}

    notes: List[str] = []
    if isinstance(config, EncoderConfig):
        encoder_config = config
    else:
        given = dict(config or {})
        params, assumed = infer_config(mapped, where)
        params.update(given)
        needed = ["extractor_conv_layer_config", "encoder_num_heads"]
        lacking = [k for k in needed if k not in params]
        if lacking:
            raise CheckpointError(f"{where}: a torchaudio state dict does not record {', '.join(lacking)} for this "
                                  f"non-standard model; pass them, e.g. load_pretrained(path, config="
                                  f"{{{', '.join(repr(k) + ': ...' for k in lacking)}}}) or the full "
                                  f"wav2vec2_model arguments")
        notes = [f"assumed {k}: {why} (pass config={{{k!r}: ...}} if not)" for k, why in assumed.items()
                 if k not in given]
        encoder_config = config_from_params(params, where)
    model = load_mapped(build_encoder(encoder_config), mapped, origin, where, TORCHAUDIO_KEY_MAP, key_prefix)
    detail = "torchaudio HuBERTPretrainModel" if key_prefix else "torchaudio Wav2Vec2Model"
    return model.eval(), LoadReport("torchaudio", where, encoder_config, detail, ignored, notes)

