"""A phone-recognition probe (SUPERB PR style): a light CTC head on frozen features, reported as
phone error rate. It tells what pruning cost in what the encoder knows about speech.

    per = phone_probe(model, "data/demo_corpus")["valid_per"]

Features: every hidden state of the frozen encoder, each normalised (LayerNorm without affine),
mixed by learned softmax weights, then one Linear to the phones + CTC blank. Features are
computed once; only the mixing weights and the Linear are trained.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import Wav2Vec2Model
from ..data.audio import load_audio
from ..data.manifest import read_manifest

BLANK = 0


def read_phones(path: Path) -> Dict[str, List[str]]:
    """transcripts.tsv (header: id, voice, text, phones; phones space-separated) -> id -> phones."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "phones" not in rows[0] or "id" not in rows[0]:
        raise ValueError(f"{path}: expected a header with 'id' and 'phones' columns")
    return {row["id"]: row["phones"].split() for row in rows}


def phone_vocab(phones: Dict[str, List[str]]) -> Dict[str, int]:
    """Every phone of the transcripts -> class id (1..; 0 is the CTC blank)."""
    return {p: k + 1 for k, p in enumerate(sorted({p for seq in phones.values() for p in seq}))}


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def greedy_decode(log_probs: Tensor, length: int) -> List[int]:
    """log_probs: (frames, classes) -> label ids: best path, repeats merged, blanks dropped."""
    best = log_probs[:length].argmax(-1).tolist()
    out, last = [], None
    for k in best:
        if k != last and k != BLANK:
            out.append(k)
        last = k
    return out


class ProbeHead(nn.Module):
    """Softmax-weighted sum of normalised layers -> Linear to classes (blank = 0)."""

    def __init__(self, num_layers: int, dim: int, num_classes: int):
        super().__init__()
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        """features: (layers, frames, dim) -> log-probabilities (frames, classes)"""
        normed = F.layer_norm(features, features.shape[-1:])
        mixed = (torch.softmax(self.layer_logits, 0)[:, None, None] * normed).sum(0)
        return torch.log_softmax(self.linear(mixed), -1)


@torch.no_grad()
def utterance_features(featurize: Callable[[Tensor], Tensor], manifest_path: Path, phones: Dict[str, List[str]]
                       ) -> List[Tuple[Tensor, List[str]]]:
    """``featurize(wave)`` -> (layers, frames, dim) and the phone string, for every manifest file
    with a transcript."""
    manifest = read_manifest(manifest_path)
    out = []
    for i, (rel, _) in enumerate(manifest.entries):
        key = Path(rel).stem
        if key in phones:
            out.append((featurize(load_audio(manifest.path(i))), phones[key]))
    if not out:
        raise ValueError(f"{manifest_path}: no file has a transcript")
    return out


def encoder_layers(model: Wav2Vec2Model) -> Callable[[Tensor], Tensor]:
    """wave (samples,) -> every hidden state of ``model``, (layers, frames, dim)."""
    def featurize(wave: Tensor) -> Tensor:
        hiddens, _ = model(wave[None])
        return torch.stack([h[0] for h in hiddens])
    return featurize


def fit_probe(train: List[Tuple[Tensor, List[str]]], valid: List[Tuple[Tensor, List[str]]], vocab: Dict[str, int],
              steps: int = 1000, lr: float = 1e-2, seed: int = 0, batch_size: int = 8) -> Dict[str, float]:
    """Train a ``ProbeHead`` with CTC on ``train`` ((layers, frames, dim) features, phones);
    return phone error rates (greedy decoding) on both sets and the last CTC loss."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = ProbeHead(train[0][0].shape[0], train[0][0].shape[-1], len(vocab) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        batch = [train[i] for i in torch.randperm(len(train), generator=g)[:batch_size].tolist()]
        log_probs = [head(f) for f, _ in batch]
        targets = [torch.tensor([vocab[p] for p in seq]) for _, seq in batch]
        loss = F.ctc_loss(nn.utils.rnn.pad_sequence(log_probs),  # (frames, batch, classes)
                          torch.cat(targets), torch.tensor([lp.shape[0] for lp in log_probs]),
                          torch.tensor([len(t) for t in targets]), blank=BLANK, zero_infinity=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    @torch.no_grad()
    def per(data: List[Tuple[Tensor, List[str]]]) -> float:
        errors = sum(edit_distance(greedy_decode(head(f), f.shape[1]), [vocab[p] for p in seq]) for f, seq in data)
        return errors / sum(len(seq) for _, seq in data)

    return {"train_per": per(train), "valid_per": per(valid), "first_ctc_loss": losses[0],
            "final_ctc_loss": losses[-1]}


Features = List[Tuple[Tensor, List[str]]]


def corpus_features(featurize: Callable[[Tensor], Tensor], corpus: Path) -> Tuple[Features, Features, Dict[str, int]]:
    """``featurize`` over ``corpus/train.tsv`` and ``corpus/valid.tsv`` (the layout
    ``scripts/make_demo_corpus.py`` writes) -> (train, valid, phone vocabulary), for ``fit_probe``:
    computed once, they serve several probe seeds."""
    corpus = Path(corpus)
    phones = read_phones(corpus / "transcripts.tsv")
    train = utterance_features(featurize, corpus / "train.tsv", phones)
    valid = utterance_features(featurize, corpus / "valid.tsv", phones)
    return train, valid, phone_vocab(phones)


def phone_probe(model: Wav2Vec2Model, corpus: Path, steps: int = 1000, lr: float = 1e-2,
                seed: Union[int, Sequence[int]] = 0) -> Dict[str, Any]:
    """Train the probe on ``corpus/train.tsv``, report phone error rates on train and
    ``corpus/valid.tsv``.

    ``seed``: one probe seed, or several: the features are computed once, one probe is trained
    per seed, and the rates are the means (``*_by_seed`` and ``valid_per_std`` give the spread).
    Reports that share their seeds can be compared; the probe's own noise is of the size of the
    differences pruning makes on the demo corpus."""
    train, valid, vocab = corpus_features(encoder_layers(model.eval()), corpus)
    seeds = [seed] if isinstance(seed, int) else [int(s) for s in seed]
    runs = [fit_probe(train, valid, vocab, steps, lr, s) for s in seeds]
    out: Dict[str, Any] = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
    if len(seeds) > 1:
        valid_pers = [r["valid_per"] for r in runs]
        out.update(seeds=seeds, valid_per_by_seed=valid_pers, train_per_by_seed=[r["train_per"] for r in runs],
                   valid_per_std=statistics.stdev(valid_pers))
    return {**out, "train_files": len(train), "valid_files": len(valid)}
