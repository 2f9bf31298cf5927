"""DPHuBERT's own code side by side with prune, on one prune recipe's problem.

    python scripts/compare_dphubert.py --dphubert CHECKOUT [--recipe demo] [--seeds 0 1 2]
        [--probe-seeds 0 1 2] [--out outputs/compare_dphubert] [--dphubert-batches crop|pad]
        [--skip-prune | --skip-dphubert] [key=value ...]

CHECKOUT is a checkout of https://github.com/pyf98/DPHuBERT. Its model and training code run from
there (never copied in), driven without Lightning on the recipe's teacher, data and budget:

1. the teacher (a prune checkpoint) is converted to DPHuBERT's checkpoint layout, and DPHuBERT's model
   must reproduce prune's hidden states (within 1e-5 relative, on a padded batch) before anything runs;
2. per training seed, ``distill.py``'s student and ``lightning.py``'s ``DistillModule`` (its
   ``_step``, ``configure_optimizers``, ``DistillLoss``, ``LinearDecayLRScheduler``) train for
   ``trainer.prune_steps``; ``prune.py``'s ``prune_from_ckpt`` cuts the model; ``final_distill.py``'s
   stage runs ``trainer.final_steps`` more;
3. per training seed, ``prune train RECIPE`` runs as a subprocess on the same data;
4. the teacher and every pruned model get prune's phone probe (the recipe's ``probe.corpus`` and
   ``probe.steps``) once per probe seed; the table goes to OUT/compare.md and OUT/compare.json.

key=value arguments (anywhere on the line) are prune overrides, applied to both sides. A second
run into the same OUT reuses finished trainings and probe results. See docs/dphubert_comparison.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import statistics
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from prune.models import EncoderConfig, Wav2Vec2Model
from prune.train.config import ConfigError, check_run_dir, compose, validate
from prune.data.dataset import Batch, collate
from prune.train.distributed import DistEnv
from prune.evaluate.probe import corpus_features, encoder_layers, fit_probe
from prune.train.recipe import PruneRecipe
from prune.train.resume import _diff
from prune.train.student import load_teacher

log = logging.getLogger("compare_dphubert")

DPBatch = Tuple[Tensor, Tensor]  # DPHuBERT's collate: waveforms (batch, samples), lengths (batch,)
PARITY_RTOL = 1e-5


class CompareError(Exception):
    """Bad input or a failed check: one line saying what, where and what to do."""


# ------------------------------------------------------------------------ DPHuBERT's code
CHECKOUT_FILES = ("wav2vec2/__init__.py", "wav2vec2/model.py", "wav2vec2/components.py",
                  "wav2vec2/hardconcrete.py", "wav2vec2/pruning_utils.py", "dataset/audio_dataset.py",
                  "lightning.py", "distill.py", "prune.py")
# names the checkout's files import, or that we load them under; present in sys.modules only while loading
_LOAD_NAMES = ("pytorch_lightning", "lightning_lite", "torchaudio", "wav2vec2", "dataset", "lightning",
               "dphubert_distill", "dphubert_prune")


class _LightningModule(nn.Module):
    """What ``DistillModule`` needs of ``pl.LightningModule``: an ``nn.Module`` with a settable
    ``global_step`` (the driver sets it, as Lightning's trainer would) and ``log`` / ``log_dict``,
    which keep the last values in ``logged`` for our records instead of a logger."""

    def __init__(self) -> None:
        super().__init__()
        self.global_step = 0
        self.current_epoch = 0
        self.logged: Dict[str, float] = {}

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        self.logged[name] = value.detach() if torch.is_tensor(value) else value

    def log_dict(self, values: Dict[str, Any], *args: Any, **kwargs: Any) -> None:
        for name, value in values.items():
            self.log(name, value)


class _NotAvailable:
    """Lightning's callbacks and trainer: imported by ``distill.py``, never used here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Lightning is not installed: compare_dphubert drives DPHuBERT's module itself")


def _stand_in_modules() -> Dict[str, types.ModuleType]:
    """Minimal modules for what the checkout imports at import time and we do not run: Lightning
    (the training wrapper) and torchaudio (only ``AudioDataset._load_audio`` uses it)."""
    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = _LightningModule
    callbacks = types.ModuleType("pytorch_lightning.callbacks")
    callbacks.ModelCheckpoint = callbacks.LearningRateMonitor = _NotAvailable
    pl.Trainer, pl.callbacks = _NotAvailable, callbacks
    rank_zero = types.ModuleType("lightning_lite.utilities.rank_zero")
    rank_zero._get_rank = lambda: 0
    torchaudio = types.ModuleType("torchaudio")

    def load(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("torchaudio is not installed: audio is read by prune's data pipeline")

    torchaudio.load = load
    return {"pytorch_lightning": pl, "pytorch_lightning.callbacks": callbacks,
            "lightning_lite": types.ModuleType("lightning_lite"),
            "lightning_lite.utilities": types.ModuleType("lightning_lite.utilities"),
            "lightning_lite.utilities.rank_zero": rank_zero, "torchaudio": torchaudio}


def _load_file(name: str, path: Path, package: bool = False) -> types.ModuleType:
    """Import ``path`` as module ``name`` by its location: the checkout never goes on sys.path,
    where its top-level ``prune.py`` would shadow our ``prune`` package."""
    spec = importlib.util.spec_from_file_location(name, path,
                                                  submodule_search_locations=[str(path.parent)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _DropVerbose(torch.optim.lr_scheduler.LRScheduler):
    """torch >= 2.7 schedulers take no ``verbose`` argument; DPHuBERT's passes ``verbose=False``."""

    def __init__(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1, verbose: bool = False) -> None:
        super().__init__(optimizer, last_epoch=last_epoch)


def _tolerant_scheduler(scheduler_class: type) -> type:
    """``scheduler_class`` unchanged (its ``__init__`` and ``get_lr``), with ``_DropVerbose`` placed
    before ``LRScheduler`` in its MRO so that its ``super().__init__(..., verbose=verbose)`` works."""
    if "verbose" not in torch.optim.lr_scheduler.LRScheduler.__init__.__code__.co_varnames:
        return type(scheduler_class.__name__, (scheduler_class, _DropVerbose), {})
    return scheduler_class


def checkout_digest(checkout: Path) -> str:
    """sha256 of the checkout files this script runs: which DPHuBERT code a result came from."""
    h = hashlib.sha256()
    for rel in CHECKOUT_FILES:
        h.update(rel.encode() + b"\0" + (checkout / rel).read_bytes())
    return h.hexdigest()


def check_checkout(checkout: Path) -> None:
    missing = [rel for rel in CHECKOUT_FILES if not (checkout / rel).is_file()]
    if missing:
        raise CompareError(f"--dphubert: {checkout} is not a checkout of pyf98/DPHuBERT (no {', '.join(missing[:3])}); "
                           f"clone https://github.com/pyf98/DPHuBERT and pass its folder")


def load_dphubert(checkout: Path) -> types.SimpleNamespace:
    """DPHuBERT's modules from ``checkout``: ``model`` (wav2vec2/model.py), ``lightning``,
    ``distill``, ``prune`` (its prune.py) and ``audio`` (dataset/audio_dataset.py).

    The names they import (``wav2vec2``, ``dataset``, ``lightning``, Lightning's and torchaudio's)
    are in sys.modules only while loading; whatever was there before is put back after."""
    checkout = Path(checkout).resolve()
    check_checkout(checkout)
    before = dict(sys.modules)
    try:
        sys.modules.update(_stand_in_modules())
        _load_file("wav2vec2", checkout / "wav2vec2" / "__init__.py", package=True)
        _load_file("dataset", checkout / "dataset" / "__init__.py", package=True)
        model = importlib.import_module("wav2vec2.model")
        audio = importlib.import_module("dataset.audio_dataset")
        lightning = _load_file("lightning", checkout / "lightning.py")
        distill = _load_file("dphubert_distill", checkout / "distill.py")
        prune_py = _load_file("dphubert_prune", checkout / "prune.py")
    finally:
        for name in list(sys.modules):
            if name.split(".")[0] in _LOAD_NAMES and sys.modules[name] is not before.get(name):
                if name in before:
                    sys.modules[name] = before[name]
                else:
                    del sys.modules[name]
    # configure_optimizers looks the scheduler up in its module's globals
    lightning.LinearDecayLRScheduler = _tolerant_scheduler(lightning.LinearDecayLRScheduler)
    return types.SimpleNamespace(model=model, lightning=lightning, distill=distill, prune=prune_py, audio=audio,
                                 checkout=checkout)


# --------------------------------------------------------------------- teacher conversion
DUMMY_WEIGHT = "feature_extractor.dummy_weight"  # DPHuBERT's soft mask of the last conv layer's channels
PRUNE_FLAGS = ("extractor_prune_conv_channels", "encoder_prune_attention_heads", "encoder_prune_attention_layer",
               "encoder_prune_feed_forward_intermediate", "encoder_prune_feed_forward_layer")
# distill.py's --pruning_units, from the recipe's pruning.gates
PRUNING_UNITS = {"conv_channels": "conv", "attention_heads": "head", "attention_layers": "attlayer",
                 "ffn_units": "interm", "ffn_layers": "ffnlayer"}
UNIT_FLAGS = dict(zip(("conv", "head", "attlayer", "interm", "ffnlayer"), PRUNE_FLAGS))
DISTILL_MODES = {"layer2layer": "layer2layer", "prediction": "predlayer"}  # prune's name -> DPHuBERT's


def dphubert_config(config: EncoderConfig) -> Dict[str, Any]:
    """Keyword arguments of DPHuBERT's ``wav2vec2_model`` for an unpruned HuBERT / wav2vec 2.0 encoder."""
    if config.is_wavlm:
        raise CompareError("teacher: a WavLM teacher is not supported (DPHuBERT's wavlm_model takes another "
                           "config); use a HuBERT or wav2vec 2.0 teacher")
    convs = [c[0] for c in config.extractor_conv_layer_config]
    unpruned = (config.extractor_norm_channels == convs and all(config.encoder_attention_kept)
                and all(config.encoder_ff_kept) and min(config.encoder_num_heads) > 0
                and min(config.encoder_ff_interm_features) > 0)
    if not unpruned:
        raise CompareError("teacher: the teacher is itself pruned; DPHuBERT starts from an unpruned encoder")
    if config.layer_norm_eps != 1e-5:
        raise CompareError(f"teacher: layer_norm_eps={config.layer_norm_eps}, DPHuBERT's model has 1e-5 throughout")
    n = config.encoder_num_layers
    return {
        "extractor_mode": config.extractor_mode,
        "extractor_conv_layer_config": [tuple(c) for c in config.extractor_conv_layer_config],
        "extractor_conv_bias": config.extractor_conv_bias,
        "encoder_embed_dim": config.encoder_embed_dim,
        "encoder_projection_dropout": config.encoder_projection_dropout,
        "encoder_pos_conv_kernel": config.encoder_pos_conv_kernel,
        "encoder_pos_conv_groups": config.encoder_pos_conv_groups,
        "encoder_num_layers": n,
        "encoder_use_attention": [True] * n,
        "encoder_use_feed_forward": [True] * n,
        "encoder_num_heads": list(config.encoder_num_heads),
        "encoder_head_dim": config.encoder_head_dim,
        "encoder_attention_dropout": config.encoder_attention_dropout,
        "encoder_ff_interm_features": list(config.encoder_ff_interm_features),
        "encoder_ff_interm_dropout": config.encoder_ff_interm_dropout,
        "encoder_dropout": config.encoder_dropout,
        "encoder_layer_norm_first": config.encoder_layer_norm_first,
        "encoder_layer_drop": config.encoder_layer_drop,
        "aux_num_out": None,
        "normalize_waveform": config.normalize_waveform,  # both normalise as fairseq does (eps 1e-5)
        **{flag: False for flag in PRUNE_FLAGS},
    }


def dphubert_checkpoint(dp: types.SimpleNamespace, teacher: Wav2Vec2Model) -> Dict[str, Any]:
    """prune's teacher as DPHuBERT's checkpoint, ``{"config", "state_dict"}`` (what its
    convert_*.py scripts write). Parameter names follow torchaudio's on both sides; every key
    must find its counterpart, with the same shape."""
    config = dphubert_config(teacher.config)
    expected = dp.model.wav2vec2_model(**config).state_dict()
    ours = teacher.state_dict()
    unknown = sorted(set(ours) - set(expected))
    missing = sorted(set(expected) - set(ours) - {DUMMY_WEIGHT})
    wrong = sorted(k for k in set(ours) & set(expected) if ours[k].shape != expected[k].shape)
    if unknown or missing or wrong:
        raise CompareError(f"teacher: its parameters do not map onto DPHuBERT's model (no counterpart: "
                           f"{unknown[:3]}, not provided: {missing[:3]}, other shape: {wrong[:3]})")
    state = {k: v.detach().clone() for k, v in ours.items()}
    state[DUMMY_WEIGHT] = torch.ones_like(expected[DUMMY_WEIGHT])  # all channels, unscaled: the unpruned value
    return {"config": config, "state_dict": state}


def build_dphubert(dp: types.SimpleNamespace, ckpt: Dict[str, Any], **config_changes: Any) -> nn.Module:
    """DPHuBERT's model from its checkpoint (strict: every key used, none left at its init)."""
    model = dp.model.wav2vec2_model(**{**ckpt["config"], **config_changes})
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model


def dphubert_hiddens(model: nn.Module, waveforms: Tensor, lengths: Optional[Tensor] = None
                     ) -> Tuple[List[Tensor], Optional[Tensor]]:
    """DPHuBERT's ``extract_features`` in prune's convention: N + 1 tensors (batch, frames, dim).

    DPHuBERT's hidden 0 is the feature projection's output; prune's is the input of layer 1
    (after the positional conv and, post-norm, the LayerNorm): DPHuBERT's own ``_preprocess`` makes
    it. Pre-norm, prune's last hidden is after the final LayerNorm, DPHuBERT's before."""
    hiddens, frames = model.extract_features(waveforms, lengths)
    transformer = model.encoder.transformer
    out = [transformer._preprocess(hiddens[0]), *hiddens[1:]]
    if not transformer.layer_norm_first:  # DPHuBERT's Transformer flag is inverted: False = a pre-norm model
        out[-1] = transformer.layer_norm(out[-1])
    return out, frames


def _valid_rel_error(a: Tensor, b: Tensor, frames: Tensor) -> float:
    """max |a - b| / max |b| over the valid frames. a, b: (batch, frames, dim); frames: (batch,)."""
    valid = torch.arange(b.shape[1])[None, :] < frames[:, None]
    return ((a - b).abs()[valid].max() / b.abs()[valid].max()).item()


@torch.no_grad()
def parity_errors(dp_model: nn.Module, teacher: Wav2Vec2Model, waveforms: Tensor, lengths: Tensor) -> List[float]:
    """Relative error of DPHuBERT's hidden states against prune's teacher, per hidden state
    (0: the input of layer 1, then layers 1..N), over the valid frames of a padded batch."""
    dp_model.eval()
    ours, frames = teacher.eval()(waveforms, lengths)
    theirs, their_frames = dphubert_hiddens(dp_model, waveforms, lengths)
    if not torch.equal(frames, their_frames.to(frames.dtype)) or len(theirs) != len(ours):
        raise CompareError("teacher: DPHuBERT's model gives other frame counts or layer counts than prune's")
    return [_valid_rel_error(t, o, frames) for t, o in zip(theirs, ours)]


def check_parity(dp_model: nn.Module, teacher: Wav2Vec2Model, waveforms: Tensor, lengths: Tensor,
                 rtol: float = PARITY_RTOL) -> List[float]:
    """``parity_errors``, raising CompareError if a hidden state is off by more than ``rtol``."""
    errors = parity_errors(dp_model, teacher, waveforms, lengths)
    bad = {i: e for i, e in enumerate(errors) if not e <= rtol}
    if bad:
        raise CompareError(f"teacher: DPHuBERT's model does not reproduce prune's hidden states (relative error "
                           f"{', '.join(f'layer {i}: {e:.2e}' for i, e in bad.items())}; tolerance {rtol:g}); "
                           f"the conversion is wrong for this teacher")
    return errors


def padded_parity_batch(dataset: Any, count: int = 4) -> Batch:
    """A few training files cut to different lengths (each shorter than the last), zero-padded."""
    waves = [w for w in (dataset[i] for i in range(min(len(dataset), 4 * count))) if w is not None][:count]
    if not waves:
        raise CompareError("data.train_manifest: no readable audio for the parity check")
    cut = [w[:max(dataset.min_samples, int(w.numel() * (1 - 0.2 * k)))] for k, w in enumerate(waves)]
    return collate(cut)


# ------------------------------------------------------------------------ DPHuBERT's training
def pruning_units(gates: DictConfig) -> List[str]:
    """distill.py's ``--pruning_units`` from ``pruning.gates``."""
    return [unit for key, unit in PRUNING_UNITS.items() if gates[key]]


def frozen_teacher(dp: types.SimpleNamespace, ckpt: Dict[str, Any]) -> nn.Module:
    """As distill.py / final_distill.py make it."""
    teacher = build_dphubert(dp, ckpt)
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher.eval()


def gated_student(dp: types.SimpleNamespace, ckpt: Dict[str, Any], units: Sequence[str]) -> nn.Module:
    """distill.py's student: the teacher's config with the pruning flags of ``units``, its weights
    loaded non-strictly; only the gates' log_alpha may be left at their initialisation."""
    student = dp.model.wav2vec2_model(**{**ckpt["config"], **{UNIT_FLAGS[u]: True for u in units}})
    result = student.load_state_dict(ckpt["state_dict"], strict=False)
    not_gates = [k for k in result.missing_keys if not k.endswith("log_alpha")]
    if not_gates or result.unexpected_keys:
        raise CompareError(f"DPHuBERT's student did not take the teacher's weights (missing {not_gates[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]})")
    return student


def distill_projections(dp: types.SimpleNamespace, groups: Sequence[Sequence[int]], mode: str, student_dim: int,
                        teacher_dim: int, identity: bool) -> nn.ModuleList:
    """distill.py's ``distill_linear_projs``: layer2layer, one Linear per group shared by its layers
    (identity-initialised by distill.py's ``_init_layer_transform`` in stage 1); predlayer, one
    Linear + GELU per layer."""
    projs = nn.ModuleList()
    if mode == "layer2layer":
        for group in groups:
            linear = nn.Linear(student_dim, teacher_dim)
            if identity:
                dp.distill._init_layer_transform(linear)
            projs.extend([linear] * len(group))
    else:
        projs.extend(nn.Sequential(nn.Linear(student_dim, teacher_dim), nn.GELU())
                     for group in groups for _ in group)
    return projs


def distill_module(dp: types.SimpleNamespace, cfg: DictConfig, teacher: nn.Module, student: nn.Module,
                   projs: nn.ModuleList, prune_stage: bool) -> nn.Module:
    """lightning.py's ``DistillModule`` with the recipe's budget: distill.py's arguments in the
    pruning stage, final_distill.py's (no regularisation) after."""
    o, tr, p, d = cfg.optim, cfg.trainer, cfg.pruning, cfg.distill
    loss = dp.lightning.DistillLoss(l2_weight=0.0, l1_weight=1.0, cos_weight=d.cos_weight, cos_type=d.cos_type)
    lr, warmup, steps = (o.lr, o.warmup_steps, tr.prune_steps) if prune_stage else final_budget(cfg)
    return dp.lightning.DistillModule(
        teacher_model=teacher, student_model=student, distill_mode=DISTILL_MODES[d.mode],
        distill_layers=[layer for group in d.layers for layer in group], distill_linear_projs=projs,
        distill_loss=loss, learning_rate=lr, weight_decay=o.weight_decay, warmup_updates=warmup, max_updates=steps,
        use_reg=prune_stage, reg_learning_rate=o.gate_lr if prune_stage else None,
        target_sparsity=p.target if prune_stage else None,
        sparsity_warmup_updates=p.warmup_steps if prune_stage else None,
        tsv_dir=None, train_subset=None, seconds_per_batch=None, num_workers=0)


def final_budget(cfg: DictConfig) -> Tuple[float, int, int]:
    """(lr, warm-up, steps) of the final distillation: optim.final_lr / optim.final_warmup_steps where
    the recipe sets them, else half the pruning stage's lr (run.sh: final_lr 1e-4 for lr 2e-4) and
    its warm-up."""
    o = cfg.optim
    lr = o.final_lr if o.get("final_lr") is not None else o.lr / 2
    warmup = o.final_warmup_steps if o.get("final_warmup_steps") is not None else o.warmup_steps
    return lr, warmup, cfg.trainer.final_steps


def drive(module: nn.Module, batches: Iterator[DPBatch], steps: int, clip: Optional[float], log_every: int = 50,
          name: str = "") -> Dict[str, Any]:
    """What Lightning's fit does with the module, without Lightning: ``configure_optimizers``, then
    per step ``_step`` -> backward -> clip the gradient norm of every optimised parameter
    (``gradient_clip_val``) -> optimizer step -> scheduler step (interval "step") -> global_step + 1."""
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    module.train()
    history, start = [], time.perf_counter()
    for i in range(steps):
        module.global_step = i
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = module._step(batch, i, "train")
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        if (i + 1) % log_every == 0 or i + 1 == steps:
            record = {"step": i + 1, **{k: float(v) for k, v in module.logged.items()}}
            history.append(record)
            log.info("DPHuBERT %s step %d/%d: %s", name, i + 1, steps,
                     ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"))
    module.global_step = steps
    seconds = time.perf_counter() - start
    return {"steps": steps, "seconds": seconds, "seconds_per_step": seconds / steps if steps else None,
            "history": history}


def training_batches(cfg: DictConfig, run_dir: Path) -> Tuple[Iterator[Batch], Any]:
    """prune's own training batches for ``cfg`` (its dataset, sampler, crops and seed), endless,
    and the dataset: the trainer's ``_setup_data`` and ``_batches`` on one process."""
    recipe = PruneRecipe(cfg, run_dir)
    recipe.env = DistEnv()
    recipe._setup_data()
    return recipe._batches(), recipe.dataset


def as_dphubert_batches(batches: Iterator[Batch], collate_fn: Callable) -> Iterator[DPBatch]:
    """Each padded batch re-collated by DPHuBERT's ``CollateFnAudio`` (crop: every utterance cut
    to the batch's shortest at a random offset, as its train_dataloader does; pad: zero-padded)."""
    for batch in batches:
        yield collate_fn([(w[:n][None], int(n)) for w, n in zip(batch.waveforms, batch.lengths)])


def run_dphubert(dp: types.SimpleNamespace, cfg: DictConfig, ckpt_path: Path, run_dir: Path,
                 batches_mode: str) -> Dict[str, Any]:
    """One training seed of DPHuBERT's pipeline (distill.py -> prune.py -> final_distill.py) on the
    recipe's data and budget; writes run_dir/final.pth (save_final_ckpt.py's layout)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tr, o = cfg.trainer, cfg.optim
    torch.manual_seed(tr.seed)
    if tr.threads:
        torch.set_num_threads(tr.threads)
    ckpt = torch.load(ckpt_path, map_location="cpu")
    batches, _ = training_batches(cfg, run_dir)
    batches = as_dphubert_batches(batches, dp.audio.CollateFnAudio(pad=batches_mode == "pad", rand_crop=True))
    groups = [list(g) for g in cfg.distill.layers]
    mode = DISTILL_MODES[cfg.distill.mode]
    dim = ckpt["config"]["encoder_embed_dim"]

    units = pruning_units(cfg.pruning.gates)
    module = distill_module(dp, cfg, frozen_teacher(dp, ckpt), gated_student(dp, ckpt, units),
                            distill_projections(dp, groups, mode, dim, dim, identity=True), prune_stage=True)
    stage1 = drive(module, batches, tr.prune_steps, o.clip_grad_norm, tr.log_every, "prune")
    reached = {k: float(module.logged[k]) for k in ("sparsity_expected", "sparsity_target") if k in module.logged}
    distilled = run_dir / "distilled.ckpt"
    torch.save({"state_dict": module.state_dict()}, distilled)  # the Lightning checkpoint's state_dict

    printed = io.StringIO()  # prune_from_ckpt prints the pruned config
    with contextlib.redirect_stdout(printed):
        pruned = dp.prune.prune_from_ckpt(distilled_ckpt=distilled, original_ckpt=ckpt_path)
    torch.save(pruned, run_dir / "pruned.pth")

    student = dp.model.wav2vec2_model(**pruned["config"])
    result = student.load_state_dict(pruned["state_dict"], strict=False)  # as final_distill.py loads it
    if result.missing_keys or result.unexpected_keys:
        raise CompareError(f"{run_dir / 'pruned.pth'}: the pruned model does not load into its config (missing "
                           f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    projs = distill_projections(dp, groups, mode, dim, dim, identity=False)
    projs.load_state_dict(pruned["distill_linear_projs"])
    final = distill_module(dp, cfg, frozen_teacher(dp, ckpt), student, projs, prune_stage=False)
    stage2 = drive(final, batches, tr.final_steps, o.clip_grad_norm, tr.log_every, "final")
    torch.save({"state_dict": student.state_dict(), "config": pruned["config"],
                "distill_linear_projs": projs.state_dict()}, run_dir / "final.pth")
    distilled.unlink()  # the teacher's weights twice over; pruned.pth and final.pth are what is kept
    lr, warmup, _ = final_budget(cfg)
    return {"prune_stage": {**stage1, **reached}, "final_stage": {**stage2, "lr": lr, "warmup_steps": warmup},
            "pruning_units": units, "pruned_config": pruned["config"]}


def dphubert_featurize(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """wave (samples,) -> (layers, frames, dim), the hidden states prune's probe reads, in its convention."""
    model.eval()

    def featurize(wave: Tensor) -> Tensor:
        hiddens, _ = dphubert_hiddens(model, wave[None])
        return torch.stack([h[0] for h in hiddens])
    return featurize


# ------------------------------------------------------------------------------ prune's side
def prune_command() -> List[str]:
    """The venv's ``prune`` console script (next to this interpreter), else ``python -m prune.cli``."""
    script = Path(sys.executable).parent / "prune"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "prune.cli"]


def run_prune(recipe: str, seed: int, overrides: Sequence[str], run_dir: Path) -> Path:
    """``prune train RECIPE trainer.seed=S hydra.run.dir=run_dir OVERRIDES`` (its own report probe off:
    every model is probed here, with the same probe seeds); returns the export folder. A run
    directory left by an interrupted run is resumed by prune itself."""
    export = run_dir / "export"
    if (export / "config.json").is_file():
        return export
    command = [*prune_command(), "train", recipe, f"trainer.seed={seed}", f"hydra.run.dir={run_dir}", *overrides,
               "probe.corpus=null", "logging.progress=false"]
    log_path = run_dir.parent / f"{run_dir.name}.log"
    log.info("prune seed %d: %s  (log: %s)", seed, " ".join(command), log_path)
    with open(log_path, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0 or not (export / "config.json").is_file():
        raise CompareError(f"prune train (seed {seed}) failed with exit code {code}; see {log_path}")
    return export


# --------------------------------------------------------------------------------- probing
def probe_pers(featurize: Callable[[Tensor], Tensor], corpus: Path, steps: int, seeds: Sequence[int],
               done: Dict[str, float]) -> Dict[str, float]:
    """Valid PER of prune's phone probe per probe seed (``done`` holds those measured before);
    features are computed once for all seeds."""
    todo = [s for s in seeds if str(s) not in done]
    if todo:
        train, valid, vocab = corpus_features(featurize, corpus)
        for seed in todo:
            done[str(seed)] = fit_probe(train, valid, vocab, steps=steps, seed=seed)["valid_per"]
    return done


# ---------------------------------------------------------------------------------- results
def run_stats(pers: Dict[str, float], seeds: Sequence[int]) -> Tuple[float, Optional[float]]:
    """Mean and sample std (None for one seed) of a run's PER over the probe seeds."""
    values = [pers[str(s)] for s in seeds]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(rows: Sequence[Dict[str, Any]], seeds: Sequence[int]) -> List[Dict[str, Any]]:
    """Per method: the mean over its runs (training seeds) of each run's mean PER, the spread of
    those means (sample std, min, max) and the mean params."""
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        means = [run_stats(r["probe_valid_per"], seeds)[0] for r in runs]
        summary.append({"method": method, "runs": len(runs), "params": statistics.fmean(r["params"] for r in runs),
                        "per_mean": statistics.fmean(means),
                        "per_std": statistics.stdev(means) if len(means) > 1 else None,
                        "per_min": min(means), "per_max": max(means)})
    return summary


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(rows: Sequence[Dict[str, Any]], summary: Sequence[Dict[str, Any]], seeds: Sequence[int],
             header: Sequence[str]) -> str:
    lines = [*header, "", "| run | params | " + " | ".join(f"PER, probe seed {s}" for s in seeds)
             + " | mean | std |", "| --- | ---: |" + " ---: |" * (len(seeds) + 2)]
    for r in rows:
        mean, std = run_stats(r["probe_valid_per"], seeds)
        pers = " | ".join(_fmt(r["probe_valid_per"][str(s)]) for s in seeds)
        lines.append(f"| {r['run']} | {r['params']:,} | {pers} | {_fmt(mean)} | {_fmt(std)} |")
    lines += ["", "| method | runs | mean params | mean PER | std over runs | min | max |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        lines.append(f"| {s['method']} | {s['runs']} | {s['params']:,.0f} | {_fmt(s['per_mean'])} | "
                     f"{_fmt(s['per_std'])} | {_fmt(s['per_min'])} | {_fmt(s['per_max'])} |")
    return "\n".join(lines) + "\n"


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    """Whole or not at all: a killed run never leaves half a result."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


# ------------------------------------------------------------------------------- the script
def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(script options, key=value prune overrides): overrides may come anywhere on the line, also
    right after a multi-valued option such as --seeds."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in overrides], overrides


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dphubert", type=Path, metavar="CHECKOUT",
                        help="a checkout of https://github.com/pyf98/DPHuBERT (not needed with --skip-dphubert)")
    parser.add_argument("--recipe", default="demo", help="the prune recipe whose problem and budget both sides get")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--probe-seeds", type=int, nargs="+", help="default: the recipe's probe.seeds")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare_dphubert"))
    parser.add_argument("--dphubert-batches", choices=("crop", "pad"), default="crop",
                        help="crop: DPHuBERT's collate (every utterance cut to the batch's shortest); "
                             "pad: prune's zero-padded batches")
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--skip-prune", action="store_true", help="run DPHuBERT's side only")
    skip.add_argument("--skip-dphubert", action="store_true", help="run prune's side only")
    options, overrides = split_argv(argv)
    args = parser.parse_args(options)
    args.overrides = overrides
    if args.dphubert is None and not args.skip_dphubert:
        parser.error("--dphubert CHECKOUT is required (unless --skip-dphubert)")
    if any(s < 0 for s in args.seeds + (args.probe_seeds or [])):
        parser.error("--seeds / --probe-seeds: seeds must be non-negative integers")
    return args


def compose_checked(recipe: str, overrides: Sequence[str], seed: Optional[int] = None) -> DictConfig:
    """The composed, validated prune config (with ``trainer.seed`` if given), or one line of error."""
    seeded = [*overrides, *([f"trainer.seed={seed}"] if seed is not None else [])]
    try:
        cfg = compose(recipe, seeded)
        validate(cfg)
    except ConfigError as e:
        raise CompareError(str(e)) from None
    except Exception as e:  # Hydra: an unknown recipe or a malformed override
        raise CompareError(f"{' '.join(['--recipe', recipe, *overrides])}: {str(e).splitlines()[0]}") from None
    return cfg


def check_dphubert_settings(cfg: DictConfig) -> None:
    """What DPHuBERT's code can run of the recipe, before any compute."""
    if cfg.pruning.target_kind != "params":
        raise CompareError(f"pruning.target_kind: DPHuBERT's code has a params sparsity target only, got "
                           f"{cfg.pruning.target_kind!r} (use --skip-dphubert, or pruning.target_kind=params)")
    if cfg.trainer.grad_accum != 1:
        raise CompareError("trainer.grad_accum: the DPHuBERT side steps on every batch (run.sh's accum_grad 1); "
                           "set trainer.grad_accum=1")
    if cfg.distill.mode not in DISTILL_MODES:
        raise CompareError(f"distill.mode: {cfg.distill.mode!r} has no DPHuBERT counterpart")
    if not pruning_units(cfg.pruning.gates):
        raise CompareError("pruning.gates: no structure is gated, DPHuBERT would prune nothing")


# config keys that change no result: a resumed comparison may differ in them
UNCOMPARED = ("trainer.seed", "trainer.threads", "trainer.log_every", "trainer.ckpt_every", "logging")


def settings_record(args: argparse.Namespace, cfg: DictConfig, digest: Optional[str]) -> Dict[str, Any]:
    """What the results in OUT depend on, apart from the seeds (the overrides for the record)."""
    return {"recipe": args.recipe, "overrides": list(args.overrides), "dphubert_batches": args.dphubert_batches,
            "dphubert_code_sha256": digest, "config": OmegaConf.to_container(cfg, resolve=True)}


def check_out_dir(out: Path, settings: Dict[str, Any]) -> None:
    """OUT must be writable, and any results already there must come from the same settings."""
    try:
        check_run_dir(out)
    except ConfigError as e:
        raise CompareError(f"--out: {e}") from None
    previous = _read_json(out / "settings.json")
    if previous is None:
        return
    changed = [k for k in ("recipe", "dphubert_batches") if previous.get(k) != settings[k]]
    changed += _diff(previous.get("config"), settings["config"], ignore=UNCOMPARED)
    if None not in (settings["dphubert_code_sha256"], previous.get("dphubert_code_sha256")) and \
            previous["dphubert_code_sha256"] != settings["dphubert_code_sha256"]:
        changed.append("dphubert_code_sha256 (another DPHuBERT checkout)")
    if changed:
        raise CompareError(f"--out: {out} holds results of another comparison (differs in: {', '.join(changed)}); "
                           f"pass another --out or delete it")


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    # DPHuBERT's positional conv uses the old weight_norm API; it still works
    warnings.filterwarnings("ignore", r".*torch\.nn\.utils\.weight_norm.* is deprecated", FutureWarning)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return compare(args)
    except CompareError as e:
        print(f"compare_dphubert: {e}", file=sys.stderr)
        return 2


class Results:
    """One JSON per run in OUT/results (params, PER per probe seed, extras): a run whose probe seeds
    are all there is not probed again."""

    def __init__(self, out: Path, corpus: Path, steps: int, probe_seeds: Sequence[int]):
        self.folder = out / "results"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.corpus, self.steps, self.probe_seeds = corpus, steps, list(probe_seeds)
        self.rows: List[Dict[str, Any]] = []

    def add(self, name: str, method: str, seed: Optional[int], model: nn.Module,
            featurize: Callable[[], Callable[[Tensor], Tensor]], **extra: Any) -> None:
        path = self.folder / f"{name}.json"
        row = _read_json(path) or {"run": name.replace("_", " "), "method": method, "seed": seed,
                                   "params": sum(p.numel() for p in model.parameters()), "probe_valid_per": {},
                                   **extra}
        if any(str(s) not in row["probe_valid_per"] for s in self.probe_seeds):
            log.info("probing %s (%d steps, probe seeds %s)", name, self.steps, self.probe_seeds)
            probe_pers(featurize(), self.corpus, self.steps, self.probe_seeds, row["probe_valid_per"])
            _write_json(path, row)
        self.rows.append(row)


def convert_teacher(dp: types.SimpleNamespace, teacher: Wav2Vec2Model, cfg: DictConfig, out: Path
                    ) -> Tuple[Path, List[float]]:
    """The teacher in DPHuBERT's layout, checked against prune's on a padded batch of the training
    data, saved as OUT/teacher_dphubert.pth; returns that path and the per-layer errors."""
    ckpt = dphubert_checkpoint(dp, teacher)
    _, dataset = training_batches(cfg, out)
    batch = padded_parity_batch(dataset)
    errors = check_parity(build_dphubert(dp, ckpt), teacher, batch.waveforms, batch.lengths)
    log.info("teacher conversion: DPHuBERT's hidden states match prune's, max relative error %.2e (hidden "
             "states 0..%d, prune's convention)", max(errors), len(errors) - 1)
    path = out / "teacher_dphubert.pth"
    torch.save(ckpt, path)
    return path, errors


def dphubert_runs(dp: types.SimpleNamespace, seed_cfgs: Dict[int, DictConfig], ckpt_path: Path, out: Path,
                  batches_mode: str, errors: List[float], results: Results) -> None:
    for seed, cfg in seed_cfgs.items():
        run_dir = out / f"dphubert_s{seed}"
        record = run_dir / "training.json"
        if not record.is_file():
            log.info("DPHuBERT seed %d: training in %s", seed, run_dir)
            _write_json(record, {**run_dphubert(dp, cfg, ckpt_path, run_dir, batches_mode), "parity_errors": errors})
        training = _read_json(record)
        model = dp.prune.load_pruned_model(run_dir / "final.pth")
        results.add(f"DPHuBERT_seed_{seed}", "DPHuBERT's code", seed, model, lambda: dphubert_featurize(model),
                    seconds_per_step={stage: training[f"{stage}_stage"]["seconds_per_step"]
                                      for stage in ("prune", "final")},
                    expected_sparsity=training["prune_stage"].get("sparsity_expected"))


def prune_runs(recipe: str, seeds: Sequence[int], overrides: Sequence[str], out: Path, results: Results) -> None:
    from prune import load_pretrained

    for seed in seeds:
        model = load_pretrained(run_prune(recipe, seed, overrides, out / f"prune_s{seed}"))
        results.add(f"prune_seed_{seed}", f"prune ({recipe})", seed, model, lambda: encoder_layers(model.eval()))


def report_header(args: argparse.Namespace, cfg: DictConfig) -> List[str]:
    tr, o = cfg.trainer, cfg.optim
    lr, warmup, _ = final_budget(cfg)
    return [f"# DPHuBERT's code vs prune: recipe `{args.recipe}`"
            + (f" with `{' '.join(args.overrides)}`" if args.overrides else ""),
            "",
            f"- budget (both sides): {tr.prune_steps} pruning + {tr.final_steps} final steps, target "
            f"{cfg.pruning.target_kind} {cfg.pruning.target}, lr {o.lr}, gate lr {o.gate_lr}, warm-up "
            f"{o.warmup_steps}; DPHuBERT's final stage: lr {lr:g}, warm-up {warmup}",
            f"- data: {cfg.data.train_manifest}, batch {cfg.data.batch_size}, crops of at most "
            f"{cfg.data.max_samples} samples; DPHuBERT's batches: {args.dphubert_batches}",
            f"- probe: valid PER of prune's phone probe on {cfg.probe.corpus} ({cfg.probe.steps} steps); "
            f"probe seeds {' '.join(map(str, args.probe_seeds))}; training seeds {' '.join(map(str, args.seeds))}"]


def compare(args: argparse.Namespace) -> int:
    # every check before any compute
    cfg = compose_checked(args.recipe, args.overrides)
    if cfg.probe.corpus is None:
        raise CompareError("probe.corpus: the comparison needs a probe corpus (e.g. probe.corpus=data/demo_corpus)")
    args.probe_seeds = args.probe_seeds or list(cfg.probe.get("seeds") or [0, 1, 2])
    digest = None
    if not args.skip_dphubert:
        check_checkout(args.dphubert)
        check_dphubert_settings(cfg)
        digest = checkout_digest(args.dphubert.resolve())
    seed_cfgs = {s: compose_checked(args.recipe, args.overrides, s) for s in args.seeds}
    out: Path = args.out
    settings = settings_record(args, cfg, digest)
    check_out_dir(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    previous = _read_json(out / "settings.json") or {}
    settings["dphubert_code_sha256"] = digest or previous.get("dphubert_code_sha256")
    _write_json(out / "settings.json", settings)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)

    teacher = load_teacher(cfg.teacher)
    if not args.skip_dphubert:  # the conversion is checked before anything is trained or probed
        dp = load_dphubert(args.dphubert)
        ckpt_path, errors = convert_teacher(dp, teacher, cfg, out)
    results = Results(out, Path(cfg.probe.corpus), cfg.probe.steps, args.probe_seeds)
    results.add("teacher", "teacher", None, teacher, lambda: encoder_layers(teacher.eval()))
    if not args.skip_dphubert:
        dphubert_runs(dp, seed_cfgs, ckpt_path, out, args.dphubert_batches, errors, results)
    if not args.skip_prune:
        prune_runs(args.recipe, args.seeds, args.overrides, out, results)

    rows = sorted(results.rows, key=lambda r: (r["method"] != "teacher", r["method"], r["seed"] or 0))
    summary = summarize(rows, args.probe_seeds)
    text = markdown(rows, summary, args.probe_seeds, report_header(args, cfg))
    (out / "compare.md").write_text(text)
    _write_json(out / "compare.json", {"settings": {k: v for k, v in settings.items() if k != "config"},
                                       "training_seeds": args.seeds, "probe_seeds": args.probe_seeds,
                                       "rows": rows, "summary": summary})
    print(text)
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
