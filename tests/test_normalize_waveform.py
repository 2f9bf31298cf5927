"""Waveform normalisation (``normalize_waveform``: fairseq ``task.normalize``, transformers'
``do_normalize``): applied per utterance over its valid samples, read from every checkpoint format
that records it, set by the Large presets, kept by the gated student, the compiled model and the
export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import randomize_gates
from helpers_checkpoints import (VARIANT_IDS, VARIANTS, assert_parity, fairseq_model_cfg, fairseq_normalized,
                                 fairseq_state_from_hf, hf_hiddens, make_hf, pad, recordings, rel_err,
                                 save_fairseq, torchaudio_params, torchaudio_state_from_hf)

from prune import CheckpointError, load_pretrained
from prune.checkpoints import export_pruned, load_pruned
from prune.checkpoints.inspect import inspect_checkpoint
from prune.compile import compile_encoder
from prune.models import PRESETS, build_preset, preset_config
from prune.models.components import normalize_waveforms
from prune.structures import GatedEncoder

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

LARGE = ("wav2vec2_large_lv60k", "hubert_large", "wavlm_large")


def _transformers():
    return pytest.importorskip("transformers")


def hiddens(model, x, lengths=None):
    with torch.no_grad():
        return model(x, lengths)[0]


# ------------------------------------------------------------------------------ the operation
def test_matches_fairseq_per_utterance_layer_norm_and_ignores_padding():
    x, lengths = pad(recordings())
    out = normalize_waveforms(x, lengths)
    torch.testing.assert_close(out, fairseq_normalized(x, lengths), rtol=0, atol=2e-6)
    for row, n in zip(out, lengths.tolist()):
        assert torch.all(row[n:] == 0)
        assert abs(row[:n].mean().item()) < 1e-6 and abs(row[:n].var(unbiased=False).item() - 1) < 1e-4
    # whatever the padding holds changes nothing
    garbage, _ = pad(recordings(), fill=7.0)
    assert torch.equal(normalize_waveforms(garbage, lengths), out)
    # no lengths: the whole row, as F.layer_norm; an empty row stays zeros
    torch.testing.assert_close(normalize_waveforms(x[:1]), fairseq_normalized(x[:1], None))
    assert normalize_waveforms(x[:1], torch.tensor([0])).abs().max() == 0


def test_half_precision_statistics_are_taken_in_float32():
    x, lengths = pad(recordings())
    out = normalize_waveforms(x.to(torch.bfloat16), lengths)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fairseq_normalized(x, lengths), rtol=0, atol=3e-2)


# ------------------------------------------------------------------------------ presets and the model
def test_large_presets_normalise_base_ones_do_not():
    for name in PRESETS:
        expected = name.removesuffix("_tiny") in LARGE
        assert preset_config(name).normalize_waveform is expected, name


@pytest.mark.parametrize("name", ["hubert_large_tiny", "wavlm_large_tiny"])
def test_model_is_invariant_to_level_offset_and_padding(name):
    model = build_preset(name).eval()
    utterances = recordings()
    x, lengths = pad(utterances)
    batched = hiddens(model, x, lengths)
    # another level and offset (the padding then holds -0.3, which must not matter either)
    assert rel_err(hiddens(model, 2 * x - 0.3, lengths)[-1], batched[-1]) < 1e-5
    # each utterance alone gives what it gives in the padded batch, on its valid frames
    frames = model(x, lengths)[1]
    for i, u in enumerate(utterances):
        alone = hiddens(model, u[None])
        for a, b in zip(alone, batched):
            assert rel_err(b[i, :frames[i]], a[0]) < 1e-5


def test_a_model_without_it_takes_waveforms_as_given():
    model = build_preset("hubert_large_tiny", normalize_waveform=False).eval()
    x, lengths = pad(recordings())
    assert rel_err(hiddens(model, 0.1 * x + 1.0, lengths)[-1], hiddens(model, x, lengths)[-1]) > 1e-2


def test_torch_export_with_dynamic_batch_and_length():
    model = build_preset("wavlm_large_tiny").eval()
    assert model.config.normalize_waveform  # the masked statistics are in the exported graph
    x, lengths = pad(recordings())
    batch, samples = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("samples", min=1000, max=64000)
    program = torch.export.export(model, (x, lengths), dynamic_shapes=({0: batch, 1: samples}, {0: batch}))
    y, y_lengths = pad(recordings()[1:])  # another batch size and length
    expected, _ = model(y, y_lengths)
    with torch.no_grad():
        actual, _ = program.module()(y, y_lengths)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pretraining_head_normalises_too():
    from prune.pretrain.masked_prediction import MaskedPrediction
    head = MaskedPrediction(build_preset("hubert_large_tiny"), num_clusters=5).eval()
    x, lengths = pad(recordings())
    with torch.no_grad():
        a, _, _ = head(x, lengths)
        b, _, _ = head(2 * x + 0.5, lengths)
    assert rel_err(b, a) < 1e-5


# ------------------------------------------------------------------------------ student, compile, export
def test_gated_compiled_and_exported_models_keep_it(tmp_path):
    gated = randomize_gates(GatedEncoder(build_preset("wav2vec2_large_lv60k_tiny"))).eval()
    compiled = compile_encoder(gated)
    assert gated.config.normalize_waveform and compiled.config.normalize_waveform
    x, lengths = pad(recordings())
    expected = hiddens(gated, x, lengths)
    assert rel_err(hiddens(gated, 3 * x + 1, lengths)[-1], expected[-1]) < 1e-5  # the student normalises
    out = export_pruned(compiled, tmp_path / "export", source=gated.config)
    assert json.loads((out / "config.json").read_text())["config"]["normalize_waveform"] is True
    loaded = load_pruned(out)
    assert loaded.config.normalize_waveform
    assert all(torch.equal(a, b) for a, b in zip(hiddens(loaded, x, lengths), hiddens(compiled, x, lengths)))
    assert rel_err(hiddens(loaded, x, lengths)[-1], expected[-1]) < 1e-5
    assert "input:          waveforms normalised per utterance" in inspect_checkpoint(out)


def test_an_export_from_before_the_key_loads_as_not_normalising(tmp_path):
    out = export_pruned(build_preset("hubert_base_tiny").eval(), tmp_path / "export")
    info = json.loads((out / "config.json").read_text())
    del info["config"]["normalize_waveform"]
    (out / "config.json").write_text(json.dumps(info))
    assert load_pruned(out).config.normalize_waveform is False
    assert "input:          raw waveforms (not normalised)" in inspect_checkpoint(out)


# ------------------------------------------------------------------------------ Hugging Face
def hf_folder(family, stable, tmp_path, **extractor):
    """A save_pretrained model, plus its feature extractor's preprocessor_config.json if given."""
    transformers = _transformers()
    hf = make_hf(family, stable)
    hf.save_pretrained(tmp_path)
    fe = None
    if extractor:
        fe = transformers.Wav2Vec2FeatureExtractor(**extractor)
        fe.save_pretrained(tmp_path)
    return hf, fe


