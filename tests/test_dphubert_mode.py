"""prune's faithful DPHuBERT mode: the recipes hold run.sh's values, and each departure of prune's
own recipe (layer-0 target, loss reduction, gate lr schedule, final stage lr, calibration) can be
switched to DPHuBERT's behaviour."""

import pytest
import torch
import torch.nn.functional as F
from helpers_train import noise_corpus

from prune.models import build_preset
from prune.structures import GatedEncoder
from prune.train.config import ConfigError, compose, validate
from prune.train.distill import distill_loss, frame_mask, projection_as_layer0
from prune.train.recipe import FINAL, PruneRecipe


@pytest.mark.parametrize("recipe,preset", [("dphubert_hubert_base", "hubert_base"),
                                           ("wavlm_base_plus", "wavlm_base_plus")])
def test_dphubert_recipes_hold_run_sh_values(recipe, preset):
    c = compose(recipe)
    assert c.teacher.preset == preset
    o, d, p, tr = c.optim, c.distill, c.pruning, c.trainer
    # run.sh: lr, warmup, reg_lr, final_lr, final_warmup, clip, weight decay; lightning.py: AdamW defaults
    assert (o.lr, o.warmup_steps, o.gate_lr, o.lambda_lr) == (2e-4, 15000, 0.02, 0.02)
    assert (o.final_lr, o.final_warmup_steps, o.clip_grad_norm, o.weight_decay) == (1e-4, 5000, 10.0, 0.0)
    assert list(o.betas) == [0.9, 0.999] and o.gate_lr_schedule == "model"
    # run.sh: distill_layers=0.4,8,12, layer2layer, l1 1 + raw cos 1; lightning.py: mean over layers
    assert d.layers == [[0], [4, 8, 12]] and (d.mode, d.cos_weight, d.cos_type) == ("layer2layer", 1.0, "raw")
    assert (d.reduction, d.layer0) == ("mean", "projection")
    # run.sh: target 0.75, sparsity warm-up 5000, pruning_units=conv,head,interm; prune.py: no calibration
    assert (p.target_kind, p.target, p.warmup_steps, p.calibrate) == ("params", 0.75, 5000, False)
    g = p.gates
    assert (g.conv_channels, g.attention_heads, g.ffn_units, g.attention_layers, g.ffn_layers) == (
        True, True, True, False, False)
    assert (tr.prune_steps, tr.final_steps, tr.precision, tr.seed) == (50000, 25000, "fp16", 2022)
    assert (c.data.max_batch_samples, c.data.min_samples, c.data.max_samples) == (2560000, 32000, 250000)


def test_demo_dphubert_is_the_demo_budget_with_dphubert_method():
    demo, faithful = compose("demo"), compose("demo_dphubert")
    for key in ("teacher", "data", "trainer", "probe"):
        assert faithful[key] == demo[key], key
    assert (faithful.optim.lr, faithful.optim.warmup_steps) == (demo.optim.lr, demo.optim.warmup_steps)
    assert faithful.optim.final_lr == demo.optim.lr / 2
    assert (faithful.pruning.target, faithful.pruning.warmup_steps) == (demo.pruning.target, demo.pruning.warmup_steps)
    assert faithful.distill.layers == demo.distill.layers
    assert (faithful.distill.layer0, faithful.distill.reduction, faithful.pruning.calibrate) == (
        "projection", "mean", False)
    assert (demo.distill.layer0, demo.distill.reduction, demo.pruning.calibrate) == ("hidden", "sum", True)


def test_mean_reduction_is_dphubert_distill_loss():
    """DPHuBERT's DistillLoss on the layers stacked: L1Loss() over (batch, layer, time, dim) plus
    -cosine_similarity(dim=-1).mean(); with no padding it equals reduction="mean"."""
    torch.manual_seed(0)
    preds = [torch.randn(2, 7, 5) for _ in range(3)]
    targets = [torch.randn(2, 7, 5) for _ in range(3)]
    stacked_p, stacked_t = torch.stack(preds, 1), torch.stack(targets, 1)
    reference = F.l1_loss(stacked_p, stacked_t) - F.cosine_similarity(stacked_p, stacked_t, dim=-1).mean()
    mask = frame_mask(torch.tensor([7, 7]), 7)
    mean, _ = distill_loss(preds, targets, mask, reduction="mean")
    total, _ = distill_loss(preds, targets, mask)
    torch.testing.assert_close(mean, reference)
    torch.testing.assert_close(total, 3 * reference)
    with pytest.raises(ValueError, match="reduction"):
        distill_loss(preds, targets, mask, reduction="max")


