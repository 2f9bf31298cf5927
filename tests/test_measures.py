"""The size-measure registry (prune.measures): each measure's sizes and target reading, the
Lagrangian on each, and a new measure as one entry, through the Lagrangian, the cut's
calibration, the config check and the cut record."""

from types import SimpleNamespace

import pytest
import torch

import prune.lagrangian
from prune import measures
from prune.calibrate import calibrate
from prune.compile import compile_encoder
from prune.lagrangian import Lagrangian
from prune.measures import MEASURES, Count, Measure
from prune.models import build_preset
from prune.structures import GatedEncoder, count_macs, count_params
from prune.train.config import ConfigError, compose, validate
from prune.train.recipe import cut_record


@pytest.fixture(scope="module")
def gated():
    torch.manual_seed(0)
    return GatedEncoder(build_preset("hubert_base_tiny")).train()


def test_the_registry_holds_the_five_measures_and_target_kinds_follows_it(monkeypatch):
    kinds = ("params", "param_count", "macs", "latency", "latency_ms")
    assert measures.names() == kinds == prune.lagrangian.TARGET_KINDS
    assert [MEASURES[k].unit for k in measures.names()] == ["params", "params", "MACs", "ms", "ms"]
    toy = Measure("toy", "things", size=lambda config, seconds: 1.0, expected=lambda gated, seconds: torch.ones(()))
    monkeypatch.setitem(MEASURES, "toy", toy)
    assert prune.lagrangian.TARGET_KINDS == (*kinds, "toy")  # not a copy made at import
    with pytest.raises(ValueError, match="already registered"):
        measures.register(toy)
    with pytest.raises(ValueError, match=r"^pruning.target_kind must be one of \('params', 'param_count', 'macs', "
                                         r"'latency', 'latency_ms', 'toy'\), got 'flops'$"):
        measures.get("flops")


@pytest.mark.parametrize("kind, seconds", [("params", 1.0), ("param_count", 1.0), ("macs", 2.5)])
def test_each_measure_sizes_a_config_and_a_gated_encoder(gated, kind, seconds):
    measure, config = MEASURES[kind], gated.config
    plain = count_macs(config, seconds) if kind == "macs" else count_params(config)
    assert measure.size_of(config, seconds) == plain
    expected = gated.expected_macs(seconds) if kind == "macs" else gated.expected_params()
    assert torch.equal(measure.expected(gated, seconds), expected)
    gated.eval()  # the eval masks' expected size is the cut model's size
    cut = compile_encoder(gated).config
    assert measure.expected(gated, seconds).item() == pytest.approx(measure.size_of(cut, seconds), rel=1e-6)
    assert measure.size_of(cut, seconds) < plain
    gated.train()


def test_target_readings_and_their_messages():
    params, count = MEASURES["params"], MEASURES["param_count"]
    assert params.target_sparsity(0.75, 4000.0) == 0.75 and count.target_sparsity(1000, 4000.0) == 0.75
    params.check_target(0.3)
    with pytest.raises(ValueError, match=r"^pruning\.target: a sparsity must be in \(0, 1\), got 1\.5$"):
        params.check_target(1.5)
    count.check_target(1000, 4000.0)
    with pytest.raises(ValueError, match=r"^pruning\.target: with pruning\.target_kind=param_count it is the number "
                                         r"of parameters to keep, a whole number such as 23585946, got 0\.5"):
        count.check_target(0.5)
    with pytest.raises(ValueError, match=r"^pruning\.target: 5000 parameters to keep is not below the "
                                         r"teacher's 4,000$"):
        count.check_target(5000, 4000.0)


@pytest.mark.parametrize("kind, target", [("params", 0.6), ("param_count", None), ("macs", 0.6)])
def test_the_lagrangian_reads_its_size_from_the_measure(gated, kind, target):
    measure = MEASURES[kind]
    full = measure.size_of(gated.config, 2.0)
    target = 0.4 * full if target is None else target
    lag = Lagrangian(gated, kind, target, warmup_steps=0, seconds=2.0)
    assert lag.measure is measure and lag.full == full
    assert lag.target_sparsity == pytest.approx(0.6) and lag.target_size == pytest.approx(0.4 * full)
    out = lag(gated, step=0)
    assert torch.equal(out["expected_size"], measure.expected(gated, 2.0))
    assert out["expected_sparsity"].item() == pytest.approx(1 - measure.expected(gated, 2.0).item() / full)


def weighted_size(config, seconds):
    """The toy measure: parameters plus MACs per second of audio (a made-up cost)."""
    return count_params(config) + count_macs(config, seconds) / seconds


def weighted_expected(gated, seconds):
    return gated.expected_params() + gated.expected_macs(seconds) / seconds


TOY = Measure("weighted", "cost units", size=weighted_size, expected=weighted_expected)


def test_a_new_measure_is_one_entry(monkeypatch):
    """Registered, a measure drives the Lagrangian, the cut's calibration, the config check and
    the cut record, with nothing else added."""
    monkeypatch.setitem(MEASURES, TOY.name, TOY)
    torch.manual_seed(0)
    gated = GatedEncoder(build_preset("hubert_base_tiny")).train()
    lag = Lagrangian(gated, "weighted", 0.5, warmup_steps=50, seconds=2.0)
    assert lag.full == weighted_size(gated.config, 2.0)
    opt = torch.optim.Adam([{"params": gated.gate_parameters(), "lr": 0.05},
                            {"params": list(lag.parameters()), "lr": 0.05}])
    for step in range(300):
        opt.zero_grad()
        lag(gated, step)["penalty"].backward()
        lag.flip_grads()
        opt.step()
    assert lag(gated, 300)["expected_sparsity"].item() == pytest.approx(0.5, abs=0.05)

    reached = calibrate(gated, lag.expected_size, lag.target_size, tolerance=0.005)
    assert abs(reached - lag.target_size) <= 0.005 * lag.target_size
    cut_size = lag.size_of(compile_encoder(gated).config)
    assert cut_size == pytest.approx(reached, rel=1e-4)  # the cut model is what the eval masks measured
    record = cut_record(lag, lag.target_size, reached, cut_size, SimpleNamespace(tolerance=0.005, max_cut_shift=0.05),
                        calibrated=True)
    assert (record["kind"], record["unit"], record["target_reached_by"]) == ("weighted", "cost units", "training")

    validate(compose("tiny_demo", ["pruning.target_kind=weighted", "pruning.target=0.4"]))
    with pytest.raises(ConfigError, match=r"^pruning\.target: a sparsity must be in \(0, 1\), got 2\.0$"):
        validate(compose("tiny_demo", ["pruning.target_kind=weighted", "pruning.target=2"]))


def test_an_absolute_measure_is_checked_against_the_teachers_size(monkeypatch):
    """A count reading takes the preset teacher's size in that measure for its upper bound."""
    cost = Measure("cost_count", "cost units", size=weighted_size, expected=weighted_expected,
                   reading=Count("cost units", fraction_kind="weighted", example=1000))
    monkeypatch.setitem(MEASURES, cost.name, cost)
    cfg = compose("tiny_demo", ["pruning.target_kind=cost_count", "pruning.target=1e12"])
    full = weighted_size(build_preset(cfg.teacher.preset, **cfg.teacher.overrides).config, cfg.pruning.macs_seconds)
    with pytest.raises(ConfigError, match=rf"^pruning\.target: 1000000000000 cost units to keep is not below the "
                                          rf"teacher's {full:,.0f}$"):
        validate(cfg)
    validate(compose("tiny_demo", ["pruning.target_kind=cost_count", f"pruning.target={int(full // 2)}"]))
