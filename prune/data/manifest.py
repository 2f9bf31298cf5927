"""Manifests: the list of training files and their lengths, as a TSV.

Format (the fairseq/wav2vec 2.0 layout)::

    /root/folder              <- line 1: the folder the paths are relative to
    speaker1/utt1.flac<TAB>51200    <- then one file per line: relative path, samples at 16 kHz
    speaker1/utt2.flac<TAB>73600

A relative root is resolved against the manifest's own folder, so a corpus and its
manifests can move together. Blank lines are ignored. Lengths count samples after
resampling to 16 kHz.
"""

from __future__ import annotations

import numbers
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import soundfile as sf

from ..atomic import atomic_write
from .audio import SAMPLE_RATE, resampled_length
from .textfile import read_text

PathLike = Union[str, Path]
# file extensions of soundfile's formats whose names are not the extension itself; RAW has no
# header to read a length from, so it is left out
_FORMAT_EXTENSIONS = {"AIFF": (".aiff", ".aif", ".aifc"), "OGG": (".ogg", ".oga", ".opus"), "MP3": (".mp3",),
                      "IRCAM": (".sf",), "MAT4": (".mat",), "MAT5": (".mat",), "NIST": (".nist", ".sph"),
                      "SVX": (".svx", ".8svx", ".iff"), "WAVEX": (".wav",), "RAW": ()}


def soundfile_extensions() -> Tuple[str, ...]:
    """The extensions of every format this soundfile (libsndfile) build reads, sorted."""
    exts = {e for name in sf.available_formats() for e in _FORMAT_EXTENSIONS.get(name, (f".{name.lower()}",))}
    return tuple(sorted(exts))


AUDIO_EXTENSIONS = soundfile_extensions()
_COUNT = re.compile(r"[0-9]+")  # int() would also take "1_000", " 12" and non-ASCII digits


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file (and line, when one is at fault)."""


@dataclass
class Manifest:
    """``root``: folder the entry paths are relative to; ``entries``: (relative path, samples at 16 kHz);
    ``source``: the manifest file it was read from, if any (for error messages)."""

    root: Path
    entries: List[Tuple[str, int]] = field(default_factory=list)
    source: Optional[Path] = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        return str(self.source) if self.source is not None else f"manifest rooted at {self.root}"

    def path(self, index: int) -> Path:
        """The file of entry ``index``."""
        return self.root / self.entries[index][0]

    @property
    def lengths(self) -> List[int]:
        return [n for _, n in self.entries]

    def utterance_id(self, index: int) -> str:
        """Entry ``index``'s utterance id: its file name without the extension (what label files
        such as the demo corpus's transcripts.tsv are keyed by)."""
        return Path(self.entries[index][0]).stem

    @property
    def ids(self) -> List[str]:
        return [self.utterance_id(i) for i in range(len(self.entries))]

    def subset(self, indices: Iterable[int]) -> "Manifest":
        """The entries at ``indices``, in that order (e.g. those ``validate_manifest`` kept)."""
        return Manifest(self.root, [self.entries[i] for i in indices], self.source)


def _parse_entry(line: str, where: str) -> Tuple[str, int]:
    fields = line.split("\t")
    if len(fields) != 2:
        plural = "" if len(fields) == 1 else "s"
        raise ManifestError(f"{where}: expected 'relative_path<TAB>num_samples', got {len(fields)} "
                            f"tab-separated field{plural}: {line[:80]!r}")
    rel, count = fields
    if not rel.strip():
        raise ManifestError(f"{where}: empty path")
    count = count.strip()
    if count.startswith("-") and _COUNT.fullmatch(count[1:]):
        raise ManifestError(f"{where}: negative sample count {count}")
    if not _COUNT.fullmatch(count):
        raise ManifestError(f"{where}: sample count {count!r} is not a non-negative integer")
    return rel, int(count)


def folder_not_manifest(folder: PathLike) -> str:
    """What to say when a folder is given where a manifest file is expected."""
    return f"{folder} is a folder, not a manifest; make one with: prune manifest {folder} OUT_DIR"


def read_manifest(path: PathLike) -> Manifest:
    """Parse a manifest; every problem is a ``ManifestError`` naming the file and 1-based line."""
    path = Path(path)
    if path.is_dir():
        raise ManifestError(folder_not_manifest(path))
    text = read_text(path, "manifest", ManifestError)
    # split on "\n" only: str.splitlines() would also split on \x1c, \u2028 ... inside paths
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    root_line = lines[0] if lines else ""
    if not root_line.strip():
        raise ManifestError(f"{path}:1: the first line must be the root folder, got an empty line")
    if "\t" in root_line:
        raise ManifestError(f"{path}:1: the first line must be the root folder, got a tab-separated "
                            f"entry {root_line[:80]!r} (is the root line missing?)")
    root = Path(root_line)
    if not root.is_absolute():
        root = path.parent / root
    entries = [_parse_entry(line, f"{path}:{i}") for i, line in enumerate(lines[1:], start=2)
               if line.strip() or "\t" in line]  # blank lines are skipped; a lone tab is a malformed entry
    if not entries:
        raise ManifestError(f"{path}: no entries after the root line")
    return Manifest(root, entries, path)


