"""fairseq and official WavLM checkpoints load as the in-house encoder with identical outputs.

The fixtures hold the weights of a random transformers model laid out as fairseq stores them
(``helpers_checkpoints.fairseq_state_from_hf``, written from fairseq's / WavLM's module structure);
the loaded model must equal the same weights loaded from the transformers folder and reproduce
transformers' hidden states.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers_checkpoints import (VARIANT_IDS, VARIANTS, assert_parity, fairseq_model_cfg,  # noqa: E402
                                 fairseq_normalized, fairseq_state_from_hf, hf_hiddens, make_hf, save_fairseq,
                                 waveforms)
from prune import CheckpointError, load_pretrained  # noqa: E402
from prune.checkpoints.fairseq import parse_conv_feature_layers  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

PRETRAINING_EXTRAS = {
    "hubert": {"mask_emb", "label_embs_concat", "final_proj.weight", "final_proj.bias"},
    "wav2vec2": {"mask_emb", "quantizer.vars", "quantizer.weight_proj.weight", "quantizer.weight_proj.bias",
                 "project_q.weight", "project_q.bias", "final_proj.weight", "final_proj.bias"},
    "wavlm": {"mask_emb"},
}
STYLES = {"hubert": ["hydra", "args"], "wav2vec2": ["hydra", "args"], "wavlm": ["wavlm"]}


def check_against_hf(path, hf, family, tmp_path, stable, normalize=False):
    """The fairseq-loaded model equals the transformers-loaded one weight for weight, and matches
    transformers' hidden states with and without padding (on waveforms normalised as fairseq's
    dataset does, if the checkpoint's config says ``normalize``)."""
    model, report = load_pretrained(path, return_report=True)
    assert report.format == "fairseq"
    assert model.config.architecture == family
    assert model.config.encoder_layer_norm_first is stable
    assert model.config.normalize_waveform is normalize
    assert set(report.ignored) == PRETRAINING_EXTRAS[family]

    hf_dir = tmp_path / "hf"
    if not hf_dir.exists():
        hf.save_pretrained(hf_dir)
    via_hf = load_pretrained(hf_dir)
    ours, theirs = model.state_dict(), via_hf.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    for padded in (False, True):
        x, lengths = waveforms(padded)
        hf_input = fairseq_normalized(x, lengths) if normalize else x
        assert_parity(model, hf_hiddens(hf, hf_input, lengths), x, lengths)
    return model, report


@pytest.mark.parametrize("family,stable", VARIANTS, ids=VARIANT_IDS)
def test_fairseq_parity(family, stable, tmp_path):
    hf = make_hf(family, stable)
    state = fairseq_state_from_hf(hf, family)
    for style in STYLES[family]:
        path = tmp_path / f"{style}.pt"
        save_fairseq(path, fairseq_model_cfg(hf.config, family), state, style)
        # WavLM Large's cfg says normalize=True, Base's False (fairseq_model_cfg copies that)
        check_against_hf(path, hf, family, tmp_path, stable, normalize=family == "wavlm" and stable)


@pytest.mark.parametrize("family", ["hubert", "wav2vec2"])
def test_omegaconf_cfg_with_task_state(family, tmp_path):
    """Older fairseq pickles cfg as an omegaconf DictConfig, HuBERT's label dictionaries as
    fairseq.data.dictionary.Dictionary and numpy training statistics: all read without fairseq."""
    pytest.importorskip("omegaconf")
    hf = make_hf(family, stable=False)
    path = tmp_path / "omegaconf.pt"
    save_fairseq(path, fairseq_model_cfg(hf.config, family), fairseq_state_from_hf(hf, family), "omegaconf")
    check_against_hf(path, hf, family, tmp_path, stable=False)


def test_omegaconf_cfg_without_omegaconf_installed(tmp_path):
    pytest.importorskip("omegaconf")
    hf = make_hf("hubert", stable=True)
    path = tmp_path / "omegaconf.pt"
    save_fairseq(path, fairseq_model_cfg(hf.config, "hubert"), fairseq_state_from_hf(hf, "hubert"), "omegaconf")
    x, lengths = waveforms(True)
    torch.save({"x": x, "lengths": lengths, "reference": hf_hiddens(hf, x, lengths)}, tmp_path / "ref.pt")
    code = ("import sys, torch\n"
            "sys.modules['omegaconf'] = None; sys.modules['fairseq'] = None  # importing them now fails\n"
            "import prune\n"
            "model = prune.load_pretrained(sys.argv[1])\n"
            "ref = torch.load(sys.argv[2])\n"
            "hiddens, _ = model(ref['x'], ref['lengths'])\n"
            "print(max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(hiddens, ref['reference'])))\n")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "ref.pt")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) <= 1e-5


