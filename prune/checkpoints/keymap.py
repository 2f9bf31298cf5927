"""What every importer shares: the error type, key tables and the checks that account for every key.

A key table is a list of ``Rule`` rows (source key pattern -> prune key) and ``Ignore`` rows
(source keys that are deliberately not loaded, with the reason). ``map_keys`` applies one to a
state dict and fails on any key no row covers; ``load_mapped`` then fails on missing keys and
shape mismatches before touching the model. Nothing is dropped without being reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from torch import Tensor

from ..models import EncoderConfig, Wav2Vec2Model

MAX_LISTED = 12  # keys named in one error message; the rest are counted


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unreadable, unsafe to unpickle, of an unsupported model
    family, or whose weights do not match its config; also a training checkpoint that is damaged or
    incomplete (``prune.train.checkpoint``). The message names the file and the keys. A ValueError:
    bad input, which every command reports in one line."""


@dataclass(frozen=True)
class Rule:
    """One row of a key table.

    ``pattern`` must match a whole source key. ``target`` is the prune key, a ``re`` template
    (``\\1`` is the pattern's first group), or a tuple of them: the tensor is then split into
    equal parts along dim 0, given in that order (e.g. a fused q/k/v projection).
    """

    pattern: str
    target: Union[str, Tuple[str, ...]]


POS_CONV = "encoder.transformer.pos_conv_embed.conv"  # the prune key prefix of the positional conv


def pos_conv_rules(source: str) -> List[Rule]:
    """The weight-normed positional conv stored under ``source`` (a regex, dots escaped) ->
    prune keys. Weight norm is saved either as torch.nn.utils.weight_norm saves it (``weight_g``,
    ``weight_v``) or as torch.nn.utils.parametrizations.weight_norm does (``original0`` = g,
    ``original1`` = v)."""
    return [Rule(source + r"\.weight_g", POS_CONV + ".weight_g"),
            Rule(source + r"\.weight_v", POS_CONV + ".weight_v"),
            Rule(source + r"\.parametrizations\.weight\.original0", POS_CONV + ".weight_g"),
            Rule(source + r"\.parametrizations\.weight\.original1", POS_CONV + ".weight_v"),
            Rule(source + r"\.bias", POS_CONV + ".bias")]


@dataclass(frozen=True)
class Ignore:
    """Source keys (whole-key pattern) that are deliberately left out, and why."""

    pattern: str
    reason: str


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: which format, which config, which keys it left out, and any
    value it had to assume because the checkpoint does not record it."""

    format: str  # "huggingface" | "fairseq" | "torchaudio" | "dphubert" | "pruned"
    path: str
    config: EncoderConfig
    detail: str = ""  # e.g. "HubertForCTC", "fairseq hubert (hydra cfg)"
    ignored: Dict[str, str] = field(default_factory=dict)  # source key -> reason
    notes: List[str] = field(default_factory=list)


def as_flag(value: object, where: str, key: str) -> bool:
    """A true/false setting read from a checkpoint's config (JSON, omegaconf or argparse values)."""
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):  # argparse-era configs store some flags as 0/1
        return bool(value)
    raise CheckpointError(f"{where}: {key} must be true or false, got {value!r}")


def format_keys(keys: Iterable[str], limit: int = MAX_LISTED) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def map_keys(state: Dict[str, object], rules: Sequence[Rule], ignores: Sequence[Ignore], where: str,
             table: str) -> Tuple[Dict[str, Tensor], Dict[str, str], Dict[str, str]]:
    """Rename ``state`` through a key table.

    Returns (mapped, origin, ignored): prune key -> tensor, prune key -> the source key it came
    from, source key -> why it was left out. ``where`` names the file and ``table`` the format
    in error messages.
    """
    mapped: Dict[str, Tensor] = {}
    origin: Dict[str, str] = {}
    ignored: Dict[str, str] = {}
    unknown: List[str] = []
    for key, value in state.items():
        rule, match = _find_rule(rules, key)
        if rule is None:
            reason = next((i.reason for i in ignores if re.fullmatch(i.pattern, key)), None)
            if reason is None:
                unknown.append(key)
            else:
                ignored[key] = reason
            continue
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{where}: {key!r} holds a {type(value).__name__}, not a tensor")
        targets = (rule.target,) if isinstance(rule.target, str) else rule.target
        parts: Sequence[Tensor] = (value,)
        if len(targets) > 1:
            if value.shape[0] % len(targets):
                raise CheckpointError(f"{where}: {key!r} of shape {tuple(value.shape)} cannot be split into "
                                      f"{len(targets)} equal parts along dim 0")
            parts = value.chunk(len(targets), dim=0)
        for template, part in zip(targets, parts):
            name = match.expand(template)
            if name in mapped:
                raise CheckpointError(f"{where}: {origin[name]!r} and {key!r} both give {name!r}; a checkpoint "
                                      f"should hold only one of them")
            mapped[name] = part
            origin[name] = key
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} key(s) not in the {table} key map (an unsupported "
                              f"variant or another model family?): {format_keys(sorted(unknown))}")
    return mapped, origin, ignored


