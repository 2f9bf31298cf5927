"""torchaudio Wav2Vec2Model state dicts load as the in-house encoder with identical outputs.

With torchaudio importable, random torchaudio models are the reference. Without it (as in CI
here), those tests skip and the torchaudio layout is still covered: a transformers model's weights
re-laid out by torchaudio's published ``import_huggingface_model`` correspondence
(``helpers_checkpoints.torchaudio_state_from_hf``) must reproduce transformers' hidden states.
"""

from __future__ import annotations

import pytest
import torch

from helpers_checkpoints import (VARIANT_IDS, VARIANTS, assert_parity, hf_hiddens, make_hf, rel_err,
                                 torchaudio_params, torchaudio_state_from_hf, waveforms)
from prune import CheckpointError, EncoderConfig, load_pretrained

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

try:
    import torchaudio
    TORCHAUDIO_ERROR = None
except Exception as e:  # not installed, or installed but broken against this torch
    torchaudio = None
    TORCHAUDIO_ERROR = f"{type(e).__name__}: {e}"

needs_torchaudio = pytest.mark.skipif(torchaudio is None,
                                      reason=f"torchaudio cannot be imported here ({TORCHAUDIO_ERROR})")


def _transformers():
    return pytest.importorskip("transformers", reason="the torchaudio-layout fixtures are built from transformers")


# ------------------------------------------------------------------------------ real torchaudio
TINY_PARAMS = dict(extractor_conv_layer_config=[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2,
                   encoder_embed_dim=32, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16,
                   encoder_pos_conv_groups=4, encoder_num_layers=2, encoder_num_heads=4,
                   encoder_attention_dropout=0.0, encoder_ff_interm_features=48, encoder_ff_interm_dropout=0.0,
                   encoder_dropout=0.0, encoder_layer_drop=0.0, aux_num_out=None)


@needs_torchaudio
@pytest.mark.parametrize("family,stable", VARIANTS, ids=VARIANT_IDS)
def test_torchaudio_parity(family, stable, tmp_path):
    params = dict(TINY_PARAMS, extractor_mode="layer_norm" if stable else "group_norm", extractor_conv_bias=stable,
                  encoder_layer_norm_first=stable)
    torch.manual_seed(0)
    if family == "wavlm":
        params.update(encoder_num_buckets=16, encoder_max_distance=32)
        reference = torchaudio.models.wavlm_model(**params)
    else:
        reference = torchaudio.models.wav2vec2_model(**params)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.eval()
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    # torchaudio's Wav2Vec2Model never normalises (its bundles do, outside the model)
    model, report = load_pretrained(tmp_path / "model.pt", config=dict(params, normalize_waveform=False),
                                    return_report=True)
    assert report.format == "torchaudio" and not report.notes
    for padded in (False, True):
        x, lengths = waveforms(padded)
        with torch.no_grad():
            layers, _ = reference.extract_features(x, lengths)  # each layer's output, no final LayerNorm
            final, _ = reference(x, lengths)  # the encoder output, with it
            hiddens, _ = model(x, lengths)
        assert len(hiddens) == len(layers) + 1
        compared = list(zip(hiddens[1:-1], layers[:-1])) + [(hiddens[-1], final)]
        if not stable:
            compared.append((hiddens[-1], layers[-1]))
        for ours, theirs in compared:
            assert rel_err(ours, theirs) <= 1e-5


# ------------------------------------------------------------------------------ the published layout
def layout_fixture(family, stable, tmp_path, name="model.pt"):
    _transformers()
    hf = make_hf(family, stable)
    path = tmp_path / name
    state = torchaudio_state_from_hf(hf, family)
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)
    return hf, path, state


def check(model, hf):
    for padded in (False, True):
        x, lengths = waveforms(padded)
        assert_parity(model, hf_hiddens(hf, x, lengths), x, lengths)


