"""The terminal progress bar of the long-running commands (``prune train``, ``prune extract``)."""

from __future__ import annotations

import sys


def progress_bar(total: int, initial: int, enabled: bool, stream=None, desc: str = "prune", unit: str = "step"):
    """A tqdm bar, on a terminal only: written to a file or pipe its redraws flood the log (the
    trainer logs a progress line every trainer.log_every steps either way). None: no bar."""
    stream = sys.stderr if stream is None else stream
    if not (enabled and stream.isatty()):
        return None
    from tqdm import tqdm  # a trainer dependency, not the library's

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream)
