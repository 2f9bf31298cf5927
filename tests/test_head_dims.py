"""The dims inside the heads (prune/structures/transformer.py, ``AttentionBlock``): per layer one
gate over the query/key dims and one over the value dims, shared by the layer's heads; the compiled
model is exact and its costs are the expected ones."""

import pytest
import torch
from conftest import TINY
from helpers import CLOSED, NO_DROPOUT, gated_step, max_rel_error, monte_carlo_cost, randomize_gates
from helpers import run_no_grad as _run

from prune.compile import compile_encoder
from prune.measured import measured_macs, num_params
from prune.models import build_encoder, build_preset
from prune.structures import GateConfig, GatedEncoder, count_macs, count_params

TOL = 1e-5
DIMS = GateConfig(head_qk_dims=True, head_v_dims=True)


def _gated(name, gates=DIMS, seed=0, hard_cases=True, model=None):
    """The reference computes every dim (skip_closed off): the skipping path is checked on its own below."""
    gated = GatedEncoder(build_preset(name) if model is None else model, gates, skip_closed=False)
    randomize_gates(gated, seed=seed, hard_cases=hard_cases)
    with torch.no_grad():  # layer 1 (its block reopened) loses some q/k dims and some (other) v dims
        gated.attention[1].layer_gate.log_alpha.fill_(5.0)
        gated.attention[1].qk_gate.log_alpha[:3] = CLOSED
        gated.attention[1].v_gate.log_alpha[-2:] = CLOSED
    return gated.eval()


@pytest.mark.parametrize("name", TINY)
def test_compiled_matches_gated_eval(name, batch):
    """Every hidden state on a padded batch, with every other structure's hard cases as well."""
    gated = _gated(name)
    compiled = compile_encoder(gated)
    cfg, d = compiled.config, gated.config.encoder_head_dim
    assert cfg.encoder_head_dim == d
    assert 0 < cfg.encoder_head_qk_dims[1] <= d - 3 and 0 < cfg.encoder_head_v_dims[1] <= d - 2
    assert cfg.encoder_num_heads[1] > 0 and cfg.encoder_head_qk_dims != cfg.encoder_head_v_dims
    expected, exp_len = _run(gated, *batch)
    actual, act_len = _run(compiled, *batch)
    assert torch.equal(exp_len, act_len) and len(actual) == len(expected)
    assert max_rel_error(actual, expected) < TOL
    rebuilt = build_encoder(cfg)
    rebuilt.load_state_dict(compiled.state_dict(), strict=True)


@pytest.mark.parametrize("name", ["wav2vec2_base_tiny", "wavlm_base_tiny"])
def test_no_qk_dim_or_no_v_dim_left_stays_exact(name, batch):
    """Layer 0 keeps no query/key dim (uniform attention weights, WavLM: the bias alone), layer 1 no
    value dim (the block's output is out_proj's bias)."""
    gated = GatedEncoder(build_preset(name), DIMS, skip_closed=False)
    randomize_gates(gated, seed=4, hard_cases=False)
    with torch.no_grad():
        gated.attention[0].qk_gate.log_alpha.fill_(CLOSED)
        gated.attention[1].v_gate.log_alpha.fill_(CLOSED)
    gated.eval()
    compiled = compile_encoder(gated)
    assert compiled.config.encoder_head_qk_dims[0] == 0 and compiled.config.encoder_head_v_dims[1] == 0
    assert max_rel_error(_run(compiled, *batch)[0], _run(gated, *batch)[0]) < TOL
    assert gated.expected_params().item() == num_params(compiled)


@pytest.mark.parametrize("name", ["hubert_base_tiny", "wavlm_large_tiny"])
def test_compiled_matches_with_the_hidden_gate_too(name, batch):
    gated = _gated(name, GateConfig(head_qk_dims=True, head_v_dims=True, hidden_dim=True), seed=1)
    compiled = compile_encoder(gated)
    kept = torch.tensor(compiled.config.encoder_hidden_index)
    assert compiled.config.encoder_embed_dim < gated.config.encoder_embed_dim
    expected = [h[..., kept] for h in _run(gated, *batch)[0]]
    assert max_rel_error(_run(compiled, *batch)[0], expected) < TOL
    assert gated.expected_params().item() == num_params(compiled)


