"""The encoder's configuration, in torchaudio's ``wav2vec2_model`` vocabulary.

Pruning makes layers differ, so every per-layer quantity is stored as a list
(an int given for it is expanded). The few keys torchaudio lacks describe what a
compiled (pruned) model needs to stay exact:

* ``extractor_norm_channels``: per conv layer, how many channels a LayerNorm over
  that layer's output normalises over. A pruned layer keeps the original count: the
  removed channels were exact zeros and still count in the mean and variance.
* ``encoder_attention_kept`` / ``encoder_ff_kept``: whether layer ``i`` still has an
  attention / feed-forward block at all (a removed block is a plain residual path).
* ``encoder_layer_kept``: whether layer ``i`` is still a layer at all; False: an identity (no
  block and, post-norm, no LayerNorm either: a layer removed whole by ``pruning.uniform``). It
  keeps its place, so hidden state ``i + 1`` is still layer ``i``'s output (its input). None: all kept.
* ``extractor_output_scale``: the conv extractor's output is scaled per channel by a fixed
  vector (``feature_extractor.output_scale``), DPHuBERT's ``dummy_weight``.
* ``encoder_head_index``: WavLM only. The original index of each kept head; the
  relative-position bias and its gate are indexed by it.
* ``encoder_hidden_total`` / ``encoder_hidden_index``: after a cut of the hidden dimension, how
  many channels the LayerNorms over it average over (the unpruned width: the removed channels were
  exact zeros and still count), and the original index of each kept channel (WavLM's gate reads
  the attention input in chunks of the original heads). None: not cut.
* ``encoder_head_qk_dims`` / ``encoder_head_v_dims``: per layer, how many query/key dimensions and
  value dimensions each head keeps (one count shared by the layer's heads; None: ``encoder_head_dim``
  everywhere). ``encoder_head_dim`` stays the original head width: the softmax scale is
  ``1 / sqrt(encoder_head_dim)`` whatever the kept qk dims, and WavLM's gate reads its input in
  chunks of it.
* ``encoder_pos_conv_group_sizes``: after a cut of the hidden dimension, the kept channels of each
  group of the positional conv; the conv is then one plain conv per group (None: the weight-normed
  grouped conv).

``normalize_waveform`` (torchaudio / DPHuBERT's name) is fairseq's ``task.normalize`` and
transformers' feature-extractor ``do_normalize``: each utterance is scaled to zero mean and unit
variance over its valid samples before the conv extractor (wav2vec 2.0 Large LV-60k, HuBERT Large
and WavLM Large were pre-trained so; the base models were not). The variance gets fairseq's eps,
1e-5, as in training; transformers' feature extractor adds 1e-7 instead, which scales a waveform at
speech level (RMS 0.05) differently by about 2e-3 relative (``components.normalize_waveforms``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

ARCHITECTURES = ("hubert", "wav2vec2", "wavlm")
EXTRACTOR_MODES = ("group_norm", "layer_norm")
SAMPLE_RATE = 16000

ConvSpec = Tuple[int, int, int]  # (out_channels, kernel_size, stride)

BASE_CONV: List[ConvSpec] = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


@dataclass
class EncoderConfig:
    """An encoder's architecture. Each field with its name in a transformers ``config.json`` and in
    a fairseq checkpoint's model config (the importers, prune/checkpoints/hf.py and fairseq.py, map
    them), as torchaudio's ``wav2vec2_model`` documents its arguments; ``-``: no such setting there.
    Per-layer fields are lists once pruned (DPHuBERT's names for its pruned models in the meaning).

    field                        transformers                        fairseq                  meaning
    architecture                 model_type                          _name                    hubert | wav2vec2 | wavlm
    extractor_mode               feat_extract_norm                   extractor_mode           group_norm (in conv 0) | layer_norm
    extractor_conv_layer_config  conv_dim, conv_kernel, conv_stride  conv_feature_layers      (channels, kernel, stride) per conv
    extractor_conv_bias          conv_bias                           conv_bias                the convs have biases
    encoder_embed_dim            hidden_size                         encoder_embed_dim        the transformer's width
    encoder_projection_dropout   feat_proj_dropout                   dropout_input            after the feature projection
    encoder_pos_conv_kernel      num_conv_pos_embeddings             conv_pos                 the positional conv's kernel
    encoder_pos_conv_groups      num_conv_pos_embedding_groups       conv_pos_groups          ... and its groups
    encoder_num_layers           num_hidden_layers                   encoder_layers           transformer layers
    encoder_num_heads            num_attention_heads                 encoder_attention_heads  heads (per layer)
    encoder_attention_dropout    attention_dropout                   attention_dropout        on the attention weights
    encoder_ff_interm_features   intermediate_size                   encoder_ffn_embed_dim    FFN units (per layer)
    encoder_ff_interm_dropout    activation_dropout                  activation_dropout       after the FFN's activation
    encoder_dropout              hidden_dropout                      dropout                  on each block's output
    encoder_layer_norm_first     do_stable_layer_norm                layer_norm_first         pre-norm (the Large models)
    encoder_layer_drop           layerdrop                           encoder_layerdrop        LayerDrop in training
    encoder_num_buckets          num_buckets                         num_buckets              WavLM: relative-position buckets
    encoder_max_distance         max_bucket_distance                 max_distance             WavLM: the farthest bucketed
    encoder_head_dim             -                                   -                        a head's original width (null: embed/heads)
    extractor_norm_channels      -                                   -                        channels a conv LayerNorm averages
    encoder_attention_kept       -                                   -                        encoder_use_attention (per layer)
    encoder_ff_kept              -                                   -                        encoder_use_feed_forward (per layer)
    encoder_layer_kept           -                                   -                        false: layer is an identity (per layer)
    encoder_head_index           -                                   -                        encoder_remaining_heads (WavLM)
    extractor_output_scale       -                                   -                        feature_extractor.dummy_weight
    encoder_hidden_total         -                                   -                        channels a LayerNorm over D averages
    encoder_hidden_index         -                                   -                        original ids of the kept channels of D
    encoder_pos_conv_group_sizes  -                                  -                        kept channels per pos-conv group
    encoder_head_qk_dims         -                                   -                        prune only: kept q/k dims per head (per layer)
    encoder_head_v_dims          -                                   -                        prune only: kept v dims per head (per layer)
    layer_norm_eps               layer_norm_eps                      -                        the transformer's (fairseq: 1e-5)
    normalize_waveform           do_normalize                        normalize                per utterance: zero mean, unit variance
    """

    architecture: str = "hubert"
    extractor_mode: str = "group_norm"
    extractor_conv_layer_config: List[ConvSpec] = field(default_factory=lambda: list(BASE_CONV))
    extractor_conv_bias: bool = False
    encoder_embed_dim: int = 768
    encoder_projection_dropout: float = 0.1
    encoder_pos_conv_kernel: int = 128
    encoder_pos_conv_groups: int = 16
    encoder_num_layers: int = 12
    encoder_num_heads: Union[int, List[int]] = 12
    encoder_attention_dropout: float = 0.1
    encoder_ff_interm_features: Union[int, List[int]] = 3072
    encoder_ff_interm_dropout: float = 0.0
    encoder_dropout: float = 0.1
    encoder_layer_norm_first: bool = False
    encoder_layer_drop: float = 0.05
    # WavLM's gated relative position bias
    encoder_num_buckets: int = 320
    encoder_max_distance: int = 800
    # pruning-specific (see module docstring); None means "as in the unpruned model"
    encoder_head_dim: Optional[int] = None
    extractor_norm_channels: Optional[List[int]] = None
    encoder_attention_kept: Optional[List[bool]] = None
    encoder_ff_kept: Optional[List[bool]] = None
    encoder_layer_kept: Optional[List[bool]] = None
    encoder_head_index: Optional[List[List[int]]] = None
    extractor_output_scale: bool = False
    encoder_hidden_total: Optional[int] = None
    encoder_hidden_index: Optional[List[int]] = None
    encoder_pos_conv_group_sizes: Optional[List[int]] = None
    encoder_head_qk_dims: Optional[List[int]] = None
    encoder_head_v_dims: Optional[List[int]] = None
    layer_norm_eps: float = 1e-5
    normalize_waveform: bool = False

    def __post_init__(self) -> None:
        n = self.encoder_num_layers
        if not isinstance(self.normalize_waveform, bool):
            raise ValueError(f"normalize_waveform must be true or false, got {self.normalize_waveform!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.extractor_mode not in EXTRACTOR_MODES:
            raise ValueError(f"extractor_mode must be one of {EXTRACTOR_MODES}, got {self.extractor_mode!r}")
        self.extractor_conv_layer_config = [tuple(int(v) for v in c) for c in self.extractor_conv_layer_config]
        heads = _per_layer(self.encoder_num_heads, n, "encoder_num_heads")
        if self.encoder_head_dim is None:
            if not isinstance(self.encoder_num_heads, int) or self.encoder_embed_dim % self.encoder_num_heads:
                raise ValueError("encoder_head_dim is required when heads differ per layer "
                                 "or do not divide encoder_embed_dim")
            self.encoder_head_dim = self.encoder_embed_dim // self.encoder_num_heads
        self.encoder_num_heads = heads
        self.encoder_ff_interm_features = _per_layer(self.encoder_ff_interm_features, n, "encoder_ff_interm_features")
        convs = self.extractor_conv_layer_config
        if self.extractor_norm_channels is None:
            self.extractor_norm_channels = [c[0] for c in convs]
        if len(self.extractor_norm_channels) != len(convs):
            raise ValueError("extractor_norm_channels needs one entry per conv layer")
        for (out, _, _), total in zip(convs, self.extractor_norm_channels):
            if total < out:
                raise ValueError(f"extractor_norm_channels ({total}) is smaller than the layer's channels ({out})")
        self.encoder_attention_kept = [bool(v) for v in (self.encoder_attention_kept or [True] * n)]
        self.encoder_ff_kept = [bool(v) for v in (self.encoder_ff_kept or [True] * n)]
        for name in ("encoder_attention_kept", "encoder_ff_kept"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs {n} entries (encoder_num_layers)")
        if self.encoder_layer_kept is not None:
            self.encoder_layer_kept = [bool(v) for v in self.encoder_layer_kept]
            if len(self.encoder_layer_kept) != n:
                raise ValueError(f"encoder_layer_kept needs {n} entries (encoder_num_layers)")
            for i, kept in enumerate(self.encoder_layer_kept):
                if not kept and (self.encoder_attention_kept[i] or self.encoder_ff_kept[i]):
                    raise ValueError(f"encoder_layer_kept[{i}] is false (an identity layer) but layer {i} keeps a "
                                     f"block; set its encoder_attention_kept and encoder_ff_kept to false")
        self._check_hidden_cut()
        for name in ("encoder_head_qk_dims", "encoder_head_v_dims"):
            dims = getattr(self, name)
            if dims is not None:
                dims = [int(v) for v in _per_layer(dims, n, name)]
                if any(not 0 <= d <= self.encoder_head_dim for d in dims):
                    raise ValueError(f"{name} must hold per-layer counts from 0 to encoder_head_dim "
                                     f"({self.encoder_head_dim}), got {dims}")
                setattr(self, name, dims)
        if self.architecture == "wavlm":
            if self.encoder_head_index is None:
                self.encoder_head_index = [list(range(h)) for h in heads]
            self.encoder_head_index = [[int(i) for i in idx] for idx in self.encoder_head_index]
            if [len(i) for i in self.encoder_head_index] != heads:
                raise ValueError("encoder_head_index must list one original index per kept head")
            if self.hidden_total % self.encoder_head_dim:
                raise ValueError("WavLM needs encoder_head_dim to divide the unpruned encoder_embed_dim "
                                 "(encoder_hidden_total)")
        elif self.encoder_head_index is not None:
            raise ValueError("encoder_head_index is only used by WavLM")

    def _check_hidden_cut(self) -> None:
        D, total = self.encoder_embed_dim, self.hidden_total
        if total < D:
            raise ValueError(f"encoder_hidden_total ({total}) is smaller than encoder_embed_dim ({D})")
        if self.encoder_hidden_index is not None:
            index = self.encoder_hidden_index = [int(i) for i in self.encoder_hidden_index]
            if len(index) != D or any(not 0 <= i < total for i in index) or sorted(set(index)) != index:
                raise ValueError(f"encoder_hidden_index must list {D} increasing channel ids below "
                                 f"encoder_hidden_total ({total}), one per kept channel")
        sizes = self.encoder_pos_conv_group_sizes
        if sizes is not None:
            self.encoder_pos_conv_group_sizes = sizes = [int(n) for n in sizes]
            if len(sizes) != self.encoder_pos_conv_groups or sum(sizes) != D or min(sizes) < 0:
                raise ValueError(f"encoder_pos_conv_group_sizes needs {self.encoder_pos_conv_groups} counts "
                                 f"(encoder_pos_conv_groups) summing to encoder_embed_dim ({D})")

    @property
    def is_wavlm(self) -> bool:
        return self.architecture == "wavlm"

    @property
    def layer_kept(self) -> List[bool]:
        """Per layer, whether it is a layer (False: an identity, ``encoder_layer_kept``)."""
        return [True] * self.encoder_num_layers if self.encoder_layer_kept is None else self.encoder_layer_kept

    @property
    def hidden_total(self) -> int:
        """The unpruned hidden width: what the LayerNorms over the hidden dimension average over."""
        return self.encoder_embed_dim if self.encoder_hidden_total is None else self.encoder_hidden_total

    @property
    def hidden_index(self) -> List[int]:
        """The original id of each kept channel of the hidden dimension."""
        return list(range(self.encoder_embed_dim)) if self.encoder_hidden_index is None else self.encoder_hidden_index

    @property
    def qk_dims(self) -> List[int]:
        """Per layer, the query/key dimensions each head keeps."""
        return self.encoder_head_qk_dims or [self.encoder_head_dim] * self.encoder_num_layers

    @property
    def v_dims(self) -> List[int]:
        """Per layer, the value dimensions each head keeps."""
        return self.encoder_head_v_dims or [self.encoder_head_dim] * self.encoder_num_layers

    @property
    def original_num_heads(self) -> int:
        """Heads of the unpruned model: WavLM's bias table and gate chunks use this count."""
        return self.hidden_total // self.encoder_head_dim

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extractor_conv_layer_config"] = [list(c) for c in self.extractor_conv_layer_config]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "EncoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown encoder config keys: {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> "EncoderConfig":
        d = self.to_dict()
        d.update(changes)
        return EncoderConfig.from_dict(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def conv_geometry(config: EncoderConfig) -> Tuple[int, int]:
    """(receptive field, hop) of the conv extractor in samples: frames = (samples - field) // hop + 1."""
    field, hop = 1, 1
    for _, kernel, stride in config.extractor_conv_layer_config:
        field += (kernel - 1) * hop
        hop *= stride
    return field, hop


def frame_rate(config: EncoderConfig) -> float:
    """Frames per second of the hidden states: 16 kHz over the conv strides' product (50 Hz)."""
    return SAMPLE_RATE / conv_geometry(config)[1]


def hidden_state_indices(layers: Optional[Sequence[int]], num_layers: int, flag: str,
                         model: str = "the model") -> List[int]:
    """The hidden states asked for by ``flag`` (e.g. ``--layers``), sorted and unique; None: all of
    them, 0 (the input to the first layer) to ``num_layers``. Raises ValueError naming the flag."""
    if layers is None:
        return list(range(num_layers + 1))
    chosen = sorted(set(int(k) for k in layers))
    if not chosen:
        raise ValueError(f"{flag}: give at least one layer")
    bad = [k for k in chosen if not 0 <= k <= num_layers]
    if bad:
        raise ValueError(f"{flag} {' '.join(map(str, bad))}: {model} has {num_layers} transformer layers; "
                         f"choose from 0 (the input to the first layer) to {num_layers}")
    return chosen


def _per_layer(value: Union[int, Sequence[int]], n: int, name: str) -> List[int]:
    if isinstance(value, int):
        return [value] * n
    value = [int(v) for v in value]
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries, expected {n} (encoder_num_layers)")
    return value
