"""Exported pruned models: ``model.safetensors`` + ``config.json`` in one folder, loadable with
torch and safetensors alone."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..measured import num_params
from ..models import EncoderConfig, Wav2Vec2Model, build_encoder
from ..structures import SHOWN, count_macs, count_params
from ..atomic import fsync_path
from ..faults import maybe_fail

FORMAT = "prune.pruned_encoder"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"

PathLike = Union[str, os.PathLike]


class ExportError(RuntimeError):
    """An export folder that cannot be written or read back."""


def describe(config: EncoderConfig) -> Dict[str, Any]:
    """Size and per-layer structure of a (pruned or unpruned) config: one entry per kind of
    ``prune.structures.SHOWN`` (None where a block was removed whole)."""
    return {"architecture": config.architecture, "params": count_params(config),
            "macs_per_second": count_macs(config, 1.0), **{shown.key: shown.sizes(config) for shown in SHOWN}}


def check_export_path(path: PathLike, overwrite: bool = False, flag: str = "overwrite=True") -> Path:
    """Raise ``ExportError`` now if ``path`` cannot take an export (call it before spending compute).
    ``flag``: how the caller asks to replace an export (the CLI's is ``--overwrite``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ExportError(f"cannot export to {path}: it exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ExportError(f"cannot export to {path}: the folder is not empty (pass {flag} to replace it)")
    ancestor = path.parent
    while not ancestor.exists():  # missing parents are created at export time
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"cannot export to {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK):
        raise ExportError(f"cannot export to {path}: {ancestor} is not writable")
    return path


def export_pruned(model: Wav2Vec2Model, path: PathLike, source: Optional[EncoderConfig] = None,
                  metadata: Optional[Dict[str, Any]] = None, overwrite: bool = False,
                  extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``model`` to the folder ``path`` atomically: everything goes to a temporary folder
    beside it that is renamed into place only once complete, so no half-written export exists.

    ``source``: the unpruned model's config, recorded with its size for comparison.
    ``extra(folder)``: writes more files into the temporary folder (a training run's task head),
    so they appear with the model or not at all; ``load_pruned`` reads only its own two.
    """
    path = check_export_path(path, overwrite)
    actual = num_params(model)
    expected = count_params(model.config)
    if actual != expected:  # the config must describe these weights
        raise ExportError(f"model has {actual} parameters but its config describes {expected}")
    info = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
            "pruned": describe(model.config), "source": describe(source) if source is not None else None,
            "metadata": metadata or {}}

    def write(tmp: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        with open(tmp / CONFIG, "w") as f:
            json.dump(info, f, indent=2)
        if extra is not None:
            extra(tmp)

    return write_folder(path, write)


def write_folder(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary folder beside ``path``, which is then renamed into place
    (replacing what ``path`` held), so no half-written folder exists at ``path``. Every file is
    fsynced before the rename and the parent after it. ``path`` was checked by ``check_export_path``."""
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        write(tmp)
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            fsync_path(file)
        _plain_permissions(tmp)
        maybe_fail("during_export")  # PRUNE_FAULT=during_export (tests): dies before the rename
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_path(parent)  # the rename itself on disk
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _plain_permissions(folder: Path) -> None:
    """mkdtemp makes the folder private (0700) and safetensors writes 0600: give the export the
    permissions any folder and file made under the user's umask get, so others can read it."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for child in folder.rglob("*"):
        child.chmod((0o777 if child.is_dir() else 0o666) & ~umask)


def read_export_info(path: PathLike) -> Dict[str, Any]:
    """The parsed ``config.json`` of an export folder, checked for format."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} is not an export folder (expected a folder with {CONFIG} and {WEIGHTS})")
    config_file = path / CONFIG
    if not config_file.is_file():
        raise ExportError(f"{path} has no {CONFIG}")
    try:
        info = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{config_file} is not valid JSON ({e}); the export is damaged") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ExportError(f"{config_file} is not a prune export (missing format {FORMAT!r})")
    if info.get("version", 0) > FORMAT_VERSION:
        raise ExportError(f"{config_file} has format version {info['version']}, newer than this prune "
                          f"({FORMAT_VERSION}); upgrade prune")
    return info


def load_pruned(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Wav2Vec2Model:
    """Load an exported (pruned) encoder in eval mode. Needs torch and safetensors only."""
    path = Path(path)
    info = read_export_info(path)
    try:
        config = EncoderConfig.from_dict(info["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{path / CONFIG} has an invalid encoder config: {e}") from e
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ExportError(f"{path} has no {WEIGHTS}")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{weights} cannot be read ({e}); the file is truncated or damaged") from e
    model = build_encoder(config)
    _check_state(model, state, weights)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def _check_state(model: Wav2Vec2Model, state: Dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append(f"shape mismatches {shapes}")
    if problems:
        raise ExportError(f"{where} does not match its {CONFIG}: " + "; ".join(problems))