def load_mapped(model: Wav2Vec2Model, mapped: Dict[str, Tensor], origin: Dict[str, str], where: str,
                rules: Sequence[Rule] = (), source_prefix: str = "") -> Wav2Vec2Model:
    """Copy ``mapped`` into ``model`` after checking it has exactly the model's keys and shapes.

    ``rules``: the key table used (and ``source_prefix``, what the file puts before the keys it
    maps), to name a missing weight by its key in the source format.
    """
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(mapped))
    if missing:
        problems.append(f"missing {len(missing)} weight(s): "
                        + format_keys(_source_names(k, rules, source_prefix) for k in missing))
    extra = sorted(set(mapped) - set(expected))
    if extra:
        problems.append(f"{len(extra)} weight(s) that the config has no place for: "
                        + format_keys(f"{origin[k]} (as {k})" for k in extra))
    shapes = [f"{origin[k]}: {tuple(mapped[k].shape)} in the file, {tuple(v.shape)} expected from the config"
              for k, v in expected.items() if k in mapped and tuple(mapped[k].shape) != tuple(v.shape)]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + format_keys(shapes))
    if problems:
        raise CheckpointError(f"{where} does not match its config: " + "; ".join(problems))
    for k, v in mapped.items():
        if not (v.is_floating_point() or v.is_complex()):
            raise CheckpointError(f"{where}: {origin[k]} has dtype {v.dtype}; a floating-point weight is expected")
    model.load_state_dict(mapped, strict=True)
    return model


def _find_rule(rules: Sequence[Rule], key: str) -> Tuple[Optional[Rule], Optional[re.Match]]:
    for rule in rules:
        match = re.fullmatch(rule.pattern, key)
        if match:
            return rule, match
    return None, None


# ------------------------------------------------------- naming a missing weight in the source format
_GROUP = re.compile(r"\((?:[^()\\]|\\.)*\)")
_SIMPLE_LITERAL = re.compile(r"(?:[A-Za-z0-9_]|\\\.)*")


def _source_names(prune_key: str, rules: Sequence[Rule], prefix: str = "") -> str:
    """The source key(s) that would provide ``prune_key``, e.g.
    ``encoder.layers.1.fc1.weight (for encoder.transformer.layers.1.feed_forward.intermediate_dense.weight)``."""
    sources = source_keys(prune_key, rules, prefix)
    return f"{' or '.join(sources)} (for {prune_key})" if sources else prune_key


def source_keys(prune_key: str, rules: Sequence[Rule], prefix: str = "") -> List[str]:
    """The key table read backwards: every source key that a rule of ``rules`` maps to ``prune_key``
    (several where the format has more than one spelling, e.g. both weight-norm conventions). Only
    rules written as literal text and capture groups are inverted; others are skipped."""
    sources: List[str] = []
    for rule in rules:
        targets = (rule.target,) if isinstance(rule.target, str) else rule.target
        for template in targets:
            groups = _match_template(template, prune_key)
            if groups is None:
                continue
            source = _fill_pattern(rule.pattern, groups)
            if source is not None and re.fullmatch(rule.pattern, source) and prefix + source not in sources:
                sources.append(prefix + source)
    return sources


def _match_template(template: str, key: str) -> Optional[Dict[int, str]]:
    pieces = re.split(r"\\(\d)", template)  # literal, group number, literal, ...
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<g{p}>[^.]+)" for i, p in enumerate(pieces))
    try:
        match = re.fullmatch(regex, key)
    except re.error:  # the same group used twice in one template
        return None
    return None if match is None else {int(k[1:]): v for k, v in match.groupdict().items()}


def _fill_pattern(pattern: str, groups: Dict[int, str]) -> Optional[str]:
    out, pos, n = [], 0, 0
    for m in _GROUP.finditer(pattern):
        literal = pattern[pos:m.start()]
        if not _SIMPLE_LITERAL.fullmatch(literal):
            return None
        n += 1
        if n not in groups:
            return None
        out += [literal.replace("\\.", "."), groups[n]]
        pos = m.end()
    tail = pattern[pos:]
    if not _SIMPLE_LITERAL.fullmatch(tail):
        return None
    return "".join(out) + tail.replace("\\.", ".")