@pytest.mark.parametrize("family,stable", VARIANTS, ids=VARIANT_IDS)
def test_layout_with_bundle_params(family, stable, tmp_path):
    """A state dict plus the wav2vec2_model / wavlm_model arguments (a bundle's ``_params``, and
    its ``_normalize_waveform``, kept outside ``_params``)."""
    hf, path, _ = layout_fixture(family, stable, tmp_path)
    params = dict(torchaudio_params(hf.config, family), normalize_waveform=False)
    model, report = load_pretrained(path, config=params, return_report=True)
    assert report.format == "torchaudio" and not report.notes and not report.ignored
    assert model.config.encoder_layer_norm_first is stable
    check(model, hf)


@pytest.mark.parametrize("family,stable", VARIANTS, ids=VARIANT_IDS)
def test_layout_with_inferred_config(family, stable, tmp_path):
    """Shapes give the rest; what they cannot (heads of a non-standard width, WavLM's max distance
    differing from the published 800) is passed, and the assumptions are reported."""
    hf, path, _ = layout_fixture(family, stable, tmp_path, "model.safetensors")
    partial = {"encoder_max_distance": 32} if family == "wavlm" else {"encoder_num_heads": 4}
    partial["normalize_waveform"] = False  # the transformers reference takes raw waveforms
    model, report = load_pretrained(path, config=partial, return_report=True)
    assert model.config.encoder_layer_norm_first is stable
    assert model.config.encoder_num_heads == [4, 4]
    assert any("encoder_layer_norm_first" in note for note in report.notes)
    assert not any(key in note for note in report.notes for key in partial)
    check(model, hf)


def test_layout_needs_heads_for_a_non_standard_width(tmp_path):
    _, path, _ = layout_fixture("hubert", False, tmp_path)
    with pytest.raises(CheckpointError, match="encoder_num_heads"):
        load_pretrained(path)


def test_layout_with_an_encoder_config(tmp_path):
    hf, path, _ = layout_fixture("wavlm", True, tmp_path)
    params = torchaudio_params(hf.config, "wavlm")
    del params["aux_num_out"]
    check(load_pretrained(path, config=EncoderConfig(architecture="wavlm", **params)), hf)


def test_aux_head_and_hubert_pretrain_model_are_reported(tmp_path):
    hf, _, state = layout_fixture("hubert", False, tmp_path)
    params = dict(torchaudio_params(hf.config, "hubert"), aux_num_out=12)
    with_aux = dict(state, **{"aux.weight": torch.randn(12, 32), "aux.bias": torch.randn(12)})
    torch.save(with_aux, tmp_path / "ctc.pt")
    model, report = load_pretrained(tmp_path / "ctc.pt", config=params, return_report=True)
    assert set(report.ignored) == {"aux.weight", "aux.bias"}
    check(model, hf)

    # HuBERTPretrainModel: the Wav2Vec2Model under "wav2vec2." beside the pretraining heads
    pretrain = {f"wav2vec2.{k}": v for k, v in state.items()}
    pretrain.update({"mask_generator.mask_embedding": torch.rand(32),
                     "logit_generator.label_embeddings": torch.rand(7, 8),
                     "logit_generator.final_proj.weight": torch.randn(8, 32),
                     "logit_generator.final_proj.bias": torch.randn(8)})
    torch.save(pretrain, tmp_path / "pretrain.pt")
    model, report = load_pretrained(tmp_path / "pretrain.pt", config=params, return_report=True)
    assert set(report.ignored) == {"mask_generator.mask_embedding", "logit_generator.label_embeddings",
                                   "logit_generator.final_proj.weight", "logit_generator.final_proj.bias"}
    check(model, hf)


def test_layout_rejects_unknown_config_arguments(tmp_path):
    hf, path, _ = layout_fixture("hubert", False, tmp_path)
    params = dict(torchaudio_params(hf.config, "hubert"), encoder_num_experts=3)
    with pytest.raises(CheckpointError, match="encoder_num_experts"):
        load_pretrained(path, config=params)
