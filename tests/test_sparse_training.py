"""Sparsity-aware training: skipping closed heads, units, channels and blocks changes no number."""

import pytest
import torch
from conftest import TINY
from helpers import CLOSED, randomize_gates

from prune.models import build_preset
from prune.structures import GatedEncoder

NO_DROPOUT = dict(encoder_dropout=0.0, encoder_attention_dropout=0.0, encoder_projection_dropout=0.0,
                  encoder_ff_interm_dropout=0.0, encoder_layer_drop=0.0)


def _step(gated: GatedEncoder, skip: bool, x, lengths, targets, seed: int):
    gated.skip_closed = skip
    gated.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same gate samples in both runs
    hiddens, frames = gated(x, lengths)
    loss = sum(((h - t) ** 2).mean() for h, t in zip(hiddens, targets))
    loss = loss + gated.expected_params() * 1e-6
    loss.backward()
    # a skipped block leaves its parameters' grads at None; the trainer fills in zeros (as the
    # full computation produces) so that the optimizer treats both paths alike
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in gated.named_parameters()}
    return loss.detach(), grads, gated.sample_gates


@pytest.mark.parametrize("name", TINY + ["hubert_base_tiny+output_scale"])
def test_same_loss_and_gradients_with_skipping_on_and_off(name):
    name, _, extra = name.partition("+")
    model = build_preset(name, **NO_DROPOUT, extractor_output_scale=extra == "output_scale")
    if extra:  # DPHuBERT's scale on the extractor's output: the skipped channels' entries are left out too
        with torch.no_grad():
            model.feature_extractor.output_scale.uniform_(0.2, 1.0)
    gated = randomize_gates(GatedEncoder(model, skip_min_closed=0.0), seed=4).train()
    with torch.no_grad():  # partly open groups too, not only all-or-nothing ones
        gated.feed_forward[0].unit_gate.log_alpha[: gated.feed_forward[0].num_units // 2] = CLOSED
        gated.attention[-1].head_gate.log_alpha[:1] = CLOSED
    x, lengths = torch.randn(2, 12000), torch.tensor([12000, 9000])
    with torch.no_grad():
        targets = [torch.randn_like(h) for h in gated.model(x, lengths)[0]]
    torch.manual_seed(7)
    gates = gated.sample_gates()
    assert gates.extractor.closed is not None and all(a is not None for a in gates.extractor.active)
    layers = gates.layers
    assert layers[0].heads_active.numel() == 0 and not layers[1].attention_on and not layers[0].ffn_on

    loss_on, grads_on, _ = _step(gated, True, x, lengths, targets, seed=7)
    loss_off, grads_off, _ = _step(gated, False, x, lengths, targets, seed=7)
    assert abs(loss_on - loss_off) <= 1e-6 * abs(loss_off)
    assert grads_on.keys() == grads_off.keys()
    assert any(n.endswith("log_alpha") for n in grads_on)
    for n in grads_off:  # float32 sums in another order: relative to each tensor's scale
        a, b = grads_on[n], grads_off[n]
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8, n  # 1e-8: grads that are 0 in exact math
    # the closed units really got no gradient
    ff = gated.model.encoder.transformer.layers[0].feed_forward
    if ff is not None:
        n = gated.feed_forward[0].num_units // 2
        assert grads_on["model.encoder.transformer.layers.0.feed_forward.intermediate_dense.weight"][:n].abs().sum() == 0


def test_skipping_is_the_default_and_can_be_switched_off():
    gated = randomize_gates(GatedEncoder(build_preset("hubert_base_tiny"))).train()
    assert gated.sample_gates().skipping and gated.sample_gates().extractor.active is not None
    plain = GatedEncoder(build_preset("hubert_base_tiny"), skip_closed=False).sample_gates()
    assert not plain.skipping and plain.extractor.active is None
    assert all(l.heads_active is None and l.units_active is None for l in plain.layers)
    fresh = GatedEncoder(build_preset("hubert_base_tiny"))
    with torch.no_grad():
        for p in fresh.gate_parameters():
            p.fill_(20.0)
    gates = fresh.eval().sample_gates()  # nothing closed: the plain path throughout
    assert all(a is None for a in gates.extractor.active) and gates.extractor.closed is None
    assert all(l.heads_active is None and l.units_active is None for l in gates.layers)


def test_lightly_closed_groups_are_computed_whole():
    gated = GatedEncoder(build_preset("hubert_base_tiny"), skip_min_closed=0.3)
    with torch.no_grad():
        for p in gated.gate_parameters():
            p.fill_(20.0)
        gated.conv[2].gate.log_alpha[:2] = CLOSED  # 2 of 16: computed whole
        gated.conv[-1].gate.log_alpha[:8] = CLOSED  # half: skipped
    extractor = gated.eval().sample_gates().extractor
    assert extractor.active[2] is None and extractor.active[-1].numel() == 8 and extractor.closed.numel() == 8
