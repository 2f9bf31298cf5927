"""The committed demo teacher (data/demo_teacher): made by recipes/pretrain/demo_teacher.yaml, and it
has learned speech: the phone probe reads phones from it far better than from a random-init encoder."""

from pathlib import Path

import pytest
import torch
from helpers_train import REPO, demo_corpus_split
from omegaconf import OmegaConf

from prune.checkpoints import load_pruned, read_export_info
from prune.checkpoints.inspect import inspect_checkpoint
from prune.models import build_encoder
from prune.structures import count_params
from prune.evaluate.probe import phone_probe

TEACHER = REPO / "data" / "demo_teacher"
pytestmark = pytest.mark.skipif(not (TEACHER / "model.safetensors").exists(), reason="no demo teacher")


def test_the_committed_teacher_is_what_its_recipe_makes():
    info = read_export_info(TEACHER)
    recorded = info["metadata"]["pretrain"]["config"]
    from prune.pretrain.recipe import compose_pretrain

    composed = OmegaConf.to_container(compose_pretrain("demo_teacher"))
    for section, values in recorded.items():  # every key the run used is what the recipe composes to
        if not isinstance(values, dict):
            assert composed[section] == values, section
            continue
        for key, value in values.items():
            if section in ("data", "probe") and isinstance(value, str):  # recorded as typed, from the repo root
                assert (REPO / value).resolve() == Path(composed[section][key]).resolve(), f"{section}.{key}"
            else:
                assert composed[section][key] == value, f"{section}.{key}"
    model = load_pruned(TEACHER)
    assert "format:         prune export (encoder pre-trained by prune pretrain, 5000 steps)" in \
        inspect_checkpoint(TEACHER)
    assert count_params(model.config) == sum(p.numel() for p in model.parameters())
    assert (TEACHER / "model.safetensors").stat().st_size < 8 * 2**20  # "a few MB"


def test_the_teacher_has_learned_phones_a_random_init_has_not(tmp_path):
    torch.set_num_threads(2)
    corpus = demo_corpus_split(tmp_path / "corpus", n_train=80)
    teacher = load_pruned(TEACHER)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random_init = build_encoder(teacher.config)
    trained = phone_probe(teacher, corpus, steps=400)
    floor = phone_probe(random_init, corpus, steps=400)
    assert trained["train_files"] == 80 and trained["valid_files"] == 28
    assert floor["valid_per"] > 0.75
    assert trained["valid_per"] < 0.6 and trained["valid_per"] < floor["valid_per"] - 0.3, (trained, floor)
