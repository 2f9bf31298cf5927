"""The student of a pruning run, built in one place (``build_student``) from the teacher's
architecture and weights and the run's gate and skip settings: by the recipe, by its resume, and
by ``prune export`` / ``prune inspect``, which rebuild the student a training checkpoint
(``checkpoints/step_*.pt``) holds without the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..models import EncoderConfig, Wav2Vec2Model, build_encoder, build_preset, preset_config
from ..structures import GateConfig, GatedEncoder
from .checkpoint import check_keys

# the stages of a run, as its checkpoints record them; "teacher" (task.finetune_teacher_steps) comes first
TEACHER, PRUNE, FINAL, DONE = "teacher", "prune", "final", "done"
SKIP_KEYS = ("skip_closed", "skip_min_closed")  # pruning.* settings of GatedEncoder's closed-block skipping


def load_teacher(cfg: Mapping[str, Any]) -> Wav2Vec2Model:
    """The frozen teacher of a ``teacher`` config section: from a checkpoint, or a preset with
    seeded random weights."""
    if cfg["checkpoint"] is not None:
        from ..checkpoints.pretrained import load_pretrained

        teacher = load_pretrained(cfg["checkpoint"])
    else:
        with torch.random.fork_rng():
            torch.manual_seed(cfg["seed"])
            teacher = build_preset(cfg["preset"], **cfg["overrides"])
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def build_student(cfg: Mapping[str, Any], source: EncoderConfig,
                  teacher_weights: Optional[Dict[str, torch.Tensor]] = None,
                  cut_config: Optional[Dict[str, Any]] = None) -> Union[GatedEncoder, Wav2Vec2Model]:
    """The student of the run configured by ``cfg`` (a typed or plain training config), whose
    teacher has the architecture ``source``: gated (``pruning.gates``, the skip settings, the
    student's ``distill.student_layer_drop``), starting from ``teacher_weights`` when given; or,
    after the pruning stage, the cut model whose architecture ``cut_config`` records (its weights
    come from the checkpoint)."""
    if cut_config is not None:
        return build_encoder(EncoderConfig.from_dict(cut_config))
    student = build_encoder(source.replace(encoder_layer_drop=cfg["distill"]["student_layer_drop"]))
    if teacher_weights is not None:
        student.load_state_dict(teacher_weights)
    pruning = cfg["pruning"]
    skip = {key: pruning[key] for key in SKIP_KEYS if key in pruning}  # absent in checkpoints made before them
    gates = GateConfig(**pruning["gates"])
    uniform = bool(pruning.get("uniform", False))  # absent in checkpoints made before it
    if uniform:
        from ..shape import Shape, uniform_gates

        gates = uniform_gates(gates, Shape.from_config(pruning.get("shape")), source)
    return GatedEncoder(student, gates, uniform=uniform, **skip)


def hidden_kept(source: EncoderConfig, cut: EncoderConfig) -> Optional[List[int]]:
    """The positions, in the source's hidden dimension, of the channels a cut model kept (None:
    the cut left the hidden dimension whole)."""
    if cut.encoder_embed_dim == source.encoder_embed_dim:
        return None
    position = {c: i for i, c in enumerate(source.hidden_index)}
    return [position[c] for c in cut.hidden_index]


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


def cut_config(state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The cut student's architecture a checkpoint records; None in the pruning stage (gated)."""
    return None if state["stage"] == PRUNE else state["student_config"]


