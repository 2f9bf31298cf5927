"""The dotted keys of a config schema (a dataclass such as ``TrainConfig``), each with its kind and
its one-line meaning, read from the comment beside the field in the source. The override check
(``overrides.py``) and ``prune train --help`` both read the keys from here, so neither keeps a
list of its own that could go stale."""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Dict, List

LEAF, SECTION, FREE = "leaf", "section", "free-form dict"  # free-form: any key below it is accepted


@dataclass(frozen=True)
class Key:
    name: str  # dotted, e.g. "pruning.target"
    kind: str  # LEAF, SECTION or FREE
    help: str  # the field's comment in the schema source, "" if it has none


def schema_keys(schema: type, prefix: str = "") -> List[Key]:
    """Every key of ``schema`` in field order, sections before their keys."""
    hints = typing.get_type_hints(schema)
    comments = field_comments(schema)
    keys: List[Key] = []
    for f in dataclasses.fields(schema):
        name, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys.append(Key(name, SECTION, comments.get(f.name, "")))
            keys += schema_keys(hint, f"{name}.")
        else:
            free = typing.get_origin(hint) in (dict, Dict)
            keys.append(Key(name, FREE if free else LEAF, comments.get(f.name, "")))
    return keys


def field_comments(cls: type) -> Dict[str, str]:
    """Field name -> the comment at the end of its line in ``cls``'s source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (e.g. a frozen build): keys without meanings
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: Dict[str, str] = {}
    first_name: Dict[int, str] = {}  # line -> the first name token on it
    for tok in tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline):
        line = tok.start[0]
        if tok.type == tokenize.NAME and line not in first_name:
            first_name[line] = tok.string
        elif tok.type == tokenize.COMMENT and first_name.get(line) in names:
            comments[first_name[line]] = tok.string.lstrip("#").strip()
    return comments
