"""Numerical faults: a non-finite loss or gradient never reaches the weights, the gates or the
multipliers, is counted, never gets into a checkpoint, and ``trainer.max_nonfinite`` of them in a
row stop the run with the last checkpoint intact. Gradient clipping clips."""

import math

import pytest
import torch
from helpers_train import noise_corpus, prune_cli, short_run_args
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from prune.checkpoints import read_export_info
from prune.train.checkpoint import checkpoint_files, load_checkpoint
from prune.train.config import compose, validate
from prune.train.recipe import PruneRecipe


def tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint, by dotted path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}{i}.")


def trained_state(ckpt):
    """What a step changes: weights, heads and gates, the multipliers, the optimizer's moments."""
    state = load_checkpoint(ckpt)
    return {k: v for part in ("student", "lagrangian", "optimizer") for k, v in tensors(state[part], part + ".")}


def assert_same(a, b):
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"changed by a skipped step: {changed[:5]}"


def assert_all_finite(folder):
    for _, path in checkpoint_files(folder):
        bad = [k for k, v in tensors(load_checkpoint(path)) if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, f"{path.name}: non-finite {bad[:5]}"


def cli_args(tmp_path, run, prune_steps, final_steps, extra=()):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=8, n_valid=2)
    args = short_run_args(train, valid, run, prune_steps=prune_steps, final_steps=final_steps)
    return [a for a in args if not a.startswith("trainer.ckpt_every=")] + [
        "trainer.ckpt_every=1", "trainer.keep_last=20", *extra]


def ckpt(run, step):
    return run / "checkpoints" / f"step_{step:08d}.pt"


def test_nan_loss_steps_are_skipped_counted_and_never_saved(tmp_path):
    run = tmp_path / "run"
    # step 3 in the pruning stage, step 7 in the final stage
    result = prune_cli(cli_args(tmp_path, run, 5, 3), env={"PRUNE_FAULT": "nan_loss:3,nan_loss:7"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert out.count("non-finite loss or gradient, step skipped (1 in a row)") == 2
    assert read_export_info(run / "export")["metadata"]["nonfinite_steps_skipped"] == 2
    assert "non-finite steps skipped: 2" in (run / "report.txt").read_text()
    for skipped in (3, 7):
        assert_same(trained_state(ckpt(run, skipped - 1)), trained_state(ckpt(run, skipped)))
    before, after = trained_state(ckpt(run, 3)), trained_state(ckpt(run, 4))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # training went on
    assert_all_finite(run / "checkpoints")


def test_max_nonfinite_in_a_row_stops_with_the_last_checkpoint_intact(tmp_path):
    run = tmp_path / "run"
    args = cli_args(tmp_path, run, 6, 2, extra=["trainer.max_nonfinite=3"])
    result = prune_cli(args, env={"PRUNE_FAULT": "nan_loss:3-100"})
    assert result.returncode not in (0, -9)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("prune train: 3 non-finite steps in a row") and "trainer.max_nonfinite" in last, last
    assert "Traceback" not in result.stderr
    assert not (run / "export").exists()
    assert [s for s, _ in checkpoint_files(run / "checkpoints")][0] == 4  # the 3rd bad step was not saved
    assert_all_finite(run / "checkpoints")
    assert_same(trained_state(ckpt(run, 2)), trained_state(ckpt(run, 4)))

    assert load_checkpoint(ckpt(run, 4))["nonfinite_in_row"] == 2
    again = prune_cli(["resume", str(run)], env={"PRUNE_FAULT": "nan_loss:3-100"})  # still bad: the count goes on
    assert again.returncode not in (0, -9)
    assert again.stderr.strip().splitlines()[-1].startswith("prune resume: 3 non-finite steps in a row at step 4")
    assert [s for s, _ in checkpoint_files(run / "checkpoints")][0] == 4

    resumed = prune_cli(["resume", str(run)])  # the cause gone, the run goes on from step 4
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4 " in resumed.stderr
    assert read_export_info(run / "export")["metadata"]["nonfinite_steps_skipped"] == 2


# ---------------------------------------------------------------------------- in process
def recipe(tmp_path, *overrides):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=8, n_valid=2)
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}",
                                "trainer.prune_steps=4", "trainer.final_steps=0", "pruning.warmup_steps=2",
                                "optim.warmup_steps=2", "trainer.ckpt_every=1", "trainer.keep_last=10", "logging.progress=false",
                                "logging.tensorboard=false", *overrides])
    run = tmp_path / "run"
    validate(cfg, run)
    run.mkdir()
    r = PruneRecipe(cfg, run)
    r.setup()
    return r


def train(r):
    try:
        return r.train()
    finally:
        r.cleanup()


def test_nonfinite_gradient_with_a_finite_loss_is_skipped(tmp_path):
    r = recipe(tmp_path)
    weight = r.student.encoder.model.feature_extractor.conv_layers[0].conv.weight
    weight.register_hook(lambda g: g * math.inf if r.step + 1 == 3 else g)  # step 3's gradient only
    export = train(r)
    assert r.nonfinite_total == 1
    assert read_export_info(export)["metadata"]["nonfinite_steps_skipped"] == 1
    assert_same(trained_state(ckpt(r.run_dir, 2)), trained_state(ckpt(r.run_dir, 3)))
    assert_all_finite(r.ckpt_dir)


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """Whatever the cause (here: an update that breaks a weight, as optim.lr=nan would), a model
    with non-finite weights stops the run instead of replacing good checkpoints."""
    r = recipe(tmp_path)
    weight = r.student.encoder.model.feature_extractor.conv_layers[0].conv.weight

    def break_weight(optimizer, args, kwargs):
        if r.step + 1 == 3:
            with torch.no_grad():
                weight[0, 0, 0] = math.nan

    handle = register_optimizer_step_post_hook(break_weight)
    try:
        with pytest.raises(FloatingPointError, match=r"step 3: non-finite weights \(.*conv_layers\.0\.conv\.weight"):
            train(r)
    finally:
        handle.remove()
    assert [s for s, _ in checkpoint_files(r.ckpt_dir)] == [2, 1]
    assert_all_finite(r.ckpt_dir)


@pytest.mark.parametrize("clip", [1e-3, None])
def test_clip_grad_norm_bounds_the_gradient_the_optimizer_sees(tmp_path, clip):
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    r = recipe(tmp_path, f"optim.clip_grad_norm={'null' if clip is None else clip}")
    handle = register_optimizer_step_pre_hook(record)
    try:
        train(r)
    finally:
        handle.remove()
    assert len(norms) == 4
    if clip is None:
        assert max(norms) > 1e-2  # the raw gradients are far above the clip value tested
    else:
        assert max(norms) <= clip * (1 + 1e-4), norms


def test_resume_stops_on_max_nonfinite_with_one_line(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from prune.cli import main

    monkeypatch.setenv("PRUNE_FAULT", "nan_loss:3-100")
    r = recipe(tmp_path, "trainer.prune_steps=6", "trainer.max_nonfinite=2")
    with pytest.raises(FloatingPointError):
        train(r)
    (r.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(r.cfg))
    with pytest.raises(SystemExit, match=r"^prune resume: 2 non-finite steps in a row.*trainer\.max_nonfinite"):
        main(["resume", str(r.run_dir)])
