"""Latency tables and the latency target (#18): the table's format, its interpolation, the
differentiable expected latency, landing on a latency target after the cut, the clear errors
(malformed, other family, other threads), and one real `prune profile` of a tiny preset.

The tables are synthetic (deterministic numbers from closed forms that the interpolation
reproduces exactly: bilinear in a conv layer's channels, linear in FFN units, any value at each
head count), so every latency below has an exact expected value."""

import json
from types import SimpleNamespace

import pytest
import torch

from helpers_train import noise_corpus, prune_cli, short_run_args
from prune.calibrate import calibrate
from prune.compile import compile_encoder
from prune.lagrangian import Lagrangian
from prune.latency import (FORMAT, VERSION, LatencyTable, LatencyTableError, fingerprint, interp1, interp2,
                           load_table, save_table)
from prune.latency_profile import fit_line, plan, widths
from prune.measures import MEASURES
from prune.models import build_preset, preset_config
from prune.seeded import set_random_gates
from prune.structures import GatedEncoder
from prune.train.config import ConfigError, compose, validate
from prune.train.recipe import cut_record

US = 1e-6


def conv_s(c_in, c_out):
    return US * (10 + c_in * c_out / 100)


def proj_s(c):
    return US * (5 + c)


def attn_s(h):
    return US * (20 + 7 * h ** 1.5)  # not linear: only the grid's whole head counts are exact


def ffn_s(u):
    return US * (3 + 0.5 * u)


FIXED = 100 * US


def synthetic_table(preset="hubert_base_tiny", threads=2, scale=1.0):
    """A table of ``preset`` with the closed forms above at the profiler's grid widths."""
    config = preset_config(preset)
    full = [c for c, _, _ in config.extractor_conv_layer_config]
    convs = []
    for i in range(len(full)):
        ins, outs = ([1] if i == 0 else widths(full[i - 1], 4)), widths(full[i], 4)
        convs.append({"in": ins, "out": outs, "seconds": [[conv_s(a, b) for b in outs] for a in ins]})
    heads, units, channels = list(range(max(config.encoder_num_heads) + 1)), widths(48, 4), widths(full[-1], 4)
    return {"format": FORMAT, "version": VERSION, "machine": {"platform": "test", "cpu": "test", "torch": "test",
                                                              "device": "cpu"},
            "threads": threads, "seconds": 1.0, "batch": 1, "repeats": 1, "clock": "wall",
            "model": fingerprint(config), "fixed": FIXED, "conv": convs,
            "projection": {"channels": channels, "seconds": [proj_s(c) for c in channels]},
            "attention": {"heads": heads, "seconds": [attn_s(h) for h in heads]},
            "ffn": {"units": units, "seconds": [ffn_s(u) for u in units]}, "scale": scale}


def closed_form(config, scale=1.0):
    """The latency of a plain config with the formulas (what the table must read)."""
    chans = [c for c, _, _ in config.extractor_conv_layer_config]
    total = FIXED + sum(conv_s(1 if i == 0 else chans[i - 1], c) for i, c in enumerate(chans)) + proj_s(chans[-1])
    for layer in range(config.encoder_num_layers):
        if config.encoder_attention_kept[layer]:
            total += attn_s(config.encoder_num_heads[layer])
        if config.encoder_ff_kept[layer]:
            total += ffn_s(config.encoder_ff_interm_features[layer])
    return scale * total


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "latency.json"
    save_table(synthetic_table(), path)
    return load_table(path)


def pruned_gated(seed, sparsity=0.5):
    torch.manual_seed(seed)
    gated = GatedEncoder(build_preset("hubert_base_tiny"))
    set_random_gates(gated, sparsity, seed=seed)
    return gated.eval()


