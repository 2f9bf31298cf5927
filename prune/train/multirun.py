"""``prune train RECIPE --multirun key=a,b ...``: a sweep that checks every job before the first
one runs, names each job's folder by its swept values, and ends with one table across jobs.

Hydra's basic launcher runs the jobs one after another in this process. Before it starts,
``check_sweep`` expands the sweep as Hydra will (``BasicSweeper.split_arguments``) and composes
and validates each job's config, so ``pruning.target=0.5,1.5`` fails in one line before job 0
trains. While it runs, ``Sweep.run`` wraps each job: a job that fails is recorded and the sweep
goes on. At the end ``Sweep.finish`` prints the table (params, MACs, latency, valid loss, PER when
probed) and writes it to SWEEP_DIR/summary.txt and summary.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.errors import HydraException

from .config import ConfigError, compose, validate
from .overrides import parse_overrides
from ..evaluate.report import format_table

log = logging.getLogger(__name__)

JOB_ERRORS = (ConfigError, ValueError, OSError, FloatingPointError, RuntimeError)  # a failed job, not a crash


def swept_keys(overrides: Sequence[str]) -> List[str]:
    """The keys given several values (``key=a,b``, ``key=range(...)``): what tells the jobs apart."""
    return [o.key_or_group for o in parse_overrides(overrides) if o.is_sweep_override()]


def sweep_jobs(overrides: Sequence[str]) -> List[List[str]]:
    """Each job's overrides, in the order Hydra's basic sweeper runs them (the cartesian product)."""
    try:
        batches = BasicSweeper.split_arguments(parse_overrides(overrides), None)
    except HydraException as e:
        raise ConfigError(f"--multirun: {str(e).splitlines()[0]}") from None
    return [job for batch in batches for job in batch]


def check_sweep(recipe: str, overrides: Sequence[str]) -> List[List[str]]:
    """Compose and validate every job's config before any job runs; the first bad one is a
    ``ConfigError`` naming the job by its swept values. Returns the jobs' overrides."""
    jobs = sweep_jobs(overrides)
    swept = set(swept_keys(overrides))
    for i, job in enumerate(jobs):
        try:
            validate(compose(recipe, job))
        except ConfigError as e:
            name = " ".join(o for o in job if o.split("=", 1)[0].lstrip("+~") in swept) or " ".join(job)
            raise ConfigError(f"job {i} of {len(jobs)} ({name}): {e}") from None
    return jobs


def dirname_override(overrides: Sequence[str]) -> str:
    """The Hydra override that keeps only the swept keys in ``${hydra.job.override_dirname}``, which
    names each job's folder (configs/train.yaml: hydra.sweep.subdir), e.g. ``pruning.target=0.5``."""
    swept = set(swept_keys(overrides))
    fixed = sorted({o.key_or_group for o in parse_overrides(overrides)} - swept)
    return "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(f"'{k}'" for k in fixed) + "]"


@dataclass
class JobResult:
    name: str  # the job's swept values, e.g. "pruning.target=0.5"
    run_dir: Path
    error: Optional[str] = None


@dataclass
class Sweep:
    """The jobs of one multirun, in the order they ran."""

    jobs: List[JobResult] = field(default_factory=list)
    sweep_dir: Optional[Path] = None

    def run(self, job: Callable[[], Any], run_dir: Path, name: str, sweep_dir: Path) -> None:
        """Run one job; a failure is logged and recorded, and the sweep goes on."""
        self.sweep_dir = Path(sweep_dir)
        result = JobResult(name or run_dir.name, Path(run_dir))
        self.jobs.append(result)
        try:
            job()
        except JOB_ERRORS as e:
            result.error = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.error("job %s failed: %s", result.name, result.error)

    def finish(self) -> int:
        """Print the table across jobs and write it into the sweep folder; 1 if a job failed."""
        if not self.jobs:
            return 0
        rows = [job_row(j) for j in self.jobs]
        text = summary_table(rows)
        print(f"\nsweep of {len(rows)} jobs ({self.sweep_dir}):\n{text}")
        if self.sweep_dir is not None:
            (self.sweep_dir / "summary.txt").write_text(text + "\n")
            (self.sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
            print(f"summary     : {self.sweep_dir / 'summary.txt'}, {self.sweep_dir / 'summary.json'}")
        return 1 if any(j.error for j in self.jobs) else 0


def job_row(job: JobResult) -> Dict[str, Any]:
    """One job's figures from its report.json (None where it has none)."""
    row: Dict[str, Any] = {"job": job.name, "run_dir": str(job.run_dir), "error": job.error}
    report_file = job.run_dir / "report.json"
    if job.error is None and report_file.is_file():
        report = json.loads(report_file.read_text())
        latency = report.get("cpu_latency_seconds", {})
        valid = [h["valid_distill_loss"] for h in report.get("history", []) if "valid_distill_loss" in h]
        probe = report.get("phone_probe", {}).get("pruned", {})
        row.update(params=report["after"]["params"], macs_per_second=report["after"]["macs_per_second"],
                   latency_seconds=latency.get("pruned"), latency_audio_seconds=latency.get("audio_seconds"),
                   reached_sparsity=report.get("reached_sparsity"), valid_loss=valid[-1] if valid else None,
                   per=probe.get("valid_per"))
    return row


def summary_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Jobs as rows: params, MACs, CPU latency, valid distillation loss, PER (if probed)."""
    probed = any(r.get("per") is not None for r in rows)
    seconds = next((r["latency_audio_seconds"] for r in rows if r.get("latency_audio_seconds")), None)
    header = ["job", "params", "sparsity", "MACs / s", f"latency ({seconds:g} s)" if seconds else "latency",
              "valid loss"] + (["PER"] if probed else [])
    table = [header]
    for r in rows:
        if r.get("error") or "params" not in r:
            table.append([r["job"], "failed" if r.get("error") else "no report", *[""] * (len(header) - 2)])
            continue
        cells = [r["job"], f"{r['params']:,}", _num(r["reached_sparsity"], "{:.4f}"),
                 f"{r['macs_per_second'] / 1e9:.3f} G", _num(r["latency_seconds"], "{:.1f} ms", 1e3),
                 _num(r["valid_loss"], "{:.4f}")]
        table.append(cells + ([_num(r.get("per"), "{:.3f}")] if probed else []))
    lines = [format_table(table)]
    lines += [f"{r['job']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines)


def _num(value: Optional[float], fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else fmt.format(value * scale)
