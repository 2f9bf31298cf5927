"""``inspect_checkpoint``: a readable summary of any checkpoint ``load_pretrained`` reads (what
``prune inspect PATH`` prints)."""

from __future__ import annotations

import os
from itertools import groupby
from typing import Any, Dict, List, Optional, Sequence, Union

from ..models import Wav2Vec2Model
from ..structures.shown import CONV_LAYER, HEAD_WIDTH, POS_CONV_GROUP, TRANSFORMER_LAYER, shown_per
from .export import describe, read_export_info
from .pretrained import load_pretrained

FORMAT_NAMES = {"huggingface": "Hugging Face", "fairseq": "fairseq", "torchaudio": "torchaudio", "dphubert": "DPHuBERT",
                "pruned": "prune export"}


def inspect_checkpoint(path: Union[str, os.PathLike], trust_pickle: bool = False) -> str:
    """Architecture, parameters, MACs per second of audio and per-layer structure of a checkpoint
    (original or pruned), as multi-line text. Loads the checkpoint, so every check of
    ``load_pretrained`` applies."""
    model, report = load_pretrained(path, trust_pickle=trust_pickle, return_report=True)
    source = read_export_info(report.path).get("source") if report.format == "pruned" else None
    lines = [f"checkpoint:     {path}",
             f"format:         {FORMAT_NAMES[report.format]} ({report.detail})",
             *structure_lines(model, source)]
    if report.ignored:
        lines.append("")
        lines.append(f"ignored (not part of the encoder): {len(report.ignored)} key(s)")
        for reason, keys in groupby(sorted(report.ignored, key=lambda k: (report.ignored[k], k)),
                                    key=lambda k: report.ignored[k]):
            lines.append(f"  {reason}: {', '.join(keys)}")
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def structure_lines(model: Wav2Vec2Model, source: Optional[Dict[str, Any]] = None) -> List[str]:
    """Architecture, size and the per-layer table of ``model``; ``source``: ``describe()`` of the
    model it was pruned from, if any."""
    config = model.config
    info = describe(config)
    norm = "pre-norm" if config.encoder_layer_norm_first else "post-norm"
    lines = [
        f"architecture:   {config.architecture} ({norm} transformer, {config.extractor_mode} conv extractor)",
        f"input:          {_input(config.normalize_waveform)}",
        f"parameters:     {info['params']:,} ({_si(info['params'])})",
        f"MACs:           {_si(info['macs_per_second'])} per second of 16 kHz audio",
    ]
    if source:
        lines.append(f"pruned from:    {source['architecture']}, {_si(source['params'])} parameters, "
                     f"{_si(source['macs_per_second'])} MACs/s: {_share(info['params'], source['params'])} of "
                     f"the parameters and {_share(info['macs_per_second'], source['macs_per_second'])} of the "
                     f"MACs kept")
    convs = config.extractor_conv_layer_config
    widths = "; ".join(f"{s.column} {_runs(info[s.key])}" for s in shown_per(CONV_LAYER))
    lines.append(f"conv extractor: {len(convs)} layers; {widths}; kernels "
                 f"{_runs([k for _, k, _ in convs])}; strides {_runs([s for _, _, s in convs])}; "
                 f"bias {'yes' if config.extractor_conv_bias else 'no'}")
    lines.append(f"transformer:    {config.encoder_num_layers} layers; embedding {config.encoder_embed_dim}; head dim "
                 f"{config.encoder_head_dim}; positional conv kernel {config.encoder_pos_conv_kernel}, groups "
                 f"{config.encoder_pos_conv_groups}")
    if config.hidden_total > config.encoder_embed_dim:  # a cut hidden dimension
        groups = "; ".join(f"{_runs(info[s.key])}" for s in shown_per(POS_CONV_GROUP))
        lines.append(f"hidden dim:     {config.encoder_embed_dim} of {config.hidden_total} channels kept (per "
                     f"positional conv group: {groups}); LayerNorms average over {config.hidden_total}")
    if config.encoder_head_qk_dims is not None or config.encoder_head_v_dims is not None:  # cut head dims
        dims = "; ".join(f"{s.column} {_runs([_cell(v) for v in info[s.key]])}" for s in shown_per(HEAD_WIDTH))
        lines.append(f"head dims:      per layer, of {config.encoder_head_dim}: {dims} (softmax scale "
                     f"1/sqrt({config.encoder_head_dim}))")
    if config.is_wavlm:
        lines.append(f"position bias:  {config.encoder_num_buckets} buckets, max distance "
                     f"{config.encoder_max_distance}")
    lines.append("")
    columns = shown_per(TRANSFORMER_LAYER)
    lines.append("  ".join([f"{'layer':>5}", *(s.column for s in columns), f"{'parameters':>12}"]))
    for i, layer in enumerate(model.encoder.transformer.layers):
        params = sum(p.numel() for p in layer.parameters())
        cells = [f"{_cell(info[s.key][i]):>{len(s.column)}}" for s in columns]
        lines.append("  ".join([f"{i:>5}", *cells, f"{params:>12,}"]))
    return lines


def _input(normalize_waveform: bool) -> str:
    if normalize_waveform:
        return "waveforms normalised per utterance (zero mean, unit variance; normalize_waveform)"
    return "raw waveforms (not normalised)"


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"


def _share(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _cell(value: Optional[int]) -> str:
    return "-" if value is None else str(value)  # "-": the whole block was pruned away


def _runs(values: Sequence[int]) -> str:
    """[512, 512, 256] -> "512 x2, 256"."""
    parts: List[str] = []
    for value, group in groupby(values):
        n = len(list(group))
        parts.append(f"{value} x{n}" if n > 1 else str(value))
    return ", ".join(parts)
