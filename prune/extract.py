"""``prune extract``: hidden states of a (pruned) model for every file of a folder or a manifest,
one ``.npy`` per utterance (frames x dim), batched by length, resumable. The way to use a pruned
model as a content encoder (voice conversion, TTS, diarization front ends)::

    from prune.extract import extract_features
    summary = extract_features("outputs/demo/export", "corpus/", layers=[4], out="features/")

Output layout: ``corpus/spk/x.wav`` -> ``features/spk/x.npy``; with several layers
``features/layer_K/spk/x.npy``. ``features/extract.json`` records the model, layers, dtype and
frame rate (a later run into the folder must match them), the counts and the skipped files.

The data code (soundfile, numpy) is imported here, not by ``import prune``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .atomic import atomic_write
from .models import SAMPLE_RATE, Wav2Vec2Model
from .models.config import EncoderConfig, frame_rate, hidden_state_indices

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
SETTINGS_FILE = "extract.json"
DEFAULT_MAX_BATCH_SECONDS = 60.0
ONNX_EXTRA = "pip install 'prune[onnx]'"


class ExtractError(ValueError):
    """Bad input to ``extract_features``: one line naming what is wrong, where, and what to do."""


# ------------------------------------------------------------------------------- the inputs
@dataclass
class Inputs:
    """The usable files (``manifest``), where each one's features go (``outputs``, relative .npy
    paths in the input's layout) and the files left out with the reason (``skipped``)."""

    manifest: Any  # prune.data.manifest.Manifest
    outputs: List[str]
    skipped: Dict[str, str]


def list_inputs(audio: PathLike) -> Inputs:
    """A folder (searched recursively for the extensions ``prune manifest`` takes) or a manifest
    (train.tsv style) -> the files to extract. Headers are read, no audio is decoded."""
    from .data.dataset import validate_manifest
    from .data.manifest import AUDIO_EXTENSIONS, Manifest, build_manifest, read_manifest

    audio = Path(audio)
    if audio.is_dir():
        entries, unreadable = build_manifest(audio)
        if not entries:
            found = f" ({len(unreadable)} found, none readable)" if unreadable else ""
            raise ExtractError(f"AUDIO {audio}: no readable audio file{found}; looked for "
                               f"{' '.join(AUDIO_EXTENSIONS)} (recursively)")
        manifest = Manifest(audio, entries)
        skipped = {str(audio / rel): reason for rel, reason in unreadable}
    elif audio.is_file():
        manifest = read_manifest(audio)
        skipped = {}
    else:
        raise ExtractError(f"AUDIO {audio}: no such folder or manifest")
    good, bad = validate_manifest(manifest)
    skipped.update(bad)
    manifest = manifest.subset(good)
    return Inputs(manifest, _output_paths(manifest), skipped)


def _output_paths(manifest) -> List[str]:
    """Each entry's ``.npy`` path under the output folder: its path under the root, suffix
    replaced. Entries outside the root, or two files with one output, are refused."""
    outputs: Dict[str, str] = {}
    for rel, _ in manifest.entries:
        norm = PurePosixPath(os.path.normpath(rel).replace(os.sep, "/"))
        if norm.is_absolute() or norm.parts[0] == "..":
            raise ExtractError(f"{manifest}: entry {rel} is outside the root {manifest.root}; the features mirror "
                               f"the paths under the root, so give a manifest whose entries lie inside it")
        out = norm.with_suffix(".npy").as_posix()
        if out in outputs:
            raise ExtractError(f"{manifest.root}: {outputs[out]} and {rel} would both be written to {out}; "
                               f"give a manifest that lists one of them")
        outputs[out] = rel
    return list(outputs)


# ------------------------------------------------------------------------------ the forward
def padding_is_exact(config: EncoderConfig) -> bool:
    """Whether a padded batch gives each utterance the features it gets alone. The Base models'
    GroupNorm (``group_norm`` extractor) normalises over the whole padded time axis, so padding
    changes a shorter utterance's features; the Large models' per-frame LayerNorm does not."""
    return config.extractor_mode != "group_norm"


Forward = Callable[[List[Tensor]], Tuple[List[np.ndarray], np.ndarray]]


def torch_forward(model: Wav2Vec2Model, layers: Sequence[int]) -> Forward:
    """waveforms (each (samples,)) -> (per layer, (batch, frames, dim) float32; valid frames (batch,)).
    The layers above the highest one asked for are not run. With a GroupNorm extractor each
    waveform goes through the conv front end alone (exact), and the encoder runs batched."""
    top = max(layers)

    @torch.inference_mode()
    def forward(waves: List[Tensor]) -> Tuple[List[np.ndarray], np.ndarray]:
        if padding_is_exact(model.config):
            from .data.dataset import collate

            batch = collate(waves)
            hiddens, frames = model(batch.waveforms, batch.lengths, num_layers=top)
        else:
            features = [model.feature_extractor(model.prepare_waveforms(w[None]), None)[0][0] for w in waves]
            frames = torch.tensor([f.shape[0] for f in features])
            hiddens = model.encoder(pad_sequence(features, batch_first=True), frames, num_layers=top)
        return [hiddens[k].float().numpy() for k in layers], frames.numpy()

    return forward


