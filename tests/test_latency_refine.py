"""The latency cut refined by timing (pruning.latency_refine) and the cut onto another measure
(pruning.cut_target_kind / cut_target), #18. The timer is replaced by one that reads the table and
adds a known bias (the cut model runs 10% slower than the table says, the unpruned one as the table
says), so where the refined cut must land is exact: on the asked latency, where the table's
calibration alone is 10% off."""

import json
import logging

import pytest
import torch

import prune.latency_refine as latency_refine
from helpers_train import noise_corpus, short_run_args
from prune.calibrate import calibrate
from prune.compile import compile_encoder
from prune.lagrangian import Lagrangian
from prune.latency import load_table, save_table
from prune.models import build_preset, preset_config
from prune.structures import GatedEncoder
from prune.train.config import ConfigError, compose, validate
from prune.train.recipe import run_pruning
from test_latency import closed_form, synthetic_table

BIAS = 1.1  # the cut model measures 10% above the table's prediction


def biased_timer(table_path, models, processes=0):
    """Milliseconds as the table predicts them, the cut model's times BIAS."""
    table = load_table(table_path)
    return {name: 1e3 * table.latency(m.config) * (BIAS if name == "cut" else 1.0) for name, m in models.items()}


@pytest.fixture
def table(tmp_path):
    return load_table(save_table(synthetic_table(), tmp_path / "latency.json"))


def test_refining_lands_the_measured_latency_where_the_table_alone_is_10_percent_off(table, monkeypatch):
    calls = []
    monkeypatch.setattr(latency_refine, "time_models", lambda p, m, n=0: calls.append(p) or biased_timer(p, m))
    torch.manual_seed(0)
    unpruned = build_preset("hubert_base_tiny").eval()
    gated = GatedEncoder(build_preset("hubert_base_tiny"))
    gated.model.load_state_dict(unpruned.state_dict())
    lag = Lagrangian(gated, "latency", 0.3, 0, settings={"table": table})  # fine steps left there
    calibrate(gated, lag.expected_size, lag.target_size, 0.005)
    record = latency_refine.refine(gated, unpruned, lag.expected_size, table, lag.target_size, lag.full, 0.005, 2)
    asked = lag.target_size
    # the calibrated cut, then one re-calibrated cut, which lands within CLOSE_ENOUGH and ends the rounds
    assert len(calls) == 2 and calls[0] == table.path
    # round 0 is the table's calibration: on target by the table, 10% off measured
    assert record["predicted"][0] == pytest.approx(asked, rel=0.005)
    assert record["measured"][0] == pytest.approx(BIAS * asked, rel=0.006)
    # round 1 asked the table for asked / 1.1: measured lands on the target
    assert record["table_targets"][1] == pytest.approx(asked * asked / record["measured"][0], rel=1e-9)
    assert record["chosen"] != 0
    chosen = record["measured"][record["chosen"]]
    assert abs(chosen - asked) <= 0.01 * asked
    # the gates are left at the chosen candidate: its cut is the one measured
    cut = compile_encoder(gated).config
    assert BIAS * 1e3 * closed_form(cut) == pytest.approx(chosen, rel=1e-6)


def test_the_next_target_is_the_ratio_then_the_secant_which_takes_out_a_constant_bias():
    assert latency_refine.next_target([10.0], [12.0], 10.0) == pytest.approx(10.0 * 10 / 12)
    # measured = 2 + 1.1 x table: the ratio from (10, 13) asks 7.69 (measured 10.46, 4.6% off); the
    # secant through both points lands exactly
    measured = lambda t: 2 + 1.1 * t  # noqa: E731
    t1 = latency_refine.next_target([10.0], [measured(10.0)], 10.0)
    assert abs(measured(t1) - 10) > 0.04 * 10
    t2 = latency_refine.next_target([10.0, t1], [measured(10.0), measured(t1)], 10.0)
    assert measured(t2) == pytest.approx(10.0, rel=1e-9)
    # a flat or falling secant (timing noise) falls back to the ratio
    assert latency_refine.next_target([10.0, 8.0], [12.0, 12.0], 10.0) == pytest.approx(8.0 * 10 / 12)
    assert latency_refine.next_target([10.0, 8.0], [11.0, 12.0], 10.0) == pytest.approx(8.0 * 10 / 12)


