"""Writing a model in an output format: ``FORMATS`` is the table of them, one entry (checks, then
the writer) each, and ``write_model`` the one place every model is written through: the
pruning recipe's and pre-training's exports, ``prune export``, ``prune preview`` and
``prune convert MODEL OUT --to FORMAT`` (a model ``load_pretrained`` reads, written in another
format). A new format is one entry here and one module for its writer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..measured import num_params
from ..models import Wav2Vec2Model
from .export import CONFIG, WEIGHTS, check_export_path, export_pruned

NATIVE = "prune"  # prune's own export folder: what load_pruned reads with torch and safetensors alone


@dataclass(frozen=True)
class Format:
    """An output format: ``suffix`` OUT must end with (None: OUT is a folder); ``check()`` raises
    before the model is loaded (a missing extra); ``write(model, out, options)`` writes OUT and
    returns the lines to print; ``options``: the ``prune convert`` options it takes."""

    suffix: Optional[str]
    check: Callable[[], None]
    write: Callable[[Wav2Vec2Model, Path, Dict[str, Any]], List[str]]
    options: Tuple[str, ...] = ()


def _to_native(model: Wav2Vec2Model, out: Path, options: Dict[str, Any]) -> List[str]:
    """``export_pruned``: the options ``source`` (the unpruned config), ``metadata``, ``overwrite``,
    ``extra`` (writes more files into the export folder before it is renamed into place)."""
    path = export_pruned(model, out, source=options.get("source"), metadata=options.get("metadata"),
                         overwrite=options.get("overwrite", False), extra=options.get("extra"))
    return [f"wrote {path} ({WEIGHTS} + {CONFIG}, {model.config.architecture}, "
            f"{num_params(model):,} parameters)"]


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


def _hf_check() -> None:
    from .hf_export import require_transformers

    require_transformers()


def _to_hf(model: Wav2Vec2Model, out: Path, options: Dict) -> List[str]:
    """A transformers ``save_pretrained`` folder, checked against prune on a padded batch; a shape
    transformers cannot hold is refused before anything is written."""
    from .hf_export import export_hf

    return export_hf(model, out, options.get("overwrite", False))


FORMATS: Dict[str, Format] = {
    NATIVE: Format(None, lambda: None, _to_native),
    "onnx": Format(".onnx", _onnx_check, _to_onnx, ("layers", "quantize")),
    "hf": Format(None, _hf_check, _to_hf),
}


def check_output(out: os.PathLike, to: str, overwrite: bool = False) -> Format:
    """The format ``to``, once ``out`` is known to take it (raised now: before any compute)."""
    if to not in FORMATS:
        raise ValueError(f"--to {to}: unknown format; choose from {', '.join(sorted(FORMATS))}")
    fmt = FORMATS[to]
    if fmt.suffix is None:
        check_export_path(out, overwrite, flag="--overwrite")
    else:
        _check_output_file(Path(out), to, fmt, overwrite)
    return fmt


def write_model(model: Wav2Vec2Model, out: os.PathLike, to: str = NATIVE, overwrite: bool = False,
                **options: Any) -> List[str]:
    """Write ``model`` to ``out`` as ``to`` (options: the format's own, e.g. ``source`` and
    ``metadata`` for the native export, ``layers`` for ONNX); returns the lines to print."""
    fmt = check_output(out, to, overwrite)
    fmt.check()
    return fmt.write(model, Path(out), {**options, "overwrite": overwrite})


def check_convert(model_path: os.PathLike, out: os.PathLike, to: str, overwrite: bool = False,
                  options: Optional[Dict[str, Any]] = None) -> Format:
    """Everything about the command line that can be checked before loading anything; ``options``:
    the ``prune convert`` options given (not None), each one the format must take."""
    fmt = check_output(out, to, overwrite)
    for name in options or {}:
        if name not in fmt.options:
            takes = [f"--to {other}" for other, f in sorted(FORMATS.items()) if name in f.options]
            raise ValueError(f"--{name} is an option of {' and '.join(takes)}, not of --to {to}")
    if not Path(model_path).exists():
        raise ValueError(f"{model_path} does not exist")
    fmt.check()
    return fmt


def _check_output_file(out: Path, to: str, fmt: Format, overwrite: bool) -> None:
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


def convert(model_path: os.PathLike, out: os.PathLike, to: str, layers: Optional[Sequence[int]] = None,
            quantize: Optional[str] = None, overwrite: bool = False) -> List[str]:
    """Load ``model_path`` (anything ``load_pretrained`` reads) and write it to ``out`` as ``to``;
    returns the lines to print. Bad input raises before any compute."""
    from .pretrained import load_pretrained

    options = {k: v for k, v in {"layers": layers, "quantize": quantize}.items() if v is not None}
    fmt = check_convert(model_path, out, to, overwrite, options)
    return fmt.write(load_pretrained(model_path), Path(out), {**options, "overwrite": overwrite})
