"""Checkpoints that cannot be loaded fail with a CheckpointError that says what and where, and
files that would run code when unpickled are refused before anything runs."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from helpers_checkpoints import (CustomConfig, fairseq_model_cfg, fairseq_state_from_hf, make_hf, save_fairseq,
                                 torchaudio_params, torchaudio_state_from_hf)
from prune import CheckpointError, build_preset, export_pruned, load_pretrained

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


def _transformers():
    return pytest.importorskip("transformers")


@pytest.fixture
def hf_dir(tmp_path):
    _transformers()
    folder = tmp_path / "hf"
    make_hf("hubert", stable=False).save_pretrained(folder)
    return folder


def _edit_safetensors(folder, edit):
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


# ------------------------------------------------------------------------------ unreadable files
def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nothing.pt")


def test_truncated_safetensors(hf_dir):
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_pretrained(hf_dir)


def test_truncated_torch_file(tmp_path):
    _transformers()
    hf = make_hf("wav2vec2", stable=False)
    path = tmp_path / "ckpt.pt"
    save_fairseq(path, fairseq_model_cfg(hf.config, "wav2vec2"), fairseq_state_from_hf(hf, "wav2vec2"), "hydra")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(CheckpointError, match="ckpt.pt.*truncated"):
        load_pretrained(path)


def test_damaged_config_json(hf_dir):
    (hf_dir / "config.json").write_text('{"model_type": "hubert", ')
    with pytest.raises(CheckpointError, match="config.json.*JSON"):
        load_pretrained(hf_dir)


def test_text_file(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_pretrained(tmp_path / "notes.pt")


def test_truncated_pruned_export(tmp_path):
    export_pruned(build_preset("hubert_base_tiny").eval(), tmp_path / "export")
    weights = tmp_path / "export" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_path / "export")


# ------------------------------------------------------------------------------ other model families
def test_bert_folder(tmp_path):
    transformers = _transformers()
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=37, vocab_size=50)
    transformers.BertModel(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="'bert' model"):
        load_pretrained(tmp_path)


def test_unrelated_state_dict(tmp_path):
    torch.save(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(CheckpointError, match=r"not a HuBERT.*0\.weight"):
        load_pretrained(tmp_path / "mlp.pt")


def test_unrelated_object(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt is not a checkpoint prune can read: a list"):
        load_pretrained(tmp_path / "list.pt")


def test_unsupported_fairseq_model(tmp_path):
    _transformers()
    hf = make_hf("wav2vec2", stable=False)
    cfg = dict(fairseq_model_cfg(hf.config, "wav2vec2"), _name="data2vec_audio")
    save_fairseq(tmp_path / "d2v.pt", cfg, fairseq_state_from_hf(hf, "wav2vec2"), "hydra")
    with pytest.raises(CheckpointError, match="'data2vec_audio' model"):
        load_pretrained(tmp_path / "d2v.pt")


def test_unsupported_hf_setting(tmp_path):
    _transformers()
    make_hf("hubert", stable=False, conv_pos_batch_norm=True).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="conv_pos_batch_norm=True"):
        load_pretrained(tmp_path)


def test_hf_state_dict_without_its_config(hf_dir, tmp_path):
    from safetensors.torch import load_file
    torch.save(load_file(hf_dir / "model.safetensors"), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="Hugging Face state dict without its config.json"):
        load_pretrained(tmp_path / "weights.pt")


# ------------------------------------------------------------------------------ keys and shapes
def test_hf_missing_key_is_named(hf_dir):
    _edit_safetensors(hf_dir, lambda s: s.pop("encoder.layers.1.attention.q_proj.weight"))
    with pytest.raises(CheckpointError,
                       match=r"missing 1 weight\(s\): encoder\.layers\.1\.attention\.q_proj\.weight \(for "):
        load_pretrained(hf_dir)


def test_fairseq_missing_key_is_named(tmp_path):
    _transformers()
    hf = make_hf("wavlm", stable=False)
    state = fairseq_state_from_hf(hf, "wavlm")
    del state["encoder.layers.1.fc1.weight"]
    save_fairseq(tmp_path / "wavlm.pt", fairseq_model_cfg(hf.config, "wavlm"), state, "wavlm")
    with pytest.raises(CheckpointError, match=r"wavlm.pt.*missing 1 weight.*encoder\.layers\.1\.fc1\.weight"):
        load_pretrained(tmp_path / "wavlm.pt")


def test_hf_wrong_shape_is_named(hf_dir):
    _edit_safetensors(hf_dir, lambda s: s.update({"encoder.layers.0.feed_forward.intermediate_dense.weight":
                                                  torch.randn(40, 32)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*encoder\.layers\.0\.feed_forward\.intermediate_dense"
                                              r"\.weight: \(40, 32\) in the file, \(48, 32\) expected"):
        load_pretrained(hf_dir)


def test_torchaudio_wrong_shape_is_named(tmp_path):
    _transformers()
    hf = make_hf("wav2vec2", stable=False)
    state = torchaudio_state_from_hf(hf, "wav2vec2")
    state["encoder.feature_projection.projection.bias"] = torch.randn(31)
    torch.save(state, tmp_path / "ta.pt")
    with pytest.raises(CheckpointError, match=r"encoder\.feature_projection\.projection\.bias: \(31,\) in the file"):
        load_pretrained(tmp_path / "ta.pt", config=torchaudio_params(hf.config, "wav2vec2"))


def test_unknown_key_is_named(hf_dir):
    _edit_safetensors(hf_dir, lambda s: s.update({"encoder.layers.0.attention.extra_proj.weight": torch.randn(3)}))
    with pytest.raises(CheckpointError, match=r"not in the Hugging Face key map.*extra_proj"):
        load_pretrained(hf_dir)


def test_layers_beyond_the_config_are_named(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=1)))
    with pytest.raises(CheckpointError, match=r"that the config has no place for.*encoder\.layers\.1\."):
        load_pretrained(hf_dir)


def test_both_weight_norm_spellings(hf_dir):
    base = "encoder.pos_conv_embed.conv."
    g = base + "parametrizations.weight.original0"
    _edit_safetensors(hf_dir, lambda s: s.update({base + "weight_g": s[g].clone()}))
    with pytest.raises(CheckpointError, match="both give"):
        load_pretrained(hf_dir)


def test_config_argument_is_for_torchaudio_only(hf_dir):
    with pytest.raises(CheckpointError, match="config= is only for torchaudio"):
        load_pretrained(hf_dir, config={"encoder_num_heads": 4})


# ------------------------------------------------------------------------------ unsafe pickles
class WritesMarker:
    """Unpickling this creates the file ``path``: the stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _assert_refused(path, marker):
    with pytest.raises(CheckpointError, match=r"(builtins\.open|io\.open).*trust_pickle=True"):
        load_pretrained(path)
    assert not marker.exists(), "unpickling ran code from the file"