def test_once_the_timings_straddle_the_asked_latency_the_next_target_is_inside_the_bracket():
    # the demo's latency run (session 2026-12-03): 10.0 -> 15.1 ms, then 6.6 -> 12.2, then 4.0 -> 7.4;
    # the secant of the last two would extrapolate, the bracket (4.0, 6.6) interpolates
    targets, measured = [10.0, 6.6, 4.0], [15.1, 12.2, 7.4]
    t = latency_refine.next_target(targets, measured, 10.0)
    assert t == pytest.approx(4.0 + (10.0 - 7.4) / (12.2 - 7.4) * (6.6 - 4.0), rel=1e-12)
    assert 4.0 < t < 6.6
    # the nearest point on each side makes the bracket, not the last two timings
    t = latency_refine.next_target([10.0, 6.0, 8.0, 4.0], [13.0, 9.0, 11.0, 5.0], 10.0)
    assert t == pytest.approx(7.0, rel=1e-12)  # between (6.0, 9.0) and (8.0, 11.0)


def test_a_refinement_that_lands_stops_and_one_that_cannot_keeps_the_nearest(table, monkeypatch):
    """A timer whose bias jumps (the cut model 50% slower than the table above 0.4 of the unpruned
    latency, 10% below: whole blocks dropping at once) cannot be hit exactly: every round is used and
    the nearest candidate kept; a timer with a plain 10% bias is hit in one round, and the rounds stop."""
    full = 1e3 * closed_form(preset_config("hubert_base_tiny"))

    def jumpy(table_path, models, processes=0):
        ms = biased_timer(table_path, models)
        cut = ms["cut"] / BIAS
        return {**ms, "cut": cut * (1.5 if cut > 0.4 * full else 1.1)}

    torch.manual_seed(0)
    unpruned = build_preset("hubert_base_tiny").eval()
    for timer, rounds, calls in ((jumpy, 4, 5), (biased_timer, 4, 2)):
        gated = GatedEncoder(build_preset("hubert_base_tiny"))
        gated.model.load_state_dict(unpruned.state_dict())
        lag = Lagrangian(gated, "latency", 0.3, 0, settings={"table": table})
        calibrate(gated, lag.expected_size, lag.target_size, 0.005)
        monkeypatch.setattr(latency_refine, "time_models", timer)
        record = latency_refine.refine(gated, unpruned, lag.expected_size, table, lag.target_size, lag.full, 0.005,
                                       rounds)
        assert len(record["measured"]) == calls
        errors = [abs(m - lag.target_size) for m in record["measured"]]
        assert record["chosen"] == errors.index(min(errors))
    assert min(errors) <= latency_refine.CLOSE_ENOUGH * lag.target_size


def test_the_refinement_is_skipped_in_one_reason_where_the_table_cannot_be_honoured(table):
    here = latency_refine.machine("cpu")
    made = dict(synthetic_table(threads=torch.get_num_threads()))
    made["machine"] = dict(here)
    from prune.latency import LatencyTable

    assert latency_refine.skip_reason(LatencyTable(made)) is None
    assert "torch test" in latency_refine.skip_reason(table)  # the synthetic table's torch is "test"
    assert "on cuda" in latency_refine.skip_reason(LatencyTable({**made, "machine": {**here, "device": "cuda (x)"}}))
    other = LatencyTable({**made, "threads": torch.get_num_threads() + 1})
    assert "thread(s), this process runs" in latency_refine.skip_reason(other)
    assert "distributed" in latency_refine.skip_reason(LatencyTable(made), distributed=True)
    # a table timed under another allocator setting (prune.allocator); tables without the field pass
    steady = LatencyTable({**made, "allocator": latency_refine.allocator.steady()})
    assert latency_refine.skip_reason(steady) is None
    dynamic = LatencyTable({**made, "allocator": "glibc 2.0: mallopt refused"})
    assert "another allocator setting" in latency_refine.skip_reason(dynamic)