def onnx_session(path: PathLike, threads: Optional[int]):
    """An onnxruntime CPU session of the graph at ``path`` (one-line errors)."""
    try:
        import onnxruntime  # noqa: F401  (only whether it is installed)
    except ImportError:
        raise ExtractError(f"--onnx needs onnxruntime, which is not installed: {ONNX_EXTRA}") from None
    path = Path(path)
    if not path.is_file():
        raise ExtractError(f"--onnx {path}: no such file")
    from .checkpoints.onnx_export import onnx_session as cpu_session

    try:
        return cpu_session(path, threads)
    except Exception as e:  # onnxruntime raises its own pybind types for a bad file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExtractError(f"--onnx {path}: onnxruntime cannot load it ({reason})") from None


def check_onnx_graph(session, path: PathLike, config: EncoderConfig, layers: Sequence[int]) -> None:
    """The graph must follow ``prune convert --to onnx``'s contract (inputs ``waveforms``,
    ``lengths``; outputs ``hidden_K``, ``frames``), hold every requested layer, and have MODEL's width."""
    inputs = sorted(i.name for i in session.get_inputs())
    outputs = {o.name: o for o in session.get_outputs()}
    if inputs != ["lengths", "waveforms"] or "frames" not in outputs:
        raise ExtractError(f"--onnx {path}: not a prune graph (inputs {', '.join(inputs)}; outputs "
                           f"{', '.join(outputs)}); make one with: prune convert MODEL OUT.onnx --to onnx")
    hidden = sorted((n for n in outputs if n.startswith("hidden_")), key=lambda n: int(n[7:]))
    missing = [k for k in layers if f"hidden_{k}" not in outputs]
    if missing:
        raise ExtractError(f"--layer {missing[0]}: {path} has no output hidden_{missing[0]}, only "
                           f"{', '.join(hidden) or 'none'}; export it with: prune convert MODEL OUT.onnx --to onnx "
                           f"--layers {' '.join(map(str, layers))}")
    for k in layers:
        dim = outputs[f"hidden_{k}"].shape[-1]
        if isinstance(dim, int) and dim != config.encoder_embed_dim:
            raise ExtractError(f"--onnx {path}: hidden_{k} has {dim} features but MODEL has "
                               f"{config.encoder_embed_dim}: the graph was not exported from MODEL")


def onnx_forward(session, layers: Sequence[int]) -> Forward:
    """The same as ``torch_forward``, through onnxruntime (one graph: waveforms -> hidden states)."""
    names = [f"hidden_{k}" for k in layers] + ["frames"]

    def forward(waves: List[Tensor]) -> Tuple[List[np.ndarray], np.ndarray]:
        from .data.dataset import collate

        batch = collate(waves)
        *hiddens, frames = session.run(names, {"waveforms": batch.waveforms.numpy(), "lengths": batch.lengths.numpy()})
        return hiddens, frames

    return forward


# -------------------------------------------------------------------------------- the output
def output_path(out: Path, rel: str, layer: int, layers: Sequence[int]) -> Path:
    """``out/rel``, or ``out/layer_K/rel`` when several layers are extracted."""
    return out / rel if len(layers) == 1 else out / f"layer_{layer}" / rel


