"""``prune evaluate``: how close a (pruned) model's hidden states stay to its teacher's."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..checkpoints import read_export_info
from ..checkpoints.pretrained import load_pretrained
from ..models import Wav2Vec2Model
from ..data.dataset import AudioDataset, collate, validate_manifest
from ..train.distill import frame_mask
from ..data.manifest import read_manifest
from .report import format_table


def _teacher_for(model_path: str, teacher: Optional[str]) -> Wav2Vec2Model:
    if teacher is not None:
        return load_pretrained(teacher)
    try:
        info = read_export_info(model_path)
        train_cfg = info["metadata"]["config"]["teacher"]
    except Exception:
        raise ValueError(f"{model_path} does not record its teacher: pass --teacher PATH") from None
    recorded = train_cfg.get("checkpoint")
    if recorded is not None and not Path(recorded).exists():
        raise ValueError(f"{model_path} was distilled from {recorded} (the teacher.checkpoint recorded in its "
                         f"config.json), which does not exist here: pass --teacher PATH")
    from omegaconf import OmegaConf

    from ..train.student import load_teacher

    return load_teacher(OmegaConf.create(train_cfg))


@torch.no_grad()
def evaluate_against_teacher(model_path: str, teacher_path: Optional[str], manifest_path: str,
                             batch_size: int = 4, max_samples: Optional[int] = 160000) -> str:
    """Per hidden state: mean cosine similarity and L1 distance to the teacher's, over valid
    frames of every file in the manifest (cropped to ``max_samples``)."""
    model = load_pretrained(model_path)
    teacher = _teacher_for(model_path, teacher_path)
    manifest = read_manifest(manifest_path)
    good, _ = validate_manifest(manifest)
    dataset = AudioDataset(manifest.subset(good), max_samples=max_samples)
    n = min(len(model.encoder.transformer.layers), len(teacher.encoder.transformer.layers)) + 1
    cos_sum, l1_sum, frames_total = torch.zeros(n), torch.zeros(n), 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        if batch is None:
            continue
        ours, frames = model(batch.waveforms, batch.lengths)
        theirs, _ = teacher(batch.waveforms, batch.lengths)
        mask = frame_mask(frames, ours[0].shape[1]).float()
        for i in range(n):
            cos_sum[i] += (F.cosine_similarity(ours[i], theirs[i], dim=-1) * mask).sum()
            l1_sum[i] += ((ours[i] - theirs[i]).abs().mean(-1) * mask).sum()
        frames_total += int(mask.sum())
    rows: List[List[str]] = [["hidden state", "cosine", "L1"]]
    for i in range(n):
        rows.append([str(i), f"{cos_sum[i] / frames_total:.4f}", f"{l1_sum[i] / frames_total:.4f}"])
    return (f"{Path(model_path)} vs its teacher on {len(dataset)} files ({frames_total} frames)\n"
            + format_table(rows))
