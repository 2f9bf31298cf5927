"""Refine a latency cut by timing it (#18): the table's prediction of a cut model is off by a few
percent (what a block costs inside a pass at that width and not alone on the grid), so after the
table calibration the cut model is timed on this machine under the table's conditions, the table
target is moved by the miss (``next_target``: by asked/measured, then along the secant of the last
two timings, then inside the bracket once the timings straddle the asked latency), the gates are
calibrated onto it again and the new cut timed, for up to ``rounds`` rounds (fewer once one lands
within ``CLOSE_ENOUGH``); the candidate whose measured latency is nearest the asked one is kept.

A cut model's measured latency is read on the table's scale: t(cut) / t(unpruned) x the table's
latency of the unpruned model, the two timed interleaved (``prune.latency_profile.table_latencies``)
so load and clock drift hit both alike, and a bias common to every pass (the machine being a bit
faster today) cancels.

Only where the table can be honoured: a CPU table, this torch, this CPU, this process's thread
count; otherwise ``skip_reason`` says why and the table's calibration stands.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from . import allocator
from .calibrate import calibrate
from .compile import compile_encoder
from .latency import LatencyTable, machine
from .structures import GatedEncoder


CLOSE_ENOUGH = 0.02  # a candidate measured this near the asked latency ends the rounds (timing noise: ~1-2%)
# a candidate's calibration tolerance, as a fraction of the cut's: the bracket's steps are finer than
# the cut's 0.5%, and a calibration that stops within 0.5% of a target 0.3% away does not move
FINER = 0.2


def skip_reason(table: LatencyTable, distributed: bool = False) -> Optional[str]:
    """Why this process cannot time models the way ``table`` was made (None: it can)."""
    made, here = table.data["machine"], machine("cpu")
    if not str(made.get("device", "cpu")).startswith("cpu"):
        return f"the table was profiled on {made.get('device')}, the refinement times on the CPU"
    if made.get("torch") != here["torch"]:
        return f"the table was profiled with torch {made.get('torch')}, this is torch {here['torch']}"
    if made.get("cpu") != here["cpu"]:
        return f"the table was profiled on another CPU ({made.get('cpu')!r}, this is {here['cpu']!r})"
    if torch.get_num_threads() != table.threads:
        return f"the table was profiled with {table.threads} thread(s), this process runs {torch.get_num_threads()}"
    made_with, here_with = table.data.get("allocator"), allocator.steady()
    if made_with is not None and made_with != here_with:  # tables before prune.allocator have none
        return f"the table was profiled with another allocator setting ({made_with!r}, this is {here_with!r})"
    if distributed:
        return "a distributed run (the ranks would time different machines' loads)"
    return None


def time_models(table_path: str, models: Dict[str, nn.Module], processes: int = 0) -> Dict[str, float]:
    """Measured milliseconds of each model under the table's conditions, interleaved, in this process
    or the median of ``processes`` fresh ones (the hook tests replace with a known-biased timer)."""
    from .latency_profile import table_latencies

    return table_latencies(table_path, models, processes=processes)["measured_ms"]


def next_target(table_targets: List[float], measured: List[float], asked: float) -> float:
    """The table target of the next candidate. Once the timings straddle the asked latency, the
    interpolation between the nearest below and the nearest above (a bracket only narrows: the
    calibrated cut moves in steps, whole heads and layers, so table target -> measured is not a
    line). Before that: after one timing, the last target times asked / measured (the table's bias
    there, taken as a ratio); after two or more, the secant through the last two (table target,
    measured) points, which also takes out a bias with a constant part (a small model's fixed
    costs: a ratio alone then closes only part of the gap each round); the ratio step where the
    secant is flat, falls or leaves (0, 2 x the last target)."""
    below = [(m, t) for t, m in zip(table_targets, measured) if m < asked]
    above = [(m, t) for t, m in zip(table_targets, measured) if m > asked]
    if below and above:
        (m0, t0), (m1, t1) = max(below), min(above)
        return t0 + (asked - m0) / (m1 - m0) * (t1 - t0)
    ratio = table_targets[-1] * asked / measured[-1]
    if len(measured) < 2 or measured[-1] == measured[-2]:
        return ratio
    slope = (measured[-1] - measured[-2]) / (table_targets[-1] - table_targets[-2]) \
        if table_targets[-1] != table_targets[-2] else 0.0
    if slope <= 0:
        return ratio
    secant = table_targets[-1] + (asked - measured[-1]) / slope
    return secant if 0 < secant < 2 * table_targets[-1] else ratio


def _gate_state(gated: GatedEncoder) -> List[Tensor]:
    return [p.detach().clone() for p in gated.gate_parameters()]


@torch.no_grad()
def _load_gate_state(gated: GatedEncoder, state: List[Tensor]) -> None:
    for p, s in zip(gated.gate_parameters(), state):
        p.copy_(s)


@torch.no_grad()
def refine(gated: GatedEncoder, unpruned: nn.Module, size: Callable[[GatedEncoder], Tensor], table: LatencyTable,
           asked: float, full: float, tolerance: float, rounds: int,
           apply: Callable[[GatedEncoder], None] = lambda g: None, processes: int = 0) -> Dict[str, Any]:
    """Time ``gated``'s cut against ``unpruned`` and re-calibrate ``rounds`` times (see the module
    docstring). ``size``: the measure's eval-mode size of the gates (milliseconds from the table,
    the shaper's forced counts applied); ``asked``: the target in the same unit; ``full``: the
    table's size of ``unpruned``; ``apply``: the shaper's forcing after each calibration. Leaves
    the gates at the chosen candidate (eval mode) and returns the record: per candidate the table
    target it was calibrated to, the table's prediction and the measured size, and ``chosen``."""
    unpruned = unpruned.eval()
    table_target = asked
    record: Dict[str, Any] = {"asked": asked, "table_targets": [], "predicted": [], "measured": []}
    states = []
    for i in range(rounds + 1):
        if i > 0:  # every candidate: the gates as given, calibrated onto its table target
            if abs(record["measured"][-1] - asked) <= CLOSE_ENOUGH * asked:
                break  # within the timings' own noise: another round would chase it
            table_target = next_target(record["table_targets"], record["measured"], asked)
            _load_gate_state(gated, states[0])
            calibrate(gated, size, table_target, tolerance * FINER)
            apply(gated)
        gated.eval()
        predicted = size(gated).item()
        ms = time_models(table.path, {"unpruned": unpruned, "cut": compile_encoder(gated).eval()}, processes)
        record["table_targets"].append(table_target)
        record["predicted"].append(predicted)
        record["measured"].append(ms["cut"] / ms["unpruned"] * full)
        states.append(_gate_state(gated))
    chosen = min(range(len(states)), key=lambda k: abs(record["measured"][k] - asked))
    _load_gate_state(gated, states[chosen])
    apply(gated)
    gated.eval()
    record["chosen"] = chosen
    return record
