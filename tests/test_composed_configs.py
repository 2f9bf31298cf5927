"""Every recipe (and the README's override examples) composes to the config it composed to before
the defaults moved into the schema: key for key, value for value, hydra run settings included.

The expected configs are the frozen dumps in fixtures/composed_configs.json, unresolved (so
``${prune.data:...}`` stays machine-independent). A default changed anywhere (a schema field, a
group file, a recipe) fails here. To record a deliberate change:

    python tests/test_composed_configs.py --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "composed_configs.json"

# (command, recipe, overrides): every recipe, then the README's and --help's examples and a group swap
# of each group that has more than one option
CASES: List[Tuple[str, str, List[str]]] = [
    *[("train", r, []) for r in ("default", "demo", "demo_dphubert", "dphubert_hubert_base", "tiny_demo",
                                 "wavlm_base_plus")],
    ("pretrain", "demo_teacher", []),
    ("train", "tiny_demo", ["pruning.target=0.6", "trainer.prune_steps=3000"]),
    ("train", "tiny_demo", ["pruning.target_kind=macs", "pruning.target=0.6"]),
    ("train", "default", ["teacher.checkpoint=/path/to/hubert", "data.train_manifest=data/my_corpus/train.tsv",
                          "data.valid_manifest=data/my_corpus/valid.tsv"]),
    ("train", "demo", ["pruning.target=0.5"]),
    ("train", "tiny_demo", ["teacher=demo"]),
    ("train", "demo", ["teacher=hubert_base", "teacher.random_init=true"]),
    ("train", "demo", ["teacher=wavlm_base_plus"]),
    ("train", "tiny_demo", ["pruning=macs"]),
    ("train", "tiny_demo", ["pruning=dphubert"]),
    ("train", "demo_dphubert", ["pruning=params", "distill=default", "optim=default"]),
    ("train", "demo", ["distill=dphubert", "optim=dphubert"]),
    ("train", "demo", ["data=librispeech"]),
    ("train", "dphubert_hubert_base", ["data=demo_corpus"]),
    ("train", "tiny_demo", ["+teacher.overrides.encoder_layer_drop=0.0"]),
    ("train", "finetune_demo", []),
    ("train", "tiny_demo", ["task=classify", "task.labels=data/demo_corpus/transcripts.tsv"]),
    ("train", "demo", ["task=ctc", "task.labels=data/demo_corpus/transcripts.tsv", "distill.weight=0"]),
    ("pretrain", "demo_teacher", ["trainer.steps=500"]),
    ("pretrain", "demo_teacher", ["masking.prob=0.5", "trainer.keep_last=4"]),
]

# the hydra settings the configs set (the rest of the hydra node is Hydra's, filled in at run time)
HYDRA_KEYS = ("run", "sweep", "job.chdir", "output_subdir", "job_logging.handlers.file", "callbacks")


def case_id(case: Tuple[str, str, List[str]]) -> str:
    command, recipe, overrides = case
    return " ".join(["prune", command, recipe, *overrides])


def composed(command: str, recipe: str, overrides: List[str]) -> Dict[str, Any]:
    """The unresolved config ``prune COMMAND RECIPE OVERRIDES`` composes, with the hydra settings
    that the config files set."""
    from omegaconf import OmegaConf

    from prune.pretrain.recipe import PretrainConfig
    from prune.train.config import TrainConfig, compose_raw
    from prune.train.usage import RECIPE_PACKAGES

    schema = TrainConfig if command == "train" else PretrainConfig
    raw = compose_raw(recipe, overrides, hydra_config=True, package=RECIPE_PACKAGES[command], schema=schema)
    hydra = {key: OmegaConf.to_container(OmegaConf.select(raw.hydra, key), resolve=False)
             if OmegaConf.is_config(OmegaConf.select(raw.hydra, key)) else OmegaConf.select(raw.hydra, key)
             for key in HYDRA_KEYS}
    job = OmegaConf.to_container(OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]), resolve=False)
    return {"config": job, "hydra": hydra}


def expected() -> Dict[str, Any]:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_composed_config_is_the_recorded_one(case):
    recorded = expected()
    assert case_id(case) in recorded, f"no recorded config for {case_id(case)}: run {__file__} --write"
    assert composed(*case) == recorded[case_id(case)]


def test_a_schema_default_is_the_one_the_recipes_compose_to(monkeypatch):
    """The defaults are written once, in the schema: a dataclass default moved is what a recipe that
    does not set the key composes to (no YAML copy of it left to disagree), and the comparison above
    sees the change."""
    from prune.train import config

    case = ("train", "tiny_demo", [])
    monkeypatch.setattr(config.TrainConfig.__dataclass_fields__["optim"], "default_factory",
                        lambda: config.OptimConfig(weight_decay=0.5))
    config.register_schema("train_schema", config.TrainConfig)
    try:
        moved = composed(*case)
    finally:
        monkeypatch.undo()
        config.register_schema("train_schema", config.TrainConfig)
    assert moved["config"]["optim"]["weight_decay"] == 0.5
    assert moved != expected()[case_id(case)]
    assert composed(*case) == expected()[case_id(case)]


def test_pretraining_composes_from_config_groups_of_its_own():
    """configs/pretrain: the pre-training groups, on a search path of their own (never among the
    training groups, which have the same names), swapped as training's are, bad options in one line."""
    from prune.cli import main
    from prune.pretrain.recipe import compose_pretrain
    from prune.train.config import CONFIG_PACKAGES, ConfigError
    from prune.train.overrides import config_groups

    assert config_groups(CONFIG_PACKAGES["pretrain"]) == {
        "data": ["demo_corpus"], "model": ["demo", "tiny"], "optim": ["default"], "probe": ["demo_corpus", "none"],
        "trainer": ["default"]}
    assert set(config_groups(CONFIG_PACKAGES["train"])) == {
        "data", "distill", "logging", "optim", "pruning", "task", "teacher", "trainer"}
    plain = compose_pretrain("demo_teacher", ["model=tiny", "probe=none"])
    assert dict(plain.model.overrides) == {} and plain.model.final_dim == 256 and plain.probe.corpus is None
    assert plain.optim.lr == 1e-3  # the recipe's own keys still apply
    with pytest.raises(ConfigError, match="^model=tinyy: model has no config 'tinyy'; did you mean model=tiny"):
        compose_pretrain("demo_teacher", ["model=tinyy"])
    with pytest.raises(SystemExit, match="^prune pretrain: probe=nope: probe has no config 'nope'"):
        main(["pretrain", "demo_teacher", "probe=nope"])
    with pytest.raises(ConfigError, match="^pretrain=pretrain: pretrain is not a config key"):
        from prune.train.config import compose

        compose("demo", ["pretrain=pretrain"])


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit(f"usage: python {sys.argv[0]} --write   (records the configs composed now)")
    FIXTURE.write_text(json.dumps({case_id(c): composed(*c) for c in CASES}, indent=1, sort_keys=True) + "\n")
    print(f"{FIXTURE}: {len(CASES)} configs")
