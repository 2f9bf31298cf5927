"""Deterministic fault injection for the reliability tests: ``PRUNE_FAULT`` names the points at
which a process dies (SIGKILL, as from the OOM killer or a pre-empted node) or a loss turns NaN.

    PRUNE_FAULT=POINT[:STEP][,POINT[:STEP]...]      STEP: N or A-B (inclusive); none: every time

Points (STEP counts steps as checkpoints do: ``mid_step:7`` dies while computing the step that
makes it 7):

    mid_step        after backward, before the optimizer step                  (SIGKILL)
    mid_checkpoint  checkpoint STEP written to its temp file and fsynced, not yet renamed (SIGKILL)
    between_stages  gates cut, the stage-2 checkpoint not yet written          (SIGKILL)
    during_export   weights written to the export's temp folder, not yet renamed; no STEP (SIGKILL)
    nan_loss        the loss of step STEP is multiplied by NaN                 (see ``nan_loss``)
    stall           after step STEP and its checkpoint, if any: sleeps until interrupted or killed

Unset (the normal case) every call is one dictionary lookup. The variable is read here only.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

ENV = "PRUNE_FAULT"
POINTS = ("mid_step", "mid_checkpoint", "between_stages", "during_export", "nan_loss", "stall")


def _matches(point: str, step: Optional[int]) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    for item in spec.split(","):
        name, _, steps = item.strip().partition(":")
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown fault point {name!r}; choose from {', '.join(POINTS)}")
        if name != point:
            continue
        if not steps:
            return True
        if step is None:
            continue
        low, _, high = steps.partition("-")
        if int(low) <= step <= int(high or low):
            return True
    return False


def maybe_fail(point: str, step: Optional[int] = None) -> None:
    """Die at once with SIGKILL (no cleanup, no ``finally``) if ``PRUNE_FAULT`` names this point."""
    if _matches(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_loss(step: int) -> bool:
    """Whether ``PRUNE_FAULT`` asks for the loss of ``step`` to be NaN."""
    return _matches("nan_loss", step)


def maybe_stall(step: int) -> None:
    """Sleep until interrupted (Ctrl-C) or killed if ``PRUNE_FAULT`` names ``stall`` at ``step``:
    a run held at a known step, for the tests of what a second process or a Ctrl-C does."""
    if _matches("stall", step):
        while True:
            time.sleep(3600)
