"""``load_pretrained``: one entry point for every checkpoint format, told apart by what is on disk.

* a folder with ``config.json`` whose ``format`` is ``prune.pruned_encoder``: our pruned export;
* a folder with a Hugging Face ``config.json`` (``model_type``) and its weights (or one of those
  files): a ``save_pretrained`` folder;
* a torch file holding ``model`` plus ``cfg`` or ``args``: a fairseq / official WavLM checkpoint;
* a torch file holding ``state_dict`` and ``config`` with DPHuBERT's names (its converted teachers
  and pruned models; ``dphubert.py``);
* a torch or safetensors file holding a state dict with torchaudio's key names (alone, or under
  ``state_dict`` beside its ``wav2vec2_model`` arguments in ``config``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch

from ..models import EncoderConfig, Wav2Vec2Model
from .export import CONFIG as EXPORT_CONFIG
from .export import FORMAT as EXPORT_FORMAT
from .export import ExportError, load_pruned
from .dphubert import is_dphubert_file, load_dphubert
from .fairseq import is_fairseq_checkpoint, load_fairseq
from .hf import WEIGHT_FILES, WRAPPER_PREFIX, load_hf, read_hf_config
from .keymap import CheckpointError, LoadReport, format_keys
from .safe_load import read_safetensors, torch_load
from .torchaudio import ConfigLike, is_torchaudio_state, load_torchaudio, params_from_file

__all__ = ["CheckpointError", "LoadReport", "load_pretrained"]

_LOG = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def load_pretrained(path: PathLike, trust_pickle: bool = False, config: ConfigLike = None,
                    map_location: Union[str, torch.device] = "cpu", return_report: bool = False
                    ) -> Union[Wav2Vec2Model, Tuple[Wav2Vec2Model, LoadReport]]:
    """Load a HuBERT / wav2vec 2.0 / WavLM checkpoint as the in-house encoder, in eval mode.

    path: a Hugging Face ``save_pretrained`` folder (or a file in it), a fairseq / WavLM ``.pt``,
        a torchaudio state dict (``.pt``/``.pth``/``.safetensors``) or a prune export folder.
    trust_pickle: unpickle torch files with full pickle (can run code from the file). Only needed
        for files that refer to classes beyond tensors and configs; the error says when.
    config: torchaudio state dicts only, which do not record the architecture: an ``EncoderConfig``
        or ``wav2vec2_model`` / ``wavlm_model`` arguments (all, e.g. a bundle's ``_params``, or some,
        overriding what is inferred from the shapes).
    return_report: also return a ``LoadReport`` (format, config, ignored keys, assumptions).

    Keys deliberately left out (training heads, mask embeddings) are logged at INFO level and
    listed in the report; assumed values are logged as warnings. Anything else that does not fit
    raises ``CheckpointError`` naming the file and the keys.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    model, report = _load(path, trust_pickle, config)
    if config is not None and report.format not in ("torchaudio", "dphubert"):
        raise CheckpointError(f"{path} is a {report.format} checkpoint, which records its own config; config= is "
                              f"only for torchaudio state dicts and DPHuBERT files")
    if report.ignored:
        _LOG.info("%s: ignored %d key(s) that are not part of the encoder: %s", path, len(report.ignored),
                  format_keys(f"{k} ({why})" for k, why in report.ignored.items()))
    for note in report.notes:
        _LOG.warning("%s: %s", path, note)
    model = model.to(map_location).eval()
    return (model, report) if return_report else model


def _load(path: Path, trust_pickle: bool, config: ConfigLike) -> Tuple[Wav2Vec2Model, LoadReport]:
    if path.is_file() and (path.name == "config.json" or path.name in WEIGHT_FILES or _is_shard(path)) \
            and (path.parent / "config.json").is_file():
        path = path.parent  # a file of a save_pretrained / export folder: load the folder
    if path.is_dir():
        return _load_folder(path, trust_pickle)
    if path.suffix == ".safetensors":
        return _load_state(read_safetensors(path), str(path), config)
    obj = torch_load(path, trust_pickle)
    if is_fairseq_checkpoint(obj):
        return load_fairseq(obj, str(path))
    if is_dphubert_file(obj):
        return load_dphubert(obj, str(path), config)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _load_state(obj, str(path), config)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        where = f"{path} (state_dict)"
        if isinstance(obj.get("config"), dict) and not isinstance(config, EncoderConfig):
            config = {**params_from_file(obj["config"], f"{path} (config)"), **(config or {})}
        return _load_state(obj["state_dict"], where, config)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return _load_state(obj["model"], f"{path} (model)", config)
    keys = format_keys(map(str, obj)) if isinstance(obj, dict) else ""
    raise CheckpointError(f"{path} is not a checkpoint prune can read: a {type(obj).__name__}"
                          + (f" with keys {keys}" if keys else "")
                          + "; expected a fairseq checkpoint (model + cfg/args) or a torchaudio state dict")


def _is_shard(path: Path) -> bool:
    return path.name.startswith(("model-", "pytorch_model-")) and "-of-" in path.name


def _load_folder(folder: Path, trust_pickle: bool) -> Tuple[Wav2Vec2Model, LoadReport]:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is a folder without config.json: pass a Hugging Face save_pretrained "
                              f"folder, a prune export, or the checkpoint file itself")
    info: Dict[str, Any] = read_hf_config(folder)
    if info.get("format") == EXPORT_FORMAT:
        try:
            model = load_pruned(folder)
        except ExportError as e:
            raise CheckpointError(str(e)) from e
        pretrain = (info.get("metadata") or {}).get("pretrain")
        detail = (f"encoder pre-trained by prune pretrain, {pretrain.get('steps')} steps" if pretrain
                  else "pruned encoder")
        return model, LoadReport("pruned", str(folder), model.config, detail)
    if "model_type" in info:
        return load_hf(folder, trust_pickle)
    raise CheckpointError(f"{folder / EXPORT_CONFIG} is neither a Hugging Face config (no model_type) nor a prune "
                          f"export (no format {EXPORT_FORMAT!r})")


def _load_state(state: Dict[str, Any], where: str, config: ConfigLike) -> Tuple[Wav2Vec2Model, LoadReport]:
    """A bare state dict: only torchaudio's layout is loadable without its config file."""
    keys = [str(k) for k in state]
    if is_torchaudio_state(keys):
        return load_torchaudio(state, where, config)
    hf_starts = tuple(f"{prefix}{part}" for prefix in ("", *WRAPPER_PREFIX.values())
                      for part in ("feature_projection.", "encoder.pos_conv_embed."))
    if any(k.startswith(hf_starts) for k in keys):
        raise CheckpointError(f"{where} looks like a Hugging Face state dict without its config.json: load the "
                              f"save_pretrained folder instead")
    if any(k.startswith(("post_extract_proj.", "encoder.pos_conv.", "w2v_encoder.")) for k in keys):
        raise CheckpointError(f"{where} looks like fairseq weights without the checkpoint's cfg/args: load the "
                              f"original fairseq .pt file instead")
    raise CheckpointError(f"{where} is not a HuBERT / wav2vec 2.0 / WavLM state dict in a known layout; its keys: "
                          f"{format_keys(sorted(keys))}")

