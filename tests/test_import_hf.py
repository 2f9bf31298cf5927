"""Hugging Face save_pretrained folders load as the in-house encoder with identical outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from helpers_checkpoints import (CLASS_PREFIX, VARIANT_IDS, VARIANTS, assert_parity, base_model,  # noqa: E402
                                 count_hf_encoder_params, hf_hiddens, make_hf, waveforms)
from prune import count_params, load_pretrained, num_params  # noqa: E402

# transformers' WavLM passes a float bias with a bool padding mask to torch's attention
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


def check_parity(model, hf_encoder) -> float:
    worst = 0.0
    for padded in (False, True):
        x, lengths = waveforms(padded)
        worst = max(worst, assert_parity(model, hf_hiddens(hf_encoder, x, lengths), x, lengths))
    return worst


@pytest.mark.parametrize("family,stable", VARIANTS, ids=VARIANT_IDS)
def test_base_model_parity(family, stable, tmp_path):
    hf = make_hf(family, stable)
    hf.save_pretrained(tmp_path)
    model, report = load_pretrained(tmp_path, return_report=True)

    assert report.format == "huggingface" and report.detail == f"{CLASS_PREFIX[family]}Model"
    config = model.config
    assert config.architecture == family
    assert config.encoder_layer_norm_first is stable
    assert config.extractor_mode == ("layer_norm" if stable else "group_norm")
    assert config.extractor_conv_bias is stable
    assert report.ignored == {"masked_spec_embed": "SpecAugment mask embedding (training only)"}
    # the config describes exactly the weights transformers uses
    assert count_params(config) == num_params(model) == count_hf_encoder_params(hf)
    check_parity(model, hf)


@pytest.mark.parametrize("family,head,heads_ignored", [
    ("wav2vec2", "ForPreTraining", {"quantizer.codevectors", "quantizer.weight_proj.weight",
                                    "quantizer.weight_proj.bias", "project_hid.weight", "project_hid.bias",
                                    "project_q.weight", "project_q.bias"}),
    ("wav2vec2", "ForCTC", {"lm_head.weight", "lm_head.bias"}),
    ("hubert", "ForCTC", {"lm_head.weight", "lm_head.bias"}),
    ("wavlm", "ForCTC", {"lm_head.weight", "lm_head.bias"}),
    ("wavlm", "ForSequenceClassification", {"projector.weight", "projector.bias", "classifier.weight",
                                            "classifier.bias"}),
])
def test_wrapper_takes_the_encoder_and_reports_the_head(family, head, heads_ignored, tmp_path):
    hf = make_hf(family, stable=False, head=head)
    hf.save_pretrained(tmp_path)
    model, report = load_pretrained(tmp_path, return_report=True)
    assert report.detail == f"{CLASS_PREFIX[family]}{head}"
    assert set(report.ignored) == heads_ignored | {f"{family}.masked_spec_embed"}
    check_parity(model, base_model(hf, family))


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_weight_norm_as_weight_g_weight_v(weights, tmp_path):
    """Older transformers (torch.nn.utils.weight_norm) store the positional conv as weight_g /
    weight_v, and older folders hold pytorch_model.bin."""
    hf = make_hf("wav2vec2", stable=True)
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    base = "encoder.pos_conv_embed.conv."
    state[base + "weight_g"] = state.pop(base + "parametrizations.weight.original0")
    state[base + "weight_v"] = state.pop(base + "parametrizations.weight.original1")
    (tmp_path / "model.safetensors").unlink()
    if weights.endswith(".bin"):
        torch.save(state, tmp_path / weights)
    else:
        save_file(state, tmp_path / weights)
    check_parity(load_pretrained(tmp_path), hf)


def test_sharded_safetensors(tmp_path):
    hf = make_hf("hubert", stable=False)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    check_parity(load_pretrained(tmp_path), hf)


def test_a_file_of_the_folder_loads_the_folder(tmp_path):
    hf = make_hf("wavlm", stable=False)
    hf.save_pretrained(tmp_path)
    x, lengths = waveforms(True)
    reference = hf_hiddens(hf, x, lengths)
    for path in (tmp_path / "config.json", tmp_path / "model.safetensors", str(tmp_path)):
        assert_parity(load_pretrained(path), reference, x, lengths)


def test_map_location_and_eval_mode(tmp_path):
    make_hf("hubert", stable=False).save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, map_location="meta")
    assert not model.training
    assert all(p.device.type == "meta" for p in model.parameters())


def test_library_does_not_import_transformers(tmp_path):
    make_hf("wavlm", stable=True).save_pretrained(tmp_path)
    code = ("import sys\n"
            "sys.modules['transformers'] = None  # any import of it now fails\n"
            "import prune\n"
            "model = prune.load_pretrained(sys.argv[1])\n"
            "print(type(model).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Wav2Vec2Model"
