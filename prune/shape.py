"""Shapes imposed at the cut: uniform widths and whole layers (a model transformers holds),
an explicit shape (``pruning.shape``), and kept counts rounded to a multiple (``pruning.round_to``).

All of them go through one mechanism, ``HardConcrete.force(index)``: "this gate keeps exactly
these units" (the ``k`` with the highest ``log_alpha`` of the gate, or for WavLM's heads the same
ones in every layer), survivors at their soft value as in the plain eval mask. A ``Shaper`` decides
the forced units from the gates' current state (``apply``); wrapped around a size function
(``sized``) it lets the calibration search the gate thresholds with the shape imposed, so the target
is landed under the constraint. Costs, the cut plan and the compile read the eval masks as always,
so ``expected_params()`` / ``expected_macs()`` stay exact and the compiled model equals the gated one.

``ShapeTerms`` are the Lagrangian's terms that steer an explicit shape's counts during training
(LLM-Shearing's targeted structured pruning: one multiplier pair per constrained count).

    shaper = Shaper(uniform=True, shape=Shape(ffn=256), round_to=8)
    calibrate(gated, shaper.sized(GatedEncoder.expected_params), target, tolerance)
    compiled = compile_encoder(gated)  # the forced masks are what gets cut
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .gates import HardConcrete
from .models.config import EncoderConfig
from .structures import ATTENTION_BLOCK, GateConfig, GatedEncoder
from .structures.extractor import exact_in_transformers

SizeFn = Callable[[GatedEncoder], Tensor]


@dataclass(frozen=True)
class Shape:
    """Kept counts to land exactly (None: free, as the uniform cut decides). ``conv``: one count per
    conv layer, or one number for every conv layer the uniform cut prunes."""

    layers: Optional[int] = None
    heads: Optional[int] = None
    ffn: Optional[int] = None
    conv: Optional[Any] = None

    @classmethod
    def from_config(cls, d: Optional[Mapping[str, Any]]) -> "Shape":
        if d is None:
            return cls()
        conv = d.get("conv")
        if conv is not None and not isinstance(conv, int):
            conv = tuple(conv)
        return cls(d.get("layers"), d.get("heads"), d.get("ffn"), conv)

    def given(self) -> bool:
        return any(v is not None for v in (self.layers, self.heads, self.ffn, self.conv))

    def conv_counts(self, config: EncoderConfig) -> Optional[List[int]]:
        """Per conv layer, the channels to keep (one number: for each layer uniform mode prunes,
        the others keep theirs); None when not given."""
        if self.conv is None:
            return None
        full = [c[0] for c in config.extractor_conv_layer_config]
        if isinstance(self.conv, int):
            exact = exact_in_transformers(config)
            return [self.conv if e else f for e, f in zip(exact, full)]
        return [int(c) for c in self.conv]


def uniform_gates(gates: GateConfig, shape: Shape, config: EncoderConfig) -> GateConfig:
    """The gates of a uniform run: heads are gated only if ``shape.heads`` asks for fewer than the
    teacher's (transformers has head_dim = hidden / heads, so a standard model keeps every head of
    a kept layer); the FFN block's own gate goes (the attention block's decides the layer)."""
    heads = shape.heads is not None and shape.heads < max(config.encoder_num_heads)
    return replace(gates, attention_heads=gates.attention_heads and heads)


def check_shape(shape: Shape, config: EncoderConfig, gates: GateConfig, uniform: bool, round_to: int) -> None:
    """Raise ValueError (one line naming the key) for a shape the teacher ``config`` cannot take."""
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ValueError(f"pruning.round_to: must be a whole number >= 1, got {round_to!r}")
    if not shape.given():
        return
    if not uniform:
        raise ValueError("pruning.shape: an explicit shape is a uniform one (the same count in every layer); "
                         "add pruning.uniform=true")

    def whole(key: str, value: Any, low: int, high: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"pruning.shape.{key}: must be a whole number in [{low}, {high}] for this teacher, "
                             f"got {value!r}")

    n = config.encoder_num_layers
    if shape.layers is not None:
        whole("layers", shape.layers, 1, n)
        if shape.layers < n and not gates.attention_layers:
            raise ValueError(f"pruning.shape.layers={shape.layers}: removing layers needs the layer gates; "
                             f"drop pruning.gates.attention_layers=false")

    def per_layer(key: str, value: int, counts: List[int], what: str, units: str, gated: bool, gate_key: str
                  ) -> None:
        """A count every layer keeps: the teacher's layers agree on theirs, and fewer needs the gates."""
        if len(set(counts)) > 1:
            raise ValueError(f"pruning.shape.{key}: the teacher's layers have different {what} {counts}")
        whole(key, value, 1, counts[0])
        if value < counts[0] and not gated:
            raise ValueError(f"pruning.shape.{key}={value}: pruning {units} needs their gates; drop "
                             f"pruning.gates.{gate_key}=false")

    if shape.heads is not None:
        per_layer("heads", shape.heads, config.encoder_num_heads, "head counts", "heads", gates.attention_heads,
                  "attention_heads")
    if shape.ffn is not None:
        units = config.encoder_ff_interm_features
        per_layer("ffn", shape.ffn, units, "FFN widths", "FFN units", gates.ffn_units, "ffn_units")
        if shape.ffn % round_to and shape.ffn != units[0]:
            raise ValueError(f"pruning.shape.ffn={shape.ffn} is not a multiple of pruning.round_to={round_to}")
    if shape.conv is not None:
        full = [c[0] for c in config.extractor_conv_layer_config]
        if not isinstance(shape.conv, int) and len(shape.conv) != len(full):
            raise ValueError(f"pruning.shape.conv: give one count per conv layer ({len(full)}) or one number, "
                             f"got {len(shape.conv)} counts")
        exact = exact_in_transformers(config)
        if isinstance(shape.conv, int):
            whole("conv", shape.conv, 1, max(full))
            if not any(exact) and shape.conv < max(full):
                raise ValueError(f"pruning.shape.conv={shape.conv}: transformers cannot hold a layer_norm extractor's "
                                 f"conv layers with channels removed (each has a LayerNorm over them); drop "
                                 f"pruning.shape.conv")
        for i, (count, top, e) in enumerate(zip(shape.conv_counts(config), full, exact)):
            whole(f"conv[{i}]", count, 1, top)
            if count < top and not e:
                why = ("a layer_norm extractor's conv layers" if config.extractor_mode == "layer_norm"
                       else "the last conv layer (the feature projection's LayerNorm reads it)")
                raise ValueError(f"pruning.shape.conv: conv layer {i} keeps {count} of {top} channels, but "
                                 f"transformers cannot hold {why} with channels removed; keep {top} there")
            if count < top and not gates.conv_channels:
                raise ValueError("pruning.shape.conv: pruning conv channels needs their gates; drop "
                                 "pruning.gates.conv_channels=false")
            if count < top and count % round_to:
                raise ValueError(f"pruning.shape.conv: conv layer {i} keeps {count}, not a multiple of "
                                 f"pruning.round_to={round_to}")


