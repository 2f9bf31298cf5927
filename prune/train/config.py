"""The training config: a typed schema (Hydra structured config) and the checks that run before
any compute. Every error names the key at fault."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..models import PRESETS, EncoderConfig, preset_config
from .. import measures
from ..structures import GateConfig
from .distill import COS_TYPES, LAYER0, MODES, REDUCTIONS

PRECISIONS = ("fp32", "bf16", "fp16")
GATE_LR_SCHEDULES = ("constant", "model")


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the key."""


DEMO_DATA_PACKAGE = "prune.demo_data"  # the repository's data/ folder, shipped inside the package


def demo_data(name: str) -> str:
    """``${prune.data:NAME}`` in a config: the absolute path of ``data/NAME`` (the demo corpus and
    teacher). The demo data ships inside the package (11 MB: corpus 7.5, teacher 3.6) rather than
    being looked up next to it, so `prune train demo` runs from any directory after a plain
    `pip install .`, not only from a source checkout."""
    from importlib.resources import files

    try:
        path = Path(str(files(DEMO_DATA_PACKAGE).joinpath(name)))
    except ModuleNotFoundError:  # an editable install made before data/ shipped: the checkout's own
        path = Path(__file__).resolve().parents[2] / "data" / name
    if not path.exists():
        raise ConfigError(f"${{prune.data:{name}}}: the demo data {name} is not installed with prune "
                          f"(it ships as {DEMO_DATA_PACKAGE}; reinstall with `pip install .` from the repository)")
    return str(path)


OmegaConf.register_new_resolver("prune.data", demo_data, replace=True)


@dataclass
class TeacherConfig:
    preset: Optional[str] = "hubert_base"  # built with seeded random weights when checkpoint is null
    checkpoint: Optional[str] = None  # HF folder, fairseq .pt, torchaudio state dict or a prune export
    random_init: bool = False  # a random-weight teacher (no checkpoint) beyond the *_tiny presets: benchmarks
    overrides: Dict[str, Any] = field(default_factory=dict)  # EncoderConfig overrides for a preset
    seed: int = 0  # seed of a random-weight teacher


@dataclass
class AugmentConfig:
    """Seeded additive noise and synthetic reverberation of the training audio (prune/data/augment.py),
    drawn from (trainer.seed, epoch, utterance index): a resumed run sees the same audio."""

    enabled: bool = False  # off: the audio as read
    noise_prob: float = 0.5  # chance that an utterance gets white noise ...
    snr_db: List[float] = field(default_factory=lambda: [5.0, 20.0])  # ... at an SNR drawn uniformly in [lo, hi] dB
    reverb_prob: float = 0.5  # chance that an utterance is convolved with a synthetic room response ...
    rt60: List[float] = field(default_factory=lambda: [0.2, 0.8])  # ... whose RT60 is drawn uniformly in [lo, hi] s


@dataclass
class DataConfig:
    train_manifest: str = MISSING  # TSV: root folder, then path<TAB>samples (make one: prune manifest FOLDER OUT)
    valid_manifest: Optional[str] = None  # validated at the end of each stage; null: none
    max_samples: int = 64000  # random crop, 4 s
    min_samples: int = 400  # the conv stack's receptive field
    batch_size: int = 8  # utterances per batch (per process)
    max_batch_samples: Optional[int] = None  # if set, batches are filled up to this many padded samples instead
    num_workers: int = 0  # DataLoader worker processes
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # seeded noise + reverberation (off by default)
    valid_augment: bool = False  # the valid set augmented too, with a fixed per-utterance seed (the same every run)


@dataclass
class ShapeConfig:
    """An explicit uniform shape, landed exactly at the cut (needs pruning.uniform=true); null: free."""

    layers: Optional[int] = None  # transformer layers kept (removed whole: attention + FFN)
    heads: Optional[int] = None  # heads per kept layer (below the teacher's: prune/ONNX exports only, not --to hf)
    ffn: Optional[int] = None  # FFN units per kept layer
    conv: Optional[Any] = None  # channels per conv layer: a list (one per layer) or one number (every prunable one)


