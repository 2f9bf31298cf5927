"""``prune convert MODEL OUT --to hf``: a Hugging Face ``save_pretrained`` folder of ``HubertModel``,
``Wav2Vec2Model`` or ``WavLMModel`` that ``transformers.AutoModel.from_pretrained(OUT)`` loads with no
custom code.

transformers writes the folder itself: the model is built from the config made here, takes prune's
weights (renamed through the importer's key table, ``hf.HF_KEY_MAP``, read backwards) with
``load_state_dict(strict=True)``, is checked against prune on a padded batch, and is saved with
``save_pretrained`` beside a ``Wav2Vec2FeatureExtractor`` that records ``do_normalize``.

A transformers model has one ``num_attention_heads`` (each head ``hidden_size // num_attention_heads``
wide) and one ``intermediate_size`` for all layers, both blocks in every layer, and plain LayerNorms
over the channels it has; ``blockers`` lists what of a pruned model does not fit, and such a model is
refused before anything is written. transformers is needed by this format only (the ``hf`` extra).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..measured import num_params
from ..models import EncoderConfig, Wav2Vec2Model
from .export import ExportError, check_export_path, write_folder
from .hf import HF_KEY_MAP, MODEL_TYPES
from .keymap import source_keys

INSTALL_HINT = "pip install 'prune[hf]'"
CLASS_PREFIX = {"hubert": "Hubert", "wav2vec2": "Wav2Vec2", "wavlm": "WavLM"}
assert set(CLASS_PREFIX) == set(MODEL_TYPES.values())
CONV_NORM_EPS = 1e-5  # transformers' conv-extractor GroupNorm / LayerNorm: torch's default eps
TOLERANCE = 1e-4  # max relative error of transformers against prune on the check batch (measured ~1e-7)
SPEC_AUGMENT_KEY = "masked_spec_embed"  # transformers' SpecAugment mask embedding: training only, not in prune
MAX_REASONS = 4  # blockers named in the refusal; the rest are counted
HINT = "Prune with pruning.uniform=true for a shape transformers holds (docs/checkpoints.md, --to hf)"
POST_NORM_LAYER = "post-norm, still applies its two LayerNorms"
_LAYER_KEY = re.compile(r"encoder\.transformer\.layers\.(\d+)\.(.*)")


class TransformersUnavailable(ImportError):
    """The ``hf`` extra (transformers) is not installed."""


def require_transformers() -> None:
    """Raise ``TransformersUnavailable`` (one line: how to install) unless transformers imports."""
    try:
        importlib.import_module("transformers")
    except ImportError:
        raise TransformersUnavailable(f"--to hf needs transformers, which is not installed: {INSTALL_HINT}") \
            from None


# ------------------------------------------------------------------------ what transformers holds
def kept_layers(config: EncoderConfig) -> List[int]:
    """The layers that become transformers layers: those that kept both blocks (a pre-norm layer
    without either is an identity and is left out, as is an identity post-norm layer,
    ``encoder_layer_kept``; every other shape is a blocker)."""
    return [i for i in range(config.encoder_num_layers)
            if config.encoder_attention_kept[i] and config.encoder_ff_kept[i]]


def blockers(config: EncoderConfig) -> List[str]:
    """What keeps a standard transformers model from computing exactly what ``config``'s does, with
    the same parameters: one phrase each, empty when it can."""
    reasons: List[str] = []
    convs = config.extractor_conv_layer_config
    if config.layer_norm_eps != CONV_NORM_EPS:
        reasons.append(f"layer_norm_eps is {config.layer_norm_eps:g} and prune applies it to the conv extractor's "
                       f"norms too; transformers' use {CONV_NORM_EPS:g}")
    if config.extractor_output_scale:
        reasons.append("the conv extractor's output is scaled per channel (extractor_output_scale, DPHuBERT's "
                       "dummy_weight), which transformers has no place for")
    for i, ((channels, _, _), total) in enumerate(zip(convs, config.extractor_norm_channels)):
        if channels == 0:
            reasons.append(f"conv layer {i} has no channel left")
        elif total != channels and config.extractor_mode == "layer_norm":
            # the LayerNorm still counts the removed channels' zeros; transformers' LayerNorm cannot
            reasons.append(f"conv layer {i} keeps {channels} of {total} channels and its LayerNorm still averages "
                           f"over all {total}; transformers' LayerNorm averages over the channels it has")
    channels, total = convs[-1][0], config.extractor_norm_channels[-1]
    if channels and total != channels:
        reasons.append(f"the last conv layer keeps {channels} of {total} channels and the feature projection's "
                       f"LayerNorm still averages over all {total} (prune's phantom channels); transformers' "
                       f"averages over the channels it has")

    D, head_dim = config.encoder_embed_dim, config.encoder_head_dim
    if config.encoder_hidden_total is not None and config.encoder_hidden_total != D:
        reasons.append(f"the hidden dimension keeps {D} of {config.encoder_hidden_total} channels and every "
                       f"LayerNorm over it still averages over all {config.encoder_hidden_total}; transformers' "
                       f"LayerNorms average over the channels they have")
    elif config.encoder_pos_conv_group_sizes is not None:
        reasons.append("the positional conv is groupwise with uneven groups (a cut hidden dimension); "
                       "transformers' has equal groups")
    narrow = [i for i in range(config.encoder_num_layers) if config.encoder_attention_kept[i]
              and config.encoder_num_heads[i] and (config.qk_dims[i], config.v_dims[i]) != (head_dim, head_dim)]
    if narrow:
        i = narrow[0]
        reasons.append(f"{_layers(narrow)} keep{'s' if len(narrow) == 1 else ''} heads of {config.qk_dims[i]} "
                       f"query/key and {config.v_dims[i]} value dims of {head_dim} (transformers' heads are "
                       f"hidden_size // num_attention_heads wide in q, k and v)")
    heads = D // head_dim
    if D % head_dim:
        reasons.append(f"heads are {head_dim} wide, which does not divide hidden_size {D}")
    for i in range(config.encoder_num_layers):
        attention, ffn = config.encoder_attention_kept[i], config.encoder_ff_kept[i]
        if attention and not ffn:
            reasons.append(f"layer {i} has attention but no FFN")
        elif ffn and not attention:
            reasons.append(f"layer {i} has an FFN but no attention")
        elif not attention and not config.encoder_layer_norm_first and config.layer_kept[i]:
            # its blocks were removed one by one (free shape); uniform mode removes the layer whole
            reasons.append(f"layer {i} has neither block but, {POST_NORM_LAYER} (a transformers layer has "
                           f"both blocks; pruning.uniform=true removes a layer whole, LayerNorms included)")
    kept = kept_layers(config)
    by_heads: Dict[int, List[int]] = {}  # a head count below the full one -> the layers keeping it
    for i in kept:
        if config.encoder_num_heads[i] != heads:
            by_heads.setdefault(config.encoder_num_heads[i], []).append(i)
        elif config.is_wavlm and config.encoder_head_index[i] != list(range(heads)):
            reasons.append(f"layer {i}'s heads are reordered ({config.encoder_head_index[i]}) against WavLM's "
                           f"relative position bias")
    for count, layers in by_heads.items():
        reasons.append(f"{_layers(layers)} keep{'s' if len(layers) == 1 else ''} {count} of {heads} heads "
                       f"(transformers' attention has hidden_size // num_attention_heads wide heads, all of them)")
    empty = [i for i in kept if config.encoder_ff_interm_features[i] == 0]
    if empty and config.encoder_layer_norm_first:
        reasons.append(f"the FFN of {_layers(empty)} keeps no unit, only its output bias, and has no "
                       f"final_layer_norm left; transformers' pre-norm FFN has one")
    widths = {}
    for i in kept:
        widths.setdefault(config.encoder_ff_interm_features[i], i)
    if len(widths) > 1:
        (w0, l0), (w1, l1) = list(widths.items())[:2]
        reasons.append(f"layer {l0} keeps {w0} FFN units, layer {l1} keeps {w1} (transformers has one "
                       f"intermediate_size)")
    if not kept and (config.encoder_layer_norm_first or not any(config.layer_kept)) \
            and not any(config.encoder_attention_kept + config.encoder_ff_kept):
        reasons.append("no transformer layer is left")  # (other shapes without a kept layer are named above)
    return reasons


def _layers(indices: Sequence[int]) -> str:
    return f"layer {indices[0]}" if len(indices) == 1 else f"layers {', '.join(map(str, indices))}"


def check_holdable(config: EncoderConfig) -> List[int]:
    """Raise ValueError (one line: what blocks it, and what avoids it) unless transformers can hold
    ``config`` exactly; else the layers that become transformers' layers."""
    reasons = blockers(config)
    if reasons:
        shown = "; ".join(reasons[:MAX_REASONS])
        more = f"; ... and {len(reasons) - MAX_REASONS} more" if len(reasons) > MAX_REASONS else ""
        raise ValueError(f"--to hf: transformers' {CLASS_PREFIX[config.architecture]}Model cannot hold this model: "
                         f"{shown}{more}. {HINT}")
    return kept_layers(config)