def tiny_run(tmp_path, name, extra):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=8, n_valid=2)
    args = short_run_args(train, valid, tmp_path / name, prune_steps=6, final_steps=2, extra=extra)
    overrides = [a for a in args[2:] if not a.startswith("hydra.")]
    run_pruning(compose("tiny_demo", overrides), tmp_path / name)
    return json.loads((tmp_path / name / "report.json").read_text())


def test_a_params_run_cut_to_a_latency_lands_on_it_measured(tmp_path, monkeypatch, caplog):
    """Train to a params target, cut to a latency: the refined cut's (stubbed) measured latency is
    on the asked one; with latency_refine=0 the cut is the table's (10% off measured)."""
    path = save_table(synthetic_table(threads=2), tmp_path / "synthetic.json")
    monkeypatch.setattr(latency_refine, "skip_reason", lambda table, distributed=False: None)
    monkeypatch.setattr(latency_refine, "time_models", biased_timer)
    cut_to = ["pruning.target_kind=params", "pruning.target=0.3", "pruning.cut_target_kind=latency",
              "pruning.cut_target=0.4", f"pruning.latency_table={path}"]
    full_ms = 1e3 * closed_form(preset_config("hubert_base_tiny"))
    with caplog.at_level(logging.INFO, logger="prune.train.recipe"):
        report = tiny_run(tmp_path, "refined", cut_to)
    cut = report["cut"]
    assert (cut["kind"], cut["unit"], report["target_kind"]) == ("latency", "ms", "params")
    refined = cut["latency_refine"]
    assert refined["asked"] == pytest.approx(0.6 * full_ms, rel=1e-9)
    assert abs(refined["measured"][refined["chosen"]] - refined["asked"]) <= 0.02 * refined["asked"]
    # the cut model is the chosen candidate: its table latency times the bias is what was measured
    predicted = report["latency_target"]["predicted_ms"]["pruned"]
    assert BIAS * predicted == pytest.approx(refined["measured"][refined["chosen"]], rel=1e-6)
    assert any("pruning.latency_refine: asked" in r.getMessage() for r in caplog.records)

    plain = tiny_run(tmp_path, "plain", [*cut_to, "pruning.latency_refine=0"])
    assert "latency_refine" not in plain["cut"]
    table_cut = plain["latency_target"]["predicted_ms"]["pruned"]
    assert table_cut == pytest.approx(0.6 * full_ms, rel=0.005)  # on target by the table, 10% off measured
    assert abs(BIAS * table_cut - 0.6 * full_ms) > 0.09 * 0.6 * full_ms


def test_a_table_this_machine_cannot_honour_skips_the_refinement_in_one_log_line(tmp_path, caplog):
    path = save_table(synthetic_table(threads=2), tmp_path / "synthetic.json")  # torch "test": not this one
    with caplog.at_level(logging.INFO, logger="prune.train.recipe"):
        report = tiny_run(tmp_path, "run", ["pruning.target_kind=latency", "pruning.target=0.4",
                                            f"pruning.latency_table={path}"])
    skipped = [r.getMessage() for r in caplog.records if "latency_refine" in r.getMessage()]
    assert skipped == ["pruning.latency_refine: not timing the cut (the table was profiled with torch test, this is "
                       f"torch {torch.__version__}); the table's calibration stands"]
    assert "latency_refine" not in report["cut"]
    assert report["cut"]["cut_size"] == pytest.approx(report["cut"]["target_size"], rel=0.005)