@dataclass
class PruningConfig:
    target_kind: str = "params"  # params | param_count | macs | latency | latency_ms
    target: float = 0.75  # sparsity for params/macs/latency; params to keep for param_count; ms to keep for latency_ms
    warmup_steps: int = 5000  # the target rises linearly from 0
    macs_seconds: float = 1.0  # utterance length the MACs target is measured on
    # latency / latency_ms targets: the table of `prune profile ... --threads T --out FILE` (its length, batch and
    # threads; trainer.threads must be T); latency = fraction of the teacher's table latency removed, latency_ms = ms kept
    latency_table: Optional[str] = None
    tolerance: float = 0.005  # the exported size must land within this fraction of the target size
    max_cut_shift: float = 0.05  # a cut that moves the size more than this fraction of the target: training missed it
    calibrate: bool = True  # shift the gates' thresholds at the cut until the size is within tolerance
    # the measure the cut calibrates onto (null: pruning.target_kind), e.g. train to a params target, cut to a latency;
    # cut_target reads as pruning.target does for that measure (null: pruning.target); a latency kind needs the table
    cut_target_kind: Optional[str] = None
    cut_target: Optional[float] = None
    # a latency cut (target or cut_target kind latency/latency_ms): at most this many rounds of timing the cut model
    # against the unpruned one under the table's conditions and re-calibrating the table target (ratio, secant, then
    # bracket; stops once within 2%); 0: the table's word
    latency_refine: int = 3
    # the refinement's and the report's timings against the table: the median over this many fresh processes (a small
    # model's pass time depends on a process's own state; prune/latency_worker.py); 0: timed in the training process
    latency_processes: int = 3
    skip_closed: bool = True  # compute only the units whose gate sample is nonzero (same result, less work)
    skip_min_closed: float = 0.3  # ... in groups with at least this fraction closed (gathering costs too)
    gates: GateConfig = field(default_factory=GateConfig)  # which structures are gated, initial drop rates
    # uniform: a shape transformers holds. One FFN width in every kept layer, layers removed whole,
    # every head kept, conv channels pruned only where transformers cuts them exactly (not the last
    # conv layer, none in a layer_norm extractor); docs/configs.md
    uniform: bool = False  # a shape transformers holds: one FFN width, layers whole, all heads (docs/configs.md)
    shape: ShapeConfig = field(default_factory=ShapeConfig)  # explicit kept counts (with uniform)
    round_to: int = 1  # FFN units, conv channels, head dims kept in multiples of this at the cut (not heads, blocks)
    enabled: bool = True  # false: no gates and no cut, the model is trained as it is (prune finetune; trainer.prune_steps=0)


@dataclass
class DistillConfig:
    layers: List[List[int]] = field(default_factory=lambda: [[0], [4, 8, 12]])  # teacher layers; groups share a head
    mode: str = "layer2layer"  # layer2layer | prediction
    cos_weight: float = 1.0  # loss = L1 + cos_weight x cosine term
    cos_type: str = "raw"  # raw | log_sig
    reduction: str = "sum"  # sum | mean: how the per-layer losses combine (DPHuBERT: mean)
    layer0: str = "hidden"  # hidden (transformers' hidden_states[0]) | projection (DPHuBERT: before the pos conv)
    student_layer_drop: float = 0.0  # LayerDrop in the student
    weight: float = 1.0  # loss = task.weight x task loss + distill.weight x distillation; 0: no teacher forward


@dataclass
class OptimConfig:
    lr: float = 2e-4  # model and distillation heads
    gate_lr: float = 0.02  # log_alpha
    lambda_lr: float = 0.02  # Lagrange multipliers (ascent)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW
    weight_decay: float = 0.0  # AdamW, model weights only
    warmup_steps: int = 1000  # linear lr warm-up, then linear decay to 0 at the end of each stage
    clip_grad_norm: Optional[float] = 10.0  # null: no clipping
    gate_lr_schedule: str = "constant"  # constant | model (gate and lambda lrs follow the model's warm-up/decay)
    final_lr: Optional[float] = None  # the final distillation's lr (null: lr)
    final_warmup_steps: Optional[int] = None  # the final distillation's warm-up (null: warmup_steps)


@dataclass
class TrainerConfig:
    prune_steps: int = 50000  # steps under the size target, then the cut
    final_steps: int = 25000  # steps distilling the cut model
    grad_accum: int = 1  # batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16 | fp16 (mixed precision autocast; fp16 on CUDA only)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # data order, crops, gate noise
    threads: Optional[int] = None  # torch CPU threads
    log_every: int = 50  # a log line (and TensorBoard scalars) every this many steps
    valid_every: int = 0  # 0: only at the end of each stage
    ckpt_every: int = 1000  # checkpoint every this many steps
    keep_last: int = 3  # checkpoints kept
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    latency_seconds: float = 4.0  # utterance length for the report's CPU latency


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # event files in RUN_DIR/tensorboard
    progress: bool = True  # a progress bar when the output is a terminal


@dataclass
class ProbeConfig:
    corpus: Optional[str] = None  # folder like data/demo_corpus: the report gets phone error rates
    steps: int = 1000  # probe training steps (per model)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])  # one probe per seed; the report gives the mean


