"""The run directory: a failed start leaves it as it was, config.yaml is always the config the
checkpoints were made with (absolute paths, so a run resumes from any folder and a moved file
is pointed to), one process at a time (a lock a killed run does not keep), Ctrl-C is one line,
a finished run is not redone. The runs are 4 pruning + 2 final steps, a checkpoint every 2."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_train import REPO, noise_corpus, prune_cli, short_run_args

from prune.train.checkpoint import checkpoint_files, load_checkpoint

KILLED = -signal.SIGKILL
DEMO_TEACHER = REPO / "data" / "demo_teacher"


def run_args(train, valid, run, *extra, prune_steps=4, final_steps=2):
    args = short_run_args(train, valid, run, prune_steps=prune_steps, final_steps=final_steps,
                          extra=["trainer.keep_last=5", *extra])
    return [a for a in args if not a.startswith("trainer.ckpt_every=")] + ["trainer.ckpt_every=2"]


def tree(folder: Path):
    """Every file under ``folder`` with its bytes (nothing a failed start may change)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def last_line(result):
    return result.stderr.strip().splitlines()[-1]


# a start that fails in setup, after the checks that need no compute: the checkpoint teacher has 4 layers
BAD_LAYERS = [f"teacher.checkpoint={DEMO_TEACHER}", "teacher.preset=null", "distill.layers=[[0],[5]]"]


@pytest.mark.skipif(not (DEMO_TEACHER / "model.safetensors").exists(), reason="no demo teacher")
def test_a_failed_start_leaves_nothing_and_config_yaml_is_what_the_checkpoints_were_made_with(tmp_path):
    """Issue 19, items 6, 8, 9. Trained with relative paths, resumed from another folder."""
    here = tmp_path / "project"
    noise_corpus(here / "corpus")
    train, valid = Path("corpus/train.tsv"), Path("corpus/valid.tsv")  # relative to `here`
    run = here / "runs" / "a" / "run"

    failed = prune_cli(run_args(train, valid, run, *BAD_LAYERS), cwd=here)
    assert failed.returncode not in (0, KILLED) and "distill.layers" in last_line(failed)
    assert not (here / "runs").exists(), "a failed start left folders behind (.hydra/, cli.log, config.yaml)"

    # Ctrl-C-like stop before the first checkpoint, then a re-run with another target
    assert prune_cli(run_args(train, valid, run), cwd=here, env={"PRUNE_FAULT": "mid_step:1"}).returncode == KILLED
    assert checkpoint_files(run / "checkpoints") == []
    killed = prune_cli(run_args(train, valid, run, "pruning.target=0.3"), cwd=here,
                       env={"PRUNE_FAULT": "mid_step:3"})
    assert killed.returncode == KILLED and [s for s, _ in checkpoint_files(run / "checkpoints")] == [2]
    assert (run / "run.lock").exists()  # the killed process never released its lock
    recorded = (run / "config.yaml").read_text()
    assert "target: 0.3" in recorded
    saved = load_checkpoint(run / "checkpoints" / "step_00000002.pt")["config"]
    assert saved["pruning"]["target"] == 0.3
    for key in ("train_manifest", "valid_manifest"):  # absolute, in config.yaml and in the checkpoint
        assert saved["data"][key] == str(here / "corpus" / f"{key.split('_')[0]}.tsv")
        assert f"{key}: {saved['data'][key]}" in recorded

    # from another folder: the recorded absolute paths work, the dead holder's lock is taken over
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = prune_cli(["resume", str(run)], cwd=elsewhere, env={"PRUNE_FAULT": "mid_step:4"})
    assert resumed.returncode == KILLED, resumed.stderr[-2000:]
    assert "resumed from step 2 (stage prune)" in resumed.stderr
    assert "ended without releasing its lock (killed?); taking it over" in resumed.stderr

    # a failed start in the re-used folder changes nothing in it (but releases the dead holder's lock)
    before = tree(run)
    before.pop("run.lock")
    failed = prune_cli(run_args(train, valid, run, *BAD_LAYERS), cwd=here)
    assert failed.returncode not in (0, KILLED) and "distill.layers" in last_line(failed)
    assert tree(run) == before

    # the corpus moved: one line naming the key and the command, before any compute; then pointed to it
    shutil.move(here / "corpus", tmp_path / "moved")
    lost = prune_cli(["resume", str(run)], cwd=elsewhere)
    assert lost.returncode not in (0, KILLED) and "Traceback" not in lost.stderr
    assert last_line(lost) == (f"prune resume: data.train_manifest: {here / 'corpus' / 'train.tsv'} does not exist; "
                               f"if it moved, give its new place: prune resume {run} data.train_manifest=NEW_PATH")
    wrong = prune_cli(["resume", str(run), "pruning.target=0.6"], cwd=elsewhere)
    assert last_line(wrong).startswith("prune resume: pruning.target=0.6: a resume continues the recorded config")
    pointed = prune_cli(["resume", str(run), f"data.train_manifest={tmp_path / 'moved' / 'train.tsv'}",
                         f"data.valid_manifest={tmp_path / 'moved' / 'valid.tsv'}"], cwd=elsewhere,
                        env={"PRUNE_FAULT": "mid_step:4"})
    assert pointed.returncode == KILLED, pointed.stderr[-2000:]
    assert "data.train_manifest: the run was made with" in pointed.stderr and "no longer exists" in pointed.stderr
    assert f"train_manifest: {tmp_path / 'moved' / 'train.tsv'}" in (run / "config.yaml").read_text()