@pytest.mark.parametrize("name", TINY)
def test_expected_costs_in_eval_equal_the_compiled_model(name):
    gated = _gated(name, seed=3)
    compiled = compile_encoder(gated)
    assert gated.expected_params().item() == num_params(compiled) == count_params(compiled.config)
    for seconds in (1.0, 2.3):  # exactly torch.utils.flop_counter's count (scores and context included)
        measured = measured_macs(compiled, seconds)
        assert gated.expected_macs(seconds).item() == measured == count_macs(compiled.config, seconds)


def test_cutting_cut_head_dims_again_stays_exact(batch):
    """Gate the compiled model again (heads narrower than encoder_head_dim, the softmax scale kept)."""
    first = compile_encoder(_gated("wavlm_base_tiny", seed=2))
    gated = GatedEncoder(first, DIMS, skip_closed=False)
    randomize_gates(gated, seed=5, hard_cases=False)
    with torch.no_grad():
        gated.attention[1].qk_gate.log_alpha[0] = CLOSED
    gated.eval()
    second = compile_encoder(gated)
    assert second.config.encoder_head_qk_dims[1] < first.config.encoder_head_qk_dims[1]
    assert gated.expected_params().item() == num_params(second)
    assert max_rel_error(_run(second, *batch)[0], _run(gated, *batch)[0]) < TOL


@pytest.mark.parametrize("kind", ["expected_params", "expected_macs"])
def test_training_costs_are_the_expectation_over_independent_gates(kind):
    """The training-mode cost equals the mean over drawn gate patterns of the exact eval-mode cost:
    Monte Carlo over every gate, the dims gates included (E[H' d] = E[H'] E[d])."""
    gated = GatedEncoder(build_preset("wavlm_base_tiny"), DIMS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gated.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) + 0.5)
    gated.train()
    expected = getattr(gated, kind)().item()
    bias = gated.attention[0].qk_gate.bias
    keep = [torch.sigmoid(p.detach() - bias) for p in gated.gate_parameters()]
    assert expected == pytest.approx(monte_carlo_cost(gated, kind, keep, g), rel=0.01)
    without = GatedEncoder(build_preset("wavlm_base_tiny"))  # the dims gates do move the cost
    assert abs(getattr(without.train(), kind)().item() - expected) > 0.05 * expected


def test_head_dims_gates_are_off_by_default():
    gated = GatedEncoder(build_preset("hubert_base_tiny"))
    assert all(a.qk_gate is None and a.v_gate is None for a in gated.attention)
    compiled = compile_encoder(randomize_gates(gated).eval())
    assert compiled.config.encoder_head_qk_dims is None and compiled.config.encoder_head_v_dims is None
    only_v = GatedEncoder(build_preset("hubert_base_tiny"), GateConfig(head_v_dims=True))
    assert all(a.qk_gate is None and a.v_gate is not None for a in only_v.attention)
    assert "attention.0.v_gate.log_alpha" in dict(only_v.named_parameters())


def test_config_rejects_dims_wider_than_a_head():
    from prune.models.config import EncoderConfig

    with pytest.raises(ValueError, match="encoder_head_qk_dims"):
        EncoderConfig(encoder_head_qk_dims=[65] * 12)


