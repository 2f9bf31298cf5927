"""DPHuBERT's checkpoint files (pyf98/DPHuBERT), read exactly, without its code.

Its converted teachers (``convert_*.py``) and its pruned models (``prune.py``,
``save_final_ckpt.py``) are all ``torch.save`` dicts: ``config``, the keyword arguments of its
``wav2vec2_model`` / ``wavlm_model``, ``state_dict``, torchaudio's parameter names plus its own,
and optionally ``distill_linear_projs`` (the distillation heads). What DPHuBERT's modules compute
beyond torchaudio's, and where it lands in prune's encoder:

* ``feature_extractor.dummy_weight``: multiplies the last conv layer's output per channel; after
  pruning it holds that layer's soft gate values, before the feature projection's LayerNorm ->
  ``feature_extractor.output_scale`` (``extractor_output_scale``). All ones (a model never pruned
  in the extractor) is the identity and is not loaded.
* per-layer ``encoder_use_attention`` / ``encoder_use_feed_forward``, ``encoder_num_heads`` with
  ``encoder_head_dim`` -> ``encoder_attention_kept`` / ``encoder_ff_kept``, per-layer heads.
  A post-norm layer applies both LayerNorms even with a block gone (as prune's); a pre-norm
  layer skips the LayerNorm of a gone block, which DPHuBERT still stores: left out, unused.
* WavLM: ``encoder_total_num_heads`` and ``encoder_remaining_heads``. The bias table
  (``rel_attn_embed``, layer 0) and each layer's gate (``gru_rel_pos_linear`` on the input split
  into ``total`` chunks, ``gru_rel_pos_const`` per original head) work on all the original heads,
  then keep the remaining ones -> ``encoder_head_index``, ``gru_rel_pos_const`` cut to those heads.
* with a ``*_prune_*`` flag on, the state dict holds HardConcrete ``log_alpha`` and the model
  multiplies by their deterministic eval-mode masks (the same rule as ``prune.gates``): after
  conv channels' GELU, on each head's output, on FFN units, on a whole block's output. Each mask
  is folded into the weight that follows it (the next conv's input channels, ``dummy_weight``,
  ``out_proj``, ``output_dense``), which is exact.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor

from ..gates import HardConcrete
from ..models import Wav2Vec2Model, build_encoder
from .keymap import CheckpointError, Ignore, LoadReport, Rule, as_flag, format_keys, load_mapped, map_keys
from .torchaudio import TORCHAUDIO_IGNORED, TORCHAUDIO_KEY_MAP, ConfigLike, config_from_params

FORMAT_DETAIL = "torchaudio wav2vec2_model config + state_dict"

# DPHuBERT keys -> prune keys: torchaudio's table plus the extractor's output scale
DPHUBERT_KEY_MAP: List[Rule] = [
    *TORCHAUDIO_KEY_MAP,
    Rule(r"feature_extractor\.dummy_weight", "feature_extractor.output_scale"),
]
GATE_FOLDED = "HardConcrete gate (log_alpha): its eval-mode mask is folded into the weights it multiplies"
UNUSED_PRE_NORM = "pre-norm LayerNorm of a block pruned away: DPHuBERT stores it but never applies it"
IDENTITY_SCALE = "all ones: the identity (the extractor was not pruned)"
DISTILL_HEADS = "DPHuBERT's distillation heads (student -> teacher layer projections), used in training only"
DPHUBERT_IGNORED: List[Ignore] = [
    *TORCHAUDIO_IGNORED,
    Ignore(r".*\.log_alpha", GATE_FOLDED),
    Ignore(r"encoder\.transformer\.layers\.\d+\.(layer_norm|final_layer_norm)\.(weight|bias)", UNUSED_PRE_NORM),
    Ignore(r"feature_extractor\.dummy_weight", IDENTITY_SCALE),
]

# its names for EncoderConfig fields; arguments that only matter in training
RENAMED = {"encoder_use_attention": "encoder_attention_kept", "encoder_use_feed_forward": "encoder_ff_kept"}
TRAINING_ARGS = ("mask_prob", "mask_channel_prob")
PRUNE_FLAGS = ("extractor_prune_conv_channels", "encoder_prune_attention_heads", "encoder_prune_attention_layer",
               "encoder_prune_feed_forward_intermediate", "encoder_prune_feed_forward_layer")
WAVLM_ARGS = ("encoder_total_num_heads", "encoder_remaining_heads")
# config keys only DPHuBERT writes (torchaudio's wav2vec2_model takes none of them)
OWN_ARGS = (*RENAMED, *PRUNE_FLAGS, *WAVLM_ARGS)

CONV = "feature_extractor.conv_layers.{}."
LAYER = "encoder.transformer.layers.{}."


def is_dphubert_file(obj: Any) -> bool:
    """A ``{"state_dict", "config"}`` dict whose config or state dict has DPHuBERT's own names."""
    if not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and isinstance(obj.get("config"), dict)):
        return False
    return any(k in obj["config"] for k in OWN_ARGS) or "feature_extractor.dummy_weight" in obj["state_dict"]


