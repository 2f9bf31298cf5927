"""The structure protocol: every structure's costs add up to the totals, cuts compose through one
CutPlan, calibration selects gates by kind, and the reports read one table of kinds."""

import pytest
import torch
from conftest import TINY
from helpers import randomize_gates

from prune.calibrate import shift_to_size
from prune.checkpoints.export import describe
from prune.compile import compile_encoder
from prune.models import LayerGates, build_preset
from prune.structures import (FFN_UNITS, GATE_KINDS, HEADS, SHOWN, CutPlan, CutPlanError, GateConfig, GatedEncoder,
                              Structure, count_macs, count_params, fixed_params, structures_of)
from prune.structures.costs import conv_frames

KINDS = {"conv_channels", "projection_input", "attention", "feed_forward", "hidden"}


def _like():
    return torch.zeros((), dtype=torch.float64)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_structure_reports_costs_that_sum_to_the_totals(name, mode):
    every = GateConfig(hidden_dim=True, head_qk_dims=True, head_v_dims=True)
    gated = randomize_gates(GatedEncoder(build_preset(name), every), seed=1)
    gated.train(mode == "train")
    config, like, seconds = gated.config, _like(), 1.3
    frames = conv_frames(config, seconds)
    assert all(isinstance(s, Structure) and s.kind in KINDS for s in gated.structures)
    assert {k for s in gated.structures for k in s.gates()} == set(GATE_KINDS)
    params = [s.params(like) for s in gated.structures]
    macs = [s.macs(frames, like) for s in gated.structures]
    assert all(p.item() >= 0 for p in params) and all(m.item() >= 0 for m in macs)
    assert (sum(params) + fixed_params(config)).item() == pytest.approx(gated.expected_params().item(), rel=1e-12)
    assert sum(macs).item() == pytest.approx(gated.expected_macs(seconds).item(), rel=1e-12)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("hidden", [False, True])
def test_each_structure_in_eval_costs_what_its_compiled_counterpart_costs(name, hidden):
    gated = randomize_gates(GatedEncoder(build_preset(name), GateConfig(hidden_dim=hidden)), seed=2).eval()
    plain = structures_of(compile_encoder(gated).config)  # no gates: the plain config's counts
    frames = conv_frames(gated.config, 1.0)
    assert [s.kind for s in plain] == [s.kind for s in gated.structures]
    for ours, theirs in zip(gated.structures, plain):
        assert float(ours.params(_like())) == float(theirs.params(_like())), ours
        assert float(ours.macs(frames, _like())) == float(theirs.macs(frames, _like())), ours
        assert not theirs.gates()


def test_plain_counts_sum_over_the_same_structures():
    config = build_preset("wavlm_large_tiny").config
    parts = structures_of(config)
    assert count_params(config) == fixed_params(config) + sum(float(s.params(_like())) for s in parts)
    frames = conv_frames(config, 2.0)
    assert count_macs(config, 2.0) == sum(float(s.macs(frames, _like())) for s in parts)


def test_one_gate_object_per_layer_reaches_the_encoder():
    gated = randomize_gates(GatedEncoder(build_preset("hubert_base_tiny")), seed=0).eval()
    gates = gated.sample_gates()
    assert len(gates.layers) == gated.config.encoder_num_layers and all(isinstance(g, LayerGates) for g in gates.layers)
    assert len(gates.extractor.channels) == len(gated.config.extractor_conv_layer_config)
    # randomize_gates closes layer 0's heads, layer 1's attention block and layer 0's FFN block
    assert gates.layers[0].heads.sum() == 0 and gates.layers[1].attention == 0 and not gates.layers[1].attention_on
    assert not gates.layers[0].ffn_on
    x = torch.randn(1, 4000)
    with torch.no_grad():
        layer = gated.model.encoder.transformer.layers[1]
        h = torch.randn(1, 12, gated.config.encoder_embed_dim)
        skipped = layer(h, None, None, LayerGates(attention=torch.tensor(0.0), attention_on=False))
        zeroed = layer(h, None, None, LayerGates(attention=torch.tensor(0.0)))
        assert torch.allclose(skipped, zeroed, atol=1e-6)
        assert gated(x)[0][-1].shape[-1] == gated.config.encoder_embed_dim


# ------------------------------------------------------------------------------ CutPlan
def _plan():
    weight = torch.arange(20.0).reshape(4, 5)
    return weight, CutPlan({"w": weight, "b": torch.arange(4.0)}, {})


