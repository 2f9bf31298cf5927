"""Config composition and the checks that run before any compute."""

from pathlib import Path

import pytest
from helpers_train import REPO, noise_corpus

from prune.train.config import ConfigError, compose, validate


@pytest.mark.parametrize("recipe", ["default", "demo", "tiny_demo", "dphubert_hubert_base", "wavlm_base_plus"])
def test_every_recipe_composes(recipe):
    cfg = compose(recipe)
    assert cfg.name == ("run" if recipe == "default" else recipe)
    assert 0 < cfg.pruning.target < 1


def test_recipe_values_and_overrides():
    cfg = compose("tiny_demo", ["trainer.prune_steps=7", "pruning.target_kind=macs", "distill.cos_type=log_sig"])
    assert cfg.teacher.preset == "hubert_base_tiny"
    assert (cfg.trainer.prune_steps, cfg.pruning.target_kind, cfg.distill.cos_type) == (7, "macs", "log_sig")
    base = compose("dphubert_hubert_base")
    assert base.distill.layers == [[0], [4, 8, 12]] and base.optim.lr == 2e-4 and base.optim.gate_lr == 0.02
    assert base.trainer.prune_steps == 50000 and base.trainer.final_steps == 25000
    assert base.pruning.warmup_steps == 5000
    demo = compose("demo")  # the shipped demo data, as absolute paths (the editable install maps it to data/)
    assert Path(demo.teacher.checkpoint) == REPO / "data" / "demo_teacher"
    assert Path(demo.probe.corpus) == REPO / "data" / "demo_corpus"
    assert Path(demo.data.train_manifest) == REPO / "data" / "demo_corpus" / "train.tsv"


def test_probe_corpus_is_checked_before_any_compute(tmp_path):
    train, valid = noise_corpus(tmp_path)
    base = [f"data.train_manifest={train}", f"data.valid_manifest={valid}"]
    with pytest.raises(ConfigError, match="probe.corpus: .* has no transcripts.tsv"):
        validate(compose("tiny_demo", [*base, f"probe.corpus={tmp_path}"]))
    with pytest.raises(ConfigError, match="probe.steps: must be >= 1"):
        validate(compose("tiny_demo", [*base, "probe.steps=0"]))


@pytest.mark.parametrize("override,message", [
    ("+trainer.setps=3", "trainer.setps"),
    ("trainer.prune_steps=abc", "trainer.prune_steps"),
    ("+teacher.chekpoint=x", "teacher.chekpoint"),
])
def test_typos_and_wrong_types_name_the_key(override, message):
    with pytest.raises(Exception, match=message):
        compose("tiny_demo", [override])