def load_dphubert(obj: Dict[str, Any], where: str, config: ConfigLike = None) -> Tuple[Wav2Vec2Model, LoadReport]:
    """A DPHuBERT file's dict -> (encoder in eval mode, report). ``config``: a partial dict of
    ``wav2vec2_model`` arguments overriding the file's."""
    file_config = obj["config"]
    state = {str(k): v for k, v in obj["state_dict"].items()}
    flags = {k: as_flag(file_config.get(k, False), f"{where} (config)", k) for k in PRUNE_FLAGS}
    params = {**encoder_params(file_config, f"{where} (config)"), **dict(config or {})}
    encoder_config = config_from_params(params, f"{where} (config)")
    if encoder_config.is_wavlm and "encoder.transformer.layers.0.attention.rel_attn_embed.weight" not in state:
        raise CheckpointError(f"{where}: layer 0's attention was pruned away, and with it WavLM's relative position "
                              f"bias table (DPHuBERT computes it only there; its model then runs without position "
                              f"bias and fails on padded batches): prune cannot load this model")
    check_gate_flags(state, flags, where)
    if any(flags.values()):
        state = fold_gates(state, flags, encoder_config.encoder_num_layers,
                           len(encoder_config.extractor_conv_layer_config), where)
    if encoder_config.is_wavlm:
        state = keep_bias_gate_heads(state, encoder_config.encoder_head_index, encoder_config.encoder_attention_kept)
    scale = state.get("feature_extractor.dummy_weight")
    if isinstance(scale, Tensor) and not bool((scale == 1).all()):
        encoder_config = encoder_config.replace(extractor_output_scale=True)
    rules = DPHUBERT_KEY_MAP
    if not encoder_config.extractor_output_scale:
        rules = [r for r in rules if "dummy_weight" not in r.pattern]
    if encoder_config.encoder_layer_norm_first:
        rules = [r for r in rules if not _is_unused_pre_norm(r)] + _pre_norm_rules(encoder_config)
    mapped, origin, ignored = map_keys(state, rules, DPHUBERT_IGNORED, where, "DPHuBERT")
    for key in (obj.get("distill_linear_projs") or {}):
        ignored[f"distill_linear_projs.{key}"] = DISTILL_HEADS
    model = load_mapped(build_encoder(encoder_config), mapped, origin, where, rules)
    return model.eval(), LoadReport("dphubert", where, encoder_config, _detail(flags, file_config), ignored)


def encoder_params(config: Dict[str, Any], where: str) -> Dict[str, Any]:
    """DPHuBERT's ``wav2vec2_model`` / ``wavlm_model`` arguments -> ``wav2vec2_model`` arguments in
    prune's names (``config_from_params`` checks and builds them)."""
    params = {RENAMED.get(k, k): v for k, v in config.items()
              if k not in PRUNE_FLAGS + TRAINING_ARGS + WAVLM_ARGS}
    params.setdefault("architecture", "wav2vec2")  # HuBERT and wav2vec 2.0 share one architecture
    if "normalize_waveform" in params:
        params["normalize_waveform"] = as_flag(params["normalize_waveform"], where, "normalize_waveform")
    if any(k in config for k in WAVLM_ARGS):
        params.update(wavlm_heads(config, where))
    return params


