"""Building blocks of a HuBERT / wav2vec 2.0 / WavLM encoder.

Parameter names follow torchaudio's ``wav2vec2`` components, so its state dicts map
one to one. Every block takes optional gate values (HardConcrete masks, shaped as in
``prune.models.gating``) in ``forward``; given none it is the plain model. The gates multiply at places where a compiled model
can fold them into the weights exactly:

* conv channels: after the normalisation, before GELU (GELU(0) == 0, so a closed
  channel is an exact zero); in ``layer_norm`` mode also before the LayerNorm so a closed
  channel is an exact zero inside the LayerNorm's statistics.
* heads: on each head's output, before ``out_proj``.
* dims inside the heads (one gate vector per layer, shared by its heads): the query/key gate on
  each head's query dims (so it folds into ``q_proj``'s rows; the key is not gated), the value gate
  on each head's value dims (folds into ``v_proj``'s rows).
* FFN units: on the intermediate activation, before ``output_dense``.
* whole attention / FFN blocks: on the block's output.
* the hidden dimension (one gate over the residual stream's channels): on every write into the
  residual stream (the feature projection's output, each block's output; the positional conv's
  output by the gate's 0/1 pattern, since a GELU precedes it) and on every LayerNorm's output over
  it, so a closed channel is an exact zero wherever it is read (docs/design.md).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gating import ExtractorGates, Gates, LayerGates


def _rows(weight: Tensor, index: Optional[Tensor], dim: int = 0) -> Tensor:
    """``weight`` restricted to ``index`` along ``dim`` (all of it for None). ``index_select``
    keeps autograd's gradient full-size, with zeros for the rows left out."""
    return weight if index is None else weight.index_select(dim, index)


def phantom_normalize(x: Tensor, total: int, eps: float) -> Tuple[Tensor, Tensor]:
    """LayerNorm statistics over x's last dim plus ``total - x.shape[-1]`` implicit zeros.
    x: (..., n) -> (x_hat (..., n), shift (..., 1)); shift = -mean / std is each zero's
    normalised value."""
    mean = x.sum(-1, keepdim=True) / total
    centered = x - mean
    var = (centered.square().sum(-1, keepdim=True) + (total - x.shape[-1]) * mean.square()) / total
    rstd = torch.rsqrt(var + eps)
    return centered * rstd, -mean * rstd


def phantom_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, total: int, eps: float) -> Tensor:
    """x: (..., n) -> LayerNorm as if ``total - n`` zeros were present, affine on the n values."""
    if x.shape[-1] == total:
        return F.layer_norm(x, (total,), weight, bias, eps)
    x_hat, _ = phantom_normalize(x, total, eps)
    return x_hat * weight + bias


