"""HardConcrete gates for L0 regularisation (Louizos et al., 2018), as used by CoFi and DPHuBERT."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

TEMPERATURE = 2.0 / 3.0
STRETCH = 0.1
EPS = 1e-6
# The deterministic eval mask approximates each gate's expected value with this
# empirically chosen factor on the logits (CoFi / DPHuBERT).
EVAL_LOGIT_SCALE = 0.8


class HardConcrete(nn.Module):
    """``n`` stochastic gates in [0, 1], exactly 0 or 1 with nonzero probability.

    ``forward()`` takes no input and returns the mask, (n,): a fresh reparameterised sample
    in training mode; in eval mode a deterministic mask with exactly ``round(n - L0)`` zeros,
    whose survivors keep their soft value. The eval mask is cached until ``log_alpha``
    changes (an optimizer step or a ``load_state_dict`` bumps its version).

    >>> gate = HardConcrete(12, init_mean=0.01)
    >>> gate().shape, gate.l0_norm()
    """

    def __init__(self, n: int, init_mean: float = 0.01, init_std: float = 0.01, temperature: float = TEMPERATURE,
                 stretch: float = STRETCH, eps: float = EPS):
        super().__init__()
        if n < 1:
            raise ValueError(f"a gate group needs at least one gate, got n={n}")
        if not 0.0 < init_mean < 1.0:
            raise ValueError(f"init_mean must be in (0, 1), got {init_mean}")
        self.n = n
        self.init_mean = init_mean
        self.init_std = init_std
        self.temperature = temperature
        self.limit_l = -stretch
        self.limit_r = 1.0 + stretch
        self.eps = eps
        # log P(gate != 0) = log sigmoid(log_alpha - bias)
        self.bias = temperature * math.log(-self.limit_l / self.limit_r)
        self.log_alpha = nn.Parameter(torch.empty(n))
        self._cache: Optional[Tuple[Tuple[int, int], Tensor]] = None
        # the units the eval mask keeps, when a shape forces them (``force``); None: the plain mask
        self.forced: Optional[Tensor] = None
        # eval survivors exactly 1, not their soft value: a gate whose value cannot fold into weights
        # (uniform mode's whole post-norm layer, out = x + z (layer(x) - x)); set through ``set_hard``
        self.hard = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        mean = math.log(1.0 - self.init_mean) - math.log(self.init_mean)
        with torch.no_grad():
            self.log_alpha.normal_(mean, self.init_std)

    def keep_prob(self) -> Tensor:
        """(n,) probability that each gate is nonzero; differentiable in ``log_alpha``."""
        return torch.sigmoid(self.log_alpha - self.bias)

    def l0_norm(self) -> Tensor:
        """Expected number of nonzero gates, a differentiable scalar."""
        return self.keep_prob().sum()

    def sample(self) -> Tensor:
        """(n,) a reparameterised training sample."""
        u = torch.empty_like(self.log_alpha).uniform_(self.eps, 1.0 - self.eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return torch.clamp(s * (self.limit_r - self.limit_l) + self.limit_l, 0.0, 1.0)

    def plain_count(self) -> int:
        """How many units the plain eval mask keeps: ``n - round(n - L0)`` (whatever is forced)."""
        with torch.no_grad():
            return self.n - round(self.n - self.l0_norm().item())

    def top(self, k: int) -> Tensor:
        """The indices (sorted, long, CPU) of the ``k`` units with the highest ``log_alpha``: the
        ones the plain eval mask would keep first."""
        if not 0 <= k <= self.n:
            raise ValueError(f"a gate group of {self.n} cannot keep {k} units")
        return torch.topk(self.log_alpha.detach().cpu(), k).indices.sort().values

    def force(self, index: Optional[Tensor]) -> None:
        """Make the eval mask keep exactly the units ``index`` (long; None: back to the plain mask),
        each at its soft value, as the plain mask's survivors (a shape imposed at the cut: uniform
        widths, whole layers, ``pruning.shape``, ``pruning.round_to``). Training samples are not
        affected. A unit kept only because of the forcing keeps its soft value too: the value the
        model was trained with around it (see docs/design.md, "Forced counts")."""
        if index is not None:
            index = torch.as_tensor(index, dtype=torch.long).flatten().cpu()
            if index.numel() and not (0 <= int(index.min()) and int(index.max()) < self.n):
                raise ValueError(f"a forced index of a gate group of {self.n} reaches {int(index.max())}")
        self.forced = index
        self._cache = None

    def set_hard(self, hard: bool = True) -> None:
        """Make the eval mask's survivors exactly 1 (``hard``) or their soft value (the default)."""
        self.hard = hard
        self._cache = None

    def eval_mask(self) -> Tensor:
        """(n,) the deterministic mask: ``round(n - L0)`` zeros (or, when forced, zeros outside the
        forced units), survivors at their soft value (exactly 1 when ``hard``)."""
        key = (self.log_alpha._version, self.log_alpha.data_ptr())
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            soft = torch.sigmoid(self.log_alpha / self.temperature * EVAL_LOGIT_SCALE)
            if self.forced is not None:
                keep = torch.zeros_like(soft, dtype=torch.bool)
                keep[self.forced.to(soft.device)] = True
                # a kept unit stays nonzero even where its soft value underflows (the cut keeps the nonzeros)
                soft = torch.where(keep, soft.clamp_min(torch.finfo(soft.dtype).tiny), torch.zeros_like(soft))
            else:
                num_zeros = round(self.n - self.l0_norm().item())
                if num_zeros > 0:
                    soft[torch.topk(soft, k=num_zeros, largest=False).indices] = 0.0
            if self.hard:
                soft = (soft > 0).to(soft.dtype)
        self._cache = (key, soft)
        return soft

    def expected_keep(self) -> Tensor:
        """(n,) what the cost functions count: P(gate != 0) in training, and in eval mode
        the eval mask's 0/1 pattern (so the expected cost is the compiled model's cost)."""
        if self.training:
            return self.keep_prob()
        return (self.eval_mask() > 0).to(self.log_alpha.dtype)

    def forward(self) -> Tensor:
        return self.sample() if self.training else self.eval_mask()

    def extra_repr(self) -> str:
        return f"{self.n}, temperature={self.temperature:.4g}, stretch={self.limit_r - 1:.3g}"
