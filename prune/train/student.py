"""The student held by a training checkpoint (``checkpoints/step_*.pt``), rebuilt without the
trainer: what ``prune export`` exports and ``prune inspect`` describes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ..models import EncoderConfig, Wav2Vec2Model, build_encoder, preset_config
from ..structures import GateConfig, GatedEncoder
from .checkpoint import check_keys
from .recipe import PRUNE


def read_training_checkpoint(path: Path) -> Optional[Dict[str, Any]]:
    """The state of a prune training checkpoint; None if ``path`` is anything else (a file of
    another format, a folder). Tensors are memory-mapped: telling costs no full read."""
    if not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # another format (legacy pickle, fairseq's Namespace ...): not ours
        return None
    if not (isinstance(state, dict) and {"stage", "student"} <= set(state)):
        return None
    return check_keys(state, path)  # meant to be one: all of it must be there


def source_config(state: Dict[str, Any], path: Path) -> EncoderConfig:
    """The unpruned (teacher's) architecture: recorded in the checkpoint, or, in checkpoints
    written before it was, read from the recorded teacher."""
    if state.get("source_config"):
        return EncoderConfig.from_dict(state["source_config"])
    teacher = state["config"]["teacher"]
    if teacher["checkpoint"] is None:
        return preset_config(teacher["preset"], **teacher["overrides"])
    if not Path(teacher["checkpoint"]).exists():
        raise ValueError(f"{path}: its teacher {teacher['checkpoint']} (teacher.checkpoint) does not exist, and "
                         f"this checkpoint's architecture is read from it; put the teacher back there")
    from ..checkpoints.pretrained import load_pretrained

    return load_pretrained(teacher["checkpoint"]).config


def student_from_checkpoint(state: Dict[str, Any], path: Path
                            ) -> Tuple[Union[GatedEncoder, Wav2Vec2Model], EncoderConfig]:
    """(the student's encoder, the unpruned architecture): a ``GatedEncoder`` in the pruning
    stage, the cut ``Wav2Vec2Model`` after it."""
    source = source_config(state, path)
    encoder = {k[len("encoder."):]: v for k, v in state["student"].items() if k.startswith("encoder.")}
    if state["stage"] == PRUNE:
        cfg = state["config"]
        model = GatedEncoder(build_encoder(source.replace(encoder_layer_drop=cfg["distill"]["student_layer_drop"])),
                             GateConfig(**cfg["pruning"]["gates"]))
    else:
        model = build_encoder(EncoderConfig.from_dict(state["student_config"]))
    model.load_state_dict(encoder)
    return model.eval(), source


@torch.no_grad()
def inspect_training_checkpoint(path: Path, state: Dict[str, Any]) -> str:
    """What ``prune inspect`` prints for a training checkpoint: the stage and step; while gated,
    the expected size against the target, then the unpruned structure; once cut, the student's
    structure as for an export."""
    from ..checkpoints.export import describe
    from ..checkpoints.inspect import _share, _si, structure_lines
    from ..lagrangian import Lagrangian

    model, source = student_from_checkpoint(state, path)
    cfg, step = state["config"], state["step"]
    tr, p = cfg["trainer"], cfg["pruning"]
    plan = f"{tr['prune_steps']} pruning + {tr['final_steps']} final steps"
    lines = [f"checkpoint:     {path}", "format:         prune training checkpoint"]
    if isinstance(model, GatedEncoder):
        lag = Lagrangian(model, p["target_kind"], p["target"], p["warmup_steps"], p["macs_seconds"])
        params, macs = model.expected_params().item(), model.expected_macs(1.0).item()
        full = describe(source)
        lines += [f"training:       step {step}, pruning stage: gated, not cut yet ({plan})",
                  f"expected now:   {params:,.0f} parameters ({_share(params, full['params'])} kept), "
                  f"{_si(macs)} MACs/s ({_share(macs, full['macs_per_second'])} kept)",
                  f"target:         {lag.kind} sparsity {lag.target_sparsity:.4f} "
                  f"({lag.target_at(step):.4f} at this step of the warm-up)",
                  "unpruned model:", *structure_lines(model.model)]
    else:
        lines += [f"training:       step {step}, {state['stage']} stage: cut ({plan})",
                  *structure_lines(model, describe(source))]
    return "\n".join(lines)