class PhantomLayerNorm(nn.Module):
    """LayerNorm over ``num_features`` values plus ``total - num_features`` implicit zeros.

    A pruned model uses it where the unpruned LayerNorm saw channels that the gates had
    set to exactly zero: the zeros still count in the mean and variance. With
    ``total == num_features`` it is ``nn.LayerNorm``.
    """

    def __init__(self, num_features: int, total_features: Optional[int] = None, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.total_features = total_features or num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    @property
    def num_phantoms(self) -> int:
        return self.total_features - self.num_features

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., num_features) -> same shape."""
        return phantom_layer_norm(x, self.weight, self.bias, self.total_features, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, total_features={self.total_features}, eps={self.eps}"


WAVEFORM_NORM_EPS = 1e-5  # fairseq's F.layer_norm (and DPHuBERT's); transformers' feature extractor adds 1e-7


def normalize_waveforms(waveforms: Tensor, lengths: Optional[Tensor] = None, eps: float = WAVEFORM_NORM_EPS
                        ) -> Tensor:
    """Each row to zero mean and unit variance over its valid samples, as fairseq's
    ``task.normalize`` (``F.layer_norm`` over the utterance) does before batching.

    waveforms: (batch, samples); lengths: (batch,) valid samples (None: all) -> (batch, samples),
    padded samples zero whatever they held. Statistics in float32 at least (16k-sample sums in half
    precision lose the mean). No data-dependent branch: the same graph for any lengths (torch.export).
    """
    dtype = torch.promote_types(waveforms.dtype, torch.float32)
    x = waveforms.to(dtype)
    if lengths is None:
        return F.layer_norm(x, x.shape[-1:], eps=eps).to(waveforms.dtype)
    padding = torch.arange(x.shape[-1], device=x.device)[None, :] >= lengths[:, None]  # (batch, samples)
    count = lengths.clamp(min=1).to(dtype)[:, None]  # an empty row stays all zeros
    x = x.masked_fill(padding, 0.0)
    centered = (x - x.sum(-1, keepdim=True) / count).masked_fill(padding, 0.0)
    var = centered.square().sum(-1, keepdim=True) / count  # biased, as layer_norm's
    return (centered * torch.rsqrt(var + eps)).to(waveforms.dtype)


def check_waveforms(x: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"expected waveforms of shape (batch, samples), got {tuple(x.shape)}")


class ConvLayerBlock(nn.Module):
    """Conv1d -> [GroupNorm | LayerNorm over channels] -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, bias: bool,
                 norm: Optional[nn.Module]):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        self.layer_norm = norm

    def forward(self, x: Tensor, length: Optional[Tensor], gate: Optional[Tensor] = None,
                active_in: Optional[Tensor] = None, active: Optional[Tensor] = None
                ) -> Tuple[Tensor, Optional[Tensor]]:
        """x: (batch, in_channels, time), length: (batch,), gate: (out_channels,)
        -> (batch, out_channels, time'), (batch,).

        active_in: the input channels x holds (None: all); active: the output channels to
        compute (None: all), the only ones returned."""
        weight = _rows(_rows(self.conv.weight, active), active_in, dim=1)
        bias = None if self.conv.bias is None else _rows(self.conv.bias, active)
        if weight.numel() > 0:
            x = F.conv1d(x, weight, bias, stride=self.stride)
        else:  # every input or output channel pruned: what is left is the bias (conv1d rejects empty weights)
            frames = (x.shape[-1] - self.kernel_size) // self.stride + 1
            x = x.new_zeros(x.shape[0], weight.shape[0], frames)
            if bias is not None:
                x = x + bias[:, None]
        gate = None if gate is None else _rows(gate, active)
        norm = self.layer_norm
        if isinstance(norm, PhantomLayerNorm):
            if gate is not None:
                x = x * gate[:, None]  # closed channels are exact zeros in the statistics
            x = phantom_layer_norm(x.transpose(-2, -1), _rows(norm.weight, active), _rows(norm.bias, active),
                                   norm.total_features, norm.eps).transpose(-2, -1)
        elif norm is not None and x.shape[1] > 0:  # GroupNorm with one group per channel
            x = F.group_norm(x, x.shape[1], _rows(norm.weight, active), _rows(norm.bias, active), norm.eps)
        if gate is not None:
            x = x * gate[:, None]
        x = F.gelu(x)
        if length is not None:
            length = torch.div(length - self.kernel_size, self.stride, rounding_mode="floor") + 1
            length = torch.clamp(length, min=0)
        return x, length


class FeatureExtractor(nn.Module):
    """Waveform -> frame features through a stack of ``ConvLayerBlock``.

    ``output_scale``: a fixed per-channel factor on the last layer's output (after its GELU),
    as DPHuBERT's ``dummy_weight`` holds the soft gate values of its last conv layer's kept
    channels. It sits before the feature projection's LayerNorm, so no weight can absorb it.
    """

    def __init__(self, conv_layers: nn.ModuleList, output_scale: bool = False):
        super().__init__()
        self.conv_layers = conv_layers
        self.output_scale: Optional[Tensor]
        if output_scale:
            self.register_buffer("output_scale", torch.ones(conv_layers[-1].conv.out_channels))
        else:
            self.output_scale = None

    def forward(self, x: Tensor, length: Optional[Tensor], gates: Optional[ExtractorGates] = None
                ) -> Tuple[Tensor, Optional[Tensor]]:
        """x: (batch, samples), length: (batch,) -> (batch, frames, channels), (batch,).
        With ``gates.active``, only the open channels of each layer are computed and returned."""
        check_waveforms(x)
        x = x.unsqueeze(1)
        active_in = None
        for i, layer in enumerate(self.conv_layers):
            active_out = None if gates is None else gates.active_of(i)
            x, length = layer(x, length, None if gates is None else gates.channels[i], active_in, active_out)
            active_in = active_out
        x = x.transpose(1, 2)
        if self.output_scale is not None:
            x = x * _rows(self.output_scale, active_in)
        return x, length


