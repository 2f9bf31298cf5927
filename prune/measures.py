"""The size measures a pruning target can be set in, one registry entry each.

A measure says how big a plain model is (``size``, from its config), how big a gated encoder is
expected to be (``expected``, differentiable in the gates), how ``pruning.target`` reads for it
(``reading``: the fraction removed, or the size to keep) and the unit logs and the report print.
The Lagrangian, the cut's calibration, the config check and the report all read from here, so a
new measure is one ``register(Measure(...))``::

    register(Measure("conv_params", "params", size=lambda config, seconds: ...,
                     expected=lambda gated, seconds: ...))
    # then: prune train ... pruning.target_kind=conv_params pruning.target=0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from torch import Tensor

from .models.config import EncoderConfig
from .structures import GatedEncoder, count_macs, count_params

Size = Callable[[EncoderConfig, float], float]  # (config, seconds of audio) -> size
ExpectedSize = Callable[[GatedEncoder, float], Tensor]  # (gated, seconds) -> differentiable scalar


@dataclass(frozen=True)
class Fraction:
    """``pruning.target`` is the fraction of the size removed (a sparsity), in (0, 1)."""

    def sparsity(self, target: float, full: float) -> float:
        return float(target)

    def check(self, measure: "Measure", target: float, full: Optional[float]) -> None:
        if not 0.0 < target < 1.0:
            raise ValueError(f"pruning.target: a sparsity must be in (0, 1), got {target}")


@dataclass(frozen=True)
class Count:
    """``pruning.target`` is the size to keep, a whole number of ``what`` (e.g. parameters) below the
    teacher's; ``fraction_kind`` names the measure that takes the same size as a fraction removed,
    ``example`` a typical value (both for the error message)."""

    what: str
    fraction_kind: str
    example: int

    def sparsity(self, target: float, full: float) -> float:
        return 1.0 - target / full

    def check(self, measure: "Measure", target: float, full: Optional[float]) -> None:
        if not (math.isfinite(target) and target >= 1 and float(target).is_integer()):
            raise ValueError(f"pruning.target: with pruning.target_kind={measure.name} it is the number of {self.what} "
                             f"to keep, a whole number such as {self.example}, got {target} (for a fraction removed "
                             f"use pruning.target_kind={self.fraction_kind})")
        if full is not None and target >= full:
            raise ValueError(f"pruning.target: {int(target)} {self.what} to keep is not below the teacher's "
                             f"{full:,.0f}")


Reading = Fraction | Count


@dataclass(frozen=True)
class Measure:
    """One size measure (``pruning.target_kind``). ``seconds`` is the utterance length a
    length-dependent measure (MACs) is taken on (``pruning.macs_seconds``); others ignore it."""

    name: str  # what pruning.target_kind says
    unit: str  # for logs and the report: "params", "MACs"
    size: Size
    expected: ExpectedSize
    reading: Reading = Fraction()

    def size_of(self, config: EncoderConfig, seconds: float = 1.0) -> float:
        """The size of a plain model built from ``config`` (the teacher's: the full size)."""
        return float(self.size(config, seconds))

    def target_sparsity(self, target: float, full: float) -> float:
        """The sparsity (1 - kept size / ``full``) that ``pruning.target`` asks for."""
        return self.reading.sparsity(target, full)

    def check_target(self, target: float, full: Optional[float] = None) -> None:
        """Raise ValueError (a one-line message naming ``pruning.target``) if ``target`` cannot be
        read for this measure; ``full``: the teacher's size, None while it is not known."""
        self.reading.check(self, target, full)


MEASURES: Dict[str, Measure] = {}


def register(measure: Measure) -> Measure:
    """Add a measure under its name (a name is registered once)."""
    if measure.name in MEASURES:
        raise ValueError(f"a size measure named {measure.name!r} is already registered")
    MEASURES[measure.name] = measure
    return measure


def names() -> Tuple[str, ...]:
    """The registered measures: the values ``pruning.target_kind`` takes."""
    return tuple(MEASURES)


def get(name: str) -> Measure:
    """The measure ``pruning.target_kind=name`` selects; ValueError naming the choices if none."""
    if name not in MEASURES:
        raise ValueError(f"pruning.target_kind must be one of {names()}, got {name!r}")
    return MEASURES[name]


register(Measure("params", "params", size=lambda config, seconds: count_params(config),
                 expected=lambda gated, seconds: gated.expected_params()))
register(Measure("param_count", "params", size=lambda config, seconds: count_params(config),
                 expected=lambda gated, seconds: gated.expected_params(),
                 reading=Count("parameters", fraction_kind="params", example=23585946)))
register(Measure("macs", "MACs", size=count_macs, expected=lambda gated, seconds: gated.expected_macs(seconds)))
