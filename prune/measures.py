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
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from torch import Tensor

from .latency import load_table
from .models.config import EncoderConfig
from .structures import GatedEncoder, count_macs, count_params

Size = Callable[..., float]  # (config, seconds of audio, **settings) -> size
ExpectedSize = Callable[..., Tensor]  # (gated, seconds, **settings) -> differentiable scalar


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
    example: int | float
    whole: bool = True  # a whole number (parameters); False: any positive amount (milliseconds)

    def sparsity(self, target: float, full: float) -> float:
        return 1.0 - target / full

    def check(self, measure: "Measure", target: float, full: Optional[float]) -> None:
        kind = "a whole number" if self.whole else "a positive number"
        if not (math.isfinite(target) and (target >= 1 and float(target).is_integer() if self.whole else target > 0)):
            raise ValueError(f"pruning.target: with pruning.target_kind={measure.name} it is the number of {self.what} "
                             f"to keep, {kind} such as {self.example if self.whole else f'{self.example:g}'}, got {target} (for a fraction removed "
                             f"use pruning.target_kind={self.fraction_kind})")
        if full is not None and target >= full:
            raise ValueError(f"pruning.target: {int(target) if self.whole else f'{target:g}'} {self.what} to keep is not below the teacher's "
                             f"{full:,.{0 if self.whole else 2}f}")


Reading = Fraction | Count


@dataclass(frozen=True)
class Need:
    """A setting a measure's ``size`` / ``expected`` take beyond the config (as keyword ``name``):
    read from ``pruning.<key>`` by ``load``; ``check(value, teacher, threads)`` raises ValueError
    (one line) if it cannot serve that teacher (None: not known yet) at ``trainer.threads``."""

    name: str
    key: str
    load: Callable[[Any], Any]
    check: Callable[[Any, Optional[EncoderConfig], Optional[int]], None]
    hint: str  # how to get one, for the error when it is not given


@dataclass(frozen=True)
class Measure:
    """One size measure (``pruning.target_kind``). ``seconds`` is the utterance length a
    length-dependent measure (MACs) is taken on (``pruning.macs_seconds``); others ignore it.
    ``needs``: settings it cannot do without (the latency measures: a latency table), given by
    ``bind`` before ``size_of`` / ``expected_of``."""

    name: str  # what pruning.target_kind says
    unit: str  # for logs and the report: "params", "MACs"
    size: Size
    expected: ExpectedSize
    reading: Reading = Fraction()
    needs: Tuple[Need, ...] = ()
    settings: Tuple[Tuple[str, Any], ...] = ()  # (name, value) of each need, once bound

    def bind(self, settings: Mapping[str, Any]) -> "Measure":
        """This measure with its needs' values taken from ``settings`` (name -> value; others ignored);
        ValueError naming the config key of a need that is missing."""
        if not self.needs:
            return self
        for need in self.needs:
            if settings.get(need.name) is None:
                raise ValueError(f"pruning.{need.key}: pruning.target_kind={self.name} needs it; {need.hint}")
        return replace(self, settings=tuple((n.name, settings[n.name]) for n in self.needs))

    def _settings(self) -> Dict[str, Any]:
        if len(self.settings) != len(self.needs):
            self.bind({})  # raises, naming the key
        return dict(self.settings)

    def size_of(self, config: EncoderConfig, seconds: float = 1.0) -> float:
        """The size of a plain model built from ``config`` (the teacher's: the full size)."""
        return float(self.size(config, seconds, **self._settings()))

    def expected_of(self, gated: GatedEncoder, seconds: float = 1.0) -> Tensor:
        """The expected size of ``gated``, differentiable in its gates (in eval mode: its cut's size)."""
        return self.expected(gated, seconds, **self._settings())

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


# ----------------------------------------------------------------------- latency (#18)
def _check_table(table, teacher: Optional[EncoderConfig], threads: Optional[int]) -> None:
    table.check_threads(threads)
    if teacher is not None:
        table.check_model(teacher, "the teacher")


_TABLE = Need("table", "latency_table", load=load_table, check=_check_table,
              hint="make one with `prune profile --preset P --threads T --out FILE` and give "
                   "pruning.latency_table=FILE")


def _latency_ms(config: EncoderConfig, seconds: float, table) -> float:
    return 1e3 * table.latency(config)


def _expected_ms(gated: GatedEncoder, seconds: float, table) -> Tensor:
    return 1e3 * table.expected(gated)


# pruning.target_kind=latency: target = the fraction of the table's latency of the teacher removed;
# latency_ms: the milliseconds to keep. Both read the table's utterance length, batch and threads.
register(Measure("latency", "ms", size=_latency_ms, expected=_expected_ms, needs=(_TABLE,)))
register(Measure("latency_ms", "ms", size=_latency_ms, expected=_expected_ms, needs=(_TABLE,),
                 reading=Count("milliseconds", fraction_kind="latency", example=80.0, whole=False)))
