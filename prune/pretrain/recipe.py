"""Pre-train a small HuBERT-style encoder from scratch (HuBERT's first iteration): masked
prediction of k-means cluster ids of MFCC frames. It makes a teacher that has learned
something about speech where no pretrained weights can be had (the demo's teacher).

    prune pretrain demo_teacher [key=value ...]

The corpus is read into memory once (a demo-scale recipe: the committed corpus is 31 MB as
float32). The loop reads top to bottom: batch -> masked prediction loss -> step -> log ->
validate -> checkpoint; at the end the encoder (without the pre-training head) is exported and,
when ``probe.corpus`` is set, its phone error rate is measured next to a random-init one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from torch import Tensor

from ..checkpoints.convert import write_model
from ..models import PRESETS, build_preset, preset_config
from ..train.checkpoint import load_latest, save_checkpoint
from ..train.config import (ConfigError, ProbeConfig, check_manifests, check_optim, check_probe, check_run_dir,
                     compose_raw, register_schema, typed)
from ..data.audio import AudioError, load_audio
from ..data.dataset import Batch, collate, format_skipped, validate_manifest
from ..faults import maybe_fail
from ..data.manifest import ManifestError, read_manifest
from .masked_prediction import IGNORE, MaskedPrediction, masked_loss, span_mask
from ..train.resume import check_resume_config
from ..train.rundir import Runner, run_claimed
from ..train.schedule import warmup_linear_decay
from .clusters import HOP_LENGTH, ClusterTargets, mfcc_features, num_frames

log = logging.getLogger(__name__)

REQUIRED = ("step", "config", "model", "optimizer", "targets", "rng", "history")  # a whole checkpoint
# what a resume may change: the name, the probe of the result, and every trainer key but trainer.steps
RESUMABLE = ("name", "probe", "trainer.seed", "trainer.threads", "trainer.log_every", "trainer.valid_every",
             "trainer.ckpt_every", "trainer.keep_last")


# ------------------------------------------------------------------------------------ config
@dataclass
class PretrainModelConfig:
    preset: str = "hubert_base_tiny"  # the architecture (prune.models.PRESETS), random init
    overrides: Dict[str, Any] = field(default_factory=dict)  # EncoderConfig fields
    final_dim: int = 256  # projection of the last layer scored against the cluster embeddings
    logit_temp: float = 0.1  # cosine similarity / logit_temp
    feature_grad_mult: float = 0.1  # scales the conv extractor's gradient (HuBERT Base)
    feature_pen: float = 10.0  # weight of the conv features' mean square in the loss


@dataclass
class PretrainTargetsConfig:
    num_clusters: int = 100  # k-means clusters of MFCC frames: the classes predicted
    kmeans_iters: int = 50  # Lloyd iterations


@dataclass
class MaskingConfig:
    prob: float = 0.8  # HuBERT: 0.8 with spans of 10 frames (~50% of frames masked)
    length: int = 10  # frames per masked span
    unmasked_weight: float = 0.0  # HuBERT's pred_nomask_weight: loss on the unmasked frames too


@dataclass
class PretrainDataConfig:
    train_manifest: str = MISSING  # TSV: root folder, then path<TAB>samples (make one: prune manifest FOLDER OUT)
    valid_manifest: Optional[str] = None  # masked-prediction loss every trainer.valid_every steps; null: none
    max_samples: int = 48000  # random crop
    min_samples: int = 400  # shorter files are skipped
    batch_size: int = 8  # utterances per step


@dataclass
class PretrainOptimConfig:
    lr: float = 5e-4  # peak learning rate
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW
    weight_decay: float = 0.01  # AdamW
    warmup_steps: int = 500  # linear warm-up, then linear decay to 0
    clip_grad_norm: Optional[float] = 10.0  # null: no clipping


@dataclass
class PretrainTrainerConfig:
    steps: int = 10000  # training steps
    seed: int = 0  # k-means, batches, crops, masks
    threads: Optional[int] = None  # torch CPU threads
    log_every: int = 50  # a log line every this many steps
    valid_every: int = 500  # 0: never
    ckpt_every: int = 500  # checkpoint every this many steps
    keep_last: int = 2  # checkpoints kept


@dataclass
class PretrainConfig:
    name: str = "pretrain"  # the run directory is outputs/NAME/DATE_TIME (or hydra.run.dir=PATH)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    targets: PretrainTargetsConfig = field(default_factory=PretrainTargetsConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)
    trainer: PretrainTrainerConfig = field(default_factory=PretrainTrainerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # phone probe of the result, and of a random init


register_schema("pretrain_schema", PretrainConfig)  # configs/pretrain/pretrain.yaml starts from it


def validate_pretrain(cfg: DictConfig, run_dir: Optional[Path] = None) -> None:
    """Checks that need no compute; each error names its key."""
    m, d, tr = cfg.model, cfg.data, cfg.trainer
    if m.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {m.preset!r}; choose from {sorted(PRESETS)}")
    try:
        preset_config(m.preset, **m.overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.overrides: {e}") from None
    check_manifests(d)
    if d.max_samples < max(d.min_samples, 400):
        raise ConfigError(f"data.max_samples: {d.max_samples} is below one frame or data.min_samples")
    check_probe(cfg.probe)
    checks = [("data.batch_size", d.batch_size, 1), ("targets.num_clusters", cfg.targets.num_clusters, 2),
              ("masking.length", cfg.masking.length, 1), ("trainer.steps", tr.steps, 1),
              ("trainer.log_every", tr.log_every, 1), ("trainer.ckpt_every", tr.ckpt_every, 1),
              ("trainer.keep_last", tr.keep_last, 1), ("trainer.valid_every", tr.valid_every, 0),
              ("model.final_dim", m.final_dim, 1)]
    for key, value, low in checks:
        if value < low:
            raise ConfigError(f"{key}: must be >= {low}, got {value}")
    if not 0.0 < cfg.masking.prob <= 1.0:
        raise ConfigError(f"masking.prob: must be in (0, 1], got {cfg.masking.prob}")
    check_optim(cfg.optim, ("lr",))
    if cfg.masking.unmasked_weight < 0 or cfg.model.feature_pen < 0:
        key = "masking.unmasked_weight" if cfg.masking.unmasked_weight < 0 else "model.feature_pen"
        raise ConfigError(f"{key}: a loss weight must be >= 0")
    if not 0.0 <= cfg.model.feature_grad_mult <= 1.0:
        raise ConfigError(f"model.feature_grad_mult: must be in [0, 1], got {cfg.model.feature_grad_mult}")
    if cfg.model.logit_temp <= 0:
        raise ConfigError(f"model.logit_temp: must be > 0, got {cfg.model.logit_temp}")
    if tr.threads is not None and tr.threads < 1:
        raise ConfigError(f"trainer.threads: must be >= 1 or null, got {tr.threads}")
    if run_dir is not None:
        check_run_dir(run_dir)


# -------------------------------------------------------------------------------------- data
def load_corpus(manifest_path: str, min_samples: int) -> Tuple[List[Tensor], Dict[str, str]]:
    """Every usable waveform of a manifest; unusable files (bad header, or failing to decode) are
    skipped, logged, and returned with why. Raises ``ManifestError`` if none is usable."""
    manifest = read_manifest(manifest_path)
    good, skipped = validate_manifest(manifest, min_samples)
    waves = []
    for i in good:
        try:
            waves.append(load_audio(manifest.path(i), min_samples=min_samples))
        except AudioError as e:
            skipped[str(manifest.path(i))] = e.reason
    if skipped:
        log.warning("%s", format_skipped(skipped, len(manifest)))
    if not waves:
        raise ManifestError(f"{manifest}: no usable audio, all {len(manifest)} files are bad")
    return waves, skipped


def get_batch(waves: List[Tensor], labels: List[Tensor], indices: List[int], max_samples: int,
              g: torch.Generator) -> Batch:
    """Crop each chosen utterance at a random whole frame (so its labels stay aligned), pad -> a
    Batch: waveforms (batch, samples), lengths (batch,), labels (batch, frames) (``IGNORE`` on padding)."""
    crops, crop_labels = [], []
    for i in indices:
        wave, lab = waves[i], labels[i]
        if wave.numel() > max_samples:
            first = int(torch.randint(0, (wave.numel() - max_samples) // HOP_LENGTH + 1, (), generator=g))
            wave = wave[first * HOP_LENGTH:first * HOP_LENGTH + max_samples]
            lab = lab[first:first + num_frames(wave.numel())]
        crops.append(wave)
        crop_labels.append(lab)
    padded = torch.nn.utils.rnn.pad_sequence(crop_labels, batch_first=True, padding_value=IGNORE)
    return collate(crops)._replace(labels=padded)


# -------------------------------------------------------------------------------------- loop
class Pretrainer(Runner):
    def __init__(self, cfg: DictConfig, run_dir: Path):
        super().__init__(cfg, run_dir)
        self.history: List[Dict[str, float]] = []

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        torch.manual_seed(cfg.trainer.seed)
        self.train_waves, self.skipped = load_corpus(cfg.data.train_manifest, cfg.data.min_samples)
        self.valid_waves = load_corpus(cfg.data.valid_manifest, cfg.data.min_samples)[0] \
            if cfg.data.valid_manifest else []

        state = self._latest()
        train_features = [mfcc_features(w) for w in self.train_waves]  # once: for k-means and the labels
        if state is not None:
            self.targets = ClusterTargets.from_state_dict(state["targets"])
        else:
            t0 = time.perf_counter()
            self.targets = ClusterTargets.fit(train_features, cfg.targets.num_clusters, cfg.targets.kmeans_iters,
                                              cfg.trainer.seed)
            log.info("k-means: %d clusters of MFCC frames in %.1f s", cfg.targets.num_clusters,
                     time.perf_counter() - t0)
        self.train_labels = [self.targets.assign(f) for f in train_features]
        self.valid_labels = [self.targets.labels(w) for w in self.valid_waves]

        m = cfg.model
        encoder = build_preset(m.preset, **m.overrides)
        self.model = MaskedPrediction(encoder, cfg.targets.num_clusters, m.final_dim, m.logit_temp,
                                      m.feature_grad_mult)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay)
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.history = state["step"], state["history"]
            torch.set_rng_state(state["rng"])
            log.info("resumed from step %d", self.step)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _latest(self) -> Optional[Dict[str, Any]]:
        """The newest loadable checkpoint (damaged ones skipped; all damaged is an error), after
        a check that it was made with this config."""
        state = load_latest(self.ckpt_dir, REQUIRED, kind="pre-training")
        if state is None:
            return None
        check_resume_config(state["config"], OmegaConf.to_container(self.cfg, resolve=True), self.run_dir,
                            ignore=RESUMABLE)
        return state

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return o.lr * warmup_linear_decay(step, o.warmup_steps, self.cfg.trainer.steps)

    def loss(self, batch: Batch, g: torch.Generator) -> Tuple[Tensor, Dict[str, float]]:
        """The masked-prediction loss of ``batch`` (its labels: the frames' cluster ids)."""
        labels = batch.labels
        frames = torch.tensor([num_frames(int(n)) for n in batch.lengths])
        mask = span_mask(frames, labels.shape[1], self.cfg.masking.prob, self.cfg.masking.length, g)
        logits, penalty, _ = self.model(batch.waveforms, batch.lengths, mask)
        ce, accuracy = masked_loss(logits, labels, mask)
        loss = ce + self.cfg.model.feature_pen * penalty
        parts = {"masked_ce": ce.item(), "masked_accuracy": accuracy.item(), "feature_penalty": penalty.item(),
                 "masked_fraction": mask.float().mean().item()}
        if self.cfg.masking.unmasked_weight > 0:
            ce_unmasked, accuracy_unmasked = masked_loss(logits, labels, ~mask)
            loss = loss + self.cfg.masking.unmasked_weight * ce_unmasked
            parts.update(unmasked_ce=ce_unmasked.item(), unmasked_accuracy=accuracy_unmasked.item())
        return loss, {"loss": loss.item(), **parts}

    def train(self) -> Path:
        cfg, tr = self.cfg, self.cfg.trainer
        self.model.train()
        t_last = time.perf_counter()
        while self.step < tr.steps:
            # the batch, crops and masks of step s depend on (seed, s) alone: a resumed run sees the same data
            g = torch.Generator().manual_seed(tr.seed * 1_000_003 + self.step)
            indices = torch.randint(len(self.train_waves), (cfg.data.batch_size,), generator=g).tolist()
            batch = get_batch(self.train_waves, self.train_labels, indices, cfg.data.max_samples, g)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
            loss, parts = self.loss(batch, g)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.clip_grad_norm:
                parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                                          cfg.optim.clip_grad_norm))
            if not math.isfinite(parts["loss"]):
                raise FloatingPointError(f"step {self.step}: non-finite loss; the last checkpoint is intact "
                                         f"(try a lower optim.lr)")
            maybe_fail("mid_step", self.step + 1)  # PRUNE_FAULT=mid_step:STEP (tests)
            self.optimizer.step()
            self.step += 1

            if self.step % tr.log_every == 0 or self.step == tr.steps:
                seconds = (time.perf_counter() - t_last) / tr.log_every
                t_last = time.perf_counter()
                for k, v in parts.items():
                    self.writer.add_scalar(f"train/{k}", v, self.step)
                self.writer.add_scalar("train/lr", self.lr_at(self.step - 1), self.step)
                log.info("step %d/%d  loss %.3f  masked acc %.3f  %.2f s/step", self.step, tr.steps,
                         parts["loss"], parts["masked_accuracy"], seconds)
            if tr.valid_every and (self.step % tr.valid_every == 0 or self.step == tr.steps):
                self.validate()
            if self.step % tr.ckpt_every == 0 or self.step == tr.steps:
                save_checkpoint(self.ckpt_dir, self.step, self._state(), tr.keep_last)
        return self._export()

    @torch.no_grad()
    def validate(self) -> Optional[Dict[str, float]]:
        """Masked-prediction loss and accuracy on the valid set, with fixed crops and masks."""
        if not self.valid_waves:
            return None
        self.model.eval()
        g = torch.Generator().manual_seed(12345)
        totals: Dict[str, float] = {}
        size = self.cfg.data.batch_size
        batches = 0
        for start in range(0, len(self.valid_waves), size):
            indices = list(range(start, min(start + size, len(self.valid_waves))))
            _, parts = self.loss(get_batch(self.valid_waves, self.valid_labels, indices,
                                           self.cfg.data.max_samples, g), g)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
            batches += 1
        self.model.train()
        result = {k: v / batches for k, v in totals.items()}
        for k, v in result.items():
            self.writer.add_scalar(f"valid/{k}", v, self.step)
        self.history.append({"step": self.step, **{f"valid_{k}": v for k, v in result.items()}})
        log.info("step %d: valid masked CE %.3f, masked accuracy %.3f (chance %.3f)", self.step,
                 result["masked_ce"], result["masked_accuracy"], 1.0 / self.cfg.targets.num_clusters)
        return result

    def _state(self) -> Dict[str, Any]:
        return {"step": self.step, "config": OmegaConf.to_container(self.cfg, resolve=True),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "targets": self.targets.state_dict(), "rng": torch.get_rng_state(), "history": self.history}

    def _export(self) -> Path:
        encoder = self.model.encoder.eval()
        meta = {"pretrain": {"steps": self.step, "history": self.history[-1:], "skipped_files": self.skipped,
                             "config": OmegaConf.to_container(self.cfg, resolve=True)}}
        path = self.run_dir / "export"
        write_model(encoder, path, metadata=meta, overwrite=True)
        if self.cfg.probe.corpus is not None:
            self.probe_report(encoder)
        return path

    def probe_report(self, encoder) -> str:
        """PER of the trained encoder and of a random-init one of the same config, side by side."""
        from ..evaluate.probe import phone_probe
        from ..evaluate.report import random_init_like

        corpus, steps = Path(self.cfg.probe.corpus), self.cfg.probe.steps
        trained = phone_probe(encoder, corpus, steps=steps)
        floor = phone_probe(random_init_like(encoder, self.cfg.trainer.seed), corpus, steps=steps)
        text = (f"phone probe on {corpus} ({trained['valid_files']} valid files, {steps} steps): "
                f"valid PER {trained['valid_per']:.3f} pre-trained vs {floor['valid_per']:.3f} random init")
        (self.run_dir / "probe.txt").write_text(text + "\n")
        log.info("%s", text)
        return text

    def cleanup(self) -> None:
        if getattr(self, "writer", None) is not None:
            self.writer.close()


def run_pretraining(cfg: DictConfig, run_dir: Path) -> Path:
    """Validate, then pre-train in ``run_dir`` (resuming from its checkpoints): locked for this
    process, and left as it was by a start that fails (``rundir.claim_run_dir``)."""
    return run_claimed(run_dir, cfg, lambda: validate_pretrain(cfg, run_dir), lambda: Pretrainer(cfg, run_dir))


def typed_pretrain(cfg: Any) -> DictConfig:
    return typed(cfg, PretrainConfig)


def compose_pretrain(recipe: str = "demo_teacher", overrides: Optional[List[str]] = None) -> DictConfig:
    """The typed config ``prune pretrain RECIPE OVERRIDES...`` would run."""
    return typed_pretrain(compose_raw(recipe, overrides, package="prune.recipes.pretrain", schema=PretrainConfig))