@pytest.mark.parametrize("family,stable", VARIANTS, ids=VARIANT_IDS)
def test_hf_parity_with_do_normalize(family, stable, tmp_path):
    """transformers' feature extractor normalises a padded batch (attention mask given), its model
    runs on that; prune, loading the folder, takes the raw padded waveforms and their lengths."""
    hf, fe = hf_folder(family, stable, tmp_path, do_normalize=True, return_attention_mask=True)
    utterances = recordings()
    inputs = fe([u.numpy() for u in utterances], sampling_rate=16000, padding=True, return_attention_mask=True,
                return_tensors="pt")
    with torch.no_grad():
        out = hf(inputs.input_values, attention_mask=inputs.attention_mask, output_hidden_states=True)
    reference = list(out.hidden_states[:-1]) + [out.last_hidden_state]

    model, report = load_pretrained(tmp_path, return_report=True)
    assert model.config.normalize_waveform is True and not report.notes
    x, lengths = pad(utterances)
    assert torch.equal(inputs.attention_mask.sum(-1), lengths)
    worst = assert_parity(model, reference, x, lengths)
    assert worst < 1e-5
    # the same comparison catches a missing normalisation
    raw = load_pretrained(tmp_path).eval()
    raw.config.normalize_waveform = False
    assert max(rel_err(a, b) for a, b in zip(hiddens(raw, x, lengths), reference)) > 1e-2


