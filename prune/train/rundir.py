"""The run directory of ``prune train`` / ``prune resume`` / ``prune pretrain``: one process at a
time, and a start that fails leaves it as it was.

    with claim_run_dir(run_dir) as run:   # lock (rank 0); a failure before run.started() is undone
        recipe.setup()
        run.started(cfg)                  # config.yaml: the config the checkpoints are made with
        recipe.train()

The lock is ``fcntl.flock`` on ``run.lock`` (which records pid, host and start time for the message
a second process gets). The kernel drops a flock when its process dies, SIGKILL and the OOM
killer included, so a killed run never blocks its resume and no pid-liveness guess (wrong after
pid reuse, impossible across hosts) is needed; on NFS the server's lease does the same for a
dead host. A lock file still holding a record when taken means its holder died: that is logged.

Hydra makes the run folder (and its parents) before any of our code runs; ``HydraRunDir``, a
Hydra callback set in configs/train.yaml, notes which of them existed, so a failed start can
remove the empty folders it made.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from ..atomic import atomic_write

log = logging.getLogger(__name__)

LOCK = "run.lock"
CONFIG = "config.yaml"


class RunDirBusy(ValueError):
    """Another process holds the run directory. A ValueError: reported in one line like bad input."""


# ------------------------------------------------------------------------------------ lock
class RunLock:
    """An exclusive, non-blocking lock on ``run_dir/run.lock``; ``release`` removes the file."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_record(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirBusy(self._busy(holder)) from None
            if self._same_file(fd):
                break
            os.close(fd)  # the holder released (unlinked) the file between our open and flock: retry
        previous = _read_record(fd)
        if previous:
            log.warning("%s: the run of pid %s on %s (since %s) ended without releasing its lock (killed?); "
                        "taking it over", self.path, previous.get("pid"), previous.get("host"),
                        previous.get("started"))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        # unlink while still holding it: whoever opened the old file finds it replaced and retries
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _busy(self, holder: Dict[str, str]) -> str:
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        where = "" if host == socket.gethostname() else f" on {host}"
        return (f"{self.run_dir} is in use by pid {pid}{where} (since {holder.get('started', '?')}, {self.path}): "
                f"wait for it to end, or stop it (kill {pid}{where}) and then continue it with "
                f"`prune resume {self.run_dir}`")


def _read_record(fd: int) -> Dict[str, str]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


# --------------------------------------------------------------------- what Hydra creates
_MADE_BY_HYDRA: Dict[Path, Path] = {}  # a folder Hydra is about to make -> its nearest existing ancestor


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - Hydra is a dependency; keep this module importable anyway
    Callback = object


class HydraRunDir(Callback):
    """Notes, before Hydra makes it, which part of the run (or sweep) folder already exists."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _note(Path(str(config.hydra.run.dir)))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _note(Path(str(config.hydra.sweep.dir)))


def _note(folder: Path) -> None:
    folder = folder.absolute()
    _MADE_BY_HYDRA[folder] = _nearest_existing(folder)


def _existed_before_hydra(run_dir: Path) -> Path:
    """The deepest folder on ``run_dir``'s path that existed before Hydra ran (``run_dir`` itself
    when unknown: then nothing is removed)."""
    run_dir = run_dir.absolute()
    for folder, ancestor in _MADE_BY_HYDRA.items():
        if run_dir == folder or folder in run_dir.parents:
            return ancestor if ancestor != folder else run_dir
    return run_dir


def _remove_empty_folders(run_dir: Path, keep: Path) -> None:
    """rmdir ``run_dir`` and its parents up to (not including) ``keep``; stops at the first one
    that is not empty, so nothing with content is ever removed."""
    folder = run_dir.absolute()
    while folder != keep and keep in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


# ------------------------------------------------------------------------------ the claim
class RunDir:
    """A claimed run directory (see ``claim_run_dir``)."""

    def __init__(self, run_dir: Path, main: bool):
        self.path = Path(run_dir)
        self.main = main
        self.is_started = False
        self._lock = RunLock(self.path)
        self._entries: Optional[set] = None
        self._logs: Dict[Path, Optional[int]] = {}

    def lock(self) -> None:
        """Take the lock (rank 0 only) and note what the folder holds, to undo a failed start."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        logs = {p: (p.stat().st_size if p.exists() else None) for p in _log_files(self.path)}
        self._lock.acquire()  # may log that it takes over a dead holder's lock: part of this start
        self._entries, self._logs = set(os.listdir(self.path)), logs

    def started(self, cfg: DictConfig) -> None:
        """The run really starts: record its config; from now on nothing is undone."""
        if self.main:
            record_config(cfg, self.path)
        self.is_started = True

    def _undo(self) -> None:
        """Put the folder back as it was before this start: new entries removed, logs cut back."""
        if not self.main or self._entries is None:
            return
        for path, size in self._logs.items():
            with contextlib.suppress(OSError):
                if size is None:
                    path.unlink(missing_ok=True)
                else:
                    os.truncate(path, size)
        import shutil

        for name in set(os.listdir(self.path)) - self._entries - {LOCK}:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, main: bool = True) -> Iterator[RunDir]:
    """Use ``run_dir`` for one run. Call ``lock()`` once the config is validated, then
    ``started(cfg)`` once setup succeeded. If the block fails (any exception, Ctrl-C included)
    before ``started``, the folder is left as it was before: entries this start made are removed,
    the logs cut back to their length, folders Hydra made for it removed if empty. ``main``:
    whether this process is rank 0 (the only one that locks, records and undoes)."""
    run = RunDir(run_dir, main)
    try:
        yield run
    except BaseException:
        if not run.is_started:
            run._undo()
            run._lock.release()
            if main:
                _remove_empty_folders(run.path, _existed_before_hydra(run.path))
        raise
    finally:
        run._lock.release()


class Runner:
    """A training loop in a run directory, as ``run_claimed`` drives it: ``setup()``, ``train()``
    (returns the export), ``cleanup()``. Base of the pruning recipe and of pre-training."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.started = False  # its start recorded: from then on the run directory is kept as it is

    def setup(self) -> None:
        raise NotImplementedError

    def train(self) -> Path:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError


def run_claimed(run_dir: Path, cfg: DictConfig, validate: Callable[[], None], runner: Callable[[], Runner],
                main: bool = True) -> Path:
    """One run's life in ``run_dir``: claim the folder, ``validate()`` (before anything is written),
    lock it, build the ``runner()`` and set it up, record the start, train; the runner is cleaned up
    whatever happens, and a start that fails leaves the folder as it was (``claim_run_dir``)."""
    with claim_run_dir(run_dir, main=main) as run:
        validate()
        run.lock()
        loop = runner()
        try:
            loop.setup()
            run.started(cfg)
            loop.started = True
            return loop.train()
        finally:
            loop.cleanup()


def _log_files(run_dir: Path) -> list:
    """The files that the root logger's file handlers write inside ``run_dir``."""
    run_dir = run_dir.absolute()
    return [Path(h.baseFilename) for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == run_dir]


def record_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write ``run_dir/config.yaml`` atomically: ``prune resume`` reads it back."""
    text = OmegaConf.to_yaml(cfg)
    return atomic_write(Path(run_dir) / CONFIG, lambda f: f.write(text), mode="w")


def is_rank_zero() -> bool:
    """Whether this is torchrun's rank 0 (or not under torchrun), before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0
