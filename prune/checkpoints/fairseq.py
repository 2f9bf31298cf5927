"""fairseq checkpoints of wav2vec 2.0 and HuBERT, and the official WavLM ``.pt`` files, read
without fairseq.

A checkpoint is a dict with the weights in ``model`` and the config in one of:

* ``cfg["model"]``: hydra-era fairseq (a dict, or an omegaconf ``DictConfig``);
* ``args``: older fairseq (an ``argparse.Namespace`` with the model fields at top level);
* ``cfg``: the official WavLM release (a flat dict of ``WavLMConfig`` fields).

Fine-tuned CTC checkpoints (``w2v_encoder.w2v_model.*`` keys) are read too: their encoder
config is the pretraining config stored in ``w2v_args``.

Waveform normalisation is a task setting in fairseq: ``cfg["task"]["normalize"]`` (hydra),
``args.normalize`` (argparse), ``cfg["normalize"]`` (WavLM); fairseq's own default is false.
"""

from __future__ import annotations

import ast
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..models import EncoderConfig, Wav2Vec2Model, build_encoder
from ..models.config import ConvSpec
from .keymap import CheckpointError, Ignore, LoadReport, Rule, as_flag, load_mapped, map_keys, pos_conv_rules
from .safe_load import to_plain

# fairseq / WavLM state-dict keys -> prune keys. The conv blocks are nn.Sequential:
# (conv, dropout, norm, gelu) with norm = Fp32GroupNorm in layer 0 for extractor_mode "default",
# or (TransposeLast, Fp32LayerNorm, TransposeLast) in every layer for "layer_norm".
FAIRSEQ_KEY_MAP: List[Rule] = [
    Rule(r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    Rule(r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    Rule(r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)",
         r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    Rule(r"layer_norm\.(weight|bias)", r"encoder.feature_projection.layer_norm.\1"),  # LN over the conv features
    Rule(r"post_extract_proj\.(weight|bias)", r"encoder.feature_projection.projection.\1"),
    # pos_conv = nn.Sequential(weight-normed conv, SamePad, GELU)
    *pos_conv_rules(r"encoder\.pos_conv\.0"),
    Rule(r"encoder\.layer_norm\.(weight|bias)", r"encoder.transformer.layer_norm.\1"),
    Rule(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)",
         r"encoder.transformer.layers.\1.attention.\2_proj.\3"),
    Rule(r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)",
         r"encoder.transformer.layers.\1.layer_norm.\2"),
    Rule(r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)",
         r"encoder.transformer.layers.\1.feed_forward.intermediate_dense.\2"),
    Rule(r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.transformer.layers.\1.feed_forward.output_dense.\2"),
    Rule(r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)",
         r"encoder.transformer.layers.\1.final_layer_norm.\2"),
    # WavLM (WavLM.py): gated relative position bias; the bucket table is in layer 0 only
    Rule(r"encoder\.layers\.0\.self_attn\.relative_attention_bias\.weight",
         r"encoder.transformer.rel_pos_bias.rel_attn_embed.weight"),
    Rule(r"encoder\.layers\.(\d+)\.self_attn\.grep_linear\.(weight|bias)",
         r"encoder.transformer.layers.\1.attention.gru_rel_pos_linear.\2"),
    Rule(r"encoder\.layers\.(\d+)\.self_attn\.grep_a", r"encoder.transformer.layers.\1.attention.gru_rel_pos_const"),
]

FAIRSEQ_IGNORED: List[Ignore] = [
    Ignore(r"mask_emb", "masking embedding (pretraining only)"),
    Ignore(r"label_embs_concat", "HuBERT label embeddings (pretraining only)"),
    Ignore(r"final_proj\.(weight|bias)", "pretraining target projection"),
    Ignore(r"target_glu\.0\.(weight|bias)", "pretraining target GLU"),
    Ignore(r"quantizer\.(vars|weight_proj\.weight|weight_proj\.bias)", "wav2vec 2.0 quantizer (pretraining only)"),
    Ignore(r"project_q\.(weight|bias)", "wav2vec 2.0 quantized target projection (pretraining only)"),
]

