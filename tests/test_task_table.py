"""scripts/task_table.py (#16): the plan of runs (every `prune train` command composes and passes
the config check before compute), the dry run, and the table's statistics from the runs' reports."""

import importlib.util
import json
import subprocess
import sys

import pytest
from helpers_train import REPO

from prune.train.config import compose, validate

spec = importlib.util.spec_from_file_location("task_table", REPO / "scripts" / "task_table.py")
task_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(task_table)


def parsed(tmp_path, *extra):
    captured = {}
    original = task_table.plan
    task_table.plan = lambda args: captured.setdefault("args", args) and original(args)
    try:
        task_table.main(["--out", str(tmp_path), "--dry-run", *extra])
    finally:
        task_table.plan = original
    return captured["args"]


def test_the_plan_runs_every_method_and_each_train_command_validates(tmp_path, capsys):
    args = parsed(tmp_path, "--seeds", "1", "--sparsities", "0.9", "--prune-steps", "300", "--final-steps",
                  "100", "--finetune-steps", "200", "--augment", "--finetune-teacher-steps", "100")
    printed = capsys.readouterr().out.splitlines()
    runs = task_table.plan(args)
    # per task: a teacher run + (agnostic: prune + finetune, aware, distill), one seed
    assert len(runs) == 2 * (1 + 3) and len(printed) == 2 * (1 + 4)
    assert {(r["task"], r["method"]) for r in runs} == {(t, m) for t in ("ctc", "classify")
                                                        for m in ("teacher", "agnostic", "aware", "distill")}
    for r in runs:
        for argv in r["commands"]:
            assert "data.augment.enabled=true" in argv and "probe.corpus=null" in argv
            overrides = [a for a in argv[2:] if not a.startswith("hydra.")]
            if argv[0] == "train":
                cfg = compose(argv[1], overrides)
                validate(cfg)  # a warm-up too long for the shortened steps would fail here
                assert cfg.trainer.seed == r["seed"]
                if r["method"] == "teacher":
                    assert not cfg.pruning.enabled and cfg.distill.weight == 0 and cfg.trainer.final_steps == 200
                elif cfg.task.kind != "none":
                    assert cfg.pruning.target == 0.9 and cfg.trainer.prune_steps == 300
                    assert cfg.distill.weight == (0 if r["method"] == "aware" else 1)
                    assert cfg.task.finetune_teacher_steps == 100 and cfg.task.kind == r["task"]
                    assert cfg.data.max_samples == 64000
            else:  # (a): the task-agnostic export fine-tuned on the task
                assert argv[0] == "finetune" and argv[1].endswith("/export") and f"task={r['task']}" in argv
                assert "trainer.final_steps=200" in argv


def test_the_table_is_the_mean_and_spread_over_seeds_against_the_teacher(tmp_path):
    args = parsed(tmp_path, "--seeds", "0", "1", "--sparsities", "0.9", "--task", "ctc")
    runs = task_table.plan(args)
    values = {"teacher": [0.20, 0.30], "agnostic": [0.50, 0.70], "aware": [0.30, 0.40], "distill": [0.25, 0.35]}
    for r in runs:
        (path := tmp_path / r["run"]).mkdir(parents=True, exist_ok=True)
        (path / "report.json").write_text(json.dumps({"task": {"valid_metric": values[r["method"]][r["seed"]]}}))
    table = task_table.summarise(runs)["ctc"]
    assert table["teacher"]["mean"] == pytest.approx(0.25) and table["teacher"]["std"] == pytest.approx(0.0707107, 1e-5)
    ratios = {row["method"]: row["ratio"] for row in table["rows"]}
    assert ratios == pytest.approx({"agnostic": 2.4, "aware": 1.4, "distill": 1.2})
    text = task_table.markdown({"ctc": table}, [0, 1])
    assert "| 90% | (b) task-aware (task loss alone) | 0.350 +- 0.071 | 1.40 |" in text
    assert "| 0 | fine-tuned teacher | 0.250 +- 0.071 | 1.00 |" in text


def test_dry_run_from_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "task_table.py"), "--out", str(tmp_path),
                           "--dry-run", "--seeds", "0", "--sparsities", "0.75", "--task", "classify"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("prune ") for line in lines)
    assert not any(tmp_path.iterdir())  # nothing run, nothing written


def test_parallel_runs_make_the_shared_pruned_run_once_and_every_report(tmp_path, monkeypatch):
    """--jobs 2: each run's commands in order, the agnostic pruned run both tasks share made once
    (the second waits on its folder's lock), each run's output in its folder's task_table.log."""
    args = parsed(tmp_path, "--seeds", "0", "--sparsities", "0.9", "--jobs", "2")
    assert "trainer.threads=1" in args.set  # two 2-thread runs on 2 cores would slow each other down
    runs = task_table.plan(args)
    calls = tmp_path / "calls.txt"
    fake = ("import pathlib, sys, time; d = [a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('hydra.run.dir=')][0]; "
            f"open({str(calls)!r}, 'a').write(d + '\\n'); time.sleep(0.3); p = pathlib.Path(d); "
            "p.mkdir(parents=True, exist_ok=True); (p / 'report.json').write_text('{}'); print('ran', d)")
    monkeypatch.setattr(task_table, "prune_command", lambda argv: [sys.executable, "-c", fake, *argv])
    task_table.execute(runs, jobs=2)
    made = calls.read_text().split()
    pruned = [f for f in made if "agnostic_pruned" in f]
    assert len(pruned) == 1 and len(made) == len(set(made)) == 1 + sum(len(r["commands"]) - ("agnostic" == r["method"])
                                                                       for r in runs)
    for r in runs:
        assert "ran" in (tmp_path / r["run"] / "task_table.log").read_text()
    # a failed command stops the table with the log's place in one line
    monkeypatch.setattr(task_table, "prune_command", lambda argv: [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(SystemExit, match="failed \\(exit 3\\).*task_table.log"):
        task_table.execute(task_table.plan(parsed(tmp_path / "again", "--seeds", "0", "--sparsities", "0.9")), jobs=2)