def test_the_marker_pickle_runs_code_when_unpickled_unsafely(tmp_path):
    """Control: plain pickle does create the marker, so its absence below proves nothing ran."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(WritesMarker(marker))).close()
    assert marker.exists()


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": {"w": torch.zeros(1)}, "cfg": {"model": WritesMarker(marker)}}, tmp_path / "evil.pt")
    _assert_refused(tmp_path / "evil.pt", marker)


def test_code_running_state_dict_is_refused(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"encoder.transformer.layer_norm.weight": WritesMarker(marker)}, tmp_path / "evil.pt")
    _assert_refused(tmp_path / "evil.pt", marker)


def test_code_running_plain_pickle_is_refused(tmp_path):
    """Not even a torch zip file: the legacy path of torch.load must refuse it too."""
    marker = tmp_path / "marker"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": WritesMarker(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError):
        load_pretrained(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_pytorch_model_bin_is_unpickled_safely(hf_dir):
    from safetensors.torch import load_file
    marker = hf_dir / "marker"
    state = load_file(hf_dir / "model.safetensors")
    state["lm_head.weight"] = WritesMarker(marker)
    (hf_dir / "model.safetensors").unlink()
    torch.save(state, hf_dir / "pytorch_model.bin")
    _assert_refused(hf_dir / "pytorch_model.bin", marker)


def test_trust_pickle_opts_in(tmp_path):
    """A checkpoint holding a class beyond the allow-list: refused by default (naming the class),
    loaded with trust_pickle=True."""
    _transformers()
    hf = make_hf("hubert", stable=False)
    path = tmp_path / "custom.pt"
    ckpt = {"cfg": {"model": fairseq_model_cfg(hf.config, "hubert")}, "model": fairseq_state_from_hf(hf, "hubert"),
            "extra_state": CustomConfig(note="trainer state")}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"helpers_checkpoints\.CustomConfig.*trust_pickle=True"):
        load_pretrained(path)
    model = load_pretrained(path, trust_pickle=True)
    assert model.config.architecture == "hubert"


def test_refusal_leaves_no_allowlist_behind(tmp_path):
    """The stand-ins are allowed only inside load_pretrained: plain torch.load still refuses."""
    import argparse
    torch.save({"args": argparse.Namespace(arch="hubert"), "model": {}}, tmp_path / "ns.pt")
    with pytest.raises(CheckpointError, match="ns.pt"):  # read (with the stand-ins), then refused: no weights
        load_pretrained(tmp_path / "ns.pt")
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(tmp_path / "ns.pt", weights_only=True)
