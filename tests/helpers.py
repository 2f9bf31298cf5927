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


def monte_carlo_cost(gated, kind: str, keep, generator, draws: int = 400) -> float:
    """The mean eval-mode cost ``getattr(gated, kind)()`` over ``draws`` gate patterns, each gate of
    ``gated.gate_parameters()`` open with its probability in ``keep`` (hard open / closed log_alphas)."""
    gated.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            for param, k in zip(gated.gate_parameters(), keep):
                param.copy_(torch.where(torch.bernoulli(k, generator=generator) > 0, 30.0, -30.0))
            total += getattr(gated, kind)().item()
    return total / draws


NO_DROPOUT = dict(encoder_dropout=0.0, encoder_attention_dropout=0.0, encoder_projection_dropout=0.0,
                  encoder_ff_interm_dropout=0.0, encoder_layer_drop=0.0)


def gated_step(gated: GatedEncoder, skip: bool, x, lengths, targets, seed: int = 7):
    """One training step's loss, hidden states and gradients (a parameter autograd left at None
    counts as zeros, as the trainer fills them), with ``skip_closed`` on or off and the same gate
    samples (``seed``) either way: what the sparsity-aware equivalence tests compare."""
    gated.skip_closed = skip
    gated.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    hiddens, _ = gated(x, lengths)
    loss = sum(((h - t) ** 2).mean() for h, t in zip(hiddens, targets)) + gated.expected_params() * 1e-6
    loss.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in gated.named_parameters()}
    return loss.detach(), [h.detach() for h in hiddens], grads


def run_no_grad(model, x, lengths):
    """``model(x, lengths)`` without autograd (hidden states, lengths)."""
    with torch.no_grad():
        return model(x, lengths)


def max_rel_error(a, b) -> float:
    """max |a - b| / max |b| over a list of tensors."""
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


def load_with_torch_only(export_dir) -> str:
    """Load an export in a fresh interpreter where every optional package fails to import;
    returns what it printed: the number of hidden states, then the parameter count."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ['transformers', 'hydra', 'omegaconf', 'soundfile', 'numpy', 'torchaudio', 'matplotlib']:\n"
        "    sys.modules[m] = None  # any import of these now fails\n"
        "import torch, prune\n"
        f"m = prune.load_pruned({str(export_dir)!r})\n"
        "h, _ = m(torch.randn(1, 16000))\n"
        "print(len(h), sum(p.numel() for p in m.parameters()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
