"""Resuming a run: the one check that a run directory's checkpoints were made with the config it
is resumed with (``prune train`` / ``prune resume`` and ``prune pretrain`` alike), whether a
pruning run has anything left to do, and the recorded config ``prune resume`` continues."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from .checkpoint import load_latest
from .config import PATH_KEYS, ConfigError, path_values, typed
from .rundir import CONFIG
from .student import DONE, FINAL

log = logging.getLogger(__name__)

# what may change between a run's start and its resume: logging and speed settings
TRAIN_RESUMABLE = ("logging", "trainer.log_every", "trainer.threads")


def check_resume_config(saved: Dict[str, Any], now: Dict[str, Any], run_dir: Path,
                        ignore: Tuple[str, ...] = TRAIN_RESUMABLE) -> None:
    """ValueError naming the keys if ``now`` (a plain config) differs from ``saved``, the one the
    run's checkpoints were made with, outside the keys in ``ignore``."""
    changed = config_changes(saved, now, ignore)
    if changed:
        raise ValueError(f"{run_dir} was started with a different config ({', '.join(changed)}); "
                         f"resume with the same config or use a new run directory")


def config_changes(saved: Dict[str, Any], now: Dict[str, Any],
                   ignore: Tuple[str, ...] = TRAIN_RESUMABLE) -> List[str]:
    """The keys by which a run's config differs from the one its checkpoint was made with, outside
    ``ignore``. A path key may be written another way (relative, absolute, through a link) for the
    same file, or point to the new place of a file that moved (the recorded one no longer exists:
    logged)."""
    changed = _diff(saved, now, ignore)
    old, new = path_values(saved), path_values(now)
    moved = [k for k in changed if k in PATH_KEYS and k in old and k in new and not os.path.exists(old[k])]
    for key in moved:
        log.warning("%s: the run was made with %s, which no longer exists; going on with %s", key, old[key], new[key])
    return [k for k in changed if k not in moved and not (k in old and k in new and _same_file(old[k], new[k]))]


def _same_file(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):  # a recorded relative path: relative to here, as before
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _diff(a: Any, b: Any, ignore: Tuple[str, ...], prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two plain configs."""
    if prefix.rstrip(".") in ignore:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out: List[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), ignore, f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def finished_export(run_dir: Path) -> Optional[Path]:
    """The export of a pruning run that has nothing left to do (its newest checkpoint is past the
    last step, its export and report are written), else None."""
    run_dir = Path(run_dir)
    export = run_dir / "export"
    if not ((export / "config.json").is_file() and (run_dir / "report.json").is_file()):
        return None
    state = load_latest(run_dir / "checkpoints", mmap=True)  # the stage alone: tensors stay on disk
    if state is None:
        return None
    tr = state["config"]["trainer"]
    total = (state["config"].get("task") or {}).get("finetune_teacher_steps", 0) + tr["prune_steps"] + tr["final_steps"]
    last = state["stage"] == DONE or (state["stage"] == FINAL and state["step"] >= total)
    return export if last else None


def recorded_config(run_dir: Path, moved: Sequence[str] = ()) -> DictConfig:
    """The config the run in ``run_dir`` was started with (its config.yaml), typed, with the
    ``KEY=PATH`` items of ``moved`` applied: the new place of a file the run was made with (path
    keys only; anything else is refused: a resume continues the recorded run)."""
    config_file = Path(run_dir) / CONFIG
    if not config_file.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no {CONFIG})")
    plain = OmegaConf.to_container(typed(OmegaConf.load(config_file)), resolve=True)
    for item in moved:
        key, sep, value = item.partition("=")
        if not sep or key not in PATH_KEYS or not value:
            raise ConfigError(f"{item}: a resume continues the recorded config and takes only the new place of a "
                              f"moved file ({', '.join(k + '=PATH' for k in PATH_KEYS)}); to change anything "
                              f"else, start a new run directory")
        section, name = key.split(".")
        plain[section][name] = value
    return typed(plain)