FINETUNED_PREFIX = "w2v_encoder.w2v_model."
FINETUNED_IGNORED: List[Ignore] = [Ignore(r"w2v_encoder\.proj\.(weight|bias)", "CTC head of a fine-tuned model")]

# Defaults of fairseq's Wav2Vec2Config / HubertConfig and WavLM.py's WavLMConfig, for fields a
# config leaves out. WavLM's own class defaults differ where noted (its checkpoints set them all).
FAIRSEQ_DEFAULTS: Dict[str, Any] = dict(
    extractor_mode="default", conv_feature_layers="[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2",
    conv_bias=False, encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
    activation_fn="gelu", layer_norm_first=False, conv_pos=128, conv_pos_groups=16, dropout=0.1,
    attention_dropout=0.1, activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.0,
    relative_position_embedding=False, num_buckets=320, max_distance=1280, gru_rel_pos=False,
    layer_type="transformer", pos_conv_depth=1, conv_pos_batch_norm=False, quantize_input=False,
)
EXTRACTOR_MODES = {"default": "group_norm", "layer_norm": "layer_norm"}
PRETRAIN_NAMES = ("wav2vec2", "hubert", "wavlm")
FINETUNE_NAMES = ("wav2vec_ctc", "hubert_ctc")
MAX_CONV_LAYERS = 256


def is_fairseq_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and (
        obj.get("cfg") is not None or obj.get("args") is not None)