# ------------------------------------------------------------------------------ config and weights
def hf_config_kwargs(config: EncoderConfig, kept: Sequence[int]) -> Dict[str, Any]:
    """The ``{Hubert,Wav2Vec2,WavLM}Config`` arguments of a model transformers can hold (the
    importer's ``config_from_hf`` read backwards)."""
    dims, kernels, strides = (list(v) for v in zip(*config.extractor_conv_layer_config))
    widths = [config.encoder_ff_interm_features[i] for i in kept]
    kwargs: Dict[str, Any] = dict(
        hidden_size=config.encoder_embed_dim, num_hidden_layers=len(kept),
        num_attention_heads=config.encoder_embed_dim // config.encoder_head_dim,
        intermediate_size=widths[0] if widths else 0,
        conv_dim=dims, conv_kernel=kernels, conv_stride=strides, conv_bias=config.extractor_conv_bias,
        feat_extract_norm=config.extractor_mode.split("_")[0],  # group_norm -> group, layer_norm -> layer
        do_stable_layer_norm=config.encoder_layer_norm_first,
        num_conv_pos_embeddings=config.encoder_pos_conv_kernel,
        num_conv_pos_embedding_groups=config.encoder_pos_conv_groups,
        layer_norm_eps=config.layer_norm_eps, hidden_act="gelu", feat_extract_activation="gelu",
        feat_proj_dropout=config.encoder_projection_dropout, attention_dropout=config.encoder_attention_dropout,
        activation_dropout=config.encoder_ff_interm_dropout, hidden_dropout=config.encoder_dropout,
        layerdrop=config.encoder_layer_drop,
    )
    if config.is_wavlm:
        kwargs.update(num_buckets=config.encoder_num_buckets, max_bucket_distance=config.encoder_max_distance)
    return kwargs


