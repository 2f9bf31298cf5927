"""ONNX export of an encoder (pruned or not) through torch's own exporter (``torch.onnx.export``,
dynamo), and its check against the torch model with onnxruntime.

The graph's contract (``prune extract --onnx`` and other consumers rely on it):

* inputs ``waveforms`` float32 (batch, samples) at 16 kHz and ``lengths`` int64 (batch,) valid
  samples per row; batch and samples are dynamic; padding is handled through ``lengths`` as in prune;
* outputs ``hidden_K`` float32 (batch, frames, embed_dim) for each exported layer K in increasing
  order (0: the input to the first transformer layer), then ``frames`` int64 (batch,) valid frames;
* ``metadata_props``: ``prune_version``, ``layers`` (JSON list), ``num_layers`` (the model's),
  ``sample_rate``, ``frame_rate``, ``architecture``, ``quantize``.

onnx, onnxscript and onnxruntime are imported here only when called (``pip install 'prune[onnx]'``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..models import SAMPLE_RATE, EncoderConfig, Wav2Vec2Model
from ..models.config import conv_geometry, frame_rate, hidden_state_indices

PathLike = Union[str, os.PathLike]
INSTALL_HINT = "pip install 'prune[onnx]'"
QUANTIZE = ("int8",)
FLOAT_TOLERANCE = 1e-4  # max relative error of a float32 graph against torch on the check batch


class OnnxUnavailable(ImportError):
    """The ``onnx`` extra is not installed."""


def require_onnx() -> None:
    """Raise ``OnnxUnavailable`` (one line: how to install) unless onnx, onnxscript and onnxruntime import."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise OnnxUnavailable(f"ONNX export needs {module}, which is not installed: {INSTALL_HINT}") from None


def check_layers(layers: Optional[Sequence[int]], num_layers: int) -> List[int]:
    """The hidden states to export, sorted and unique (None: all, 0 to ``num_layers``)."""
    return hidden_state_indices(layers, num_layers, "--layers")


class OnnxGraph(nn.Module):
    """What the ONNX graph computes: the selected hidden states, then the valid frames. Only the
    layers up to the highest selected one are run (and traced)."""

    def __init__(self, model: Wav2Vec2Model, layers: Sequence[int]):
        super().__init__()
        self.model = model
        self.layers = list(layers)

    def forward(self, waveforms: Tensor, lengths: Tensor) -> Tuple[Tensor, ...]:
        """waveforms: (batch, samples) float32, lengths: (batch,) int64 ->
        (hidden_K (batch, frames, embed_dim) for K in layers..., frames (batch,))"""
        hiddens, frames = self.model(waveforms, lengths, num_layers=max(self.layers))
        return (*(hiddens[k] for k in self.layers), frames)


def output_names(layers: Sequence[int]) -> List[str]:
    return [f"hidden_{k}" for k in layers] + ["frames"]


def metadata(config: EncoderConfig, layers: Sequence[int], quantize: Optional[str]) -> Dict[str, str]:
    from .. import __version__

    rate = frame_rate(config)
    return {"prune_version": __version__, "layers": json.dumps(list(layers)),
            "num_layers": str(config.encoder_num_layers), "sample_rate": str(SAMPLE_RATE),
            "frame_rate": f"{rate:g}", "architecture": config.architecture, "quantize": quantize or "none"}


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (``layers`` still as its JSON text)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def export_onnx(model: Wav2Vec2Model, path: PathLike, layers: Optional[Sequence[int]] = None,
                quantize: Optional[str] = None) -> Path:
    """Write ``model`` (pruned or not) to ``path`` as an ONNX graph with the contract above.

    layers: the hidden states to output (None: all); the layers above the highest are left out.
    quantize: ``"int8"``: dynamic int8 quantisation of the MatMul weights (onnxruntime's
    ``quantize_dynamic``). The file is written under a temporary name and renamed at the end, so
    ``path`` is never half-written. Returns ``path``.
    """
    require_onnx()
    path = Path(path)
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: choose from {', '.join(QUANTIZE)} (or None)")
    layers = check_layers(layers, model.config.encoder_num_layers)
    graph = OnnxGraph(copy.deepcopy(model).float().eval(), layers).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        float_file = Path(tmp) / "float32.onnx"
        _torch_export(graph, float_file)
        final = float_file
        if quantize == "int8":
            final = Path(tmp) / "int8.onnx"
            _quantize_int8(float_file, final)
        _finish(final, metadata(model.config, layers, quantize))
        os.replace(final, path)
    return path