# ------------------------------------------------------------------------------ tasks (#16)
TASK_KINDS = ("none", "ctc", "classify")


@dataclass
class TaskConfig:
    kind: str = "none"  # none (distillation alone) | ctc | classify: set by the task group (task=ctc)
    labels: Optional[str] = None  # TSV keyed by utterance id (header: id + label columns), e.g. transcripts.tsv
    column: str = "phones"  # the label column (demo corpus: phones | text | voice)
    tokens: str = "spaces"  # ctc: how a label splits into tokens: spaces | chars
    layer: Optional[int] = None  # the head's hidden state; null: a learned softmax-weighted sum of all (SUPERB)
    pooling: str = "mean"  # classify: mean | attentive pooling over the valid frames
    weight: float = 1.0  # loss = task.weight x task loss + distill.weight x distillation (+ Lagrangian)
    lr: Optional[float] = None  # the head's lr (a fresh head learns faster than the encoder should); null: optim.lr
    freeze_extractor: bool = False  # the conv feature extractor is not trained (wav2vec 2.0 fine-tuning)
    # DiariZen's order: first fine-tune the unpruned teacher on the task alone for this many steps (stage
    # "teacher"); it then is the frozen distillation teacher and the gated student's start. 0: no such stage
    finetune_teacher_steps: int = 0


@dataclass
class TrainConfig:
    name: str = "run"  # the run directory is outputs/NAME/DATE_TIME (or hydra.run.dir=PATH)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


def register_schema(name: str, schema_class: type) -> None:
    """``schema_class``'s defaults as the config ``name`` in Hydra's config store. A root config
    (configs/train.yaml) starts its defaults list from it, so every default is written once, in the
    dataclass, and the YAML files state only what differs. Stored as a plain dict, not the dataclass:
    ``typed`` checks the types, in one line naming the key, where Hydra's check at composition would
    print its own multi-line error."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=OmegaConf.to_container(OmegaConf.structured(schema_class)))


register_schema("train_schema", TrainConfig)


def typed(cfg: Any, schema_class: type = None) -> DictConfig:
    """Merge a composed config onto the schema (``TrainConfig`` unless another is given):
    unknown keys and wrong types raise ConfigError."""
    if isinstance(cfg, DictConfig):  # without the hydra node: its run-time values are unset outside a run
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    plain = {k: v for k, v in plain.items() if k != "hydra"}
    plain.pop("recipe", None)
    schema = OmegaConf.structured(schema_class or TrainConfig)
    try:
        merged = OmegaConf.merge(schema, plain)
    except OmegaConfBaseException as e:
        key = _failing_key(schema, plain) or getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    OmegaConf.set_readonly(merged, True)
    return merged


def _failing_key(schema: DictConfig, plain: Dict[str, Any]) -> Optional[str]:
    """The dotted key whose value the schema rejects: OmegaConf names a list element's index
    alone ("1: Invalid value"), so merge one key at a time to find it."""
    for section, values in plain.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            try:
                OmegaConf.merge(schema, {section: {key: value}})
            except OmegaConfBaseException:
                return f"{section}.{key}"
    return None


def check_run_dir(run_dir: Path) -> None:
    """The run directory, or the nearest folder above it that exists, must be a folder that
    takes new folders: tried with a temporary one (root passes ``os.access`` everywhere, and
    pseudo-filesystems such as /proc and /sys refuse ``mkdir`` whatever the permissions say)."""
    ancestor = Path(run_dir)
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise ConfigError(f"run directory: {run_dir} is not writable ({ancestor} is not a writable folder)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".prune-write-check-", dir=ancestor))
    except OSError as e:
        raise ConfigError(f"run directory: {run_dir} cannot be made: {ancestor} does not take new folders "
                          f"({e.strerror}); choose a folder on a regular disk with hydra.run.dir=PATH") from None


PATH_KEYS = ("teacher.checkpoint", "data.train_manifest", "data.valid_manifest", "probe.corpus",
             "pruning.latency_table", "task.labels")


def absolute_paths(cfg: DictConfig, keys: Tuple[str, ...] = PATH_KEYS) -> DictConfig:
    """``cfg`` with every path key made absolute (against the current directory), so that the
    config recorded in config.yaml, the checkpoints and the export works from any folder."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key, value in path_values(plain, keys).items():
        section, name = key.split(".")
        plain[section][name] = os.path.abspath(os.path.expanduser(value))
    return typed(plain, OmegaConf.get_type(cfg))