@pytest.mark.parametrize("name", TINY)
def test_skipping_closed_dims_gives_the_same_loss_and_gradients(name):
    gated = GatedEncoder(build_preset(name, **NO_DROPOUT), DIMS, skip_min_closed=0.0)
    randomize_gates(gated, seed=4, hard_cases=False)
    with torch.no_grad():  # some dims closed in every draw, different ones for q/k and v
        for a in gated.attention:
            a.qk_gate.log_alpha[:3] = CLOSED
            a.v_gate.log_alpha[-2:] = CLOSED
        gated.attention[1].head_gate.log_alpha[:1] = CLOSED
    gated.train()
    x, lengths = torch.randn(2, 12000), torch.tensor([12000, 9000])
    with torch.no_grad():
        targets = [torch.randn_like(h) for h in gated.model(x, lengths)[0]]
    torch.manual_seed(7)
    layers = gated.sample_gates().layers
    assert all(l.qk_dims_active is not None and l.v_dims_active is not None for l in layers)
    assert layers[0].qk_dims_active.numel() <= gated.attention[0].qk_dim - 3
    loss_on, _, grads_on = gated_step(gated, True, x, lengths, targets)
    loss_off, _, grads_off = gated_step(gated, False, x, lengths, targets)
    assert abs(loss_on - loss_off) <= 1e-6 * abs(loss_off)
    assert grads_on.keys() == grads_off.keys()
    for n in grads_off:  # float32 sums in another order: relative to each tensor's scale
        a, b = grads_on[n], grads_off[n]
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8, n
    d = gated.attention[0].qk_dim  # the closed q dims of head 0 got no gradient
    q_grad = grads_on["model.encoder.transformer.layers.0.attention.q_proj.weight"]
    assert q_grad[:3].abs().sum() == 0 and q_grad[3:d].abs().sum() > 0


def test_round_to_keeps_head_dims_in_multiples_and_the_cut_exact(batch):
    """pruning.round_to at the cut: q/k and v widths in multiples of 4 (heads 16 wide), the
    calibration still on target, the compiled model exact."""
    from prune.calibrate import BUT_BLOCKS, calibrate
    from prune.shape import Shaper
    from prune.structures import HEAD_QK_DIMS, HEAD_V_DIMS

    assert {HEAD_QK_DIMS, HEAD_V_DIMS} <= set(BUT_BLOCKS)  # they move in the coarse pass
    gated = GatedEncoder(build_preset("hubert_base_tiny", encoder_num_heads=2), DIMS)
    randomize_gates(gated, seed=6, hard_cases=False)
    shaper = Shaper(round_to=4)
    target = 0.6 * count_params(gated.config)
    calibrate(gated, shaper.sized(GatedEncoder.expected_params), target, 0.01)
    shaper.apply(gated)
    compiled = compile_encoder(gated)
    cfg = compiled.config
    assert num_params(compiled) == pytest.approx(target, rel=0.01) == gated.expected_params().item()
    dims = cfg.encoder_head_qk_dims + cfg.encoder_head_v_dims
    assert all(d % 4 == 0 for d in dims) and min(dims) < 16
    assert max_rel_error(_run(compiled, *batch)[0], _run(gated, *batch)[0]) < TOL


@pytest.mark.parametrize("key", ["head_qk_dims", "head_v_dims"])
def test_uniform_mode_refuses_the_head_dims_gates(tmp_path, key):
    from helpers_train import noise_corpus

    from prune.train.config import ConfigError, compose, validate

    train, valid = noise_corpus(tmp_path / "corpus")
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}",
                                "pruning.uniform=true", f"pruning.gates.{key}=true"])
    with pytest.raises(ConfigError, match=f"pruning.gates.{key}=true: a uniform run keeps transformers' head"):
        validate(cfg)
    validate(compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}",
                                   f"pruning.gates.{key}=true"]))  # free mode takes it
    with pytest.raises(ValueError, match="uniform structures keep transformers' head width"):
        GatedEncoder(build_preset("hubert_base_tiny"), GateConfig(**{key: True}), uniform=True)