class FeatureProjection(nn.Module):
    """LayerNorm over the conv channels -> Linear to the embedding -> Dropout.

    In a pruned model the LayerNorm keeps counting the removed (zero) channels, and their
    normalised value, ``shift = -mean / std`` per frame, still reached the projection
    through its removed columns: ``phantom`` (out_features,) carries that sum.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float,
                 norm_features: Optional[int] = None, eps: float = 1e-5):
        super().__init__()
        self.layer_norm = PhantomLayerNorm(in_features, norm_features, eps)
        self.projection = nn.Linear(in_features, out_features)
        self.phantom = nn.Parameter(torch.zeros(out_features)) if self.layer_norm.num_phantoms else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, active: Optional[Tensor] = None, closed: Optional[Tensor] = None) -> Tensor:
        """x: (batch, frames, in_features) -> (batch, frames, out_features).

        With ``active`` / ``closed`` (sparsity-aware training), x holds only the open channels;
        the closed ones are zeros the LayerNorm still counts, and their normalised values reach
        the projection as ``shift * w + b`` through their columns, as in the full computation."""
        norm, proj = self.layer_norm, self.projection
        if active is None and self.phantom is None:
            return self.dropout(proj(norm(x)))
        x_hat, shift = phantom_normalize(x, norm.total_features, norm.eps)
        y = x_hat * _rows(norm.weight, active) + _rows(norm.bias, active)
        out = F.linear(y, _rows(proj.weight, active, dim=1), proj.bias)
        if closed is not None and closed.numel() > 0:
            w_closed = proj.weight.index_select(1, closed)
            out = out + shift * (w_closed @ norm.weight.index_select(0, closed)) \
                + w_closed @ norm.bias.index_select(0, closed)
        if self.phantom is not None:
            out = out + shift * self.phantom
        return self.dropout(out)


class WeightNormConv1d(nn.Module):
    """Conv1d whose weight is ``weight_g * weight_v / ||weight_v||`` (norm over all dims but 2),
    stored as torchaudio / fairseq store it (``weight_g``, ``weight_v``)."""

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.groups = groups
        self.padding = kernel_size // 2
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight_v, mean=0.0, std=math.sqrt(4.0 / (kernel_size * channels)))
        with torch.no_grad():
            self.weight_g.copy_(torch.linalg.vector_norm(self.weight_v, dim=(0, 1), keepdim=True))

    def weight(self) -> Tensor:
        """The normalised weight. Without autograd (inference) it is computed once and reused
        until ``weight_g`` or ``weight_v`` change: a few percent of a pruned model's forward."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return torch._weight_norm(self.weight_v, self.weight_g, 2)
        key = (self.weight_v._version, self.weight_g._version, self.weight_v.data_ptr(), self.weight_g.data_ptr())
        if getattr(self, "_cache_key", None) != key:
            self._cache_weight = torch._weight_norm(self.weight_v, self.weight_g, 2)
            self._cache_key = key
        return self._cache_weight

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, channels, frames) -> (batch, channels, frames + 1 - kernel_size % 2)"""
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class GroupwiseConv1d(nn.Module):
    """A grouped conv whose groups have different widths: one plain conv per group, group g mapping
    its ``sizes[g]`` channels to themselves (``weights.g``: (n_g, n_g, kernel)). What a cut of the
    hidden dimension leaves of the positional conv, the weight norm materialised."""

    def __init__(self, sizes: List[int], kernel_size: int):
        super().__init__()
        self.sizes = list(sizes)
        self.padding = kernel_size // 2
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(n, n, kernel_size)) for n in self.sizes])
        self.bias = nn.Parameter(torch.zeros(sum(self.sizes)))
        for w in self.weights:
            if w.numel():
                nn.init.normal_(w, std=math.sqrt(4.0 / (kernel_size * max(sum(self.sizes), 1))))

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, channels, frames) -> (batch, channels, frames + 1 - kernel_size % 2)"""
        outs, start = [], 0
        for n, w in zip(self.sizes, self.weights):
            if n:  # an empty group has no channel (conv1d rejects empty weights)
                outs.append(F.conv1d(x[:, start:start + n], w, self.bias[start:start + n], padding=self.padding))
            start += n
        return torch.cat(outs, dim=1)


