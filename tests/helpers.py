"""Shared test helpers."""

import torch

from prune.structures import GatedEncoder

CLOSED = -20.0  # a log_alpha that closes a gate in the eval mask


@torch.no_grad()
def randomize_gates(gated: GatedEncoder, seed: int = 0, hard_cases: bool = True) -> GatedEncoder:
    """Random, non-uniform gate states. With ``hard_cases``: layer 0 loses every head,
    the last layer's FFN every unit, layer 1's attention block and layer 0's FFN block are
    removed whole, and every conv layer (the last included) loses channels."""
    g = torch.Generator().manual_seed(seed)
    for name, p in gated.named_parameters():
        if name.endswith("log_alpha"):
            p.copy_(torch.randn(p.shape, generator=g) * 3 + 1.5)
            if p.numel() == 1:
                p.fill_(5.0)
    if hard_cases:
        n = gated.config.encoder_num_layers
        gated.attention[0].head_gate.log_alpha.fill_(CLOSED)
        gated.feed_forward[n - 1].unit_gate.log_alpha.fill_(CLOSED)
        gated.attention[1].layer_gate.log_alpha.fill_(CLOSED)
        gated.feed_forward[0].layer_gate.log_alpha.fill_(CLOSED)
        for conv in gated.conv:
            conv.gate.log_alpha[:2] = CLOSED
            conv.gate.log_alpha[2:] = conv.gate.log_alpha[2:].abs() + 2.0  # keep most, closes exactly two
    return gated


def max_rel_error(a, b) -> float:
    """max |a - b| / max |b| over a list of tensors."""
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))
