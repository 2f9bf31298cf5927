"""Config composition and the checks that run before any compute."""

import pytest
from helpers_train import noise_corpus

from prune.train.config import ConfigError, compose, validate


@pytest.mark.parametrize("recipe", ["default", "demo", "tiny_demo", "dphubert_hubert_base", "wavlm_base_plus"])
def test_every_recipe_composes(recipe):
    cfg = compose(recipe)
    assert cfg.name == ("run" if recipe == "default" else recipe)
    assert 0 < cfg.pruning.target < 1


def test_recipe_values_and_overrides():
    cfg = compose("tiny_demo", ["trainer.prune_steps=7", "pruning.target_kind=macs", "distill.cos_type=log_sig"])
    assert cfg.teacher.preset == "hubert_base_tiny"
    assert (cfg.trainer.prune_steps, cfg.pruning.target_kind, cfg.distill.cos_type) == (7, "macs", "log_sig")
    base = compose("dphubert_hubert_base")
    assert base.distill.layers == [[0], [4, 8, 12]] and base.optim.lr == 2e-4 and base.optim.gate_lr == 0.02
    assert base.trainer.prune_steps == 50000 and base.trainer.final_steps == 25000
    assert base.pruning.warmup_steps == 5000
    demo = compose("demo")
    assert demo.teacher.checkpoint == "data/demo_teacher" and demo.probe.corpus == "data/demo_corpus"


def test_probe_corpus_is_checked_before_any_compute(tmp_path):
    train, valid = noise_corpus(tmp_path)
    base = [f"data.train_manifest={train}", f"data.valid_manifest={valid}"]
    with pytest.raises(ConfigError, match="probe.corpus: .* has no transcripts.tsv"):
        validate(compose("tiny_demo", [*base, f"probe.corpus={tmp_path}"]))
    with pytest.raises(ConfigError, match="probe.steps: must be >= 1"):
        validate(compose("tiny_demo", [*base, "probe.steps=0"]))


@pytest.mark.parametrize("override,message", [
    ("+trainer.setps=3", "trainer.setps"),
    ("trainer.prune_steps=abc", "trainer.prune_steps"),
    ("+teacher.chekpoint=x", "teacher.chekpoint"),
])
def test_typos_and_wrong_types_name_the_key(override, message):
    with pytest.raises(Exception, match=message):
        compose("tiny_demo", [override])


@pytest.mark.parametrize("override,message", [
    ("pruning.target=1.5", "pruning.target: a sparsity must be in \\(0, 1\\)"),
    ("pruning.target=0", "pruning.target"),
    ("pruning.target_kind=flops", "pruning.target_kind"),
    ("data.train_manifest=/nowhere/train.tsv", "data.train_manifest: /nowhere/train.tsv does not exist"),
    ("teacher.checkpoint=/nowhere/hubert", "teacher.checkpoint: /nowhere/hubert does not exist"),
    ("teacher.preset=hubert_tiny", "teacher.preset: unknown preset"),
    ("distill.layers=[[0],[9]]", "distill.layers"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.grad_accum=0", "trainer.grad_accum"),
    ("optim.lr=nan", "optim.lr: must be a finite number"),
    ("optim.gate_lr=inf", "optim.gate_lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.betas=[0.9,1.5]", "optim.betas: must be two numbers in \\[0, 1\\)"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.warmup_steps=-5", "optim.warmup_steps: must be >= 0"),
    ("pruning.warmup_steps=-1", "pruning.warmup_steps: must be >= 0"),
    ("optim.clip_grad_norm=0", "optim.clip_grad_norm"),
    ("pruning.gates.init_mean=1.2", "pruning.gates.init_mean: an initial drop rate"),
    ("pruning.gates.ffn_units_init_mean=0", "pruning.gates.ffn_units_init_mean"),
    ("pruning.gates.init_std=-1", "pruning.gates.init_std"),
    ("trainer.threads=0", "trainer.threads: must be >= 1"),
    ("trainer.latency_seconds=0", "trainer.latency_seconds"),
])
def test_bad_values_fail_before_compute(tmp_path, override, message):
    train, valid = noise_corpus(tmp_path)
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}", override])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, tmp_path / "run")


def test_unwritable_run_dir(tmp_path):
    train, valid = noise_corpus(tmp_path)
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}"])
    validate(cfg, tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        validate(cfg, tmp_path / "file" / "run")