class ConvolutionalPositionalEmbedding(nn.Module):
    """Grouped conv over time with weight normalisation, "same" padding, GELU. With ``group_sizes``
    (a cut hidden dimension) the groups differ in width: a ``GroupwiseConv1d``."""

    def __init__(self, embed_dim: int, kernel_size: int, groups: int, group_sizes: Optional[List[int]] = None):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = WeightNormConv1d(embed_dim, kernel_size, groups) if group_sizes is None \
            else GroupwiseConv1d(group_sizes, kernel_size)
        self.num_remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, frames, embed_dim) -> same shape."""
        x = self.conv(x.transpose(-2, -1))
        if self.num_remove > 0:
            x = x[..., : -self.num_remove]
        return F.gelu(x).transpose(-2, -1)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    ``num_heads`` may be 0 (all heads pruned): only ``out_proj``'s bias is left and the
    output is that constant.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float = 0.0,
                 qk_dim: Optional[int] = None, v_dim: Optional[int] = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim  # the original width: the softmax scale is 1 / sqrt(head_dim)
        # the kept query/key and value dims of each head (the same in every head of the layer, so
        # one batched attention call still serves all heads; SDPA allows d_v != d_qk)
        self.qk_dim = head_dim if qk_dim is None else qk_dim
        self.v_dim = head_dim if v_dim is None else v_dim
        self.dropout = dropout
        if num_heads > 0:
            self.k_proj = nn.Linear(embed_dim, num_heads * self.qk_dim)
            self.v_proj = nn.Linear(embed_dim, num_heads * self.v_dim)
            self.q_proj = nn.Linear(embed_dim, num_heads * self.qk_dim)
            self.out_proj = nn.Linear(num_heads * self.v_dim, embed_dim)
        else:
            self.out_proj = _BiasOnly(embed_dim)

    def _scores_bias(self, x: Tensor, position_bias: Optional[Tensor], active: Optional[Tensor],
                     hidden_active: Optional[Tensor] = None) -> Optional[Tensor]:
        return None

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None,
                position_bias: Optional[Tensor] = None, head_gate: Optional[Tensor] = None,
                active: Optional[Tensor] = None, qk_gate: Optional[Tensor] = None, v_gate: Optional[Tensor] = None,
                qk_active: Optional[Tensor] = None, v_active: Optional[Tensor] = None,
                hidden_active: Optional[Tensor] = None) -> Tensor:
        """x: (batch, frames, embed_dim); key_padding_mask: (batch, frames), True = padding;
        position_bias: (heads_orig, frames, frames) (WavLM); head_gate: (num_heads,);
        active: the heads to compute (None: all; closed heads' gates are 0); qk_gate: (qk_dim,) on
        each head's query dims (scores = sum_i z_i q_i k_i: the gate folds into W_q); v_gate:
        (v_dim,) on each head's value dims; qk_active / v_active: the open dims to compute;
        hidden_active: x holds only these channels of embed_dim, and so does the output
        -> (batch, frames, embed_dim or hidden_active.numel())"""
        heads = self.num_heads if active is None else active.numel()
        out_bias = _rows(self.out_proj.bias, hidden_active)
        if heads == 0:  # only the output bias is left
            return out_bias + x.new_zeros(x.shape[:-1] + out_bias.shape)
        qk_rows = _head_rows(active, qk_active, self.num_heads, self.qk_dim, x.device)
        v_rows = _head_rows(active, v_active, self.num_heads, self.v_dim, x.device)
        batch, frames, _ = x.shape

        def project(lin: nn.Linear, rows: Optional[Tensor], gate: Optional[Tensor], dims: Optional[Tensor],
                    width: int) -> Tensor:
            width = width if dims is None else dims.numel()  # (a view with -1 fails on 0 dims)
            weight = _rows(_rows(lin.weight, rows), hidden_active, dim=1)
            y = F.linear(x, weight, _rows(lin.bias, rows)).view(batch, frames, heads, width)
            if gate is not None:
                y = y * _rows(gate, dims)
            return y.transpose(1, 2)  # (batch, heads, frames, dims)

        q = project(self.q_proj, qk_rows, qk_gate, qk_active, self.qk_dim)
        k = project(self.k_proj, qk_rows, None, qk_active, self.qk_dim)
        v = project(self.v_proj, v_rows, v_gate, v_active, self.v_dim)
        mask = self._scores_bias(x, position_bias, active, hidden_active)  # (batch, heads, frames, frames) or None
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :]
            if mask is None:
                mask = ~pad
            else:
                mask = mask.masked_fill(pad, float("-inf"))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             scale=1.0 / math.sqrt(self.head_dim))
        if head_gate is not None:
            out = out * _rows(head_gate, active)[:, None, None]
        # heads side by side, (batch, frames, heads * v_dim), by a concatenation rather than a
        # reshape of the transposed output: whether that reshape can be a view depends on the attention
        # kernel's output strides, and under symbolic shapes (torch.export, ONNX) the exporter cannot
        # decide it once frames may be 1 (it emits a view that then fails for WavLM's float mask)
        out = torch.cat(out.unbind(1), dim=-1)
        return F.linear(out, _rows(_rows(self.out_proj.weight, hidden_active), v_rows, dim=1), out_bias)


def _head_rows(heads: Optional[Tensor], dims: Optional[Tensor], num_heads: int, width: int,
               device: torch.device) -> Optional[Tensor]:
    """The projection rows of dims ``dims`` (None: all ``width``) of heads ``heads`` (None: all),
    head-major; None when every row is wanted."""
    if heads is None and dims is None:
        return None
    heads = torch.arange(num_heads, device=device) if heads is None else heads
    dims = torch.arange(width, device=device) if dims is None else dims
    return (heads[:, None] * width + dims[None, :]).flatten()


class WavLMSelfAttention(SelfAttention):
    """Self-attention with WavLM's gated relative position bias.

    The bias table lives in the ``Transformer`` (shared by all layers, indexed by the
    original head); each layer gates it per head from its input, split in chunks of
    ``head_dim``: head ``h`` reads chunk ``head_index[h]``.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float = 0.0,
                 head_index: Optional[List[int]] = None, hidden_index: Optional[List[int]] = None,
                 hidden_total: Optional[int] = None, qk_dim: Optional[int] = None, v_dim: Optional[int] = None):
        super().__init__(embed_dim, num_heads, head_dim, dropout, qk_dim, v_dim)
        head_index = list(range(num_heads)) if head_index is None else list(head_index)
        self.register_buffer("head_index", torch.tensor(head_index, dtype=torch.long), persistent=False)
        # a cut hidden dimension: the chunks are of the original channels; a removed one was a zero.
        # spread[c]: where original channel c is in [x, 0] (the appended zero for removed ones)
        spread = None
        if hidden_total is not None and hidden_total > embed_dim:
            spread = torch.full((hidden_total,), embed_dim, dtype=torch.long)
            spread[torch.tensor(hidden_index, dtype=torch.long)] = torch.arange(embed_dim)
        self.spread: Optional[Tensor]
        self.register_buffer("spread", spread, persistent=False)
        if num_heads > 0:
            self.gru_rel_pos_const = nn.Parameter(torch.ones(1, num_heads, 1, 1))
            self.gru_rel_pos_linear = nn.Linear(head_dim, 8)

    def _scores_bias(self, x: Tensor, position_bias: Optional[Tensor], active: Optional[Tensor],
                     hidden_active: Optional[Tensor] = None) -> Optional[Tensor]:
        assert position_bias is not None, "WavLM attention needs the transformer's position bias"
        x = widen(x, hidden_active, self.embed_dim)  # the chunks are of the full stream's channels
        batch, frames, _ = x.shape
        head_index = _rows(self.head_index, active)
        if self.spread is not None:  # (batch, frames, embed_dim) -> the original channels, zeros for the removed
            x = torch.cat([x, x.new_zeros(batch, frames, 1)], dim=-1)[..., self.spread]
        chunks = x.reshape(batch, frames, -1, self.head_dim).transpose(1, 2)[:, head_index]
        proj = self.gru_rel_pos_linear(chunks).view(batch, head_index.numel(), frames, 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)
        gate = gate_a * (gate_b * _rows(self.gru_rel_pos_const, active, dim=1) - 1.0) + 2.0  # (batch, heads, frames, 1)
        return gate * position_bias[head_index]


