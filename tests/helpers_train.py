"""Small audio corpora and CLI helpers for the trainer tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "data" / "demo_corpus"


def noise_corpus(folder: Path, n_train: int = 16, n_valid: int = 4, seed: int = 0) -> Tuple[Path, Path]:
    """A corpus of short noise bursts (0.5-2 s) with train/valid manifests."""
    rng = np.random.default_rng(seed)
    audio = folder / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_train + n_valid):
        n = int(rng.integers(8000, 32000))
        sf.write(audio / f"{i}.flac", (rng.standard_normal(n) * 0.1).astype("float32"), 16000)
        lines.append(f"{i}.flac\t{n}")
    train, valid = folder / "train.tsv", folder / "valid.tsv"
    train.write_text("\n".join(["audio"] + lines[:n_train]) + "\n")
    valid.write_text("\n".join(["audio"] + lines[n_train:]) + "\n")
    return train, valid


def prune_cli(args: List[str], cwd: Path = REPO, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prune.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def voice_labels(tmp_path: Path, train: Path, valid: Path) -> Path:
    """A label TSV for a noise corpus: three "voices" (id mod 3) and a two-phone transcript each."""
    from prune.data.manifest import read_manifest

    ids = read_manifest(train).ids + read_manifest(valid).ids
    path = tmp_path / "labels.tsv"
    path.write_text("\n".join(["id\tvoice\tphones", *[f"{u}\tv{int(u) % 3}\ta b" for u in ids]]) + "\n")
    return path


def short_run_args(train: Path, valid: Path, run_dir: Path, prune_steps: int = 30, final_steps: int = 10,
                   extra: List[str] = ()) -> List[str]:
    """tiny_demo shortened, its warm-ups scaled to fit the steps (the config check asks for it)."""
    lr_warmup = min(steps // 2 for steps in (prune_steps, final_steps) if steps > 0)
    return ["train", "tiny_demo", f"data.train_manifest={train}", f"data.valid_manifest={valid}",
            f"trainer.prune_steps={prune_steps}", f"trainer.final_steps={final_steps}",
            f"pruning.warmup_steps={max(1, prune_steps // 2)}", f"optim.warmup_steps={lr_warmup}",
            "trainer.log_every=5", "trainer.ckpt_every=10", "logging.progress=false", f"hydra.run.dir={run_dir}",
            *extra]


def demo_corpus_split(folder: Path, n_train: int) -> Path:
    """A corpus folder (train.tsv, valid.tsv, transcripts.tsv) holding the first ``n_train`` train
    files and the whole valid split of the demo corpus, for quick probe runs."""
    folder.mkdir(parents=True)
    root = str((DEMO_CORPUS / "audio").resolve())
    train = (DEMO_CORPUS / "train.tsv").read_text().splitlines()[1:1 + n_train]
    valid = (DEMO_CORPUS / "valid.tsv").read_text().splitlines()[1:]
    (folder / "train.tsv").write_text("\n".join([root, *train]) + "\n")
    (folder / "valid.tsv").write_text("\n".join([root, *valid]) + "\n")
    shutil.copy(DEMO_CORPUS / "transcripts.tsv", folder / "transcripts.tsv")
    return folder
