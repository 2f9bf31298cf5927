"""The hidden dimension as a structure (prune/structures/hidden.py): one gate over the residual
stream's channels; the compiled model is exact and its costs are the expected ones."""

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
HIDDEN = GateConfig(hidden_dim=True)


def _gated(name, seed=0, hard_cases=True, model=None):
    # the reference computes every unit (skip_closed off): no gathering code shared with the cut
    gated = GatedEncoder(build_preset(name) if model is None else model, HIDDEN, skip_closed=False)
    randomize_gates(gated, seed=seed, hard_cases=hard_cases)
    with torch.no_grad():  # one group of the positional conv loses more than the others
        gated.hidden[0].gate.log_alpha[:3] = CLOSED
    return gated.eval()


@pytest.mark.parametrize("name", TINY)
def test_compiled_matches_gated_eval(name, batch):
    """Every hidden state with padding: the gated model's kept channels equal the compiled model's,
    its removed ones are exact zeros; with every other structure's hard cases as well."""
    gated = _gated(name)
    compiled = compile_encoder(gated)
    cfg = compiled.config
    D = gated.config.encoder_embed_dim
    kept = torch.tensor(cfg.encoder_hidden_index)
    assert 0 < cfg.encoder_embed_dim < D - 3 and cfg.encoder_hidden_total == D
    sizes = cfg.encoder_pos_conv_group_sizes
    assert len(set(sizes)) > 1 and sum(sizes) == cfg.encoder_embed_dim  # the groups differ
    removed = torch.ones(D, dtype=torch.bool)
    removed[kept] = False
    expected, exp_len = _run(gated, *batch)
    actual, act_len = _run(compiled, *batch)
    assert torch.equal(exp_len, act_len) and len(actual) == len(expected)
    assert all(h[..., removed].abs().max() == 0 for h in expected)
    assert max_rel_error(actual, [h[..., kept] for h in expected]) < TOL
    rebuilt = build_encoder(cfg)
    rebuilt.load_state_dict(compiled.state_dict(), strict=True)


@pytest.mark.parametrize("name", TINY)
def test_expected_costs_in_eval_equal_the_compiled_model(name):
    gated = _gated(name, seed=3)
    compiled = compile_encoder(gated)
    assert gated.expected_params().item() == num_params(compiled) == count_params(compiled.config)
    for seconds in (1.0, 2.3):
        measured = measured_macs(compiled, seconds)
        assert gated.expected_macs(seconds).item() == pytest.approx(measured, rel=0.01)
        assert count_macs(compiled.config, seconds) == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("name", ["hubert_base_tiny", "wav2vec2_large_lv60k_tiny", "wavlm_base_tiny",
                                  "wavlm_large_tiny"])
def test_cutting_a_cut_hidden_dimension_again_stays_exact(name, batch):
    """Gate the compiled model again (groupwise positional conv, LayerNorms counting phantoms, WavLM's
    chunks through the kept channel ids) and cut again."""
    first = compile_encoder(_gated(name, seed=2))
    gated = _gated(name, seed=5, hard_cases=False, model=first)
    second = compile_encoder(gated)
    assert second.config.encoder_embed_dim < first.config.encoder_embed_dim
    assert second.config.encoder_hidden_total == first.config.encoder_hidden_total
    assert set(second.config.encoder_hidden_index) < set(first.config.encoder_hidden_index)
    assert gated.expected_params().item() == num_params(second)
    kept = torch.tensor([first.config.encoder_hidden_index.index(c) for c in second.config.encoder_hidden_index])
    expected = [h[..., kept] for h in _run(gated, *batch)[0]]
    assert max_rel_error(_run(second, *batch)[0], expected) < TOL