class RelativePositionBias(nn.Module):
    """WavLM's bucketed relative position bias, one value per (original) head."""

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.rel_attn_embed = nn.Embedding(num_buckets, num_heads)

    def _bucket(self, relative: Tensor) -> Tensor:
        half = self.num_buckets // 2
        buckets = (relative > 0).long() * half
        relative = relative.abs()
        max_exact = half // 2
        large = max_exact + (torch.log(relative.float() / max_exact) / math.log(self.max_distance / max_exact)
                             * (half - max_exact)).long()
        large = torch.clamp(large, max=half - 1)
        return buckets + torch.where(relative < max_exact, relative, large)

    def forward(self, frames: int) -> Tensor:
        """-> (num_heads, frames, frames)"""
        pos = torch.arange(frames, device=self.rel_attn_embed.weight.device)
        relative = pos[None, :] - pos[:, None]
        return self.rel_attn_embed(self._bucket(relative)).permute(2, 0, 1)


class FeedForward(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout. ``interm_features`` may be 0
    (all units pruned): only ``output_dense``'s bias is left."""

    def __init__(self, io_features: int, interm_features: int, interm_dropout: float, output_dropout: float):
        super().__init__()
        self.interm_features = interm_features
        if interm_features > 0:
            self.intermediate_dense = nn.Linear(io_features, interm_features)
            self.output_dense = nn.Linear(interm_features, io_features)
        else:
            self.output_dense = _BiasOnly(io_features)
        self.intermediate_dropout = nn.Dropout(interm_dropout)
        self.output_dropout = nn.Dropout(output_dropout)

    def forward(self, x: Tensor, unit_gate: Optional[Tensor] = None, active: Optional[Tensor] = None,
                hidden_active: Optional[Tensor] = None) -> Tensor:
        """x: (batch, frames, io_features), unit_gate: (interm_features,), active: the units to
        compute (None: all; closed units' gates are 0); hidden_active: x holds only these of the
        io_features channels, and so does the output -> same shape as x"""
        units = self.interm_features if active is None else active.numel()
        out_bias = _rows(self.output_dense.bias, hidden_active)
        if units == 0:
            # a fresh tensor, not a view of the parameter (hooks and dropout need that)
            return self.output_dropout(out_bias + x.new_zeros(x.shape))
        dense = self.intermediate_dense
        weight = _rows(_rows(dense.weight, active), hidden_active, dim=1)
        h = self.intermediate_dropout(F.gelu(F.linear(x, weight, _rows(dense.bias, active))))
        if unit_gate is not None:
            h = h * _rows(unit_gate, active)
        return self.output_dropout(F.linear(h, _rows(_rows(self.output_dense.weight, hidden_active), active, dim=1),
                                            out_bias))


class _BiasOnly(nn.Module):
    """What is left of a Linear whose every input was pruned: its bias (read by the block that
    owns it; keeps the ``*.bias`` state-dict key of the Linear it replaces)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features))


_NO_GATES = LayerGates()  # the plain layer


def _gated(x: Tensor, hidden: Optional[Tensor]) -> Tensor:
    """x: (..., embed_dim) times the hidden-dimension gate (embed_dim,), if there is one."""
    return x if hidden is None else x * hidden


def _norm(norm: "PhantomLayerNorm", x: Tensor, active: Optional[Tensor]) -> Tensor:
    """``norm`` over the narrow stream x (..., open channels ``active``; None: all): the closed
    channels are exact zeros of the full stream, so they count as phantoms in the statistics."""
    if active is None:
        return norm(x)
    return phantom_layer_norm(x, norm.weight.index_select(0, active), norm.bias.index_select(0, active),
                              norm.total_features, norm.eps)


def widen(x: Tensor, active: Optional[Tensor], width: int) -> Tensor:
    """Channels ``active`` of a ``width``-channel tensor (x: (..., active.numel())) back in their places
    (..., width), zeros elsewhere (None: x as it is): the narrow stream as the full one, or a cut
    model's hidden states as the gated model had them."""
    if active is None:
        return x
    return x.new_zeros(*x.shape[:-1], width).index_copy(-1, active, x)


class EncoderLayer(nn.Module):
    """One transformer layer, post-norm (base) or pre-norm (``layer_norm_first``).

    ``attention`` / ``feed_forward`` may be ``None``: the block was pruned away and the
    layer is a residual path there. A pre-norm LayerNorm whose block is gone, or whose
    block has no heads/units left (its output is a constant), is ``None`` as well.
    ``kept=False``: the layer is an identity (``encoder_layer_kept``), no block and no LayerNorm:
    a post-norm layer removed whole in uniform mode.
    """

    def __init__(self, attention: Optional[SelfAttention], feed_forward: Optional[FeedForward], embed_dim: int,
                 dropout: float, layer_norm_first: bool, eps: float = 1e-5, hidden_total: Optional[int] = None,
                 kept: bool = True):
        super().__init__()
        if not kept and (attention is not None or feed_forward is not None):
            raise ValueError("an identity layer (kept=False) has no attention or feed-forward block")
        self.attention = attention
        self.feed_forward = feed_forward
        self.dropout = nn.Dropout(dropout)
        self.layer_norm_first = layer_norm_first
        needs_attn_norm = kept and (not layer_norm_first or (attention is not None and attention.num_heads > 0))
        needs_ff_norm = kept and (not layer_norm_first or (feed_forward is not None and
                                                           feed_forward.interm_features > 0))
        # over the hidden dimension: a cut one still averages over hidden_total (docs/design.md)
        self.layer_norm = PhantomLayerNorm(embed_dim, hidden_total, eps) if needs_attn_norm else None
        self.final_layer_norm = PhantomLayerNorm(embed_dim, hidden_total, eps) if needs_ff_norm else None

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, position_bias: Optional[Tensor] = None,
                gates: Optional[LayerGates] = None) -> Tensor:
        """x: (batch, frames, embed_dim) -> same shape. ``gates``: this layer's gate values (None:
        the plain layer); their ``*_active`` / ``*_on`` skip closed heads, units and blocks. A gate
        on the whole layer (``gates.layer``, z) blends: ``x + z (layer(x) - x)``, so z = 0 is the
        identity (and z = 1 the plain layer, as the compiled model has it)."""
        g = _NO_GATES if gates is None else gates
        if not g.layer_on:
            return x
        y = self._layer(x, key_padding_mask, position_bias, g)
        return y if g.layer is None else x + g.layer * (y - x)

    def _layer(self, x: Tensor, key_padding_mask: Optional[Tensor], position_bias: Optional[Tensor],
               g: LayerGates) -> Tensor:
        a = g.hidden_active  # the narrow stream: x holds the open hidden channels alone
        if self.attention is not None and g.attention_on:
            h = x
            if self.layer_norm_first and self.layer_norm is not None:
                h = _gated(_norm(self.layer_norm, h, a), g.hidden)
            h = self.dropout(self.attention(h, key_padding_mask, position_bias, g.heads, g.heads_active,
                                            g.qk_dims, g.v_dims, g.qk_dims_active, g.v_dims_active, a))
            if g.attention is not None:
                h = h * g.attention
            x = x + _gated(h, g.hidden)
        if not self.layer_norm_first and self.layer_norm is not None:
            x = _gated(_norm(self.layer_norm, x, a), g.hidden)
        if self.feed_forward is not None and g.ffn_on:
            h = x
            if self.layer_norm_first and self.final_layer_norm is not None:
                h = _gated(_norm(self.final_layer_norm, h, a), g.hidden)
            h = self.feed_forward(h, g.units, g.units_active, a)
            if g.ffn is not None:
                h = h * g.ffn
            x = x + _gated(h, g.hidden)
        if not self.layer_norm_first and self.final_layer_norm is not None:
            x = _gated(_norm(self.final_layer_norm, x, a), g.hidden)
        return x