def student_from_checkpoint(state: Dict[str, Any], path: Path
                            ) -> Tuple[Union[GatedEncoder, Wav2Vec2Model], EncoderConfig]:
    """(the student's encoder, the unpruned architecture): a ``GatedEncoder`` in the pruning
    stage, the cut ``Wav2Vec2Model`` after it."""
    source = source_config(state, path)
    encoder = {k[len("encoder."):]: v for k, v in state["student"].items() if k.startswith("encoder.")}
    model = build_student(state["config"], source, cut_config=cut_config(state))
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
    from .config import measure_settings

    model, source = student_from_checkpoint(state, path)
    cfg, step = state["config"], state["step"]
    tr, p = cfg["trainer"], cfg["pruning"]
    teacher_steps = (cfg.get("task") or {}).get("finetune_teacher_steps", 0)
    plan = ((f"{teacher_steps} teacher fine-tuning + " if teacher_steps else "")
            + f"{tr['prune_steps']} pruning + {tr['final_steps']} final steps")
    lines = [f"checkpoint:     {path}", "format:         prune training checkpoint"]
    if isinstance(model, GatedEncoder):
        lag = Lagrangian(model, p["target_kind"], p["target"], p["warmup_steps"], p["macs_seconds"],
                         measure_settings(p, check=False))
        params, macs = model.expected_params().item(), model.expected_macs(1.0).item()
        full = describe(source)
        lines += [f"training:       step {step}, pruning stage: gated, not cut yet ({plan})",
                  f"expected now:   {params:,.0f} parameters ({_share(params, full['params'])} kept), "
                  f"{_si(macs)} MACs/s ({_share(macs, full['macs_per_second'])} kept)",
                  f"target:         {lag.kind} sparsity {lag.target_sparsity:.4f} "
                  f"({lag.target_at(step - teacher_steps):.4f} at this step of the warm-up)",
                  "unpruned model:", *structure_lines(model.model)]
    elif state["stage"] == TEACHER:
        lines += [f"training:       step {step}, teacher stage: fine-tuning the unpruned teacher on the task, "
                  f"not pruned yet ({plan})", *structure_lines(model, describe(source))]
    else:
        lines += [f"training:       step {step}, {state['stage']} stage: cut ({plan})",
                  *structure_lines(model, describe(source))]
    return "\n".join(lines)


def export_training_checkpoint(checkpoint: Path, out: Path, overwrite: bool = False) -> Dict[str, Any]:
    """Export the student a training checkpoint holds to the folder ``out`` (cut first if it is
    still gated), with the unpruned architecture and the checkpoint's step and stage recorded;
    ``out`` is checked before anything is loaded. Returns the checkpoint's state."""
    from ..checkpoints.convert import NATIVE, check_output, write_model
    from ..compile import compile_encoder
    from .checkpoint import load_checkpoint

    check_output(out, NATIVE, overwrite)  # before any loading
    state = load_checkpoint(Path(checkpoint))
    model, source = student_from_checkpoint(state, Path(checkpoint))
    if isinstance(model, GatedEncoder):
        from ..shape import Shape, Shaper

        p = state["config"]["pruning"]  # the run's imposed shape (uniform, shape, round_to), without calibration
        Shaper(bool(p.get("uniform", False)), Shape.from_config(p.get("shape")), p.get("round_to", 1)).apply(
            model.eval())
        model = compile_encoder(model.eval())
    metadata = {"from_checkpoint": str(checkpoint), "step": state["step"], "stage": state["stage"]}
    extra = None
    if ((state["config"].get("task") or {}).get("kind") or "none") != "none":
        metadata["task"], extra = task_files_of_checkpoint(state, source, model, Path(checkpoint))
    write_model(model.eval(), out, NATIVE, overwrite=overwrite, source=source, metadata=metadata, extra=extra)
    return state


def task_files_of_checkpoint(state: Dict[str, Any], source: EncoderConfig, model: Wav2Vec2Model, path: Path):
    """A task run's checkpoint: (its task record, the writer of its task head for ``model``, the
    student as exported: cut now if it was still gated, so the head follows a cut hidden dimension)."""
    from ..data.labels import Vocabulary
    from .task import build_head, task_record, task_writer

    cfg, weights = state["config"], state["student"]
    if state.get("task_vocabulary") is None:
        raise ValueError(f"{path}: a task run's checkpoint without its vocabulary (written before prune recorded "
                         f"it); export the run's own export/ folder, or resume the run to write a new checkpoint")
    vocab = Vocabulary.from_dict(state["task_vocabulary"])
    t = cfg["task"]
    head = build_head(t["kind"], source.encoder_num_layers + 1, source.encoder_embed_dim, vocab, t["layer"],
                      t["pooling"])
    prefix = "task_head."
    own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if "mix.inputs" in own:  # saved after a cut of the hidden dimension
        head.mix.keep_inputs(own["mix.inputs"].tolist(), source.encoder_embed_dim)
    head.load_state_dict(own)
    kept = hidden_kept(source, model.config)
    if kept is not None and head.mix.inputs is None:  # a gated checkpoint cut just now
        head.mix.keep_inputs(kept, source.encoder_embed_dim)
    record = task_record(t, cfg["distill"]["weight"], state["history"], len(vocab))
    return record, task_writer(head.eval(), record, source.encoder_num_layers + 1, vocab)