def test_hf_processor_config_of_transformers_5(tmp_path):
    """transformers 5 saves a Wav2Vec2Processor's feature extractor inside processor_config.json."""
    transformers = _transformers()
    make_hf("hubert", True).save_pretrained(tmp_path)
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"<pad>": 0, "|": 1, "a": 2}))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(vocab))
    processor = transformers.Wav2Vec2Processor(transformers.Wav2Vec2FeatureExtractor(do_normalize=True), tokenizer)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").is_file() or (tmp_path / "preprocessor_config.json").is_file()
    assert load_pretrained(tmp_path).config.normalize_waveform is True


def test_hf_folder_without_a_feature_extractor_does_not_normalise_and_says_so(tmp_path):
    hf_folder("wavlm", True, tmp_path)
    model, report = load_pretrained(tmp_path, return_report=True)
    assert model.config.normalize_waveform is False
    assert any("preprocessor_config.json" in note and "not normalised" in note for note in report.notes)
    assert "raw waveforms (not normalised)" in inspect_checkpoint(tmp_path)


def test_hf_do_normalize_false_and_bad_values(tmp_path):
    hf_folder("wav2vec2", False, tmp_path, do_normalize=False)
    model, report = load_pretrained(tmp_path, return_report=True)
    assert model.config.normalize_waveform is False and not report.notes
    file = tmp_path / "preprocessor_config.json"
    file.write_text(json.dumps(dict(json.loads(file.read_text()), do_normalize="yes")))
    with pytest.raises(CheckpointError, match="preprocessor_config.json: do_normalize must be true or false"):
        load_pretrained(tmp_path)


# ------------------------------------------------------------------------------ fairseq
@pytest.mark.parametrize("style", ["hydra", "args"])
def test_fairseq_task_normalize(style, tmp_path):
    """HuBERT Large / wav2vec 2.0 LV-60k were pre-trained with task.normalize=True."""
    hf = make_hf("hubert", True)
    state = fairseq_state_from_hf(hf, "hubert")
    utterances = recordings()
    x, lengths = pad(utterances)
    for normalize in (True, False):
        path = tmp_path / f"{style}-{normalize}.pt"
        save_fairseq(path, fairseq_model_cfg(hf.config, "hubert"), state, style, normalize=normalize)
        model = load_pretrained(path)
        assert model.config.normalize_waveform is normalize
        hf_input = fairseq_normalized(x, lengths) if normalize else x
        assert_parity(model, hf_hiddens(hf, hf_input, lengths), x, lengths)


def test_fairseq_normalize_through_an_interpolation_and_in_a_finetuned_checkpoint(tmp_path):
    hf = make_hf("wav2vec2", True)
    encoder = fairseq_state_from_hf(hf, "wav2vec2", pretraining_extras=False)
    model_cfg = dict(fairseq_model_cfg(hf.config, "wav2vec2"), normalize="${task.normalize}")
    torch.save({"cfg": {"task": {"normalize": True}, "model": model_cfg}, "model": encoder}, tmp_path / "a.pt")
    assert load_pretrained(tmp_path / "a.pt").config.normalize_waveform is True

    state = {f"w2v_encoder.w2v_model.{k}": v for k, v in encoder.items()}
    cfg = {"task": {"normalize": True},
           "model": {"_name": "wav2vec_ctc", "w2v_args": {"model": fairseq_model_cfg(hf.config, "wav2vec2"),
                                                          "task": {"normalize": True}}}}
    torch.save({"args": None, "cfg": cfg, "model": state}, tmp_path / "ctc.pt")
    assert load_pretrained(tmp_path / "ctc.pt").config.normalize_waveform is True


def test_fairseq_normalize_that_is_not_a_flag(tmp_path):
    hf = make_hf("hubert", False)
    save_fairseq(tmp_path / "x.pt", fairseq_model_cfg(hf.config, "hubert"), fairseq_state_from_hf(hf, "hubert"),
                 "hydra", normalize="sometimes")
    with pytest.raises(CheckpointError, match="normalize must be true or false, got 'sometimes'"):
        load_pretrained(tmp_path / "x.pt")


