import pytest
import torch
from conftest import TINY
from helpers import randomize_gates

from prune.compile import compile_encoder
from prune.measured import measured_macs, num_params
from prune.models import build_preset
from prune.structures import GateConfig, GatedEncoder, count_macs, count_params


@pytest.mark.parametrize("name", TINY)
def test_expected_params_in_eval_equal_compiled_numel(name):
    gated = randomize_gates(GatedEncoder(build_preset(name))).eval()
    compiled = compile_encoder(gated)
    assert gated.expected_params().item() == num_params(compiled) == count_params(compiled.config)
    assert num_params(compiled) < num_params(gated.model)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("seconds", [1.0, 2.3])
def test_expected_macs_match_flop_counter(name, seconds):
    gated = randomize_gates(GatedEncoder(build_preset(name)), seed=3).eval()
    compiled = compile_encoder(gated)
    measured = measured_macs(compiled, seconds)
    assert gated.expected_macs(seconds).item() == pytest.approx(measured, rel=0.01)
    assert count_macs(compiled.config, seconds) == pytest.approx(measured, rel=0.01)


def test_unpruned_costs_match_measurement_at_base_shape():
    model = build_preset("hubert_base").eval()
    assert count_macs(model.config, 1.0) == pytest.approx(measured_macs(model, 1.0), rel=0.01)
    # about 6.9 GMACs for 1 s (49 frames); the conv extractor is about 39% of it
    assert 6.5e9 < count_macs(model.config) < 7.5e9


def test_untouched_gates_cost_the_full_model():
    gated = GatedEncoder(build_preset("wavlm_large_tiny"))
    with torch.no_grad():
        for p in gated.gate_parameters():
            p.fill_(20.0)
    gated.eval()
    assert gated.expected_params().item() == num_params(gated.model)
    assert gated.expected_macs().item() == count_macs(gated.config)


@pytest.mark.parametrize("kind", ["expected_params", "expected_macs"])
def test_costs_are_differentiable_in_every_gate(kind):
    gated = GatedEncoder(build_preset("wavlm_base_tiny")).train()
    cost = getattr(gated, kind)()
    assert cost.requires_grad
    cost.backward()
    for name, p in gated.named_parameters():
        if name.endswith("log_alpha"):
            assert p.grad is not None and (p.grad > 0).all(), name  # keeping more always costs more
    # in training the cost lies strictly between empty and full
    assert 0 < cost.item() < (num_params(gated.model) if kind == "expected_params" else count_macs(gated.config))


def test_structures_can_be_switched_off():
    off = GateConfig(conv_channels=False, attention_heads=False, attention_layers=False, ffn_units=True,
                     ffn_layers=False)
    gated = GatedEncoder(build_preset("hubert_base_tiny"), off)
    names = [n for n, _ in gated.named_parameters() if n.endswith("log_alpha")]
    assert names and all(n.startswith("feed_forward.") and "unit_gate" in n for n in names)
    randomize_gates(gated, hard_cases=False).eval()
    compiled = compile_encoder(gated)
    assert compiled.config.extractor_conv_layer_config == gated.config.extractor_conv_layer_config
    assert compiled.config.encoder_num_heads == gated.config.encoder_num_heads
    assert compiled.config.encoder_ff_interm_features != gated.config.encoder_ff_interm_features
    assert gated.expected_params().item() == num_params(compiled)


def test_expected_equals_actual_at_base_scale():
    """Float32 sums drift by a few parameters past 2^24; the costs are kept in float64."""
    from prune.seeded import set_random_gates

    gated = GatedEncoder(build_preset("hubert_base"))
    set_random_gates(gated, 0.75, seed=1)
    gated.eval()
    compiled = compile_encoder(gated)
    assert gated.expected_params().item() == num_params(compiled) == count_params(compiled.config)
    assert gated.expected_macs(10.0).item() == count_macs(compiled.config, 10.0)
    assert gated.expected_params().dtype == torch.float64
