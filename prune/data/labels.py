"""Task labels: a TSV keyed by utterance id, and the vocabulary built from the training split.

Format (the demo corpus's ``transcripts.tsv``)::

    id<TAB>voice<TAB>text<TAB>phones          <- header: ``id`` and the label columns
    0000_en-us<TAB>en-us<TAB>Sarah said ...<TAB>s ɛ ɹ ə ...

An utterance's id is its manifest path's file name without the extension
(``Manifest.utterance_id``). A label is a class (``classify``: the whole value) or a token
sequence (``ctc``: the value split on spaces, or into characters). Every problem is a
``LabelError`` naming the file and line, raised before any compute.

    labels = read_labels("transcripts.tsv", "phones")          # id -> (value, line)
    vocab = Vocabulary.build(train_values, "ctc", "spaces")      # blank at 0
    vocab.encode("s ɛ ɹ", where="transcripts.tsv:2")             # -> [ids]
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Sequence, Tuple, Union

from .textfile import read_text

KINDS = ("ctc", "classify")
TOKENS = ("spaces", "chars")
BLANK = "<blank>"  # the CTC blank, class 0


class LabelError(ValueError):
    """A label file that cannot be used; the message names the file (and line) at fault."""


class Label(NamedTuple):
    value: str  # the column's text, stripped
    line: int  # 1-based line in the label file (for messages)


def read_labels(path: Union[str, Path], column: str) -> Dict[str, Label]:
    """``path``'s ``column`` by utterance id. Raises ``LabelError`` for a missing file or column,
    a duplicate id, an empty value or a short row."""
    path = Path(path)
    text = read_text(path, "label file", LabelError)
    rows = list(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or not rows[0]:
        raise LabelError(f"{path}:1: expected a header line with an 'id' column and label columns, got an empty line")
    header = [h.strip() for h in rows[0]]
    if "id" not in header:
        raise LabelError(f"{path}:1: the header has no 'id' column (columns: {', '.join(header)})")
    if column not in header:
        raise LabelError(f"{path}:1: no column {column!r} (task.column); the header has: "
                         f"{', '.join(h for h in header if h != 'id')}")
    id_at, value_at = header.index("id"), header.index(column)
    labels: Dict[str, Label] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) <= max(id_at, value_at):
            raise LabelError(f"{path}:{line}: {len(row)} tab-separated fields, the header has {len(header)}")
        uid, value = row[id_at].strip(), row[value_at].strip()
        if not uid:
            raise LabelError(f"{path}:{line}: empty id")
        if uid in labels:
            raise LabelError(f"{path}:{line}: duplicate id {uid!r} (first at line {labels[uid].line})")
        if not value:
            raise LabelError(f"{path}:{line}: utterance {uid!r} has an empty {column!r}")
        labels[uid] = Label(value, line)
    if not labels:
        raise LabelError(f"{path}: no labels after the header")
    return labels


def tokenize(value: str, tokens: str) -> List[str]:
    """A CTC target's tokens: split on whitespace ("spaces": phones, words), or every character
    ("chars", spaces kept as "|" so word boundaries are a token, as wav2vec 2.0's letters)."""
    if tokens == "spaces":
        return value.split()
    if tokens == "chars":
        return ["|" if c.isspace() else c for c in " ".join(value.split())]
    raise ValueError(f"task.tokens: must be one of {TOKENS}, got {tokens!r}")


@dataclass(frozen=True)
class Vocabulary:
    """The classes of a task: ``ctc``: BLANK at 0, then the training split's tokens sorted;
    ``classify``: the training split's labels sorted."""

    kind: str
    tokens: str  # spaces | chars (ctc); ignored for classify
    symbols: Tuple[str, ...]

    @classmethod
    def build(cls, values: Iterable[str], kind: str, tokens: str = "spaces") -> "Vocabulary":
        if kind == "ctc":
            return cls(kind, tokens, (BLANK, *sorted({t for v in values for t in tokenize(v, tokens)})))
        return cls(kind, tokens, tuple(sorted(set(values))))

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, value: str, where: str) -> Union[int, List[int]]:
        """A label -> its class (classify) or token ids (ctc); ``where`` names it in the error."""
        index = {s: i for i, s in enumerate(self.symbols)}
        if self.kind == "classify":
            if value not in index:
                raise LabelError(f"{where}: label {value!r} does not occur in the training split, so the head has "
                                 f"no class for it (training labels: {', '.join(self.symbols[:12])}"
                                 f"{', ...' if len(self.symbols) > 12 else ''})")
            return index[value]
        ids = []
        for token in tokenize(value, self.tokens):
            if token not in index or token == BLANK:
                raise LabelError(f"{where}: token {token!r} does not occur in the training split's labels, so the "
                                 f"CTC head has no class for it; add utterances with it to training or drop this one")
            ids.append(index[token])
        return ids

    def decode(self, ids: Sequence[int]) -> List[str]:
        return [self.symbols[i] for i in ids]

    def to_dict(self) -> Dict[str, object]:
        return {"kind": self.kind, "tokens": self.tokens, "symbols": list(self.symbols)}

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "Vocabulary":
        return cls(str(d["kind"]), str(d["tokens"]), tuple(d["symbols"]))


def split_targets(labels: Dict[str, Label], ids: Sequence[str], vocab: Vocabulary, label_file: Union[str, Path],
                  split: str) -> Dict[str, Union[int, List[int]]]:
    """Every id of a split (``split`` names its manifest in messages) -> its encoded target.
    A missing utterance or an unknown label/token is a ``LabelError``."""
    missing = [uid for uid in ids if uid not in labels]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LabelError(f"{label_file}: no label for utterance {missing[0]!r} of {split}{more}; every utterance "
                         f"of the manifests needs a row (id = the file name without extension)")
    out: Dict[str, Union[int, List[int]]] = {}
    for uid in ids:
        target = vocab.encode(labels[uid].value, f"{label_file}:{labels[uid].line} (utterance {uid!r} of {split})")
        if vocab.kind == "ctc" and not target:
            raise LabelError(f"{label_file}:{labels[uid].line}: utterance {uid!r} has no tokens")
        out[uid] = target
    return out