def test_config_changes_sees_through_how_a_path_is_written(tmp_path, monkeypatch, caplog):
    """The resume check: a relative path (recorded by an older run) and the absolute one of the
    same file are the same config; a file that no longer exists may be replaced; another
    existing file is a different config."""
    from prune.train.resume import config_changes

    monkeypatch.chdir(tmp_path)
    for name in ("a.tsv", "b.tsv"):
        (tmp_path / name).write_text("x")
    (tmp_path / "link.tsv").symlink_to(tmp_path / "a.tsv")

    def cfg(manifest, target=0.5):
        return {"data": {"train_manifest": manifest, "valid_manifest": None}, "pruning": {"target": target}}

    assert config_changes(cfg("a.tsv"), cfg(str(tmp_path / "a.tsv"))) == []
    assert config_changes(cfg("a.tsv"), cfg(str(tmp_path / "link.tsv"))) == []
    assert config_changes(cfg("a.tsv"), cfg(str(tmp_path / "b.tsv"))) == ["data.train_manifest"]
    assert config_changes(cfg("gone.tsv"), cfg(str(tmp_path / "b.tsv"))) == []
    assert "the run was made with gone.tsv, which no longer exists" in caplog.text
    assert config_changes(cfg("a.tsv"), cfg(str(tmp_path / "a.tsv"), 0.3)) == ["pruning.target"]


