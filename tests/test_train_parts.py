"""Distillation heads and loss, the Lagrangian controller, training checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from prune.models import build_preset
from prune.structures import GatedEncoder, count_macs, count_params
from prune.train.checkpoint import REQUIRED, CheckpointError, checkpoint_files, load_latest, save_checkpoint
from prune.train.distill import DistillHeads, distill_loss, frame_mask
from prune.lagrangian import Lagrangian


def test_heads_start_as_identity_and_share_by_group():
    heads = DistillHeads(8, [[0], [2, 4]])
    assert len(heads.heads) == 2 and heads.layers == [0, 2, 4]
    hiddens = [torch.randn(2, 5, 8) for _ in range(5)]
    out = heads(hiddens)
    for o, layer in zip(out, [0, 2, 4]):
        assert torch.equal(o, hiddens[layer])
    with torch.no_grad():
        heads.heads[1].bias.fill_(1.0)
    out = heads(hiddens)
    torch.testing.assert_close(out[1] - hiddens[2], torch.ones(2, 5, 8))  # one head serves layers 2 and 4
    torch.testing.assert_close(out[2] - hiddens[4], torch.ones(2, 5, 8))
    pred = DistillHeads(8, [[2], [4]], mode="prediction")(hiddens)
    assert all(torch.equal(p, hiddens[-1]) for p in pred)
    with pytest.raises(ValueError, match="twice"):
        DistillHeads(8, [[1], [1]])
    with pytest.raises(ValueError, match="own head"):
        DistillHeads(8, [[2, 4]], mode="prediction")


def test_distill_loss_by_hand():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])  # (1, 3, 2); frame 2 is padding
    target = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
    mask = frame_mask(torch.tensor([2]), 3)
    assert mask.tolist() == [[True, True, False]]
    loss, parts = distill_loss([pred], [target], mask, cos_weight=2.0, cos_type="raw")
    l1 = (0.5 + 0.5) / 2
    cos = (2 ** -0.5 + 1.0) / 2
    assert parts["l1"].item() == pytest.approx(l1)
    assert parts["cos"].item() == pytest.approx(-cos)
    assert loss.item() == pytest.approx(l1 - 2 * cos)
    loss, parts = distill_loss([pred], [target], mask, cos_type="log_sig")
    expected = -(F.logsigmoid(torch.tensor(2 ** -0.5)) + F.logsigmoid(torch.tensor(1.0))).item() / 2
    assert parts["cos"].item() == pytest.approx(expected, rel=1e-5)


def test_lagrangian_targets_and_ascent():
    gated = GatedEncoder(build_preset("hubert_base_tiny")).train()
    lag = Lagrangian(gated, "params", 0.6, warmup_steps=10)
    assert lag.target_at(0) == 0 and lag.target_at(5) == pytest.approx(0.3) and lag.target_at(50) == 0.6
    with torch.no_grad():
        lag.lambda1.fill_(0.5)
    out = lag(gated, step=10)
    expected_sparsity = 1 - gated.expected_params().item() / count_params(gated.config)
    assert out["expected_sparsity"].item() == pytest.approx(expected_sparsity, rel=1e-5)
    assert expected_sparsity < 0.6  # freshly initialised gates keep almost everything
    opt = torch.optim.SGD(list(lag.parameters()) + gated.gate_parameters(), lr=0.1)
    out["penalty"].backward()
    lag.flip_grads()
    opt.step()
    # ascent: the multiplier grows in the direction that raises the penalty (s - t < 0 here)
    assert lag.lambda1.item() < 0.5
    # descent for the gates: with lambda1 > 0 and s < t, they close (log_alpha falls)
    first = gated.gate_parameters()[0]
    assert first.grad is not None
    assert Lagrangian(gated, "param_count", count_params(gated.config) * 0.25, 0).target_sparsity == \
        pytest.approx(0.75)
    macs = Lagrangian(gated, "macs", 0.5, 0, seconds=2.0)
    assert macs.full == count_macs(gated.config, 2.0)
    with pytest.raises(ValueError, match="outside"):
        Lagrangian(gated, "param_count", count_params(gated.config) * 2, 0)
    with pytest.raises(ValueError, match="target_kind"):
        Lagrangian(gated, "flops", 0.5, 0)


def test_lagrangian_drives_gates_to_the_target():
    """The controller alone (no distillation) must move the expected sparsity onto the target."""
    torch.manual_seed(0)
    gated = GatedEncoder(build_preset("hubert_base_tiny")).train()
    lag = Lagrangian(gated, "params", 0.5, warmup_steps=50)
    opt = torch.optim.Adam([{"params": gated.gate_parameters(), "lr": 0.05},
                            {"params": list(lag.parameters()), "lr": 0.05}])
    for step in range(400):
        opt.zero_grad()
        lag(gated, step)["penalty"].backward()
        lag.flip_grads()
        opt.step()
    assert lag(gated, 400)["expected_sparsity"].item() == pytest.approx(0.5, abs=0.03)


def test_checkpoints_are_atomic_rotated_and_fall_back(tmp_path, caplog):
    for step in (10, 20, 30, 40):
        state = {**{key: None for key in REQUIRED}, "step": step, "student": torch.full((3,), float(step))}
        save_checkpoint(tmp_path, step, state, keep_last=3)
    assert [s for s, _ in checkpoint_files(tmp_path)] == [40, 30, 20]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    latest = checkpoint_files(tmp_path)[0][1]
    latest.write_bytes(latest.read_bytes()[:100])  # a torn write of the newest
    state = load_latest(tmp_path)
    assert state["step"] == 30 and "skipping damaged checkpoint" in caplog.text
    for _, path in checkpoint_files(tmp_path):
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="every checkpoint"):
        load_latest(tmp_path)
    assert load_latest(tmp_path / "none") is None


def test_calibrate_lands_the_eval_masks_on_the_target():
    from prune.calibrate import calibrate

    gated = GatedEncoder(build_preset("wavlm_base_tiny")).train()
    target = 0.4 * count_params(gated.config)
    reached = calibrate(gated, GatedEncoder.expected_params, target, tolerance=0.005)
    assert not gated.training  # it measured what will be cut: the eval masks
    assert reached == gated.expected_params().item()
    assert abs(reached - target) <= 0.005 * target


def test_calibrate_lands_a_macs_target():
    from prune.calibrate import calibrate

    gated = GatedEncoder(build_preset("hubert_base_tiny")).train()
    size = lambda g: g.expected_macs(1.0)  # noqa: E731
    target = 0.4 * count_macs(gated.config, 1.0)
    reached = calibrate(gated, size, target, tolerance=0.005)
    assert abs(reached - target) <= 0.005 * target
    assert reached == size(gated).item()