def test_the_cut_target_is_checked_before_compute(tmp_path):
    good = save_table(synthetic_table(), tmp_path / "good.json")
    validate(compose("tiny_demo", ["pruning.cut_target_kind=latency", "pruning.cut_target=0.4",
                                   f"pruning.latency_table={good}"]))
    cases = [
        (["pruning.cut_target_kind=latency"], r"^pruning\.latency_table: pruning\.cut_target_kind=latency needs it; "
                                              r"make one with `prune profile"),
        (["pruning.cut_target_kind=flops"], r"^pruning\.cut_target_kind: must be null or one of \("),
        (["pruning.cut_target=0.4"], r"^pruning\.cut_target: 0\.4 given without pruning\.cut_target_kind"),
        ([f"pruning.latency_table={good}", "pruning.cut_target_kind=latency", "pruning.cut_target=1.5"],
         r"^pruning\.cut_target: a sparsity must be in \(0, 1\), got 1\.5"),
        (["pruning.latency_refine=-1"], r"^pruning\.latency_refine: must be a whole number >= 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate(compose("tiny_demo", overrides))


def test_timing_in_fresh_processes_gives_the_median_ratio_to_the_first_model(tmp_path):
    """processes=N: every model exported, timed in N fresh `python -m prune.latency_worker` processes;
    the first model's figure is the median of its times, every other one's the median of its ratios
    to the first times that."""
    import statistics

    from prune.latency_profile import profile, table_latencies

    config = preset_config("hubert_base_tiny")
    table = save_table(profile(config, seconds=0.1, repeats=1, conv_points=1, ffn_points=1, head_points=1,
                               threads=torch.get_num_threads()), tmp_path / "tiny.json")
    torch.manual_seed(0)
    unpruned = build_preset("hubert_base_tiny").eval()
    gated = GatedEncoder(build_preset("hubert_base_tiny"))
    from prune.seeded import set_random_gates

    set_random_gates(gated, 0.6, seed=0)
    cut = compile_encoder(gated.eval()).eval()
    check = table_latencies(str(table), {"unpruned": unpruned, "cut": cut}, repeats=2, processes=2)
    runs = check["per_process_ms"]
    assert check["processes"] == 2 and len(runs) == 2 and all(set(r) == {"unpruned", "cut"} for r in runs)
    base = statistics.median(r["unpruned"] for r in runs)
    assert check["measured_ms"]["unpruned"] == pytest.approx(base, rel=1e-9)
    assert check["measured_ms"]["cut"] == pytest.approx(base * statistics.median(r["cut"] / r["unpruned"] for r in runs),
                                                        rel=1e-9)
    assert all(0 < r["cut"] < 10 * r["unpruned"] for r in runs)  # real timings of the two models


def test_latency_processes_must_be_a_whole_number():
    with pytest.raises(ConfigError, match="pruning.latency_processes: must be a whole number >= 0"):
        validate(compose("tiny_demo", ["pruning.latency_processes=-1"]))


def test_a_fresh_process_that_fails_leaves_a_warning_and_the_timing_done_here(tmp_path, monkeypatch):
    import prune.latency_profile as latency_profile

    config = preset_config("hubert_base_tiny")
    table = save_table(latency_profile.profile(config, seconds=0.1, repeats=1, conv_points=1, ffn_points=1,
                                               head_points=1, threads=torch.get_num_threads()), tmp_path / "t.json")

    def broken(*args, **kwargs):
        raise RuntimeError("timing in a fresh process failed (python -m prune.latency_worker): ImportError: x")

    monkeypatch.setattr(latency_profile, "_fresh_process_times", broken)
    model = build_preset("hubert_base_tiny").eval()
    with pytest.warns(RuntimeWarning, match="ImportError: x; timing in this process instead"):
        check = latency_profile.table_latencies(str(table), {"a": model}, repeats=1, processes=3)
    assert check["processes"] == 0 and "ImportError" in check["fallback"] and check["measured_ms"]["a"] > 0
