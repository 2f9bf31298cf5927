"""The pruning recipe: distil a gated student from a frozen teacher under a Lagrangian size
target, cut it, keep distilling the smaller model, export. With task.finetune_teacher_steps a
first stage fine-tunes the unpruned teacher on the task (DiariZen's order: Han et al.,
"Efficient and generalizable speaker diarization via structured pruning of self-supervised
models", 2025), which then is the distillation teacher and the student's start.

    recipe = PruneRecipe(cfg, run_dir)
    recipe.setup()           # resumes from run_dir/checkpoints if there is one
    export = recipe.train()
    recipe.cleanup()

The loop in ``train`` reads top to bottom: batch -> teacher (no grad) -> student -> loss
(+ Lagrangian while pruning) -> skip non-finite -> step -> log -> checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.contrib.logging import logging_redirect_tqdm

from ..calibrate import calibrate
from ..checkpoints.convert import write_model
from ..compile import compile_encoder
from ..gates import HardConcrete
from ..models.config import EncoderConfig
from ..progress import progress_bar
from ..structures import GatedEncoder
from .checkpoint import checkpoint_files, load_latest, save_checkpoint
from .config import absolute_paths, distills, measure_settings, validate
from ..data.dataset import AudioDataset, Batch, LengthBucketSampler, format_skipped, validate_manifest
from .objective import Objective, Task, build_objective
from .distributed import DistEnv, all_ranks, barrier, init_distributed
from .resume import check_resume_config
from .rundir import Runner, is_rank_zero, run_claimed
from .schedule import warmup_linear_decay
from .student import DONE, FINAL, PRUNE, TEACHER, build_student, cut_config, hidden_kept, load_teacher
from ..faults import maybe_fail, maybe_stall, nan_loss
from ..lagrangian import Lagrangian
from ..measures import MEASURES
from ..shape import Shape, Shaper, ShapeTerms, check_shape
from ..data.manifest import ManifestError, read_manifest

log = logging.getLogger(__name__)


class Student(nn.Module):
    """What is trained: the encoder (gated while pruning, plain afterwards) and the objective's
    modules (the distillation heads), registered under their own names (``heads.*`` in a
    checkpoint). One module, so DDP sees every trained parameter."""

    def __init__(self, encoder: nn.Module, objective: Objective):
        super().__init__()
        self.encoder = encoder
        self.objective = objective  # a plain object: its modules are registered here, once
        for name, module in objective.modules().items():
            self.add_module(name, module)

    def forward(self, waveforms: Tensor, lengths: Tensor) -> Any:
        """waveforms (batch, samples), lengths (batch,) -> the objective's student output."""
        return self.objective.student_output(self.encoder, waveforms, lengths)


