#!/usr/bin/env python
"""Write a training manifest for every audio file under a folder.

    python scripts/make_manifest.py FOLDER OUT.tsv [--ext .wav .flac]

The root line is FOLDER relative to OUT.tsv's folder (absolute with --absolute), so the
corpus and its manifest can move together. Lengths are samples at 16 kHz, read from each
file's header. Files soundfile cannot read are listed and left out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from prune.train.manifest import AUDIO_EXTENSIONS, ManifestError, build_manifest, write_manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder to walk (recursively)")
    parser.add_argument("out", type=Path, help="manifest to write (TSV)")
    parser.add_argument("--ext", nargs="+", default=list(AUDIO_EXTENSIONS),
                        help=f"file extensions to include (default: {' '.join(AUDIO_EXTENSIONS)})")
    parser.add_argument("--absolute", action="store_true", help="write the root as an absolute path")
    args = parser.parse_args(argv)

    exts = tuple(e if e.startswith(".") else f".{e}" for e in args.ext)
    try:
        entries, skipped = build_manifest(args.folder, exts)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not entries:
        print(f"error: no readable {'/'.join(exts)} files under {args.folder}", file=sys.stderr)
        return 1
    folder = args.folder.resolve()
    root = folder if args.absolute else Path(os.path.relpath(folder, args.out.resolve().parent))
    write_manifest(args.out, root.as_posix(), entries)
    hours = sum(n for _, n in entries) / 16000 / 3600
    print(f"wrote {args.out}: {len(entries)} files ({hours:.2f} h at 16 kHz), {len(skipped)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
