"""What the command line tells a new user: the recipes when none is given, --help with every key,
one-line override errors, sweeps checked before their first job, and one table after the last."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_train import noise_corpus

from prune.cli import build_parser, main
from prune.train.config import ConfigError, TrainConfig
from prune.train.multirun import JobResult, Sweep, check_sweep, dirname_override, job_row, summary_table
from prune.pretrain.recipe import PretrainConfig
from prune.progress import progress_bar
from prune.train.recipe import progress_line
from prune.train.schema import schema_keys
from prune.train.usage import recipes

PRUNE = [sys.executable, "-m", "prune.cli"]


def run(args, cwd, timeout=120):
    return subprocess.run([*PRUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_train_without_a_recipe_lists_the_recipes_and_starts_nothing(tmp_path):
    """It used to start a 75,000-step HuBERT Base run on a random teacher."""
    result = run(["train"], tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    for name, summary in recipes("train").items():
        assert summary and f"  {name}" in result.stderr and summary in result.stderr
    assert "prune train RECIPE [key=value ...]" in result.stderr and "prune train RECIPE --help" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, no .hydra


def test_every_recipe_has_a_one_line_summary():
    for command in ("train", "pretrain"):
        for name, summary in recipes(command).items():
            assert summary and not summary.endswith(":"), f"{command} {name}: first header line {summary!r}"


@pytest.mark.parametrize("command,schema", [("train", TrainConfig), ("pretrain", PretrainConfig)])
def test_help_lists_recipes_groups_and_every_key(capsys, command, schema):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name, summary in recipes(command).items():
        assert f"  {name}" in text and summary in text
    keys = [k for k in schema_keys(schema) if k.kind != "section"]
    for key in keys:
        line = next((li for li in text.splitlines() if li.strip().startswith(f"{key.name} = ")), None)
        assert line is not None, key.name
        assert key.help in line  # the meaning, from the schema's comment
    assert sum(bool(k.help) for k in keys) >= 0.9 * len(keys)  # (nearly) every key says what it means
    assert "examples:" in text
    if command == "train":
        assert "teacher  demo | hubert_base | tiny | wavlm_base_plus" in text
        assert "pruning.target = 0.75" in text and "teacher.random_init = false" in text
    else:  # pre-training's own groups (configs/pretrain), with the recipe's choice
        assert "model    demo | tiny   (demo_teacher: demo)" in text and "probe=none" in text


def test_recipe_help_shows_that_recipes_values(capsys):
    with pytest.raises(SystemExit):
        main(["train", "tiny_demo", "--help"])
    text = capsys.readouterr().out
    assert "values as recipe tiny_demo" in text and "pruning.target = 0.5 " in text
    assert "trainer.prune_steps = 1500 " in text and "(tiny_demo: tiny)" in text


def test_every_subcommand_argument_has_a_help_string():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"prune {name}: {action.dest} has no help"


def test_an_override_typo_is_one_line_before_anything_starts(tmp_path):
    result = run(["train", "tiny_demo", "pruning.traget=0.6"], tmp_path)
    assert result.returncode == 1
    assert result.stderr == ("prune train: pruning.traget=0.6: pruning.traget is not a config key; "
                             "did you mean pruning.target?\n")
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_checks_every_job_before_the_first_runs(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus")
    base = [f"data.train_manifest={train}", f"data.valid_manifest={valid}"]
    with pytest.raises(ConfigError, match=r"^job 1 of 2 \(pruning.target=1.5\): pruning.target: a sparsity"):
        check_sweep("tiny_demo", [*base, "pruning.target=0.5,1.5"])
    jobs = check_sweep("tiny_demo", [*base, "pruning.target=0.3,0.6", "distill.cos_type=raw,log_sig"])
    assert len(jobs) == 4 and all(base[0] in job for job in jobs)
    sweep = tmp_path / "sweep"
    result = run(["train", "tiny_demo", *base, "--multirun", "pruning.target=0.5,1.5", f"hydra.sweep.dir={sweep}"],
                 tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "prune train: job 1 of 2 (pruning.target=1.5): pruning.target: a sparsity must be in (0, 1), got 1.5"]
    assert not sweep.exists()  # job 0 did not run


def test_job_folders_are_named_by_the_swept_values_only():
    override = dirname_override(["data.train_manifest=/x/t.tsv", "pruning.target=0.3,0.6", "trainer.prune_steps=9"])
    assert override == ("hydra.job.config.override_dirname.exclude_keys="
                        "['data.train_manifest','trainer.prune_steps']")


def _fake_report(run_dir: Path, params: int, per=None):
    run_dir.mkdir(parents=True)
    report = {"after": {"params": params, "macs_per_second": 2.5e9}, "reached_sparsity": 0.5,
              "cpu_latency_seconds": {"teacher": 0.01, "pruned": 0.004, "audio_seconds": 4.0},
              "history": [{"step": 10, "stage": "done", "valid_distill_loss": -1.25}]}
    if per is not None:
        report["phone_probe"] = {"pruned": {"valid_per": per}}
    (run_dir / "report.json").write_text(json.dumps(report))


def test_a_sweep_ends_with_one_table_and_a_failed_job_does_not_stop_it(tmp_path, capsys):
    sweep = Sweep()
    _fake_report(tmp_path / "pruning.target=0.3", 12345, per=0.25)
    sweep.run(lambda: None, tmp_path / "pruning.target=0.3", "pruning.target=0.3", tmp_path)

    def fails():
        raise FloatingPointError("3 non-finite steps in a row at step 7")

    sweep.run(fails, tmp_path / "pruning.target=0.9", "pruning.target=0.9", tmp_path)
    _fake_report(tmp_path / "pruning.target=0.6", 6789)
    sweep.run(lambda: None, tmp_path / "pruning.target=0.6", "pruning.target=0.6", tmp_path)
    assert sweep.finish() == 1  # a job failed: the command fails, after the table
    out = capsys.readouterr().out
    text = (tmp_path / "summary.txt").read_text()
    assert text.strip() in out
    header, _, *rows = text.splitlines()
    assert header.split() == ["job", "params", "sparsity", "MACs", "/", "s", "latency", "(4", "s)", "valid", "loss",
                              "PER"]
    assert rows[0].split() == ["pruning.target=0.3", "12,345", "0.5000", "2.500", "G", "4.0", "ms", "-1.2500", "0.250"]
    assert rows[1].split()[:2] == ["pruning.target=0.9", "failed"]
    assert rows[2].split()[-1] == "-"  # not probed
    assert rows[3] == "pruning.target=0.9: 3 non-finite steps in a row at step 7"
    assert [r["job"] for r in json.loads((tmp_path / "summary.json").read_text())] == [
        "pruning.target=0.3", "pruning.target=0.9", "pruning.target=0.6"]


def test_summary_without_probe_has_no_per_column(tmp_path):
    _fake_report(tmp_path / "a", 100)
    assert "PER" not in summary_table([job_row(JobResult("a", tmp_path / "a"))])


class _Stream:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_no_progress_bar_unless_the_output_is_a_terminal():
    """In a log file the bar's redraws were ~200 updates in 25 s; a line every log_every steps instead."""
    assert progress_bar(100, 0, True, _Stream(tty=False)) is None
    assert progress_bar(100, 0, False, _Stream(tty=True)) is None
    bar = progress_bar(100, 5, True, _Stream(tty=True))
    assert bar is not None and bar.n == 5
    bar.close()
    parts = {"distill": torch.tensor(-1.23456), "expected_sparsity": torch.tensor(0.4123)}
    assert progress_line(120, 2000, "prune", parts, 0.3, 0.5234) == \
        "step 120/2000 (prune)  loss -1.2346  expected sparsity 0.412 (target 0.300)  0.52 s/step"
    assert progress_line(1900, 2000, "final", {"distill": torch.tensor(-2.0)}, None, 0.1) == \
        "step 1900/2000 (final)  loss -2.0000  0.10 s/step"
    assert progress_line(7, 10, "final", {"task": torch.tensor(0.5)}, None, 0.1, loss_key="task") == \
        "step 7/10 (final)  loss 0.5000  0.10 s/step"  # another objective's loss
