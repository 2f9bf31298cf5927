"""What ``prune train`` / ``prune pretrain`` print for ``--help`` and when no recipe is given: the
recipes (each one's first header line), the config groups, and every key with the recipe's value
and its meaning, all read from the shipped files and the schema (nothing listed by hand)."""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from .schema import FREE, LEAF, schema_keys

RECIPE_PACKAGES = {"train": "prune.recipes", "pretrain": "prune.recipes.pretrain"}  # command -> its recipes

EXAMPLES = {
    "train": [
        ("prune train demo", "the CPU demo (pre-trained demo teacher, phone probe)"),
        ("prune train tiny_demo pruning.target=0.6 trainer.prune_steps=3000", "any key overridden"),
        ("prune train tiny_demo --multirun pruning.target=0.5,0.75", "a sweep, one folder per value"),
        ("prune train default teacher.checkpoint=/path/to/hubert data.train_manifest=M/train.tsv "
         "data.valid_manifest=M/valid.tsv", "your teacher and data"),
        ("prune train tiny_demo teacher=demo", "GROUP=OPTION swaps a whole config group"),
        ("prune train demo --cfg job", "print the composed config, run nothing"),
    ],
    "pretrain": [
        ("prune pretrain demo_teacher hydra.run.dir=outputs/demo_teacher", "pre-train the demo teacher"),
        ("prune pretrain demo_teacher trainer.steps=500", "any key overridden"),
        ("prune pretrain demo_teacher probe=none", "GROUP=OPTION swaps a whole config group"),
        ("prune pretrain demo_teacher --cfg job", "print the composed config, run nothing"),
    ],
}


def recipes(command: str) -> Dict[str, str]:
    """Recipe name -> the first line of its header comment, for ``command``'s recipe package."""
    out = {}
    for path in sorted(files(RECIPE_PACKAGES[command]).iterdir(), key=lambda p: p.name):
        if path.name.endswith(".yaml"):
            first = (path.read_text().splitlines() or [""])[0]
            out[path.name[:-5]] = first.lstrip("#").strip() if first.startswith("#") else ""
    return out


def recipe_list(command: str) -> str:
    """The recipes, one line each, and how to run one (what a bare ``prune train`` prints)."""
    entries = recipes(command)
    width = max(map(len, entries))
    lines = [f"prune {command}: give a recipe. Recipes:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, summary in entries.items()]
    example = "tiny_demo" if command == "train" else next(iter(entries))
    lines += ["", f"run one:  prune {command} RECIPE [key=value ...]      e.g. prune {command} {example}",
              f"its keys: prune {command} RECIPE --help"]
    return "\n".join(lines)


def _show(value: Any) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict) and len(json.dumps(value)) > 40:
        return f"{{{len(value)} keys}}"  # e.g. a recipe's EncoderConfig overrides: see --cfg job
    if isinstance(value, (bool, type(None), dict, list)):
        return json.dumps(value)  # true, null, [[0], [4, 8, 12]], {}
    return str(value)


def key_lines(schema: type, cfg: Any) -> List[str]:
    """``key = value   meaning`` for every settable key of ``schema``, values from ``cfg``."""
    rows = []
    for key in schema_keys(schema):
        if key.kind not in (LEAF, FREE):
            continue
        value = OmegaConf.select(cfg, key.name, throw_on_missing=False) if cfg is not None else None
        shown = "(required)" if cfg is not None and OmegaConf.is_missing(cfg, key.name) else _show(value)
        rows.append((f"{key.name} = {shown}", key.help))
    width = min(48, max(len(r[0]) for r in rows))
    return [f"  {left.ljust(width)}  {meaning}".rstrip() for left, meaning in rows]


def train_help(recipe: Optional[str]) -> str:
    from .config import TrainConfig, compose_raw, typed

    shown = recipe or "default"
    raw = compose_raw(shown, hydra_config=True)
    lines = [_usage("train"), "",
             "Prune a speech encoder: distil a gated student from the frozen teacher under a size target,",
             "cut it to a plain smaller model, distil that further, export it (RUN_DIR/export) with a report.", "",
             _recipes_block("train"), "", _groups_block("train", shown, raw), "",
             f"keys (key=value; values as recipe {shown} sets them):", *key_lines(TrainConfig, typed(raw)),
             "", _examples("train")]
    return "\n".join(lines)


def pretrain_help(recipe: Optional[str]) -> str:
    from ..pretrain.recipe import PretrainConfig, typed_pretrain
    from .config import compose_raw

    shown = recipe or next(iter(recipes("pretrain")))
    raw = compose_raw(shown, hydra_config=True, package=RECIPE_PACKAGES["pretrain"], schema=PretrainConfig)
    lines = [_usage("pretrain"), "",
             "Pre-train a small HuBERT from scratch (MFCC + k-means targets, masked prediction), e.g. a teacher",
             "where no pretrained weights can be had; the encoder is exported to RUN_DIR/export.", "",
             _recipes_block("pretrain"), "", _groups_block("pretrain", shown, raw), "",
             f"keys (key=value; values as recipe {shown} sets them):",
             *key_lines(PretrainConfig, typed_pretrain(raw)), "", _examples("pretrain")]
    return "\n".join(lines)


def _groups_block(command: str, shown: str, raw: Any) -> str:
    """The config groups of ``command``, each with its options and the one recipe ``shown`` picks
    (``raw``: its composition with the hydra node)."""
    from .config import CONFIG_PACKAGES
    from .overrides import config_groups

    groups, choices = config_groups(CONFIG_PACKAGES[command]), raw.hydra.runtime.choices
    width = max(map(len, groups))
    return "\n".join([f"config groups (GROUP=OPTION replaces a whole section; files in {CONFIG_PACKAGES[command]}):",
                      *(f"  {g.ljust(width)}  {' | '.join(opts)}   ({shown}: {choices.get(g)})"
                        for g, opts in groups.items())])


def _usage(command: str) -> str:
    return (f"usage: prune {command} RECIPE [key=value ...] [--multirun] [--cfg job]\n"
            f"       prune {command} RECIPE --help      (keys with that recipe's values)")


def _recipes_block(command: str) -> str:
    entries = recipes(command)
    width = max(map(len, entries))
    return "\n".join([f"recipes ({RECIPE_PACKAGES[command]}):",
                      *(f"  {n.ljust(width)}  {s}" for n, s in entries.items())])


def _examples(command: str) -> str:
    return "\n".join(["examples:", *(f"  {cmd}\n      {what}" for cmd, what in EXAMPLES[command]),
                      "", "Hydra's own flags (--cfg job, --resolve, --multirun) work as usual; "
                          "hydra.run.dir=PATH picks the run directory."])