def path_values(plain: Dict[str, Any], keys: Tuple[str, ...] = PATH_KEYS) -> Dict[str, str]:
    """The set (non-null) path keys of a plain config: dotted key -> path."""
    found = {}
    for key in keys:
        section, name = key.split(".")
        value = (plain.get(section) or {}).get(name)
        if value is not None:
            found[key] = str(value)
    return found


def check_manifests(d: DictConfig) -> None:
    """The ``data`` section's manifests exist (the valid one may be null) and are files."""
    from ..data.manifest import folder_not_manifest

    for key in ("train_manifest", "valid_manifest"):
        if d[key] is None:
            continue
        if Path(d[key]).is_dir():
            raise ConfigError(f"data.{key}: {folder_not_manifest(d[key])}")
        if not Path(d[key]).is_file():
            raise ConfigError(f"data.{key}: {d[key]} does not exist")


def check_probe(probe: DictConfig) -> None:
    """The ``probe`` section (``ProbeConfig``)."""
    if probe.corpus is not None and not (Path(probe.corpus) / "transcripts.tsv").is_file():
        raise ConfigError(f"probe.corpus: {probe.corpus} has no transcripts.tsv (see data/demo_corpus)")
    if probe.steps < 1:
        raise ConfigError(f"probe.steps: must be >= 1, got {probe.steps}")
    if "seeds" in probe and not probe.seeds:
        raise ConfigError("probe.seeds: give at least one seed, e.g. probe.seeds=[0,1,2]")


def check_optim(o: DictConfig, lrs: Tuple[str, ...]) -> None:
    """The ``optim`` section of any recipe: learning rates ``lrs``, AdamW's betas and weight decay,
    the warm-up, the gradient clip."""
    for key in (*lrs, "weight_decay"):
        if not (math.isfinite(o[key]) and o[key] >= 0):
            raise ConfigError(f"optim.{key}: must be a finite number >= 0, got {o[key]}")
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {list(o.betas)}")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps: must be >= 0, got {o.warmup_steps}")
    if o.clip_grad_norm is not None and not (math.isfinite(o.clip_grad_norm) and o.clip_grad_norm > 0):
        raise ConfigError(f"optim.clip_grad_norm: must be a positive number or null, got {o.clip_grad_norm}")


def measure_settings(p: Any, threads: Optional[int] = None, teacher: Optional[EncoderConfig] = None,
                     check: bool = True, key: str = "target_kind") -> Dict[str, Any]:
    """What the measure ``pruning.<key>`` (``target_kind``, or ``cut_target_kind``) needs
    (``prune.measures.Need``: a latency table), loaded from its ``pruning.*`` key and, with
    ``check``, checked against ``trainer.threads`` (``threads``) and the teacher (None: not known
    yet); ConfigError naming the key."""
    measure = measures.MEASURES.get(p.get(key) if hasattr(p, "get") else p[key])
    settings: Dict[str, Any] = {}
    for need in () if measure is None else measure.needs:
        value = p.get(need.key) if hasattr(p, "get") else None
        if value is None:
            raise ConfigError(f"pruning.{need.key}: pruning.{key}={measure.name} needs it; {need.hint}")
        try:
            settings[need.name] = need.load(value)
            if check:
                need.check(settings[need.name], teacher, threads)
        except ValueError as e:
            raise ConfigError(f"pruning.{need.key}: {e}") from None
    return settings


def check_target(p: DictConfig, teacher: Optional[EncoderConfig], threads: Optional[int] = None) -> None:
    """``pruning.target_kind`` names a registered size measure and ``pruning.target`` reads for it
    (``teacher``: the unpruned architecture, None while it is not known before the checkpoint is
    loaded; ``threads``: trainer.threads, which a latency table must have been made with)."""
    measure = measures.MEASURES.get(p.target_kind)
    if measure is None:
        raise ConfigError(f"pruning.target_kind: must be one of {measures.names()}, got {p.target_kind!r}")
    if not (isinstance(p.macs_seconds, (int, float)) and math.isfinite(p.macs_seconds) and p.macs_seconds > 0):
        raise ConfigError(f"pruning.macs_seconds: the utterance length the MACs are counted on must be a "
                          f"positive number of seconds, got {p.macs_seconds}")
    measure = measure.bind(measure_settings(p, threads, teacher))
    try:
        measure.check_target(p.target, None if teacher is None else measure.size_of(teacher, p.macs_seconds))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    kind = p.get("cut_target_kind")
    if kind is not None:  # the cut's own measure: its needs (a latency table) and its target, before compute
        cut = measures.MEASURES.get(kind)
        if cut is None:
            raise ConfigError(f"pruning.cut_target_kind: must be null or one of {measures.names()}, got {kind!r}")
        cut = cut.bind(measure_settings(p, threads, teacher, key="cut_target_kind"))
        target = p.target if p.get("cut_target") is None else p.cut_target
        try:
            cut.check_target(target, None if teacher is None else cut.size_of(teacher, p.macs_seconds))
        except ValueError as e:
            raise ConfigError(str(e).replace("pruning.target_kind", "pruning.cut_target_kind").replace(
                "pruning.target:", "pruning.cut_target:")) from None
    elif p.get("cut_target") is not None:
        raise ConfigError(f"pruning.cut_target: {p.cut_target} given without pruning.cut_target_kind; set "
                          f"pruning.cut_target_kind too (e.g. latency) or drop cut_target")
    for key, what in (("latency_refine", "timing rounds at the cut"),
                      ("latency_processes", "fresh processes per latency timing; 0: this one")):
        value = p.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"pruning.{key}: must be a whole number >= 0 ({what}), got {value!r}")