class Transformer(nn.Module):
    """Positional conv -> [LayerNorm] -> layers -> [LayerNorm] (post- / pre-norm)."""

    def __init__(self, pos_conv_embed: ConvolutionalPositionalEmbedding, embed_dim: int, dropout: float,
                 layers: nn.ModuleList, layer_norm_first: bool, layer_drop: float,
                 rel_pos_bias: Optional[RelativePositionBias] = None, eps: float = 1e-5,
                 hidden_total: Optional[int] = None):
        super().__init__()
        self.pos_conv_embed = pos_conv_embed
        self.layer_norm = PhantomLayerNorm(embed_dim, hidden_total, eps)
        self.layer_norm_first = layer_norm_first
        self.layer_drop = layer_drop
        self.dropout = nn.Dropout(dropout)
        self.layers = layers
        self.rel_pos_bias = rel_pos_bias

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, gates: Optional[Gates] = None,
                num_layers: Optional[int] = None) -> List[Tensor]:
        """x: (batch, frames, embed_dim) -> hidden states: the input to layer 0, then each
        layer's output; for pre-norm the last one after the final LayerNorm (as HF does).

        num_layers: run only the first ``num_layers`` layers (hidden states 0..num_layers, the same
        values as in the full pass: the final LayerNorm belongs to the last layer's output only)."""
        if num_layers is not None and not 0 <= num_layers <= len(self.layers):
            raise ValueError(f"num_layers={num_layers} is outside [0, {len(self.layers)}] (the model's layers)")
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        hidden = None if gates is None else gates.hidden
        a = None if gates is None else gates.hidden_active  # x is the narrow stream: the open channels alone
        if a is None:
            pos = self.pos_conv_embed(x)
            if hidden is not None:  # after a GELU: the 0/1 pattern (a soft value could not fold into the conv)
                pos = pos * (hidden != 0).to(pos.dtype)
        else:  # the grouped conv on the full stream (closed inputs are zeros), read at the open channels
            pos = self.pos_conv_embed(widen(x, a, hidden.numel())).index_select(-1, a)
            hidden = hidden.index_select(0, a)  # every one nonzero
        x = x + pos
        if not self.layer_norm_first:
            x = _gated(_norm(self.layer_norm, x, a), hidden)
        x = self.dropout(x)
        position_bias = self.rel_pos_bias(x.shape[1]) if self.rel_pos_bias is not None else None
        hiddens = [x]
        for i, layer in enumerate(layers):
            if not (self.training and self.layer_drop > 0 and torch.rand(1).item() < self.layer_drop):
                x = layer(x, key_padding_mask, position_bias, None if gates is None else gates.layers[i])
            hiddens.append(x)
        if self.layer_norm_first and len(layers) == len(self.layers):
            hiddens[-1] = _gated(_norm(self.layer_norm, hiddens[-1], a), hidden)
        if a is not None:  # the hidden states as the full stream has them
            hiddens = [widen(h, a, gates.hidden.numel()) for h in hiddens]
        return hiddens


