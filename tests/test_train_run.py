"""The trainer end to end through the CLI: the demo recipe shortened, resume, install, DDP, sweeps."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import load_with_torch_only
from helpers_train import DEMO_CORPUS, REPO, demo_corpus_split, noise_corpus, prune_cli, short_run_args

from prune.checkpoints import read_export_info
from prune.models import preset_config
from prune.structures import count_params


def _target_params(sparsity=0.5):
    return (1 - sparsity) * count_params(preset_config("hubert_base_tiny"))


@pytest.mark.skipif(not (DEMO_CORPUS / "train.tsv").exists(), reason="the demo corpus is not committed yet")
def test_demo_recipe_shortened_end_to_end(tmp_path):
    run = tmp_path / "run"
    result = prune_cli(["train", "tiny_demo", "trainer.prune_steps=40", "trainer.final_steps=10",
                        "pruning.warmup_steps=20", "optim.warmup_steps=5", "logging.progress=false",
                        f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"export      : {run / 'export'}" in result.stdout
    layers, params = load_with_torch_only(run / "export").split()
    assert abs(int(params) - _target_params()) <= 0.005 * _target_params()  # within ±0.5% of the target
    info = read_export_info(run / "export")
    assert info["pruned"]["params"] == int(params) and info["source"]["params"] == count_params(
        preset_config("hubert_base_tiny"))
    report = json.loads((run / "report.json").read_text())
    assert report["after"]["params"] == int(params) and report["cpu_latency_seconds"]["pruned"] > 0
    assert (run / "layers.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.skipif(not (REPO / "data" / "demo_teacher" / "model.safetensors").exists(), reason="no demo teacher")
def test_demo_recipe_report_has_the_probe_table(tmp_path):
    """`prune train demo`, shortened: the pre-trained teacher, and a report with params, MACs, latency
    and phone error rate for the teacher, the pruned model and a random-init floor."""
    run, corpus = tmp_path / "run", demo_corpus_split(tmp_path / "corpus", n_train=24)
    result = prune_cli(["train", "demo", "trainer.prune_steps=30", "trainer.final_steps=10",
                        "pruning.warmup_steps=15", "optim.warmup_steps=5", f"probe.corpus={corpus}", "probe.steps=30",
                        "logging.progress=false", f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    text = (run / "report.txt").read_text()
    assert text.strip() in result.stdout  # the command ends by printing the report
    header, _, *rows = text.splitlines()[:6]
    assert header.split() == ["teacher", "pruned", "random", "init", "ratio"]
    names = [r.split("  ")[0] for r in rows]
    assert names == ["params", "MACs / s of audio", "CPU latency, 4 s, batch 1", "phone error rate (probe)"]
    report = json.loads((run / "report.json").read_text())
    probe = report["phone_probe"]
    assert set(probe) == {"corpus", "steps", "seeds", "teacher", "pruned", "random init"}
    assert probe["seeds"] == [0, 1, 2]  # fixed probe seeds, the mean reported
    for k in ("teacher", "pruned", "random init"):
        assert probe[k]["valid_per"] == pytest.approx(sum(probe[k]["valid_per_by_seed"]) / 3)
    per_row = rows[3].split()[-4:]
    assert [float(v) for v in per_row[:3]] == [round(probe[k]["valid_per"], 3)
                                              for k in ("teacher", "pruned", "random init")]
    assert report["after"]["params"] < report["before"]["params"] == 933792


def test_resume_after_sigkill_gives_the_same_export(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus")
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = lambda run: short_run_args(train, valid, run, prune_steps=60, final_steps=20)  # noqa: E731
    assert prune_cli(args(full)).returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "prune.cli", *args(killed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_00000020.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "export").exists(), "the run finished before it could be killed"
    resumed = prune_cli(["resume", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    a, b = full / "export", killed / "export"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    info_a, info_b = read_export_info(a), read_export_info(b)
    assert info_a["metadata"]["history"] == info_b["metadata"]["history"]


def test_resume_refuses_a_different_config(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    assert prune_cli(short_run_args(train, valid, run, prune_steps=10, final_steps=0)).returncode == 0
    changed = prune_cli(short_run_args(train, valid, run, prune_steps=10, final_steps=0,
                                       extra=["pruning.target=0.3"]))
    assert changed.returncode != 0
    assert "different config (pruning.target)" in changed.stderr


def test_console_script_works_from_anywhere_after_a_plain_install(tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    assert (target / "prune" / "configs" / "train.yaml").is_file()
    assert (target / "prune" / "recipes" / "tiny_demo.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import prune, sys; assert prune.__file__.startswith(sys.argv[1]), prune.__file__; "
            "from prune.cli import main; main(['train', 'tiny_demo', '--cfg', 'job'])")
    result = subprocess.run([sys.executable, "-c", code, str(target)], cwd=elsewhere, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "name: tiny_demo" in result.stdout and "preset: hubert_base_tiny" in result.stdout
    assert (target / "prune" / "recipes" / "pretrain" / "demo_teacher.yaml").is_file()
    code = code.replace("['train', 'tiny_demo', '--cfg', 'job']", "['pretrain', 'demo_teacher', '--cfg', 'job']")
    result = subprocess.run([sys.executable, "-c", code, str(target)], cwd=elsewhere, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "name: demo_teacher" in result.stdout and "num_clusters: 100" in result.stdout
    # the demo's corpus and teacher ship in the wheel: found from any directory, inside the install
    assert (target / "prune" / "demo_data" / "demo_teacher" / "model.safetensors").is_file()
    assert len(list((target / "prune" / "demo_data" / "demo_corpus" / "audio").glob("*.flac"))) == 280
    code = code.replace("['pretrain', 'demo_teacher', '--cfg', 'job']", "['train', 'demo', '--cfg', 'job', '--resolve']")
    result = subprocess.run([sys.executable, "-c", code, str(target)], cwd=elsewhere, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"checkpoint: {target / 'prune' / 'demo_data' / 'demo_teacher'}" in result.stdout
    assert f"corpus: {target / 'prune' / 'demo_data' / 'demo_corpus'}" in result.stdout


def test_multirun_sweeps_the_target(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus")
    sweep = tmp_path / "sweep"
    args = short_run_args(train, valid, tmp_path / "unused", prune_steps=10, final_steps=0)
    args = [a for a in args if not a.startswith("hydra.run.dir")]
    result = prune_cli([*args, "--multirun", "pruning.target=0.3,0.6", f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = ["pruning.target=0.3", "pruning.target=0.6"]  # job folders named by the swept values
    sizes = [read_export_info(sweep / job / "export")["pruned"]["params"] for job in jobs]
    for size, target in zip(sizes, (0.3, 0.6)):
        assert abs(size - _target_params(target)) <= 0.005 * _target_params(target)
    summary = (sweep / "summary.txt").read_text()  # one table across the jobs, also printed
    assert summary.strip() in result.stdout
    rows = summary.splitlines()[2:]
    assert [r.split()[0] for r in rows] == jobs and [r.split()[1] for r in rows] == [f"{n:,}" for n in sizes]


def test_torchrun_two_cpu_processes(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "prune.cli",
                             *short_run_args(train, valid, run, prune_steps=10, final_steps=4)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    agree = [line for line in out.splitlines() if "gates agree across 2 ranks" in line]
    assert {line.split("rank ")[1][0] for line in agree} == {"0", "1"}
    assert len({line.split("checksum ")[1] for line in agree}) == 1  # the same gates on both ranks
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # only rank 0 writes
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000010.pt", "step_00000014.pt"]
    assert (run / "export" / "model.safetensors").is_file()
    no_dir = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29518", "-m", "prune.cli",
                             "train", "tiny_demo"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "under torchrun, give hydra.run.dir" in no_dir.stderr


def test_export_evaluate_and_inspect_commands(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    assert prune_cli(short_run_args(train, valid, run, prune_steps=15, final_steps=10,
                                    extra=["trainer.keep_last=5"])).returncode == 0
    # a checkpoint of each stage: still gated (cut on export) and already cut
    for step, stage in ((10, "prune"), (25, "done")):
        out = tmp_path / f"export{step}"
        result = prune_cli(["export", str(run / "checkpoints" / f"step_{step:08d}.pt"), str(out)])
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"exported step {step} ({stage} stage)" in result.stdout
        assert read_export_info(out)["pruned"]["params"] < count_params(preset_config("hubert_base_tiny"))
    final = read_export_info(tmp_path / "export25")
    assert final["pruned"] == read_export_info(run / "export")["pruned"]
    evaluated = prune_cli(["evaluate", str(run / "export"), "--manifest", str(valid)])
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    rows = [line.split() for line in evaluated.stdout.splitlines() if line[:1].isdigit() or line.startswith(" ")]
    cosines = [float(r[1]) for r in rows if len(r) == 3]
    assert len(cosines) == 3 and all(-1 <= c <= 1 for c in cosines)
    inspected = prune_cli(["inspect", str(run / "export")])
    assert inspected.returncode == 0 and "parameters" in inspected.stdout
    missing = prune_cli(["export", str(run / "checkpoints" / "step_00000099.pt"), str(tmp_path / "x")])
    assert missing.returncode != 0 and "step_00000099.pt" in missing.stderr and "Traceback" not in missing.stderr


def test_evaluate_runs_the_phone_probe(tmp_path):
    from helpers_train import DEMO_CORPUS

    if not (DEMO_CORPUS / "transcripts.tsv").exists():
        pytest.skip("no demo corpus")
    import prune

    out = prune.export_pruned(prune.build_preset("hubert_base_tiny"), tmp_path / "model")
    result = prune_cli(["evaluate", str(out), "--probe", str(DEMO_CORPUS), "--probe-steps", "30", "--probe-floor"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "252 train / 28 valid files, 30 steps, seeds [0, 1, 2]): PER train" in result.stdout
    assert re.search(r"valid \d\.\d{3} \+- \d\.\d{3} \(\d\.\d{3} \d\.\d{3} \d\.\d{3}\)", result.stdout)
    assert "random-init floor (this architecture, random weights): PER train" in result.stdout
    neither = prune_cli(["evaluate", str(out)])
    assert neither.returncode != 0 and "give --manifest" in neither.stderr


def test_ranks_agree_to_stop_when_one_cannot_go_on(tmp_path):
    """`all_ranks` (what a rank whose data share has no usable audio uses to stop every rank, not
    just itself): False on every rank as soon as one rank says False."""
    script = tmp_path / "agree.py"
    script.write_text(
        "from prune.train.distributed import all_ranks, init_distributed, shutdown_distributed\n"
        "env = init_distributed('cpu')\n"
        "print(f'rank {env.rank}: {all_ranks(env.rank == 0, env)} {all_ranks(True, env)}', flush=True)\n"
        "shutdown_distributed()\n")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29519", str(script)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: False True" in result.stdout and "rank 1: False True" in result.stdout