def parse_conv_feature_layers(spec: str) -> List[ConvSpec]:
    """fairseq's ``conv_feature_layers`` string, e.g. ``"[(512,10,5)] + [(512,3,2)] * 4"`` -> list of
    (dim, kernel, stride), without ``eval``: only list/tuple literals of ints, ``+`` and ``* int``."""

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [walk(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = walk(node.left), walk(node.right)
            if isinstance(left, list) and isinstance(right, list):
                return left + right
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            left, right = walk(node.left), walk(node.right)
            if isinstance(left, int) and isinstance(right, list):
                left, right = right, left
            if isinstance(left, list) and isinstance(right, int) and 0 <= right * len(left) <= MAX_CONV_LAYERS:
                return left * right
        raise ValueError(f"unsupported expression {ast.dump(node)[:80]}")

    try:
        layers = walk(ast.parse(str(spec).strip(), mode="eval"))
        if not isinstance(layers, list) or not layers:
            raise ValueError("not a non-empty list")
        for layer in layers:
            if not (isinstance(layer, tuple) and len(layer) == 3 and all(isinstance(v, int) and v > 0 for v in layer)):
                raise ValueError(f"{layer!r} is not a (dim, kernel, stride) tuple of positive ints")
    except (SyntaxError, ValueError, RecursionError) as e:
        raise CheckpointError(f"conv_feature_layers {str(spec)[:200]!r} is not a list of (dim, kernel, stride) "
                              f"tuples ({e})") from None
    return layers


def read_model_cfg(ckpt: Dict[str, Any], where: str) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
    """(model section, whole config, where it came from) of a fairseq checkpoint, as plain dicts.
    Interpolations like ``${task.normalize}`` are relative to the whole config."""
    cfg = to_plain(ckpt.get("cfg"))
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg["model"], cfg, "hydra cfg"
    args = to_plain(ckpt.get("args"))
    if isinstance(args, dict) and args:
        return args, args, "args namespace"
    if isinstance(cfg, dict) and "encoder_layers" in cfg:  # official WavLM: a flat WavLMConfig dict
        return cfg, cfg, "flat cfg"
    raise CheckpointError(f"{where} has neither cfg['model'], args nor a flat model cfg to read the architecture from")


def _model_name(cfg: Dict[str, Any]) -> Optional[str]:
    return cfg.get("_name") or cfg.get("arch")


def _resolve(cfg: Dict[str, Any], root: Dict[str, Any], key: str, where: str) -> Any:
    """cfg[key] (or its default), following a plain ``${a.b}`` interpolation from the config root."""
    value = cfg.get(key, FAIRSEQ_DEFAULTS.get(key))
    for _ in range(8):
        if not (isinstance(value, str) and value.startswith("${") and value.endswith("}")):
            break
        node: Any = root
        for part in value[2:-1].split("."):
            if not isinstance(node, dict) or part not in node:
                raise CheckpointError(f"{where}: cannot resolve {key}={value!r}")
            node = node[part]
        value = node
    if value == "???":
        raise CheckpointError(f"{where}: the config leaves {key} unset ('???')")
    return value


def read_normalize(cfg: Dict[str, Any], root: Dict[str, Any], where: str) -> bool:
    """fairseq's ``normalize``: the model section's own (WavLM's flat cfg, fine-tuning configs, an
    argparse namespace), else the task's; fairseq's default (false) if neither records it."""
    task = root.get("task")
    if "normalize" in cfg:
        value = _resolve(cfg, root, "normalize", where)
    elif isinstance(task, dict) and "normalize" in task:
        value = _resolve(task, root, "normalize", where)
    else:
        return False
    return as_flag(value, where, "normalize")


def config_from_fairseq(cfg: Dict[str, Any], keys: List[str], where: str, root: Optional[Dict[str, Any]] = None
                        ) -> EncoderConfig:
    """A fairseq / WavLM model config (plain dict) -> EncoderConfig, the architecture told by the
    config (``_name`` / ``arch``, ``relative_position_embedding``) and the keys."""
    root = cfg if root is None else root

    def get(key: str) -> Any:
        return _resolve(cfg, root, key, where)

    name = _model_name(cfg)
    if name is not None and not str(name).startswith(PRETRAIN_NAMES):
        raise CheckpointError(f"{where} is a fairseq {name!r} model; prune loads {', '.join(PRETRAIN_NAMES)} "
                              f"(and their CTC fine-tunings {', '.join(FINETUNE_NAMES)})")
    wavlm = (bool(get("relative_position_embedding"))
             or "encoder.layers.0.self_attn.relative_attention_bias.weight" in keys)
    if wavlm:
        architecture = "wavlm"
    elif (name is not None and str(name).startswith("hubert")) or "label_embs_concat" in keys:
        architecture = "hubert"
    else:
        architecture = "wav2vec2"

    unsupported = []
    if get("extractor_mode") not in EXTRACTOR_MODES:
        unsupported.append(f"extractor_mode={get('extractor_mode')!r}")
    if get("activation_fn") != "gelu":
        unsupported.append(f"activation_fn={get('activation_fn')!r} (only gelu)")
    if get("layer_type") not in (None, "transformer"):
        unsupported.append(f"layer_type={get('layer_type')!r}")
    if get("pos_conv_depth") not in (None, 1):
        unsupported.append(f"pos_conv_depth={get('pos_conv_depth')}")
    if get("conv_pos_batch_norm"):
        unsupported.append("conv_pos_batch_norm=True")
    if get("quantize_input"):
        unsupported.append("quantize_input=True")
    if wavlm and not get("gru_rel_pos"):
        unsupported.append("relative_position_embedding without gru_rel_pos")
    if unsupported:
        raise CheckpointError(f"{where} uses settings the in-house encoder does not implement: "
                              f"{', '.join(unsupported)}")
    normalize = read_normalize(cfg, root, where)
    try:
        return EncoderConfig(
            architecture=architecture,
            extractor_mode=EXTRACTOR_MODES[get("extractor_mode")],
            extractor_conv_layer_config=parse_conv_feature_layers(get("conv_feature_layers")),
            extractor_conv_bias=bool(get("conv_bias")),
            encoder_embed_dim=int(get("encoder_embed_dim")),
            encoder_projection_dropout=float(get("dropout_input")),
            encoder_pos_conv_kernel=int(get("conv_pos")),
            encoder_pos_conv_groups=int(get("conv_pos_groups")),
            encoder_num_layers=int(get("encoder_layers")),
            encoder_num_heads=int(get("encoder_attention_heads")),
            encoder_attention_dropout=float(get("attention_dropout")),
            encoder_ff_interm_features=int(get("encoder_ffn_embed_dim")),
            encoder_ff_interm_dropout=float(get("activation_dropout")),
            encoder_dropout=float(get("dropout")),
            encoder_layer_norm_first=bool(get("layer_norm_first")),
            encoder_layer_drop=float(get("encoder_layerdrop")),
            encoder_num_buckets=int(get("num_buckets")),
            encoder_max_distance=int(get("max_distance")),
            normalize_waveform=normalize,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} has an invalid model config: {e}") from e


def load_fairseq(ckpt: Dict[str, Any], where: str) -> Tuple[Wav2Vec2Model, LoadReport]:
    """A loaded fairseq / WavLM checkpoint dict -> (encoder in eval mode, report)."""
    model_cfg, root, cfg_source = read_model_cfg(ckpt, where)
    state: Dict[str, Any] = ckpt["model"]
    ignored: Dict[str, str] = {}
    key_prefix = ""
    if any(k.startswith("w2v_encoder.") for k in state) or str(_model_name(model_cfg) or "").startswith(FINETUNE_NAMES):
        # fine-tuned CTC model: the pretraining config is kept in w2v_args
        w2v_args = model_cfg.get("w2v_args")
        if not isinstance(w2v_args, dict):
            raise CheckpointError(f"{where} is a fine-tuned fairseq model without w2v_args; its encoder config is in "
                                  f"the pretraining checkpoint (w2v_path={model_cfg.get('w2v_path')!r}): load that one")
        root = w2v_args
        model_cfg = w2v_args["model"] if isinstance(w2v_args.get("model"), dict) else w2v_args
        head = {k: v for k, v in state.items() if not k.startswith(FINETUNED_PREFIX)}
        _, _, ignored = map_keys(head, [], FINETUNED_IGNORED, where, "fairseq (fine-tuned heads)")
        state = {k[len(FINETUNED_PREFIX):]: v for k, v in state.items() if k.startswith(FINETUNED_PREFIX)}
        key_prefix = FINETUNED_PREFIX
        cfg_source += ", fine-tuned"
    config = config_from_fairseq(model_cfg, list(state), where, root)
    mapped, origin, encoder_ignored = map_keys(state, FAIRSEQ_KEY_MAP, FAIRSEQ_IGNORED, where, "fairseq")
    ignored.update({key_prefix + k: reason for k, reason in encoder_ignored.items()})
    origin = {k: key_prefix + v for k, v in origin.items()}

    notes = []
    projection = "encoder.feature_projection.projection"
    conv_dim = config.extractor_conv_layer_config[-1][0]
    if f"{projection}.weight" not in mapped and conv_dim == config.encoder_embed_dim:
        # fairseq has no post_extract_proj when the conv features already have the embedding size:
        # an identity projection is exactly that
        mapped[f"{projection}.weight"] = torch.eye(conv_dim)
        mapped[f"{projection}.bias"] = torch.zeros(conv_dim)
        origin[f"{projection}.weight"] = origin[f"{projection}.bias"] = "(no post_extract_proj: identity)"
        notes.append("the checkpoint has no post_extract_proj (conv features = embedding size): identity projection")

    model = load_mapped(build_encoder(config), mapped, origin, where, FAIRSEQ_KEY_MAP, key_prefix)
    report = LoadReport("fairseq", where, config, f"{config.architecture}, {cfg_source}", ignored, notes)
    return model.eval(), report
