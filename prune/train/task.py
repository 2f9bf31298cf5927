"""Downstream tasks on the encoder's hidden states: the heads, their losses and metrics, and the
files they are saved as beside an export.

- ``ctc``: a linear CTC head on a learned softmax-weighted sum of every (normalised) hidden state
  (SUPERB style) or on one layer; greedy decoding; error rate by edit distance (PER / CER / WER
  by the labels' tokenisation; ``prune.evaluate.probe``'s edit distance and decoder).
- ``classify``: mean (or attentive) pooling over the valid frames, a linear head, cross-entropy,
  accuracy.

Saved as ``EXPORT/task_head.safetensors`` (the head's weights) + ``EXPORT/task.json`` (kind,
settings, vocabulary); ``prune.load_pruned`` ignores both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.labels import Vocabulary
from ..evaluate.probe import edit_distance, greedy_decode
from ..models.components import widen
from .distill import frame_mask

HEAD_FILE = "task_head.safetensors"
INFO_FILE = "task.json"
POOLINGS = ("mean", "attentive")


class LayerMix(nn.Module):
    """The head's input: one hidden state (``layer``), or a softmax-weighted sum of all of them,
    each normalised (LayerNorm without affine) so that no layer dominates by its scale."""

    def __init__(self, num_hiddens: int, layer: Optional[int] = None):
        super().__init__()
        self.layer = layer
        self.layer_logits = nn.Parameter(torch.zeros(num_hiddens if layer is None else 1))
        self.width: Optional[int] = None  # after keep_inputs: the unpruned hidden size
        self.register_buffer("inputs", None)  # after keep_inputs: (kept,) positions of the kept channels

    def keep_inputs(self, index: Sequence[int], width: int) -> None:
        """After a cut of the hidden dimension the hidden states hold only the kept channels
        (``index``: their positions among ``width``). The gated student's removed channels were
        exact zeros, and the LayerNorm here counted them (a removed channel's normalised value is
        not zero), so they are put back as zeros before anything reads them: the head computes
        what it computed on the gated student, with its weights unchanged."""
        # on the head's device: a cut mid-run (on CUDA) comes after the head was moved there
        self.inputs = torch.as_tensor(list(index), dtype=torch.long, device=self.layer_logits.device)
        self.width = int(width)

    def _widen(self, h: Tensor) -> Tensor:
        """(batch, frames, kept) -> (batch, frames, width), zeros at the removed channels."""
        return widen(h, self.inputs, self.width)

    def forward(self, hiddens: Sequence[Tensor]) -> Tensor:
        """hiddens: each (batch, frames, dim) -> (batch, frames, dim) (dim: the unpruned width)"""
        if self.layer is not None:
            return self._widen(hiddens[self.layer])
        weights = torch.softmax(self.layer_logits, 0)
        return sum(w * F.layer_norm(x, x.shape[-1:]) for w, x in zip(weights, map(self._widen, hiddens)))


class CTCHead(nn.Module):
    """LayerMix -> Linear to the vocabulary (blank = 0)."""

    def __init__(self, num_hiddens: int, dim: int, num_classes: int, layer: Optional[int] = None):
        super().__init__()
        self.mix = LayerMix(num_hiddens, layer)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, hiddens: Sequence[Tensor], frames: Tensor) -> Tensor:
        """-> log-probabilities (batch, frames, classes)"""
        return torch.log_softmax(self.linear(self.mix(hiddens)).float(), -1)


class ClassifyHead(nn.Module):
    """LayerMix -> pooling over the valid frames (mean, or attentive: softmax of a learned score
    per frame) -> Linear to the classes."""

    def __init__(self, num_hiddens: int, dim: int, num_classes: int, layer: Optional[int] = None,
                 pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"task.pooling: must be one of {POOLINGS}, got {pooling!r}")
        self.mix = LayerMix(num_hiddens, layer)
        self.pooling = pooling
        self.score = nn.Linear(dim, 1) if pooling == "attentive" else None
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, hiddens: Sequence[Tensor], frames: Tensor) -> Tensor:
        """frames (batch,) valid frames -> logits (batch, classes)"""
        x = self.mix(hiddens)
        mask = frame_mask(frames, x.shape[1])  # (batch, frames)
        if self.score is None:
            weights = mask.to(x.dtype) / mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
        else:
            weights = torch.softmax(self.score(x).squeeze(-1).masked_fill(~mask, float("-inf")), 1)
        return self.linear((weights.unsqueeze(-1) * x).sum(1)).float()


TaskHead = Union[CTCHead, ClassifyHead]
Target = Union[int, List[int]]


def build_head(kind: str, num_hiddens: int, dim: int, vocab: Vocabulary, layer: Optional[int] = None,
               pooling: str = "mean") -> TaskHead:
    if kind == "ctc":
        return CTCHead(num_hiddens, dim, len(vocab), layer)
    return ClassifyHead(num_hiddens, dim, len(vocab), layer, pooling)


def metric_name(kind: str, column: str, tokens: str) -> str:
    """PER (phones), CER (characters), WER (words) for ctc; accuracy for classify."""
    if kind == "classify":
        return "accuracy"
    return "PER" if column == "phones" else "CER" if tokens == "chars" else "WER"


def task_loss(kind: str, output: Tensor, frames: Tensor, targets: Sequence[Target]) -> Tensor:
    """CTC (blank 0, zero_infinity, mean over the batch of per-target-length losses) or cross-entropy.
    output: (batch, frames, classes) log-probabilities, or (batch, classes) logits."""
    if kind == "ctc":
        flat = torch.tensor([t for seq in targets for t in seq], dtype=torch.long, device=output.device)
        target_lengths = torch.tensor([len(seq) for seq in targets], dtype=torch.long, device=output.device)
        return F.ctc_loss(output.transpose(0, 1), flat, frames, target_lengths, blank=0, zero_infinity=True)
    return F.cross_entropy(output, torch.tensor(list(targets), dtype=torch.long, device=output.device))


@torch.no_grad()
def task_counts(kind: str, output: Tensor, frames: Tensor, targets: Sequence[Target]) -> Tuple[float, float]:
    """(numerator, denominator) of the metric over a batch: (edit errors, reference tokens) for
    ctc (greedy decoding), (correct, utterances) for classify."""
    if kind == "ctc":
        errors = sum(edit_distance(greedy_decode(lp, int(n)), seq) for lp, n, seq in zip(output.cpu(), frames, targets))
        return float(errors), float(sum(len(seq) for seq in targets))
    correct = (output.argmax(-1).cpu() == torch.tensor(list(targets))).sum().item()
    return float(correct), float(len(targets))


def save_task_files(folder: Path, head: TaskHead, info: Dict[str, Any]) -> None:
    """Write the head's weights and ``info`` (kind, settings, vocabulary) into ``folder`` (the
    export's temporary folder: renamed into place with it)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(folder / HEAD_FILE))
    with open(folder / INFO_FILE, "w") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)


