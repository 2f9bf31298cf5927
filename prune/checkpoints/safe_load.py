"""Reading weight files without running code from them.

``.safetensors`` files hold tensors only. Torch checkpoints are pickles: they are read with
``torch.load(weights_only=True)``, torch's restricted unpickler, which builds nothing but tensors
and plain containers. fairseq checkpoints additionally pickle their config (an
``argparse.Namespace`` in ``args``, omegaconf ``DictConfig`` objects in ``cfg``) and, for HuBERT,
the label dictionaries (``fairseq.data.dictionary.Dictionary``) in ``task_state``. For those few
names the unpickler gets inert stand-ins defined here: building one stores data and runs nothing,
and neither fairseq nor omegaconf needs to be installed. ``to_plain`` then turns them into dicts,
lists and scalars. Any other global in a file is refused with a message that names it; the
caller can opt in to full unpickling with ``trust_pickle=True``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Union

import torch

from .keymap import CheckpointError

_LOG = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class _Inert:
    """Stands in for a pickled object that prune never reads (metadata, label dictionaries,
    training statistics). Creating, calling or restoring it only stores nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<unreadable pickled object>"


class _OmegaDict:
    """Stand-in for ``omegaconf.DictConfig``: keeps the pickled ``_content`` (key -> node)."""

    def __setstate__(self, state: Any) -> None:
        self.content = state.get("_content") if isinstance(state, dict) else None


class _OmegaList:
    """Stand-in for ``omegaconf.ListConfig``: keeps the pickled ``_content`` (list of nodes)."""

    def __setstate__(self, state: Any) -> None:
        self.content = state.get("_content") if isinstance(state, dict) else None


class _OmegaNode:
    """Stand-in for omegaconf's value nodes (``AnyNode``, ``StringNode``...): keeps ``_val``."""

    def __setstate__(self, state: Any) -> None:
        self.value = state.get("_val") if isinstance(state, dict) else None


def _empty_dict(*args: Any) -> dict:
    """Stand-in for ``collections.defaultdict`` (omegaconf's resolver cache): a plain dict, the
    factory is dropped."""
    return {}


_OMEGA_NODES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode",
                "EnumNode", "ValueNode", "InterpolationResultNode", "UnionNode")
_INERT_NAMES = (
    "omegaconf.base.Metadata", "omegaconf.base.ContainerMetadata", "typing.Any",
    "fairseq.data.dictionary.Dictionary",  # HuBERT's task_state label dictionaries
    # numpy values in fairseq's training statistics (extra_state); never read
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
)

# (object, "module.name"): what torch's weights-only unpickler may build for that global
SAFE_GLOBALS = (
    [(argparse.Namespace, "argparse.Namespace"),  # a plain attribute bag: restoring it only sets attributes
     (_OmegaDict, "omegaconf.dictconfig.DictConfig"),
     (_OmegaList, "omegaconf.listconfig.ListConfig"),
     (_empty_dict, "collections.defaultdict"),
     # type objects omegaconf records as metadata; calling them only converts a value
     (dict, "builtins.dict"), (list, "builtins.list"), (tuple, "builtins.tuple"), (int, "builtins.int"),
     (float, "builtins.float"), (str, "builtins.str"), (bool, "builtins.bool")]
    + [(_OmegaNode, f"omegaconf.nodes.{n}") for n in _OMEGA_NODES]
    + [(_Inert, name) for name in _INERT_NAMES]
)


def torch_load(path: PathLike, trust_pickle: bool = False) -> Any:
    """``torch.load`` a file onto the CPU, safely unless ``trust_pickle``."""
    path = Path(path)
    try:
        if trust_pickle:
            _LOG.warning("unpickling %s with trust_pickle=True: the file can run arbitrary code", path)
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        name = re.search(r"GLOBAL ([\w.]+)", message)
        if trust_pickle:  # only when TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides weights_only=False
            raise CheckpointError(f"{path} cannot be unpickled even with trust_pickle=True ({_first_line(message)}); "
                                  f"is TORCH_FORCE_WEIGHTS_ONLY_LOAD set?") from None
        if name:
            raise CheckpointError(
                f"{path} refers to {name.group(1)}, which prune does not unpickle: building it could run code "
                f"from the file. Only if you trust where the file comes from, load it with "
                f"load_pretrained({str(path)!r}, trust_pickle=True)") from None
        raise CheckpointError(f"{path} cannot be read safely ({_first_line(message)}): it is damaged or not a "
                              f"torch checkpoint. If it is a checkpoint from a source you trust, "
                              f"load_pretrained({str(path)!r}, trust_pickle=True) reads it with full unpickling"
                              ) from None
    except ModuleNotFoundError as e:  # trust_pickle=True and the pickle needs a library that is missing
        raise CheckpointError(f"{path} needs the module {e.name!r} to be unpickled with trust_pickle=True") from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path} cannot be read as a torch checkpoint ({type(e).__name__}: "
                              f"{_first_line(str(e))}); the file is truncated, damaged or not a checkpoint") from e


def to_plain(obj: Any) -> Any:
    """Stand-ins (and ``argparse.Namespace``) -> dicts, lists and scalars; other values as they are."""
    if isinstance(obj, _OmegaDict):
        return {k: to_plain(v) for k, v in obj.content.items()} if isinstance(obj.content, dict) else obj.content
    if isinstance(obj, _OmegaList):
        return [to_plain(v) for v in obj.content] if isinstance(obj.content, list) else obj.content
    if isinstance(obj, _OmegaNode):
        return to_plain(obj.value)
    if isinstance(obj, argparse.Namespace):
        return {k: to_plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def read_safetensors(path: PathLike) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({_first_line(str(e))}); the file is truncated or "
                              f"damaged") from e


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # torch's weights-only message puts the actual error on a line starting with "WeightsUnpickler error"
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line[len("WeightsUnpickler error:"):].strip()
    return lines[0] if lines else "no detail"