class PruneRecipe(Runner):
    def __init__(self, cfg: DictConfig, run_dir: Path):
        super().__init__(cfg, run_dir)
        self.export_dir = self.run_dir / "export"
        self.stage = PRUNE
        self.epoch = 0
        self.batch_in_epoch = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.writer = None
        self.history: List[Dict[str, Any]] = []
        self.cut: Optional[Dict[str, Any]] = None  # cut_record(), once pruning is over

    # ------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.env: DistEnv = init_distributed(cfg.trainer.device)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        torch.manual_seed(cfg.trainer.seed)  # same initial gates and heads on every rank
        random.seed(cfg.trainer.seed)

        self._setup_data()
        self.teacher = load_teacher(cfg.teacher).to(self.env.device)
        self.source_config: EncoderConfig = self.teacher.config
        if cfg.teacher.checkpoint is not None and distills(cfg):
            n = self.source_config.encoder_num_layers
            layers = [layer for g in cfg.distill.layers for layer in g]
            if max(layers) > n:
                raise ValueError(f"distill.layers: {layers} must lie in [0, {n}] for this {n}-layer teacher")
        t = cfg.task
        if t.layer is not None and t.layer > self.source_config.encoder_num_layers:
            raise ValueError(f"task.layer: {t.layer} must lie in [0, {self.source_config.encoder_num_layers}] for "
                             f"this {self.source_config.encoder_num_layers}-layer model")
        self.shaper, shape = shaper_of(cfg.pruning, self.source_config)  # checked before any training
        gated = build_student(cfg, self.source_config, teacher_weights=self.teacher.state_dict())
        self.objective = build_objective(cfg, self.source_config.encoder_embed_dim,
                                         self.source_config.encoder_num_layers + 1, self.vocab, self.targets)
        p = cfg.pruning
        settings = measure_settings(p, cfg.trainer.threads, self.source_config)  # a latency table
        measure = MEASURES[p.target_kind].bind(settings)
        self.lagrangian = Lagrangian(
            gated, p.target_kind, p.target, p.warmup_steps, p.macs_seconds, settings,
            shape_terms=ShapeTerms(gated, shape) if shape.given() else None,
            target_size=self.shaper.fixed_size(gated, lambda g: measure.expected_of(g, p.macs_seconds)),
        ).to(self.env.device)
        self.gated = gated  # the pruning stage's student (the Lagrangian measures it)
        self.cut_target = self._cut_target(gated)
        self.run_objective = self.objective  # the pruning and final stages' (the teacher stage has its own)
        if cfg.task.finetune_teacher_steps > 0:  # DiariZen's order: the teacher fine-tuned on the task first
            self.stage = TEACHER
            self.run_objective, self.objective = self.objective, self._teacher_objective()
            self._set_student(Student(self._plain_teacher_copy(), self.objective))
        elif p.enabled:
            self._set_student(Student(gated, self.objective))
        else:  # prune finetune: the teacher's architecture and weights, trained as they are (no gates, no cut)
            self.stage = FINAL
            plain = build_student(cfg, self.source_config, cut_config=self.source_config.replace(
                encoder_layer_drop=cfg.distill.student_layer_drop).to_dict())
            plain.load_state_dict(self.teacher.state_dict())
            self._set_student(Student(plain, self.objective))

        self.teacher_tuned = False  # the teacher stage is over: self.teacher holds the fine-tuned weights
        state = load_latest(self.ckpt_dir)
        if state is not None:
            self._restore(state)  # RNG included: the run goes on as if never stopped
            if self.env.is_main:
                log.info("resumed from step %d (stage %s)", self.step, self.stage)
        else:
            torch.manual_seed(cfg.trainer.seed + 1000 * self.env.rank)  # per-rank gate noise and dropout

    def _plain_teacher_copy(self) -> nn.Module:
        """The teacher's architecture and weights as a plain trainable encoder (no gates)."""
        plain = build_student(self.cfg, self.source_config, cut_config=self.source_config.replace(
            encoder_layer_drop=self.cfg.distill.student_layer_drop).to_dict())
        plain.load_state_dict(self.teacher.state_dict())
        return plain

    def _teacher_objective(self) -> Task:
        """The teacher stage's objective: the run's task head (the same module, so it carries over
        into pruning) on the task loss alone; nothing to distil from."""
        o = self.objective
        return Task(o.kind, o.head, o.targets, weight=1.0, distillation=None)

    def _cut_target(self, gated: GatedEncoder) -> Lagrangian:
        """What the cut calibrates onto: the training's Lagrangian, or with ``pruning.cut_target_kind``
        a measure of its own (its target: ``pruning.cut_target``, else ``pruning.target``); only
        its sizes are read, it is never trained or saved."""
        p = self.cfg.pruning
        if p.cut_target_kind is None:
            return self.lagrangian
        settings = measure_settings(p, self.cfg.trainer.threads, self.source_config, key="cut_target_kind")
        target = p.target if p.cut_target is None else p.cut_target
        try:
            MEASURES[p.cut_target_kind].bind(settings).check_target(
                target, MEASURES[p.cut_target_kind].bind(settings).size_of(self.source_config, p.macs_seconds))
        except ValueError as e:  # a checkpoint teacher: its sizes are known only now
            raise ValueError(str(e).replace("pruning.target:", "pruning.cut_target:")) from None
        return Lagrangian(gated, p.cut_target_kind, target, 0, p.macs_seconds, settings)

    def _setup_data(self) -> None:
        """Check every file up front (a manifest with nothing usable stops here, before any
        compute); files that fail later, at read time, are skipped and counted by the dataset."""
        d, t = self.cfg.data, self.cfg.get("task")
        # a CTC target is the whole utterance's: no random crops, and a file longer than
        # data.max_samples is left out (as fairseq's fine-tuning filters by max_sample_size)
        whole = t is not None and t.kind == "ctc"
        crop = None if whole else d.max_samples
        manifest = read_manifest(d.train_manifest)
        good, self.skipped_upfront = validate_manifest(manifest, d.min_samples)
        if whole:
            good = self._fitting(manifest, good, self.skipped_upfront)
        if self.skipped_upfront and self.env.is_main:
            log.warning("%s", format_skipped(self.skipped_upfront, len(manifest)))
        from ..data.augment import VALID_SEED, Augmenter

        augment = Augmenter.from_config(d.augment) if d.augment.enabled else None
        self.dataset = AudioDataset(manifest.subset(good), max_samples=crop, min_samples=d.min_samples,
                                    seed=self.cfg.trainer.seed, augment=augment)
        self.sampler = LengthBucketSampler(self.dataset.lengths,
                                           batch_size=d.batch_size if d.max_batch_samples is None else None,
                                           max_batch_samples=d.max_batch_samples, shuffle=True,
                                           seed=self.cfg.trainer.seed, num_replicas=self.env.world_size,
                                           rank=self.env.rank)
        self.valid = None
        if d.valid_manifest is not None:
            valid = read_manifest(d.valid_manifest)
            valid_good, valid_skipped = validate_manifest(valid, d.min_samples)
            if whole:
                valid_good = self._fitting(valid, valid_good, valid_skipped)
            # a task's metric is on whole utterances (as prune evaluate --task measures it)
            tasked = t is not None and t.kind != "none"
            fixed = Augmenter.from_config(d.augment, fixed_seed=VALID_SEED) if d.valid_augment else None
            self.valid = AudioDataset(valid.subset(valid_good), max_samples=None if tasked else d.max_samples,
                                      min_samples=d.min_samples, seed=self.cfg.trainer.seed, augment=fixed)
        self.vocab, self.targets = None, None
        if t is not None and t.kind != "none":  # every label checked here, before the teacher is loaded
            from .task import load_targets

            self.vocab, self.targets = load_targets(
                t.labels, t.column, t.kind, t.tokens, self.dataset.manifest.ids,
                self.valid.manifest.ids if self.valid is not None else [], d.train_manifest,
                d.valid_manifest or "the valid set")

    def _fitting(self, manifest, good: List[int], skipped: Dict[str, str]) -> List[int]:
        """``good`` without the files longer than data.max_samples (noted in ``skipped``); none left: an error."""
        cap = self.cfg.data.max_samples
        fits = [i for i in good if manifest.entries[i][1] <= cap]
        for i in sorted(set(good) - set(fits)):
            skipped[str(manifest.path(i))] = (f"{manifest.entries[i][1]} samples, longer than data.max_samples={cap} "
                                              f"(task ctc trains on whole utterances)")
        if not fits:
            raise ManifestError(f"{manifest}: every usable file is longer than data.max_samples={cap}; task ctc "
                                f"trains on whole utterances: raise data.max_samples")
        return fits

    def skipped_files(self) -> Dict[str, str]:
        """Every file left out of training so far (path -> reason)."""
        return {**self.skipped_upfront, **self.dataset.skipped}

    def _set_student(self, student: Student) -> None:
        """Install a student (gated, or cut after pruning) with a fresh optimizer and schedule."""
        cfg, env = self.cfg, self.env
        self.student = student.to(env.device)
        self.student.train()
        self.model = self.student
        if env.enabled:
            # closed blocks are skipped, and each rank draws its own gates: some parameters go
            # unused in a step on some ranks
            self.model = DistributedDataParallel(self.student, device_ids=[env.local_rank]
                                                 if env.device.type == "cuda" else None,
                                                 find_unused_parameters=True)
        o = cfg.optim
        gates = [p for n, p in self.student.named_parameters() if n.endswith("log_alpha")]
        gate_ids = {id(p) for p in gates}
        if cfg.get("task") is not None and cfg.task.freeze_extractor:  # the conv stack stays as it is
            for name, p in self.student.encoder.named_parameters():
                if ".feature_extractor." in f".{name}":
                    p.requires_grad_(False)
        head_ids = ({id(p) for p in self.objective.head.parameters()} if isinstance(self.objective, Task)
                    and cfg.task.lr is not None else set())  # the task head with its own lr (task.lr)
        weights = [p for p in self.student.parameters() if id(p) not in gate_ids | head_ids and p.requires_grad]
        groups = [{"params": weights, "lr": o.lr, "weight_decay": o.weight_decay, "name": "model"}]
        if head_ids:
            groups.append({"params": list(self.objective.head.parameters()), "lr": cfg.task.lr,
                           "weight_decay": o.weight_decay, "name": "task_head"})
        model_groups = len(groups)  # on the model's warm-up + decay schedule
        if self.stage == PRUNE:
            groups += [{"params": gates, "lr": o.gate_lr, "weight_decay": 0.0, "name": "gates"},
                       {"params": list(self.lagrangian.parameters()), "lr": o.lambda_lr, "weight_decay": 0.0,
                        "name": "lambdas"}]
        if self.stage in (FINAL, DONE) and o.final_lr is not None:
            groups[0]["lr"] = o.final_lr  # DPHuBERT's final distillation: half the pruning stage's lr
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(o.betas))
        stage_start, stage_steps = self.stage_span(self.stage)
        warmup = (o.warmup_steps if self.stage in (TEACHER, PRUNE) or o.final_warmup_steps is None
                  else o.final_warmup_steps)

        def model_lr(step: int) -> float:  # linear warm-up, then linear decay to 0 at the stage's end
            return warmup_linear_decay(step - stage_start, warmup, stage_steps)

        # the gates' and multipliers' lrs: constant, or on the model's schedule (DPHuBERT: one
        # LinearDecayLRScheduler over every param group, lightning.py configure_optimizers)
        gate_lr = model_lr if o.gate_lr_schedule == "model" else (lambda step: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [model_lr] * model_groups + [gate_lr] * (len(groups) - model_groups), last_epoch=-1)
        self._set_lr_for_step()
        use_cuda = env.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and cfg.trainer.precision == "fp16")

    def stage_span(self, stage: str) -> Tuple[int, int]:
        """(first step, number of steps) of ``stage``. One step counter runs through the stages:
        task.finetune_teacher_steps of the teacher stage, then trainer.prune_steps, then trainer.final_steps."""
        tr, n = self.cfg.trainer, self.cfg.task.finetune_teacher_steps
        final = (n + tr.prune_steps, tr.final_steps)  # DONE: a resume of a finished run is still on it
        return {TEACHER: (0, n), PRUNE: (n, tr.prune_steps), FINAL: final, DONE: final}[stage]

    @property
    def prune_step(self) -> int:
        """Steps into the pruning stage: the Lagrangian's warm-up counts from its start."""
        return self.step - self.cfg.task.finetune_teacher_steps

    def _set_lr_for_step(self) -> None:
        for group, fn, base in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas, self.scheduler.base_lrs):
            group["lr"] = base * fn(self.step)

    # ---------------------------------------------------------------------------- the loop
    def _batches(self) -> Iterator[Batch]:
        """Endless batches; (epoch, batch_in_epoch) is the data position a checkpoint records."""
        while True:
            self.sampler.set_epoch(self.epoch)
            self.dataset.set_epoch(self.epoch)
            whole_epoch, used = self.batch_in_epoch == 0, False
            for i, indices in enumerate(self.sampler):
                if i < self.batch_in_epoch:
                    continue  # resumed mid-epoch: skip what was consumed
                self.batch_in_epoch = i + 1
                batch = self.dataset.batch(indices)
                if batch is not None:
                    used = True
                    yield batch
            if whole_epoch and not used:  # every file passed the header check but none decodes
                manifest = self.dataset.manifest
                raise ManifestError(f"{manifest}: no usable audio, all {len(manifest)} files that passed the "
                                    f"header check failed to load\n{format_skipped(self.dataset.skipped)}")
            self.epoch += 1
            self.batch_in_epoch = 0

    def _next_batch(self, batches: Iterator[Batch]) -> Batch:
        """The next batch. A rank whose share of the data has no usable audio raises; under DDP the
        others learn it in the same step and stop too (rather than wait for it forever)."""
        try:
            batch, error = next(batches), None
        except ManifestError as e:
            batch, error = None, e
        if not all_ranks(error is None, self.env):
            raise error or ManifestError(f"rank {self.env.rank}: another process's share of the training data "
                                         f"has no usable audio (its log names the files); stopping all processes")
        return batch

    def _autocast(self):
        p = self.cfg.trainer.precision
        if p == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return torch.autocast(self.env.device.type, dtype=dtype)

    def _loss(self, batch: Batch) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The objective's loss on ``batch`` (+ the Lagrangian penalty while pruning) and its logs."""
        batch = batch.to(self.env.device)
        with self._autocast():
            with torch.no_grad():
                teacher_out = self.objective.teacher_output(self.teacher, batch)
            student_out = self.model(batch.waveforms, batch.lengths)
            loss, parts = self.objective.loss(student_out, teacher_out, batch)
        if self.stage == PRUNE:
            reg = self.lagrangian(self.student.encoder, self.prune_step)
            loss = loss + reg["penalty"]
            parts.update({k: v.detach() for k, v in reg.items()})
        return loss, parts

    def train(self) -> Path:
        tr = self.cfg.trainer
        # held: cleanup closes it on Ctrl-C, before the one line the CLI prints
        self.progress = progress = self._progress(self.cfg.task.finetune_teacher_steps + tr.prune_steps
                                                  + tr.final_steps)
        # with a bar on the terminal, log lines are written above it instead of through it
        with logging_redirect_tqdm() if progress is not None else contextlib.nullcontext():
            return self._train_steps(progress)

    def _train_steps(self, progress) -> Path:
        cfg, tr = self.cfg, self.cfg.trainer
        total = cfg.task.finetune_teacher_steps + tr.prune_steps + tr.final_steps
        if self.env.is_main and cfg.logging.tensorboard:  # here, not in setup: a failed setup writes nothing
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        batches = self._batches()
        t_last = time.perf_counter()
        while self.stage != DONE:
            if self.stage == TEACHER and self.step >= cfg.task.finetune_teacher_steps:
                self._finish_teacher()
                continue
            if self.stage == PRUNE and self.step >= sum(self.stage_span(PRUNE)):
                self._finish_pruning()
                continue
            if self.stage == FINAL and self.step >= total:
                self.stage = DONE
                break
            self.optimizer.zero_grad(set_to_none=True)
            parts: Dict[str, Tensor] = {}
            for micro in range(tr.grad_accum):
                batch = self._next_batch(batches)
                sync = micro == tr.grad_accum - 1 or not self.env.enabled
                with contextlib.nullcontext() if sync else self.model.no_sync():
                    loss, parts = self._loss(batch)
                    if nan_loss(self.step + 1):  # PRUNE_FAULT=nan_loss:STEP (tests)
                        loss = loss * float("nan")
                    self.scaler.scale(loss / tr.grad_accum).backward()
            if self.stage == PRUNE:
                self.lagrangian.flip_grads()  # ascent in the multipliers
            self.scaler.unscale_(self.optimizer)
            grads = [p for g in self.optimizer.param_groups for p in g["params"]]
            for p in grads:
                if p.grad is None:  # skipped closed blocks: the full computation gives them zeros
                    p.grad = torch.zeros_like(p)
            grad_norm = torch.nn.utils.clip_grad_norm_(grads, cfg.optim.clip_grad_norm or float("inf"))
            finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))  # one host sync a step
            maybe_fail("mid_step", self.step + 1)  # PRUNE_FAULT=mid_step:STEP (tests)
            if finite:
                self.scaler.step(self.optimizer)
                self.nonfinite_in_row = 0
            else:  # a non-finite loss or gradient never reaches the weights
                self.nonfinite_in_row += 1
                self.nonfinite_total += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)",
                            self.step, self.nonfinite_in_row)
                if self.nonfinite_in_row >= tr.max_nonfinite:
                    raise FloatingPointError(f"{self.nonfinite_in_row} non-finite steps in a row at step "
                                             f"{self.step}; stopping (trainer.max_nonfinite). The last "
                                             f"checkpoint is intact.")
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            self._set_lr_for_step()
            parts["grad_norm"] = grad_norm.detach()
            if self.stage == PRUNE and self.prune_step == self.lagrangian.warmup_steps and self.env.is_main:
                lagging = lag_warning(self.prune_step, self.lagrangian.target_sparsity,
                                      float(parts["expected_sparsity"]), cfg.optim.lambda_lr, tr.prune_steps)
                if lagging:
                    log.warning("%s", lagging)
            if self.step % tr.log_every == 0 or self.step == total:
                now = time.perf_counter()
                self._log(parts, (now - t_last) / tr.log_every)
                if self.env.is_main:
                    target = self.lagrangian.target_at(self.prune_step) if self.stage == PRUNE else None
                    log.info("%s", progress_line(self.step, total, self.stage, parts, target,
                                                 (now - t_last) / tr.log_every, self.objective.name))
                t_last = now
            if progress is not None:
                progress.update(1)
                if self.step % tr.log_every == 0:
                    progress.set_postfix(stage=self.stage, loss=f"{parts[self.objective.name].item():.3f}",
                                         **({"sparsity": f"{parts['expected_sparsity'].item():.3f}"}
                                            if "expected_sparsity" in parts else {}))
            if tr.valid_every and self.step % tr.valid_every == 0:
                self._validate()
            if self.step % tr.ckpt_every == 0:
                self.save_checkpoint()
            maybe_stall(self.step)  # PRUNE_FAULT=stall:STEP (tests)
        if progress is not None:
            progress.close()
        if self.step % tr.ckpt_every != 0:
            self.save_checkpoint()  # the finished state: a crash during export resumes straight into it
        self._validate("end")
        if self.env.is_main and self.skipped_files():
            log.warning("%s", format_skipped(self.skipped_files()))
        return self._export()

    # ------------------------------------------------------------------------ stage change
    def _finish_teacher(self) -> None:
        """The teacher stage is over: its validation is the fine-tuned teacher's task metric (the
        reference of a pruned model's); the fine-tuned weights become the frozen distillation
        teacher and the gated student's start, the task head goes on training with the student."""
        self._validate("fine-tuned teacher")
        self._adopt_teacher(self.student.encoder.state_dict())
        self.stage, self.objective = PRUNE, self.run_objective
        self._set_student(Student(self.gated, self.objective))
        maybe_fail("between_stages", self.step)  # PRUNE_FAULT=between_stages:STEP (tests)
        self.save_checkpoint()  # a crash now resumes into the pruning stage

    def _adopt_teacher(self, weights: Dict[str, Tensor]) -> None:
        """``weights`` (the fine-tuned encoder's) into the frozen teacher and the gated student."""
        self.teacher.load_state_dict(weights)
        self.gated.model.load_state_dict(weights)
        self.teacher_tuned = True

    def _finish_pruning(self) -> None:
        """Calibrate the gates onto the target if needed, cut the student, and go on distilling it.
        The student is validated (with its similarity to the teacher) just before and just after
        the cut, so a cut that broke the model shows in the log and the report."""
        gated: GatedEncoder = self.student.encoder
        self._check_ranks_agree(gated)
        self._validate("before cut")
        lag, p = self.cut_target, self.cfg.pruning  # the training's target unless pruning.cut_target_kind
        target_size = lag.target_size
        gated.eval()
        size = self.shaper.sized(lag.expected_size)  # uniform / shape / round_to forced at every measurement
        gates_size = size(gated).item()
        calibrated = (p.calibrate and not self.shaper.fixes_all(gated)
                      and abs(gates_size - target_size) > p.tolerance * target_size)
        if calibrated:
            calibrate(gated, size, target_size, p.tolerance)
            self.shaper.apply(gated)  # the forced units of the gates as calibrated
        refined = self._refine_latency(gated, size) if p.calibrate else None
        compiled = compile_encoder(gated)
        table_target = target_size if refined is None else refined["table_targets"][refined["chosen"]]
        self.cut = cut_record(lag, table_target, gates_size, lag.size_of(compiled.config), p, calibrated)
        if refined is not None:
            self.cut["latency_refine"] = refined
        if self.env.is_main:
            self._log_cut(self.cut)
        self.stage = FINAL
        self.objective.after_cut(hidden_kept(self.source_config, compiled.config))
        self._set_student(Student(compiled, self.objective))
        self._validate("after cut")
        maybe_fail("between_stages", self.step)  # PRUNE_FAULT=between_stages:STEP (tests)
        self.save_checkpoint()  # between stages: a crash now resumes into stage 2

    def _refine_latency(self, gated: GatedEncoder, size) -> Optional[Dict[str, Any]]:
        """With a latency cut and ``pruning.latency_refine`` > 0: time the calibrated cut here and
        re-calibrate (``prune.latency_refine``); its record, or None (not a latency cut, refine=0,
        or this machine cannot honour the table: then one log line says why)."""
        from .. import latency_refine

        lag, p = self.cut_target, self.cfg.pruning
        table = dict(lag.measure.settings).get("table")
        if table is None or p.latency_refine == 0 or self.shaper.fixes_all(gated):
            return None
        why = latency_refine.skip_reason(table, self.env.enabled)
        if why is not None:
            if self.env.is_main:
                log.info("pruning.latency_refine: not timing the cut (%s); the table's calibration stands", why)
            return None
        record = latency_refine.refine(gated, self.teacher, size, table, lag.target_size, lag.full, p.tolerance,
                                       p.latency_refine, apply=self.shaper.apply, processes=p.latency_processes)
        if self.env.is_main:
            log.info("pruning.latency_refine: asked %.2f %s; table targets %s, predicted %s, measured %s; chose round %d",
                     record["asked"], lag.measure.unit, _fmt(record["table_targets"]), _fmt(record["predicted"]),
                     _fmt(record["measured"]), record["chosen"])
        return record

    def _log_cut(self, cut: Dict[str, Any]) -> None:
        """One line on the cut: a loud warning when the training did not bring the size to the target."""
        warning = cut_warning(cut)
        if self.cut_target is not self.lagrangian:  # trained to one measure, cut to another: the cut decides by design
            log.info("pruning.cut_target_kind=%s: the gates (trained to a %s target) read %.2f %s, calibrated to %.2f",
                     cut["kind"], self.lagrangian.kind, cut["gates_size"], cut["unit"], cut["cut_size"])
        elif warning is not None:
            log.warning("%s", warning)
        elif cut["calibrated"]:
            log.warning("the gates ended at %.0f (%s) for a target of %.0f: thresholds shifted together to %.0f",
                        cut["gates_size"], cut["kind"], cut["target_size"], cut["cut_size"])
        else:
            why = "" if self.cfg.pruning.calibrate else " (pruning.calibrate=false)"
            log.info("the gates ended at %.0f (%s) for a target of %.0f; cut as they are%s", cut["gates_size"],
                     cut["kind"], cut["target_size"], why)

    def _check_ranks_agree(self, gated: GatedEncoder) -> None:
        """DDP must have kept every rank's gates identical: the cut is made from them."""
        if not self.env.enabled:
            return
        import torch.distributed as dist

        flat = torch.cat([p.detach().flatten() for p in gated.gate_parameters()])
        gathered = [torch.empty_like(flat) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, flat)
        if not all(torch.equal(g, flat) for g in gathered):
            raise RuntimeError("the ranks' gates differ after pruning: DDP did not synchronise them")
        log.info("rank %d: gates agree across %d ranks (checksum %.8f)", self.env.rank, self.env.world_size,
                 flat.double().sum().item())

    # -------------------------------------------------------------------------- checkpoints
    def _state(self) -> Dict[str, Any]:
        return {
            "step": self.step, "stage": self.stage, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "source_config": self.source_config.to_dict(),  # the unpruned architecture: export/inspect need no teacher
            "student_config": self.student.encoder.config.to_dict() if self.stage != PRUNE else None,
            "student": self.student.state_dict(),
            "lagrangian": self.lagrangian.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_row": self.nonfinite_in_row,  # a resume inside a bad stretch keeps counting
            "skipped_files": dict(self.dataset.skipped),  # found at read time: a resume may not re-read them
            "history": self.history,
            "cut": self.cut,  # the report's record of the cut, made once between the stages
            # a task run: its vocabulary (prune export CHECKPOINT writes the task head with it)
            "task_vocabulary": self.vocab.to_dict() if self.vocab is not None else None,
            # after a teacher stage: the fine-tuned teacher (the distillation target is in no other file)
            **({"teacher": self.teacher.state_dict()} if self.teacher_tuned else {}),
        }

    def save_checkpoint(self) -> Optional[Path]:
        # the weights are the same on every rank, so every rank stops here together
        bad = [name for name, t in [*self.student.state_dict().items(), *self.lagrangian.state_dict().items()]
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:  # never overwrite good checkpoints with a broken model (e.g. optim.lr=nan)
            raise FloatingPointError(f"step {self.step}: non-finite weights ({', '.join(bad[:3])}"
                                     f"{', ...' if len(bad) > 3 else ''}); checkpoint not written, the last "
                                     f"one is intact (check optim.lr, optim.gate_lr, optim.lambda_lr)")
        path = None
        if self.env.is_main:  # only rank 0 writes
            path = save_checkpoint(self.ckpt_dir, self.step, self._state(), self.cfg.trainer.keep_last)
        barrier(self.env)
        return path

    def _restore(self, state: Dict[str, Any]) -> None:
        check_resume_config(state["config"], OmegaConf.to_container(self.cfg, resolve=True), self.run_dir)
        self.stage = state["stage"]
        if "teacher" in state:  # past a teacher stage: the fine-tuned teacher
            self._adopt_teacher(state["teacher"])
        if self.stage != TEACHER:
            self.objective = self.run_objective
        if self.stage == PRUNE and self.cfg.task.finetune_teacher_steps > 0:
            self._set_student(Student(self.gated, self.objective))
        elif self.stage == TEACHER:
            pass  # setup installed the teacher-stage student; its weights are loaded below
        elif self.stage != PRUNE:
            compiled = build_student(self.cfg, self.source_config, cut_config=cut_config(state))
            self.objective.after_cut(hidden_kept(self.source_config, compiled.config))
            self._set_student(Student(compiled, self.objective))
        self.student.load_state_dict(state["student"])
        self.lagrangian.load_state_dict(state["lagrangian"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.nonfinite_total = state["nonfinite_total"]
        self.nonfinite_in_row = state.get("nonfinite_in_row", 0)  # absent in older checkpoints
        self.dataset.skipped.update(state.get("skipped_files", {}))
        self.history = state["history"]
        self.cut = state.get("cut")  # absent in older checkpoints
        self._set_lr_for_step()
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------------------ output
    def _export(self) -> Path:
        path = self.export_dir
        if self.env.is_main:
            for kind in ("tmp", "old"):  # the temp folders of an export killed half-way
                for stale in self.run_dir.glob(f".{path.name}.{kind}-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            model = self.student.encoder
            lag = self.lagrangian
            meta = {"target_kind": lag.kind, "target_sparsity": lag.target_sparsity,
                    "reached_sparsity": 1.0 - lag.size_of(model.config) / lag.full,
                    "target_reached_by": self.cut["target_reached_by"] if self.cut else None, "cut": self.cut,
                    "similarity": similarity_points(self.history), "steps": self.step,
                    "nonfinite_steps_skipped": self.nonfinite_total,
                    "skipped_files": self.skipped_files(), "history": self.history[-1:] if self.history else [],
                    "config": OmegaConf.to_container(self.cfg, resolve=True)}
            extra = None
            if isinstance(self.objective, Task):
                meta["task"] = self._task_record()
                extra = self._task_writer(meta["task"])
            write_model(model, path, source=self.source_config, metadata=meta, overwrite=True, extra=extra)
            from ..evaluate.report import write_report

            write_report(self.run_dir, self.teacher, model, self.cfg, meta)
        barrier(self.env)
        return path

    def _task_record(self) -> Dict[str, Any]:
        """The task's settings and its validation metric at each named point, for the export and report."""
        from .task import task_record

        return task_record(self.cfg.task, self.cfg.distill.weight, self.history, len(self.vocab))

    def _task_writer(self, record: Dict[str, Any]):
        """What writes task_head.safetensors + task.json into the export's temporary folder."""
        from .task import task_writer

        return task_writer(self.objective.head, record, self.source_config.encoder_num_layers + 1, self.vocab)

    @torch.no_grad()
    def _validate(self, point: Optional[str] = None) -> Optional[float]:
        """The valid set's distillation loss (the distillation term alone) and each distilled
        layer's cosine / L1 to the teacher, batch means (the student in eval mode: a gated one
        uses its eval masks). ``point`` names the entry for the report ("before cut", ...)."""
        if self.valid is None or not self.env.is_main:
            return None
        self.student.eval()
        total, count, size = 0.0, 0, self.cfg.data.batch_size
        cos, l1 = 0.0, 0.0  # (layers,) sums once a batch has been seen
        task = isinstance(self.objective, Task)
        distilling = not task or self.objective.distillation is not None
        task_loss, hits, of = 0.0, 0.0, 0.0  # the task loss and the metric's numerator, denominator
        for start in range(0, len(self.valid), size):
            batch = self.valid.batch(range(start, min(start + size, len(self.valid))))
            if batch is None:
                continue
            if task:
                batch = batch.to(self.env.device)
                with self._autocast():
                    teacher_out = self.objective.teacher_output(self.teacher, batch)
                    student_out = self.model(batch.waveforms, batch.lengths)
                    _, parts = self.objective.loss(student_out, teacher_out, batch)
                a, b = self.objective.counts(student_out, batch)
                hits, of, task_loss = hits + a, of + b, task_loss + parts["task"].item()
                loss = parts.get("distill", parts["task"])
            else:
                loss, parts = self._loss(batch) if self.stage != PRUNE else self._valid_loss(batch)
            total += loss.item()
            if distilling:
                cos, l1 = cos + parts["layer_cos"].cpu(), l1 + parts["layer_l1"].cpu()
            count += 1
        self.student.train()
        value = total / max(count, 1)
        entry: Dict[str, Any] = {"step": self.step, "stage": self.stage}
        if distilling:
            entry["valid_distill_loss"] = value
        if count and distilling:
            entry.update(layers=list(self.objective.layers), cos=(cos / count).tolist(), l1=(l1 / count).tolist())
        metric = ""
        if task:
            name = self.task_metric
            entry.update(valid_task_loss=task_loss / max(count, 1), metric=name, valid_metric=hits / max(of, 1))
            metric = f"valid task loss {entry['valid_task_loss']:.4f}, {name} {entry['valid_metric']:.4f}"
        if point is not None:
            entry["point"] = point
        self.history.append(entry)
        if self.writer is not None:
            if distilling:
                self.writer.add_scalar("valid/distill_loss", value, self.step)
            if task:
                self.writer.add_scalar("valid/task_loss", entry["valid_task_loss"], self.step)
                self.writer.add_scalar(f"valid/{self.task_metric}", entry["valid_metric"], self.step)
        similarity = (", cosine to the teacher " + " ".join(f"{c:.3f}" for c in entry["cos"])
                      + f" (layers {', '.join(map(str, entry['layers']))})") if count and distilling else ""
        what = (f"valid distillation loss {value:.4f}{similarity}" if distilling else "")
        what = "; ".join(x for x in (metric, what) if x)
        log.info("step %d (%s): %s%s", self.step, self.stage, what, f" [{point}]" if point else "")
        return entry.get("valid_metric", value)

    @property
    def task_metric(self) -> str:
        """PER / CER / WER / accuracy: the task's validation metric (``task.metric_name``)."""
        from .task import metric_name

        t = self.cfg.task
        return metric_name(t.kind, t.column, t.tokens)

    def _valid_loss(self, batch: Batch) -> Tuple[Tensor, Dict[str, Tensor]]:
        stage, self.stage = self.stage, FINAL  # the distillation term alone
        try:
            return self._loss(batch)
        finally:
            self.stage = stage

    def _log(self, parts: Dict[str, Tensor], seconds_per_step: float) -> None:
        if self.writer is None:
            return
        w = self.writer
        for k, v in parts.items():
            if v.dim() == 0:
                w.add_scalar(f"train/{k}", float(v), self.step)
            else:  # one value per distilled layer
                for layer, x in zip(self.objective.layers, v.tolist()):
                    w.add_scalar(f"train/{k}/{layer}", x, self.step)
        w.add_scalar("train/seconds_per_step", seconds_per_step, self.step)
        for g in self.optimizer.param_groups:
            w.add_scalar(f"lr/{g['name']}", g["lr"], self.step)
        if self.stage == PRUNE:
            lag = self.lagrangian
            w.add_scalar("pruning/target_sparsity", lag.target_at(self.prune_step), self.step)
            w.add_scalar("pruning/lambda1", lag.lambda1.item(), self.step)
            w.add_scalar("pruning/lambda2", lag.lambda2.item(), self.step)
            gated: GatedEncoder = self.student.encoder
            with torch.no_grad():
                w.add_scalar("pruning/expected_params", gated.expected_params().item(), self.step)
                w.add_scalar("pruning/expected_macs", gated.expected_macs(lag.seconds).item(), self.step)
                for name, gate in gated.named_modules():
                    if isinstance(gate, HardConcrete) and gate.n > 1:  # per-layer heads / units / channels
                        w.add_histogram(f"keep_prob/{name}", gate.keep_prob(), self.step)

    def _progress(self, total: int):
        return progress_bar(total, self.step, self.env.is_main and self.cfg.logging.progress)

    def cleanup(self) -> None:
        if getattr(self, "progress", None) is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
        from .distributed import shutdown_distributed

        shutdown_distributed()


class Interrupted(Exception):
    """Ctrl-C during ``run_pruning``: the ``step`` the run stopped at and its newest ``checkpoint``
    (None: none yet, a resume starts from step 0); ``step`` None: stopped before training started,
    the run directory left as it was."""

    def __init__(self, step: Optional[int] = None, checkpoint: Optional[Path] = None):
        super().__init__(f"stopped at step {step}" if step is not None else "stopped before training started")
        self.step, self.checkpoint = step, checkpoint


def run_pruning(cfg: DictConfig, run_dir: Path) -> Path:
    """Validate, then run the recipe in ``run_dir`` (resuming if it holds checkpoints); returns the
    export. The run directory is locked for this process; a start that fails leaves it as it was
    (``rundir.run_claimed``). Ctrl-C raises ``Interrupted``."""
    cfg = absolute_paths(cfg)
    made: List[PruneRecipe] = []

    def recipe() -> PruneRecipe:
        made.append(PruneRecipe(cfg, run_dir))
        return made[0]

    try:
        return run_claimed(run_dir, cfg, lambda: validate(cfg, run_dir), recipe, main=is_rank_zero())
    except KeyboardInterrupt:
        if not made or not made[0].started:
            raise Interrupted() from None
        saved = checkpoint_files(made[0].ckpt_dir)
        raise Interrupted(made[0].step, saved[0][1] if saved else None) from None


def progress_line(step: int, total: int, stage: str, parts: Dict[str, Tensor], target: Optional[float],
                  seconds_per_step: float, loss_key: str = "distill") -> str:
    """``step 120/2000 (prune)  loss -1.2345  expected sparsity 0.412 (target 0.300)  0.52 s/step``:
    ``parts`` are the step's loss terms (the objective's loss under ``loss_key``), ``target`` the
    warmed-up target sparsity while pruning."""
    line = f"step {step}/{total} ({stage})  loss {float(parts[loss_key]):.4f}"
    if "expected_sparsity" in parts:
        line += f"  expected sparsity {float(parts['expected_sparsity']):.3f}"
        if target is not None:
            line += f" (target {target:.3f})"
    return f"{line}  {seconds_per_step:.2f} s/step"


def shaper_of(p: DictConfig, teacher: EncoderConfig) -> Tuple[Shaper, Shape]:
    """The cut's shaper for ``pruning`` (uniform, shape, round_to), the shape checked against the
    loaded teacher (a one-line ConfigError before any training)."""
    from ..structures import GateConfig
    from .config import ConfigError

    shape = Shape.from_config(p.get("shape"))
    uniform, round_to = bool(p.get("uniform", False)), p.get("round_to", 1)
    try:
        check_shape(shape, teacher, GateConfig(**p.gates), uniform, round_to)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Shaper(uniform, shape, round_to), shape


def _fmt(values: List[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def cut_record(lag: Lagrangian, target_size: float, gates_size: float, cut_size: float, p: DictConfig,
               calibrated: bool) -> Dict[str, Any]:
    """What the cut did, in the target's unit (params, or MACs on ``pruning.macs_seconds``):
    ``gates_size`` is where the Lagrangian left the gates (eval masks), ``cut_size`` the cut model's.
    ``shift`` is the move between them as a fraction of the target size; more than
    ``pruning.max_cut_shift`` means the training did not reach the target, the cut did
    (``target_reached_by``: "training", "cut", or None when the cut model misses the target by more
    than ``pruning.tolerance``)."""
    shift = abs(cut_size - gates_size) / target_size
    reached = abs(cut_size - target_size) <= p.tolerance * target_size
    return {"kind": lag.kind, "unit": MEASURES[lag.kind].unit, "target_size": target_size,
            "gates_size": gates_size, "cut_size": cut_size, "gates_sparsity": 1.0 - gates_size / lag.full,
            "cut_sparsity": 1.0 - cut_size / lag.full, "shift": shift, "max_cut_shift": p.max_cut_shift,
            "calibrated": calibrated,
            "target_reached_by": None if not reached else "cut" if shift > p.max_cut_shift else "training"}


# At the end of the target's warm-up the gates should hold about the target size; more than this
# fraction above it and the rest of the stage rarely closes the gap (a short run with DPHuBERT's
# lambda_lr, made for 50k steps, ended at 0.78 of a 0.90 target): say so then, not at the cut.
LAG_WARNING = 0.25


def lag_warning(step: int, target_sparsity: float, expected_sparsity: float, lambda_lr: float,
                prune_steps: int) -> Optional[str]:
    """The early line for a Lagrangian that lags its target at the end of the warm-up (None when
    the expected size is within ``LAG_WARNING`` of the target size)."""
    kept, target = 1.0 - expected_sparsity, 1.0 - target_sparsity
    if kept <= target * (1.0 + LAG_WARNING):
        return None
    return (f"step {step}: the size target reached its final sparsity {target_sparsity:.3f}, but the gates' expected "
            f"sparsity is {expected_sparsity:.3f} ({kept / target - 1.0:.0%} above the target size); the "
            f"Lagrangian lags and the cut may have to make up the rest. With {prune_steps} pruning steps raise "
            f"optim.lambda_lr (now {lambda_lr:g}; 0.2-0.5 suit a few thousand steps) or lengthen trainer.prune_steps")


def cut_warning(cut: Dict[str, Any]) -> Optional[str]:
    """The loud line for a cut the training did not prepare (None when it did)."""
    if cut["target_reached_by"] == "training":
        return None
    gap = (cut["gates_size"] - cut["target_size"]) / cut["target_size"]
    ended = (f"the training did not reach the size target: the gates ended at {cut['gates_size']:,.0f} {cut['unit']}, "
             f"{abs(gap):.0%} {'above' if gap > 0 else 'below'} the target of {cut['target_size']:,.0f}")
    if cut["target_reached_by"] == "cut":
        what = (f"the cut shifted every threshold to {cut['cut_size']:,.0f} (more than pruning.max_cut_shift="
                f"{cut['max_cut_shift']:g} of the target): the pruned model is the cut's choice, not the training's")
    else:
        what = (f"the model is cut at {cut['cut_size']:,.0f}, off the target"
                + ("" if cut["calibrated"] else " (pruning.calibrate=false)"))
    return (f"{ended}; {what}. Give the pruning stage more room: more trainer.prune_steps, a shorter "
            f"pruning.warmup_steps or a higher optim.lambda_lr")


def similarity_points(history: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The similarity to the teacher at the run's named validation points (the last of each:
    a resumed run may have validated twice), for the report; None without a valid set."""
    points = {e["point"]: e for e in history if "point" in e and "cos" in e}
    if not points:
        return None
    layers = next(iter(points.values()))["layers"]
    return {"layers": layers, "points": {name: {k: e[k] for k in ("step", "stage", "valid_distill_loss", "cos", "l1")}
                                         for name, e in points.items()}}