def check_shape_config(p: DictConfig, teacher: Optional[EncoderConfig]) -> None:
    """``pruning.uniform``, ``pruning.shape`` and ``pruning.round_to`` (``teacher``: the unpruned
    architecture, None while unknown: then the shape is checked once the teacher is loaded)."""
    from ..shape import Shape, check_shape

    if not isinstance(p.get("uniform", False), bool):
        raise ConfigError(f"pruning.uniform: must be true or false, got {p.uniform!r}")
    round_to = p.get("round_to", 1)
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ConfigError(f"pruning.round_to: must be a whole number >= 1, got {round_to!r}")
    gates = p.get("gates") or {}
    dims = [k for k in ("head_qk_dims", "head_v_dims") if gates.get(k, False)]
    if p.get("uniform", False) and dims:  # transformers holds only head_dim = hidden / heads
        raise ConfigError(f"pruning.gates.{dims[0]}=true: a uniform run keeps transformers' head width "
                          f"(hidden / heads); drop pruning.uniform=true or set pruning.gates.{dims[0]}=false")
    shape = Shape.from_config(p.get("shape"))
    if shape.given() and not p.get("uniform", False):
        raise ConfigError("pruning.shape: an explicit shape is a uniform one (the same count in every layer); "
                          "add pruning.uniform=true")
    if teacher is not None:
        try:
            check_shape(shape, teacher, GateConfig(**p.gates), bool(p.get("uniform", False)), round_to)
        except ValueError as e:
            raise ConfigError(str(e)) from None


# The Lagrangian raises the size target over pruning.warmup_steps and needs about a third of the
# pruning stage at the full target to settle on it; otherwise the cut, not the training, sets the
# size (a short run with the default 5000-step warm-up kept 1 head per layer). An lr warm-up longer
# than half its stage leaves the schedule mostly warming up.
PRUNE_WARMUP_FRACTION = 2 / 3  # of trainer.prune_steps
LR_WARMUP_FRACTION = 1 / 2  # of the stage's steps


def check_warmups(cfg: DictConfig) -> None:
    """The warm-ups fit the steps of each stage that has steps: pruning.warmup_steps leaves a third
    of trainer.prune_steps at the full target, each lr warm-up takes at most half of its stage.
    Every mismatch goes into the one error, so one fix of the command line is enough."""
    p, o, tr = cfg.pruning, cfg.optim, cfg.trainer
    problems: List[str] = []
    n, w = tr.prune_steps, p.warmup_steps
    if n > 0 and w > n * PRUNE_WARMUP_FRACTION:
        reach = (f"the size target would only rise to {n / w:.0%} of its final value" if w > n
                 else f"only {n - w} steps would be at the full target")
        problems.append(f"pruning.warmup_steps={w} is too long for trainer.prune_steps={n}: {reach}, and the cut "
                        f"would have to make up the rest; use pruning.warmup_steps<={int(n * PRUNE_WARMUP_FRACTION)}"
                        f" or trainer.prune_steps>={math.ceil(w / PRUNE_WARMUP_FRACTION)}")
    if n > 0 and o.warmup_steps > n * LR_WARMUP_FRACTION:
        problems.append(f"optim.warmup_steps={o.warmup_steps} is more than half of trainer.prune_steps={n}: the lr "
                        f"would spend the pruning stage warming up; use optim.warmup_steps<={n // 2}")
    m, own = tr.final_steps, o.get("final_warmup_steps")
    final_warmup = o.warmup_steps if own is None else own
    if m > 0 and final_warmup > m * LR_WARMUP_FRACTION:
        which = (f"optim.final_warmup_steps={own}" if own is not None else
                 f"optim.warmup_steps={final_warmup} (optim.final_warmup_steps=null takes it)")
        problems.append(f"{which} is more than half of trainer.final_steps={m}: the final stage's lr would spend "
                        f"it warming up; use optim.final_warmup_steps<={m // 2}")
    if problems:
        raise ConfigError("; ".join(problems))