def hf_state_dict(model: Wav2Vec2Model, kept: Sequence[int], hf_keys: Sequence[str]) -> Dict[str, Tensor]:
    """prune's weights under transformers' names: layer ``kept[j]`` becomes layer ``j`` (WavLM's
    bias table goes with the first, which computes the bias in transformers), and each key is
    the one ``HF_KEY_MAP`` maps to it that ``hf_keys`` (the transformers model's) holds; the
    weight-norm spelling is the one the installed transformers uses."""
    renumber = {old: new for new, old in enumerate(kept)}
    known = set(hf_keys)
    out: Dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        match = _LAYER_KEY.fullmatch(key)
        if match:  # only kept layers have weights (a removed pre-norm layer has none)
            key = f"encoder.transformer.layers.{renumber[int(match[1])]}.{match[2]}"
        names = [k for k in source_keys(key, HF_KEY_MAP) if k in known]
        if len(names) != 1:
            raise ExportError(f"{key}: the key table HF_KEY_MAP gives {names or 'no key'} of the transformers "
                              f"model for it, expected one")
        out[names[0]] = tensor.detach().cpu().contiguous()
    return out


def build_hf_model(model: Wav2Vec2Model, kept: Sequence[int]) -> nn.Module:
    """The transformers base model holding ``model``'s weights, in eval mode. What prune has no
    weight for: the SpecAugment mask embedding (training only; transformers' own seeded init) and
    empty tensors (the linears of an FFN with no unit)."""
    import transformers

    prefix = CLASS_PREFIX[model.config.architecture]
    hf_config = getattr(transformers, f"{prefix}Config")(**hf_config_kwargs(model.config, kept))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same folder for the same model
        hf = getattr(transformers, f"{prefix}Model")(hf_config)
    own = hf.state_dict()
    state = hf_state_dict(model, kept, list(own))
    missing = [k for k in own if k not in state and not (k == SPEC_AUGMENT_KEY or own[k].numel() == 0)]
    if missing:
        raise ExportError(f"no prune weight for the transformers keys {missing}")
    state.update({k: v for k, v in own.items() if k not in state})
    try:
        hf.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shapes: the config made here does not describe the weights
        raise ExportError(f"transformers' {prefix}Model does not take the weights: {e}") from e
    return hf.eval()


