"""Issue #16's measurement on the demo: task-agnostic pruning then fine-tuning, task-aware pruning
(task loss alone), task + distillation, each against the unpruned teacher fine-tuned on the task,
per sparsity, mean +- std over seeds, for phone recognition (ctc) and speaker ID (classify).

    python scripts/task_table.py --out outputs/task_table                      # the whole table (hours)
    python scripts/task_table.py --out /tmp/t --recipe tiny_demo --seeds 0 --sparsities 0.5 \\
        --task classify --prune-steps 4 --final-steps 2 --finetune-steps 4    # a smoke run
    python scripts/task_table.py --out /tmp/t --dry-run                        # the commands, nothing run

Methods (each one `prune` process at a time, in OUT/TASK/METHOD/...):
  teacher   the recipe's teacher fine-tuned on the task (pruning.enabled=false, distill.weight=0)
  agnostic  (a) `prune train RECIPE` as it is (task: none), then `prune finetune EXPORT` on the task
  aware     (b) `prune train RECIPE task=... distill.weight=0`: the task loss alone
  distill   (c) `prune train RECIPE task=...`: task.weight x task + distill.weight x distillation
Every task run (fine-tunes included) reads whole utterances (data.max_samples=64000, ctc needs it)
and has the probe off (probe.corpus=null) unless --probe. A run whose report.json exists is reused,
a run stopped half-way is resumed by the same command: rerunning the script picks up where it stopped.
The metric is the run's last validation (report.json task.valid_metric): PER for ctc, accuracy for
classify; the ratio is the method's mean over the fine-tuned teacher's mean (for PER: the goal at 90%
is at most 1.5).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import shlex
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

METHODS = ("agnostic", "aware", "distill")
LABELS = {"ctc": "PER", "classify": "accuracy"}
WHOLE = "data.max_samples=64000"  # the demo's longest utterance is 59,427 samples: whole for ctc


def task_overrides(task: str) -> List[str]:
    """The task group and its labels (the demo corpus's transcripts.tsv: phones, voice)."""
    from prune.train.config import demo_data

    return [f"task={task}", f"task.labels={demo_data('demo_corpus/transcripts.tsv')}", WHOLE]


def step_overrides(prune_steps: Optional[int], final_steps: Optional[int], recipe: str) -> List[str]:
    """--prune-steps / --final-steps, with the warm-ups shrunk to fit them (the config check asks
    for at most two thirds of the pruning stage, half of each lr stage)."""
    from prune.train.config import compose

    if prune_steps is None and final_steps is None:
        return []
    tr = compose(recipe).trainer
    cfg = compose(recipe)
    n = tr.prune_steps if prune_steps is None else prune_steps
    m = tr.final_steps if final_steps is None else final_steps
    lr_warmup = min([cfg.optim.warmup_steps] + [s // 2 for s in (n, m) if s > 0])
    return [f"trainer.prune_steps={n}", f"trainer.final_steps={m}",
            f"pruning.warmup_steps={min(cfg.pruning.warmup_steps, max(1, n // 2))}", f"optim.warmup_steps={lr_warmup}"]


def finetune_overrides(steps: Optional[int], recipe: str) -> List[str]:
    """A fine-tuning run's length (--finetune-steps; else the recipe's trainer.final_steps)."""
    from prune.train.config import compose

    cfg = compose(recipe)
    n = cfg.trainer.final_steps if steps is None else steps
    return [f"trainer.final_steps={n}", f"optim.warmup_steps={min(cfg.optim.warmup_steps, max(1, n // 2))}"]


def plan(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every run of the table, in order: {task, method, sparsity, seed, run, command}. An agnostic
    run is two commands (prune, then fine-tune its export)."""
    from prune.train.config import compose

    out, recipe = Path(args.out), args.recipe
    data = compose(recipe).data  # the fine-tuning of an agnostic export reads the recipe's corpus
    common = [*args.set, *([] if args.probe else ["probe.corpus=null"])]
    steps = step_overrides(args.prune_steps, args.final_steps, recipe)
    tune = finetune_overrides(args.finetune_steps, recipe)
    runs: List[Dict[str, Any]] = []
    for task in args.task:
        tasked = task_overrides(task)
        for seed in args.seeds:
            run = out / task / "teacher" / f"seed{seed}"
            runs.append({"task": task, "method": "teacher", "sparsity": 0.0, "seed": seed, "run": str(run),
                         "commands": [["train", recipe, *tasked, "pruning.enabled=false", "trainer.prune_steps=0",
                                       "distill.weight=0", *tune, f"trainer.seed={seed}", *common,
                                       f"hydra.run.dir={run}"]]})
        for sparsity in args.sparsities:
            for seed in args.seeds:
                base = [f"pruning.target={sparsity}", *steps, f"trainer.seed={seed}", *common]
                for method in METHODS:
                    run = out / task / method / f"s{sparsity:g}" / f"seed{seed}"
                    if method == "agnostic":  # the pruned export is the same for both tasks: shared
                        pruned = out / "agnostic_pruned" / f"s{sparsity:g}" / f"seed{seed}"
                        commands = [["train", recipe, *base, f"hydra.run.dir={pruned}"],
                                    ["finetune", str(pruned / "export"), *tasked[:2],
                                     f"data.train_manifest={data.train_manifest}",
                                     f"data.valid_manifest={data.valid_manifest}", *tune, f"trainer.seed={seed}",
                                     *common, f"hydra.run.dir={run}"]]
                    else:
                        weight = "distill.weight=0" if method == "aware" else "distill.weight=1"
                        teacher = ([f"task.finetune_teacher_steps={args.finetune_teacher_steps}"]
                                   if args.finetune_teacher_steps else [])
                        commands = [["train", recipe, *base, *tasked, weight, *teacher, f"hydra.run.dir={run}"]]
                    runs.append({"task": task, "method": method, "sparsity": sparsity, "seed": seed,
                                 "run": str(run), "commands": commands})
    return runs


def prune_command(argv: List[str]) -> List[str]:
    """The ``prune`` CLI of this interpreter (the same environment as the script)."""
    return [sys.executable, "-m", "prune.cli", *argv]


def execute(runs: List[Dict[str, Any]], jobs: int = 1) -> None:
    """Run each run's commands in order, ``jobs`` runs at a time; a command whose folder has its
    report.json already is skipped. The agnostic pruned run two runs share is made once: a lock per
    folder makes the second wait for the first."""
    locks: Dict[Path, threading.Lock] = collections.defaultdict(threading.Lock)
    guard = threading.Lock()

    def one(r: Dict[str, Any]) -> None:
        for argv in r["commands"]:
            folder = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")))
            with guard:
                lock = locks[folder]
            with lock:
                if (folder / "report.json").is_file():
                    print(f"reused: {folder}", flush=True)
                    continue
                print("running:", " ".join(shlex.quote(a) for a in ["prune", *argv]), flush=True)
                if jobs == 1:
                    done = subprocess.run(prune_command(argv))
                else:  # in parallel each run writes its folder's task_table.log (the outputs would interleave)
                    folder.mkdir(parents=True, exist_ok=True)
                    with open(folder / "task_table.log", "a") as log:
                        done = subprocess.run(prune_command(argv), stdout=log, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    where = "above" if jobs == 1 else folder / "task_table.log"
                    raise SystemExit(f"task_table: `prune {argv[0]}` for {folder} failed (exit {done.returncode}); "
                                     f"its log is {where}, fix it and rerun the script (finished runs are reused)")

    if jobs == 1:
        for r in runs:
            one(r)
        return
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for future in concurrent.futures.as_completed([pool.submit(one, r) for r in runs]):
            future.result()  # the first failure stops the table (the runs under way finish)


def metric(run: str) -> float:
    """The run's last validation of the task metric (report.json)."""
    return json.loads((Path(run) / "report.json").read_text())["task"]["valid_metric"]


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """{task: {"teacher": stats, "rows": [{sparsity, method, stats, ratio}]}}; stats: mean, std, values."""
    def stats(values: List[float]) -> Dict[str, Any]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values}

    table: Dict[str, Any] = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        mine = [r for r in runs if r["task"] == task]
        teacher = stats([metric(r["run"]) for r in mine if r["method"] == "teacher"])
        rows = []
        for sparsity in dict.fromkeys(r["sparsity"] for r in mine if r["method"] != "teacher"):
            for method in METHODS:
                s = stats([metric(r["run"]) for r in mine if r["sparsity"] == sparsity and r["method"] == method])
                rows.append({"sparsity": sparsity, "method": method, **s, "ratio": s["mean"] / teacher["mean"]})
        table[task] = {"metric": LABELS[task], "teacher": teacher, "rows": rows}
    return table


NAMES = {"agnostic": "(a) task-agnostic, then fine-tuned", "aware": "(b) task-aware (task loss alone)",
         "distill": "(c) task + distillation"}


def markdown(table: Dict[str, Any], seeds: List[int]) -> str:
    lines = []
    for task, t in table.items():
        m, teacher = t["metric"], t["teacher"]
        lines += [f"### {task}: valid {m}, mean +- std over seeds {seeds}", "",
                  f"| params removed | method | valid {m} | / fine-tuned teacher |", "|---|---|---|---|",
                  f"| 0 | fine-tuned teacher | {teacher['mean']:.3f} +- {teacher['std']:.3f} | 1.00 |"]
        lines += [f"| {r['sparsity']:.0%} | {NAMES[r['method']]} | {r['mean']:.3f} +- {r['std']:.3f} | "
                  f"{r['ratio']:.2f} |" for r in t["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder of the runs, task_table.json and task_table.md")
    p.add_argument("--recipe", default="demo", help="the pruning recipe (default: demo, its committed teacher)")
    p.add_argument("--task", nargs="+", choices=sorted(LABELS), default=["ctc", "classify"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.75, 0.9])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--prune-steps", type=int, help="trainer.prune_steps (default: the recipe's)")
    p.add_argument("--final-steps", type=int, help="trainer.final_steps (default: the recipe's)")
    p.add_argument("--finetune-steps", type=int, help="steps of each fine-tuning run (default: the recipe's "
                                                      "trainer.final_steps)")
    p.add_argument("--finetune-teacher-steps", type=int, default=0,
                   help="(b) and (c) fine-tune their teacher first for this many steps (task.finetune_teacher_steps)")
    p.add_argument("--augment", action="store_true", help="data.augment.enabled=true in every run")
    p.add_argument("--valid-augment", action="store_true", help="data.valid_augment=true in every run")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every run")
    p.add_argument("--probe", action="store_true", help="keep the recipe's phone probe in each report (slow)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (each then gets trainer.threads=1 unless --set names it; 2 on 2 cores)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    args.set = [*args.set, *(["data.augment.enabled=true"] if args.augment else []),
                *(["data.valid_augment=true"] if args.valid_augment else [])]
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1 and not any(a.startswith("trainer.threads=") for a in args.set):
        args.set.append("trainer.threads=1")  # N runs of 2 threads on 2 cores slow each other down many-fold
    runs = plan(args)
    if args.dry_run:
        for r in runs:
            for command in r["commands"]:
                print(" ".join(shlex.quote(a) for a in ["prune", *command]))
        return
    execute(runs, args.jobs)
    table = summarise(runs)
    out = Path(args.out)
    (out / "task_table.json").write_text(json.dumps({"seeds": args.seeds, "runs": runs, "table": table}, indent=2))
    text = markdown(table, args.seeds)
    (out / "task_table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