def validate(cfg: DictConfig, run_dir: Optional[Path] = None) -> None:
    """Checks that need no compute: ranges, names, paths."""
    t, p, d, o, tr = cfg.teacher, cfg.pruning, cfg.data, cfg.optim, cfg.trainer
    if t.checkpoint is None:
        if t.preset not in PRESETS:
            raise ConfigError(f"teacher.preset: unknown preset {t.preset!r}; choose from {sorted(PRESETS)}")
        check_random_teacher(t)
        try:
            num_layers = preset_config(t.preset, **t.overrides).encoder_num_layers
        except (TypeError, ValueError) as e:  # an unknown or invalid EncoderConfig field
            raise ConfigError(f"teacher.overrides: {e}") from None
    else:
        if not Path(t.checkpoint).exists():
            raise ConfigError(f"teacher.checkpoint: {t.checkpoint} does not exist")
        if t.random_init:
            raise ConfigError(f"teacher.random_init: true, but teacher.checkpoint={t.checkpoint} is given; "
                              f"drop one of them")
        num_layers = None  # known once loaded
    check_target(p, preset_config(t.preset, **t.overrides) if t.checkpoint is None else None, tr.threads)
    check_shape_config(p, preset_config(t.preset, **t.overrides) if t.checkpoint is None else None)
    if not 0.0 <= p.skip_min_closed <= 1.0:
        raise ConfigError(f"pruning.skip_min_closed: must be in [0, 1], got {p.skip_min_closed}")
    if not 0.0 < p.tolerance < 0.5:
        raise ConfigError(f"pruning.tolerance: must be in (0, 0.5), got {p.tolerance}")
    if not (math.isfinite(p.max_cut_shift) and p.tolerance <= p.max_cut_shift <= 1.0):
        raise ConfigError(f"pruning.max_cut_shift: must be in [pruning.tolerance={p.tolerance}, 1], "
                          f"got {p.max_cut_shift}")
    check_manifests(d)
    if d.max_samples < d.min_samples:
        raise ConfigError(f"data.max_samples: {d.max_samples} is below data.min_samples ({d.min_samples})")
    if d.batch_size < 1:
        raise ConfigError(f"data.batch_size: must be at least 1, got {d.batch_size}")
    layers = [layer for group in cfg.distill.layers for layer in group] if distills(cfg) else [0]
    if not layers:
        raise ConfigError("distill.layers: no layer to distill")
    if min(layers) < 0:  # hiddens[-1] would silently mean the last layer
        raise ConfigError(f"distill.layers: {list(map(list, cfg.distill.layers))} has the negative layer "
                          f"{min(layers)}; give hidden-state indices from 0 (before the first transformer layer) "
                          f"to the teacher's number of layers (the last one), not counted from the end")
    if num_layers is not None and not all(0 <= layer <= num_layers for layer in layers):
        raise ConfigError(f"distill.layers: {list(map(list, cfg.distill.layers))} must lie in [0, {num_layers}] "
                          f"for a {num_layers}-layer teacher")
    if cfg.distill.mode not in MODES:
        raise ConfigError(f"distill.mode: must be one of {MODES}, got {cfg.distill.mode!r}")
    if cfg.distill.cos_type not in COS_TYPES:
        raise ConfigError(f"distill.cos_type: must be one of {COS_TYPES}, got {cfg.distill.cos_type!r}")
    if cfg.distill.reduction not in REDUCTIONS:
        raise ConfigError(f"distill.reduction: must be one of {REDUCTIONS}, got {cfg.distill.reduction!r}")
    if cfg.distill.layer0 not in LAYER0:
        raise ConfigError(f"distill.layer0: must be one of {LAYER0}, got {cfg.distill.layer0!r}")
    check_optim(o, ("lr", "gate_lr", "lambda_lr"))
    if o.gate_lr_schedule not in GATE_LR_SCHEDULES:
        raise ConfigError(f"optim.gate_lr_schedule: must be one of {GATE_LR_SCHEDULES}, got {o.gate_lr_schedule!r}")
    if o.final_lr is not None and not (math.isfinite(o.final_lr) and o.final_lr >= 0):
        raise ConfigError(f"optim.final_lr: must be a finite number >= 0 or null, got {o.final_lr}")
    if o.final_warmup_steps is not None and o.final_warmup_steps < 0:
        raise ConfigError(f"optim.final_warmup_steps: must be >= 0 or null, got {o.final_warmup_steps}")
    if p.warmup_steps < 0:
        raise ConfigError(f"pruning.warmup_steps: must be >= 0, got {p.warmup_steps}")
    g = p.gates
    for key in ("init_mean", "ffn_units_init_mean"):
        if not 0.0 < g[key] < 1.0:
            raise ConfigError(f"pruning.gates.{key}: an initial drop rate must be in (0, 1), got {g[key]}")
    if not (math.isfinite(g.init_std) and g.init_std >= 0):
        raise ConfigError(f"pruning.gates.init_std: must be a finite number >= 0, got {g.init_std}")
    if tr.threads is not None and tr.threads < 1:
        raise ConfigError(f"trainer.threads: must be >= 1 or null, got {tr.threads}")
    if not (math.isfinite(tr.latency_seconds) and tr.latency_seconds >= 0.025):
        raise ConfigError(f"trainer.latency_seconds: must be at least one frame (0.025 s), got {tr.latency_seconds}")
    if tr.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision: must be one of {PRECISIONS}, got {tr.precision!r}")
    if tr.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"trainer.device: must be auto, cpu or cuda, got {tr.device!r}")
    for key in ("prune_steps", "final_steps"):
        if tr[key] < 0:
            raise ConfigError(f"trainer.{key}: must be >= 0, got {tr[key]}")
    for key in ("grad_accum", "ckpt_every", "keep_last", "log_every", "max_nonfinite"):
        if tr[key] < 1:
            raise ConfigError(f"trainer.{key}: must be >= 1, got {tr[key]}")
    check_warmups(cfg)
    check_augment(d)
    check_probe(cfg.probe)
    check_task(cfg, num_layers)
    if run_dir is not None:
        check_run_dir(run_dir)


