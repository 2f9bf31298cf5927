"""``inspect_checkpoint`` (``prune inspect PATH``) reports the structure of original and pruned
checkpoints, and ``load_pretrained`` reads prune's own exports."""

from __future__ import annotations

import re

import pytest
import torch

from helpers_checkpoints import count_hf_encoder_params, make_hf, torchaudio_state_from_hf
from prune import build_encoder, count_macs, count_params, export_pruned, inspect_checkpoint, load_pretrained
from prune import load_pruned, preset_config

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


def table_rows(text):
    """The per-layer table as [(layer, heads, ffn units, parameters)]."""
    return [tuple(m.groups()) for m in re.finditer(r"^\s+(\d+)\s+(\S+)\s+(\S+)\s+([\d,]+)$", text, re.M)]


def test_inspect_hugging_face_ctc(tmp_path):
    pytest.importorskip("transformers")
    hf = make_hf("wavlm", stable=True, head="ForCTC")
    hf.save_pretrained(tmp_path)
    text = inspect_checkpoint(tmp_path)
    config = load_pretrained(tmp_path).config

    assert "format:         Hugging Face (WavLMForCTC)" in text
    assert "architecture:   wavlm (pre-norm transformer, layer_norm conv extractor)" in text
    assert f"parameters:     {count_hf_encoder_params(hf.wavlm):,} " in text  # what transformers' encoder holds
    macs = count_macs(config, 1.0) / 1e6
    assert f"MACs:           {macs:.2f} M per second of 16 kHz audio" in text
    assert "position bias:  16 buckets, max distance 32" in text
    rows = table_rows(text)
    assert [r[:3] for r in rows] == [("0", "4", "48"), ("1", "4", "48")]
    layer_params = [sum(p.numel() for p in hf.wavlm.encoder.layers[i].parameters()) for i in range(2)]
    # transformers keeps the shared bias table in layer 0; prune keeps it beside the layers
    layer_params[0] -= hf.wavlm.encoder.layers[0].attention.rel_attn_embed.weight.numel()
    assert [int(r[3].replace(",", "")) for r in rows] == layer_params
    assert "CTC head (*ForCTC): lm_head.bias, lm_head.weight" in text


def test_inspect_pruned_export_and_load_it(tmp_path):
    source = preset_config("wavlm_base_tiny")
    pruned = source.replace(encoder_num_heads=[2, 3], encoder_head_index=[[0, 2], [1, 2, 3]],
                            encoder_ff_interm_features=[10, 48], encoder_ff_kept=[True, False],
                            extractor_conv_layer_config=[(12, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2,
                            extractor_norm_channels=[16] * 7)
    torch.manual_seed(0)
    model = build_encoder(pruned).eval()
    export_pruned(model, tmp_path / "export", source=source)

    text = inspect_checkpoint(tmp_path / "export")
    assert "format:         prune export (pruned encoder)" in text
    assert f"parameters:     {count_params(pruned):,} " in text
    share = 100 * count_params(pruned) / count_params(source)
    assert f"{share:.1f}% of the parameters" in text
    assert "channels 12, 16 x6" in text
    assert [r[:3] for r in table_rows(text)] == [("0", "2", "10"), ("1", "3", "-")]

    loaded = load_pretrained(tmp_path / "export")
    reference = load_pruned(tmp_path / "export")
    x = torch.randn(2, 8000)
    lengths = torch.tensor([8000, 6000])
    with torch.no_grad():
        for a, b in zip(loaded(x, lengths)[0], reference(x, lengths)[0]):
            assert torch.equal(a, b)


def test_inspect_reports_assumptions(tmp_path):
    pytest.importorskip("transformers")
    hf = make_hf("wavlm", stable=False)
    torch.save(torchaudio_state_from_hf(hf, "wavlm"), tmp_path / "wavlm.pt")
    text = inspect_checkpoint(tmp_path / "wavlm.pt")
    assert "format:         torchaudio (torchaudio Wav2Vec2Model)" in text
    assert "note: assumed encoder_max_distance: 800" in text
