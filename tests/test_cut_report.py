"""The cut between the stages and what the report says about it: whether the training or only the
cut reached the size target, the student's similarity to the teacher around the cut, and CPU
latencies measured interleaved with their spread."""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers_train import noise_corpus, prune_cli, short_run_args

from prune.measured import fastest, interleaved, spread
from prune.train.config import compose, validate
from prune.train.distill import distill_loss, frame_mask
from prune.train.recipe import PruneRecipe, cut_record, cut_warning, lag_warning
from prune.evaluate.report import target_line


def test_interleaved_times_round_robin_and_reports_the_spread():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-ups first, then alternating
    assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())
    assert fastest([0.3, 0.1, 0.2]) == 0.1
    assert spread([0.1, 0.11, 0.2]) == "+10/+100%"


def test_distill_loss_gives_each_layers_cosine_and_l1():
    pred = [torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]]),
            torch.tensor([[[2.0, 0.0], [0.0, -1.0], [1.0, 1.0]]])]
    target = [torch.tensor([[[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]]),
              torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])]
    mask = frame_mask(torch.tensor([2]), 3)  # frame 2 is padding
    _, parts = distill_loss(pred, target, mask, cos_type="log_sig", reduction="mean")
    assert parts["layer_cos"].tolist() == pytest.approx([(2 ** -0.5 + 1.0) / 2, (1.0 - 1.0) / 2])
    assert parts["layer_l1"].tolist() == pytest.approx([(0.5 + 0.5) / 2, (0.5 + 1.0) / 2])


def _cut(gates, cut, target=1000.0, tolerance=0.005, max_shift=0.05, calibrated=True):
    lag = SimpleNamespace(kind="params", full=4000.0)
    p = SimpleNamespace(tolerance=tolerance, max_cut_shift=max_shift)
    return cut_record(lag, target, gates, cut, p, calibrated)


def test_the_cut_record_tells_training_from_cut():
    near = _cut(gates=1030.0, cut=1002.0)  # the gates 3% off: the cut only nudged them
    assert near["target_reached_by"] == "training" and near["shift"] == pytest.approx(0.028)
    assert cut_warning(near) is None
    far = _cut(gates=3257.0, cut=1001.0)  # the Lagrangian barely moved: the cut did it all
    assert far["target_reached_by"] == "cut" and far["gates_sparsity"] == pytest.approx(1 - 3257 / 4000)
    warning = cut_warning(far)
    assert warning.startswith("the training did not reach the size target: the gates ended at 3,257 params, "
                              "226% above the target of 1,000; the cut shifted every threshold to 1,001")
    assert "more trainer.prune_steps, a shorter pruning.warmup_steps or a higher optim.lambda_lr" in warning
    missed = _cut(gates=1300.0, cut=1300.0, calibrated=False)  # pruning.calibrate=false, 30% off
    assert missed["target_reached_by"] is None and "pruning.calibrate=false" in cut_warning(missed)
    meta = {"target_kind": "params", "target_sparsity": 0.75, "reached_sparsity": 0.7496}
    assert target_line({**meta, "cut": near}).startswith("target: params sparsity 0.7500, reached 0.7496 by training (")
    assert "reached 0.7496 only by the cut, NOT by training" in target_line({**meta, "cut": far})
    assert " by training (" not in target_line({**meta, "cut": far})
    # trained to params, cut onto a latency (pruning.cut_target_kind): the cut decides by design
    onto = {**_cut(gates=14.0, cut=10.02, target=10.0), "kind": "latency", "unit": "ms"}
    line = target_line({**meta, "cut": onto})
    assert line == ("target: params sparsity 0.7500 (the training's); cut onto latency 10.00 ms as "
                    "pruning.cut_target_kind asks (from 14.00 ms where the gates ended): 10.02 ms, on it")
    assert "NOT" not in line
    assert "NOT reached" in target_line({**meta, "reached_sparsity": 0.675, "cut": missed})


def _recipe(tmp_path, *overrides):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=4, n_valid=3)
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}",
                                "trainer.prune_steps=10", "trainer.final_steps=4", "pruning.warmup_steps=5",
                                "optim.warmup_steps=2", "data.batch_size=2", "logging.tensorboard=false",
                                "pruning.target=0.5", *overrides])
    validate(cfg)
    recipe = PruneRecipe(cfg, tmp_path / "run")
    recipe.setup()
    recipe.step = cfg.trainer.prune_steps
    return recipe


def _points(recipe):
    return {e["point"]: e for e in recipe.history if "point" in e}


