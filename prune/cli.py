"""The ``prune`` command line.

    prune train RECIPE [key=value ...] [--multirun]     prune -> final distillation -> export
    prune pretrain RECIPE [key=value ...]               pre-train a small HuBERT from scratch (the demo teacher)
    prune finetune MODEL task=ctc task.labels=FILE      fine-tune any checkpoint on a task (no pruning)
    prune resume RUN_DIR                                continue a stopped run where it stopped
    prune export CHECKPOINT OUT                         export the student of a training checkpoint
    prune evaluate MODEL [--manifest M] [--probe DIR]   hidden states vs the teacher; phone-recognition PER
                         [--task MANIFEST]              the saved task head's PER / accuracy
    prune inspect PATH                                  size and structure of any supported checkpoint
    prune preview [--preset P] [--sparsity S] [--uniform]  gate a preset with seeded random gates, cut, export
                  [--head-dims]                       ... the dims inside the heads gated too
    prune convert MODEL OUT.onnx --to onnx [--layers K ...] [--quantize int8]   an ONNX graph, checked with onnxruntime
    prune convert MODEL OUT --to hf                     a transformers folder (AutoModel.from_pretrained)
    prune manifest FOLDER OUT_DIR                       train.tsv + valid.tsv for a folder of audio
    prune profile [--preset P | MODEL] --out FILE       a latency table of this machine (pruning.target_kind=latency)
    prune extract MODEL AUDIO --layer K --out DIR       hidden states of every file, one .npy each

`prune train` alone lists the recipes; `prune train RECIPE --help` lists every config key with the
recipe's value and meaning. Every key can be overridden: trainer.prune_steps=1000.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

log = logging.getLogger("prune")


def _fail(command: str, error: BaseException) -> "SystemExit":
    return SystemExit(f"prune {command}: {error}")


# ------------------------------------------------------------------------------------ train
def run_training(cfg, run_dir: Path, command: str = "train") -> Path:
    """Run the recipe in ``run_dir`` (``prune.train.recipe.run_pruning``), then print where its
    outputs are. Ctrl-C: one line (where it stopped, how to go on) and exit status 130."""
    from .train.recipe import Interrupted, run_pruning
    from .train.rundir import is_rank_zero

    try:
        export = run_pruning(cfg, run_dir)
    except Interrupted as stop:
        if is_rank_zero():
            print(_stopped(command, run_dir, stop), file=sys.stderr)
        raise SystemExit(130) from None
    if is_rank_zero():
        report = (run_dir / "report.txt").read_text() if (run_dir / "report.txt").exists() else ""
        print(report)
        print(f"export      : {export}   (prune.load_pruned({str(export)!r}))")
        print(f"report      : {run_dir / 'report.txt'}, {run_dir / 'report.json'}, {run_dir / 'layers.png'}")
        print(f"tensorboard : tensorboard --logdir {run_dir / 'tensorboard'}")
        print(f"checkpoints : {run_dir / 'checkpoints'}   (prune resume {run_dir})")
    return export


def _stopped(command: str, run_dir: Path, stop) -> str:
    """The one line a Ctrl-C prints: where the run stopped and how to continue it."""
    if stop.step is None:
        return f"prune {command}: interrupted before training started; {run_dir} is as it was"
    last = str(stop.checkpoint) if stop.checkpoint else "none yet (a resume starts from step 0)"
    return f"prune {command}: stopped at step {stop.step}; last checkpoint: {last}; " \
           f"continue with: prune resume {run_dir}"


# Hydra's flags that take a value (``--cfg job``): not overrides, and not a recipe name
HYDRA_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun")
HYDRA_INFO = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")  # --info [WHAT]


def _split_args(argv: List[str]) -> Tuple[List[str], List[str]]:
    """(Hydra flags with their values, everything else) in the order given."""
    flags, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        takes_value = arg in HYDRA_VALUE_FLAGS or (arg in ("--info", "-i") and i + 1 < len(argv)
                                                   and argv[i + 1] in HYDRA_INFO)
        if arg.startswith("-"):
            flags += argv[i:i + 2] if takes_value else [arg]
            i += 2 if takes_value else 1
        else:
            rest.append(arg)
            i += 1
    return flags, rest


def _pick_recipe(command: str, argv: List[str]) -> Tuple[Optional[str], List[str], List[str]]:
    """(recipe or None, Hydra flags, overrides): the recipe is the first argument that is not a flag
    or an override, checked against the command's recipes (one of the other command's is named as such)."""
    from importlib.resources import files

    from .train.usage import RECIPE_PACKAGES

    flags, rest = _split_args(argv)
    recipe = None
    if rest and "=" not in rest[0]:
        recipe, rest = rest[0], rest[1:]
    available = sorted(p.name[:-5] for p in files(RECIPE_PACKAGES[command]).iterdir() if p.name.endswith(".yaml"))
    if recipe is not None and recipe not in available:
        owners = [other for other, package in RECIPE_PACKAGES.items()
                  if other != command and files(package).joinpath(f"{recipe}.yaml").is_file()]
        hint = f" ({recipe} is a `prune {owners[0]}` recipe)" if owners else ""
        raise SystemExit(f"prune {command}: unknown recipe {recipe!r}{hint}; choose from {', '.join(available)}")
    return recipe, flags, rest


def _help_or_recipe_list(command: str, recipe: Optional[str], flags: List[str]) -> None:
    """``--help``: the recipes, groups and keys (exit 0); no recipe: the recipes and how to run one
    (exit 2, nothing started)."""
    from .train.usage import pretrain_help, recipe_list, train_help

    if "--help" in flags or "-h" in flags:
        print(train_help(recipe) if command == "train" else pretrain_help(recipe))
        raise SystemExit(0)
    if recipe is None:
        print(recipe_list(command), file=sys.stderr)
        raise SystemExit(2)


def _run_dir_arg(command: str, argv: List[str]) -> Optional[str]:
    """The ``hydra.run.dir=`` override, checked writable now: Hydra makes the folder before our
    own checks run."""
    from .train.config import ConfigError, check_run_dir

    run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if not run_dirs:
        return None
    try:
        check_run_dir(Path(run_dirs[-1]))
    except ConfigError as e:
        raise _fail(command, e)
    return run_dirs[-1]


def _check_command_line(command: str, recipe: str, overrides: List[str], multirun: bool) -> List[str]:
    """Every override's key (and, for a sweep, every job's config) checked before Hydra starts;
    returns the extra overrides a sweep needs (job folders named by the swept values)."""
    from .train.config import CONFIG_PACKAGES, ConfigError, TrainConfig
    from .train.overrides import check_overrides, config_groups

    try:
        if command == "pretrain":
            from .pretrain.recipe import PretrainConfig

            check_overrides(overrides, PretrainConfig, config_groups(CONFIG_PACKAGES["pretrain"]), command="pretrain")
            return []
        check_overrides(overrides, TrainConfig, config_groups(CONFIG_PACKAGES["train"]))
        if not multirun:
            return []
        from .train.multirun import check_sweep, dirname_override

        check_sweep(recipe, overrides)
        return [dirname_override(overrides)]
    except ConfigError as e:
        raise _fail(command, e)


def train(argv: List[str]) -> None:
    """Hand the command line to Hydra, with recipes/ as the primary config path."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .train.config import ConfigError, searchpath, typed
    from .train.multirun import Sweep

    recipe, flags, overrides = _pick_recipe("train", argv)
    _help_or_recipe_list("train", recipe, flags)
    multirun = "--multirun" in flags or "-m" in flags
    extra = _check_command_line("train", recipe, overrides, multirun)
    sweep = Sweep()

    @hydra.main(version_base="1.3", config_path="pkg://prune.recipes", config_name=recipe)
    def entry(cfg) -> None:
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # a failed job is recorded, and the sweep goes on
            sweep.run(lambda: run_training(typed(cfg), run_dir), run_dir, hydra_cfg.job.override_dirname,
                      Path(hydra_cfg.sweep.dir))
            return
        try:
            run_training(typed(cfg), run_dir)
        except (ConfigError, ValueError, OSError, FloatingPointError) as e:
            raise _fail("train", e)

    import os

    run_dir = _run_dir_arg("train", overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and run_dir is None:
        raise SystemExit("prune train: under torchrun, give hydra.run.dir=PATH so that every process "
                         "works in the same run directory")
    # Hydra's parser wants flags before overrides
    sys.argv = ["prune train", *flags, *overrides, searchpath("train"), *extra]
    entry()
    if multirun:
        raise SystemExit(sweep.finish())


# --------------------------------------------------------------------------------- finetune
FINETUNE_RECIPE = "finetune_demo"  # what `prune finetune MODEL` starts from (recipes/finetune_demo.yaml)


def finetune(argv: List[str]) -> None:
    """``prune finetune MODEL [key=value ...]``: ``prune train finetune_demo`` with MODEL (anything
    load_pretrained reads) as the model to train: no pruning, the task loss (``task.*``), the
    trainer's run directory, checkpoints, resume, validation, TensorBoard and report."""
    flags, rest = _split_args(argv)
    if "--help" in flags or "-h" in flags or not rest or "=" in rest[0]:
        from .train.usage import train_help

        print("usage: prune finetune MODEL [key=value ...]   (MODEL: an export folder, a Hugging Face folder, a "
              "fairseq / torchaudio file)\n" + train_help(FINETUNE_RECIPE), file=sys.stdout if rest else sys.stderr)
        raise SystemExit(0 if ("--help" in flags or "-h" in flags) else 2)
    model, overrides = rest[0], rest[1:]
    if not Path(model).exists():
        raise SystemExit(f"prune finetune: {model} does not exist (give an export folder, a Hugging Face folder "
                         f"or a fairseq / torchaudio checkpoint)")
    train([FINETUNE_RECIPE, *flags, "teacher.preset=null", f"teacher.checkpoint={os.path.abspath(model)}",
           *overrides])


# --------------------------------------------------------------------------------- pretrain
def pretrain(argv: List[str]) -> None:
    """``prune pretrain [RECIPE] key=value ...``: Hydra with recipes/pretrain/ as the config path."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from .train.config import ConfigError, searchpath
    from .pretrain.recipe import run_pretraining, typed_pretrain

    recipe, flags, overrides = _pick_recipe("pretrain", argv)
    _help_or_recipe_list("pretrain", recipe, flags)
    _check_command_line("pretrain", recipe, overrides, multirun=False)
    _run_dir_arg("pretrain", overrides)

    @hydra.main(version_base="1.3", config_path="pkg://prune.recipes.pretrain", config_name=recipe)
    def entry(cfg) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            export = run_pretraining(typed_pretrain(cfg), run_dir)
        except (ConfigError, ValueError, OSError, FloatingPointError) as e:
            raise _fail("pretrain", e)
        probe = run_dir / "probe.txt"
        if probe.exists():
            print(probe.read_text().strip())
        print(f"export      : {export}   (prune.load_pruned({str(export)!r}))")
        print(f"tensorboard : tensorboard --logdir {run_dir / 'tensorboard'}")
        print(f"checkpoints : {run_dir / 'checkpoints'}   (run the same command again to resume)")

    sys.argv = ["prune pretrain", *flags, *overrides, searchpath("pretrain")]
    entry()


def resume(args: argparse.Namespace) -> int:
    """Continue the run in RUN_DIR with its recorded config; ``KEY=PATH`` gives a moved file's new
    place (path keys only). A finished run is left alone."""
    from .train.config import PATH_KEYS, ConfigError
    from .train.resume import finished_export, recorded_config

    run_dir = Path(args.run_dir)
    cfg = recorded_config(run_dir, args.paths)
    export = finished_export(run_dir)
    if export is not None:
        print(f"{run_dir} is finished (export at {export}); nothing to resume")
        return 0
    _console_logging(run_dir)
    try:
        run_training(cfg, run_dir, "resume")
    except ConfigError as e:
        key = str(e).split(":", 1)[0]
        if key in PATH_KEYS:  # a file the run was made with is gone: say how to point to its new place
            raise ConfigError(f"{e}; if it moved, give its new place: prune resume {run_dir} {key}=NEW_PATH") from None
        raise
    return 0


def _console_logging(run_dir: Path) -> None:
    # delay: the log file opens at its first line (a resume that fails before starting leaves none)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(run_dir / "resume.log", delay=True)])


# ------------------------------------------------------------------------------- utilities
def export(args: argparse.Namespace) -> int:
    """Export the student held by a training checkpoint (cut first if it is still gated)."""
    from .train.student import export_training_checkpoint

    state = export_training_checkpoint(Path(args.checkpoint), Path(args.out), args.overwrite)
    head = " with its task head" if (Path(args.out) / "task.json").is_file() else ""
    print(f"exported step {state['step']} ({state['stage']} stage) to {Path(args.out)}{head}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    if args.manifest is None and args.probe is None and args.task is None:
        raise ValueError("give --manifest (compare with the teacher), --probe (phone recognition), --task MANIFEST "
                         "(the saved task head's metric), or several")
    if args.task is not None:  # first: a model without a task head fails before anything runs
        from .evaluate.task import evaluate_task

        r = evaluate_task(args.model, args.task, args.labels, args.batch_size)
        print(f"task {r['kind']} ({r['column']} of {r['labels']}) on {args.task} ({r['files']} files): "
              f"{r['metric']} {r['value']:.4f}")
    if args.manifest is not None:
        from .evaluate.similarity import evaluate_against_teacher

        print(evaluate_against_teacher(args.model, args.teacher, args.manifest, args.batch_size, args.max_samples))
    if args.probe is not None:
        from .checkpoints import load_pretrained
        from .evaluate.probe import phone_probe

        model = load_pretrained(args.model)
        from .evaluate.report import per_text

        result = phone_probe(model, Path(args.probe), steps=args.probe_steps, seed=args.probe_seeds)
        print(f"phone probe on {args.probe} ({result['train_files']} train / {result['valid_files']} valid files, "
              f"{args.probe_steps} steps, seeds {args.probe_seeds}): PER train {result['train_per']:.3f}, "
              f"valid {per_text(result)}")
        if args.probe_floor:
            from .evaluate.report import random_init_like

            floor = phone_probe(random_init_like(model, seed=0), Path(args.probe), steps=args.probe_steps,
                                seed=args.probe_seeds)
            print(f"random-init floor (this architecture, random weights): PER train {floor['train_per']:.3f}, "
                  f"valid {per_text(floor)}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    from .checkpoints.inspect import inspect_checkpoint
    from .train.student import inspect_training_checkpoint, read_training_checkpoint

    state = read_training_checkpoint(Path(args.path))  # prune's own checkpoints/step_*.pt
    print(inspect_checkpoint(args.path) if state is None else inspect_training_checkpoint(Path(args.path), state))
    return 0


def preview(args: argparse.Namespace) -> int:
    """Gate a preset with seeded gates at --sparsity, cut, check, time and export it
    (``prune.preview.preview``); print before/after."""
    from .evaluate.report import comparison_table
    from .measured import fastest, spread
    from .models import PRESETS
    from .preview import preview as run_preview

    if args.preset not in PRESETS:
        raise ValueError(f"unknown --preset {args.preset!r}; choose from {', '.join(sorted(PRESETS))}")
    if not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.head_dims and args.uniform:
        raise ValueError("--head-dims with --uniform: a uniform shape keeps transformers' head width; drop one")
    torch.set_num_threads(args.threads)
    result = run_preview(args.preset, args.sparsity, args.out, seed=args.seed, seconds=args.seconds,
                         repeats=args.repeats, overwrite=args.overwrite, progress=print, uniform=args.uniform,
                         head_dims=args.head_dims)
    times = result.times
    print(comparison_table([("unpruned", result.before, fastest(times["unpruned"]), None),
                            ("pruned", result.after, fastest(times["pruned"]), None)],
                           f"CPU forward, 2 x {args.seconds:g} s (fastest of {args.repeats})"))
    print(f"latency spread (median/max above the fastest): unpruned {spread(times['unpruned'])}, "
          f"pruned {spread(times['pruned'])}")
    print(f"param sparsity reached: {result.reached:.4f} (asked {args.sparsity})")
    print(f"conv channels : {_layers(result.after['conv_channels'])}")
    print(f"heads         : {_layers(result.after['heads'])}   ('-' = attention block removed)")
    print(f"FFN units     : {_layers(result.after['ffn_units'])}   ('-' = FFN block removed)")
    if args.head_dims:
        print(f"q/k dims/head : {_layers(result.after['head_qk_dims'])}")
        print(f"v dims/head   : {_layers(result.after['head_v_dims'])}")
    print(f"pruned vs gated model, max relative error over all hidden states: {result.error:.2e}")
    print(f"exported to {result.path}  (load with: prune.load_pruned({str(result.path)!r}))")
    return 0


def profile(args: argparse.Namespace) -> int:
    """``prune profile``: time each block kind of a model over a grid of kept widths on this machine and
    write the latency table (``prune.latency_profile``) for pruning.target_kind=latency."""
    from .latency import LatencyTableError, save_table
    from .latency_profile import check_clock, check_fit_states, grid_sizes, profile as run_profile
    from .models import PRESETS, preset_config

    if (args.model is None) == (args.preset is None):
        raise ValueError("give either --preset P or MODEL (a checkpoint prune inspect reads), not both or neither")
    if args.preset is not None and args.preset not in PRESETS:
        raise ValueError(f"unknown --preset {args.preset!r}; choose from {', '.join(sorted(PRESETS))}")
    for name in ("batch", "threads", "repeats", "conv_points", "ffn_points"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.head_points is not None and args.head_points < 1:
        raise ValueError(f"--head-points must be >= 1, got {args.head_points}")
    check_fit_states(args.fit_states)
    if not args.seconds >= 0.025:
        raise ValueError(f"--seconds must be at least one frame (0.025 s), got {args.seconds}")
    check_clock(args.clock, args.threads, args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here; profile with --device cpu or on the GPU "
                         "machine")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'latency.json'}")
    if args.preset is not None:
        config = preset_config(args.preset)
    else:
        from .checkpoints import load_pretrained

        config = load_pretrained(args.model).config
    torch.set_num_threads(args.threads)
    table = run_profile(config, args.seconds, args.batch, args.threads, args.device, args.repeats,
                        args.conv_points, args.ffn_points, args.head_points, progress=print, clock=args.clock,
                        fit_states=args.fit_states)
    try:
        save_table(table, out)
    except LatencyTableError as e:  # a table profile made itself should always be valid
        raise ValueError(str(e)) from None
    conv, projection, heads, units = grid_sizes(table)
    print(f"latency table: {out} ({conv} conv, {projection} projection, {heads} attention, {units} FFN grid points; "
          f"{args.seconds:g} s, batch {args.batch}, {args.threads} thread(s), {args.device}, {args.clock} clock; "
          f"whole pass = {table['scale']:.3f} x parts {1e3 * table['offset']:+.2f} ms, fitted to "
          f"{len(table['whole']['fit'])} whole passes; allocator: {table['allocator']}); use it with "
          f"pruning.target_kind=latency pruning.latency_table={out} trainer.threads={args.threads}")
    return 0


def convert(args: argparse.Namespace) -> int:
    """``prune convert MODEL OUT --to FORMAT``: write a model in another format (and check it)."""
    from .checkpoints.convert import convert as convert_model
    from .checkpoints.hf_export import TransformersUnavailable
    from .checkpoints.onnx_export import OnnxUnavailable

    try:
        lines = convert_model(args.model, args.out, args.to, args.layers, args.quantize, args.overwrite)
    except (OnnxUnavailable, TransformersUnavailable) as e:
        raise _fail("convert", e)
    print("\n".join(lines))
    return 0


def manifest(args: argparse.Namespace) -> int:
    """``prune manifest FOLDER OUT_DIR``: OUT_DIR/train.tsv and OUT_DIR/valid.tsv for the audio under FOLDER."""
    from .data.manifest import AUDIO_EXTENSIONS, make_manifests

    made = make_manifests(args.folder, args.out_dir, args.valid_fraction, args.seed, args.ext or AUDIO_EXTENSIONS,
                          args.absolute)
    for path, reason in made.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    train, valid = made.entries
    print(f"wrote {made.train}: {len(train)} files; "
          f"{f'{made.valid}: {len(valid)} files' if made.valid else 'no valid split (--valid-fraction 0)'}; "
          f"{made.hours:.2f} h at 16 kHz in all, {len(made.skipped)} skipped")
    print(f"train on it: prune train RECIPE data.train_manifest={made.train}"
          + (f" data.valid_manifest={made.valid}" if made.valid else " data.valid_manifest=null"))
    return 0


def extract(args: argparse.Namespace) -> int:
    """``prune extract MODEL AUDIO --layer K --out DIR``: one .npy of hidden states per audio file."""
    from .extract import SETTINGS_FILE, extract_features
    from .data.dataset import format_skipped

    # progress lines (off a terminal) and skipped files go to stderr
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        done = extract_features(args.model, args.audio, args.layer, args.out, float16=args.float16, onnx=args.onnx,
                                max_batch_seconds=args.max_batch_seconds, threads=args.threads)
    except KeyboardInterrupt:
        print("prune extract: interrupted; every .npy written is complete, run the same command again to go on",
              file=sys.stderr)
        raise SystemExit(130) from None
    if done.skipped:
        print(format_skipped(done.skipped, done.files), file=sys.stderr)
    print(f"wrote {done.written} files to {done.out} in {done.seconds:.1f} s ({done.present} already there, "
          f"{len(done.skipped)} skipped of {done.files}); settings and counts: {done.out / SETTINGS_FILE}")
    return 0


def _layers(values: List[Optional[int]]) -> str:
    return " ".join("-" if v is None else str(v) for v in values)


def build_parser() -> argparse.ArgumentParser:
    from .checkpoints.convert import FORMATS
    from .extract import DEFAULT_MAX_BATCH_SECONDS
    from .data.manifest import AUDIO_EXTENSIONS

    parser = argparse.ArgumentParser(prog="prune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="run a recipe (Hydra: prune train RECIPE key=value ...; "
                                 "prune train --help lists recipes and keys)", add_help=False)
    sub.add_parser("pretrain", help="pre-train a small HuBERT from scratch (Hydra: prune pretrain RECIPE ...)",
                   add_help=False)
    sub.add_parser("finetune", help="fine-tune any checkpoint on a task, no pruning (prune finetune MODEL "
                                    "task=ctc task.labels=FILE key=value ...)", add_help=False)
    p = sub.add_parser("resume", help="continue a stopped run where it stopped")
    p.add_argument("run_dir", help="the run directory (holds config.yaml and checkpoints/)")
    p.add_argument("paths", nargs="*", metavar="KEY=PATH",
                   help="the new place of a file the run was made with that has moved, e.g. teacher.checkpoint=PATH")
    p.set_defaults(func=resume)
    p = sub.add_parser("export", help="export the student of a training checkpoint")
    p.add_argument("checkpoint", help="a training checkpoint, RUN_DIR/checkpoints/step_*.pt")
    p.add_argument("out", help="export folder to write (model.safetensors + config.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.set_defaults(func=export)
    p = sub.add_parser("evaluate", help="compare a model's hidden states with its teacher's on a manifest")
    p.add_argument("model", help="an export folder or any checkpoint prune inspect reads")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the export's recorded teacher)")
    p.add_argument("--manifest", default=None, help="compare hidden states with the teacher's on this manifest")
    p.add_argument("--probe", default=None, help="phone-recognition probe on a corpus folder laid out like "
                                                 "data/demo_corpus (train.tsv, valid.tsv, transcripts.tsv)")
    p.add_argument("--probe-steps", type=int, default=1000, help="probe training steps (default: 1000)")
    p.add_argument("--probe-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one probe per seed; the mean and spread are printed (default: 0 1 2, as the report)")
    p.add_argument("--probe-floor", action="store_true",
                   help="also probe a random-init model of the same architecture (the floor)")
    p.add_argument("--task", default=None, metavar="MANIFEST",
                   help="the metric of the task head saved with the export (task_head.safetensors) on this manifest")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="label file for --task (default: the one the run was trained with, recorded in task.json)")
    p.add_argument("--batch-size", type=int, default=4, help="utterances per batch for --manifest (default: 4)")
    p.add_argument("--max-samples", type=int, default=160000,
                   help="crop each --manifest file to this many samples at 16 kHz (default: 160000, 10 s)")
    p.set_defaults(func=evaluate)
    p = sub.add_parser("inspect", help="architecture, size and per-layer structure of a checkpoint")
    p.add_argument("path", help="an export folder, a Hugging Face folder, a fairseq / torchaudio .pt, ...")
    p.set_defaults(func=inspect)
    p = sub.add_parser("preview", help="gate a preset with seeded random gates, cut and export it")
    p.add_argument("--preset", default="hubert_base", help="a name from prune.models.PRESETS")
    p.add_argument("--sparsity", type=float, default=0.75, help="fraction of parameters to remove, in [0, 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the gates")
    p.add_argument("--seconds", type=float, default=2.0, help="length of the check utterances")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes per model (interleaved, fastest)")
    p.add_argument("--out", default="outputs/preview", help="export folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.add_argument("--uniform", action="store_true",
                   help="a shape transformers holds (as pruning.uniform=true): one FFN width, layers whole, all heads")
    p.add_argument("--head-dims", action="store_true",
                   help="also gate the q/k and v dims inside the heads (pruning.gates.head_qk_dims / head_v_dims)")
    p.set_defaults(func=preview)
    p = sub.add_parser("profile", help="a latency table of this machine: each block kind timed over kept widths")
    p.add_argument("model", nargs="?", default=None, help="a checkpoint prune inspect reads (or give --preset)")
    p.add_argument("--preset", default=None, help="a name from prune.models.PRESETS (instead of MODEL)")
    p.add_argument("--seconds", type=float, default=1.0, help="utterance length the blocks are timed on (default: 1)")
    p.add_argument("--batch", type=int, default=1, help="utterances per pass (default: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; training must use the same "
                                                           "(trainer.threads) (default: 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to time (default: cpu)")
    p.add_argument("--repeats", type=int, default=10, help="timed passes of each grid point, interleaved; the "
                                                           "fastest is kept (default: 10)")
    p.add_argument("--conv-points", type=int, default=4, help="grid widths per conv channel axis (default: 4)")
    p.add_argument("--ffn-points", type=int, default=8, help="grid widths of the FFN units, besides 0 (default: 8)")
    p.add_argument("--head-points", type=int, default=None, help="grid head counts besides 0 (default: every count)")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="wall: elapsed time (default); thread: this thread's CPU time, which other processes' "
                        "load does not inflate (a shared machine; --threads 1 only)")
    p.add_argument("--fit-states", type=int, default=0,
                   help="cut models (seeded random gates at 50, 75, 90%%, ...) timed whole besides the unpruned one, "
                        "to fit whole pass = offset + scale x sum of parts (default: 0, the unpruned pass's scale "
                        "alone; docs/performance.md section 7)")
    p.add_argument("--out", required=True, help="the latency table to write (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=profile)
    p = sub.add_parser("convert", help="write a model in another format: an ONNX graph (checked with onnxruntime), "
                                       "a transformers folder",
                       description="Write MODEL (an export folder, a Hugging Face folder, a fairseq / torchaudio / "
                                   "DPHuBERT file; pruned or not) as OUT. --to onnx: inputs waveforms (batch, "
                                   "samples) float32 and lengths (batch,) int64; outputs hidden_K (batch, frames, "
                                   "dim) per layer, then frames (batch,) int64. The graph is checked against torch "
                                   "on a padded batch; a float32 graph off by more than 1e-4 is removed. --to "
                                   "prune: an export folder (model.safetensors + config.json, prune.load_pruned). "
                                   "--to hf: a transformers save_pretrained folder (config.json, model.safetensors, "
                                   "preprocessor_config.json) checked against prune on a padded batch; a pruned "
                                   "shape transformers cannot hold (heads or FFN widths that differ per layer, a "
                                   "block removed alone, pruned channels under a LayerNorm) is refused in one line.")
    p.add_argument("model", help="an export folder or any checkpoint prune inspect reads")
    p.add_argument("out", help="the file to write, e.g. model.onnx (a folder for --to prune and --to hf)")
    p.add_argument("--to", required=True, help=f"output format: {', '.join(sorted(FORMATS))}")
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="K",
                   help="output only these hidden states (0: the input to the first layer); the layers above "
                        "the highest are left out of the graph (default: all)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: dynamic int8 quantisation of the MatMul weights (onnxruntime)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=convert)
    p = sub.add_parser("manifest", help="make train.tsv and valid.tsv for a folder of audio",
                       description="Write OUT_DIR/train.tsv and OUT_DIR/valid.tsv listing every readable audio "
                                   "file under FOLDER (recursively) with its length at 16 kHz, split at random "
                                   "by file. Files soundfile cannot read are listed and left out.")
    p.add_argument("folder", help="folder of audio files (searched recursively)")
    p.add_argument("out_dir", help="folder to write train.tsv and valid.tsv into")
    p.add_argument("--valid-fraction", type=float, default=0.01,
                   help="fraction of the files held out in valid.tsv (default: 0.01, at least one file; "
                        "0: train.tsv only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid split (default: 0)")
    p.add_argument("--ext", nargs="+", default=None, metavar="EXT",
                   help=f"file extensions to include (default: every format soundfile reads here: "
                        f"{' '.join(AUDIO_EXTENSIONS)})")
    p.add_argument("--absolute", action="store_true",
                   help="write the root as an absolute path (default: relative to OUT_DIR, so the corpus and "
                        "its manifests can move together)")
    p.set_defaults(func=manifest)
    p = sub.add_parser("extract", help="hidden states of a model for a folder of audio, one .npy per file",
                       description="Write the hidden states --layer K of MODEL for every file of AUDIO as DIR/REL.npy "
                                   "(frames x dim; REL: the file's path under AUDIO; with several --layer: "
                                   "DIR/layer_K/REL.npy), batched by length. Files already written are skipped, so "
                                   "a stopped run continues; DIR/extract.json records the settings, the counts and "
                                   "the files left out.")
    p.add_argument("model", help="anything prune.load_pretrained reads (an export folder, a Hugging Face folder, a "
                                 "fairseq / torchaudio file); with --onnx, the model the graph was exported from "
                                 "(layer count, frame rate)")
    p.add_argument("audio", help="a folder of audio (searched recursively) or a manifest (train.tsv)")
    p.add_argument("--layer", type=int, action="append", required=True, metavar="K",
                   help="hidden state to write: 0 = the input to the first layer, N = the last layer's output "
                        "(repeat for several)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the .npy files into")
    p.add_argument("--float16", action="store_true", help="write float16 (default: float32)")
    p.add_argument("--onnx", default=None, metavar="FILE",
                   help="run the forward through onnxruntime with this graph (prune convert MODEL FILE --to onnx)")
    p.add_argument("--max-batch-seconds", type=float, default=DEFAULT_MAX_BATCH_SECONDS, metavar="S",
                   help=f"padded audio per batch, in seconds (default: {DEFAULT_MAX_BATCH_SECONDS:g}; a longer "
                        f"file runs alone)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: torch's / onnxruntime's own choice)")
    p.set_defaults(func=extract)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        return train(argv[1:])
    if argv and argv[0] == "pretrain":
        return pretrain(argv[1:])
    if argv and argv[0] == "finetune":
        return finetune(argv[1:])
    args = build_parser().parse_args(argv)
    from .checkpoints import ExportError

    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader gone away (`| head`) shows here, not at exit
    except BrokenPipeError:  # Python's recipe: stop quietly, and keep the exit-time flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except (ValueError, OSError, ExportError, FloatingPointError) as e:  # bad input: one line, no traceback
        raise _fail(args.command, e)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