def distills(cfg: DictConfig) -> bool:
    """Whether the run distils from the teacher (distill.weight > 0; always with task: none)."""
    return cfg.task.kind == "none" or cfg.distill.weight > 0


def check_task(cfg: DictConfig, num_layers: Optional[int]) -> None:
    """The ``task`` section and the weights of the loss (``TaskConfig``); the label file's content
    is checked when the manifests are read (``prune.train.task.load_targets``), still before compute."""
    from .task import POOLINGS
    from ..data.labels import TOKENS

    t, d = cfg.task, cfg.distill
    if t.kind not in TASK_KINDS:
        raise ConfigError(f"task.kind: must be one of {TASK_KINDS} (task=ctc selects configs/task/ctc.yaml), "
                          f"got {t.kind!r}")
    for key, w in (("task.weight", t.weight), ("distill.weight", d.weight)):
        if not (math.isfinite(w) and w >= 0):
            raise ConfigError(f"{key}: must be a finite number >= 0, got {w}")
    if t.kind == "none":
        if d.weight == 0:
            raise ConfigError("distill.weight: 0 with task: none leaves nothing to train on; give a task "
                              "(task=ctc task.labels=FILE) or a distill.weight above 0")
        if not cfg.pruning.enabled:
            raise ConfigError("pruning.enabled: false trains the model as it is, which needs a task "
                              "(task=ctc or task=classify, task.labels=FILE)")
    else:
        if t.weight == 0 and d.weight == 0:
            raise ConfigError("task.weight and distill.weight: both are 0, so the loss is 0; give one of them "
                              "a weight above 0")
        if t.labels is None:
            raise ConfigError(f"task.labels: task {t.kind} needs a label file, a TSV keyed by utterance id "
                              f"(e.g. task.labels=data/demo_corpus/transcripts.tsv)")
        if not Path(t.labels).is_file():
            raise ConfigError(f"task.labels: {t.labels} does not exist")
        if t.lr is not None and not (math.isfinite(t.lr) and t.lr > 0):
            raise ConfigError(f"task.lr: must be a positive number or null (optim.lr), got {t.lr}")
        if t.tokens not in TOKENS:
            raise ConfigError(f"task.tokens: must be one of {TOKENS}, got {t.tokens!r}")
        if t.pooling not in POOLINGS:
            raise ConfigError(f"task.pooling: must be one of {POOLINGS}, got {t.pooling!r}")
        if t.layer is not None and (t.layer < 0 or (num_layers is not None and t.layer > num_layers)):
            top = "the teacher's number of layers" if num_layers is None else str(num_layers)
            raise ConfigError(f"task.layer: must be a hidden-state index from 0 to {top}, or null (all "
                              f"layers, weighted), got {t.layer}")
    n = t.finetune_teacher_steps
    if n < 0:
        raise ConfigError(f"task.finetune_teacher_steps: must be >= 0, got {n}")
    if n > 0 and t.kind == "none":
        raise ConfigError(f"task.finetune_teacher_steps: {n} fine-tunes the teacher on a task, but task: none has "
                          f"none; give task=ctc or task=classify with task.labels=FILE, or 0")
    if n > 0 and not cfg.pruning.enabled:
        raise ConfigError(f"task.finetune_teacher_steps: {n}, but pruning.enabled: false already fine-tunes the "
                          f"model itself (prune finetune); give 0")
    if n > 0 and cfg.optim.warmup_steps > n * LR_WARMUP_FRACTION:
        raise ConfigError(f"task.finetune_teacher_steps={n}: the teacher stage warms its lr up over optim.warmup_steps="
                          f"{cfg.optim.warmup_steps}, more than half of it; use task.finetune_teacher_steps>="
                          f"{2 * cfg.optim.warmup_steps} or optim.warmup_steps<={n // 2}")
    if not cfg.pruning.enabled and cfg.trainer.prune_steps != 0:
        raise ConfigError(f"pruning.enabled: false (no pruning), but trainer.prune_steps={cfg.trainer.prune_steps}; "
                          f"give trainer.prune_steps=0 (the run is trainer.final_steps of training)")