def task_record(task: Mapping[str, Any], distill_weight: float, history: Sequence[Mapping[str, Any]],
                classes: int) -> Dict[str, Any]:
    """What task.json records of a run's task (besides the head's shape): its settings and the
    validation metric at each named point of ``history`` (the run's, or a checkpoint's)."""
    points = {e["point"]: {k: e[k] for k in ("step", "stage", "valid_task_loss", "valid_metric")}
              for e in history if "point" in e and "valid_metric" in e}
    return {"kind": task["kind"], "labels": task["labels"], "column": task["column"], "tokens": task["tokens"],
            "layer": task["layer"], "pooling": task["pooling"], "weight": task["weight"],
            "distill_weight": distill_weight, "metric": metric_name(task["kind"], task["column"], task["tokens"]),
            "higher_is_better": task["kind"] == "classify", "classes": classes, "points": points,
            # the reference a pruned model's metric is read against (task.finetune_teacher_steps > 0)
            "teacher_metric": points.get("fine-tuned teacher", {}).get("valid_metric"),
            "valid_metric": points["end"]["valid_metric"] if "end" in points else None}


def task_writer(head: TaskHead, record: Dict[str, Any], num_hiddens: int, vocab: Vocabulary):
    """The callable that writes ``head`` + its task.json (``record`` and the head's shape) into an
    export's temporary folder (``prune.checkpoints.convert.write_model``'s ``extra``)."""
    info = {**record, "num_hiddens": num_hiddens, "dim": head.linear.in_features, "vocabulary": vocab.to_dict(),
            # the kept channels' positions in dim when the hidden dimension was cut (LayerMix.keep_inputs)
            "hidden_kept": None if head.mix.inputs is None else head.mix.inputs.tolist()}
    return lambda folder: save_task_files(folder, head, info)


def load_task_head(folder: Union[str, Path]) -> Tuple[TaskHead, Dict[str, Any], Vocabulary]:
    """The task head saved beside an export (``save_task_files``): (head in eval mode, info, vocabulary)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / INFO_FILE).is_file() or not (folder / HEAD_FILE).is_file():
        raise ValueError(f"{folder} has no task head ({INFO_FILE} + {HEAD_FILE}); it is written by a run with "
                         f"task=ctc or task=classify (prune train / prune finetune)")
    info = json.loads((folder / INFO_FILE).read_text())
    vocab = Vocabulary.from_dict(info["vocabulary"])
    head = build_head(info["kind"], info["num_hiddens"], info["dim"], vocab, info.get("layer"), info.get("pooling", "mean"))
    if info.get("hidden_kept") is not None:  # a model with a cut hidden dimension
        head.mix.keep_inputs(info["hidden_kept"], info["dim"])
    head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    return head.eval(), info, vocab


def load_targets(label_file: Union[str, Path], column: str, kind: str, tokens: str, train_ids: Sequence[str],
                 valid_ids: Sequence[str], train_name: str, valid_name: str
                 ) -> Tuple[Vocabulary, Dict[str, Target]]:
    """(the vocabulary of the training split, every train and valid utterance's encoded target),
    or a ``LabelError`` naming the label file's line: a utterance missing from it, an empty label,
    a valid label/token the training split never has, a duplicate id, a missing column."""
    from ..data.labels import read_labels, split_targets

    labels = read_labels(label_file, column)
    vocab = Vocabulary.build([labels[i].value for i in train_ids if i in labels], kind, tokens)
    targets = split_targets(labels, train_ids, vocab, label_file, train_name)
    targets.update(split_targets(labels, valid_ids, vocab, label_file, valid_name))
    return vocab, targets
