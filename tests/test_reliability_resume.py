"""Kill and resume: a short run killed with SIGKILL at deterministic points (``PRUNE_FAULT``, see
prune/faults.py) and resumed ends with an export bitwise identical to an uninterrupted run.

The runs: 10 pruning + 6 final steps, a checkpoint every 5 steps, so the checkpoints are
step 5, step 10 (gated, then again once cut), 15 and 16 (done), of which the last 3 are kept.
"""

import signal

import pytest
from helpers_train import noise_corpus, prune_cli, short_run_args

from prune.checkpoints import load_pruned, read_export_info
from prune.train.checkpoint import checkpoint_files, load_checkpoint

KILLED = -signal.SIGKILL


def run_args(corpus, run):
    train, valid = corpus
    args = short_run_args(train, valid, run, prune_steps=10, final_steps=6)
    return [a for a in args if not a.startswith("trainer.ckpt_every=")] + ["trainer.ckpt_every=5"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return noise_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run every interrupted one must match."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = prune_cli(run_args(corpus, run))
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def assert_same_export(reference, run):
    a, b = reference / "export", run / "export"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    info_a, info_b = read_export_info(a), read_export_info(b)
    assert info_a["pruned"] == info_b["pruned"]
    for key in ("history", "steps", "nonfinite_steps_skipped", "skipped_files", "reached_sparsity"):
        assert info_a["metadata"][key] == info_b["metadata"][key], key
    load_pruned(b)  # and it loads


def kill_at(corpus, run, fault, resume=False):
    args = ["resume", str(run)] if resume else run_args(corpus, run)
    result = prune_cli(args, env={"PRUNE_FAULT": fault})
    assert result.returncode == KILLED, f"{fault}: exit {result.returncode}\n{result.stderr[-3000:]}"
    assert not (run / "export").exists()
    return result


def resume(run):
    result = prune_cli(["resume", str(run)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def latest(run):
    return [step for step, _ in checkpoint_files(run / "checkpoints")]


def test_killed_at_every_point_and_resumed_gives_the_same_export(corpus, reference, tmp_path):
    """One run killed five times (before its first checkpoint, mid-checkpoint-write, between the
    stages, mid-step in stage 2, during export; the newest checkpoint also damaged once), resumed
    after each kill, ends with the reference's export."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"

    kill_at(corpus, run, "mid_step:3")
    assert latest(run) == []  # nothing saved yet

    result = kill_at(corpus, run, "mid_checkpoint:10", resume=True)
    assert "resumed from step" not in result.stderr  # no checkpoint: started over
    # checkpoint 10 is complete in its temp file but was never renamed: it must not be loaded
    assert (ckpts / ".step_00000010.pt.tmp").stat().st_size > 0
    assert latest(run) == [5]

    result = kill_at(corpus, run, "between_stages:10", resume=True)
    assert "resumed from step 5 " in result.stderr
    assert latest(run) == [10, 5] and not list(ckpts.glob("*.tmp"))  # the stale temp file was replaced
    assert load_checkpoint(ckpts / "step_00000010.pt")["stage"] == "prune"  # the cut was not saved

    result = kill_at(corpus, run, "mid_step:13", resume=True)
    assert "resumed from step 10 (stage prune)" in result.stderr  # cuts again, from the same gates
    assert latest(run) == [10, 5]
    assert load_checkpoint(ckpts / "step_00000010.pt")["stage"] == "final"

    newest = ckpts / "step_00000010.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a torn newest checkpoint
    result = kill_at(corpus, run, "during_export", resume=True)
    assert "skipping damaged checkpoint" in result.stderr and "step_00000010.pt" in result.stderr
    assert "resumed from step 5 " in result.stderr
    assert latest(run) == [16, 15, 10]  # keep_last=3
    (tmp,) = run.glob(".export.tmp-*")  # the weights are complete in a folder never renamed
    assert (tmp / "model.safetensors").is_file()

    result = resume(run)
    assert "resumed from step 16 (stage done)" in result.stderr
    assert "skipping damaged checkpoint" in (run / "resume.log").read_text()
    assert not list(run.glob(".export.*")), "a half-written export folder was left behind"
    assert not list(ckpts.glob("*.tmp")), "a stale temp checkpoint was left behind"
    assert_same_export(reference, run)

    # every checkpoint damaged: one clear line, no traceback, nothing trained
    for _, path in checkpoint_files(ckpts):
        path.write_bytes(b"PK\x03\x04 not really a zip")
    for command, args in (("resume", ["resume", str(run)]), ("train", run_args(corpus, run))):
        result = prune_cli(args)
        assert result.returncode not in (0, KILLED)
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"prune {command}: every checkpoint in") and "damaged" in last, last
        assert "Traceback" not in result.stderr


def test_fault_spec_parsing(monkeypatch):
    from prune import faults

    monkeypatch.setenv("PRUNE_FAULT", "nan_loss:3-5, mid_step:9,during_export")
    assert [s for s in range(8) if faults.nan_loss(s)] == [3, 4, 5]
    assert faults._matches("mid_step", 9) and not faults._matches("mid_step", 8)
    assert faults._matches("during_export", None) and not faults._matches("mid_checkpoint", 9)
    monkeypatch.setenv("PRUNE_FAULT", "mid_stpe:3")
    with pytest.raises(ValueError, match="unknown fault point 'mid_stpe'"):
        faults.maybe_fail("mid_step", 3)
    monkeypatch.delenv("PRUNE_FAULT")
    faults.maybe_fail("mid_step", 3)  # unset: nothing happens

