"""Config composition and the checks that run before any compute."""

from pathlib import Path

import pytest
from helpers_train import REPO, noise_corpus

from prune.train.config import ConfigError, check_warmups, compose, validate


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
    from prune.pretrain.recipe import PretrainConfig, compose_pretrain
    from prune.train.schema import schema_keys
    from prune.train.usage import RECIPE_PACKAGES, recipes

    for command, schema in (("train", TrainConfig), ("pretrain", PretrainConfig)):
        for recipe in recipes(command):
            raw = compose_raw(recipe, package=RECIPE_PACKAGES[command], schema=schema)
            absent = [k.name for k in schema_keys(schema)
                      if OmegaConf.select(raw, k.name, default=KeyError) is KeyError]
            assert not absent, f"{command} {recipe}: {absent}"
    assert compose_pretrain("demo_teacher", ["masking.prob=0.5", "trainer.keep_last=4"]).masking.prob == 0.5


@pytest.mark.parametrize("recipe", ["default", "demo", "tiny_demo", "dphubert_hubert_base", "wavlm_base_plus",
                                    "demo_dphubert"])
def test_every_recipe_has_warmups_that_fit_its_steps(recipe):
    check_warmups(compose(recipe))


@pytest.mark.parametrize("overrides,message,fixed", [
    # the README's old example: the target would rise over 600 of 300 steps
    (["trainer.prune_steps=300"], r"^pruning\.warmup_steps=600 is too long for trainer\.prune_steps=300: the size "
     r"target would only rise to 50% .*use pruning\.warmup_steps<=200 or trainer\.prune_steps>=900$",
     ["pruning.warmup_steps=200"]),
    (["pruning.warmup_steps=1400"], r"only 100 steps would be at the full target.*pruning\.warmup_steps<=1000",
     ["pruning.warmup_steps=1000"]),
    (["optim.warmup_steps=800"], r"^optim\.warmup_steps=800 is more than half of trainer\.prune_steps=1500.*"
     r"optim\.warmup_steps<=750", ["optim.warmup_steps=750", "optim.final_warmup_steps=150"]),
    (["trainer.final_steps=30"], r"^optim\.warmup_steps=20 \(optim\.final_warmup_steps=null takes it\) is more than "
     r"half of trainer\.final_steps=30.*optim\.final_warmup_steps<=15", ["optim.final_warmup_steps=15"]),
    (["optim.final_warmup_steps=200"], r"^optim\.final_warmup_steps=200 is more than half of trainer\.final_steps=300",
     ["optim.final_warmup_steps=150"]),
])
def test_warmups_longer_than_the_steps_fail_before_compute(tmp_path, overrides, message, fixed):
    train, valid = noise_corpus(tmp_path)
    base = [f"data.train_manifest={train}", f"data.valid_manifest={valid}", *overrides]
    with pytest.raises(ConfigError, match=message):
        validate(compose("tiny_demo", base), tmp_path / "run")
    validate(compose("tiny_demo", [*base, *fixed]), tmp_path / "run")  # the values the message suggests work


def test_the_default_warmups_on_a_short_run_are_named_in_one_line(tmp_path):
    train, valid = noise_corpus(tmp_path)
    cfg = compose("default", [f"data.train_manifest={train}", f"data.valid_manifest={valid}",
                              "teacher.preset=hubert_base_tiny", "distill.layers=[[0],[1,2]]",
                              "trainer.prune_steps=300", "trainer.final_steps=0"])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert "\n" not in str(error.value)
    assert "pruning.warmup_steps=5000 is too long for trainer.prune_steps=300" in str(error.value)
    assert "optim.warmup_steps=1000 is more than half of trainer.prune_steps=300" in str(error.value)
    # a stage without steps has no warm-up to fit
    validate(compose("default", [f"data.train_manifest={train}", f"data.valid_manifest={valid}",
                                 "teacher.preset=hubert_base_tiny", "distill.layers=[[0],[1,2]]",
                                 "trainer.prune_steps=0", "trainer.final_steps=0"]))


@pytest.mark.parametrize("teacher", ["preset", "checkpoint"])
def test_a_negative_distill_layer_is_rejected(tmp_path, teacher):
    train, valid = noise_corpus(tmp_path)
    # a checkpoint teacher's depth is known only once loaded: the sign is checked before that
    source = [f"teacher.checkpoint={tmp_path}"] if teacher == "checkpoint" else []
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", f"data.valid_manifest={valid}", *source,
                                "distill.layers=[[0],[-1]]"])
    with pytest.raises(ConfigError, match=r"^distill\.layers: \[\[0\], \[-1\]\] has the negative layer -1; "
                                          r"give hidden-state indices from 0"):
        validate(cfg)


@pytest.mark.parametrize("target,message", [
    ("0.5", r"^pruning\.target: with pruning\.target_kind=param_count it is the number of parameters to keep, a "
            r"whole number such as 23585946, got 0\.5 \(for a fraction removed use pruning\.target_kind=params\)$"),
    ("12000.5", "a whole number"),
    ("0", "a whole number"),
    ("24080", r"pruning\.target: 24080 parameters to keep is not below the teacher's 24,080"),
])
def test_a_param_count_target_asks_for_a_whole_number(tmp_path, target, message):
    train, valid = noise_corpus(tmp_path)
    base = [f"data.train_manifest={train}", f"data.valid_manifest={valid}", "pruning.target_kind=param_count"]
    with pytest.raises(ConfigError, match=message):
        validate(compose("tiny_demo", [*base, f"pruning.target={target}"]))
    validate(compose("tiny_demo", [*base, "pruning.target=12000"]))


def test_max_cut_shift_is_checked(tmp_path):
    train, valid = noise_corpus(tmp_path)
    base = [f"data.train_manifest={train}", f"data.valid_manifest={valid}"]
    assert compose("tiny_demo").pruning.max_cut_shift == 0.05
    with pytest.raises(ConfigError, match=r"pruning\.max_cut_shift: must be in \[pruning\.tolerance=0\.005, 1\]"):
        validate(compose("tiny_demo", [*base, "pruning.max_cut_shift=0.001"]))


@pytest.mark.parametrize("seconds", ["0", "-1.5", "nan"])
def test_macs_seconds_must_be_positive(tmp_path, seconds):
    train, valid = noise_corpus(tmp_path)
    base = [f"data.train_manifest={train}", f"data.valid_manifest={valid}", "pruning.target_kind=macs"]
    with pytest.raises(ConfigError, match=r"^pruning\.macs_seconds: the utterance length the MACs are counted on "
                                          r"must be a positive number of seconds, got"):
        validate(compose("tiny_demo", [*base, f"pruning.macs_seconds={seconds}"]))
    validate(compose("tiny_demo", [*base, "pruning.macs_seconds=2.5"]))
