"""The objective seam of the recipe (prune.train.objective) and the named Batch: distillation as
an objective, its heads under their checkpoint names, another objective plugged into the recipe
with the Lagrangian added to it."""

import pytest
import torch
import torch.nn.functional as F
from helpers_train import noise_corpus
from torch import nn

from prune.data.dataset import Batch
from prune.models import build_preset
from prune.structures import GatedEncoder
from prune.train.config import compose, validate
from prune.train.distill import DistillHeads, distill_loss, frame_mask
from prune.train.objective import Distillation, Objective
from prune.train.recipe import PruneRecipe, Student


def _batch():
    lengths = torch.tensor([6000, 4000])
    waveforms = torch.randn(2, 6000) * 0.1
    waveforms[1, 4000:] = 0.0
    return Batch(waveforms, lengths)


def test_a_batch_names_its_fields_and_moves_its_tensors():
    batch = _batch()._replace(labels=torch.tensor([1, 0]), ids=["a.flac", "b.flac"])
    assert batch.waveforms.shape == (2, 6000) and batch.lengths.tolist() == [6000, 4000]
    moved = batch.to("meta")
    assert {moved.waveforms.device.type, moved.lengths.device.type, moved.labels.device.type} == {"meta"}
    assert moved.ids == ["a.flac", "b.flac"] and _batch().to("meta").labels is None


def test_distillation_is_the_old_loss_and_keeps_the_heads_checkpoint_keys():
    torch.manual_seed(0)
    teacher = build_preset("hubert_base_tiny").eval()
    gated = GatedEncoder(build_preset("hubert_base_tiny")).eval()
    gated.model.load_state_dict(teacher.state_dict())
    objective = Distillation(teacher.config.encoder_embed_dim, [[0], [1, 2]], cos_weight=0.5, cos_type="log_sig")
    student = Student(gated, objective)
    # the layout of checkpoints written before the objective seam: encoder.* and the heads' heads.*
    heads = DistillHeads(teacher.config.encoder_embed_dim, [[0], [1, 2]])
    old = {**{f"encoder.{k}": v for k, v in gated.state_dict().items()},
           **{f"heads.{k}": v for k, v in heads.state_dict().items()}}
    assert set(student.state_dict()) == set(old)
    student.load_state_dict(old)  # strict
    assert {id(p) for p in objective.heads.parameters()} <= {id(p) for p in student.parameters()}

    batch = _batch()
    with torch.no_grad():
        teacher_out = objective.teacher_output(teacher, batch)
        student_out = student(batch.waveforms, batch.lengths)
        loss, logs = objective.loss(student_out, teacher_out, batch)
        hiddens, _ = teacher(batch.waveforms, batch.lengths)
        predictions, frames = objective.heads(gated(batch.waveforms, batch.lengths)[0]), student_out[1]
        by_hand, _ = distill_loss(predictions, [hiddens[i] for i in (0, 1, 2)],
                                  frame_mask(frames, predictions[0].shape[1]), 0.5, "log_sig")
    assert loss.item() == pytest.approx(by_hand.item()) and logs["distill"].item() == loss.item()
    assert logs["layer_cos"].shape == (3,) and objective.layers == [0, 1, 2]

    projection = Distillation(teacher.config.encoder_embed_dim, [[0]], layer0="projection")
    with torch.no_grad():
        tapped = projection.teacher_output(teacher, batch)[0]
        features, _ = teacher.feature_extractor(teacher.prepare_waveforms(batch.waveforms), batch.lengths)
        expected = teacher.encoder.feature_projection(features)
    torch.testing.assert_close(tapped, expected)
    with torch.no_grad():
        assert not torch.allclose(objective.teacher_output(teacher, batch)[0], expected)  # "hidden": another tensor


class UtteranceClasses(Objective):
    """A task loss: classify each utterance from its mean last hidden state (labels (batch,))."""

    name = "task"

    def __init__(self, dim: int, classes: int):
        self.classifier = nn.Linear(dim, classes)

    def modules(self):
        return {"classifier": self.classifier}

    def student_output(self, encoder, waveforms, lengths):
        hiddens, frames = encoder(waveforms, lengths)
        return self.classifier(hiddens[-1].mean(1))

    def loss(self, student_out, teacher_out, batch):
        loss = F.cross_entropy(student_out, batch.labels)
        return loss, {self.name: loss.detach()}


def test_another_objective_trains_its_modules_and_gets_the_lagrangian_added(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=4, n_valid=2)
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", "trainer.prune_steps=10", "trainer.final_steps=4",
                                "pruning.warmup_steps=5", "optim.warmup_steps=2", "logging.tensorboard=false"])
    validate(cfg)
    recipe = PruneRecipe(cfg, tmp_path / "run")
    recipe.setup()
    task = UtteranceClasses(recipe.source_config.encoder_embed_dim, 3)
    recipe.objective = task
    recipe._set_student(Student(recipe.student.encoder, task))
    with torch.no_grad():
        recipe.lagrangian.lambda1.fill_(2.0)
    recipe.step = 10
    batch = _batch()._replace(labels=torch.tensor([2, 0]))
    loss, parts = recipe._loss(batch)
    assert set(parts) == {"task", "penalty", "expected_sparsity", "expected_size"}
    assert loss.item() == pytest.approx((parts["task"] + parts["penalty"]).item())
    assert parts["penalty"].item() != 0.0
    model_group = next(g for g in recipe.optimizer.param_groups if g["name"] == "model")
    assert {id(p) for p in task.classifier.parameters()} <= {id(p) for p in model_group["params"]}
    assert "classifier.weight" in recipe._state()["student"]
    recipe.cleanup()