def to_dtype(hidden: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """hidden (frames, dim) float32 -> ``dtype``; a value beyond float16's range is an error, not an inf."""
    if dtype == np.float32:
        return np.ascontiguousarray(hidden, dtype=np.float32)
    peak = float(np.abs(hidden).max(initial=0.0))
    if peak > np.finfo(np.float16).max:
        raise ExtractError(f"{where}: values up to {peak:.4g} do not fit in float16 (max 65504); "
                           f"extract without --float16")
    return hidden.astype(np.float16)


def check_out_dir(out: Path) -> None:
    """``out`` (or the nearest folder above it that exists) must take new files; tried for real."""
    if out.exists() and not out.is_dir():
        raise ExtractError(f"--out {out}: exists and is not a folder")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:  # os.access is not enough: root passes it everywhere, read-only mounts too
        fd, probe = tempfile.mkstemp(prefix=".prune-write-check-", dir=ancestor)
    except OSError as e:
        raise ExtractError(f"--out {out}: cannot write in {ancestor} ({e.strerror}); give a writable folder") from None
    os.close(fd)
    os.unlink(probe)


# ------------------------------------------------------------------------ the settings record
def model_fingerprint(model: Wav2Vec2Model) -> str:
    """sha256 of the config and every tensor: the same model read from any format has one value."""
    h = hashlib.sha256(model.config.to_json().encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


IDENTITY = ("fingerprint", "layers", "dtype")  # what must match for a run to add to a folder


def check_settings_match(out: Path, settings: Dict[str, Any]) -> None:
    """A folder holds one model's features for one set of layers and one dtype: a run with others
    is refused (via ``out/extract.json``), before any compute. A non-empty folder without the
    file is not an extract folder."""
    record = out / SETTINGS_FILE
    if not record.exists():
        if out.is_dir() and any(out.iterdir()):
            raise ExtractError(f"--out {out}: not empty and has no {SETTINGS_FILE} (not a prune extract folder); "
                               f"give a new or empty folder")
        return
    try:
        old = json.loads(record.read_text())
        before = {key: old[key] for key in IDENTITY}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExtractError(f"{record}: unreadable ({e}); remove it or give another --out") from None
    differ = [key for key in IDENTITY if before[key] != settings[key]]
    if differ:
        what = "; ".join(_describe(key, old, settings) for key in differ)
        raise ExtractError(f"--out {out} holds features of other settings ({what}); give another --out, "
                           f"or the settings in {record}")


def _describe(key: str, old: Dict[str, Any], new: Dict[str, Any]) -> str:
    if key == "fingerprint":
        return f"model {old.get('model')} ({old[key][:12]}) there, {new['model']} ({new[key][:12]}) here"
    return f"{key} {old[key]} there, {new[key]} here"


# ----------------------------------------------------------------------------------- the run
@dataclass
class ExtractSummary:
    """What a run did: files found, written now, already there, skipped (path -> reason)."""

    out: Path
    files: int
    written: int
    present: int
    skipped: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def check_layers(layers: Sequence[int], config: EncoderConfig, model: PathLike) -> List[int]:
    """One set of layers, whatever the order typed (extract.json compares it)."""
    try:
        return hidden_state_indices(layers, config.encoder_num_layers, "--layer", str(model))
    except ValueError as e:
        raise ExtractError(str(e)) from None


def extract_features(model: PathLike, audio: PathLike, layers: Sequence[int], out: PathLike,
                     float16: bool = False, onnx: Optional[PathLike] = None,
                     max_batch_seconds: float = DEFAULT_MAX_BATCH_SECONDS, threads: Optional[int] = None,
                     progress: bool = True) -> ExtractSummary:
    """Write hidden states ``layers`` of ``model`` for every file of ``audio`` under ``out``.

    model: anything ``prune.load_pretrained`` reads. With ``onnx`` the forward runs that graph in
        onnxruntime, and ``model`` (the model it was exported from) gives only the metadata: the
        layer count, the frame rate, and whether a padded batch is exact for it (a GroupNorm
        front end is run one utterance at a time).
    audio: a folder (recursively) or a manifest. Every input problem is an ``ExtractError`` (or a
        checkpoint/manifest error, all ``ValueError``) raised before any compute.
    max_batch_seconds: padded audio per batch (an utterance longer than that runs alone).
    progress: a bar on a terminal; log lines otherwise.
    """
    from .checkpoints import load_pretrained

    out, audio = Path(out), Path(audio)
    if not max_batch_seconds > 0:
        raise ExtractError(f"--max-batch-seconds must be positive, got {max_batch_seconds}")
    if threads is not None and threads < 1:
        raise ExtractError(f"--threads must be at least 1, got {threads}")
    session = onnx_session(onnx, threads) if onnx is not None else None
    if not audio.exists():
        raise ExtractError(f"AUDIO {audio}: no such folder or manifest")
    check_out_dir(out)
    encoder = load_pretrained(model)
    layers = check_layers(layers, encoder.config, model)
    if session is not None:
        check_onnx_graph(session, onnx, encoder.config, layers)
    elif threads is not None:
        torch.set_num_threads(threads)
    dtype = np.float16 if float16 else np.float32
    settings = _settings(model, encoder, onnx, layers, dtype)
    check_settings_match(out, settings)
    inputs = list_inputs(audio)

    todo = [i for i, rel in enumerate(inputs.outputs)
            if not all(output_path(out, rel, k, layers).is_file() for k in layers)]
    files = len(inputs.manifest) + len(inputs.skipped)
    summary = ExtractSummary(out, files, 0, len(inputs.manifest) - len(todo), dict(inputs.skipped))
    _record(out, settings, summary, complete=False, audio=audio)  # before compute: the settings guard a resume
    forward = torch_forward(encoder, layers) if session is None else onnx_forward(session, layers)
    # one utterance per run where padding is not exact and the graph cannot split the front end
    batch_size = 1 if session is not None and not padding_is_exact(encoder.config) else None
    start = time.perf_counter()
    _extract(inputs, todo, forward, _batches(todo, inputs.manifest.lengths, batch_size, max_batch_seconds), out,
             layers, dtype, summary, progress)
    summary.seconds = time.perf_counter() - start
    _record(out, settings, summary, complete=True, audio=audio)
    return summary


def _settings(model: PathLike, encoder: Wav2Vec2Model, onnx: Optional[PathLike], layers: List[int], dtype
              ) -> Dict[str, Any]:
    """What extract.json records about how the features are made (``IDENTITY`` must match on a rerun)."""
    return {"model": str(Path(model).resolve()), "runtime": "torch" if onnx is None else "onnxruntime",
            "onnx": None if onnx is None else str(Path(onnx).resolve()),
            "fingerprint": model_fingerprint(encoder) if onnx is None else file_fingerprint(Path(onnx)),
            "layers": layers, "dtype": np.dtype(dtype).name, "frame_rate": frame_rate(encoder.config),
            "sample_rate": SAMPLE_RATE, "layout": "rel/path.npy" if len(layers) == 1 else "layer_K/rel/path.npy"}


def _extract(inputs: Inputs, todo: List[int], forward: Forward, batches: List[List[int]], out: Path,
             layers: List[int], dtype, summary: ExtractSummary, progress: bool) -> None:
    """Decode, forward and write each batch; files that fail to decode go to ``summary.skipped``."""
    from .data.dataset import AudioDataset

    dataset = AudioDataset(inputs.manifest)  # None for a file that fails to decode (logged once)
    with _progress(len(todo), progress) as advance:
        for batch in batches:
            waves = [(i, w) for i, w in ((i, dataset[i]) for i in batch) if w is not None]
            if waves:
                _write_batch(out, [inputs.outputs[i] for i, _ in waves], forward([w for _, w in waves]),
                             layers, dtype)
            summary.written += len(waves)
            advance(len(batch))
    summary.skipped.update(dataset.skipped)


def _batches(todo: List[int], lengths: List[int], batch_size: Optional[int], max_batch_seconds: float
             ) -> List[List[int]]:
    """Longest first (a batch too big for memory fails at once), packed by padded length."""
    from .data.dataset import pack_sorted

    order = sorted(todo, key=lambda i: -lengths[i])
    return pack_sorted(order, lengths, batch_size, int(max_batch_seconds * SAMPLE_RATE))


def _write_batch(out: Path, rels: List[str], result: Tuple[List[np.ndarray], np.ndarray], layers: Sequence[int],
                 dtype) -> None:
    """Each utterance's valid frames of each layer, ``(frames, dim)``, to its own ``.npy``."""
    hiddens, frames = result
    for b, rel in enumerate(rels):
        for k, hidden in zip(layers, hiddens):
            path = output_path(out, rel, k, layers)
            array = to_dtype(hidden[b, :int(frames[b])], dtype, f"{path} (layer {k})")
            atomic_write(path, lambda f: np.save(f, array))


def _record(out: Path, settings: Dict[str, Any], summary: ExtractSummary, complete: bool, audio: Path) -> None:
    """``out/extract.json``: the settings, the input, the counts, the skipped files."""
    record = {**settings, "audio": str(audio.resolve()), "complete": complete,
              "counts": {"files": summary.files, "written": summary.written, "present": summary.present,
                         "skipped": len(summary.skipped)},
              "skipped": summary.skipped}
    atomic_write(out / SETTINGS_FILE, lambda f: f.write(json.dumps(record, indent=2) + "\n"), mode="w")


@contextlib.contextmanager
def _progress(total: int, enabled: bool):
    """``advance(n)``: a tqdm bar on a terminal (log lines drawn above it), else a log line at each
    tenth of the way."""
    from .progress import progress_bar

    bar = progress_bar(total, 0, enabled, desc="extract", unit="file")
    done, last_tenth, start = 0, 0, time.perf_counter()

    def advance(n: int) -> None:
        nonlocal done, last_tenth
        done += n
        if bar is not None:
            bar.update(n)
            return
        tenth = done * 10 // max(total, 1)
        if tenth > last_tenth:
            last_tenth = tenth
            rate = done / max(time.perf_counter() - start, 1e-9)
            log.info("extract: %d/%d files (%d%%), %.1f files/s", done, total, 100 * done // total, rate)

    if bar is None:
        yield advance
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        try:
            yield advance
        finally:
            bar.close()