def write_manifest(path: PathLike, root: PathLike, entries: Sequence[Tuple[str, int]]) -> None:
    """Write a manifest atomically (temp file in the same folder, then ``os.replace``), so a
    reader never sees half a file. ``root`` is written as given: pass a path relative to the
    manifest's folder to keep the corpus relocatable."""
    path = Path(path)
    root_text = str(root)
    if not root_text.strip() or "\t" in root_text or "\n" in root_text or "\r" in root_text:
        raise ManifestError(f"{path}: root {root_text!r} must be non-empty, without tabs or newlines")
    if root_text != root_text.strip():
        raise ManifestError(f"{path}: root {root_text!r} has leading/trailing whitespace")
    if not entries:
        raise ManifestError(f"{path}: refusing to write a manifest with no entries")
    lines = [root_text]
    for i, (rel, count) in enumerate(entries):
        rel = str(rel)
        if not rel.strip() or any(c in rel for c in "\t\n\r"):
            raise ManifestError(f"{path}: entry {i}: path {rel!r} must be non-empty, without tabs or newlines")
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ManifestError(f"{path}: entry {i} ({rel}): sample count {count!r} is not a non-negative integer")
        lines.append(f"{rel}\t{int(count)}")
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"), mode="w")


def audio_length(path: PathLike, sample_rate: int = SAMPLE_RATE) -> int:
    """Samples in ``path`` once resampled to ``sample_rate``, from the header alone (``soundfile.info``).
    Raises whatever soundfile raises for an unreadable file."""
    info = sf.info(str(path))
    return resampled_length(info.frames, info.samplerate, sample_rate)


def build_manifest(folder: PathLike, extensions: Sequence[str] = AUDIO_EXTENSIONS,
                   ) -> Tuple[List[Tuple[str, int]], List[Tuple[str, str]]]:
    """Walk ``folder`` (sorted, so the result is deterministic) for files with ``extensions``
    (case-insensitive) and read each one's length at 16 kHz from its header.

    Returns ``(entries, skipped)``: entries are (path relative to ``folder`` with '/' separators,
    samples at 16 kHz); skipped are (relative path, reason) for files soundfile cannot open or
    that hold no samples.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a folder")
    exts = tuple(e.lower() for e in extensions)
    entries: List[Tuple[str, int]] = []
    skipped: List[Tuple[str, str]] = []
    files = sorted((Path(dirpath) / name).relative_to(folder).as_posix()
                   for dirpath, _, names in os.walk(folder) for name in names if name.lower().endswith(exts))
    for rel in files:  # sorted by relative path: the same manifest on every filesystem
        if any(c in rel for c in "\t\n\r"):
            skipped.append((rel, "path contains a tab or newline, which the manifest format cannot hold"))
            continue
        try:
            n = audio_length(folder / rel)
        except (sf.SoundFileError, RuntimeError, ValueError, OSError) as e:
            skipped.append((rel, f"unreadable: {e}"))
            continue
        if n == 0:
            skipped.append((rel, "contains no samples"))
            continue
        entries.append((rel, n))
    return entries, skipped


def split_entries(entries: Sequence[Tuple[str, int]], valid_fraction: float, seed: int = 0,
                  ) -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]:
    """(train, valid): a seeded random ``valid_fraction`` of the files (at least one when the
    fraction is positive and there are two files or more), both kept in path order."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ManifestError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    n_valid = 0 if valid_fraction == 0 or len(entries) < 2 else max(1, round(valid_fraction * len(entries)))
    valid = set(random.Random(seed).sample(range(len(entries)), n_valid))
    return ([e for i, e in enumerate(entries) if i not in valid], [e for i, e in enumerate(entries) if i in valid])


@dataclass
class MadeManifests:
    """What ``make_manifests`` wrote: the manifest files, entries per split, skipped files."""

    train: Path
    valid: Optional[Path]
    entries: Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]
    skipped: List[Tuple[str, str]]

    @property
    def hours(self) -> float:
        return sum(n for split in self.entries for _, n in split) / SAMPLE_RATE / 3600


def make_manifests(folder: PathLike, out_dir: PathLike, valid_fraction: float = 0.01, seed: int = 0,
                   extensions: Sequence[str] = AUDIO_EXTENSIONS, absolute: bool = False) -> MadeManifests:
    """``out_dir/train.tsv`` and ``out_dir/valid.tsv`` for every readable audio file under ``folder``,
    split by file (``split_entries``). The root line is ``folder`` relative to ``out_dir`` (absolute
    with ``absolute``), so a corpus and its manifests can move together. Nothing is written when
    no file is usable (``ManifestError``, naming the extensions looked for)."""
    folder, out_dir = Path(folder), Path(out_dir)
    exts = tuple(e if e.startswith(".") else f".{e}" for e in extensions)
    if out_dir.is_file():
        raise ManifestError(f"{out_dir}: is a file; give the folder to write train.tsv and valid.tsv into")
    entries, skipped = build_manifest(folder, exts)
    if not entries:
        unreadable = f" ({len(skipped)} found, none readable)" if skipped else ""
        raise ManifestError(f"{folder}: no readable audio file{unreadable}; looked for {' '.join(exts)} "
                            f"(recursively); give other extensions with --ext")
    train, valid = split_entries(entries, valid_fraction, seed)
    root = folder.resolve() if absolute else Path(os.path.relpath(folder.resolve(), out_dir.resolve()))
    write_manifest(out_dir / "train.tsv", root.as_posix(), train)
    valid_path = out_dir / "valid.tsv"
    if valid:
        write_manifest(valid_path, root.as_posix(), valid)
    else:  # a valid.tsv of an earlier split would overlap the new train.tsv
        valid_path.unlink(missing_ok=True)
        valid_path = None
    return MadeManifests(out_dir / "train.tsv", valid_path, (train, valid), skipped)