def round_count(count: int, n: int, multiple: int) -> int:
    """``count`` of ``n`` units rounded to the nearest multiple of ``multiple`` (ties: the larger).
    0 stays 0 (a removed FFN's units); a nonzero count never rounds to 0 (it becomes ``multiple``)
    nor above ``n`` (the full count is always allowed, a multiple or not)."""
    if multiple <= 1 or count == 0:
        return count
    candidates = list(range(multiple, n + 1, multiple)) + [n]
    return min(candidates, key=lambda m: (abs(m - count), -m))


class Shaper:
    """Forces the shape of a cut onto a gated encoder's eval masks (module docstring).

    uniform: every kept layer keeps the same FFN units (``shape.ffn``, else the mean of the kept
    layers' plain counts) and every head (``shape.heads``: that many, WavLM: the same ones in every
    layer), a layer goes whole (its attention block's gate decides, ``shape.layers``: the that many
    with the highest scores), conv layers keep ``shape.conv`` or their plain counts. round_to: FFN
    units, conv channels, the hidden dimension's channels and the dims inside the heads rounded to
    multiples (heads and blocks are not)."""

    def __init__(self, uniform: bool = False, shape: Shape = Shape(), round_to: int = 1):
        self.uniform = uniform
        self.shape = shape
        self.round_to = round_to

    @property
    def active(self) -> bool:
        return self.uniform or self.round_to > 1 or self.shape.given()

    @staticmethod
    def clear(gated: GatedEncoder) -> None:
        for gate in _all_gates(gated):
            gate.force(None)

    def fixes_all(self, gated: GatedEncoder) -> bool:
        """Whether the shape fixes every kept count, so that the size is the shape's whatever the gates."""
        if not self.uniform:
            return False
        s, (attention, feed_forward, convs) = self.shape, _parts(gated)
        # heads are always fixed in uniform mode: every head, or shape.heads
        return ((s.layers is not None or all(a._gate_of(ATTENTION_BLOCK) is None for a in attention))
                and (s.ffn is not None or all(f.unit_gate is None for f in feed_forward))
                and (s.conv is not None or all(c.gate is None for c in convs)))

    @torch.no_grad()
    def fixed_size(self, gated: GatedEncoder, size: SizeFn) -> Optional[float]:
        """The size of the cut when the shape fixes every count (None otherwise): the target that
        ``pruning.target`` would otherwise give. The gates are left as they were."""
        if not self.fixes_all(gated):
            return None
        was_training = gated.training
        gated.eval()
        try:
            return float(self.sized(size)(gated))
        finally:
            self.clear(gated)
            gated.train(was_training)

    @torch.no_grad()
    def apply(self, gated: GatedEncoder) -> None:
        """Decide and force the units every gate keeps, from the gates as they are now."""
        self.clear(gated)
        if not self.active:
            return
        attention, feed_forward, convs = _parts(gated)
        if self.uniform:
            kept = self._layers(attention)
            self._heads([attention[l] for l in kept], gated.config)
            self._units([feed_forward[l] for l in kept])
        else:
            for f in feed_forward:
                _force_rounded(f.unit_gate, self.round_to)
            for a in attention:  # the q/k and v widths of each layer's heads (uniform mode refuses them)
                _force_rounded(a.qk_gate, self.round_to)
                _force_rounded(a.v_gate, self.round_to)
        counts = self.shape.conv_counts(gated.config) if self.uniform else None
        for i, conv in enumerate(convs):
            if conv.gate is None:
                continue
            if counts is not None:
                conv.gate.force(conv.gate.top(counts[i]))
            else:
                _force_rounded(conv.gate, self.round_to)
        for hidden in getattr(gated, "hidden", ()):  # every layer's width: odd widths run slower too
            _force_rounded(hidden.gate, self.round_to)

    def sized(self, size: SizeFn) -> SizeFn:
        """``size`` measured with the shape forced from the gates' current state (for the
        calibration's threshold search, which moves the gates between measurements)."""
        def shaped(gated: GatedEncoder) -> Tensor:
            self.apply(gated)
            return size(gated)
        return shaped

    def _layers(self, attention) -> List[int]:
        """The layers kept whole: ``shape.layers`` of them by their layer gate's score, else those
        whose gate the plain eval mask keeps. The others' gates are forced closed."""
        gated = [(a.layer, a._gate_of(ATTENTION_BLOCK)) for a in attention if a.exists]
        gated = [(l, g) for l, g in gated if g is not None]
        fixed = [a.layer for a in attention if a.exists and a._gate_of(ATTENTION_BLOCK) is None]
        if self.shape.layers is not None:
            wanted = self.shape.layers - len(fixed)
            order = sorted(gated, key=lambda lg: -lg[1].log_alpha.item())
            chosen = {l for l, _ in order[:max(wanted, 0)]}
        else:
            chosen = {l for l, g in gated if g.plain_count() == 1}
        for l, g in gated:
            g.force(torch.tensor([0]) if l in chosen else torch.zeros(0, dtype=torch.long))
        return sorted(chosen | set(fixed))

    def _heads(self, attention, config: EncoderConfig) -> None:
        """Every head, or ``shape.heads`` of them: each layer's best by its own scores, WavLM's the
        same heads in every layer (the relative position bias is computed once for all layers),
        those with the highest score summed over the kept layers."""
        gates = [a.head_gate for a in attention if a.head_gate is not None]
        if not gates:
            return
        if self.shape.heads is None:
            for g in gates:
                g.force(torch.arange(g.n))
        elif config.is_wavlm:
            score = torch.stack([g.log_alpha.detach().cpu() for g in gates]).sum(0)
            shared = torch.topk(score, self.shape.heads).indices.sort().values
            for g in gates:
                g.force(shared)
        else:
            for g in gates:
                g.force(g.top(self.shape.heads))

    def _units(self, feed_forward) -> None:
        """One FFN width for every kept layer: ``shape.ffn``, else the mean of their plain counts
        (rounded to ``round_to``); each layer keeps its own best units."""
        gates = [f.unit_gate for f in feed_forward if f.unit_gate is not None]
        if not gates:
            return
        if self.shape.ffn is not None:
            width = self.shape.ffn
        else:
            mean = sum(g.plain_count() for g in gates) / len(gates)
            width = round_count(int(round(mean)), min(g.n for g in gates), self.round_to)
        for g in gates:
            g.force(g.top(width))


