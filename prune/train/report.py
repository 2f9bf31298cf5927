"""The final report of a run: size, compute and CPU latency before/after, and a per-layer chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from ..checkpoints import describe
from ..measure import latency
from ..models import SAMPLE_RATE, Wav2Vec2Model


def cpu_latency(model: Wav2Vec2Model, seconds: float, repeats: int = 5) -> float:
    """Median seconds of one forward pass, batch 1, on the CPU (a copy of the model)."""
    return latency(_cpu_copy(model), torch.randn(1, int(seconds * SAMPLE_RATE)), repeats=repeats)


def _cpu_copy(model: Wav2Vec2Model) -> Wav2Vec2Model:
    from ..models import build_encoder

    copy = build_encoder(model.config)
    copy.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return copy.eval()


def layer_chart(before: Dict[str, Any], after: Dict[str, Any], path: Path, title: str = "") -> Path:
    """Bar charts of kept conv channels, heads and FFN units per layer (removed blocks at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, key, label in zip(axes, ("conv_channels", "heads", "ffn_units"),
                              ("conv channels", "attention heads", "FFN units")):
        full = [v or 0 for v in before[key]]
        kept = [v or 0 for v in after[key]]
        xs = range(len(full))
        ax.bar(xs, full, color="#d9d9d9", label="unpruned")
        ax.bar(xs, kept, color="#3b75af", label="kept")
        ax.set_title(label)
        ax.set_xlabel("conv layer" if key == "conv_channels" else "transformer layer")
        ax.set_xticks(list(xs))
    axes[0].legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def comparison_table(before: Dict[str, Any], after: Dict[str, Any], names: Tuple[str, str], latency_label: str,
                     t_before: float, t_after: float) -> str:
    """Params, MACs and latency of two models (``describe`` dicts) side by side, with ratios."""
    rows = [["", *names, "ratio"],
            ["params", f"{before['params']:,}", f"{after['params']:,}", f"{after['params'] / before['params']:.4f}"],
            ["MACs / s of audio", f"{before['macs_per_second'] / 1e9:.3f} G", f"{after['macs_per_second'] / 1e9:.3f} G",
             f"{after['macs_per_second'] / before['macs_per_second']:.4f}"],
            [latency_label, f"{t_before * 1e3:.1f} ms", f"{t_after * 1e3:.1f} ms", f"{t_after / t_before:.4f}"]]
    return format_table(rows)


def write_report(run_dir: Path, teacher: Wav2Vec2Model, pruned: Wav2Vec2Model, cfg: Optional[DictConfig],
                 meta: Dict[str, Any]) -> str:
    """Write report.json, report.txt and layers.png into ``run_dir``; return the text."""
    seconds = cfg.trainer.latency_seconds if cfg is not None else 4.0
    before, after = describe(teacher.config), describe(pruned.config)
    t_before, t_after = cpu_latency(teacher, seconds), cpu_latency(pruned, seconds)
    lines = [comparison_table(before, after, ("teacher", "pruned"), f"CPU latency, {seconds:g} s, batch 1",
                              t_before, t_after),
             f"target: {meta.get('target_kind')} sparsity {meta.get('target_sparsity', float('nan')):.4f}, "
             f"reached {meta.get('reached_sparsity', float('nan')):.4f}"]
    if meta.get("skipped_files"):
        lines.append(f"skipped audio files: {len(meta['skipped_files'])} (see report.json)")
    if meta.get("nonfinite_steps_skipped"):
        lines.append(f"non-finite steps skipped: {meta['nonfinite_steps_skipped']}")
    text = "\n".join(lines)
    run_dir = Path(run_dir)
    (run_dir / "report.txt").write_text(text + "\n")
    report = {"before": before, "after": after, "cpu_latency_seconds": {"teacher": t_before, "pruned": t_after,
                                                                        "audio_seconds": seconds},
              **{k: v for k, v in meta.items() if k != "config"}}
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    layer_chart(before, after, run_dir / "layers.png", title=f"{before['architecture']}: kept per layer")
    return text
