"""The final report of a run: size, compute and CPU latency before/after, and a per-layer chart."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig

from ..checkpoints import describe
from ..measured import fastest, interleaved, spread
from ..models import SAMPLE_RATE, Wav2Vec2Model
from ..latency_profile import cpu_copy, table_latencies
from ..structures import SHOWN

log = logging.getLogger(__name__)


LATENCY_REPEATS = 10


def cpu_latencies(models: Dict[str, Wav2Vec2Model], seconds: float, repeats: int = LATENCY_REPEATS
                  ) -> Dict[str, List[float]]:
    """Seconds of each model's forward pass, batch 1, ``seconds`` of audio, on the CPU (copies of
    the models): ``repeats`` passes each, the models interleaved (as scripts/benchmark.py), so a
    burst of load on the machine hits them alike instead of skewing their ratio."""
    x = torch.randn(1, int(seconds * SAMPLE_RATE))
    copies = {name: cpu_copy(m) for name, m in models.items()}
    with torch.no_grad():
        return interleaved({name: (lambda m=m: m(x)) for name, m in copies.items()}, repeats)


def needs_of(kind: str) -> List[str]:
    """The names of what the size measure ``kind`` needs (``prune.measures.Need``)."""
    from ..measures import MEASURES

    return [need.name for need in MEASURES[kind].needs] if kind in MEASURES else []


def latency_line(check: Dict[str, Any]) -> str:
    """The report's line on a latency target: predicted next to measured, per model, and the pruned
    model's measured latency on the table's scale (as the refinement reads it: measured pruned /
    measured teacher x the teacher's table latency)."""
    predicted, measured = check["predicted_ms"], check["measured_ms"]
    pairs = ", ".join(f"{name} {predicted[name]:.1f} ms predicted / {measured[name]:.1f} ms "
                      f"measured ({predicted[name] / measured[name] - 1:+.1%})" for name in measured)
    where = "here" if not check.get("processes") else f"in {check['processes']} fresh processes (median)"
    scale = ""
    if "teacher" in measured and "pruned" in measured:
        ratio = measured["pruned"] / measured["teacher"]
        scale = f"; pruned / teacher measured {ratio:.3f}, on the table's scale {ratio * predicted['teacher']:.2f} ms"
    return (f"latency target, table {check['table']} ({check['seconds']:g} s, batch {check['batch']}, "
            f"{check['threads']} thread(s), {check['clock']} clock, profiled on {check['device']}; measured {where} on "
            f"the CPU, fastest of {LATENCY_REPEATS}): {pairs}{scale}")


def layer_chart(before: Dict[str, Any], after: Dict[str, Any], path: Path, title: str = "") -> Path:
    """Bar charts of the kept units of each kind of ``prune.structures.SHOWN`` (conv channels, heads,
    FFN units per layer, removed blocks at 0; hidden channels per positional-conv group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [s for s in SHOWN if s.key in before and s.key in after]  # a report written before a kind existed
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8))
    for ax, shown in zip(axes, kinds):
        full = [v or 0 for v in before[shown.key]]
        kept = [v or 0 for v in after[shown.key]]
        xs = range(len(full))
        ax.bar(xs, full, color="#d9d9d9", label="unpruned")
        ax.bar(xs, kept, color="#3b75af", label="kept")
        ax.set_title(shown.label)
        ax.set_xlabel(shown.per)
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


Column = Tuple[str, Dict[str, Any], float, Optional[float]]  # name, describe() dict, latency (s), PER or None


def comparison_table(columns: Sequence[Column], latency_label: str) -> str:
    """Params, MACs, latency (and phone error rate where measured) of models side by side; the
    last column is the ratio of the second model to the first."""
    (_, first, t_first, per_first), (_, second, t_second, per_second) = columns[0], columns[1]
    rows = [["", *(c[0] for c in columns), "ratio"],
            ["params", *(f"{c[1]['params']:,}" for c in columns), f"{second['params'] / first['params']:.4f}"],
            ["MACs / s of audio", *(f"{c[1]['macs_per_second'] / 1e9:.3f} G" for c in columns),
             f"{second['macs_per_second'] / first['macs_per_second']:.4f}"],
            [latency_label, *(f"{c[2] * 1e3:.1f} ms" for c in columns), f"{t_second / t_first:.4f}"]]
    if any(c[3] is not None for c in columns):
        rows.append(["phone error rate (probe)", *("-" if c[3] is None else f"{c[3]:.3f}" for c in columns),
                     "-" if per_first is None or per_second is None else f"{per_second / per_first:.4f}"])
    return format_table(rows)


def random_init_like(model: Wav2Vec2Model, seed: int) -> Wav2Vec2Model:
    """A model of the same architecture and size with seeded random weights: the floor a probe
    result is read against."""
    from ..models import build_encoder

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_encoder(model.config).eval()


def per_text(probe: Dict[str, Any]) -> str:
    """"0.142 +- 0.008 (0.133 0.153 0.140)" over several probe seeds, "0.142" for one."""
    if "valid_per_by_seed" not in probe:
        return f"{probe['valid_per']:.3f}"
    seeds = " ".join(f"{v:.3f}" for v in probe["valid_per_by_seed"])
    return f"{probe['valid_per']:.3f} +- {probe['valid_per_std']:.3f} ({seeds})"


def target_line(meta: Dict[str, Any]) -> str:
    """The report's line on the size target: reached or not, and whether by training or only by
    the cut (``meta["cut"]``, see recipe.cut_record)."""
    head = f"target: {meta.get('target_kind')} sparsity {meta.get('target_sparsity', float('nan')):.4f}"
    reached = f"{meta.get('reached_sparsity', float('nan')):.4f}"
    cut = meta.get("cut")
    if not cut:
        return f"{head}, reached {reached}"
    gates = f"the gates ended at sparsity {cut['gates_sparsity']:.4f} ({cut['gates_size']:,.0f} {cut['unit']})"
    if cut.get("kind", meta.get("target_kind")) != meta.get("target_kind"):  # pruning.cut_target_kind: by design
        landed = "on it" if cut["target_reached_by"] is not None else "OFF it (see the log)"
        return (f"{head} (the training's); cut onto {cut['kind']} {cut['target_size']:,.2f} {cut['unit']} as "
                f"pruning.cut_target_kind asks (from {cut['gates_size']:,.2f} {cut['unit']} where the gates ended): "
                f"{cut['cut_size']:,.2f} {cut['unit']}, {landed}")
    if cut["target_reached_by"] == "training":
        return f"{head}, reached {reached} by training ({gates}; the cut moved it {cut['shift']:.1%} of the target)"
    if cut["target_reached_by"] == "cut":
        return (f"{head}, reached {reached} only by the cut, NOT by training: {gates}, the cut moved the size "
                f"{cut['shift']:.0%} of the target (more than pruning.max_cut_shift={cut['max_cut_shift']:g}) to "
                f"{cut['cut_size']:,.0f}; the pruned model is the cut's choice, not the training's (see the log)")
    return f"{head}, NOT reached: {reached} ({gates}, cut at {cut['cut_size']:,.0f}; see the log)"


def similarity_table(similarity: Dict[str, Any]) -> str:
    """Cosine / L1 of the student's prediction of each distilled teacher layer, on the valid set, at
    the points of the run recorded in ``similarity`` ("before cut", "after cut", "end")."""
    layers = similarity["layers"]
    rows = [["valid set, student vs teacher", *(f"layer {layer}" for layer in layers)]]
    for point, values in similarity["points"].items():
        rows.append([f"{point} (step {values['step']})",
                     *(f"{c:.4f} / {d:.4f}" for c, d in zip(values["cos"], values["l1"]))])
    return ("similarity to the teacher, cosine / L1 of each distilled layer's prediction:\n"
            + format_table(rows))


def task_line(task: Dict[str, Any]) -> str:
    """The report's line on the downstream task: its metric on the valid set at each named point."""
    points = ", ".join(f"{name} (step {p['step']}) {p['valid_metric']:.4f}" for name, p in task["points"].items())
    if task.get("teacher_metric") is not None:  # the reference: the unpruned teacher fine-tuned on the task
        points += f"; fine-tuned teacher: valid {task['metric']} {task['teacher_metric']:.4f}"
    return (f"task {task['kind']} ({task['column']}, {task['classes']} classes; loss = {task['weight']:g} x task + "
            f"{task['distill_weight']:g} x distillation): valid {task['metric']} " + (points or "not measured (no valid set)"))


def write_report(run_dir: Path, teacher: Wav2Vec2Model, pruned: Wav2Vec2Model, cfg: Optional[DictConfig],
                 meta: Dict[str, Any]) -> str:
    """Write report.json, report.txt and layers.png into ``run_dir``; return the text.

    With ``cfg.probe.corpus`` set, the phone-recognition probe runs on the teacher, the pruned
    model and a random-init model of the pruned model's size (the floor), and the table gets
    their phone error rates and a third column."""
    seconds = cfg.trainer.latency_seconds if cfg is not None else 4.0
    corpus = cfg.probe.corpus if cfg is not None and "probe" in cfg else None
    before, after = describe(teacher.config), describe(pruned.config)
    models = {"teacher": teacher, "pruned": pruned}
    if corpus is not None:
        models["random init"] = random_init_like(pruned, seed=0)  # one floor, whatever the training seed
    times = cpu_latencies(models, seconds)
    latencies = {name: fastest(t) for name, t in times.items()}
    probes: Dict[str, Dict[str, float]] = {}
    if corpus is not None:
        from .probe import phone_probe

        for name, m in models.items():
            # fixed probe seeds, not the training seed: reports of runs with different seeds compare
            probes[name] = phone_probe(cpu_copy(m), Path(corpus), steps=cfg.probe.steps, seed=list(cfg.probe.seeds))
            log.info("phone probe, %s: valid PER %s", name, per_text(probes[name]))
    sizes = {"teacher": before, "pruned": after, "random init": after}
    columns = [(name, sizes[name], latencies[name], probes[name]["valid_per"] if probes else None) for name in models]
    lines = [comparison_table(columns, f"CPU latency, {seconds:g} s, batch 1"),
             f"CPU latency: the fastest of {LATENCY_REPEATS} passes, the models interleaved; the median and max "
             f"above it: " + ", ".join(f"{name} {spread(t)}" for name, t in times.items()),
             target_line(meta)]
    check = None
    if cfg is not None and "table" in needs_of(cfg.pruning.get("cut_target_kind") or cfg.pruning.target_kind):
        # a latency target, or a cut onto one
        check = table_latencies(cfg.pruning.latency_table, {"teacher": teacher, "pruned": pruned}, LATENCY_REPEATS,
                                processes=cfg.pruning.get("latency_processes", 0))
        lines.append(latency_line(check))
    if meta.get("similarity"):
        lines.append(similarity_table(meta["similarity"]))
    if probes:
        lines.append(f"phone error rate: linear CTC probe on frozen features, trained on {corpus}/train.tsv "
                     f"({cfg.probe.steps} steps), greedy decoding on {corpus}/valid.tsv; mean over probe seeds "
                     f"{list(cfg.probe.seeds)}: " + ", ".join(f"{n} {per_text(r)}" for n, r in probes.items()) +
                     "; random init = the pruned architecture with random weights")
    if meta.get("task"):
        lines.append(task_line(meta["task"]))
    if meta.get("skipped_files"):
        lines.append(f"skipped audio files: {len(meta['skipped_files'])} (see report.json)")
    if meta.get("nonfinite_steps_skipped"):
        lines.append(f"non-finite steps skipped: {meta['nonfinite_steps_skipped']}")
    text = "\n".join(lines)
    run_dir = Path(run_dir)
    (run_dir / "report.txt").write_text(text + "\n")
    report = {"before": before, "after": after,
              "cpu_latency_seconds": {**latencies, "audio_seconds": seconds},
              "cpu_latency_spread_seconds": {name: {"min": min(t), "median": statistics.median(t), "max": max(t)}
                                             for name, t in times.items()},
              "cpu_latency_method": f"fastest of {LATENCY_REPEATS} forward passes, the models interleaved",
              **({"latency_target": check} if check else {}),
              **({"phone_probe": {"corpus": str(corpus), "steps": cfg.probe.steps, "seeds": list(cfg.probe.seeds),
                                  **probes}} if probes else {}),
              **{k: v for k, v in meta.items() if k != "config"}}
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    layer_chart(before, after, run_dir / "layers.png", title=f"{before['architecture']}: kept per layer")
    return text
