"""What pruning does to a model's size, structure and speed, without training: a preset gated with
seeded, non-uniform gates at a chosen sparsity (calibrated onto it), cut to a plain model, checked
against the gated one, timed against the unpruned one, and exported (``prune preview``).

    result = preview("hubert_base", 0.75, "outputs/preview")
    result.reached, result.error, result.after["heads"], result.path
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from .checkpoints.convert import NATIVE, check_output, write_model
from .checkpoints.export import describe
from .compile import compile_encoder
from .measured import interleaved
from .models import SAMPLE_RATE, build_preset
from .seeded import set_random_gates
from .shape import Shape, Shaper, uniform_gates
from .structures import GateConfig, GatedEncoder


@dataclass(frozen=True)
class Preview:
    before: Dict[str, Any]  # describe() of the unpruned preset
    after: Dict[str, Any]  # describe() of the cut model
    reached: float  # the parameter sparsity reached (asked: within one unit of the coarsest structure)
    error: float  # cut vs gated model: max relative error over all hidden states
    times: Dict[str, List[float]]  # "unpruned", "pruned": seconds per forward on (2, seconds) of audio
    path: Path  # the export folder


def preview(preset: str, sparsity: float, out: os.PathLike, seed: int = 0, seconds: float = 2.0,
            repeats: int = 5, overwrite: bool = False, progress: Optional[Callable[[str], None]] = None,
            uniform: bool = False, head_dims: bool = False) -> Preview:
    """Gate ``preset`` (weights and gates seeded by ``seed``) at ``sparsity``, cut it, compare the
    cut model with the gated one on a padded batch of two ``seconds``-long utterances, time both
    models interleaved (``repeats`` passes each), and export the cut model to ``out``. The
    export folder is checked before any compute; ``progress`` gets a line as the work starts.
    ``uniform``: gates and cut of ``pruning.uniform=true`` (a shape transformers holds); ``head_dims``:
    the dims inside the heads gated too (``pruning.gates.head_qk_dims`` and ``head_v_dims``)."""
    out = Path(out)
    check_output(out, NATIVE, overwrite)  # fail before any compute
    torch.manual_seed(seed)
    if progress is not None:
        progress(f"building {preset} (random weights) and gating it ...")
    model = build_preset(preset)
    shaper = Shaper(uniform=uniform)  # uniform: the gates and the forced shape of pruning.uniform=true
    gates = GateConfig(head_qk_dims=head_dims, head_v_dims=head_dims)
    gated = GatedEncoder(model, uniform_gates(gates, Shape(), model.config) if uniform else gates, uniform=uniform)
    reached = set_random_gates(gated, sparsity, seed=seed, size=shaper.sized(GatedEncoder.expected_params))
    shaper.apply(gated)
    gated.eval()
    compiled = compile_encoder(gated)

    x = torch.randn(2, int(seconds * SAMPLE_RATE))
    lengths = torch.tensor([x.shape[1], x.shape[1] * 3 // 4])
    with torch.no_grad():
        expected, _ = gated(x, lengths)
        actual, _ = compiled(x, lengths)
        # interleaved, fastest of N: load on a shared machine hits both models alike (prune/measured.py)
        times = interleaved({"unpruned": lambda: gated.model(x, lengths), "pruned": lambda: compiled(x, lengths)},
                            repeats=repeats)
    error = max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(actual, expected))
    write_model(compiled, out, NATIVE, overwrite=overwrite, source=gated.config,
                metadata={"preview": {"preset": preset, "sparsity": sparsity, "seed": seed, "uniform": uniform,
                                          "head_dims": head_dims}})
    return Preview(describe(gated.config), describe(compiled.config), reached, error, times, out)