class Encoder(nn.Module):
    """Feature projection + transformer, with padding handled through ``lengths``."""

    def __init__(self, feature_projection: FeatureProjection, transformer: Transformer):
        super().__init__()
        self.feature_projection = feature_projection
        self.transformer = transformer

    def preprocess(self, features: Tensor, lengths: Optional[Tensor] = None, gates: Optional[Gates] = None
                   ) -> Tuple[Tensor, Optional[Tensor]]:
        """features: (batch, frames, channels), lengths: (batch,) valid frames ->
        projected (batch, frames, embed_dim) with padding zeroed, key_padding_mask (batch, frames)
        (True = padding; None without lengths). Masked pre-training replaces frames here."""
        if gates is not None and gates.extractor.active is not None:
            x = self.feature_projection(features, gates.extractor.last_active, gates.extractor.closed)
        else:
            x = self.feature_projection(features)
        if gates is not None and gates.hidden is not None:
            x = x * gates.hidden
            if gates.hidden_active is not None:  # the transformer runs on the open channels alone
                x = x.index_select(-1, gates.hidden_active)
        key_padding_mask = None
        if lengths is not None:
            frames = torch.arange(x.shape[1], device=x.device)
            key_padding_mask = frames[None, :] >= lengths[:, None]
            x = x.masked_fill(key_padding_mask[..., None], 0.0)
        return x, key_padding_mask

    def forward(self, features: Tensor, lengths: Optional[Tensor] = None, gates: Optional[Gates] = None,
                num_layers: Optional[int] = None) -> List[Tensor]:
        """features: (batch, frames, channels), lengths: (batch,) valid frames -> hidden states
        (0..num_layers only, if given: see ``Transformer.forward``)"""
        x, key_padding_mask = self.preprocess(features, lengths, gates)
        return self.transformer(x, key_padding_mask, gates, num_layers)


