"""Task runs end to end (#16): task-aware pruning with a CTC head, fine-tuning a checkpoint for
speaker ID, resume mid-run of a task run, the frozen extractor, and task: none unchanged.

The trained heads are read against floors: the six-voice valid split's majority class is 8 of 28
(0.286), a random-init CTC head's PER is about 1 or more."""

import json
import shutil
import signal

import pytest
import torch
from helpers_train import DEMO_CORPUS, REPO, noise_corpus, prune_cli, short_run_args, voice_labels
from safetensors.torch import load_file, save_file

from prune.checkpoints import load_pruned, read_export_info
from prune.evaluate.task import evaluate_task
from prune.train.config import ConfigError, compose, validate
from prune.train.task import HEAD_FILE, INFO_FILE, load_task_head

LABELS = DEMO_CORPUS / "transcripts.tsv"
VALID = DEMO_CORPUS / "valid.tsv"
FAST = ["trainer.log_every=50", "trainer.ckpt_every=100", "logging.progress=false", "trainer.threads=1"]


def test_ctc_task_aware_pruning_beats_a_random_head_and_evaluate_reads_it_back(tmp_path):
    run = tmp_path / "run"
    result = prune_cli(["train", "tiny_demo", "teacher=demo", "task=ctc", f"task.labels={LABELS}",
                        "distill.layers=[[0],[2,4]]", "data.max_samples=64000", "trainer.prune_steps=100",
                        "trainer.final_steps=100", "pruning.warmup_steps=50", "optim.warmup_steps=20", *FAST,
                        f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    export = run / "export"
    assert (export / HEAD_FILE).is_file() and (export / INFO_FILE).is_file()
    load_pruned(export)  # the model loads as any export
    record = read_export_info(export)["metadata"]["task"]
    assert record["metric"] == "PER" and set(record["points"]) == {"before cut", "after cut", "end"}
    assert "task ctc (phones, 72 classes" in (run / "report.txt").read_text()
    trained = evaluate_task(str(export), str(VALID))
    # the same files, batches and decoding as the run's last validation
    assert trained["value"] == pytest.approx(record["valid_metric"], abs=1e-9)
    assert trained["value"] < 0.5, trained
    # the floor: the same model with a freshly initialised head
    floor_dir = tmp_path / "floor"
    shutil.copytree(export, floor_dir)
    head, info, vocab = load_task_head(export)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        fresh = type(head)(info["num_hiddens"], info["dim"], len(vocab))
    save_file({k: v.contiguous() for k, v in fresh.state_dict().items()}, str(floor_dir / HEAD_FILE))
    floor = evaluate_task(str(floor_dir), str(VALID))
    assert floor["value"] > 0.9 and trained["value"] < floor["value"] - 0.4, (trained, floor)
    # and from the command line
    line = prune_cli(["evaluate", str(export), "--task", str(VALID)])
    assert line.returncode == 0 and f"PER {trained['value']:.4f}" in line.stdout, line.stderr[-2000:]


def test_finetune_a_checkpoint_for_speaker_id(tmp_path):
    run = tmp_path / "run"
    result = prune_cli(["finetune", str(REPO / "data" / "demo_teacher"), "task=classify", "trainer.final_steps=150",
                        "optim.warmup_steps=20", "data.max_samples=32000", *FAST, f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    info = read_export_info(run / "export")
    assert info["pruned"] == info["source"]  # nothing pruned
    accuracy = info["metadata"]["task"]["valid_metric"]
    assert accuracy > 0.45, accuracy  # chance 1/6, the majority class 0.286
    assert evaluate_task(str(run / "export"), str(VALID))["value"] == pytest.approx(accuracy, abs=1e-9)
    assert "accuracy" in (run / "report.txt").read_text()


def test_finetune_without_a_model_fails_in_one_line(tmp_path):
    result = prune_cli(["finetune", str(tmp_path / "nothing"), "task=ctc"])
    assert result.returncode == 1 and result.stderr.strip() == (
        f"prune finetune: {tmp_path / 'nothing'} does not exist (give an export folder, a Hugging Face folder or a "
        f"fairseq / torchaudio checkpoint)")


def test_a_task_run_killed_mid_run_and_resumed_gives_the_same_export(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus")
    labels = voice_labels(tmp_path, train, valid)

    def args(run):
        base = short_run_args(train, valid, run, prune_steps=10, final_steps=6,
                              extra=["task=classify", f"task.labels={labels}", "task.pooling=attentive"])
        return [a for a in base if not a.startswith("trainer.ckpt_every=")] + ["trainer.ckpt_every=5"]

    reference, run = tmp_path / "reference", tmp_path / "run"
    assert prune_cli(args(reference)).returncode == 0
    killed = prune_cli(args(run), env={"PRUNE_FAULT": "mid_step:13"})  # in the final stage
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "export").exists()
    resumed = prune_cli(["resume", str(run)])
    assert resumed.returncode == 0 and "resumed from step" in resumed.stderr, resumed.stderr[-3000:]
    for name in ("model.safetensors", HEAD_FILE, INFO_FILE):
        assert (reference / "export" / name).read_bytes() == (run / "export" / name).read_bytes(), name
    a, b = (read_export_info(r / "export")["metadata"] for r in (reference, run))
    assert a["history"] == b["history"] and a["task"] == b["task"]


def test_freeze_extractor_keeps_the_conv_stack(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=8, n_valid=2)
    labels = voice_labels(tmp_path, train, valid)
    run = tmp_path / "run"
    result = prune_cli(["train", "finetune_demo", "teacher=tiny", "task=classify", f"task.labels={labels}",
                        f"data.train_manifest={train}", f"data.valid_manifest={valid}", "trainer.final_steps=4",
                        "optim.warmup_steps=1", "task.freeze_extractor=true", *FAST, f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    from prune.train.student import load_teacher

    teacher = load_teacher(compose("finetune_demo", ["teacher=tiny", f"task.labels={labels}"]).teacher).state_dict()
    tuned = load_file(str(run / "export" / "model.safetensors"))
    extractor = [k for k in tuned if k.startswith("feature_extractor.")]
    assert extractor and all(torch.equal(tuned[k], teacher[k]) for k in extractor)
    assert any(not torch.equal(tuned[k], teacher[k]) for k in tuned if k not in extractor)


def test_task_none_is_distillation_and_the_weights_are_checked(tmp_path):
    from prune.train.objective import Distillation, build_objective

    train, valid = noise_corpus(tmp_path, n_train=2, n_valid=1)
    data = [f"data.train_manifest={train}", f"data.valid_manifest={valid}"]
    cfg = compose("tiny_demo", data)
    assert cfg.task.kind == "none" and cfg.distill.weight == 1.0 and cfg.pruning.enabled
    objective = build_objective(cfg, 32, 3)
    assert type(objective) is Distillation and objective.weight == 1.0
    labels = voice_labels(tmp_path, train, valid)
    for overrides, message in [
        (["distill.weight=0"], "distill.weight: 0 with task: none leaves nothing to train on"),
        (["task=ctc", f"task.labels={labels}", "distill.weight=0", "task.weight=0"],
         "task.weight and distill.weight: both are 0"),
        (["task=ctc"], "task.labels: task ctc needs a label file"),
        (["task=ctc", f"task.labels={tmp_path / 'no.tsv'}"], "does not exist"),
        (["task=classify", f"task.labels={labels}", "task.pooling=max"], "task.pooling: must be one of"),
        (["task=ctc", f"task.labels={labels}", "task.layer=9"], "task.layer: must be a hidden-state index from 0 to 2"),
        (["task=ctc", f"task.labels={labels}", "pruning.enabled=false"], "pruning.enabled: false (no pruning), but"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate(compose("tiny_demo", [*data, *overrides]))
    assert json.loads(json.dumps(dict(compose("finetune_demo").task)))["kind"] == "ctc"
