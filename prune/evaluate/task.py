"""``prune evaluate MODEL --task MANIFEST``: the task metric (PER / CER / WER / accuracy) of the
task head saved beside an export (``task_head.safetensors`` + ``task.json``) on a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..checkpoints.pretrained import load_pretrained
from ..data.dataset import AudioDataset, validate_manifest
from ..data.labels import read_labels, split_targets
from ..data.manifest import read_manifest
from ..train.task import load_task_head, task_counts


@torch.no_grad()
def evaluate_task(model_path: str, manifest_path: str, labels: Optional[str] = None, batch_size: int = 4,
                  max_samples: Optional[int] = None) -> Dict[str, Any]:
    """The saved head's metric over every usable file of ``manifest_path`` (whole utterances unless
    ``max_samples``); ``labels``: the label file (default: the one the run was trained with).
    Every label is checked (missing utterance, unknown label or token) before the model runs."""
    head, info, vocab = load_task_head(model_path)
    label_file = labels or info["labels"]
    if label_file is None or not Path(label_file).is_file():
        raise ValueError(f"the label file {label_file} recorded in {Path(model_path) / 'task.json'} does not exist "
                         f"here: pass --labels FILE")
    manifest = read_manifest(manifest_path)
    good, _ = validate_manifest(manifest)
    dataset = AudioDataset(manifest.subset(good), max_samples=max_samples)
    targets = split_targets(read_labels(label_file, info["column"]), dataset.manifest.ids, vocab, label_file,
                            str(manifest_path))
    model = load_pretrained(model_path).eval()
    hits, of = 0.0, 0.0
    for start in range(0, len(dataset), batch_size):
        batch = dataset.batch(range(start, min(start + batch_size, len(dataset))))
        if batch is None:
            continue
        hiddens, frames = model(batch.waveforms, batch.lengths)
        a, b = task_counts(info["kind"], head(hiddens, frames), frames, [targets[i] for i in batch.ids])
        hits, of = hits + a, of + b
    return {"kind": info["kind"], "metric": info["metric"], "value": hits / max(of, 1), "files": len(dataset),
            "labels": str(label_file), "column": info["column"]}
