"""Forced kept counts (prune.shape): uniform widths, whole layers, explicit shapes, round_to."""

import json

import pytest
import torch
from conftest import TINY
from helpers import CLOSED, max_rel_error, randomize_gates
from helpers_train import noise_corpus, prune_cli, short_run_args

from prune.calibrate import calibrate
from prune.compile import compile_encoder
from prune.gates import EVAL_LOGIT_SCALE, HardConcrete
from prune.measured import measured_macs, num_params
from prune.models import build_preset
from prune.models.gating import LayerGates
from prune.preview import preview
from prune.seeded import set_random_gates
from prune.shape import Shape, Shaper, ShapeTerms, check_shape, round_count, uniform_gates
from prune.structures import GateConfig, GatedEncoder, attention_params, count_params, feed_forward_params
from prune.train.config import ConfigError, compose, validate

FAMILIES = ["hubert_base_tiny", "wavlm_base_tiny", "wav2vec2_large_lv60k_tiny"]  # post-norm, WavLM, pre-norm


def _batch():
    return torch.randn(2, 16000, generator=torch.Generator().manual_seed(1)), torch.tensor([16000, 11000])


def _uniform(name, shape=Shape(), **overrides):
    torch.manual_seed(0)
    model = build_preset(name, **overrides)
    return GatedEncoder(model, uniform_gates(GateConfig(), shape, model.config), uniform=True)


def _check_exact(gated):
    """compiled == gated (eval), params and MACs exact: the forced masks are what gets cut."""
    gated.eval()
    compiled = compile_encoder(gated)
    x, lengths = _batch()
    with torch.no_grad():
        expected, _ = gated(x, lengths)
        actual, _ = compiled(x, lengths)
    assert max_rel_error(actual, expected) < 1e-5
    assert gated.expected_params().item() == num_params(compiled)
    assert gated.expected_macs(1.0).item() == pytest.approx(measured_macs(compiled, 1.0), rel=0.01)
    return compiled.config


def test_forced_units_keep_their_soft_value():
    gate = HardConcrete(10)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-6, 6, 10))
    gate.eval()
    plain = gate().clone()
    soft = torch.sigmoid(gate.log_alpha / gate.temperature * EVAL_LOGIT_SCALE).detach()
    gate.force(gate.top(8))  # two more than the plain mask keeps
    assert int((plain > 0).sum()) == gate.plain_count() < 8
    forced = gate()
    assert torch.equal(gate.top(8), torch.arange(2, 10))
    assert torch.equal(forced > 0, torch.arange(10) >= 2)
    assert torch.allclose(forced[2:], soft[2:])  # the newly kept ones too: their soft value, not 1
    assert torch.equal(forced[plain > 0], plain[plain > 0])
    gate.force(None)
    assert torch.equal(gate(), plain)
    with pytest.raises(ValueError, match="cannot keep 11"):
        gate.top(11)


@pytest.mark.parametrize("name", TINY)
def test_forced_counts_are_exact(name):
    """Arbitrary forced counts on every gate (more and fewer than the plain masks keep, zero units
    in one FFN): the cut equals the gated model and its costs equal the expected ones."""
    gated = randomize_gates(GatedEncoder(build_preset(name)), seed=2, hard_cases=False).eval()
    g = torch.Generator().manual_seed(5)
    for structure in gated.structures:
        for kind, gate in structure.gates().items():
            # conv layers keep at least half: one channel left of 16 before a LayerNorm is float32 noise
            low = gate.n // 2 if kind == "conv_channels" else (1 if gate.n > 1 else 0)
            gate.force(gate.top(int(torch.randint(low, gate.n + 1, (1,), generator=g))))
    gated.feed_forward[0].unit_gate.force(torch.zeros(0, dtype=torch.long))
    config = _check_exact(gated)
    for structure, a in zip(gated.feed_forward, config.encoder_ff_interm_features):
        if config.encoder_ff_kept[structure.layer]:
            assert a == len(structure.unit_gate.forced)