def test_lock_ctrl_c_finished_run_and_training_checkpoints(tmp_path):
    """Issue 19, items 7, 11, 15: a second process is refused while the run goes on; Ctrl-C is
    one line and exit 130; inspect reads the training checkpoints; a finished run is left alone."""
    train, valid = noise_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "prune.cli", *run_args(train, valid, run)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PRUNE_FAULT": "stall:2"},  # holds at step 2, after its checkpoint
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        deadline = time.time() + 300
        while not (ckpts / "step_00000002.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (ckpts / "step_00000002.pt").exists(), proc.communicate()[1][-2000:]

        second = prune_cli(["resume", str(run)])
        assert second.returncode not in (0, KILLED) and "Traceback" not in second.stderr
        assert last_line(second).startswith(f"prune resume: {run} is in use by pid {proc.pid} ")
        assert f"kill {proc.pid}" in last_line(second)
        assert [s for s, _ in checkpoint_files(ckpts)] == [2], "the refused process trained"

        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"prune train: stopped at step 2; last checkpoint: "
                                            f"{ckpts / 'step_00000002.pt'}; continue with: prune resume {run}")
    assert not (run / "run.lock").exists()

    gated = prune_cli(["inspect", str(ckpts / "step_00000002.pt")])
    assert gated.returncode == 0, gated.stderr[-2000:]
    assert "format:         prune training checkpoint" in gated.stdout
    assert "step 2, pruning stage: gated, not cut yet (4 pruning + 2 final steps)" in gated.stdout
    assert "expected now:" in gated.stdout and "target:         params sparsity 0.5000" in gated.stdout

    assert prune_cli(["resume", str(run)]).returncode == 0
    finished = {name: (run / name).read_bytes() for name in ("report.json", "report.txt", "config.yaml")}
    again = prune_cli(["resume", str(run)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip() == f"{run} is finished (export at {run / 'export'}); nothing to resume"
    assert {name: (run / name).read_bytes() for name in finished} == finished

    cut = prune_cli(["inspect", str(ckpts / "step_00000006.pt")])
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert "step 6, final stage: cut (4 pruning + 2 final steps)" in cut.stdout and "pruned from:    hubert" in cut.stdout
    export = json.loads((run / "export" / "config.json").read_text())
    assert f"parameters:     {export['pruned']['params']:,}" in cut.stdout

    taken = prune_cli(["export", str(ckpts / "step_00000006.pt"), str(run / "export")])
    assert last_line(taken) == (f"prune export: cannot export to {run / 'export'}: the folder is not empty "
                                f"(pass --overwrite to replace it)")


def test_lock_is_one_process_at_a_time_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    from prune.train.rundir import LOCK, RunDirBusy, RunLock

    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    record = json.loads((tmp_path / LOCK).read_text())
    assert record["pid"] == os.getpid() and record["host"] and record["started"]
    with pytest.raises(RunDirBusy, match=rf"in use by pid {os.getpid()} \(since "):
        second.acquire()
    first.release()
    assert not (tmp_path / LOCK).exists()
    second.acquire()
    second.release()

    # a holder killed with SIGKILL: the kernel dropped its flock, its record is still there
    (tmp_path / LOCK).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}))
    third = RunLock(tmp_path)
    third.acquire()
    assert "the run of pid 999999 on gone (since then) ended without releasing its lock" in caplog.text
    third.release()


@pytest.mark.parametrize("pseudo", ["/proc", "/sys"])
def test_run_dir_in_a_pseudo_filesystem_is_one_line(tmp_path, pseudo):
    if not os.path.isdir(pseudo):
        pytest.skip(f"no {pseudo}")
    train, valid = noise_corpus(tmp_path / "corpus", n_train=2, n_valid=1)
    result = prune_cli(run_args(train, valid, Path(pseudo) / "prune_run"))
    assert result.returncode not in (0, KILLED)
    assert "Traceback" not in result.stderr, result.stderr[-1000:]
    assert last_line(result).startswith(f"prune train: run directory: {pseudo}/prune_run ")  # as root: "cannot be made"


def test_preview_names_the_overwrite_flag(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    result = prune_cli(["preview", "--preset", "hubert_base_tiny", "--out", str(tmp_path / "out")])
    assert result.returncode != 0
    assert last_line(result) == (f"prune preview: cannot export to {tmp_path / 'out'}: the folder is not empty "
                                 f"(pass --overwrite to replace it)")


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    """`prune inspect ... | head`: the reader goes away before the text is written."""
    import prune

    out = prune.export_pruned(prune.build_preset("hubert_base_tiny"), tmp_path / "model")
    proc = subprocess.Popen([sys.executable, "-m", "prune.cli", "inspect", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the process has loaded anything, let alone printed
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 1
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_evaluate_names_teacher_when_the_recorded_one_is_gone(tmp_path):
    import prune

    out = prune.export_pruned(prune.build_preset("hubert_base_tiny"), tmp_path / "model", metadata={
        "config": {"teacher": {"preset": None, "checkpoint": str(tmp_path / "moved_teacher"), "overrides": {},
                               "seed": 0}}})
    train, valid = noise_corpus(tmp_path / "corpus", n_train=1, n_valid=1)
    result = prune_cli(["evaluate", str(out), "--manifest", str(valid)], cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert last_line(result) == (f"prune evaluate: {out} was distilled from {tmp_path / 'moved_teacher'} (the "
                                 f"teacher.checkpoint recorded in its config.json), which does not exist here: "
                                 f"pass --teacher PATH")
