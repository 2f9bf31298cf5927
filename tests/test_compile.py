import pytest
import torch
from conftest import TINY
from helpers import max_rel_error, randomize_gates
from helpers import run_no_grad as _run

from prune.compile import compile_encoder
from prune.gates import HardConcrete
from prune.measured import num_params
from prune.models import build_encoder, build_preset
from prune.structures import GatedEncoder

TOL = 1e-5  # max relative error, float32


@pytest.mark.parametrize("name", TINY)
def test_compiled_matches_gated_eval(name, batch):
    """Every hidden state, with padding, for random gates with the hard cases: a layer with no
    heads, an FFN with no units, whole blocks removed, channels removed in every conv layer
    including the last one (the feature projection's LayerNorm input). The reference computes every
    unit (skip_closed off), so it does not share the compiled model's gathering code."""
    gated = randomize_gates(GatedEncoder(build_preset(name), skip_closed=False)).eval()
    compiled = compile_encoder(gated)
    cfg = compiled.config
    n = cfg.encoder_num_layers
    assert cfg.encoder_num_heads[0] == 0 and cfg.encoder_attention_kept[0]
    assert cfg.encoder_ff_interm_features[n - 1] == 0 and cfg.encoder_ff_kept[n - 1]
    assert not cfg.encoder_attention_kept[1] and not cfg.encoder_ff_kept[0]
    assert all(c[0] == 14 for c in cfg.extractor_conv_layer_config)  # 16 - 2 in every layer
    assert compiled.encoder.feature_projection.phantom is not None

    expected, exp_len = _run(gated, *batch)
    actual, act_len = _run(compiled, *batch)
    assert torch.equal(exp_len, act_len)
    assert len(actual) == len(expected)
    assert max_rel_error(actual, expected) < TOL


@pytest.mark.parametrize("name", ["hubert_base_tiny", "wavlm_large_tiny"])
def test_compiled_is_a_plain_model_buildable_from_its_config(name, batch):
    gated = randomize_gates(GatedEncoder(build_preset(name)), seed=1).eval()
    compiled = compile_encoder(gated)
    assert not any(isinstance(m, HardConcrete) for m in compiled.modules())
    assert not any(n.endswith("log_alpha") for n, _ in compiled.named_parameters())
    rebuilt = build_encoder(compiled.config)
    rebuilt.load_state_dict(compiled.state_dict(), strict=True)
    rebuilt.eval()
    for a, b in zip(_run(rebuilt, *batch)[0], _run(compiled, *batch)[0]):
        assert torch.equal(a, b)


def test_compile_leaves_the_gated_model_as_it_was():
    gated = randomize_gates(GatedEncoder(build_preset("hubert_base_tiny"))).train()
    before = {k: v.clone() for k, v in gated.state_dict().items()}
    compile_encoder(gated)
    assert gated.training
    assert all(torch.equal(v, gated.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("name", ["hubert_base_tiny", "wav2vec2_large_lv60k_tiny", "wavlm_base_tiny"])
def test_pruning_a_pruned_model_stays_exact(name, batch):
    """Gate the compiled model again (phantom channels, 0-head layers, missing blocks) and cut again."""
    first = compile_encoder(randomize_gates(GatedEncoder(build_preset(name)), seed=2).eval())
    gated = randomize_gates(GatedEncoder(first), seed=5, hard_cases=False).eval()
    second = compile_encoder(gated)
    assert num_params(second) < num_params(first)
    assert gated.expected_params().item() == num_params(second)
    assert max_rel_error(_run(second, *batch)[0], _run(gated, *batch)[0]) < TOL


@pytest.mark.parametrize("name", ["hubert_base_tiny", "wavlm_large_tiny"])
def test_torch_export_gives_identical_outputs(name):
    compiled = compile_encoder(randomize_gates(GatedEncoder(build_preset(name))).eval())
    x = torch.randn(1, 16000)
    program = torch.export.export(compiled, (x,))
    expected, _ = _run(compiled, x, None)
    with torch.no_grad():
        actual, _ = program.module()(x)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_reference_error_case_is_exact_here():
    """DPHuBERT's known ~3e-3 error: channels pruned in the last conv layer, whose zeros still
    enter the feature projection's LayerNorm. Only that structure is pruned here, heavily."""
    gated = GatedEncoder(build_preset("hubert_base_tiny"))
    with torch.no_grad():
        for p in gated.gate_parameters():
            p.fill_(20.0)
        gated.conv[-1].gate.log_alpha[:10] = -20.0
    gated.eval()
    compiled = compile_encoder(gated)
    x = torch.randn(2, 16000)
    expected, _ = _run(gated, x, None)
    actual, _ = _run(compiled, x, None)
    assert compiled.config.extractor_conv_layer_config[-1][0] == 6
    assert max_rel_error(actual, expected) < TOL
    # and slicing without the phantom correction would be visibly wrong
    with torch.no_grad():
        compiled.encoder.feature_projection.layer_norm.total_features = 6
        compiled.encoder.feature_projection.phantom.zero_()
    naive, _ = _run(compiled, x, None)
    assert max_rel_error(naive, expected) > 1e-3


@pytest.mark.parametrize("name", ["hubert_base_tiny", "wavlm_large_tiny"])
def test_conv_layers_cut_to_nothing_compile_and_stay_exact(name, batch):
    """Layer 0 (GroupNorm in group_norm mode) and a middle layer lose every channel: the
    extractor's output is then bias-only, and the compiled model still matches."""
    gated = randomize_gates(GatedEncoder(build_preset(name))).eval()
    for i in (0, 3):
        gated.conv[i].gate.log_alpha.data.fill_(-10.0)
    compiled = compile_encoder(gated)
    widths = [layer.conv.out_channels for layer in compiled.feature_extractor.conv_layers]
    assert widths[0] == 0 and widths[3] == 0
    assert max_rel_error(_run(compiled, *batch)[0], _run(gated, *batch)[0]) < TOL



def test_extractor_output_scale_is_cut_with_the_last_conv_layer(batch):
    """DPHuBERT's per-channel scale on the extractor's output (extractor_output_scale) keeps the
    entries of the channels that survive the last conv layer's gates."""
    model = build_preset("hubert_base_tiny", extractor_output_scale=True)
    with torch.no_grad():
        model.feature_extractor.output_scale.uniform_(0.2, 1.0)
    gated = randomize_gates(GatedEncoder(model), seed=3).eval()
    compiled = compile_encoder(gated)
    assert compiled.feature_extractor.output_scale.shape == (compiled.config.extractor_conv_layer_config[-1][0],)
    assert max_rel_error(_run(compiled, *batch)[0], _run(gated, *batch)[0]) < TOL
    plain = compile_encoder(randomize_gates(GatedEncoder(build_preset("hubert_base_tiny")), seed=3).eval())
    plain.load_state_dict({k: v for k, v in compiled.state_dict().items() if k != "feature_extractor.output_scale"})
    assert max_rel_error(_run(plain, *batch)[0][1:], _run(compiled, *batch)[0][1:]) > 1e-3  # the scale matters