@pytest.mark.parametrize("name", FAMILIES)
def test_uniform_cut_is_a_transformers_shape(name):
    gated = _uniform(name)
    set_random_gates(gated, 0.4, seed=3, size=Shaper(uniform=True).sized(GatedEncoder.expected_params))
    gated.attention[1].layer_gate.log_alpha.data.fill_(CLOSED)  # one layer goes, whole
    Shaper(uniform=True).apply(gated)
    config = _check_exact(gated)
    kept = [i for i, k in enumerate(config.encoder_attention_kept) if k]
    assert config.encoder_attention_kept == config.encoder_ff_kept  # one decision per layer
    assert 1 not in kept and kept
    assert all(gated.attention[i].head_gate is None for i in range(config.encoder_num_layers))
    assert {config.encoder_num_heads[i] for i in kept} == {gated.config.encoder_num_heads[0]}  # heads whole
    assert len({config.encoder_ff_interm_features[i] for i in kept}) == 1  # one FFN width
    full = [c[0] for c in gated.config.extractor_conv_layer_config]
    channels = [c[0] for c in config.extractor_conv_layer_config]
    if gated.config.extractor_mode == "layer_norm":
        assert channels == full  # every conv layer has a LayerNorm over its channels
    else:
        assert channels[-1] == full[-1] and channels[:-1] != full[:-1]  # the feature projection's input stays
    assert config.extractor_norm_channels == full and gated.model.encoder.feature_projection.phantom is None


@pytest.mark.parametrize("name", ["hubert_base_tiny", "wav2vec2_large_lv60k_tiny"])  # post-norm, pre-norm
def test_uniform_layer_gate_decides_both_blocks_in_training(name):
    """The expected size in training knows the constraint: the layer's one gate scales its
    attention block (every head) and its FFN together (post-norm also the layer's two LayerNorms,
    which go with it), so the size's slope in that gate's keep probability is the whole layer's
    cost; with free gates it would be the attention block's alone."""
    gated = _uniform(name).train()
    gate = gated.attention[0].layer_gate
    c = gated.config
    D, pre = c.encoder_embed_dim, c.encoder_layer_norm_first
    units = gated.feed_forward[0].unit_gate.keep_prob().sum().double()
    both = (attention_params(D, c.encoder_head_dim, c.encoder_num_heads[0], 1.0, False, pre)
            + feed_forward_params(D, units, 1.0, pre) + (0 if pre else 4 * D))
    sizes, probs = [], []
    for value in (-1.0, 2.0):
        gate.log_alpha.data.fill_(value)
        sizes.append(gated.expected_params().item())
        probs.append(gate.keep_prob().item())
    slope = (sizes[1] - sizes[0]) / (probs[1] - probs[0])
    assert slope == pytest.approx(both.item(), rel=1e-4)
    assert gated.feed_forward[0].layer_gate is None  # tied: one gate, its one sample per pass
    draws = [gated.sample_gates().layers[0] for _ in range(5)]
    if pre:  # the blocks' outputs are gated
        assert all(torch.equal(d.attention, d.ffn) and d.layer is None for d in draws)
    else:  # the whole layer is: x + z (layer(x) - x)
        assert all(d.attention is None and d.ffn is None and d.layer is not None for d in draws)


@pytest.mark.parametrize("name", ["hubert_base_tiny", "wavlm_base_tiny"])
def test_a_removed_post_norm_layer_is_an_identity(name):
    """Uniform, post-norm: a layer removed whole is an identity in the gated model and in the cut
    (its LayerNorms gone, no parameter left), a kept one is the plain layer (its gate's eval value
    is exactly 1), the compiled model equals the gated one, and params / MACs are exact."""
    gated = _uniform(name)
    randomize_gates(gated, seed=3, hard_cases=False)
    for a in gated.attention:
        a.layer_gate.log_alpha.data.fill_(3.0)  # soft eval value 0.96: a kept layer's gate must still give 1
    gated.attention[1].layer_gate.log_alpha.data.fill_(CLOSED)
    Shaper(uniform=True).apply(gated)
    gated.eval()
    assert gated.attention[0].layer_gate().item() == 1.0 and gated.attention[1].layer_gate().item() == 0.0
    config = _check_exact(gated)
    assert config.encoder_layer_kept == [True, False]
    assert config.encoder_attention_kept == config.encoder_ff_kept == [True, False]
    compiled = compile_encoder(gated)
    assert sum(p.numel() for p in compiled.encoder.transformer.layers[1].parameters()) == 0
    assert gated.expected_macs(1.0).item() == measured_macs(compiled, 1.0)
    assert count_params(config) == num_params(compiled)
    x, lengths = _batch()
    with torch.no_grad():
        for model in (gated, compiled):
            hiddens, _ = model(x, lengths)
            assert torch.equal(hiddens[2], hiddens[1])  # layer 1's output is its input
            assert not torch.allclose(hiddens[1], hiddens[0])  # layer 0 is kept, and computes
    # the gated forward blends with the layer gate's value: x + z (layer(x) - x)
    layer = gated.model.encoder.transformer.layers[0]
    h = torch.randn(2, 7, config.encoder_embed_dim)
    bias = None
    if gated.config.is_wavlm:
        bias = gated.model.encoder.transformer.rel_pos_bias(7)
    with torch.no_grad():
        plain = layer(h, None, bias)
        blended = layer(h, None, bias, LayerGates(layer=torch.tensor(0.3)))
        assert torch.allclose(blended, h + 0.3 * (plain - h), atol=1e-6)
        assert torch.equal(layer(h, None, bias, LayerGates(layer=torch.tensor(0.0), layer_on=False)), h)