def wavlm_heads(config: Dict[str, Any], where: str) -> Dict[str, Any]:
    """WavLM's ``encoder_total_num_heads`` / ``encoder_remaining_heads`` -> per-layer kept heads,
    their original indices and the head size."""
    missing = [k for k in WAVLM_ARGS + ("encoder_embed_dim",) if k not in config]
    if missing:
        raise CheckpointError(f"{where}: a WavLM config needs {', '.join(missing)}")
    totals, remaining = config["encoder_total_num_heads"], config["encoder_remaining_heads"]
    totals = [totals] * len(remaining) if isinstance(totals, int) else list(totals)
    if len(set(totals)) != 1 or len(totals) != len(remaining):
        raise CheckpointError(f"{where}: encoder_total_num_heads must be one count for all {len(remaining)} layers "
                              f"(encoder_remaining_heads), got {totals}")
    total, embed = int(totals[0]), int(config["encoder_embed_dim"])
    bad = [i for i, heads in enumerate(remaining) if any(not 0 <= int(h) < total for h in heads)]
    if embed % total or bad:
        raise CheckpointError(f"{where}: encoder_remaining_heads of layer(s) {bad} must be indices below "
                              f"encoder_total_num_heads ({total}), which must divide encoder_embed_dim ({embed})")
    return dict(architecture="wavlm", encoder_head_dim=embed // total,
                encoder_num_heads=[len(heads) for heads in remaining],
                encoder_head_index=[[int(h) for h in heads] for heads in remaining])


# ------------------------------------------------------------------------------ gates -> weights
# which flag puts each gate into the model (DPHuBERT's module names)
GATE_FLAGS = {r"feature_extractor\.conv_layers\.\d+\.hard_concrete\.log_alpha": "extractor_prune_conv_channels",
              r".*\.attention\.hard_concrete_for_heads\.log_alpha": "encoder_prune_attention_heads",
              r".*\.attention\.hard_concrete_for_layer\.log_alpha": "encoder_prune_attention_layer",
              r".*\.feed_forward\.hard_concrete_for_intermediate\.log_alpha": "encoder_prune_feed_forward_intermediate",
              r".*\.feed_forward\.hard_concrete_for_layer\.log_alpha": "encoder_prune_feed_forward_layer"}


def check_gate_flags(state: Dict[str, Any], flags: Dict[str, bool], where: str) -> None:
    """Every ``log_alpha`` in the file belongs to a gate its config switches on (else DPHuBERT's
    model would not have it, and prune would not apply it)."""
    stray = [k for k in state if k.endswith("log_alpha")
             and not any(re.fullmatch(p, k) and flags[f] for p, f in GATE_FLAGS.items())]
    if stray:
        raise CheckpointError(f"{where}: the state dict has HardConcrete gates its config does not switch on "
                              f"(the *_prune_* flags): {format_keys(stray)}")


def eval_mask(log_alpha: Tensor) -> Tensor:
    """(n,) -> (n,) the mask DPHuBERT's HardConcrete gives in eval mode (the same rule as ours)."""
    gate = HardConcrete(log_alpha.numel())
    with torch.no_grad():
        gate.log_alpha.copy_(log_alpha.float())
    return gate.eval_mask().to(log_alpha.dtype)


def _scale_columns(weight: Tensor, mask: Tensor) -> Tensor:
    """weight (out, in, ...) with input column j scaled by mask[j // (in / len(mask))]."""
    per = weight.shape[1] // mask.numel()
    factor = mask.repeat_interleave(per)
    return weight * factor.view(1, -1, *([1] * (weight.ndim - 2)))