def test_positional_conv_expectation_counts_each_groups_variance():
    """E[sum_g n_g^2] under independent gates, against Monte Carlo: E[n_g]^2 alone is visibly short."""
    gated = GatedEncoder(build_preset("hubert_base_tiny"), HIDDEN).train()
    hidden = gated.hidden[0]
    with torch.no_grad():
        hidden.gate.log_alpha.copy_(torch.linspace(-1.0, 2.0, hidden.channels))
    like = torch.zeros((), dtype=torch.float64)
    p = hidden.hidden_keep(like)
    exact = hidden._sum_sq(p).item()
    draws = torch.bernoulli(p.expand(200_000, -1), generator=torch.Generator().manual_seed(0))
    n_g = draws.view(draws.shape[0], gated.config.encoder_pos_conv_groups, -1).sum(-1)
    monte_carlo = n_g.square().sum(-1).mean().item()
    squares_of_means = (p.view(gated.config.encoder_pos_conv_groups, -1).sum(-1) ** 2).sum().item()
    assert exact == pytest.approx(monte_carlo, rel=2e-3)
    assert abs(squares_of_means - monte_carlo) > 20 * abs(exact - monte_carlo)


@pytest.mark.parametrize("kind", ["expected_params", "expected_macs"])
def test_training_costs_are_the_expectation_over_independent_gates(kind):
    """The training-mode cost equals the mean over drawn gate patterns of the exact eval-mode cost
    (each pattern cut as it would be): Monte Carlo over every gate, the hidden one included."""
    gated = GatedEncoder(build_preset("wavlm_base_tiny"), HIDDEN)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gated.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) + 1.0)
    gated.train()
    expected = getattr(gated, kind)().item()
    probs = [p.detach().clone() for p in gated.gate_parameters()]
    keep = [torch.sigmoid(p - gated.hidden[0].gate.bias) for p in probs]
    assert expected == pytest.approx(monte_carlo_cost(gated, kind, keep, g), rel=0.01)


def test_hidden_gate_is_off_by_default():
    gated = GatedEncoder(build_preset("hubert_base_tiny"))
    assert gated.hidden[0].gate is None
    assert not any(n.startswith("hidden.") for n, _ in gated.named_parameters())
    compiled = compile_encoder(randomize_gates(gated).eval())
    assert compiled.config.encoder_hidden_total is None and compiled.config.encoder_pos_conv_group_sizes is None


def test_distillation_heads_follow_the_cut():
    """The heads read the kept channels only after the cut: the same predictions as before it."""
    from prune.train.objective import Distillation
    from prune.train.student import hidden_kept

    gated = _gated("hubert_base_tiny", seed=4)
    objective = Distillation(gated.config.encoder_embed_dim, [[0], [1, 2]])
    with torch.no_grad():
        for head in objective.heads.heads:
            head.weight.normal_()
    x, lengths = torch.randn(2, 8000), torch.tensor([8000, 6000])
    with torch.no_grad():
        before, _ = objective.student_output(gated, x, lengths)
        compiled = compile_encoder(gated)
        objective.after_cut(hidden_kept(gated.config, compiled.config))
        after, _ = objective.student_output(compiled, x, lengths)
    assert objective.heads.heads[0].weight.shape == (gated.config.encoder_embed_dim, compiled.config.encoder_embed_dim)
    assert max_rel_error(after, before) < TOL