def test_selections_along_two_dims_compose():
    weight, plan = _plan()
    plan.select("w", 0, torch.tensor([1, 3]))  # e.g. the heads' rows
    plan.select("w", 1, torch.tensor([0, 2, 4]))  # e.g. a hidden-dimension structure's columns
    assert torch.equal(plan.tensor("w"), weight[[1, 3]][:, [0, 2, 4]])
    other = CutPlan({"w": weight}, {})  # the order of recording does not matter
    other.select("w", 1, torch.tensor([0, 2, 4]))
    other.select("w", 0, torch.tensor([1, 3]))
    assert torch.equal(other.tensor("w"), plan.tensor("w"))


def test_selections_along_one_dim_intersect_in_source_positions():
    weight, plan = _plan()
    plan.select("w", 0, torch.tensor([0, 1, 3]))
    plan.select("w", 0, torch.tensor([3, 2, 1]))
    assert torch.equal(plan.tensor("w"), weight[[1, 3]])


def test_scales_are_in_source_positions_and_multiply_before_the_selection():
    weight, plan = _plan()
    plan.scale("w", torch.tensor([1.0, 2.0, 3.0, 4.0]), dim=0)
    plan.scale("w", 0.5)
    plan.select("w", 0, torch.tensor([2]))
    assert torch.equal(plan.tensor("w"), weight[[2]] * 3.0 * 0.5)
    plan.replace("phantom", torch.ones(4))  # a tensor the source lacks, still selected
    plan.select("phantom", 0, torch.tensor([0, 1]))
    state = plan.apply(["w", "b", "phantom"])
    assert torch.equal(state["b"], torch.arange(4.0)) and state["phantom"].shape == (2,)


def test_a_plan_that_does_not_fit_raises_clearly():
    _, plan = _plan()
    plan.select("w", 1, torch.tensor([7]))
    with pytest.raises(CutPlanError, match=r"w has 5 entries along dim 1, the selection reaches index 7"):
        plan.tensor("w")
    _, plan = _plan()
    plan.scale("w", torch.ones(3), dim=0)
    with pytest.raises(CutPlanError, match=r"a scale of w along dim 0 needs 4 entries"):
        plan.tensor("w")
    _, plan = _plan()
    plan.select("gone", 0, torch.tensor([0]))
    with pytest.raises(CutPlanError, match="the compiled model has no tensor gone"):
        plan.apply(["w", "b"])
    plan.replace("x", torch.ones(1))
    with pytest.raises(CutPlanError, match="x is replaced twice"):
        plan.replace("x", torch.ones(1))


def test_conv_weights_are_sliced_by_two_structures():
    gated = randomize_gates(GatedEncoder(build_preset("hubert_base_tiny")), seed=0).eval()
    model = gated.model
    plan = CutPlan(model.state_dict(), model.config.to_dict())
    for structure in gated.structures:
        structure.plan(plan)
    name = "feature_extractor.conv_layers.2.conv.weight"
    rows, cols = gated.conv[2].kept(), gated.conv[1].kept()  # conv 2 slices dim 0, conv 1 dim 1
    assert len(rows) < 16 and len(cols) < 16
    soft = gated.conv[2].eval_mask()[:, None, None]  # no norm on layer 2: its gate folds into the conv
    assert torch.equal(plan.tensor(name), (model.state_dict()[name] * soft)[rows][:, cols])


# ------------------------------------------------------------------------------ kinds
def test_calibration_selects_gates_by_kind():
    gated = GatedEncoder(build_preset("hubert_base_tiny"))
    before = {n: p.detach().clone() for n, p in gated.named_parameters() if n.endswith("log_alpha")}
    target = 0.8 * count_params(gated.config)
    shift_to_size(gated, GatedEncoder.expected_params, target, kinds=(FFN_UNITS,))
    moved = {n for n, p in gated.named_parameters() if n.endswith("log_alpha") and not torch.equal(p, before[n])}
    assert moved == {f"feed_forward.{l}.unit_gate.log_alpha" for l in range(gated.config.encoder_num_layers)}
    assert gated.gate_groups([HEADS]) == [a.head_gate.log_alpha for a in gated.attention]
    assert gated.gate_groups() == gated.gate_parameters() == [p for n, p in gated.named_parameters()
                                                              if n.endswith("log_alpha")]


def test_describe_reads_the_kinds_from_one_table():
    config = build_preset("hubert_base_tiny", encoder_ff_kept=[True, False]).config
    info = describe(config)
    assert [k for k in info if k not in ("architecture", "params", "macs_per_second")] == [s.key for s in SHOWN]
    assert info["ffn_units"] == [48, None] and info["conv_channels"] == [16] * 7
    assert {s.kind for s in SHOWN} <= KINDS
