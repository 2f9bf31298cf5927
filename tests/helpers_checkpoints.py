"""Fixtures for the importer tests.

Tiny random ``transformers`` models are the reference. The fairseq / WavLM / torchaudio fixtures
re-lay the same weights out the way those projects store them, written from their published module
structure (fairseq ``wav2vec2.py`` / ``hubert.py``, WavLM's ``WavLM.py``, torchaudio's
``import_huggingface.py``), walking the transformers modules by attribute, independent of prune's
key tables. A bug in a key table then shows up as a parity failure against transformers.
"""

from __future__ import annotations

import argparse
import sys
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FAMILIES = ("hubert", "wav2vec2", "wavlm")
VARIANTS = [(family, stable) for family in FAMILIES for stable in (False, True)]
VARIANT_IDS = [f"{family}-{'stable' if stable else 'base'}" for family, stable in VARIANTS]
TOL = 1e-5

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, conv_dim=[16] * 7,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
WAVLM_TINY = dict(num_buckets=16, max_bucket_distance=32)
CLASS_PREFIX = {"hubert": "Hubert", "wav2vec2": "Wav2Vec2", "wavlm": "WavLM"}


# ------------------------------------------------------------------------------ transformers
def hf_config(family: str, stable: bool, **overrides: Any):
    import transformers
    kwargs = dict(TINY, feat_extract_norm="layer" if stable else "group", do_stable_layer_norm=stable,
                  conv_bias=stable, vocab_size=12)
    if family == "wavlm":
        kwargs.update(WAVLM_TINY)
    kwargs.update(overrides)
    return getattr(transformers, f"{CLASS_PREFIX[family]}Config")(**kwargs)


def make_hf(family: str, stable: bool, head: str = "Model", seed: int = 0, **overrides: Any) -> nn.Module:
    """A random ``{Hubert,Wav2Vec2,WavLM}{head}`` in eval mode. Every parameter gets noise, so that
    LayerNorm weights differ from 1, biases from 0, and no two tensors are alike: a swapped or
    skipped key changes the output."""
    import transformers
    torch.manual_seed(seed)
    model = getattr(transformers, f"{CLASS_PREFIX[family]}{head}")(hf_config(family, stable, **overrides))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def base_model(model: nn.Module, family: str) -> nn.Module:
    """The encoder inside a wrapper (``HubertForCTC().hubert``), or the model itself."""
    return getattr(model, family, model)