# ------------------------------------------------------------------------------ torchaudio / DPHuBERT
def dphubert_config(hf_cfg, normalize):
    """The config DPHuBERT saves beside its state dict (convert_hubert_large_from_fairseq.py):
    torchaudio's wav2vec2_model arguments with DPHuBERT's own additions."""
    params = torchaudio_params(hf_cfg, "hubert")
    n = params["encoder_num_layers"]
    params.update(encoder_use_attention=[True] * n, encoder_use_feed_forward=[True] * n,
                  encoder_num_heads=[params["encoder_num_heads"]] * n,
                  encoder_head_dim=hf_cfg.hidden_size // hf_cfg.num_attention_heads,
                  encoder_ff_interm_features=[params["encoder_ff_interm_features"]] * n,
                  normalize_waveform=normalize, extractor_prune_conv_channels=False,
                  encoder_prune_attention_heads=False, encoder_prune_attention_layer=False,
                  encoder_prune_feed_forward_intermediate=False, encoder_prune_feed_forward_layer=False)
    return params


def test_dphubert_checkpoint_with_normalize_waveform(tmp_path):
    _transformers()
    hf = make_hf("hubert", True)
    x, lengths = pad(recordings())
    for normalize in (True, False):
        path = tmp_path / f"dphubert-{normalize}.pth"
        torch.save({"state_dict": torchaudio_state_from_hf(hf, "hubert"),
                    "config": dphubert_config(hf.config, normalize), "distill_linear_projs": {}}, path)
        model, report = load_pretrained(path, return_report=True)
        assert report.format == "dphubert" and model.config.normalize_waveform is normalize
        assert not any("normalize_waveform" in note for note in report.notes)
        hf_input = fairseq_normalized(x, lengths) if normalize else x
        assert_parity(model, hf_hiddens(hf, hf_input, lengths), x, lengths)
    # the caller's config overrides the file's
    assert load_pretrained(path, config={"normalize_waveform": True}).config.normalize_waveform is True


def test_dphubert_checkpoint_saved_while_pruning_needs_its_gates(tmp_path):
    """A file saved while pruning loads with its gates folded in (test_import_dphubert.py); one whose
    config says gated but whose state dict lacks the gates is refused."""
    _transformers()
    hf = make_hf("hubert", True)
    config = dict(dphubert_config(hf.config, True), encoder_prune_attention_heads=True)
    torch.save({"state_dict": torchaudio_state_from_hf(hf, "hubert"), "config": config}, tmp_path / "gated.pth")
    with pytest.raises(CheckpointError, match="encoder_prune_attention_heads=True but the state dict has no"):
        load_pretrained(tmp_path / "gated.pth")


@pytest.mark.parametrize("stable", [False, True])
def test_torchaudio_state_dict_assumes_it_for_layer_norm_extractors(stable, tmp_path):
    """torchaudio's bundles keep _normalize_waveform outside the state dict: every published
    layer_norm-extractor model normalises, every group_norm one does not; the report says so."""
    _transformers()
    hf = make_hf("hubert", stable)
    torch.save(torchaudio_state_from_hf(hf, "hubert"), tmp_path / "model.pt")
    model, report = load_pretrained(tmp_path / "model.pt", config={"encoder_num_heads": 4}, return_report=True)
    assert model.config.normalize_waveform is stable
    assert any(note.startswith("assumed normalize_waveform") for note in report.notes)
    x, lengths = pad(recordings())
    hf_input = fairseq_normalized(x, lengths) if stable else x
    assert_parity(model, hf_hiddens(hf, hf_input, lengths), x, lengths)


def test_feature_extractor_eps_differs_little_at_speech_levels():
    """transformers adds 1e-7 to the variance, fairseq (what the models were trained with) 1e-5:
    at a speech level of RMS 0.05 the normalised waveforms differ by about 2e-3 relative."""
    x = 0.05 * torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    ours = normalize_waveforms(x)
    hf_style = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    assert 1e-3 < rel_err(ours, hf_style) < 3e-3
    assert np.isclose(rel_err(ours, hf_style), 0.5 * (1e-5 - 1e-7) / 0.05 ** 2, rtol=0.1)
