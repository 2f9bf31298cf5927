"""What the student is trained on, besides the size target: the objective seam of the recipe.

The recipe runs, per batch::

    teacher_out = objective.teacher_output(teacher, batch)            # under no_grad
    student_out = student(batch.waveforms, batch.lengths)             # objective.student_output inside
    loss, logs = objective.loss(student_out, teacher_out, batch)
    loss = loss + lagrangian(...)["penalty"]                           # while pruning

The objective's own trained modules (``modules()``, e.g. distillation heads) are registered in the
student under their names, so they are trained with the encoder's weights (the optimizer's "model"
group), reach DDP with it and are saved in the checkpoint's ``student`` state (``heads.*``).
A new objective (a task loss reading ``batch.labels``) is one subclass here.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ..data.dataset import Batch
from .distill import DistillHeads, distill_loss, frame_mask, projection_as_layer0


class Objective:
    """The loss of a training step (the Lagrangian penalty is the recipe's, added to it)."""

    name = "loss"  # the key of its loss in the logs ("train/<name>" in TensorBoard)

    def modules(self) -> Dict[str, nn.Module]:
        """The modules it trains along with the encoder, by their name in the student."""
        return {}

    def student_output(self, encoder: nn.Module, waveforms: Tensor, lengths: Tensor) -> Any:
        """The student's forward: the encoder and the objective's own layers on its output.
        waveforms (batch, samples), lengths (batch,)."""
        return encoder(waveforms, lengths)

    def after_cut(self, hidden_kept: Optional[List[int]]) -> None:
        """The student was cut; ``hidden_kept``: the positions of the hidden channels it kept (None:
        its hidden dimension is whole). Layers reading the student's hidden states follow them."""

    def teacher_output(self, teacher: nn.Module, batch: Batch) -> Any:
        """What the loss needs from the frozen teacher (called under no_grad); None: nothing."""
        return None

    def loss(self, student_out: Any, teacher_out: Any, batch: Batch) -> Tuple[Tensor, Dict[str, Tensor]]:
        """(the loss to minimise, detached values to log: ``logs[self.name]`` is the loss)."""
        raise NotImplementedError


class Distillation(Objective):
    """Layer-to-layer distillation (DPHuBERT): prediction heads on the student's hidden states,
    an L1 + cosine loss to the teacher's (``prune.train.distill``)."""

    name = "distill"

    def __init__(self, embed_dim: int, layers: Sequence[Sequence[int]], mode: str = "layer2layer",
                 layer0: str = "hidden", cos_weight: float = 1.0, cos_type: str = "raw", reduction: str = "sum",
                 weight: float = 1.0):
        self.heads = DistillHeads(embed_dim, layers, mode)
        self.projection = layer0 == "projection"  # hidden state 0 = the feature projection's output
        self.cos_weight, self.cos_type, self.reduction = cos_weight, cos_type, reduction
        self.weight = weight  # distill.weight: x 1.0 is exact, so the default changes no bit

    @classmethod
    def from_config(cls, d: DictConfig, embed_dim: int) -> "Distillation":
        """From the ``distill`` config group, for a teacher of width ``embed_dim``."""
        return cls(embed_dim, d.layers, d.mode, d.layer0, d.cos_weight, d.cos_type, d.reduction,
                   d.get("weight", 1.0))

    @property
    def layers(self) -> List[int]:
        """The distilled teacher layers, in the order of the per-layer logs (``layer_cos`` ...)."""
        return self.heads.layers

    def modules(self) -> Dict[str, nn.Module]:
        return {"heads": self.heads}

    def after_cut(self, hidden_kept: Optional[List[int]]) -> None:
        """The heads' input columns follow a cut hidden dimension (final distillation continues on it)."""
        if hidden_kept is not None:
            self.heads.keep_inputs(hidden_kept)

    def student_output(self, encoder: nn.Module, waveforms: Tensor, lengths: Tensor) -> Tuple[List[Tensor], Tensor]:
        """(predictions of the distilled layers, each (batch, frames, dim); valid frames (batch,))."""
        with projection_as_layer0(encoder, self.projection):
            hiddens, frames = encoder(waveforms, lengths)
        return self.heads(hiddens), frames

    def teacher_output(self, teacher: nn.Module, batch: Batch) -> List[Tensor]:
        """The teacher's distilled hidden states, each (batch, frames, dim)."""
        with projection_as_layer0(teacher, self.projection):
            hiddens, _ = teacher(batch.waveforms, batch.lengths)
        return [hiddens[i] for i in self.layers]

    def loss(self, student_out: Tuple[List[Tensor], Tensor], teacher_out: List[Tensor],
             batch: Batch) -> Tuple[Tensor, Dict[str, Tensor]]:
        predictions, frames = student_out
        mask = frame_mask(frames, predictions[0].shape[1])
        loss, logs = distill_loss([p.float() for p in predictions], [t.float() for t in teacher_out], mask,
                                  self.cos_weight, self.cos_type, self.reduction)
        loss = self.weight * loss
        logs[self.name] = loss.detach()
        return loss, logs


# ---------------------------------------------------------------------------- task objectives (#16)
class Task(Objective):
    """A downstream task (``prune.train.task``: ``ctc`` or ``classify``) on the student's hidden
    states, optionally with distillation: ``task.weight x task loss + distill.weight x distillation``
    (``distillation`` None when distill.weight is 0: then the teacher is not run at all).

    The targets come from ``batch.ids`` (utterance ids) through ``targets`` (id -> class or token
    ids, every train and valid utterance, checked before any compute). Logs: ``task`` (the task
    loss), ``distill`` (if distilling) and ``loss`` (the weighted sum)."""

    name = "loss"

    def __init__(self, kind: str, head: nn.Module, targets: Dict[str, Any], weight: float = 1.0,
                 distillation: Optional[Distillation] = None):
        self.kind, self.head, self.targets, self.weight = kind, head, targets, weight
        self.distillation = distillation

    @property
    def layers(self) -> List[int]:
        return self.distillation.layers if self.distillation is not None else []

    def after_cut(self, hidden_kept: Optional[List[int]]) -> None:
        """A cut hidden dimension: the head reads the kept channels as the gated student's zeros
        and values (``LayerMix.keep_inputs``), the distillation heads their kept columns."""
        if hidden_kept is not None:
            self.head.mix.keep_inputs(hidden_kept, self.head.linear.in_features)
        if self.distillation is not None:
            self.distillation.after_cut(hidden_kept)

    def modules(self) -> Dict[str, nn.Module]:
        own = {"task_head": self.head}
        return {**own, **(self.distillation.modules() if self.distillation is not None else {})}

    def student_output(self, encoder: nn.Module, waveforms: Tensor, lengths: Tensor
                       ) -> Tuple[Tensor, Tensor, Optional[List[Tensor]]]:
        """(the head's output: (batch, frames, classes) log-probabilities for ctc, (batch, classes)
        logits for classify; valid frames (batch,); the distillation predictions or None). One
        encoder pass serves both (with distill.layer0=projection the head's hidden state 0 is the
        projection's output too)."""
        d = self.distillation
        with projection_as_layer0(encoder, d is not None and d.projection):
            hiddens, frames = encoder(waveforms, lengths)
        return self.head(hiddens, frames), frames, (d.heads(hiddens) if d is not None else None)

    def teacher_output(self, teacher: nn.Module, batch: Batch) -> Optional[List[Tensor]]:
        return self.distillation.teacher_output(teacher, batch) if self.distillation is not None else None

    def batch_targets(self, batch: Batch) -> List[Any]:
        if batch.ids is None:
            raise ValueError("a task objective needs the batch's utterance ids (collate(items, ids))")
        return [self.targets[uid] for uid in batch.ids]

    def loss(self, student_out: Tuple[Tensor, Tensor, Optional[List[Tensor]]], teacher_out: Any,
             batch: Batch) -> Tuple[Tensor, Dict[str, Tensor]]:
        from .task import task_loss

        output, frames, predictions = student_out
        task = task_loss(self.kind, output, frames, self.batch_targets(batch))
        loss, logs = self.weight * task, {"task": task.detach()}
        if self.distillation is not None:
            distill, parts = self.distillation.loss((predictions, frames), teacher_out, batch)
            loss = loss + distill
            logs.update(parts)
        logs[self.name] = loss.detach()
        return loss, logs

    def counts(self, student_out: Tuple[Tensor, Tensor, Any], batch: Batch) -> Tuple[float, float]:
        """The metric's (numerator, denominator) on a batch (``prune.train.task.task_counts``)."""
        from .task import task_counts

        output, frames, _ = student_out
        return task_counts(self.kind, output, frames, self.batch_targets(batch))


def build_objective(cfg: DictConfig, embed_dim: int, num_hiddens: int, vocab: Any = None,
                    targets: Optional[Dict[str, Any]] = None) -> Objective:
    """The run's objective: distillation alone (``task.kind: none``), or the task (with
    distillation unless distill.weight is 0). ``vocab``/``targets``: from ``task.load_targets``."""
    t = cfg.get("task")
    if t is None or t.kind == "none":
        return Distillation.from_config(cfg.distill, embed_dim)
    from .task import build_head

    with torch.random.fork_rng():  # the head's init must not move the run's random stream
        torch.manual_seed(cfg.trainer.seed)
        head = build_head(t.kind, num_hiddens, embed_dim, vocab, t.layer, t.pooling)
    distillation = Distillation.from_config(cfg.distill, embed_dim) if cfg.distill.weight > 0 else None
    return Task(t.kind, head, targets, t.weight, distillation)