def test_inspect_describe_export_and_hf_know_the_head_dims(tmp_path):
    from prune.checkpoints.export import describe, export_pruned, load_pruned
    from prune.checkpoints.hf_export import blockers
    from prune.checkpoints.inspect import structure_lines

    compiled = compile_encoder(_gated("hubert_base_tiny", seed=6))
    cfg = compiled.config
    info = describe(cfg)
    assert info["head_qk_dims"] == [cfg.encoder_head_qk_dims[0], cfg.encoder_head_qk_dims[1]]
    assert info["head_v_dims"][1] == cfg.encoder_head_v_dims[1]
    line = next(l for l in structure_lines(compiled) if l.startswith("head dims:"))
    assert line == (f"head dims:      per layer, of 8: q/k dims {', '.join(map(str, cfg.encoder_head_qk_dims))}; "
                    f"v dims {', '.join(map(str, cfg.encoder_head_v_dims))} (softmax scale 1/sqrt(8))")
    assert not any(l.startswith("head dims:") for l in structure_lines(build_preset("hubert_base_tiny")))
    export_pruned(compiled, tmp_path / "out")
    loaded = load_pruned(tmp_path / "out")
    assert loaded.config == cfg
    x = torch.randn(1, 8000)
    assert max_rel_error(_run(loaded, x, None)[0], _run(compiled, x, None)[0]) == 0
    reasons = [r for r in blockers(cfg) if "query/key" in r]
    assert reasons == [f"layer 1 keeps heads of {cfg.encoder_head_qk_dims[1]} query/key and "
                       f"{cfg.encoder_head_v_dims[1]} value dims of 8 (transformers' heads are "
                       f"hidden_size // num_attention_heads wide in q, k and v)"]


def test_onnx_export_of_cut_head_dims_matches(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from prune.checkpoints.onnx_export import check_batch, export_onnx, verify_onnx

    gated = GatedEncoder(build_preset("wavlm_base_tiny", encoder_num_layers=3), DIMS)
    randomize_gates(gated, seed=2, hard_cases=False)
    with torch.no_grad():
        gated.attention[0].qk_gate.log_alpha[:3] = CLOSED
        gated.attention[1].v_gate.log_alpha[:5] = CLOSED
    model = compile_encoder(gated.eval())
    assert model.config.encoder_head_qk_dims[0] < 8 and model.config.encoder_head_v_dims[1] < 8
    path = export_onnx(model, tmp_path / "m.onnx")
    errors = verify_onnx(path, model, batch=check_batch(model.config))
    assert max(errors.values()) < 1e-4, errors


def test_preview_gates_the_head_dims(tmp_path):
    from prune.preview import preview

    result = preview("hubert_base_tiny", 0.5, tmp_path / "p", seconds=0.5, repeats=1, head_dims=True)
    assert result.error < TOL and result.reached == pytest.approx(0.5, abs=0.02)
    assert min(d for d in result.after["head_qk_dims"] + result.after["head_v_dims"] if d is not None) < 8


def test_preview_refuses_head_dims_with_uniform_in_one_line(tmp_path):
    from prune.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["preview", "--preset", "hubert_base_tiny", "--head-dims", "--uniform", "--out", str(tmp_path / "p")])
    message = str(exit.value.code)  # SystemExit(message): printed to stderr, exit status 1
    assert len(message.splitlines()) == 1 and message.startswith("prune preview: --head-dims with --uniform")
    assert not (tmp_path / "p").exists()


def test_a_training_run_with_the_head_dims_gates_cuts_and_exports_them(tmp_path):
    """pruning.gates.head_qk_dims=true head_v_dims=true end to end, with round_to=2: the export keeps
    narrower heads (even widths) and loads back."""
    from helpers_train import noise_corpus, prune_cli, short_run_args

    from prune.checkpoints.export import load_pruned, read_export_info

    train, valid = noise_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    done = prune_cli(short_run_args(train, valid, run, prune_steps=10, final_steps=4,
                                    extra=["pruning.gates.head_qk_dims=true", "pruning.gates.head_v_dims=true",
                                           "pruning.gates.init_mean=0.3", "pruning.round_to=2"]))
    assert done.returncode == 0, done.stderr[-3000:]
    config = read_export_info(run / "export")["config"]
    dims = [d for d in config["encoder_head_qk_dims"] + config["encoder_head_v_dims"]]
    assert min(dims) < 8 and all(d % 2 == 0 for d in dims), dims
    assert load_pruned(run / "export").config.encoder_head_qk_dims == config["encoder_head_qk_dims"]