def _example_inputs(config: EncoderConfig) -> Tuple[Tensor, Tensor]:
    """A padded batch of two (batch 1 and equal lengths would let the exporter specialise on them)."""
    field, hop = conv_geometry(config)
    samples = field + 24 * hop
    return torch.randn(2, samples), torch.tensor([samples, samples - 7 * hop - 3])


def _torch_export(graph: OnnxGraph, path: Path) -> None:
    field, hop = conv_geometry(graph.model.config)
    # two frames at least: with one, the exporter cannot tell apart layouts that differ only in a size-1 dim
    batch, samples = torch.export.Dim("batch"), torch.export.Dim("samples", min=field + hop)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" and other notes of the exporter
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"torch\.onnx|copyreg")  # notes for exporter developers
            program = torch.onnx.export(graph, _example_inputs(graph.model.config), dynamo=True,
                                        input_names=["waveforms", "lengths"], output_names=output_names(graph.layers),
                                        dynamic_shapes={"waveforms": {0: batch, 1: samples}, "lengths": {0: batch}},
                                        verbose=False)
    finally:
        quiet.setLevel(level)
    program.save(str(path))


def _quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph (shape inference) goes to the root logger
    try:
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def _finish(path: Path, props: Dict[str, str]) -> None:
    """Record ``props`` in the file's metadata_props and check the graph."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


# ------------------------------------------------------------------------------------ checks
def check_batch(config: EncoderConfig, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """A small padded batch unlike the export's example: three rows of different lengths."""
    field, hop = conv_geometry(config)
    g = torch.Generator().manual_seed(seed)
    samples = field + 37 * hop + 11
    lengths = torch.tensor([samples - 15 * hop - 5, samples, field + 3 * hop])
    return torch.randn(3, samples, generator=g), lengths


def onnx_session(path: PathLike, threads: Optional[int] = 1):
    """An onnxruntime CPU session on ``threads`` threads (None: onnxruntime's own choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(graph, waveforms: Tensor, lengths: Tensor, threads: int = 1) -> Dict[str, Tensor]:
    """onnxruntime (CPU) on a batch -> {output name: tensor}. graph: a path or an ``onnx_session``."""
    session = onnx_session(graph, threads) if isinstance(graph, (str, os.PathLike)) else graph
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, {"waveforms": waveforms.float().numpy(), "lengths": lengths.long().numpy()})
    return {name: torch.from_numpy(value) for name, value in zip(names, outputs)}


def valid_frames_error(actual: Tensor, expected: Tensor, frames: Tensor) -> float:
    """max |actual - expected| / max |expected| over the valid frames of each row.
    actual, expected: (batch, frames, dim); frames: (batch,)."""
    valid = torch.arange(expected.shape[1])[None, :] < frames[:, None]  # (batch, frames)
    diff = (actual - expected).abs()[valid]
    scale = expected.abs()[valid].max().clamp(min=torch.finfo(expected.dtype).tiny)
    return (diff.max() / scale).item()


@torch.no_grad()
def verify_onnx(path: PathLike, model: Wav2Vec2Model, layers: Optional[Sequence[int]] = None,
                batch: Optional[Tuple[Tensor, Tensor]] = None) -> Dict[str, float]:
    """onnxruntime vs the torch model on a padded batch (default: ``check_batch``) ->
    {hidden_K: max relative error on valid frames}. Raises ValueError if the graph's outputs or
    its ``frames`` differ from the model's."""
    layers = check_layers(layers, model.config.encoder_num_layers)
    waveforms, lengths = batch if batch is not None else check_batch(model.config)
    ours = run_onnx(path, waveforms, lengths)
    if list(ours) != output_names(layers):
        raise ValueError(f"{path}: outputs {list(ours)}, expected {output_names(layers)}")
    was_training = model.training
    model.eval()
    try:
        hiddens, frames = model(waveforms.float(), lengths, num_layers=max(layers))
    finally:
        model.train(was_training)
    if not torch.equal(ours["frames"], frames):
        raise ValueError(f"{path}: frames {ours['frames'].tolist()}, torch gives {frames.tolist()}")
    return {f"hidden_{k}": valid_frames_error(ours[f"hidden_{k}"], hiddens[k], frames) for k in layers}
