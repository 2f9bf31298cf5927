"""``CutPlan``: what a compile does to the source state dict, recorded structure by structure.

Each structure records, per tensor, which indices it keeps along which dimension and which
per-index factors (its soft gate values) fold into it; compile then applies the whole plan at
once. Because selections are recorded per dimension rather than written as finished tensors,
several structures can slice one tensor: the conv channels of layer i select rows of layer i's
weight and columns of layer i + 1's; a hidden-dimension structure would add dim-1 selections to
every projection that the head and unit structures already slice along dim 0.

Everything is in the source tensor's positions: a selection's indices and a scale's entries
refer to the tensor as it is in the source state dict (or as ``replace`` set it), whatever
other selections the plan holds. So the order in which structures record does not matter.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

Scale = Union[float, Tensor]


class CutPlanError(ValueError):
    """A plan that cannot be applied: an index or scale that does not fit its tensor, or a
    tensor the plain model does not have."""


class CutPlan:
    """Selections, scales and replacements per tensor name, plus the edited config.

    >>> plan = CutPlan(model.state_dict(), model.config.to_dict())
    >>> plan.select("encoder.transformer.layers.3.attention.q_proj.weight", dim=0, index=rows)
    >>> plan.config["encoder_num_heads"][3] = 7
    >>> state = plan.apply(build_encoder(EncoderConfig.from_dict(plan.config)).state_dict())
    """

    def __init__(self, source: Dict[str, Tensor], config: Dict[str, Any]):
        self.source = source
        self.config = config  # the plain model's config, edited in place by the structures
        self._selections: Dict[str, Dict[int, Tensor]] = {}
        self._scales: Dict[str, List[Tuple[Optional[int], Scale]]] = {}
        self._replaced: Dict[str, Tensor] = {}
        self._optional: set = set()

    def select(self, name: str, dim: int, index: Tensor, optional: bool = False) -> None:
        """Keep only ``index`` (long, source positions) of tensor ``name`` along ``dim``.
        Selections along different dims compose; a second one along the same dim intersects
        with the first (the positions both keep, in the first one's order). ``optional``: the
        compiled model may lack the tensor (another structure's cut removed it), then nothing happens."""
        if optional:
            self._optional.add(name)
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        dims = self._selections.setdefault(name, {})
        if dim in dims:
            first = dims[dim]
            index = first[torch.isin(first, index)]
        dims[dim] = index

    def scale(self, name: str, values: Scale, dim: Optional[int] = None, optional: bool = False) -> None:
        """Multiply tensor ``name`` by ``values``: a scalar (``dim`` None), or one factor per source
        position along ``dim`` (shape (size,)). Several scales multiply, in the order recorded."""
        if optional:
            self._optional.add(name)
        self._scales.setdefault(name, []).append((dim, values))

    def replace(self, name: str, value: Tensor) -> None:
        """Give tensor ``name`` a new value in source positions (it may be one the source lacks,
        such as the feature projection's phantom vector); scales and selections still apply."""
        if name in self._replaced:
            raise CutPlanError(f"cut plan: {name} is replaced twice (two structures claim to compute it)")
        self._replaced[name] = value

    def touched(self) -> List[str]:
        return sorted(set(self._selections) | set(self._scales) | set(self._replaced))

    def tensor(self, name: str) -> Tensor:
        """The planned value of ``name``: replaced (or from the source), scaled, then selected."""
        value = self._replaced.get(name)
        if value is None:
            if name not in self.source:
                raise CutPlanError(f"cut plan: {name} is neither in the source state dict nor replaced")
            value = self.source[name]
        for dim, factor in self._scales.get(name, []):
            value = value * (factor if dim is None else _along(value, dim, factor, name))
        for dim, index in self._selections.get(name, {}).items():
            size = value.shape[dim]
            if index.numel() and not (0 <= int(index.min()) and int(index.max()) < size):
                raise CutPlanError(f"cut plan: {name} has {size} entries along dim {dim}, the selection "
                                   f"reaches index {int(index.max())}")
            value = value.index_select(dim, index)
        return value

    def apply(self, names: Iterable[str]) -> Dict[str, Tensor]:
        """The state dict with exactly ``names`` (the plain model's keys): planned tensors where the
        plan touches them, source tensors elsewhere. Raises if the plan touches a tensor the plain
        model does not have (a structure and the config it edited disagree)."""
        names = list(names)
        stray = sorted(set(self.touched()) - set(names) - self._optional)
        if stray:
            raise CutPlanError(f"cut plan: the compiled model has no tensor {stray[0]}"
                               + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else "")
                               + "; a structure sliced it but its config edit removed it")
        return {name: self.tensor(name).detach().clone() for name in names}


def _along(value: Tensor, dim: int, factor: Tensor, name: str) -> Tensor:
    """factor (value.shape[dim],) -> broadcastable over ``value`` along ``dim``."""
    if factor.ndim != 1 or factor.numel() != value.shape[dim]:
        raise CutPlanError(f"cut plan: a scale of {name} along dim {dim} needs {value.shape[dim]} entries, "
                           f"got shape {tuple(factor.shape)}")
    shape = [1] * value.ndim
    shape[dim] = -1
    return factor.reshape(shape)