def test_a_removed_layer_in_training_is_an_identity():
    """A training sample of exactly 0 on a post-norm layer's gate: the layer returns its input
    (nothing computed, no LayerNorm applied); the FFN takes the same decision."""
    gated = _uniform("hubert_base_tiny").train()
    gated.attention[1].layer_gate.log_alpha.data.fill_(CLOSED)
    x, lengths = _batch()
    with torch.no_grad():
        hiddens, _ = gated(x, lengths)
    assert torch.equal(hiddens[2], hiddens[1])
    g = gated.sample_gates().layers[1]
    assert g.layer.item() == 0.0 and not g.layer_on


def test_identity_layers_in_the_config():
    """encoder_layer_kept: None is every layer (old configs load unchanged); an identity layer has
    no block, and the plain model's count leaves out its LayerNorms."""
    from prune.models import preset_config

    config = preset_config("hubert_base_tiny")
    assert config.encoder_layer_kept is None and config.layer_kept == [True, True]
    cut = preset_config("hubert_base_tiny", encoder_attention_kept=[True, False], encoder_ff_kept=[True, False])
    identity = cut.replace(encoder_layer_kept=[True, False])
    assert count_params(cut) - count_params(identity) == 4 * config.encoder_embed_dim  # two LayerNorms
    assert num_params(build_preset("hubert_base_tiny", **{k: v for k, v in identity.to_dict().items()
                                                          if k.startswith("encoder_")})) == count_params(identity)
    with pytest.raises(ValueError, match=r"encoder_layer_kept\[1\] is false \(an identity layer\) but layer 1 keeps"):
        preset_config("hubert_base_tiny", encoder_layer_kept=[True, False])
    with pytest.raises(ValueError, match="encoder_layer_kept needs 2 entries"):
        preset_config("hubert_base_tiny", encoder_layer_kept=[True])


@pytest.mark.parametrize("name,shape", [
    ("hubert_base_tiny", Shape(layers=1, ffn=12, conv=8)),
    ("wavlm_base_tiny", Shape(heads=2, ffn=20, conv=[12, 12, 8, 8, 8, 4, 16])),
    ("wav2vec2_large_lv60k_tiny", Shape(layers=2, ffn=24)),
])
def test_explicit_shape_is_landed_exactly(name, shape):
    gated = _uniform(name, shape)
    randomize_gates(gated, seed=4, hard_cases=False)
    Shaper(uniform=True, shape=shape).apply(gated)
    config = _check_exact(gated)
    kept = [i for i, k in enumerate(config.encoder_attention_kept) if k]
    assert len(kept) == (shape.layers or gated.config.encoder_num_layers)
    assert {config.encoder_ff_interm_features[i] for i in kept} == {shape.ffn}
    assert {config.encoder_num_heads[i] for i in kept} == {shape.heads or gated.config.encoder_num_heads[0]}
    if shape.conv is not None:
        assert [c[0] for c in config.extractor_conv_layer_config] == shape.conv_counts(gated.config)
    if config.is_wavlm:  # the relative position bias is shared: the same heads in every layer
        heads = [config.encoder_head_index[i] for i in kept]
        assert all(h == heads[0] for h in heads) and len(heads[0]) == 2
        score = sum(gated.attention[i].head_gate.log_alpha.detach() for i in kept)
        assert heads[0] == sorted(torch.topk(score, 2).indices.tolist())


