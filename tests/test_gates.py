import math

import pytest
import torch

from prune.gates import EPS, STRETCH, TEMPERATURE, HardConcrete


def test_published_constants():
    gate = HardConcrete(8)
    assert TEMPERATURE == pytest.approx(2 / 3) and gate.temperature == pytest.approx(2 / 3)
    assert (gate.limit_l, gate.limit_r) == (pytest.approx(-STRETCH), pytest.approx(1 + STRETCH))
    assert STRETCH == 0.1 and EPS == 1e-6
    # init: log_alpha ~ normal(log(1 - m) - log(m), 0.01)
    g = HardConcrete(20000, init_mean=0.01)
    assert g.log_alpha.mean().item() == pytest.approx(math.log(0.99 / 0.01), abs=1e-3)
    assert g.log_alpha.std().item() == pytest.approx(0.01, rel=0.05)
    assert HardConcrete(20000, init_mean=0.5).log_alpha.mean().item() == pytest.approx(0.0, abs=1e-3)


def test_sample_nonzero_rate_matches_l0():
    """Monte Carlo: P(sample != 0) == keep_prob. A temperature of 1.0 in either the sampler or
    the L0 formula shifts the rates by ~0.1-0.2, far beyond the tolerance."""
    gate = HardConcrete(9).train()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-3, 3, 9))
    draws = torch.stack([gate() for _ in range(20000)])
    assert draws.min() >= 0 and draws.max() <= 1
    rate = (draws > 0).float().mean(0)
    torch.testing.assert_close(rate, gate.keep_prob().detach(), atol=0.015, rtol=0)
    # exact zeros and exact ones both occur: the stretch at work
    assert (draws == 0).any() and (draws == 1).any()
    assert gate.l0_norm().item() == pytest.approx(gate.keep_prob().sum().item())


def test_eval_mask_deterministic_with_round_zeros_and_cached():
    gate = HardConcrete(50)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.randn(50) * 3)
    gate.eval()
    mask = gate()
    assert mask is gate()  # cached
    expected_zeros = round(50 - gate.l0_norm().item())
    assert 0 < expected_zeros < 50
    assert int((mask == 0).sum()) == expected_zeros
    soft = torch.sigmoid(gate.log_alpha.detach() / gate.temperature * 0.8)
    kept = mask > 0
    torch.testing.assert_close(mask[kept], soft[kept])
    assert soft[~kept].max() <= soft[kept].min()  # the smallest were zeroed

    # an optimizer step changes log_alpha: the cache must be rebuilt
    opt = torch.optim.SGD(gate.parameters(), lr=10.0)
    gate.l0_norm().backward()
    opt.step()
    new = gate()
    assert new is not mask
    assert int((new == 0).sum()) == round(50 - gate.l0_norm().item())
    # load_state_dict too
    gate.load_state_dict({"log_alpha": torch.full((50,), 5.0)})
    assert int((gate() == 0).sum()) == round(50 - gate.l0_norm().item()) == 0


def test_gradients_reach_log_alpha():
    gate = HardConcrete(6, init_mean=0.5).train()
    (gate() * torch.arange(6.0)).sum().backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0
    gate.log_alpha.grad = None
    gate.l0_norm().backward()
    assert (gate.log_alpha.grad > 0).all()


def test_bad_sizes():
    with pytest.raises(ValueError, match="at least one"):
        HardConcrete(0)
    with pytest.raises(ValueError, match="init_mean"):
        HardConcrete(3, init_mean=1.0)