def test_training_run_with_the_hidden_gate_resumes_in_the_final_stage(tmp_path):
    """pruning.gates.hidden_dim=true end to end: killed in the final distillation (after the cut, heads
    cut too) and resumed, the export is the uninterrupted run's, byte for byte."""
    from helpers_train import noise_corpus, prune_cli, short_run_args

    from prune.checkpoints.export import read_export_info

    train, valid = noise_corpus(tmp_path / "corpus")
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = lambda run: short_run_args(train, valid, run, prune_steps=10, final_steps=10,  # noqa: E731
                                      extra=["pruning.gates.hidden_dim=true", "pruning.gates.init_mean=0.3"])
    done = prune_cli(args(full))
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = prune_cli(args(killed), env={"PRUNE_FAULT": "mid_step:15"})
    assert crashed.returncode != 0 and not (killed / "export").exists()
    resumed = prune_cli(["resume", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (full / "export" / "model.safetensors").read_bytes() == (killed / "export" / "model.safetensors").read_bytes()
    config = read_export_info(full / "export")["config"]
    assert config["encoder_hidden_total"] == 32 and config["encoder_embed_dim"] < 32  # channels were cut


def test_inspect_describe_and_calibration_know_the_hidden_kind(tmp_path):
    from prune.calibrate import BUT_BLOCKS, calibrate
    from prune.checkpoints.export import describe, export_pruned, load_pruned
    from prune.checkpoints.inspect import structure_lines
    from prune.structures import HIDDEN

    gated = _gated("hubert_base_tiny", seed=6)
    compiled = compile_encoder(gated)
    cfg = compiled.config
    assert describe(cfg)["hidden_channels"] == cfg.encoder_pos_conv_group_sizes
    line = next(l for l in structure_lines(compiled) if l.startswith("hidden dim:"))
    assert f"{cfg.encoder_embed_dim} of 32 channels kept" in line
    export_pruned(compiled, tmp_path / "out")
    loaded = load_pruned(tmp_path / "out")
    assert loaded.config == cfg
    x = torch.randn(1, 8000)
    assert max_rel_error(_run(loaded, x, None)[0], _run(compiled, x, None)[0]) == 0
    assert HIDDEN in BUT_BLOCKS
    fresh = GatedEncoder(build_preset("hubert_base_tiny"), HIDDEN_ONLY)  # calibration moves the hidden gate
    full = fresh.expected_params().item()
    reached = calibrate(fresh, GatedEncoder.expected_params, 0.8 * full, 0.01)
    assert reached == pytest.approx(0.8 * full, rel=0.01)
    assert 0 < int((fresh.hidden[0].gate() == 0).sum()) < 32


HIDDEN_ONLY = GateConfig(conv_channels=False, attention_heads=False, attention_layers=False, ffn_units=False,
                         ffn_layers=False, hidden_dim=True)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dims", [False, True])
def test_the_narrow_stream_gives_the_same_loss_and_gradients(name, dims):
    """Sparsity-aware training with the hidden gate: the transformer runs on the open channels alone
    (gathered weights, phantom LayerNorm statistics, the positional conv on the full stream) and
    gives the hidden states, loss and every gradient of the full computation; with every other
    structure's closed units skipped too (and the head dims when ``dims``)."""
    gates = GateConfig(hidden_dim=True, head_qk_dims=dims, head_v_dims=dims)
    gated = GatedEncoder(build_preset(name, **NO_DROPOUT), gates, skip_min_closed=0.0)
    randomize_gates(gated, seed=4, hard_cases=False)
    with torch.no_grad():  # closed heads, units and conv channels as well, blocks partly open
        gated.hidden[0].gate.log_alpha[: gated.config.encoder_embed_dim // 3] = CLOSED
        gated.attention[0].head_gate.log_alpha[:1] = CLOSED
        gated.feed_forward[-1].unit_gate.log_alpha[: gated.feed_forward[-1].num_units // 2] = CLOSED
        gated.conv[-1].gate.log_alpha[:2] = CLOSED
    gated.train()
    x, lengths = torch.randn(2, 12000), torch.tensor([12000, 9000])
    with torch.no_grad():
        targets = [torch.randn_like(h) for h in gated.model(x, lengths)[0]]
    torch.manual_seed(7)
    drawn = gated.sample_gates()
    D = gated.config.encoder_embed_dim
    assert drawn.hidden_active is not None and drawn.hidden_active.numel() <= D - D // 3
    assert all(l.hidden.numel() == drawn.hidden_active.numel() for l in drawn.layers)
    loss_on, hiddens_on, grads_on = gated_step(gated, True, x, lengths, targets)
    loss_off, hiddens_off, grads_off = gated_step(gated, False, x, lengths, targets)
    assert all(a.shape == b.shape for a, b in zip(hiddens_on, hiddens_off))
    assert max_rel_error(hiddens_on, hiddens_off) < TOL
    assert abs(loss_on - loss_off) <= 1e-6 * abs(loss_off)
    assert grads_on.keys() == grads_off.keys()
    for n in grads_off:  # float32 sums in another order: relative to each tensor's scale
        a, b = grads_on[n], grads_off[n]
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8, n
    closed = torch.ones(D, dtype=torch.bool)
    closed[drawn.hidden_active] = False  # their FFN columns got no gradient, the open ones did
    for kind in ("feed_forward.intermediate_dense", "attention.q_proj"):
        grad = grads_on[f"model.encoder.transformer.layers.0.{kind}.weight"]
        assert grad[:, closed].abs().sum() == 0 and grad[:, ~closed].abs().sum() > 0, kind