def check_augment(d: DictConfig) -> None:
    """``data.augment``: probabilities in [0, 1], ranges [lo, hi] with lo <= hi (RT60 above 0)."""
    a = d.augment
    for key in ("noise_prob", "reverb_prob"):
        if not (math.isfinite(a[key]) and 0.0 <= a[key] <= 1.0):
            raise ConfigError(f"data.augment.{key}: a probability must be in [0, 1], got {a[key]}")
    for key, unit in (("snr_db", "dB"), ("rt60", "s")):
        r = list(a[key])
        if len(r) != 2 or not all(math.isfinite(x) for x in r) or r[0] > r[1]:
            raise ConfigError(f"data.augment.{key}: must be a range [lo, hi] in {unit} with lo <= hi, got {r}")
    if a.rt60[0] <= 0:
        raise ConfigError(f"data.augment.rt60: a reverberation time must be above 0 s, got {list(a.rt60)}")


def check_random_teacher(t: DictConfig) -> None:
    """A teacher with random weights prunes noise into noise: fine for the tiny test presets, but a
    full-size one (hours of compute for nothing) must be asked for with teacher.random_init=true."""
    if t.checkpoint is None and not t.random_init and not t.preset.endswith("_tiny"):
        raise ConfigError(f"teacher.checkpoint: not given, so the teacher would be teacher.preset={t.preset} with "
                          f"random weights; give teacher.checkpoint=PATH (a Hugging Face folder, fairseq .pt, "
                          f"torchaudio state dict or prune export), or teacher.random_init=true to prune a "
                          f"random-weight teacher on purpose")


def compose_raw(recipe: str, overrides: Optional[List[str]] = None, hydra_config: bool = False,
                package: str = "prune.recipes", schema: Optional[type] = None) -> DictConfig:
    """Hydra's composition of ``prune train RECIPE OVERRIDES...`` (the recipes of ``package``;
    ``prune.recipes.pretrain`` with ``PretrainConfig`` for ``prune pretrain``), untyped, with the
    ``hydra`` node when ``hydra_config``. Overrides are checked against the schema first."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from .overrides import check_overrides, config_groups

    command = "train" if package == "prune.recipes" else "pretrain"
    check_overrides(overrides or [], schema or TrainConfig, config_groups(CONFIG_PACKAGES[command]), command=command)
    with initialize_config_module(config_module=package, version_base="1.3"):
        return hydra_compose(config_name=recipe, return_hydra_config=hydra_config,
                             overrides=[searchpath(command), *(overrides or [])])


CONFIG_PACKAGES = {"train": "prune.configs", "pretrain": "prune.configs.pretrain"}  # command -> its config groups


def searchpath(command: str) -> str:
    """The override that lets ``command``'s recipes find their root config and config groups."""
    return f"hydra.searchpath=[pkg://{CONFIG_PACKAGES[command]}]"


def compose(recipe: str = "default", overrides: Optional[List[str]] = None) -> DictConfig:
    """The typed config ``prune train RECIPE OVERRIDES...`` would run (Hydra's compose API)."""
    return typed(compose_raw(recipe, overrides))
