"""Files written whole or not at all: a reader (or a resumed run) never sees half a file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Callable, Optional


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (so that a rename inside it is on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[Any]], None], mode: str = "wb", durable: bool = False,
                 before_rename: Optional[Callable[[], None]] = None) -> Path:
    """``write(file)`` into a temporary file beside ``path`` (hidden ``.NAME.tmp``), renamed into
    place when complete, so a killed process leaves the old file or none, never a partial one. The
    temporary name is fixed, so the next write of ``path`` replaces what a killed one left (one
    writer per path: run directories and export folders are claimed before anything is written).

    durable: fsync the file before the rename and the folder after it (a power cut keeps it too).
    before_rename: called between the two (fault injection in tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = {"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {}
    tmp = path.parent / f".{path.name}.tmp"
    try:
        with open(tmp, mode, **text) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
    return path
