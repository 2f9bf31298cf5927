"""``prune convert MODEL OUT --to FORMAT``: a model ``load_pretrained`` reads, written in another
format. ``FORMATS`` is the table of output formats: one entry (checks, then the conversion) each."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..models import Wav2Vec2Model


@dataclass(frozen=True)
class Format:
    """An output format: ``suffix`` OUT must end with; ``check()`` raises before the model is
    loaded (a missing extra); ``convert(model, out, options)`` writes OUT and returns the lines to print."""

    suffix: str
    check: Callable[[], None]
    convert: Callable[[Wav2Vec2Model, Path, Dict], List[str]]


def _onnx_check() -> None:
    from .onnx_export import require_onnx

    require_onnx()


def _to_onnx(model: Wav2Vec2Model, out: Path, options: Dict) -> List[str]:
    """Export, then verify against torch on a small padded batch; a float32 graph beyond
    ``FLOAT_TOLERANCE`` is removed and is an error."""
    from .onnx_export import FLOAT_TOLERANCE, check_layers, export_onnx, verify_onnx

    layers = check_layers(options.get("layers"), model.config.encoder_num_layers)
    quantize = options.get("quantize")
    export_onnx(model, out, layers, quantize)
    try:
        errors = verify_onnx(out, model, layers)
    except Exception:
        out.unlink(missing_ok=True)
        raise
    worst = max(errors.values())
    line = "onnxruntime vs torch, max relative error on valid frames: " + \
        ", ".join(f"{name} {e:.1e}" for name, e in errors.items())
    if quantize is None and not worst <= FLOAT_TOLERANCE:  # NaN fails too
        out.unlink(missing_ok=True)
        raise ValueError(f"{line}; above {FLOAT_TOLERANCE:g} for a float32 graph: {out} removed")
    return [line, f"wrote {out} ({'int8 MatMul weights' if quantize else 'float32'}, outputs "
                  f"{', '.join(f'hidden_{k}' for k in layers)}, frames; {out.stat().st_size / 1e6:.1f} MB)"]


FORMATS: Dict[str, Format] = {
    "onnx": Format(".onnx", _onnx_check, _to_onnx),
}


def check_convert(model_path: os.PathLike, out: os.PathLike, to: str, overwrite: bool = False) -> Format:
    """Everything about the command line that can be checked before loading anything."""
    if to not in FORMATS:
        raise ValueError(f"--to {to}: unknown format; choose from {', '.join(sorted(FORMATS))}")
    fmt = FORMATS[to]
    out = Path(out)
    if out.suffix != fmt.suffix:
        raise ValueError(f"{out}: an output for --to {to} must end in {fmt.suffix}")
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the file to write, ending in {fmt.suffix}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    ancestor = out.parent
    while not ancestor.exists():  # missing folders are made at write time
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: cannot write into {ancestor} (not a writable folder)")
    if not Path(model_path).exists():
        raise ValueError(f"{model_path} does not exist")
    fmt.check()
    return fmt


def convert(model_path: os.PathLike, out: os.PathLike, to: str, layers: Optional[Sequence[int]] = None,
            quantize: Optional[str] = None, overwrite: bool = False) -> List[str]:
    """Load ``model_path`` (anything ``load_pretrained`` reads) and write it to ``out`` as ``to``;
    returns the lines to print. Bad input raises before any compute."""
    from .onnx_export import check_layers
    from .pretrained import load_pretrained

    fmt = check_convert(model_path, out, to, overwrite)
    model = load_pretrained(model_path)
    check_layers(layers, model.config.encoder_num_layers)
    return fmt.convert(model, Path(out), {"layers": layers, "quantize": quantize})
