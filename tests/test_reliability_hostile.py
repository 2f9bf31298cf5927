"""Hostile checkpoints: every load path is pickle-safe. A training checkpoint crafted to run code
when unpickled is refused (``prune resume`` falls back to the one before, ``prune export`` stops
with one line), and a marker file proves nothing ran."""

import pickle
import re
import shutil
import signal

import pytest
import torch
from helpers_train import REPO, noise_corpus, prune_cli, short_run_args

from prune.checkpoints import ExportError, load_pruned, read_export_info
from prune.train.checkpoint import CheckpointError, checkpoint_files, load_checkpoint, load_latest


class RunsCode:
    """Unpickling this runs ``exec``: it writes the file ``path``, the stand-in for any code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


def hostile_checkpoint(path, marker, step, legacy=False):
    """A file that looks like a training checkpoint (a dict with a step) and runs code on load."""
    state = {"step": step, "stage": "prune", "student": {} if legacy else {"w": torch.zeros(1)},
             "payload": RunsCode(marker)}
    if legacy:  # a plain pickle, not torch's zip format: torch.load's legacy path must refuse it too
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=2)
    else:
        torch.save(state, path)


def test_the_payload_is_live(tmp_path):
    """Control: loaded without weights_only, the file does run code, so the marker's absence
    below means the loader refused it."""
    marker = tmp_path / "marker"
    hostile_checkpoint(tmp_path / "evil.pt", marker, 10)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("legacy", [False, True])
def test_load_checkpoint_refuses_code(tmp_path, legacy):
    marker = tmp_path / "marker"
    hostile_checkpoint(tmp_path / "step_00000010.pt", marker, 10, legacy)
    with pytest.raises(CheckpointError, match="step_00000010.pt cannot be loaded safely"):
        load_checkpoint(tmp_path / "step_00000010.pt")
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        load_latest(tmp_path)
    assert not marker.exists()


def test_a_checkpoint_without_the_training_state_is_skipped(tmp_path):
    """Safe to unpickle but not a whole training checkpoint (another tool's file, a hand edit)."""
    torch.save({"step": 20, "student": {}}, tmp_path / "step_00000020.pt")
    with pytest.raises(CheckpointError, match="step_00000020.pt is not a prune training checkpoint.*missing"):
        load_checkpoint(tmp_path / "step_00000020.pt")


def test_resume_and_export_refuse_hostile_checkpoints(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=8, n_valid=2)
    run = tmp_path / "run"
    args = short_run_args(train, valid, run, prune_steps=10, final_steps=4)
    args = [a for a in args if not a.startswith("trainer.ckpt_every=")] + ["trainer.ckpt_every=5"]
    killed = prune_cli(args, env={"PRUNE_FAULT": "mid_step:12"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert [s for s, _ in checkpoint_files(ckpts)] == [10, 5]
    good = ckpts / "step_00000010.pt"
    shutil.copy(good, tmp_path / "good.pt")

    marker = tmp_path / "marker"
    hostile_checkpoint(good, marker, 10)  # the newest real checkpoint replaced
    hostile_checkpoint(ckpts / "step_00000099.pt", marker, 99, legacy=True)  # and a newer plain pickle
    torch.save({"step": 50, "stage": "prune"}, ckpts / "step_00000050.pt")  # safe, but not a checkpoint

    resumed = prune_cli(["resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not marker.exists(), "a checkpoint ran code"
    warnings = [line for line in resumed.stderr.splitlines() if "skipping damaged checkpoint" in line]
    assert [re.search(r"step_(\d+)\.pt", w).group(1) for w in warnings] == ["00000099", "00000050", "00000010"]
    assert all("refers to exec" in w for w in (warnings[0], warnings[2])), warnings  # named, one line each
    assert "resumed from step 5 " in resumed.stderr
    load_pruned(run / "export")

    for evil in (good, ckpts / "step_00000099.pt"):  # prune export of a hostile file: one line
        hostile_checkpoint(evil, marker, 10, legacy=evil.name.endswith("99.pt"))
        out = tmp_path / f"export_{evil.stem}"
        result = prune_cli(["export", str(evil), str(out)])
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"prune export: {evil} cannot be loaded safely"), last
        assert not marker.exists() and not out.exists()

    result = prune_cli(["export", str(tmp_path / "good.pt"), str(tmp_path / "export_good")])  # control
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_export_folder_holding_a_pickle_is_refused(tmp_path):
    """``load_pruned`` reads safetensors only: a pickle in model.safetensors is a damaged file."""
    from prune import build_preset, export_pruned

    model = build_preset("hubert_base_tiny")
    export_pruned(model, tmp_path / "export")
    marker = tmp_path / "marker"
    hostile_checkpoint(tmp_path / "export" / "model.safetensors", marker, 1)
    read_export_info(tmp_path / "export")
    with pytest.raises(ExportError, match="model.safetensors cannot be read"):
        load_pruned(tmp_path / "export")
    assert not marker.exists()


# ------------------------------------------------------------------------------ the source
TORCH_LOAD = re.compile(r"torch\.load\(")
TRUSTED = ("prune/checkpoints/safe_load.py", 'torch.load(path, map_location="cpu", weights_only=False)')


def _calls(source: str):
    """The text of each ``torch.load(...)`` call (balanced parentheses)."""
    for m in TORCH_LOAD.finditer(source):
        depth, i = 0, m.end() - 1
        for i in range(m.end() - 1, len(source)):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            if depth == 0:
                break
        yield source[m.start():i + 1]


def test_every_torch_load_in_prune_is_weights_only():
    found = []
    for path in sorted((REPO / "prune").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for call in _calls(path.read_text()):
            found.append(rel)
            if (rel, call) == TRUSTED:
                continue  # the documented trust_pickle=True opt-in (logs a warning)
            assert re.search(r"weights_only\s*=\s*True", call), f"{rel}: {call}"
    assert "prune/train/checkpoint.py" in found and "prune/checkpoints/safe_load.py" in found
    source = (REPO / TRUSTED[0]).read_text()
    opt_in = source[source.index("if trust_pickle:"):source.index(TRUSTED[1])]
    assert "_LOG.warning" in opt_in  # the unsafe path is taken only on request, and says so
    assert not re.search(r"\bpickle\.loads?\(|\bdill\b|\bjoblib\.load", "\n".join(
        p.read_text() for p in (REPO / "prune").rglob("*.py")))
