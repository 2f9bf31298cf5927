"""Hugging Face ``save_pretrained`` folders of HubertModel, Wav2Vec2Model and WavLMModel (and of
their ``*ForCTC`` / ``*ForPreTraining`` / ``*ForSequenceClassification`` wrappers, whose encoder is
taken), read without ``transformers``.

A folder holds ``config.json`` and the weights in ``model.safetensors``, ``pytorch_model.bin``, or
shards of either listed in an ``*.index.json``. Whether the model takes normalised waveforms is
the feature extractor's ``do_normalize``, in ``preprocessor_config.json`` (or, as transformers 5
saves a processor, under ``feature_extractor`` in ``processor_config.json``); a folder without
either is taken as not normalising, and the report says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..models import EncoderConfig, Wav2Vec2Model, build_encoder
from .keymap import CheckpointError, Ignore, LoadReport, Rule, as_flag, load_mapped, map_keys, pos_conv_rules
from .safe_load import read_safetensors, torch_load

# model_type in config.json -> architecture; the wrappers keep the encoder under this prefix
MODEL_TYPES = {"hubert": "hubert", "wav2vec2": "wav2vec2", "wavlm": "wavlm"}
WRAPPER_PREFIX = {"hubert": "hubert.", "wav2vec2": "wav2vec2.", "wavlm": "wavlm."}

PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

# Encoder keys (the base model's, i.e. with the wrapper prefix removed) -> prune keys.
HF_KEY_MAP: List[Rule] = [
    Rule(r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    # GroupNorm (layer 0, feat_extract_norm="group") or LayerNorm (every layer, "layer")
    Rule(r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)",
         r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    Rule(r"feature_projection\.layer_norm\.(weight|bias)", r"encoder.feature_projection.layer_norm.\1"),
    Rule(r"feature_projection\.projection\.(weight|bias)", r"encoder.feature_projection.projection.\1"),
    *pos_conv_rules(r"encoder\.pos_conv_embed\.conv"),  # older and newer transformers' weight norm
    Rule(r"encoder\.layer_norm\.(weight|bias)", r"encoder.transformer.layer_norm.\1"),
    Rule(r"encoder\.layers\.(\d+)\.attention\.(q|k|v|out)_proj\.(weight|bias)",
         r"encoder.transformer.layers.\1.attention.\2_proj.\3"),
    Rule(r"encoder\.layers\.(\d+)\.layer_norm\.(weight|bias)", r"encoder.transformer.layers.\1.layer_norm.\2"),
    Rule(r"encoder\.layers\.(\d+)\.feed_forward\.(intermediate_dense|output_dense)\.(weight|bias)",
         r"encoder.transformer.layers.\1.feed_forward.\2.\3"),
    Rule(r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)",
         r"encoder.transformer.layers.\1.final_layer_norm.\2"),
    # WavLM: per-layer gate of the relative position bias; the bias table lives in layer 0 only
    Rule(r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_const",
         r"encoder.transformer.layers.\1.attention.gru_rel_pos_const"),
    Rule(r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_linear\.(weight|bias)",
         r"encoder.transformer.layers.\1.attention.gru_rel_pos_linear.\2"),
    Rule(r"encoder\.layers\.0\.attention\.rel_attn_embed\.weight",
         r"encoder.transformer.rel_pos_bias.rel_attn_embed.weight"),
]

# Encoder keys that are not part of inference.
HF_IGNORED: List[Ignore] = [
    Ignore(r"masked_spec_embed", "SpecAugment mask embedding (training only)"),
]

# Top-level keys of the wrappers, beside the encoder.
HF_HEADS_IGNORED: List[Ignore] = [
    Ignore(r"lm_head\.(weight|bias)", "CTC head (*ForCTC)"),
    Ignore(r"quantizer\.(codevectors|weight_proj\.weight|weight_proj\.bias)", "quantizer (*ForPreTraining)"),
    Ignore(r"project_hid\.(weight|bias)", "contrastive projection (*ForPreTraining)"),
    Ignore(r"project_q\.(weight|bias)", "quantized target projection (*ForPreTraining)"),
    Ignore(r"projector\.(weight|bias)", "classification head (*ForSequenceClassification)"),
    Ignore(r"classifier\.(weight|bias)", "classification head (*ForSequenceClassification)"),
    Ignore(r"layer_weights", "weighted layer sum of a classification head"),
]

# The published defaults of Wav2Vec2Config / HubertConfig / WavLMConfig, for a config.json that
# leaves a field out (save_pretrained writes them all).
HF_DEFAULTS: Dict[str, Any] = dict(
    feat_extract_norm="group", conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2],
    conv_stride=[5, 2, 2, 2, 2, 2, 2],
    conv_bias=False, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, do_stable_layer_norm=False, layer_norm_eps=1e-5,
    hidden_act="gelu", feat_extract_activation="gelu", feat_proj_dropout=0.0, attention_dropout=0.1,
    activation_dropout=0.1, hidden_dropout=0.1, layerdrop=0.1, num_buckets=320, max_bucket_distance=800,
    feat_proj_layer_norm=True, conv_pos_batch_norm=False, add_adapter=False,
)


def read_hf_config(folder: Path, name: str = "config.json") -> Dict[str, Any]:
    file = folder / name
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} cannot be read as JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return cfg


def config_from_hf(cfg: Dict[str, Any], where: str) -> EncoderConfig:
    """A transformers ``config.json`` dict -> EncoderConfig (torchaudio's ``import_huggingface`` mapping)."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{where} is a Hugging Face {model_type!r} model; prune loads the model types "
                              f"{sorted(MODEL_TYPES)} (HuBERT, wav2vec 2.0, WavLM)")

    def get(key: str) -> Any:
        return cfg.get(key, HF_DEFAULTS[key])

    unsupported = []
    if get("feat_extract_norm") not in ("group", "layer"):
        unsupported.append(f"feat_extract_norm={get('feat_extract_norm')!r}")
    for key in ("hidden_act", "feat_extract_activation"):
        if get(key) != "gelu":
            unsupported.append(f"{key}={get(key)!r} (only gelu)")
    if not get("feat_proj_layer_norm"):
        unsupported.append("feat_proj_layer_norm=False")
    if get("conv_pos_batch_norm"):
        unsupported.append("conv_pos_batch_norm=True")
    if get("add_adapter"):
        unsupported.append("add_adapter=True")
    # transformers' conv-extractor norms use torch's default eps (1e-5), the others layer_norm_eps;
    # the in-house encoder has one eps for all of them
    if get("layer_norm_eps") != 1e-5:
        unsupported.append(f"layer_norm_eps={get('layer_norm_eps')} (only 1e-5)")
    if unsupported:
        raise CheckpointError(f"{where} uses settings the in-house encoder does not implement: "
                              f"{', '.join(unsupported)}")
    dims, kernels, strides = get("conv_dim"), get("conv_kernel"), get("conv_stride")
    if not len(dims) == len(kernels) == len(strides):
        raise CheckpointError(f"{where}: conv_dim, conv_kernel and conv_stride differ in length "
                              f"({len(dims)}, {len(kernels)}, {len(strides)})")
    try:
        return EncoderConfig(
            architecture=MODEL_TYPES[model_type],
            extractor_mode=f"{get('feat_extract_norm')}_norm",
            extractor_conv_layer_config=list(zip(dims, kernels, strides)),
            extractor_conv_bias=bool(get("conv_bias")),
            encoder_embed_dim=get("hidden_size"),
            encoder_projection_dropout=get("feat_proj_dropout"),
            encoder_pos_conv_kernel=get("num_conv_pos_embeddings"),
            encoder_pos_conv_groups=get("num_conv_pos_embedding_groups"),
            encoder_num_layers=get("num_hidden_layers"),
            encoder_num_heads=get("num_attention_heads"),
            encoder_attention_dropout=get("attention_dropout"),
            encoder_ff_interm_features=get("intermediate_size"),
            encoder_ff_interm_dropout=get("activation_dropout"),
            encoder_dropout=get("hidden_dropout"),
            encoder_layer_norm_first=bool(get("do_stable_layer_norm")),
            encoder_layer_drop=get("layerdrop"),
            encoder_num_buckets=get("num_buckets"),
            encoder_max_distance=get("max_bucket_distance"),
            layer_norm_eps=get("layer_norm_eps"),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} has an invalid encoder config: {e}") from e


