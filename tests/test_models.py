import pytest
import torch
from conftest import TINY

from prune.measured import num_params
from prune.models import PRESETS, EncoderConfig, build_encoder, build_preset, preset_config, wav2vec2_model
from prune.structures import count_params


@pytest.mark.parametrize("name,params", [("hubert_base", 94_370_944), ("wav2vec2_base", 94_370_944),
                                         ("wavlm_base", 94_381_168), ("hubert_large", 315_434_112)])
def test_real_shapes_param_counts(name, params):
    # HF's HubertModel reports 94,371,712 for Base: ours minus its 768-wide masked_spec_embed
    with torch.device("meta"):
        model = build_preset(name)
    assert num_params(model) == params == count_params(model.config)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_count_params_formula_matches_numel(name):
    with torch.device("meta"):
        model = build_preset(name)
    assert count_params(model.config) == num_params(model)


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_lengths(name):
    model = build_preset(name).eval()
    lengths = torch.tensor([16000, 8000])
    hiddens, out_lengths = model(torch.randn(2, 16000), lengths)
    cfg = model.config
    assert len(hiddens) == cfg.encoder_num_layers + 1
    assert all(h.shape == (2, 49, cfg.encoder_embed_dim) for h in hiddens)
    assert out_lengths.tolist() == [49, 24]  # 16000 and 8000 samples through the 320x conv stack
    _, none = model(torch.randn(1, 16000))
    assert none is None


@pytest.mark.parametrize("name", ["wav2vec2_large_lv60k_tiny", "wavlm_large_tiny"])
def test_padding_does_not_change_valid_frames(name):
    """layer_norm-mode extractors have no statistics over time: a padded row must equal the same
    utterance run alone, on its valid frames (this checks the attention padding mask)."""
    model = build_preset(name).eval()
    short = torch.randn(1, 9000)
    batch = torch.cat([short, torch.zeros(1, 7000)], dim=1)
    batch = torch.cat([batch, torch.randn(1, 16000)])
    with torch.no_grad():
        alone, (n,) = model(short, torch.tensor([9000]))
        padded, lengths = model(batch, torch.tensor([9000, 16000]))
    assert lengths[0] == n
    for a, p in zip(alone, padded):
        torch.testing.assert_close(p[0, :n], a[0, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["hubert_base_tiny", "wavlm_large_tiny"])  # post-norm; pre-norm (final LN)
def test_num_layers_runs_the_first_layers_only(name):
    """forward(num_layers=k) returns the full model's first k + 1 hidden states, and layers above
    k are not run at all."""
    model = build_preset(name).eval()
    n = model.config.encoder_num_layers
    x, lengths = torch.randn(2, 8000), torch.tensor([8000, 5000])
    ran = []
    for i, layer in enumerate(model.encoder.transformer.layers):
        layer.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.no_grad():
        full, frames = model(x, lengths)
        for k in range(n + 1):
            ran.clear()
            part, part_frames = model(x, lengths, num_layers=k)
            assert ran == list(range(k))
            assert len(part) == k + 1 and torch.equal(part_frames, frames)
            for a, b in zip(part, full):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    for bad in (-1, n + 1):
        with pytest.raises(ValueError, match=rf"num_layers={bad} is outside \[0, {n}\]"):
            model(x, lengths, num_layers=bad)


def test_dropout_in_train_only():
    model = build_preset("hubert_base_tiny")
    x = torch.randn(1, 16000)
    model.train()
    a, _ = model(x)
    b, _ = model(x)
    assert not torch.allclose(a[-1], b[-1])
    model.eval()
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x)
    assert torch.equal(a[-1], b[-1])


def test_layer_drop_skips_layers_in_training():
    model = build_preset("hubert_base_tiny", encoder_layer_drop=1.0, encoder_dropout=0.0,
                         encoder_attention_dropout=0.0, encoder_projection_dropout=0.0).train()
    hiddens, _ = model(torch.randn(1, 16000))
    assert all(torch.equal(h, hiddens[0]) for h in hiddens)  # every layer dropped


def test_torchaudio_style_builder_and_config_round_trip():
    cfg = preset_config("wavlm_base_tiny")
    model = wav2vec2_model(**{k: v for k, v in cfg.to_dict().items()})
    assert num_params(model) == num_params(build_encoder(EncoderConfig.from_dict(cfg.to_dict())))
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="encoder_num_heads"):
        EncoderConfig(encoder_num_layers=2, encoder_num_heads=[4, 4, 4], encoder_head_dim=8)
    with pytest.raises(ValueError, match="unknown encoder config keys: \\['encoder_nmu_heads'\\]"):
        EncoderConfig.from_dict({"encoder_nmu_heads": 3})
    with pytest.raises(ValueError, match="extractor_mode"):
        EncoderConfig(extractor_mode="batch_norm")
    with pytest.raises(KeyError, match="unknown preset"):
        preset_config("hubert_small")
    with pytest.raises(ValueError, match="batch, samples"):
        build_preset("hubert_base_tiny")(torch.randn(16000))


def test_positional_conv_weight_is_cached_only_without_autograd():
    conv = build_preset("hubert_base_tiny").encoder.transformer.pos_conv_embed.conv
    with torch.no_grad():
        first = conv.weight()
        assert conv.weight() is first  # reused
        conv.weight_g.mul_(2.0)  # an update invalidates it
        second = conv.weight()
    assert second is not first
    torch.testing.assert_close(second, 2 * first)
    with_grad = conv.weight()  # with autograd: always fresh, and differentiable
    assert with_grad.requires_grad and with_grad is not second
    with_grad.sum().backward()
    assert conv.weight_v.grad is not None


def _documented_names():
    """EncoderConfig's docstring table: field -> (transformers names, fairseq names), "-" as none."""
    import re

    lines = EncoderConfig.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["field", "transformers", "fairseq"])
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        field, hf, fairseq, _meaning = re.split(r"\s{2,}", line.strip(), maxsplit=3)
        rows[field] = tuple([] if names == "-" else names.split(", ") for names in (hf, fairseq))
    return rows


def test_every_encoder_config_field_is_documented_with_its_transformers_and_fairseq_names():
    """A new EncoderConfig field needs its row; each documented name is one the importers know."""
    import dataclasses

    from prune.checkpoints.fairseq import FAIRSEQ_DEFAULTS
    from prune.checkpoints.hf import HF_DEFAULTS

    rows = _documented_names()
    assert list(rows) == [f.name for f in dataclasses.fields(EncoderConfig)]  # every field, in order
    hf_known = set(HF_DEFAULTS) | {"model_type", "do_normalize"}  # config.json's and preprocessor_config.json's
    fairseq_known = set(FAIRSEQ_DEFAULTS) | {"_name", "normalize"}  # the model's registered name, the task's key
    for field, (hf, fairseq) in rows.items():
        assert set(hf) <= hf_known, f"{field}: {hf}"
        assert set(fairseq) <= fairseq_known, f"{field}: {fairseq}"
    assert rows["encoder_embed_dim"] == (["hidden_size"], ["encoder_embed_dim"])
    assert rows["extractor_conv_layer_config"][0] == ["conv_dim", "conv_kernel", "conv_stride"]
