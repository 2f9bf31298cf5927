"""What the pruning recipe, pre-training and the CLI share, each written once: the student builder
(recipe, resume and ``prune export``), the warm-up + linear-decay schedule, the resume-config
check, and the CheckpointError."""

import copy

import pytest
import torch
from helpers_train import noise_corpus
from omegaconf import OmegaConf

import prune
from prune.pretrain.recipe import Pretrainer
from prune.structures import GatedEncoder
from prune.train.checkpoint import load_latest, save_checkpoint
from prune.train.config import compose, validate
from prune.train.recipe import FINAL, PruneRecipe
from prune.train.resume import check_resume_config
from prune.train.schedule import warmup_linear_decay
from prune.train.student import export_training_checkpoint, student_from_checkpoint


# ------------------------------------------------------------------------------- the schedule
def _old_recipe_lr(step, stage_start, warmup, stage_steps):  # recipe.py's model_lr before #13
    s = step - stage_start + 1
    if s <= warmup:
        return s / max(1, warmup)
    return max(0.0, (stage_steps - s) / max(1, stage_steps - warmup))


def _old_pretrain_lr(step, lr, warmup, total):  # pretrain/recipe.py's lr_at before #13
    s = step + 1
    scale = s / max(1, warmup) if s <= warmup else max(0.0, (total - s) / max(1, total - warmup))
    return lr * scale


@pytest.mark.parametrize("warmup,total", [(0, 10), (1, 1), (3, 10), (10, 10), (15, 10), (500, 10000)])
def test_the_schedule_is_both_old_formulas_step_by_step(warmup, total):
    for step in range(total + 3):
        assert warmup_linear_decay(step, warmup, total) == _old_pretrain_lr(step, 1.0, warmup, total)
        for start in (0, 7):
            assert warmup_linear_decay(step, warmup, total) == _old_recipe_lr(step + start, start, warmup, total)


def test_pretraining_uses_the_schedule():
    cfg = OmegaConf.create({"optim": {"lr": 5e-4, "warmup_steps": 4}, "trainer": {"steps": 20}})
    trainer = Pretrainer(cfg, "unused")
    assert [trainer.lr_at(s) for s in range(22)] == [5e-4 * warmup_linear_decay(s, 4, 20) for s in range(22)]


# -------------------------------------------------------------------------- the resume check
def test_one_resume_check_names_the_changed_keys(tmp_path):
    saved = {"optim": {"lr": 1e-3}, "trainer": {"steps": 10, "log_every": 5}, "logging": {"tensorboard": True}}
    now = {"optim": {"lr": 2e-3}, "trainer": {"steps": 10, "log_every": 1}, "logging": {"tensorboard": False}}
    with pytest.raises(ValueError, match=rf"^{tmp_path} was started with a different config \(optim\.lr\); resume "
                                         rf"with the same config or use a new run directory$"):
        check_resume_config(saved, now, tmp_path)
    check_resume_config(saved, {**now, "optim": {"lr": 1e-3}}, tmp_path)  # logging and log_every may change


def test_pretraining_resumes_through_the_same_check(tmp_path):
    cfg = OmegaConf.create({"name": "a", "model": {"preset": "x"}, "optim": {"lr": 5e-4},
                            "trainer": {"steps": 20, "log_every": 5, "seed": 0}, "probe": {"corpus": None}})
    trainer = Pretrainer(cfg, tmp_path)
    recorded = OmegaConf.to_container(cfg)
    recorded["optim"]["lr"] = 1e-3
    state = {key: None for key in ("model", "optimizer", "targets", "rng", "history")}
    save_checkpoint(trainer.ckpt_dir, 10, {**state, "step": 10, "config": recorded})
    with pytest.raises(ValueError, match=r"different config \(optim\.lr\); resume with the same config"):
        trainer._latest()
    recorded["optim"]["lr"], recorded["trainer"]["log_every"], recorded["name"] = 5e-4, 1, "b"
    save_checkpoint(trainer.ckpt_dir, 11, {**state, "step": 11, "config": recorded})
    assert trainer._latest()["step"] == 11  # what a pre-training resume may change, as before


# ---------------------------------------------------------------------------- CheckpointError
def test_one_checkpoint_error(tmp_path):
    from prune.train import checkpoint

    assert checkpoint.CheckpointError is prune.CheckpointError
    save_checkpoint(tmp_path, 5, {"step": 5})
    (tmp_path / "step_00000005.pt").write_bytes(b"garbage")
    with pytest.raises(prune.CheckpointError, match="every checkpoint in .* is damaged"):
        load_latest(tmp_path)


# ------------------------------------------------------------------------ the student builder
@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A tiny run set up (not trained), with skip settings that are not GatedEncoder's defaults."""
    tmp = tmp_path_factory.mktemp("student")
    train, valid = noise_corpus(tmp / "corpus", n_train=4, n_valid=2)
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}",
                                "trainer.prune_steps=4", "trainer.final_steps=2", "optim.warmup_steps=1",
                                "pruning.warmup_steps=1", "logging.tensorboard=false", "pruning.skip_closed=false",
                                "pruning.skip_min_closed=0.6", "trainer.threads=1"])
    validate(cfg)
    recipe = PruneRecipe(cfg, tmp / "run")
    recipe.setup()
    with torch.no_grad():  # gates that are not their initial state
        for p in recipe.student.encoder.gate_parameters():
            p.add_(torch.randn_like(p))
    yield recipe
    recipe.cleanup()


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_rebuilds_the_gated_student_the_recipe_built(recipe, tmp_path):
    gated = recipe.student.encoder
    model, source = student_from_checkpoint(recipe._state(), tmp_path / "step.pt")
    assert isinstance(model, GatedEncoder) and _same_state(model, gated) and source == recipe.source_config
    # the skip settings too: the export once built its GatedEncoder with the defaults
    assert (model.skip_closed, model.skip_min_closed) == (gated.skip_closed, gated.skip_min_closed) == (False, 0.6)
    assert model.config == gated.config  # the student's layer drop, not the teacher's


def test_prune_export_writes_the_recipes_student_through_the_formats_table(recipe, tmp_path, monkeypatch):
    from prune.checkpoints import convert, load_pruned
    from prune.compile import compile_encoder

    written = []
    native = convert.FORMATS[convert.NATIVE]
    monkeypatch.setitem(convert.FORMATS, convert.NATIVE, convert.Format(
        None, native.check, lambda model, out, options: written.append(out) or native.write(model, out, options)))
    path = recipe.save_checkpoint()
    state = export_training_checkpoint(path, tmp_path / "export")
    assert written == [tmp_path / "export"] and state["step"] == recipe.step
    expected = compile_encoder(copy.deepcopy(recipe.student.encoder).eval())
    assert _same_state(load_pruned(tmp_path / "export"), expected)


def test_export_and_resume_rebuild_the_cut_student(recipe, tmp_path):
    recipe._finish_pruning()  # cut: the checkpoint holds the cut student from here on
    assert recipe.stage == FINAL
    path = recipe.save_checkpoint()
    model, _ = student_from_checkpoint(load_latest(recipe.ckpt_dir), path)
    assert not isinstance(model, GatedEncoder) and _same_state(model, recipe.student.encoder)
    resumed = PruneRecipe(recipe.cfg, recipe.run_dir)
    resumed.setup()
    try:
        assert resumed.stage == FINAL and _same_state(resumed.student.encoder, recipe.student.encoder)
    finally:
        resumed.cleanup()