def read_do_normalize(folder: Path) -> Tuple[bool, Optional[str]]:
    """The feature extractor's ``do_normalize`` -> (value, a note when it is not in the folder)."""
    for name in PREPROCESSOR_FILES:
        if not (folder / name).is_file():
            continue
        cfg = read_hf_config(folder, name)
        if name == "processor_config.json":
            cfg = cfg.get("feature_extractor")
            if not isinstance(cfg, dict):
                continue  # a processor without an audio feature extractor
        # absent from the file: Wav2Vec2FeatureExtractor's default, true
        return as_flag(cfg.get("do_normalize", True), str(folder / name), "do_normalize"), None
    return False, (f"no {' or '.join(PREPROCESSOR_FILES)}: waveforms are not normalised (do_normalize "
                   f"false); if the model was trained on normalised audio, save its feature extractor "
                   f"in the folder")


def read_hf_weights(folder: Path, trust_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], List[Path]]:
    """All tensors of a ``save_pretrained`` folder (safetensors preferred), and the files read."""
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(file.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{file} is not a valid shard index ({e})") from e
            files = [folder / s for s in shards]
        else:
            files = [file]
        state: Dict[str, torch.Tensor] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{file} lists the shard {f.name}, which is not in {folder}")
            part = read_safetensors(f) if f.suffix == ".safetensors" else torch_load(f, trust_pickle)
            if not isinstance(part, dict):
                raise CheckpointError(f"{f} holds a {type(part).__name__}, not a state dict")
            state.update(part)
        return state, files
    raise CheckpointError(f"{folder} has a Hugging Face config.json but no weights (looked for "
                          f"{', '.join(WEIGHT_FILES)})")


def load_hf(folder: Path, trust_pickle: bool = False) -> Tuple[Wav2Vec2Model, LoadReport]:
    """Load a Hugging Face folder -> (encoder in eval mode, report)."""
    folder = Path(folder)
    cfg = read_hf_config(folder)
    config = config_from_hf(cfg, str(folder / "config.json"))
    normalize, normalize_note = read_do_normalize(folder)
    config = config.replace(normalize_waveform=normalize)
    state, files = read_hf_weights(folder, trust_pickle)
    where = ", ".join(str(f) for f in files)

    prefix = WRAPPER_PREFIX[cfg["model_type"]]
    key_prefix = ""  # what the file puts before the encoder's keys
    ignored: Dict[str, str] = {}
    if any(k.startswith(prefix) for k in state):  # a wrapper: the encoder is under the prefix
        heads = {k: v for k, v in state.items() if not k.startswith(prefix)}
        _, _, ignored = map_keys(heads, [], HF_HEADS_IGNORED, where, "Hugging Face (model heads)")
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        key_prefix = prefix
    mapped, origin, encoder_ignored = map_keys(state, HF_KEY_MAP, HF_IGNORED, where, "Hugging Face")
    ignored.update({key_prefix + k: reason for k, reason in encoder_ignored.items()})
    origin = {k: key_prefix + v for k, v in origin.items()}

    model = load_mapped(build_encoder(config), mapped, origin, where, HF_KEY_MAP, key_prefix)
    architectures = cfg.get("architectures") or []
    detail = architectures[0] if architectures else cfg["model_type"]
    notes = [normalize_note] if normalize_note else []
    report = LoadReport("huggingface", str(folder), config, str(detail), ignored, notes)
    return model.eval(), report
