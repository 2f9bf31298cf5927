"""Command-line overrides checked against the schema before Hydra composes anything.

Hydra's own message for a typo (``pruning.traget=0.6``) is six lines that advise
``+pruning.traget=0.6``, which then fails in the typed schema. Here every override's key is
looked up in the schema's keys (``schema.py``) and a config group's option in the group's
folder; a miss is one ``ConfigError`` line naming the key and the nearest valid ones::

    pruning.traget=0.6: pruning.traget is not a config key; did you mean pruning.target?
"""

from __future__ import annotations

import difflib
from typing import Dict, List, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException

from .config import ConfigError
from .schema import FREE, Key, schema_keys


def parse_overrides(overrides: Sequence[str]) -> List[Override]:
    """Hydra's parse of ``key=value`` arguments; a syntax error is one line naming the argument."""
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except HydraException as e:
            reason = str(e).splitlines()[0]
            raise ConfigError(f"{text}: cannot parse this override ({reason}); the syntax is key=value, "
                              f"e.g. pruning.target=0.6") from None
    return parsed


def config_groups(package: str = "prune.configs") -> Dict[str, List[str]]:
    """Hydra config groups in ``package``: group folder -> its options (yaml names), sorted. A
    folder that is a package of its own (configs/pretrain: another command's configs) is no group."""
    from importlib.resources import files

    return {d.name: sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".yaml"))
            for d in sorted(files(package).iterdir(), key=lambda d: d.name)
            if d.is_dir() and not d.joinpath("__init__.py").is_file()
            and any(f.name.endswith(".yaml") for f in d.iterdir())}


def check_overrides(overrides: Sequence[str], schema: type, groups: Optional[Dict[str, List[str]]] = None,
                    command: str = "train") -> None:
    """Raise ``ConfigError`` for an override whose key is not in ``schema`` (a dataclass), a group
    option that does not exist (``groups``: group -> its options), or a ``+`` on a key that is
    already there. ``hydra.*`` overrides are left to Hydra; ``command`` names the help to read."""
    keys = {k.name: k for k in schema_keys(schema)}
    for o in parse_overrides(overrides):
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or o.package is not None:
            continue
        if groups and key in groups and o.type != OverrideType.DEL:
            _check_group_option(o, groups[key])
            continue
        known = _lookup(key, keys)
        if known is None:
            raise ConfigError(f"{o.input_line}: {key} is not a config key; {_suggest(key, keys, command)}")
        if o.type == OverrideType.ADD and known.name == key and known.kind != FREE:
            raise ConfigError(f"{o.input_line}: {key} is already a config key; drop the '+' "
                              f"({o.input_line[1:]})")


def _lookup(key: str, keys: Dict[str, Key]) -> Optional[Key]:
    """The schema key ``key`` is, or lies inside (a free-form dict takes any key below it)."""
    if key in keys:
        return keys[key]
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        parent = keys.get(".".join(parts[:n]))
        if parent is not None:
            return parent if parent.kind == FREE else None
    return None


def _check_group_option(o: Override, options: List[str]) -> None:
    if o.value_type is not None and o.value_type.name == "GLOB_CHOICE_SWEEP":
        return  # glob(...) picks among the options by itself
    values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
    for value in values:
        if value not in options:
            near = difflib.get_close_matches(value, options, n=1, cutoff=0.6)
            hint = f"did you mean {o.key_or_group}={near[0]}? " if near else ""
            raise ConfigError(f"{o.input_line}: {o.key_or_group} has no config {value!r}; {hint}"
                              f"choose from {', '.join(options)}")


def nearest_keys(key: str, keys: Sequence[str], n: int = 3, cutoff: float = 0.75) -> List[str]:
    """Valid keys nearest to ``key``, best first: a key with the same last part under another
    section (``prune_steps`` -> ``trainer.prune_steps``) scores 1, others by the closer spelling of
    the whole key or of its last part; only those about as close as the best are kept."""
    def leaf(k: str) -> str:
        return k.rsplit(".", 1)[-1]

    def score(k: str) -> float:
        if leaf(k) == leaf(key):
            return 1.0
        return max(difflib.SequenceMatcher(None, key, k).ratio(),
                   difflib.SequenceMatcher(None, leaf(key), leaf(k)).ratio())

    scored = sorted(((score(k), k) for k in keys if k != key), key=lambda sk: -sk[0])
    if not scored or scored[0][0] < cutoff:
        return []
    best = scored[0][0]
    return [k for s, k in scored if s >= max(cutoff, best - 0.05)][:n]


def _suggest(key: str, keys: Dict[str, Key], command: str) -> str:
    near = nearest_keys(key, list(keys))
    if not near:
        return f"`prune {command} --help` lists the keys"
    return "did you mean " + (near[0] if len(near) == 1 else f"{', '.join(near[:-1])} or {near[-1]}") + "?"
