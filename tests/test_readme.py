"""The README's and docs/' commands and code are what a new user types: they must work as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
# README first: the docs' commands use what the README's made (the demo's export, data/my_corpus)
DOCUMENTS = [README, *sorted((README.parent / "docs").glob("*.md"))]


def test_readme_python_example_runs(tmp_path):
    api = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", api, flags=re.S)
    assert blocks, "the README's Python API section has no example"
    for code in blocks:
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "outputs" / "api-demo" / "model.safetensors").is_file()


def test_demo_command_runs_on_a_tiny_preset(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "prune.cli", "preview", "--preset", "wavlm_base_tiny",
                             "--sparsity", "0.5", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    reached = float(re.search(r"param sparsity reached: (\S+)", result.stdout).group(1))
    assert abs(reached - 0.5) < 0.01
    error = float(re.search(r"max relative error over all hidden states: (\S+)", result.stdout).group(1))
    assert error < 1e-5
    assert (out / "config.json").is_file()
    # timed interleaved, fastest of --repeats (5), with the spread shown
    assert "(fastest of 5)" in result.stdout and re.search(r"latency spread .*unpruned \+\d+/\+\d+%", result.stdout)
    # a typo'd flag value fails fast, in one line, naming the problem
    bad = subprocess.run([sys.executable, "-m", "prune.cli", "preview", "--preset", "hubert_bsae"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown --preset 'hubert_bsae'" in bad.stderr
    assert "Traceback" not in bad.stderr


# ------------------------------------------------------------------ the command-line section
# Every `prune` command in the README and docs/*.md, run in their order (README first) from a temporary directory with the
# installed console script, as a user types it. What is added is only what makes it cheap (a few
# steps, short crops, a smaller probe corpus) or stands for the user's own files (/path/to/...).
FAST = ["trainer.prune_steps=4", "trainer.final_steps=2", "pruning.warmup_steps=1", "optim.warmup_steps=1",
        "trainer.log_every=1", "data.batch_size=2", "data.max_samples=8000", "trainer.latency_seconds=0.1",
        "trainer.threads=1", "logging.tensorboard=false"]
STOPPED_RUN = "outputs/tiny_demo/2026-11-25_13-30-00"  # the README's resume example, made here by a killed run
# README commands that need the user's own checkpoints or stand for a pattern ("...", RUN, OUT)
PLACEHOLDERS = {
    "prune train tiny_demo ... hydra.run.dir=RUN",
    "prune export RUN/checkpoints/step_00000500.pt OUT",
    "prune inspect RUN/checkpoints/step_00000500.pt",  # run in test_reliability_rundir.py
    "prune resume RUN data.train_manifest=NEW_PATH",  # run in test_reliability_rundir.py
    "prune inspect checkpoints/wavlm-base-plus",
    "prune inspect checkpoints/hubert_base_ls960.pt",
    "prune inspect outputs/my_export",
    "prune extract outputs/my_export /path/to/audio --layer 9 --onnx outputs/my_export.onnx --out features/onnx",
}


def _readme_commands():
    """Every line starting with `prune ` in the bash blocks of the README, then of docs/*.md."""
    commands = []
    for document in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", document.read_text(), flags=re.S):
            for line in block.splitlines():
                command = line.split("  #", 1)[0].strip()
                if command.startswith("prune "):
                    commands.append(command)
    return commands


def _has(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def _has_onnx() -> bool:
    return _has("onnx", "onnxscript", "onnxruntime")


def _runs(probe_corpus: Path):
    """README command -> (words to add, expected exit status, environment)."""
    repo = README.parent
    train = FAST
    return {
        "prune train": ([], 2, {}),
        "prune train tiny_demo --help": ([], 0, {}),
        "prune train demo hydra.run.dir=outputs/demo": ([*train, f"probe.corpus={probe_corpus}", "probe.steps=2"], 0,
                                                        {}),
        "prune train tiny_demo pruning.target=0.6 trainer.prune_steps=3000": (
            [*train, "trainer.ckpt_every=1", "trainer.keep_last=10", f"hydra.run.dir={STOPPED_RUN}"], -9,
            {"PRUNE_FAULT": "mid_step:3"}),  # killed at step 3
        "prune train tiny_demo --multirun pruning.target=0.5,0.75": (train, 0, {}),
        "prune train tiny_demo pruning.target_kind=macs pruning.target=0.6": (
            [*train, "hydra.run.dir=outputs/tiny_demo_macs"], 0, {}),
        "prune profile --preset hubert_base_tiny --threads 1 --out outputs/latency.json": (
            ["--conv-points", "2", "--ffn-points", "2"], 0, {}),
        ("prune train tiny_demo pruning.target_kind=latency pruning.target=0.5 "
         "pruning.latency_table=outputs/latency.json trainer.threads=1"): (
            [t for t in train if t != "trainer.threads=1"] + ["hydra.run.dir=outputs/tiny_demo_latency"], 0, {}),
        "prune train tiny_demo pruning.uniform=true pruning.round_to=8": (
            [*train, "hydra.run.dir=outputs/tiny_demo_uniform"], 0, {}),
        "prune train tiny_demo pruning.uniform=true pruning.shape.ffn=16 pruning.round_to=8": (
            [*train, "hydra.run.dir=outputs/tiny_demo_shape"], 0, {}),
        "prune preview --preset wavlm_base_tiny --sparsity 0.5 --uniform --out outputs/preview_uniform": (
            ["--repeats", "1"], 0, {}),
        f"prune resume {STOPPED_RUN}": ([], 0, {}),
        "prune export outputs/.../checkpoints/step_00000500.pt outputs/step500": ([], 0, {}),
        "prune manifest /path/to/audio data/my_corpus": ([], 0, {}),
        ("prune train default teacher.checkpoint=/path/to/hubert data.train_manifest=data/my_corpus/train.tsv "
         "data.valid_manifest=data/my_corpus/valid.tsv"): (
            [*train, "distill.layers=[[0],[2,4]]", "hydra.run.dir=outputs/mine"], 0, {}),  # a 4-layer teacher
        "prune inspect outputs/demo/export": ([], 0, {}),
        "prune evaluate outputs/demo/export --manifest data/my_corpus/valid.tsv": (["--max-samples", "8000"], 0, {}),
        "prune evaluate outputs/demo/export --probe data/demo_corpus --probe-floor": (["--probe-steps", "2"], 0, {}),
        # task runs (#16): whole utterances for ctc, so no short crops
        ("prune train tiny_demo task=ctc task.labels=data/demo_corpus/transcripts.tsv "
         "hydra.run.dir=outputs/tiny_ctc"): ([w for w in train if not w.startswith("data.max_samples=")], 0, {}),
        "prune evaluate outputs/tiny_ctc/export --task data/my_corpus/valid.tsv": ([], 0, {}),
        "prune train demo task=ctc task.labels=data/demo_corpus/transcripts.tsv distill.weight=0": (
            [*[w for w in train if not w.startswith("data.max_samples=")], "probe.corpus=null",
             "hydra.run.dir=outputs/demo_ctc"], 0, {}),
        "prune train demo task=classify task.labels=data/demo_corpus/transcripts.tsv": (
            [*train, "probe.corpus=null", "hydra.run.dir=outputs/demo_voice"], 0, {}),
        ("prune train demo task=classify task.labels=data/demo_corpus/transcripts.tsv task.finetune_teacher_steps=300 "
         "data.augment.enabled=true"): (
            [*train, "task.finetune_teacher_steps=2", "probe.corpus=null", "hydra.run.dir=outputs/demo_teacher_voice"],
            0, {}),
        "prune finetune outputs/demo/export task=classify": (
            ["trainer.final_steps=2", "optim.warmup_steps=1", "trainer.log_every=1", "data.batch_size=2",
             "data.max_samples=8000", "trainer.latency_seconds=0.1", "trainer.threads=1", "logging.tensorboard=false",
             "hydra.run.dir=outputs/finetuned"], 0, {}),
        "prune extract outputs/demo/export /path/to/audio --layer 4 --out features/demo": ([], 0, {}),
        ("prune extract outputs/demo/export data/my_corpus/train.tsv --layer 2 --layer 4 --float16 "
         "--out features/two"): ([], 0, {}),
        "prune preview --preset wavlm_base_plus --sparsity 0.5": (["--preset", "wavlm_base_plus_tiny"], 0, {}),
        # without the onnx extra: one line saying how to install it, exit 1
        "prune convert outputs/demo/export outputs/demo.onnx --to onnx": ([], 0 if _has_onnx() else 1, {}),
        "prune inspect DPHuBERT-sp0.75.pth": ([], 0, {}),
        "prune convert DPHuBERT-sp0.75.pth outputs/dphubert.onnx --to onnx": ([], 0 if _has_onnx() else 1, {}),
        "prune pretrain demo_teacher hydra.run.dir=outputs/demo_teacher": (
            ["trainer.steps=2", "targets.kmeans_iters=2", "trainer.valid_every=0", "trainer.threads=1",
             "data.max_samples=8000", f"data.train_manifest={probe_corpus / 'train.tsv'}",
             f"data.valid_manifest={probe_corpus / 'valid.tsv'}", f"probe.corpus={probe_corpus}", "probe.steps=2"],
            0, {}),
        # without transformers (the hf extra): one line saying how to install it, exit 1
        "prune convert outputs/demo_teacher/export outputs/demo_teacher_hf --to hf": (
            [], 0 if _has("transformers") else 1, {}),
    }, {"/path/to/audio": str(repo / "data" / "demo_corpus" / "audio"),  # the user's own files
        "/path/to/hubert": str(repo / "data" / "demo_teacher"),
        "DPHuBERT-sp0.75.pth": str(repo / "tests" / "fixtures" / "dphubert" / "hubert_pruned.pth"),  # made by its code
        "--probe data/demo_corpus": f"--probe {probe_corpus}",
        "data/demo_corpus/transcripts.tsv": str(repo / "data" / "demo_corpus" / "transcripts.tsv"),
        "outputs/.../checkpoints/step_00000500.pt": f"{STOPPED_RUN}/checkpoints/step_00000002.pt"}


def test_readme_commands_work_from_another_directory(tmp_path):
    """18 processes, each importing torch (~4 s) and most training a few steps: ~150 s of CPU."""
    import os

    from helpers_train import demo_corpus_split

    probe_corpus = demo_corpus_split(tmp_path / "probe_corpus", n_train=8)
    runs, substitutions = _runs(probe_corpus)
    readme = _readme_commands()
    unknown = [c for c in readme if c not in runs and c not in PLACEHOLDERS]
    assert not unknown, f"README / docs commands this test does not run: {unknown}"
    assert not [c for c in runs if c not in readme], "commands no longer in the README or docs/"
    user = tmp_path / "user"
    user.mkdir()
    prune = Path(sys.executable).parent / "prune"  # the console script
    outputs = {}
    for command in dict.fromkeys(c for c in readme if c in runs):  # README order, each once
        extra, status, env = runs[command]
        typed = command
        for placeholder, value in substitutions.items():
            typed = typed.replace(placeholder, value)
        result = subprocess.run([str(prune), *typed.split()[1:], *extra], cwd=user, capture_output=True, text=True,
                                timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        assert result.returncode == status, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{command}\n{result.stderr[-3000:]}"
        outputs[command] = result
    assert not (user / "data" / "demo_corpus").exists()  # the demo found its data without it here
    if _has_onnx():
        converted = outputs["prune convert outputs/demo/export outputs/demo.onnx --to onnx"]
        assert (user / "outputs" / "demo.onnx").is_file() and "onnxruntime vs torch" in converted.stdout
        assert (user / "outputs" / "dphubert.onnx").is_file()
    assert re.search(r"format: +DPHuBERT", outputs["prune inspect DPHuBERT-sp0.75.pth"].stdout)
    assert "tiny_demo" in outputs["prune train"].stderr and "pruning.target = 0.5" in \
        outputs["prune train tiny_demo --help"].stdout
    demo = outputs["prune train demo hydra.run.dir=outputs/demo"]
    assert (user / "outputs" / "demo" / "export" / "model.safetensors").is_file()
    assert "phone error rate (probe)" in demo.stdout
    # no progress bar off a terminal: a log line every trainer.log_every steps instead
    assert "\r" not in demo.stderr and "step 3/6 (prune)  loss" in demo.stdout + demo.stderr
    sweeps = list((user / "multirun" / "tiny_demo").glob("*/summary.txt"))
    assert len(sweeps) == 1 and (sweeps[0].parent / "pruning.target=0.75" / "export").is_dir()
    assert (user / STOPPED_RUN / "export").is_dir() and (user / "outputs" / "step500" / "config.json").is_file()
    assert (user / "data" / "my_corpus" / "valid.tsv").is_file() and (user / "outputs" / "mine" / "export").is_dir()
    assert "latency target, table" in (user / "outputs" / "tiny_demo_latency" / "report.txt").read_text()
    assert (user / "outputs" / "demo_teacher" / "export").is_dir() and (user / "outputs" / "preview").is_dir()
    if _has("transformers"):
        assert (user / "outputs" / "demo_teacher_hf" / "config.json").is_file()
    assert len(list((user / "features" / "demo").rglob("*.npy"))) == 280
    assert "PER" in outputs["prune evaluate outputs/tiny_ctc/export --task data/my_corpus/valid.tsv"].stdout
    assert (user / "outputs" / "finetuned" / "export" / "task.json").is_file()
    assert (user / "features" / "two" / "layer_2").is_dir() and (user / "features" / "two" / "extract.json").is_file()