def _force_rounded(gate: Optional[HardConcrete], multiple: int) -> None:
    if gate is not None and multiple > 1:
        gate.force(gate.top(round_count(gate.plain_count(), gate.n, multiple)))


def _parts(gated: GatedEncoder):
    return list(gated.attention), list(gated.feed_forward), list(gated.conv)


def _all_gates(gated: GatedEncoder) -> List[HardConcrete]:
    return [g for s in gated.structures for g in s.gates().values()]


class ShapeTerms(nn.Module):
    """The Lagrangian's terms toward an explicit shape (LLM-Shearing, Xia et al. 2024): for each
    given count, the relative gap ``(E[count] - t) / full`` between its expected value under the
    training gates and a target ``t`` that moves from the teacher's count to the shape's over the
    warm-up, penalised by ``l1 * gap + l2 * gap^2`` with multipliers trained by ascent (as the size
    term's). Expected counts: kept layers = the sum of the layer gates' keep probabilities; heads
    and FFN units = the mean over layers of each layer's expected count (the uniform cut takes the
    mean as the shared width); conv channels = each conv layer's expected count (one pair each)."""

    def __init__(self, gated: GatedEncoder, shape: Shape):
        super().__init__()
        self.shape = shape
        config = gated.config
        self.targets: Dict[str, Tuple[Tensor, Tensor]] = {}
        attention, feed_forward, convs = _parts(gated)
        if shape.layers is not None:
            self.targets["layers"] = (torch.tensor([float(config.encoder_num_layers)]),
                                      torch.tensor([float(shape.layers)]))
        if shape.heads is not None and any(a.head_gate is not None for a in attention):
            self.targets["heads"] = (torch.tensor([float(max(config.encoder_num_heads))]),
                                     torch.tensor([float(shape.heads)]))
        if shape.ffn is not None and any(f.unit_gate is not None for f in feed_forward):
            self.targets["ffn"] = (torch.tensor([float(max(config.encoder_ff_interm_features))]),
                                   torch.tensor([float(shape.ffn)]))
        counts = shape.conv_counts(config)
        if counts is not None:
            gated_convs = [i for i, c in enumerate(convs) if c.gate is not None]
            self.conv_index = gated_convs
            self.targets["conv"] = (torch.tensor([float(convs[i].channels) for i in gated_convs]),
                                    torch.tensor([float(counts[i]) for i in gated_convs]))
        self.lambda1 = nn.ParameterDict({k: nn.Parameter(torch.zeros(len(v[0]))) for k, v in self.targets.items()})
        self.lambda2 = nn.ParameterDict({k: nn.Parameter(torch.zeros(len(v[0]))) for k, v in self.targets.items()})

    def expected(self, gated: GatedEncoder) -> Dict[str, Tensor]:
        """Each constrained count's expected value under the gates (keep probabilities), differentiable."""
        attention, feed_forward, convs = _parts(gated)
        out: Dict[str, Tensor] = {}
        if "layers" in self.targets:
            gates = [a._gate_of(ATTENTION_BLOCK) for a in attention]
            fixed = sum(1 for a, g in zip(attention, gates) if a.exists and g is None)
            out["layers"] = (torch.stack([g.keep_prob()[0] for g in gates if g is not None]).sum()
                             + fixed).reshape(1)
        if "heads" in self.targets:
            out["heads"] = torch.stack([a.head_gate.keep_prob().sum() for a in attention
                                        if a.head_gate is not None]).mean().reshape(1)
        if "ffn" in self.targets:
            out["ffn"] = torch.stack([f.unit_gate.keep_prob().sum() for f in feed_forward
                                      if f.unit_gate is not None]).mean().reshape(1)
        if "conv" in self.targets:
            out["conv"] = torch.stack([convs[i].gate.keep_prob().sum() for i in self.conv_index])
        return out

    def forward(self, gated: GatedEncoder, progress: float) -> Tensor:
        """The summed penalty at ``progress`` (0 to 1) through the warm-up."""
        penalty = None
        for key, value in self.expected(gated).items():
            full, target = (t.to(value.device) for t in self.targets[key])
            gap = (value - (full + (target - full) * progress)) / full
            term = (self.lambda1[key] * gap).sum() + (self.lambda2[key] * gap * gap).sum()
            penalty = term if penalty is None else penalty + term
        return penalty if penalty is not None else torch.zeros(())

    def gaps(self, gated: GatedEncoder) -> Dict[str, float]:
        """Each count's expected value minus the shape's (for logs)."""
        return {k: float((v - self.targets[k][1].to(v.device)).abs().max()) for k, v in self.expected(gated).items()}