@pytest.mark.parametrize("family", ["hubert", "wav2vec2"])
def test_finetuned_ctc_checkpoint(family, tmp_path):
    """Wav2VecCtc / HubertCtc: the encoder is w2v_encoder.w2v_model, its config is w2v_args."""
    hf = make_hf(family, stable=False)
    encoder = fairseq_state_from_hf(hf, family, pretraining_extras=False)
    state = {f"w2v_encoder.w2v_model.{k}": v for k, v in encoder.items()}
    state["w2v_encoder.w2v_model.mask_emb"] = torch.rand(32)
    state["w2v_encoder.proj.weight"], state["w2v_encoder.proj.bias"] = torch.randn(12, 32), torch.randn(12)
    name = "hubert_ctc" if family == "hubert" else "wav2vec_ctc"
    cfg = {"model": {"_name": name, "w2v_path": "/pretrained.pt", "apply_mask": True,
                     "w2v_args": {"model": fairseq_model_cfg(hf.config, family), "task": {"normalize": False}}}}
    torch.save({"args": None, "cfg": cfg, "model": state}, tmp_path / "ctc.pt")
    model, report = load_pretrained(tmp_path / "ctc.pt", return_report=True)
    assert set(report.ignored) == {"w2v_encoder.proj.weight", "w2v_encoder.proj.bias",
                                   "w2v_encoder.w2v_model.mask_emb"}
    x, lengths = waveforms(True)
    assert_parity(model, hf_hiddens(hf, x, lengths), x, lengths)


def test_no_post_extract_proj_when_conv_dim_equals_embedding(tmp_path):
    """fairseq builds no post_extract_proj when the conv features already have the embedding size;
    transformers always has a projection: make it the identity and compare."""
    hf = make_hf("wav2vec2", stable=False, conv_dim=[32] * 7)
    with torch.no_grad():
        hf.feature_projection.projection.weight.copy_(torch.eye(32))
        hf.feature_projection.projection.bias.zero_()
    state = fairseq_state_from_hf(hf, "wav2vec2")
    del state["post_extract_proj.weight"], state["post_extract_proj.bias"]
    save_fairseq(tmp_path / "ckpt.pt", fairseq_model_cfg(hf.config, "wav2vec2"), state, "hydra")
    model, report = load_pretrained(tmp_path / "ckpt.pt", return_report=True)
    assert any("post_extract_proj" in note for note in report.notes)
    x, lengths = waveforms(True)
    assert_parity(model, hf_hiddens(hf, x, lengths), x, lengths)


def test_cfg_interpolation_is_resolved(tmp_path):
    hf = make_hf("hubert", stable=False)
    cfg = fairseq_model_cfg(hf.config, "hubert")
    cfg["encoder_layers"] = "${common.layers}"
    state = fairseq_state_from_hf(hf, "hubert")
    torch.save({"cfg": {"common": {"layers": 2}, "model": cfg}, "model": state}, tmp_path / "ckpt.pt")
    assert load_pretrained(tmp_path / "ckpt.pt").config.encoder_num_layers == 2


# ------------------------------------------------------------------------------ conv_feature_layers
@pytest.mark.parametrize("spec,expected", [
    ("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2", [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2),
    ("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
     [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2),
    ("2 * [(16, 3, 1)]", [(16, 3, 1)] * 2),
    ("[(1, 2, 3), (4, 5, 6)]", [(1, 2, 3), (4, 5, 6)]),
])
def test_conv_feature_layers_parser(spec, expected):
    assert parse_conv_feature_layers(spec) == expected


@pytest.mark.parametrize("spec", [
    "__import__('pathlib').Path({marker!r}).touch() or [(1, 2, 3)]",
    "[(open({marker!r}, 'w'), 2, 3)]",
    "[(512, 10, 5)] * 10 ** 9",
    "[(512, 10, 5)] * 100000",
    "[(512, 10)]", "[('a', 1, 2)]", "[(1.5, 2, 3)]", "[]", "[(1, 2, 3)] + 1", "[(0, 2, 3)]", "not python",
])
def test_conv_feature_layers_parser_refuses_anything_else(spec, tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(CheckpointError, match="conv_feature_layers"):
        parse_conv_feature_layers(spec.format(marker=str(marker)))
    assert not marker.exists()