def test_explicit_shape_fixes_the_size():
    shape = Shape(layers=1, ffn=12, conv=8)
    gated = _uniform("hubert_base_tiny", shape)
    shaper = Shaper(uniform=True, shape=shape)
    assert shaper.fixes_all(gated) and not Shaper(uniform=True, shape=Shape(ffn=12)).fixes_all(gated)
    size = shaper.fixed_size(gated, GatedEncoder.expected_params)
    randomize_gates(gated, seed=7, hard_cases=False)
    shaper.apply(gated)
    assert num_params(compile_encoder(gated.eval())) == size
    assert all(a.layer_gate.forced is not None for a in gated.attention)


def _medium(shape=Shape()):  # big enough that a 0.5% tolerance is a few FFN units
    return _uniform("hubert_base_tiny", shape, encoder_embed_dim=64, encoder_num_heads=4,
                    encoder_ff_interm_features=256, encoder_num_layers=4,
                    extractor_conv_layer_config=[[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2)


@pytest.mark.parametrize("uniform,round_to", [(True, 1), (True, 4), (False, 4)])
def test_calibration_lands_the_target_under_the_constraint(uniform, round_to):
    if uniform:
        gated = _medium()
    else:
        torch.manual_seed(0)
        gated = GatedEncoder(_medium().model)
    randomize_gates(gated, seed=6, hard_cases=False)
    shaper = Shaper(uniform=uniform, round_to=round_to)
    target = 0.45 * count_params(gated.config)
    calibrate(gated, shaper.sized(GatedEncoder.expected_params), target, 0.005)
    shaper.apply(gated)
    config = _check_exact(gated)
    assert count_params(config) == pytest.approx(target, rel=0.005)
    units = [u for u, k in zip(config.encoder_ff_interm_features, config.encoder_ff_kept) if k]
    if uniform:
        assert len(set(units)) == 1
    for count, full in [(u, 256) for u in units] + [(c[0], 32) for c in config.extractor_conv_layer_config]:
        assert count % round_to == 0 or count == full


def test_round_to_rounds_the_hidden_dimension():
    torch.manual_seed(0)
    gated = GatedEncoder(_medium().model, GateConfig(hidden_dim=True))
    randomize_gates(gated, seed=3, hard_cases=False)
    shaper = Shaper(round_to=8)
    target = 0.45 * count_params(gated.config)
    calibrate(gated, shaper.sized(GatedEncoder.expected_params), target, 0.005)
    shaper.apply(gated)
    gated.eval()
    compiled = compile_encoder(gated)
    config = compiled.config
    assert config.encoder_embed_dim < 64 and config.encoder_embed_dim % 8 == 0
    assert gated.expected_params().item() == num_params(compiled)
    assert count_params(config) == pytest.approx(target, rel=0.005)
    x, lengths = _batch()
    with torch.no_grad():
        expected, _ = gated(x, lengths)
        actual, _ = compiled(x, lengths)
    kept = torch.tensor(config.encoder_hidden_index)  # the gated model's removed channels are zeros
    assert max_rel_error(actual, [e[..., kept] for e in expected]) < 1e-5


def test_round_count():
    assert [round_count(c, 30, 8) for c in (0, 1, 4, 5, 12, 20, 27, 29, 30)] == [0, 8, 8, 8, 16, 24, 30, 30, 30]
    assert round_count(13, 512, 1) == 13


def test_shape_terms_pull_toward_the_shape():
    shape = Shape(layers=1, ffn=4, conv=8)
    gated = _uniform("hubert_base_tiny", shape).train()
    terms = ShapeTerms(gated, shape)
    assert set(terms.targets) == {"layers", "ffn", "conv"} and len(terms.targets["conv"][0]) == 6
    expected = terms.expected(gated)
    assert expected["ffn"].item() == pytest.approx(
        sum(f.unit_gate.keep_prob().sum().item() for f in gated.feed_forward) / 2, rel=1e-6)
    for p in terms.lambda1.values():
        p.data.fill_(1.0)  # the ascent has raised the multipliers: the gates are pushed toward the shape
    terms(gated, progress=1.0).backward()
    assert all(float(f.unit_gate.log_alpha.grad.sum()) > 0 for f in gated.feed_forward)  # descent closes units
    assert float(gated.attention[0].layer_gate.log_alpha.grad) > 0


@pytest.mark.parametrize("shape,uniform,round_to,message", [
    (Shape(ffn=16), False, 1, "pruning.shape: an explicit shape is a uniform one"),
    (Shape(ffn=999), True, 1, r"pruning.shape.ffn: must be a whole number in \[1, 48\]"),
    (Shape(heads=0), True, 1, r"pruning.shape.heads: must be a whole number in \[1, 4\]"),
    (Shape(layers=3), True, 1, r"pruning.shape.layers: must be a whole number in \[1, 2\]"),
    (Shape(conv=(8, 8)), True, 1, "pruning.shape.conv: give one count per conv layer \\(7\\)"),
    (Shape(conv=(16,) * 6 + (8,)), True, 1, "conv layer 6 keeps 8 of 16 channels, but transformers cannot hold"),
    (Shape(ffn=10), True, 4, "pruning.shape.ffn=10 is not a multiple of pruning.round_to=4"),
    (Shape(), True, 0, "pruning.round_to: must be a whole number >= 1"),
])
def test_bad_shapes_fail_in_one_line(shape, uniform, round_to, message):
    config = build_preset("hubert_base_tiny").config
    with pytest.raises(ValueError, match=message):
        check_shape(shape, config, GateConfig(), uniform, round_to)


@pytest.mark.parametrize("override,message", [
    ("pruning.shape.ffn=16", "pruning.shape: an explicit shape is a uniform one"),
    ("pruning.round_to=0", "pruning.round_to: must be a whole number >= 1"),
    ("pruning.uniform=true pruning.shape.conv=[8,8]", "pruning.shape.conv: give one count per conv layer"),
    ("pruning.uniform=true pruning.shape.conv=8 teacher.preset=hubert_large_tiny",
     "pruning.shape.conv=8: transformers cannot hold a layer_norm extractor's conv layers"),
])
def test_bad_shape_config_fails_before_compute(tmp_path, override, message):
    train, valid = noise_corpus(tmp_path)
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}", *override.split()])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, tmp_path / "run")


def test_preview_uniform(tmp_path):
    result = preview("wavlm_base_tiny", 0.5, tmp_path / "p", repeats=1, uniform=True)
    after = result.after
    assert result.error < 1e-5 and abs(result.reached - 0.5) < 0.05
    kept = [h for h in after["heads"] if h is not None]
    assert kept and set(kept) == {4}
    assert len({u for u in after["ffn_units"] if u is not None}) == 1
    assert after["conv_channels"][-1] == 16


def test_train_tiny_demo_uniform_end_to_end(tmp_path):
    """A short uniform run with part of the shape given (the layers left to the target): its export
    has whole layers, every head, one FFN width (the shape's), the shape's conv channels and the last
    conv layer whole."""
    train, valid = noise_corpus(tmp_path)
    extra = ["pruning.uniform=true", "pruning.shape.ffn=16", "pruning.shape.conv=8", "pruning.round_to=8"]
    proc = prune_cli(short_run_args(train, valid, tmp_path / "run", prune_steps=10, final_steps=0, extra=extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = json.loads((tmp_path / "run" / "export" / "config.json").read_text())["config"]
    kept = [i for i, k in enumerate(c["encoder_attention_kept"]) if k]
    assert c["encoder_attention_kept"] == c["encoder_ff_kept"] and kept
    assert {c["encoder_num_heads"][i] for i in kept} == {4}
    assert {c["encoder_ff_interm_features"][i] for i in kept} == {16}
    assert [s[0] for s in c["extractor_conv_layer_config"]] == [8] * 6 + [16]


def test_identity_layers_export_to_onnx_and_prune(tmp_path):
    """Identity layers go through the model: the ONNX graph (checked against torch by the writer)
    and prune's own export, which loads back to the same hidden states."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from prune import load_pretrained
    from prune.checkpoints.convert import write_model

    gated = _uniform("wavlm_base_tiny")
    gated.attention[0].layer_gate.log_alpha.data.fill_(CLOSED)
    Shaper(uniform=True).apply(gated)
    model = compile_encoder(gated.eval())
    assert model.config.encoder_layer_kept == [False, True]
    lines = write_model(model, tmp_path / "m.onnx", to="onnx")
    assert lines[0].startswith("onnxruntime vs torch") and (tmp_path / "m.onnx").exists()
    write_model(model, tmp_path / "native")
    loaded = load_pretrained(tmp_path / "native")
    assert loaded.config.encoder_layer_kept == [False, True]
    x, lengths = _batch()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x, lengths)[0], loaded(x, lengths)[0]))