@pytest.mark.parametrize("gated", [False, True])
def test_projection_as_layer0_is_the_feature_projection_output(gated):
    torch.manual_seed(0)
    model = build_preset("hubert_base_tiny").eval()
    subject = GatedEncoder(model).eval() if gated else model
    x, lengths = torch.randn(2, 8000), torch.tensor([8000, 6000])
    with torch.no_grad():
        plain, frames = subject(x, lengths)
        with projection_as_layer0(subject):
            tapped, _ = subject(x, lengths)
        after, _ = subject(x, lengths)
        conv_gates = subject.sample_gates().extractor if gated else None  # eval: the deterministic masks
        features, _ = model.feature_extractor(x, lengths, conv_gates)
        projected = model.encoder.feature_projection(features)
    assert torch.equal(tapped[0], projected)
    assert not torch.allclose(plain[0], projected)  # the positional conv and LayerNorm sit between them
    assert all(torch.equal(a, b) for a, b in zip(plain[1:], tapped[1:]))
    assert all(torch.equal(a, b) for a, b in zip(plain, after))  # the hooks are gone after the block
    with torch.no_grad(), projection_as_layer0(subject, enabled=False):
        untouched, _ = subject(x, lengths)
    assert torch.equal(untouched[0], plain[0])


def _recipe(tmp_path, overrides):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=4, n_valid=2)
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}",
                                "trainer.prune_steps=100", "trainer.final_steps=40", "optim.warmup_steps=10",
                                "pruning.warmup_steps=20", "logging.tensorboard=false", *overrides])
    validate(cfg)
    recipe = PruneRecipe(cfg, tmp_path / "run")
    recipe.setup()
    return recipe


def _lrs_at(recipe, step):
    recipe.step = step
    recipe._set_lr_for_step()
    return {g["name"]: g["lr"] for g in recipe.optimizer.param_groups}


def test_gate_and_lambda_lrs_follow_the_model_schedule_in_dphubert_mode(tmp_path):
    recipe = _recipe(tmp_path, ["optim.lr=1e-3", "optim.gate_lr=0.02", "optim.lambda_lr=0.04",
                                "optim.gate_lr_schedule=model"])
    for step in (0, 4, 9, 50, 99):
        lrs = _lrs_at(recipe, step)
        scale = lrs["model"] / 1e-3
        assert lrs["gates"] == pytest.approx(0.02 * scale) and lrs["lambdas"] == pytest.approx(0.04 * scale)
    assert _lrs_at(recipe, 0)["gates"] == pytest.approx(0.02 / 10)  # warm-up: 1/10 of the peak at step 1
    assert _lrs_at(recipe, 99)["gates"] == pytest.approx(0.0)  # decayed to 0 at the stage's end
    recipe.cleanup()
    constant = _recipe(tmp_path / "c", ["optim.gate_lr_schedule=constant"])
    assert {_lrs_at(constant, s)["gates"] for s in (0, 50, 99)} == {0.02}
    constant.cleanup()


def test_final_stage_takes_its_own_lr_and_warmup(tmp_path):
    recipe = _recipe(tmp_path, ["optim.lr=1e-3", "optim.final_lr=5e-4", "optim.final_warmup_steps=4"])
    recipe.stage = FINAL
    recipe._set_student(recipe.student)
    assert [g["name"] for g in recipe.optimizer.param_groups] == ["model"]
    assert _lrs_at(recipe, 100)["model"] == pytest.approx(5e-4 / 4)  # first final step: 1/4 of final_lr
    assert _lrs_at(recipe, 103)["model"] == pytest.approx(5e-4)  # peak after 4 warm-up steps
    assert _lrs_at(recipe, 139)["model"] == pytest.approx(0.0)
    recipe.cleanup()


def test_the_cut_keeps_the_gates_as_they_are_without_calibration(tmp_path):
    """pruning.calibrate=false (DPHuBERT's prune.py): the export's size is where the gates ended,
    however far from the target; with calibration it lands on the target."""
    sizes = {}
    for calibrate in (True, False):
        recipe = _recipe(tmp_path / str(calibrate), [f"pruning.calibrate={calibrate}", "pruning.target=0.5"])
        gated = recipe.student.encoder
        with torch.no_grad():  # gates far from the target: everything open
            for p in gated.gate_parameters():
                p.fill_(5.0)
        gated.eval()
        open_size = recipe.lagrangian.expected_size(gated).item()
        recipe.step = recipe.cfg.trainer.prune_steps
        recipe._finish_pruning()
        from prune.structures import count_params

        sizes[calibrate] = (open_size, count_params(recipe.student.encoder.config), recipe.lagrangian.full)
        recipe.cleanup()
    open_size, cut, full = sizes[False]
    assert cut == pytest.approx(open_size, rel=1e-9) and cut == full
    _, cut, full = sizes[True]
    assert cut == pytest.approx(0.5 * full, rel=0.005)


@pytest.mark.parametrize("override,message", [
    ("distill.reduction=max", "distill.reduction: must be one of"),
    ("distill.layer0=cnn", "distill.layer0: must be one of"),
    ("optim.gate_lr_schedule=cosine", "optim.gate_lr_schedule: must be one of"),
    ("optim.final_lr=-1", "optim.final_lr: must be a finite number"),
    ("optim.final_warmup_steps=-3", "optim.final_warmup_steps: must be >= 0"),
    ("probe.seeds=[]", "probe.seeds: give at least one seed"),
])
def test_new_keys_are_checked_before_compute(tmp_path, override, message):
    train, valid = noise_corpus(tmp_path, n_train=2, n_valid=1)
    with pytest.raises(ConfigError, match=message):
        validate(compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}", override]))