def fold_gates(state: Dict[str, Any], flags: Dict[str, bool], layers: int, convs: int, where: str) -> Dict[str, Any]:
    """A state dict with HardConcrete ``log_alpha`` -> the same state dict whose weights include
    the masks (the ``log_alpha`` stay, ignored with their reason)."""
    state = dict(state)

    def mask(key: str, flag: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"{where}: config has {flag}=True but the state dict has no {key}")
        return eval_mask(state[key])

    def fold(key: str, flag: str, targets: List[str], how: Callable[[Tensor, Tensor], Tensor]) -> None:
        if not flags[flag] or not all(t in state for t in targets):
            return  # not gated, or the block is gone from the file (and its gate with it)
        m = mask(key, flag)
        for target in targets:
            state[target] = how(state[target], m)

    for i in range(convs):
        after = [CONV.format(i + 1) + "conv.weight"] if i + 1 < convs else ["feature_extractor.dummy_weight"]
        fold(CONV.format(i) + "hard_concrete.log_alpha", "extractor_prune_conv_channels", after,
             _scale_columns if i + 1 < convs else (lambda w, m: w * m))
    for i in range(layers):
        attn, ffn = LAYER.format(i) + "attention.", LAYER.format(i) + "feed_forward."
        fold(attn + "hard_concrete_for_heads.log_alpha", "encoder_prune_attention_heads", [attn + "out_proj.weight"],
             _scale_columns)
        fold(attn + "hard_concrete_for_layer.log_alpha", "encoder_prune_attention_layer",
             [attn + "out_proj.weight", attn + "out_proj.bias"], lambda w, m: w * m)
        fold(ffn + "hard_concrete_for_intermediate.log_alpha", "encoder_prune_feed_forward_intermediate",
             [ffn + "output_dense.weight"], _scale_columns)
        fold(ffn + "hard_concrete_for_layer.log_alpha", "encoder_prune_feed_forward_layer",
             [ffn + "output_dense.weight", ffn + "output_dense.bias"], lambda w, m: w * m)
    return state


def keep_bias_gate_heads(state: Dict[str, Any], head_index: List[List[int]], attention_kept: List[bool]
                         ) -> Dict[str, Any]:
    """WavLM's per-original-head ``gru_rel_pos_const`` (1, total, 1, 1) -> the kept heads' entries."""
    state = dict(state)
    for i, (index, kept) in enumerate(zip(head_index, attention_kept)):
        key = LAYER.format(i) + "attention.gru_rel_pos_const"
        if kept and key in state and state[key].shape[1] != len(index):
            state[key] = state[key][:, index]
    return state


# ------------------------------------------------------------------------------ pre-norm LayerNorms
def _is_unused_pre_norm(rule: Rule) -> bool:
    return rule.pattern.startswith(r"encoder\.transformer\.layers\.(\d+)\.") and "layer_norm" in rule.pattern


def _pre_norm_rules(config) -> List[Rule]:
    """The pre-norm LayerNorms of the blocks a layer still has (the others are left out)."""
    rules = []
    for i, (attention, ffn) in enumerate(zip(config.encoder_attention_kept, config.encoder_ff_kept)):
        for name, kept in (("layer_norm", attention), ("final_layer_norm", ffn)):
            if kept:
                rules.append(Rule(re.escape(LAYER.format(i) + name) + r"\.(weight|bias)",
                                  LAYER.format(i) + name + r".\1"))
    return rules


def _detail(flags: Dict[str, bool], config: Dict[str, Any]) -> str:
    if any(flags.values()):
        return f"{FORMAT_DETAIL}; saved while pruning, HardConcrete gates folded in"
    n = len(config.get("encoder_use_attention") or [])
    removed = n - sum(map(bool, config.get("encoder_use_attention") or [])) \
        + n - sum(map(bool, config.get("encoder_use_feed_forward") or []))
    return FORMAT_DETAIL + (f"; pruned, {removed} block(s) removed" if removed else "")