def waveforms(padded: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """A batch of two 1 s waveforms; padded: the second is 0.6875 s long, zero after that."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 16000, generator=gen)
    if not padded:
        return x, None
    lengths = torch.tensor([16000, 11000])
    x[1, 11000:] = 0.0
    return x, lengths


def recordings() -> List[Tensor]:
    """Three utterances of different lengths, levels and DC offsets (as recordings differ), far from
    zero mean / unit variance so that a missing or wrong normalisation shows. Levels of 1.5 or more
    keep the two conventions' eps (fairseq 1e-5, transformers 1e-7) below 3e-6 relative."""
    gen = torch.Generator().manual_seed(99)
    return [level * torch.randn(n, generator=gen) + offset
            for n, level, offset in ((16000, 2.0, 0.5), (11000, 3.0, -1.0), (7321, 1.5, 2.0))]


def pad(utterances: Sequence[Tensor], fill: float = 0.0) -> Tuple[Tensor, Tensor]:
    """-> (batch, longest) padded with ``fill``, lengths (batch,)."""
    lengths = torch.tensor([len(u) for u in utterances])
    x = torch.full((len(utterances), int(lengths.max())), fill)
    for row, u in zip(x, utterances):
        row[:len(u)] = u
    return x, lengths


def fairseq_normalized(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """The reference: fairseq's dataset (``F.layer_norm(wav, wav.shape)`` on each utterance before
    collating, as DPHuBERT's ``normalize_waveform`` too), re-padded with zeros."""
    if lengths is None:
        return torch.stack([F.layer_norm(row, row.shape) for row in x])
    out = torch.zeros_like(x)
    for row, n in enumerate(lengths.tolist()):
        out[row, :n] = F.layer_norm(x[row, :n], (n,))
    return out


def hf_hiddens(model: nn.Module, x: Tensor, lengths: Optional[Tensor]) -> List[Tensor]:
    """transformers' hidden states in prune's convention: the input to each layer, then the
    last layer's output after the final LayerNorm (``last_hidden_state``)."""
    mask = None if lengths is None else (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        out = model(x, attention_mask=mask, output_hidden_states=True)
    return list(out.hidden_states[:-1]) + [out.last_hidden_state]


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_parity(ours: nn.Module, reference: Sequence[Tensor], x: Tensor, lengths: Optional[Tensor]) -> float:
    """Every hidden state of ``ours`` within TOL relative error of ``reference``; the worst error."""
    assert not ours.training
    with torch.no_grad():
        hiddens, _ = ours(x, lengths)
    assert len(hiddens) == len(reference)
    errors = []
    for i, (a, b) in enumerate(zip(hiddens, reference)):
        assert a.shape == b.shape, f"hidden state {i}: {tuple(a.shape)} vs {tuple(b.shape)}"
        errors.append(rel_err(a, b))
        assert errors[-1] <= TOL, f"hidden state {i}: relative error {errors[-1]:.2e}"
    return max(errors)


def count_hf_encoder_params(model: nn.Module) -> int:
    """Parameters of a transformers base model that inference uses (all but the SpecAugment embedding)."""
    return sum(p.numel() for n, p in model.named_parameters() if n != "masked_spec_embed")


# ------------------------------------------------------------------------------ fairseq / WavLM
def fairseq_state_from_hf(hf: nn.Module, family: str, pretraining_extras: bool = True) -> Dict[str, Tensor]:
    """The weights of a transformers base model as fairseq's ``Wav2Vec2Model`` / ``HubertModel`` or
    WavLM.py's ``WavLM`` state dict. Published layout:

    * ``feature_extractor.conv_layers.{i}`` = Sequential(Conv1d, Dropout, norm, GELU): conv at ``.0``;
      norm at ``.2`` (Fp32GroupNorm, layer 0 only, extractor_mode "default") or ``.2.1``
      (Sequential(TransposeLast, Fp32LayerNorm, TransposeLast), every layer, "layer_norm").
    * ``layer_norm``: LayerNorm over the conv features; ``post_extract_proj``: Linear to the embedding.
    * ``encoder.pos_conv`` = Sequential(weight-normed Conv1d, SamePad, GELU): ``encoder.pos_conv.0.weight_g``,
      ``.weight_v``, ``.bias``; ``encoder.layer_norm``.
    * ``encoder.layers.{l}``: ``self_attn.{k,v,q,out}_proj``, ``self_attn_layer_norm``, ``fc1``, ``fc2``,
      ``final_layer_norm``; WavLM adds ``self_attn.grep_linear`` (Linear(head_dim, 8)), ``self_attn.grep_a``
      (1, heads, 1, 1) and, in layer 0 only, ``self_attn.relative_attention_bias`` (Embedding(buckets, heads)).
    * pretraining extras: ``mask_emb``; HuBERT ``label_embs_concat``, ``final_proj``; wav2vec 2.0
      ``quantizer.vars``, ``quantizer.weight_proj``, ``project_q``, ``final_proj``.
    """
    sd: Dict[str, Tensor] = {}
    for i, block in enumerate(hf.feature_extractor.conv_layers):
        sd[f"feature_extractor.conv_layers.{i}.0.weight"] = block.conv.weight
        if block.conv.bias is not None:
            sd[f"feature_extractor.conv_layers.{i}.0.bias"] = block.conv.bias
        norm = getattr(block, "layer_norm", None)
        if isinstance(norm, nn.GroupNorm):
            sd[f"feature_extractor.conv_layers.{i}.2.weight"] = norm.weight
            sd[f"feature_extractor.conv_layers.{i}.2.bias"] = norm.bias
        elif isinstance(norm, nn.LayerNorm):
            sd[f"feature_extractor.conv_layers.{i}.2.1.weight"] = norm.weight
            sd[f"feature_extractor.conv_layers.{i}.2.1.bias"] = norm.bias
    sd["layer_norm.weight"] = hf.feature_projection.layer_norm.weight
    sd["layer_norm.bias"] = hf.feature_projection.layer_norm.bias
    sd["post_extract_proj.weight"] = hf.feature_projection.projection.weight
    sd["post_extract_proj.bias"] = hf.feature_projection.projection.bias
    g, v = weight_norm_parts(hf.encoder.pos_conv_embed.conv)
    sd["encoder.pos_conv.0.weight_g"] = g
    sd["encoder.pos_conv.0.weight_v"] = v
    sd["encoder.pos_conv.0.bias"] = hf.encoder.pos_conv_embed.conv.bias
    sd["encoder.layer_norm.weight"] = hf.encoder.layer_norm.weight
    sd["encoder.layer_norm.bias"] = hf.encoder.layer_norm.bias
    for l, layer in enumerate(hf.encoder.layers):
        p = f"encoder.layers.{l}."
        att = layer.attention
        for name in ("k", "v", "q", "out"):
            proj = getattr(att, f"{name}_proj")
            sd[p + f"self_attn.{name}_proj.weight"] = proj.weight
            sd[p + f"self_attn.{name}_proj.bias"] = proj.bias
        sd[p + "self_attn_layer_norm.weight"] = layer.layer_norm.weight
        sd[p + "self_attn_layer_norm.bias"] = layer.layer_norm.bias
        sd[p + "fc1.weight"] = layer.feed_forward.intermediate_dense.weight
        sd[p + "fc1.bias"] = layer.feed_forward.intermediate_dense.bias
        sd[p + "fc2.weight"] = layer.feed_forward.output_dense.weight
        sd[p + "fc2.bias"] = layer.feed_forward.output_dense.bias
        sd[p + "final_layer_norm.weight"] = layer.final_layer_norm.weight
        sd[p + "final_layer_norm.bias"] = layer.final_layer_norm.bias
        if family == "wavlm":
            sd[p + "self_attn.grep_linear.weight"] = att.gru_rel_pos_linear.weight
            sd[p + "self_attn.grep_linear.bias"] = att.gru_rel_pos_linear.bias
            sd[p + "self_attn.grep_a"] = att.gru_rel_pos_const
            if l == 0:
                sd[p + "self_attn.relative_attention_bias.weight"] = att.rel_attn_embed.weight
    dim = hf.config.hidden_size
    if pretraining_extras:
        sd["mask_emb"] = torch.rand(dim)
        if family == "hubert":
            sd["label_embs_concat"] = torch.rand(7, 8)
            sd["final_proj.weight"], sd["final_proj.bias"] = torch.randn(8, dim), torch.randn(8)
        elif family == "wav2vec2":
            sd["quantizer.vars"] = torch.randn(1, 6, 8)
            sd["quantizer.weight_proj.weight"], sd["quantizer.weight_proj.bias"] = torch.randn(6, 16), torch.randn(6)
            sd["project_q.weight"], sd["project_q.bias"] = torch.randn(8, 8), torch.randn(8)
            sd["final_proj.weight"], sd["final_proj.bias"] = torch.randn(8, dim), torch.randn(8)
    return {k: t.detach().clone() for k, t in sd.items()}


def weight_norm_parts(conv: nn.Module) -> Tuple[Tensor, Tensor]:
    """(g, v) of a weight-normed conv, either spelling (torch.nn.utils.parametrizations: original0 = g,
    original1 = v; the older torch.nn.utils.weight_norm: weight_g, weight_v)."""
    if hasattr(conv, "parametrizations"):
        return conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    return conv.weight_g, conv.weight_v


def conv_feature_layers(dims: Sequence[int], kernels: Sequence[int], strides: Sequence[int]) -> str:
    """fairseq's string form, runs written with "*": "[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2"."""
    terms: List[Tuple[Tuple[int, int, int], int]] = []
    for layer in zip(dims, kernels, strides):
        if terms and terms[-1][0] == layer:
            terms[-1] = (layer, terms[-1][1] + 1)
        else:
            terms.append((layer, 1))
    return " + ".join(f"[{layer}]" + (f" * {n}" if n > 1 else "") for layer, n in terms)


def fairseq_model_cfg(hf_cfg: Any, family: str) -> Dict[str, Any]:
    """The model fields of fairseq's Wav2Vec2Config / HubertConfig (or WavLMConfig) for ``hf_cfg``."""
    stable = hf_cfg.do_stable_layer_norm
    cfg = dict(
        _name=family, extractor_mode="layer_norm" if hf_cfg.feat_extract_norm == "layer" else "default",
        conv_feature_layers=conv_feature_layers(hf_cfg.conv_dim, hf_cfg.conv_kernel, hf_cfg.conv_stride),
        conv_bias=hf_cfg.conv_bias, encoder_layers=hf_cfg.num_hidden_layers, encoder_embed_dim=hf_cfg.hidden_size,
        encoder_ffn_embed_dim=hf_cfg.intermediate_size, encoder_attention_heads=hf_cfg.num_attention_heads,
        activation_fn="gelu", layer_norm_first=stable, conv_pos=hf_cfg.num_conv_pos_embeddings,
        conv_pos_groups=hf_cfg.num_conv_pos_embedding_groups, dropout=0.1, attention_dropout=0.1,
        activation_dropout=0.0, encoder_layerdrop=0.05, dropout_input=0.1, dropout_features=0.1,
        feature_grad_mult=0.1, mask_prob=0.65, mask_length=10, final_dim=8, logit_temp=0.1,
    )
    if family == "wavlm":
        del cfg["_name"]  # WavLM's cfg is WavLMConfig.__dict__: no hydra _name
        cfg.update(relative_position_embedding=True, num_buckets=hf_cfg.num_buckets,
                   max_distance=hf_cfg.max_bucket_distance, gru_rel_pos=True, normalize=stable)
    return cfg


class Dictionary:
    """Pickled under fairseq's name (``fairseq.data.dictionary.Dictionary``) like HuBERT's label
    dictionaries in ``task_state``; fairseq itself is not installed."""

    __module__ = "fairseq.data.dictionary"

    def __init__(self, symbols: Sequence[str]):
        self.symbols = list(symbols)
        self.indices = {s: i for i, s in enumerate(symbols)}


class CustomConfig:
    """A class only full unpickling can rebuild (for the trust_pickle tests)."""

    def __init__(self, **fields: Any):
        self.__dict__.update(fields)


def _register_fake_fairseq() -> None:
    for name in ("fairseq", "fairseq.data", "fairseq.data.dictionary"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["fairseq.data.dictionary"].Dictionary = Dictionary


def _unregister_fake_fairseq() -> None:
    for name in ("fairseq.data.dictionary", "fairseq.data", "fairseq"):
        if isinstance(sys.modules.get(name), types.ModuleType) and not hasattr(sys.modules[name], "__file__"):
            del sys.modules[name]


def save_fairseq(path, model_cfg: Dict[str, Any], state: Dict[str, Tensor], style: str,
                 normalize: bool = False) -> None:
    """Write a fairseq-style checkpoint.

    style: "hydra" (``{"cfg": {"model": ...}, "model": ...}`` with plain dicts, as newer fairseq
    saves), "omegaconf" (the same cfg as an omegaconf DictConfig, plus HuBERT-style task_state
    label dictionaries and numpy training statistics, as older fairseq saves), "args" (an
    ``argparse.Namespace``, oldest fairseq), "wavlm" (the official WavLM release: a flat cfg dict).
    normalize: the task's ``normalize`` (hydra: ``cfg.task.normalize``; argparse: ``args.normalize``,
    task arguments sit beside the model's there; WavLM keeps it in its model cfg, see fairseq_model_cfg).
    """
    import numpy as np
    cfg = {k: v for k, v in model_cfg.items()}
    if style == "wavlm":
        torch.save({"cfg": cfg, "model": state}, path)
        return
    if style == "args":
        arch = cfg.pop("_name", "wav2vec2")
        torch.save({"args": argparse.Namespace(arch=arch, task="audio_pretraining", normalize=normalize, **cfg),
                    "model": state,
                    "optimizer_history": [{"criterion_name": "Wav2vecCriterion", "num_updates": 400000}]}, path)
        return
    full = {"_name": None, "common": {"fp16": True, "seed": 1},
            "task": {"_name": f"{cfg.get('_name', 'audio')}_pretraining", "labels": ["km"], "normalize": normalize},
            "model": cfg}
    ckpt: Dict[str, Any] = {"args": None, "cfg": full, "model": state,
                            "optimizer_history": [{"criterion_name": "hubert", "num_updates": 400000}]}
    if style == "omegaconf":
        from omegaconf import OmegaConf
        ckpt["cfg"] = OmegaConf.create(full)
        ckpt["extra_state"] = {"metrics": {"train": [("loss", np.float64(2.5), np.arange(3))]}}
        _register_fake_fairseq()
        try:
            ckpt["task_state"] = {"dictionaries": [Dictionary(["0", "1", "2"])]}
            torch.save(ckpt, path)
        finally:
            _unregister_fake_fairseq()
        return
    assert style == "hydra", style
    torch.save(ckpt, path)


# ------------------------------------------------------------------------------ torchaudio
def torchaudio_state_from_hf(hf: nn.Module, family: str) -> Dict[str, Tensor]:
    """The weights of a transformers base model as torchaudio's ``Wav2Vec2Model`` state dict, by
    torchaudio's ``import_huggingface_model``: the feature extractor as is, ``feature_projection`` ->
    ``encoder.feature_projection``, ``encoder`` -> ``encoder.transformer``; WavLM's q/k/v projections
    concatenated (q, k, v) into ``attention.attention.in_proj_{weight,bias}`` and out_proj moved to
    ``attention.attention.out_proj`` (torch.nn.MultiheadAttention). The positional conv's weight norm
    in torchaudio's spelling (torch.nn.utils.weight_norm: ``weight_g``, ``weight_v``)."""
    sd: Dict[str, Tensor] = {}
    for k, t in hf.feature_extractor.state_dict().items():
        sd["feature_extractor." + k] = t
    for k, t in hf.feature_projection.state_dict().items():
        sd["encoder.feature_projection." + k] = t
    encoder = dict(hf.encoder.state_dict())
    g, v = weight_norm_parts(hf.encoder.pos_conv_embed.conv)
    for k in [k for k in encoder if k.startswith("pos_conv_embed.conv.") and not k.endswith(".bias")]:
        del encoder[k]
    encoder["pos_conv_embed.conv.weight_g"], encoder["pos_conv_embed.conv.weight_v"] = g, v
    if family == "wavlm":
        for i in range(len(hf.encoder.layers)):
            a = f"layers.{i}.attention."
            for kind in ("weight", "bias"):
                q, k_, v_ = (encoder.pop(f"{a}{n}_proj.{kind}") for n in ("q", "k", "v"))
                encoder[f"{a}attention.in_proj_{kind}"] = torch.cat((q, k_, v_))
                encoder[f"{a}attention.out_proj.{kind}"] = encoder.pop(f"{a}out_proj.{kind}")
    for k, t in encoder.items():
        sd["encoder.transformer." + k] = t
    return {k: t.detach().clone() for k, t in sd.items()}


def torchaudio_params(hf_cfg: Any, family: str) -> Dict[str, Any]:
    """``wav2vec2_model`` / ``wavlm_model`` arguments for ``hf_cfg``, as torchaudio's ``_get_config``."""
    params = dict(
        extractor_mode=f"{hf_cfg.feat_extract_norm}_norm",
        extractor_conv_layer_config=list(zip(hf_cfg.conv_dim, hf_cfg.conv_kernel, hf_cfg.conv_stride)),
        extractor_conv_bias=hf_cfg.conv_bias, encoder_embed_dim=hf_cfg.hidden_size,
        encoder_projection_dropout=hf_cfg.feat_proj_dropout, encoder_pos_conv_kernel=hf_cfg.num_conv_pos_embeddings,
        encoder_pos_conv_groups=hf_cfg.num_conv_pos_embedding_groups, encoder_num_layers=hf_cfg.num_hidden_layers,
        encoder_num_heads=hf_cfg.num_attention_heads, encoder_attention_dropout=hf_cfg.attention_dropout,
        encoder_ff_interm_features=hf_cfg.intermediate_size, encoder_ff_interm_dropout=hf_cfg.activation_dropout,
        encoder_dropout=hf_cfg.hidden_dropout, encoder_layer_norm_first=hf_cfg.do_stable_layer_norm,
        encoder_layer_drop=hf_cfg.layerdrop, aux_num_out=None,
    )
    if family == "wavlm":
        params.update(encoder_num_buckets=hf_cfg.num_buckets, encoder_max_distance=hf_cfg.max_bucket_distance)
    return params