class Wav2Vec2Model(nn.Module):
    """Feature extractor + encoder. The same module serves HuBERT, wav2vec 2.0 and WavLM."""

    def __init__(self, config, feature_extractor: FeatureExtractor, encoder: Encoder):
        super().__init__()
        self.config = config
        self.feature_extractor = feature_extractor
        self.encoder = encoder

    def prepare_waveforms(self, waveforms: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """What the conv extractor takes: waveforms (batch, samples) normalised per utterance when
        ``config.normalize_waveform`` (the model was pre-trained on such input), else as given.
        Call it before ``feature_extractor`` wherever that is called directly."""
        check_waveforms(waveforms)
        if self.config.normalize_waveform:
            return normalize_waveforms(waveforms, lengths)
        return waveforms

    def forward(self, waveforms: Tensor, lengths: Optional[Tensor] = None, gates: Optional[Gates] = None,
                num_layers: Optional[int] = None) -> Tuple[List[Tensor], Optional[Tensor]]:
        """waveforms: (batch, samples) at 16 kHz; lengths: (batch,) valid samples per row.

        Returns (hiddens, lengths): ``num_layers + 1`` tensors of shape
        (batch, frames, embed_dim) and the valid frames per row (None if lengths is None).
        ``num_layers``: compute only hidden states 0..num_layers (the layers above are not run).
        """
        waveforms = self.prepare_waveforms(waveforms, lengths)
        x, lengths = self.feature_extractor(waveforms, lengths, None if gates is None else gates.extractor)
        return self.encoder(x, lengths, gates, num_layers), lengths