def hf_param_count(hf: nn.Module) -> int:
    """transformers' parameters that inference uses: all but the SpecAugment mask embedding."""
    return sum(p.numel() for name, p in hf.named_parameters() if name != SPEC_AUGMENT_KEY)


def hidden_state_map(config: EncoderConfig, kept: Sequence[int]) -> List[int]:
    """transformers' hidden state ``j`` is prune's hidden state ``map[j]``: the input to the first
    layer, each kept layer's output, and the last (after the final LayerNorm, pre-norm) is prune's
    last whatever layers after it were removed (they are identities)."""
    return [0] + [i + 1 for i in kept[:-1]] + [config.encoder_num_layers]


def check_batch() -> Tuple[Tensor, Tensor]:
    """Two seeded utterances, 1 s and 0.6875 s (zero-padded): (batch, samples), lengths."""
    gen = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(2, 16000, generator=gen)
    lengths = torch.tensor([16000, 11000])
    x[1, 11000:] = 0.0
    return x, lengths


@torch.no_grad()
def compare(model: Wav2Vec2Model, hf: nn.Module, kept: Sequence[int], x: Tensor, lengths: Tensor) -> List[float]:
    """Per hidden state of transformers, its max relative error against prune's on the valid frames.
    transformers takes the waveforms normalised by prune (its feature extractor's job there)."""
    model.eval()
    ours, frames = model(x, lengths)
    mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    out = hf(model.prepare_waveforms(x, lengths), attention_mask=mask, output_hidden_states=True)
    theirs = list(out.hidden_states[:-1]) + [out.last_hidden_state]
    valid = torch.arange(ours[0].shape[1])[None] < frames[:, None]  # (batch, frames)
    errors = []
    for j, i in enumerate(hidden_state_map(model.config, kept)):
        a, b = ours[i][valid], theirs[j][valid]
        errors.append(((a - b).abs().max() / b.abs().max()).item())
    return errors


def export_hf(model: Wav2Vec2Model, out: Path, overwrite: bool = False) -> List[str]:
    """Write ``model`` to the folder ``out`` as a transformers ``save_pretrained`` folder (atomically:
    a temporary folder renamed into place); returns the lines to print. A model transformers cannot
    hold is refused (ValueError) and one that does not match it on the check batch (ExportError)
    before anything is written."""
    require_transformers()
    import transformers

    out = check_export_path(out, overwrite, flag="--overwrite")
    config = model.config
    kept = check_holdable(config)
    hf = build_hf_model(model, kept)
    errors = compare(model, hf, kept, *check_batch())
    worst = max(errors)
    line = f"transformers vs prune, max relative error over the {len(errors)} hidden states on a padded batch: " \
           f"{worst:.1e}"
    if not worst <= TOLERANCE:  # NaN fails too
        raise ExportError(f"{line}; above {TOLERANCE:g}: nothing written")
    ours, theirs = num_params(model), hf_param_count(hf)
    if ours != theirs:
        raise ExportError(f"transformers' model has {theirs} parameters (the mask embedding aside), prune's {ours}")
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=config.normalize_waveform,
        # prune always masks padding; transformers does the same only when given the mask
        return_attention_mask=True)

    def write(tmp: Path) -> None:
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # "Writing model shards" on stderr: one file, no bar wanted
        try:
            hf.save_pretrained(tmp)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        extractor.save_pretrained(tmp)

    write_folder(out, write)
    name = type(hf).__name__
    lines = [line]
    if len(kept) < config.encoder_num_layers:
        lines.append(f"prune's layers {' '.join(map(str, kept))} are transformers' layers 0-{len(kept) - 1} "
                     f"(the others were removed whole)")
    lines.append(f"wrote {out} ({name}: config.json, model.safetensors, preprocessor_config.json with do_normalize "
                 f"{str(config.normalize_waveform).lower()}; {ours:,} parameters, + {config.encoder_embed_dim} "
                 f"of SpecAugment's mask embedding; transformers.AutoModel.from_pretrained({str(out)!r}))")
    return lines