def test_similarity_is_measured_on_the_gated_model_before_and_the_cut_model_after(tmp_path):
    """No calibration: the cut model computes what the gated model did in eval mode, so the two
    figures agree; a calibrated cut from fresh gates (nearly all open) to half the params does not."""
    plain = _recipe(tmp_path / "plain", "pruning.calibrate=false")
    plain._finish_pruning()
    points = _points(plain)
    before, after = points["before cut"], points["after cut"]
    assert before["stage"] == "prune" and after["stage"] == "final" and before["layers"] == [0, 1, 2]
    assert after["cos"] == pytest.approx(before["cos"], abs=1e-4)
    assert after["l1"] == pytest.approx(before["l1"], rel=1e-3)
    assert plain.cut["target_reached_by"] is None and plain.cut["shift"] < 1e-3  # cut as they are, off target
    plain.cleanup()

    cut = _recipe(tmp_path / "cut")
    cut._finish_pruning()
    before, after = _points(cut)["before cut"], _points(cut)["after cut"]
    assert cut.cut["target_reached_by"] == "cut" and cut.cut["shift"] > 0.5
    assert max(after["cos"]) < min(before["cos"])  # the cut, not the training, removed half the params
    cut.cleanup()


def test_a_cut_far_from_the_gates_is_loud_in_the_log_and_the_report(tmp_path):
    """optim.gate_lr=0: the gates never move, so the cut alone takes the size from (nearly) the
    full model to the target; the log warns, the report does not say the training reached it."""
    train, valid = noise_corpus(tmp_path / "corpus", n_train=6, n_valid=2)
    run = tmp_path / "run"
    result = prune_cli(short_run_args(train, valid, run, prune_steps=6, final_steps=2,
                                      extra=["optim.gate_lr=0", "trainer.threads=1"]))
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr  # Hydra's job log goes to stdout
    warnings = [line for line in log.splitlines() if "[WARNING]" in line]
    assert any("the training did not reach the size target: the gates ended at " in w
               and "the cut shifted every threshold" in w for w in warnings), log[-3000:]
    assert any("step 3: the size target reached its final sparsity" in w and "the Lagrangian lags" in w
               for w in warnings), log[-3000:]  # said at the end of the warm-up (prune_steps // 2), before the cut
    report = json.loads((run / "report.json").read_text())
    cut = report["cut"]
    assert report["target_reached_by"] == "cut" and cut["unit"] == "params"
    assert cut["gates_size"] > 0.9 * 24080 and abs(cut["cut_size"] - cut["target_size"]) <= 0.005 * cut["target_size"]
    assert cut["cut_size"] == report["after"]["params"] and cut["shift"] > cut["max_cut_shift"] == 0.05
    text = (run / "report.txt").read_text()
    target = next(line for line in text.splitlines() if line.startswith("target:"))
    assert "only by the cut, NOT by training" in target and " by training (" not in target

    # the similarity to the teacher, per distilled layer, at the three points
    similarity = report["similarity"]
    assert similarity["layers"] == [0, 1, 2] and list(similarity["points"]) == ["before cut", "after cut", "end"]
    assert [p["step"] for p in similarity["points"].values()] == [6, 6, 8]
    for point in similarity["points"].values():
        assert len(point["cos"]) == len(point["l1"]) == 3
        assert all(-1 <= c <= 1 for c in point["cos"]) and all(d >= 0 for d in point["l1"])
    assert "similarity to the teacher, cosine / L1 of each distilled layer's prediction" in text
    assert "after cut (step 6)" in text and "cosine to the teacher" in log

    # latencies: the fastest of the interleaved repeats, with their spread
    lat, spread_s = report["cpu_latency_seconds"], report["cpu_latency_spread_seconds"]
    for name in ("teacher", "pruned"):
        assert lat[name] == spread_s[name]["min"] <= spread_s[name]["median"] <= spread_s[name]["max"]
    assert "interleaved" in report["cpu_latency_method"]
    assert "CPU latency: the fastest of 10 passes, the models interleaved; the median and max above it: teacher +" \
        in text


def test_resume_after_the_cut_keeps_the_cut_record(tmp_path):
    recipe = _recipe(tmp_path)
    recipe._finish_pruning()
    record = recipe.cut
    resumed = PruneRecipe(recipe.cfg, recipe.run_dir)
    resumed.setup()
    assert resumed.stage == "final" and resumed.cut == record
    assert [e.get("point") for e in resumed.history][-2:] == ["before cut", "after cut"]
    recipe.cleanup()
    resumed.cleanup()


def test_a_lagging_lagrangian_is_named_at_the_end_of_the_warm_up():
    # the short 90% run of #16 with lambda_lr 0.02: 0.482 when the target reached 0.9
    line = lag_warning(500, 0.9, 0.482, 0.02, 1000)
    assert line.startswith("step 500: the size target reached its final sparsity 0.900, but the gates' expected "
                           "sparsity is 0.482 (418% above the target size)")
    assert "optim.lambda_lr (now 0.02;" in line and "1000 pruning steps" in line
    assert lag_warning(750, 0.9, 0.88, 0.5, 1500) is None  # 20% above the target size: it catches up
    assert lag_warning(750, 0.9, 0.86, 0.5, 1500) is not None  # 40% above
    assert lag_warning(800, 0.75, 0.76, 0.02, 1500) is None  # ahead of the target