# ------------------------------------------------------------------------------------- format
def test_a_table_round_trips_and_is_written_whole(tmp_path):
    data = synthetic_table()
    path = save_table(data, tmp_path / "t.json")
    assert load_table(path).data == json.loads(json.dumps(data))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temporary file left
    bad = {**data, "ffn": {"units": [0, 12], "seconds": [1.0]}}
    with pytest.raises(LatencyTableError, match=r"ffn: an ascending 'units' grid and one 'seconds' value per point"):
        save_table(bad, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()  # refused before anything is written


@pytest.mark.parametrize("edit, message", [
    (lambda d: {**d, "version": 2}, r"latency table version 2, this prune reads version 1; profile again"),
    (lambda d: {k: v for k, v in d.items() if k != "format"}, r"not a usable latency table \(no \"format\""),
    (lambda d: {**d, "conv": d["conv"][:3]}, r"'conv': one entry per conv layer of the model"),
    (lambda d: {**d, "attention": {"heads": [0, 2, 1], "seconds": [1, 2, 3]}}, r"attention: an ascending 'heads'"),
    (lambda d: {**d, "threads": 0}, r"'threads' must be a whole number >= 1"),
    (lambda d: {**d, "scale": float("nan")}, r"'scale' and 'offset' must be numbers"),
    (lambda d: {**d, "offset": "1 ms"}, r"'scale' and 'offset' must be numbers"),
])
def test_a_malformed_or_foreign_version_table_is_refused_in_one_line(tmp_path, edit, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(edit(synthetic_table())))
    with pytest.raises(LatencyTableError, match=message) as err:
        load_table(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    path.write_text("{not json")
    with pytest.raises(LatencyTableError, match=r"not a usable latency table \(JSONDecodeError"):
        load_table(path)


def test_a_table_for_another_family_shape_or_thread_count_is_refused(table):
    table.check_model(preset_config("hubert_base_tiny"))
    with pytest.raises(LatencyTableError, match=r"profiled for another model \(architecture hubert vs wav2vec2 in the "
                                                r"teacher\); profile this one"):
        table.check_model(preset_config("wav2vec2_base_tiny"), "the teacher")
    with pytest.raises(LatencyTableError, match=r"another model \(extractor_mode group_norm vs layer_norm"):
        table.check_model(preset_config("hubert_large_tiny"))
    with pytest.raises(LatencyTableError, match=r"the model has 96 FFN units of layer 0, beyond the table's grid \(up "
                                                r"to 48\); profile the unpruned model$"):
        table.check_model(preset_config("hubert_base_tiny", encoder_ff_interm_features=96))
    table.check_threads(2)
    with pytest.raises(LatencyTableError, match=r"profiled with 2 thread\(s\), but trainer\.threads=1; set "
                                                r"trainer\.threads=2 or profile with --threads 1$"):
        table.check_threads(1)


# ------------------------------------------------------------------------------ interpolation
def test_interpolation_is_piecewise_linear_and_bilinear_and_extends_past_the_ends():
    xs, ys = torch.tensor([0.0, 2.0, 6.0], dtype=torch.float64), torch.tensor([1.0, 5.0, 7.0], dtype=torch.float64)
    for x, y in [(0.0, 1.0), (1.0, 3.0), (2.0, 5.0), (4.0, 6.0), (6.0, 7.0), (8.0, 8.0), (-1.0, -1.0)]:
        assert interp1(xs, ys, torch.tensor(x, dtype=torch.float64)).item() == pytest.approx(y, abs=1e-12)
    zs = xs[:, None] * ys[None, :] + 3.0  # bilinear: reproduced exactly anywhere
    for x, y in [(1.0, 2.0), (5.0, 6.5), (0.5, 0.0), (7.0, 8.0)]:
        assert interp2(xs, ys, zs, torch.tensor(x, dtype=torch.float64),
                       torch.tensor(y, dtype=torch.float64)).item() == pytest.approx(x * y + 3.0, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_latency_of_a_config_is_its_parts_read_from_the_table(table, seed):
    config = preset_config("hubert_base_tiny")
    assert table.latency(config) == pytest.approx(closed_form(config), rel=1e-12)
    cut = compile_encoder(pruned_gated(seed, 0.4 + 0.2 * seed)).config
    assert table.latency(cut) == pytest.approx(closed_form(cut), rel=1e-9)
    assert table.latency(cut) < table.latency(config)
    doubled = LatencyTable(synthetic_table(scale=2.0))
    assert doubled.latency(cut) == pytest.approx(closed_form(cut, scale=2.0), rel=1e-9)
    shifted = LatencyTable({**synthetic_table(scale=2.0), "offset": 0.004})  # the fitted line's offset
    assert shifted.latency(cut) == pytest.approx(closed_form(cut, scale=2.0) + 0.004, rel=1e-9)


def test_the_line_is_the_least_squares_fit_of_the_whole_passes():
    parts, a, b = [10.0, 6.0, 3.0, 1.5], 0.7, 1.3
    assert fit_line(parts, [a + b * p for p in parts]) == pytest.approx((b, a), rel=1e-12)
    noisy = [a + b * p + e for p, e in zip(parts, [0.1, -0.2, 0.15, -0.05])]
    scale, offset = fit_line(parts, noisy)
    residual = lambda s, o: sum((o + s * p - m) ** 2 for p, m in zip(parts, noisy))  # noqa: E731
    assert all(residual(scale, offset) <= residual(scale + ds, offset + do) for ds in (-1e-3, 0, 1e-3)
               for do in (-1e-3, 0, 1e-3))
    # one point, or a line that would fall: the ratio through the unpruned pass, no offset
    assert fit_line([10.0], [12.0]) == (1.2, 0.0)
    assert fit_line([10.0, 5.0], [8.0, 9.0]) == (0.8, 0.0)


def test_the_profile_fits_its_line_to_the_whole_passes_it_timed():
    """The plan times the unpruned and 2 cut models whole; with whole passes on an exact line of
    their parts, the table's scale and offset are that line's."""
    with torch.no_grad():
        made = plan(preset_config("hubert_base_tiny"), conv_points=1, ffn_points=1, head_points=1, fit_states=2)
    assert {"whole", "whole:0.5", "whole:0.75"} <= set(made.fns) and "whole:0.9" not in made.fns
    times = {k: 1e-4 * (1 + i % 7) for i, k in enumerate(made.fns)}
    parts = [q["parts"] for q in made.make(times)["whole"]["fit"]]
    for name, p in zip(["whole", "whole:0.5", "whole:0.75"], parts):
        times[name] = 0.002 + 1.5 * p
    table = made.make(times)
    assert (table["scale"], table["offset"]) == pytest.approx((1.5, 0.002), rel=1e-9)
    assert LatencyTable(table).latency(preset_config("hubert_base_tiny")) == pytest.approx(times["whole"], rel=1e-9)


def test_a_removed_block_costs_nothing_and_an_empty_one_its_zero_entry(table):
    base = preset_config("hubert_base_tiny")
    removed = preset_config("hubert_base_tiny", encoder_attention_kept=[False, True], encoder_ff_kept=[True, False])
    empty = preset_config("hubert_base_tiny", encoder_num_heads=[0, 4], encoder_head_dim=8,
                          encoder_ff_interm_features=[48, 0])
    assert table.latency(base) - table.latency(removed) == pytest.approx(attn_s(4) + ffn_s(48), rel=1e-9)
    assert table.latency(base) - table.latency(empty) == pytest.approx(attn_s(4) - attn_s(0) + ffn_s(48) - ffn_s(0),
                                                                       rel=1e-9)


# ----------------------------------------------------------------------------------- measure
def test_the_expected_latency_is_differentiable_and_equals_the_cut_at_eval(table):
    torch.manual_seed(0)
    gated = GatedEncoder(build_preset("hubert_base_tiny")).train()
    measure = MEASURES["latency"].bind({"table": table})
    expected = measure.expected_of(gated)
    assert expected.dtype == torch.float64 and expected.requires_grad
    expected.backward()
    for name, p in gated.named_parameters():
        if name.endswith("log_alpha"):  # every gate kind: conv channels, heads, units, whole blocks
            assert p.grad is not None and bool((p.grad != 0).any()), name
    for seed in (0, 1):
        gated = pruned_gated(seed)
        cut = compile_encoder(gated).config
        assert measure.expected_of(gated).item() == pytest.approx(measure.size_of(cut), rel=1e-9)
        assert measure.size_of(cut) == pytest.approx(1e3 * closed_form(cut), rel=1e-9)  # milliseconds


def test_a_latency_measure_needs_its_table():
    with pytest.raises(ValueError, match=r"^pruning\.latency_table: pruning\.target_kind=latency needs it; make one "
                                         r"with `prune profile"):
        MEASURES["latency"].size_of(preset_config("hubert_base_tiny"))
    with pytest.raises(ValueError, match=r"^pruning\.latency_table: pruning\.target_kind=latency_ms needs it"):
        Lagrangian(GatedEncoder(build_preset("hubert_base_tiny")), "latency_ms", 1.0, 0)


@pytest.mark.parametrize("kind", ["latency", "latency_ms"])
def test_the_lagrangian_and_the_cut_land_on_a_latency_target(table, kind):
    torch.manual_seed(0)
    gated = GatedEncoder(build_preset("hubert_base_tiny")).train()
    full_ms = 1e3 * table.latency(gated.config)
    target = 0.5 if kind == "latency" else 0.5 * full_ms
    lag = Lagrangian(gated, kind, target, warmup_steps=50, settings={"table": table})
    assert lag.full == pytest.approx(full_ms) and lag.target_size == pytest.approx(0.5 * full_ms)
    opt = torch.optim.Adam([{"params": gated.gate_parameters(), "lr": 0.05},
                            {"params": list(lag.parameters()), "lr": 0.05}])
    for step in range(300):
        opt.zero_grad()
        lag(gated, step)["penalty"].backward()
        lag.flip_grads()
        opt.step()
    # from 0.02: the gradient reaches the gates; at this toy scale one whole-block gate is ~7% of the
    # latency, so the multipliers hover within a block of the target and the calibration does the rest
    assert lag(gated, 300)["expected_sparsity"].item() == pytest.approx(0.5, abs=0.1)
    reached = calibrate(gated, lag.expected_size, lag.target_size, tolerance=0.005)
    assert abs(reached - lag.target_size) <= 0.005 * lag.target_size
    cut = compile_encoder(gated).config
    assert lag.size_of(cut) == pytest.approx(reached, rel=1e-9)  # the cut is what the eval masks measured
    assert 1e3 * closed_form(cut) == pytest.approx(lag.target_size, rel=0.005)
    record = cut_record(lag, lag.target_size, reached, lag.size_of(cut),
                        SimpleNamespace(tolerance=0.005, max_cut_shift=0.05), calibrated=True)
    assert (record["kind"], record["unit"]) == (kind, "ms")


# ------------------------------------------------------------------------------------ config
def test_the_config_check_loads_the_table_and_refuses_what_cannot_serve(tmp_path):
    good, one_thread, other = tmp_path / "good.json", tmp_path / "one.json", tmp_path / "w2v.json"
    save_table(synthetic_table(), good)
    save_table(synthetic_table(threads=1), one_thread)
    save_table(synthetic_table("wav2vec2_base_tiny"), other)
    full_ms = 1e3 * closed_form(preset_config("hubert_base_tiny"))
    validate(compose("tiny_demo", ["pruning.target_kind=latency", "pruning.target=0.4",
                                   f"pruning.latency_table={good}"]))
    validate(compose("tiny_demo", ["pruning.target_kind=latency_ms", f"pruning.target={full_ms / 2}",
                                   f"pruning.latency_table={good}"]))
    cases = [
        (["pruning.target_kind=latency"], r"^pruning\.latency_table: pruning\.target_kind=latency needs it; make one "
                                          r"with `prune profile --preset P --threads T --out FILE`"),
        ([f"pruning.latency_table={one_thread}", "pruning.target_kind=latency"],
         rf"^pruning\.latency_table: {one_thread}: the table was profiled with 1 thread\(s\), but trainer\.threads=2"),
        ([f"pruning.latency_table={other}", "pruning.target_kind=latency"],
         r"^pruning\.latency_table: .*profiled for another model \(architecture wav2vec2 vs hubert in the teacher\)"),
        ([f"pruning.latency_table={tmp_path / 'none.json'}", "pruning.target_kind=latency"],
         r"^pruning\.latency_table: .*none\.json: no such latency table"),
        ([f"pruning.latency_table={good}", "pruning.target_kind=latency_ms", f"pruning.target={2 * full_ms}"],
         rf"^pruning\.target: {2 * full_ms:g} milliseconds to keep is not below the teacher's {full_ms:,.2f}$"),
        ([f"pruning.latency_table={good}", "pruning.target_kind=latency_ms", "pruning.target=-1"],
         r"^pruning\.target: with pruning\.target_kind=latency_ms it is the number of milliseconds to keep, a positive "
         r"number such as 80, got -1"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate(compose("tiny_demo", overrides))


# ------------------------------------------------------------------------------- end to end
def test_prune_profile_makes_a_table_and_a_latency_run_reports_predicted_and_measured(tmp_path):
    out = tmp_path / "tiny.json"
    result = prune_cli(["profile", "--preset", "hubert_base_tiny", "--threads", "2", "--repeats", "2",
                        "--conv-points", "2", "--ffn-points", "2", "--fit-states", "3", "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert "latency table:" in result.stdout and "pruning.target_kind=latency" in result.stdout
    made = load_table(out)
    config = preset_config("hubert_base_tiny")
    made.check_model(config)
    assert (made.threads, made.batch, made.seconds, made.data["machine"]["device"]) == (2, 1, 1.0, "cpu")
    assert made.data["attention"]["heads"] == [0, 1, 2, 3, 4] and made.data["ffn"]["units"][0] == 0
    # the table reads its parts through the line fitted to the whole passes (unpruned + 3 cut models)
    points = made.data["whole"]["fit"]
    assert [q["sparsity"] for q in points] == [0.0, 0.5, 0.75, 0.9]
    assert points[0]["parts"] > points[-1]["parts"] > 0
    scale, offset = fit_line([q["parts"] for q in points], [q["measured"] for q in points])
    assert (made.data["scale"], made.data["offset"]) == pytest.approx((scale, offset), rel=1e-12)
    assert made.latency(config) == pytest.approx(offset + scale * points[0]["parts"], rel=1e-9)
    assert made.data["scale"] > 0

    # the run reads a synthetic table: a measured tiny one moves in steps of whole blocks and is not
    # monotone to the microsecond, so where the cut lands on it would depend on this machine's noise
    synthetic = save_table(synthetic_table(threads=2), tmp_path / "synthetic.json")
    train, valid = noise_corpus(tmp_path / "corpus", n_train=8, n_valid=2)
    run = tmp_path / "run"
    result = prune_cli(short_run_args(train, valid, run, prune_steps=6, final_steps=2, extra=[
        "pruning.target_kind=latency", "pruning.target=0.4", f"pruning.latency_table={synthetic}"]))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((run / "report.json").read_text())
    check = report["latency_target"]
    assert set(check["predicted_ms"]) == set(check["measured_ms"]) == {"teacher", "pruned"}
    assert check["predicted_ms"]["teacher"] == pytest.approx(1e3 * closed_form(config), rel=1e-9)
    cut = report["cut"]
    assert cut["unit"] == "ms" and cut["cut_size"] == pytest.approx(check["predicted_ms"]["pruned"], rel=1e-9)
    assert cut["target_size"] == pytest.approx(0.6 * check["predicted_ms"]["teacher"], rel=1e-9)
    assert abs(cut["cut_size"] - cut["target_size"]) <= 0.005 * cut["target_size"]
    assert "latency target, table" in (run / "report.txt").read_text()


def test_prune_profile_refuses_bad_arguments_before_any_compute(tmp_path):
    out = tmp_path / "t.json"
    cases = [(["--preset", "hubert_base_tiny", "--threads", "0"], "--threads must be >= 1, got 0"),
             (["--preset", "nope"], "unknown --preset 'nope'"),
             (["x.pt", "--preset", "hubert_base_tiny"], "give either --preset P or MODEL"),
             (["--preset", "hubert_base_tiny", "--clock", "thread", "--threads", "2"],
              "--clock thread counts one CPU thread's time: use it with --threads 1 --device cpu"),
             (["--preset", "hubert_base_tiny", "--fit-states", "7"], "--fit-states must be in [0, 6], got 7")]
    if not torch.cuda.is_available():
        cases.append((["--preset", "hubert_base_tiny", "--device", "cuda"], "--device cuda: torch sees no CUDA device"))
    for args, message in cases:
        result = prune_cli(["profile", *args, "--out", str(out)])
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_gated_hidden_dimension_is_refused_by_a_table(table):
    """Tables time no hidden-dimension widths yet: refused in one line, not counted as fixed."""
    from prune.structures import GateConfig

    gated = GatedEncoder(build_preset("hubert_base_tiny"), GateConfig(hidden_dim=True))
    with pytest.raises(LatencyTableError, match=r"do not time a pruned hidden dimension yet; set "
                                                r"pruning\.gates\.hidden_dim=false"):
        table.expected(gated)


def test_gated_head_dims_are_refused_by_a_table(table):
    """Tables time heads of the full width only: the dims gates are refused in one line."""
    from prune.structures import GateConfig

    gated = GatedEncoder(build_preset("hubert_base_tiny"), GateConfig(head_v_dims=True))
    with pytest.raises(LatencyTableError, match=r"latency tables time heads of the full width only; set "
                                                r"pruning\.gates\.head_qk_dims=false and head_v_dims=false"):
        table.expected(gated)