@pytest.mark.parametrize("override,message", [
    ("pruning.target=1.5", "pruning.target: a sparsity must be in \\(0, 1\\)"),
    ("pruning.target=0", "pruning.target"),
    ("pruning.target_kind=flops", "pruning.target_kind"),
    ("data.train_manifest=/nowhere/train.tsv", "data.train_manifest: /nowhere/train.tsv does not exist"),
    ("teacher.checkpoint=/nowhere/hubert", "teacher.checkpoint: /nowhere/hubert does not exist"),
    ("teacher.preset=hubert_tiny", "teacher.preset: unknown preset"),
    ("distill.layers=[[0],[9]]", "distill.layers"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.grad_accum=0", "trainer.grad_accum"),
    ("optim.lr=nan", "optim.lr: must be a finite number"),
    ("optim.gate_lr=inf", "optim.gate_lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.betas=[0.9,1.5]", "optim.betas: must be two numbers in \\[0, 1\\)"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[[],[]]", "optim.betas: must be two numbers"),  # was a TypeError (found by the fuzz test)
    ("optim.warmup_steps=-5", "optim.warmup_steps: must be >= 0"),
    ("pruning.warmup_steps=-1", "pruning.warmup_steps: must be >= 0"),
    ("optim.clip_grad_norm=0", "optim.clip_grad_norm"),
    ("pruning.gates.init_mean=1.2", "pruning.gates.init_mean: an initial drop rate"),
    ("pruning.gates.ffn_units_init_mean=0", "pruning.gates.ffn_units_init_mean"),
    ("pruning.gates.init_std=-1", "pruning.gates.init_std"),
    ("trainer.threads=0", "trainer.threads: must be >= 1"),
    ("trainer.latency_seconds=0", "trainer.latency_seconds"),
])
def test_bad_values_fail_before_compute(tmp_path, override, message):
    train, valid = noise_corpus(tmp_path)
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}", override])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, tmp_path / "run")


def test_unwritable_run_dir(tmp_path):
    train, valid = noise_corpus(tmp_path)
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}"])
    validate(cfg, tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        validate(cfg, tmp_path / "file" / "run")


@pytest.mark.parametrize("recipe,override", [("demo", []), ("tiny_demo", []),
                                             ("default", ["teacher.random_init=true"])])
def test_demo_data_resolves_from_any_directory(tmp_path, monkeypatch, recipe, override):
    """The demo corpus and teacher are found wherever the command runs (they were relative to the
    current directory: from elsewhere `demo` said the corpus "has no transcripts.tsv")."""
    monkeypatch.chdir(tmp_path)
    cfg = compose(recipe, override)
    validate(cfg, tmp_path / "run")
    assert Path(cfg.data.train_manifest).is_absolute() and Path(cfg.data.train_manifest).is_file()


@pytest.mark.parametrize("override,message", [
    ("pruning.traget=0.6", "pruning.traget=0.6: pruning.traget is not a config key; did you mean pruning.target?"),
    ("prunning.target=0.6", "prunning.target is not a config key; did you mean pruning.target?"),
    ("prune_steps=3", "prune_steps is not a config key; did you mean trainer.prune_steps?"),
    ("+trainer.setps=3", "trainer.setps is not a config key; did you mean"),
    ("teacher=tinyy", "teacher has no config 'tinyy'; did you mean teacher=tiny? choose from demo, hubert_base, "),
    ("+pruning.target=0.5", "pruning.target is already a config key; drop the '+' (pruning.target=0.5)"),
    ("pruning.target=[0.5", "pruning.target=[0.5: cannot parse this override"),
])
def test_override_typos_are_one_line_naming_the_nearest_key(override, message):
    with pytest.raises(ConfigError) as e:
        compose("tiny_demo", [override])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "+pruning.traget" not in str(e.value)  # Hydra's advice, which then fails


@pytest.mark.parametrize("override", ["teacher.overrides.encoder_num_layers=3", "+teacher.overrides.foo=1",
                                      "teacher=demo", "pruning=macs", "distill.layers=[[0],[1]]", "~probe.corpus"])
def test_valid_overrides_pass_the_key_check(override):
    from prune.train.config import TrainConfig
    from prune.train.overrides import check_overrides, config_groups

    check_overrides([override], TrainConfig, config_groups())


def test_a_full_size_random_teacher_must_be_asked_for(tmp_path):
    """`prune train default` used to prune a random-weight HuBERT Base for 75,000 steps."""
    train, valid = noise_corpus(tmp_path)
    base = [f"data.train_manifest={train}", f"data.valid_manifest={valid}"]
    with pytest.raises(ConfigError, match="teacher.checkpoint: not given, so the teacher would be "
                                          "teacher.preset=hubert_base with random weights; .*teacher.random_init=true"):
        validate(compose("default", base))
    validate(compose("default", [*base, "teacher.random_init=true"]))  # asked for: benchmarks
    validate(compose("tiny_demo", base))  # the tiny test presets need not ask
    with pytest.raises(ConfigError, match="teacher.random_init: true, but teacher.checkpoint="):
        validate(compose("demo", [*base, "teacher.random_init=true"]))


def test_a_folder_given_as_a_manifest_says_how_to_make_one(tmp_path):
    train, valid = noise_corpus(tmp_path)
    folder = tmp_path / "audio"
    for key in ("train_manifest", "valid_manifest"):
        other = "valid_manifest" if key == "train_manifest" else "train_manifest"
        cfg = compose("tiny_demo", [f"data.{key}={folder}", f"data.{other}={train}"])
        with pytest.raises(ConfigError, match=f"data.{key}: {folder} is a folder, not a manifest; "
                                              f"make one with: prune manifest {folder} OUT_DIR"):
            validate(cfg)


def test_every_schema_key_can_be_overridden_in_every_recipe():
    """The override check passes any schema key, so Hydra must find each one in the composed recipe
    (it refuses to override a key the files do not set, advising a '+' the schema then rejects)."""
    from omegaconf import OmegaConf

    from prune.train.config import TrainConfig, compose_raw
    from prune.train.pretrain import PretrainConfig, compose_pretrain
    from prune.train.schema import schema_keys
    from prune.train.usage import RECIPE_PACKAGES, recipes

    for command, schema in (("train", TrainConfig), ("pretrain", PretrainConfig)):
        for recipe in recipes(command):
            raw = compose_raw(recipe, package=RECIPE_PACKAGES[command], schema=schema)
            absent = [k.name for k in schema_keys(schema)
                      if OmegaConf.select(raw, k.name, default=KeyError) is KeyError]
            assert not absent, f"{command} {recipe}: {absent}"
    assert compose_pretrain("demo_teacher", ["masking.prob=0.5", "trainer.keep_last=4"]).masking.prob == 0.5
