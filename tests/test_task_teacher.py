"""The teacher stage (#16, task.finetune_teacher_steps; DiariZen's order): the unpruned teacher is
fine-tuned on the task first, then is both the frozen distillation teacher and the gated student's
start, its head carried into pruning; a kill mid-stage resumes to a byte-identical export
(with seeded augmentation on), inspect names the stage, the report records the teacher's metric."""

import json
import signal

import torch
from helpers_train import noise_corpus, prune_cli, short_run_args

from prune.train.checkpoint import load_checkpoint
from prune.train.config import ConfigError, compose, validate
from prune.train.student import load_teacher
from prune.train.task import HEAD_FILE, INFO_FILE
from test_task_runs import voice_labels

TEACHER_STEPS = 8


def test_teacher_stage_then_pruning_resumes_byte_identical_after_a_kill_mid_stage(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus")
    labels = voice_labels(tmp_path, train, valid)

    def args(run):
        base = short_run_args(train, valid, run, prune_steps=10, final_steps=6, extra=[
            "task=classify", f"task.labels={labels}", f"task.finetune_teacher_steps={TEACHER_STEPS}",
            "data.augment.enabled=true", "data.valid_augment=true", "trainer.keep_last=20"])
        return [a for a in base if not a.startswith("trainer.ckpt_every=")] + ["trainer.ckpt_every=5"]

    reference, run = tmp_path / "reference", tmp_path / "run"
    done = prune_cli(args(reference))
    assert done.returncode == 0, done.stderr[-3000:]
    killed = prune_cli(args(run), env={"PRUNE_FAULT": "mid_step:7"})  # in the teacher stage
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    inspect = prune_cli(["inspect", str(run / "checkpoints" / "step_00000005.pt")])
    assert inspect.returncode == 0 and "step 5, teacher stage: fine-tuning the unpruned teacher" in inspect.stdout
    assert f"{TEACHER_STEPS} teacher fine-tuning + 10 pruning + 6 final steps" in inspect.stdout
    resumed = prune_cli(["resume", str(run)])
    assert resumed.returncode == 0 and "resumed from step 5 (stage teacher)" in resumed.stderr, resumed.stderr[-3000:]
    for name in ("model.safetensors", HEAD_FILE, INFO_FILE):
        assert (reference / "export" / name).read_bytes() == (run / "export" / name).read_bytes(), name
    # the stage boundary: the fine-tuned teacher is the distillation teacher and the student's start
    teacher_end = load_checkpoint(reference / "checkpoints" / f"step_{TEACHER_STEPS:08d}.pt")
    in_stage = load_checkpoint(reference / "checkpoints" / "step_00000005.pt")
    assert teacher_end["stage"] == "prune" and in_stage["stage"] == "teacher" and "teacher" not in in_stage
    tuned = teacher_end["teacher"]
    gated = {k[len("encoder.model."):]: v for k, v in teacher_end["student"].items() if k.startswith("encoder.model.")}
    assert gated.keys() == tuned.keys() and all(torch.equal(gated[k], tuned[k]) for k in tuned)
    original = load_teacher(compose("tiny_demo", [f"data.train_manifest={train}"]).teacher).state_dict()
    assert any(not torch.equal(original[k], tuned[k]) for k in tuned)  # fine-tuned, not the teacher as loaded
    heads = {k: v for k, v in teacher_end["student"].items() if k.startswith("task_head.")}
    # the head the teacher stage trained goes on into pruning (moved on since step 5, not a fresh one)
    assert heads and any(not torch.equal(heads[k], in_stage["student"][k]) for k in heads)
    a, b = (json.loads((r / "report.json").read_text()) for r in (reference, run))
    assert a["history"] == b["history"] and a["task"] == b["task"]
    point = a["task"]["points"]["fine-tuned teacher"]
    assert point["step"] == TEACHER_STEPS and point["stage"] == "teacher"
    assert a["task"]["teacher_metric"] == point["valid_metric"]
    assert f"fine-tuned teacher: valid accuracy {point['valid_metric']:.4f}" in (reference / "report.txt").read_text()
    assert a["steps"] == TEACHER_STEPS + 10 + 6


def test_finetune_teacher_steps_is_checked_before_compute(tmp_path):
    train, valid = noise_corpus(tmp_path, n_train=2, n_valid=1)
    labels = voice_labels(tmp_path, train, valid)
    base = [f"data.train_manifest={train}", "optim.warmup_steps=2"]
    for overrides, message in [
        (["task.finetune_teacher_steps=10"], "task.finetune_teacher_steps: 10 fine-tunes the teacher on a task, "
                                              "but task: none has none"),
        (["task=ctc", f"task.labels={labels}", "task.finetune_teacher_steps=-1"],
         "task.finetune_teacher_steps: must be >= 0, got -1"),
        (["task=ctc", f"task.labels={labels}", "task.finetune_teacher_steps=3"],
         "task.finetune_teacher_steps=3: the teacher stage warms its lr up over optim.warmup_steps=2"),
    ]:
        try:
            validate(compose("tiny_demo", base + overrides))
        except ConfigError as e:
            assert message in str(e) and "\n" not in str(e), str(e)
        else:
            raise AssertionError(f"{overrides} passed")
