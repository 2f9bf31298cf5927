"""Training checkpoints: written atomically and fsynced, the last few kept, a damaged latest one
skipped in favour of the one before."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..atomic import atomic_write
from ..checkpoints.keymap import CheckpointError  # the library's one: ``except prune.CheckpointError`` catches these
from ..faults import maybe_fail

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})\.pt$")
# what PruneRecipe._restore reads: a file without them is not a whole training checkpoint
REQUIRED = ("step", "stage", "epoch", "batch_in_epoch", "config", "student_config", "student", "lagrangian",
            "optimizer", "scheduler", "scaler", "rng", "nonfinite_total", "history")


def checkpoint_files(folder: Path) -> List[Tuple[int, Path]]:
    """(step, path) of the checkpoints in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := _NAME.match(name))]
    return sorted(found, reverse=True)


def save_checkpoint(folder: Path, step: int, state: Dict[str, Any], keep_last: int = 3) -> Path:
    """Write ``state`` as ``folder/step_XXXXXXXX.pt``: to a temporary name, fsynced, then renamed,
    so a crash at any point leaves the previous checkpoints intact. Older ones beyond
    ``keep_last`` are removed afterwards."""
    path = folder / f"step_{step:08d}.pt"
    atomic_write(path, lambda f: torch.save(state, f), durable=True,
                 before_rename=lambda: maybe_fail("mid_checkpoint", step))  # PRUNE_FAULT=mid_checkpoint:STEP (tests)
    for _, old in checkpoint_files(folder)[keep_last:]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, required: Tuple[str, ...] = REQUIRED, kind: str = "training",
                    mmap: bool = False) -> Dict[str, Any]:
    """Load one checkpoint safely (no code runs on unpickling); it must hold the ``required`` keys.
    ``mmap``: tensors are mapped from the file, not read (to look at the small entries only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, bad pickle, disallowed global: all mean "not usable"
        raise CheckpointError(f"{path} cannot be loaded safely: {_reason(e)}") from e
    return check_keys(state, path, required, kind)


def check_keys(state: Any, path: Path, required: Tuple[str, ...] = REQUIRED, kind: str = "training"
               ) -> Dict[str, Any]:
    """``state`` if it is a dict holding the ``required`` keys, else CheckpointError."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a prune {kind} checkpoint (a {type(state).__name__}, not a dict)")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a prune {kind} checkpoint (missing {', '.join(missing)})")
    return state


def _reason(error: Exception) -> str:
    """One line: torch's weights-only refusal is a page of advice around the line that matters."""
    name = re.search(r"GLOBAL ([\w.]+)", str(error))
    if name:
        return (f"it refers to {name.group(1)}, which a training checkpoint never holds; refused by the "
                f"weights-only unpickler, nothing in the file was run")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line[len("WeightsUnpickler error:"):].strip()
    return f"{type(error).__name__}: {lines[0] if lines else 'no detail'}"


def load_latest(folder: Path, required: Tuple[str, ...] = REQUIRED, kind: str = "training",
                mmap: bool = False) -> Optional[Dict[str, Any]]:
    """The newest loadable checkpoint in ``folder`` (None if there is none at all); damaged
    ones are skipped with a warning."""
    files = checkpoint_files(folder)
    for step, path in files:
        try:
            return load_checkpoint(path, required, kind, mmap)
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint: %s", e)
    if files:
        raise CheckpointError(f"every checkpoint in {folder} is damaged: {[str(p) for _, p in files]}")
    return None
