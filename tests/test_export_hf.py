"""``prune convert MODEL OUT --to hf``: the folder is what transformers loads with its own classes, its
hidden states are prune's (unpruned, a round trip from transformers, and pruned to a shape transformers
holds), the shapes it cannot hold are refused in one line before anything is written, and the folder
fine-tunes with transformers' ``*ForCTC``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from helpers import CLOSED  # noqa: E402
from helpers_checkpoints import CLASS_PREFIX, make_hf, pad, recordings  # noqa: E402
from prune import load_pretrained, num_params  # noqa: E402
from prune.checkpoints.convert import convert, write_model  # noqa: E402
from prune.checkpoints.hf import HF_DEFAULTS  # noqa: E402
from prune.checkpoints.hf_export import blockers, check_holdable  # noqa: E402
from prune.compile import compile_encoder  # noqa: E402
from prune.models import build_preset, preset_config  # noqa: E402
from prune.structures import GatedEncoder  # noqa: E402

TOL = 1e-5  # max relative error of a hidden state, float32
# post-norm HuBERT, post-norm WavLM (Base+), pre-norm wav2vec 2.0 Large (layer_norm extractor), pre-norm WavLM Large
FAMILIES = ["hubert_base_tiny", "wavlm_base_plus_tiny", "wav2vec2_large_lv60k_tiny", "wavlm_large_tiny"]
FAMILY_OF = {"hubert": "hubert", "wavlm": "wavlm", "wav2vec2": "wav2vec2"}

# transformers' WavLM passes a float bias with a bool padding mask to torch's attention
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


def hf_load(folder):
    """transformers' AutoModel on the folder (no custom code), checked to have loaded every key."""
    model, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # no missing / unexpected / mismatched keys
    return model.eval()


def hf_params(hf) -> int:
    """transformers' parameters, SpecAugment's mask embedding (training only, not in prune) aside."""
    return sum(p.numel() for name, p in hf.named_parameters() if name != "masked_spec_embed")


def hf_hidden_states(folder, hf, utterances):
    """transformers' hidden states on a padded batch, prepared by the folder's own feature extractor
    (its do_normalize and attention mask): the input to each layer, then last_hidden_state."""
    extractor = transformers.AutoFeatureExtractor.from_pretrained(folder)
    inputs = extractor([u.numpy() for u in utterances], sampling_rate=16000, padding=True, return_tensors="pt")
    assert "attention_mask" in inputs
    with torch.no_grad():
        out = hf(inputs["input_values"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    return list(out.hidden_states[:-1]) + [out.last_hidden_state]


def assert_same_hidden_states(model, folder, kept=None):
    """transformers' hidden states equal prune's (``kept``: the prune layers that are transformers'
    layers; the last hidden state is prune's last either way), and so do the parameter counts."""
    hf = hf_load(folder)
    utterances = recordings()  # levels well above 1: the two normalisation eps agree to ~3e-6
    theirs = hf_hidden_states(folder, hf, utterances)
    with torch.no_grad():
        ours, _ = model.eval()(*pad(utterances))
    n = model.config.encoder_num_layers
    kept = list(range(n)) if kept is None else kept
    index = [0] + [i + 1 for i in kept[:-1]] + [n]
    assert len(theirs) == len(index)
    for j, i in enumerate(index):
        assert theirs[j].shape == ours[i].shape
        error = ((theirs[j] - ours[i]).abs().max() / ours[i].abs().max()).item()
        assert error <= TOL, f"transformers' hidden state {j} vs prune's {i}: relative error {error:.2e}"
    assert hf_params(hf) == num_params(model)
    assert type(hf).__name__ == f"{CLASS_PREFIX[model.config.architecture]}Model"
    return hf


def folder_files(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------ (a) unpruned
@pytest.mark.parametrize("preset", FAMILIES)
def test_unpruned_model_loads_in_transformers_with_the_same_hidden_states(preset, tmp_path):
    model = build_preset(preset).eval()
    out = tmp_path / "hf"
    lines = write_model(model, out, to="hf")
    assert folder_files(out) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((out / "config.json").read_text())
    c = model.config
    assert config["model_type"] == c.architecture
    assert config["architectures"] == [f"{CLASS_PREFIX[c.architecture]}Model"]
    assert config["do_stable_layer_norm"] is c.encoder_layer_norm_first
    assert config["feat_extract_norm"] == {"group_norm": "group", "layer_norm": "layer"}[c.extractor_mode]
    assert config["conv_dim"] == [16] * 7 and config["num_hidden_layers"] == c.encoder_num_layers
    assert config["intermediate_size"] == 48 and config["num_attention_heads"] == 4
    if c.is_wavlm:
        assert (config["num_buckets"], config["max_bucket_distance"]) == (16, 32)
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["do_normalize"] is c.normalize_waveform  # true for the Large presets
    assert preprocessor["return_attention_mask"] is True and preprocessor["sampling_rate"] == 16000
    assert_same_hidden_states(model, out)
    assert lines[0].startswith("transformers vs prune, max relative error over the ")
    assert lines[-1].startswith(f"wrote {out} (") and f"{num_params(model):,} parameters" in lines[-1]
    # and prune reads it back as it was
    back = load_pretrained(out)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.config.normalize_waveform is c.normalize_waveform


# ------------------------------------------------------------------------------ (b) round trip
@pytest.mark.parametrize("family,stable", [("hubert", False), ("wavlm", False), ("wav2vec2", True),
                                           ("wavlm", True)])
def test_a_transformers_folder_round_trips_to_the_same_weights(family, stable, tmp_path):
    source = tmp_path / "source"
    make_hf(family, stable).save_pretrained(source)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=stable).save_pretrained(source)
    out = tmp_path / "out"
    convert(source, out, "hf")
    a, b = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    # the mask embedding is training-only: prune does not import it, the export has transformers' init
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == ["masked_spec_embed"]
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (source, out))
    for key in [*HF_DEFAULTS, "model_type", "architectures"]:  # what the importer reads
        assert ca.get(key) == cb.get(key), key
    assert json.loads((out / "preprocessor_config.json").read_text())["do_normalize"] is stable


# ------------------------------------------------------------------------------ (c) pruned
@torch.no_grad()
def uniform_pruned(preset: str, units: int = 30, remove_layer=None, conv_cut: int = 3, seed: int = 0):
    """A compiled model in a shape transformers holds, from gates set by hand: every head of each
    kept layer; ``units`` FFN units in every layer (a different set per layer, soft values < 1 folded
    in); layer ``remove_layer`` removed whole (both blocks' gates closed); with a group_norm extractor
    ``conv_cut`` channels cut in every conv layer but the last (GroupNorm is per channel and the
    convs between have no norm; the last one feeds the feature projection's LayerNorm)."""
    torch.manual_seed(seed)
    gated = GatedEncoder(build_preset(preset))
    g = torch.Generator().manual_seed(seed)
    for name, p in gated.named_parameters():
        if name.endswith("log_alpha"):  # open; whole blocks with soft values 0.5-0.9, units 0.99
            p.copy_(torch.rand(p.shape, generator=g) * 1.5 if p.numel() == 1 else
                    torch.rand(p.shape, generator=g) * 2 + 4.0)
    for block in gated.feed_forward:
        gate = block.unit_gate.log_alpha
        gate[torch.randperm(gate.numel(), generator=g)[units:]] = CLOSED
    if remove_layer is not None:
        gated.attention[remove_layer].layer_gate.log_alpha.fill_(CLOSED)
        gated.feed_forward[remove_layer].layer_gate.log_alpha.fill_(CLOSED)
    if gated.config.extractor_mode == "group_norm":
        for conv in list(gated.conv)[:-1]:
            conv.gate.log_alpha[torch.randperm(conv.gate.log_alpha.numel(), generator=g)[:conv_cut]] = CLOSED
    model = compile_encoder(gated.eval())
    c = model.config
    kept = [i for i in range(c.encoder_num_layers) if c.encoder_ff_kept[i]]
    assert {c.encoder_ff_interm_features[i] for i in kept} == {units}
    assert all(c.encoder_num_heads[i] == 4 for i in kept)
    return model, kept


@pytest.mark.parametrize("preset,remove_layer", [("hubert_base_tiny", None), ("wavlm_base_plus_tiny", None),
                                                 ("wav2vec2_large_lv60k_tiny", 1), ("wavlm_large_tiny", 0)])
def test_a_uniformly_pruned_model_exports_exactly(preset, remove_layer, tmp_path):
    model, kept = uniform_pruned(preset, remove_layer=remove_layer)
    c = model.config
    if c.extractor_mode == "group_norm":
        assert [ch for ch, _, _ in c.extractor_conv_layer_config] == [13] * 6 + [16]
    out = tmp_path / "hf"
    lines = write_model(model, out, to="hf")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(kept) and config["intermediate_size"] == 30
    assert config["conv_dim"] == [ch for ch, _, _ in c.extractor_conv_layer_config]
    if remove_layer is not None:
        assert len(kept) == c.encoder_num_layers - 1
        assert f"prune's layers {' '.join(map(str, kept))} are transformers' layers 0-{len(kept) - 1} (the others " \
               f"were removed whole)" in lines
    assert_same_hidden_states(model, out, kept)


def test_post_norm_ffns_with_no_unit_left_export_exactly(tmp_path):
    """A post-norm FFN with no unit is its output bias: intermediate_size 0 in transformers holds it
    with the same parameters (pre-norm it is refused: prune has dropped its final_layer_norm)."""
    model, kept = uniform_pruned("hubert_base_tiny", units=0)
    write_model(model, tmp_path / "hf", to="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["intermediate_size"] == 0
    assert_same_hidden_states(model, tmp_path / "hf", kept)


def uniform_removed(preset, layer, seed=0):
    """Pruned as ``pruning.uniform=true`` does (uniform gates, the Shaper's forced shape), transformer
    layer ``layer`` removed whole: in a post-norm model an identity, its LayerNorms gone."""
    from helpers import randomize_gates

    from prune.shape import Shape, Shaper, uniform_gates
    from prune.structures import GateConfig

    torch.manual_seed(seed)
    model = build_preset(preset)
    gated = GatedEncoder(model, uniform_gates(GateConfig(), Shape(), model.config), uniform=True)
    randomize_gates(gated, seed=seed, hard_cases=False)
    with torch.no_grad():
        for block in gated.attention:
            block.layer_gate.log_alpha.fill_(3.0)
        gated.attention[layer].layer_gate.log_alpha.fill_(CLOSED)
    Shaper(uniform=True).apply(gated)
    return compile_encoder(gated.eval())


@pytest.mark.parametrize("preset,layer", [("hubert_base_tiny", 1), ("wavlm_base_tiny", 0),
                                          ("wavlm_base_plus_tiny", 1)])
def test_a_post_norm_layer_removed_in_uniform_mode_exports(preset, layer, tmp_path):
    """The removed post-norm layer is an identity: transformers gets the other layer only, and its
    hidden states (the kept layer's, and the last) equal prune's (WavLM: the position bias moves to
    transformers' layer 0 whichever prune layer that is)."""
    model = uniform_removed(preset, layer)
    c = model.config
    assert c.encoder_layer_kept == [i != layer for i in range(2)] and not c.encoder_layer_norm_first
    kept = [1 - layer]
    out = tmp_path / "hf"
    lines = write_model(model, out, to="hf")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert f"prune's layers {kept[0]} are transformers' layers 0-0 (the others were removed whole)" in lines
    assert_same_hidden_states(model, out, kept)


def test_a_post_norm_layer_removed_block_by_block_is_still_refused():
    """Free gates: a post-norm layer whose two blocks were removed separately keeps its LayerNorms
    (LN2(LN1(x))), which no transformers layer computes."""
    model, _ = uniform_pruned("hubert_base_tiny", remove_layer=1)
    assert model.config.encoder_layer_kept is None
    with pytest.raises(ValueError, match="layer 1 has neither block but, post-norm, still applies its two "
                                         "LayerNorms .*pruning.uniform=true removes a layer whole"):
        check_holdable(model.config)


# ------------------------------------------------------------------------------ refusals
def shape(preset, **per_layer):
    """A pruned config of ``preset`` (all blockers are in the config, so no weights are needed)."""
    return preset_config(preset, **per_layer)


@pytest.mark.parametrize("preset,changes,reason", [
    ("hubert_base_tiny", dict(encoder_num_heads=[4, 3], encoder_head_dim=8),
     "layer 1 keeps 3 of 4 heads (transformers' attention has hidden_size // num_attention_heads wide heads"),
    ("wavlm_base_tiny", dict(encoder_num_heads=[2, 2], encoder_head_dim=8, encoder_head_index=[[0, 1], [1, 3]]),
     "layers 0, 1 keep 2 of 4 heads"),
    ("hubert_base_tiny", dict(encoder_ff_interm_features=[30, 20]),
     "layer 0 keeps 30 FFN units, layer 1 keeps 20 (transformers has one intermediate_size)"),
    ("hubert_base_tiny", dict(encoder_attention_kept=[True, False]), "layer 1 has an FFN but no attention"),
    ("wav2vec2_large_lv60k_tiny", dict(encoder_ff_kept=[False, True, True]), "layer 0 has attention but no FFN"),
    ("hubert_base_tiny", dict(encoder_attention_kept=[True, False], encoder_ff_kept=[True, False]),
     "layer 1 has neither block but, post-norm, still applies its two LayerNorms"),
    ("wav2vec2_large_lv60k_tiny", dict(encoder_ff_interm_features=[0, 0, 0]),
     "the FFN of layers 0, 1, 2 keeps no unit, only its output bias, and has no final_layer_norm left"),
    ("wav2vec2_large_lv60k_tiny", dict(encoder_attention_kept=[False] * 3, encoder_ff_kept=[False] * 3),
     "no transformer layer is left"),
    ("hubert_base_tiny", dict(extractor_conv_layer_config=[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2), (14, 2, 2)],
                              extractor_norm_channels=[16] * 7),
     "the last conv layer keeps 14 of 16 channels and the feature projection's LayerNorm still averages over "
     "all 16 (prune's phantom channels)"),
    ("wav2vec2_large_lv60k_tiny", dict(extractor_conv_layer_config=[(16, 10, 5)] + [(16, 3, 2), (12, 3, 2)]
                                       + [(16, 3, 2)] * 2 + [(16, 2, 2)] * 2, extractor_norm_channels=[16] * 7),
     "conv layer 2 keeps 12 of 16 channels and its LayerNorm still averages over all 16"),
    ("hubert_base_tiny", dict(extractor_output_scale=True), "the conv extractor's output is scaled per channel"),
    ("hubert_base_tiny", dict(layer_norm_eps=1e-6), "layer_norm_eps is 1e-06"),
])
def test_what_transformers_cannot_hold_is_named(preset, changes, reason):
    config = shape(preset, **changes)
    found = blockers(config)
    assert any(r.startswith(reason) for r in found), found
    with pytest.raises(ValueError) as refused:
        check_holdable(config)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("--to hf: transformers' ") and reason in message
    assert message.endswith("Prune with pruning.uniform=true for a shape transformers holds "
                            "(docs/checkpoints.md, --to hf)")


def test_the_unpruned_and_uniform_shapes_have_no_blocker():
    for preset in FAMILIES:
        assert blockers(preset_config(preset)) == []
    # conv channels cut where no norm over channels follows (group_norm: every layer but the last)
    cut = [(12, 10, 5)] + [(9, 3, 2)] * 4 + [(11, 2, 2), (16, 2, 2)]
    assert blockers(shape("hubert_base_tiny", extractor_conv_layer_config=cut, extractor_norm_channels=[16] * 7)) == []
    # a pre-norm layer removed whole is an identity: left out
    assert blockers(shape("wavlm_large_tiny", encoder_attention_kept=[True, False, True],
                          encoder_ff_kept=[True, False, True])) == []
    # so is a post-norm one removed whole in uniform mode (its LayerNorms gone: encoder_layer_kept)
    assert blockers(shape("hubert_base_tiny", encoder_attention_kept=[False, True], encoder_ff_kept=[False, True],
                          encoder_layer_kept=[False, True])) == []
    assert blockers(shape("hubert_base_tiny", encoder_attention_kept=[False] * 2, encoder_ff_kept=[False] * 2,
                          encoder_layer_kept=[False] * 2)) == ["no transformer layer is left"]


def test_a_free_shape_is_refused_with_every_blocker_counted():
    """A compiled model with random, non-uniform gates: many blockers, four named, the rest counted."""
    from helpers import randomize_gates

    gated = randomize_gates(GatedEncoder(build_preset("wav2vec2_large_lv60k_tiny"))).eval()
    reasons = blockers(compile_encoder(gated).config)
    assert len(reasons) > 4
    with pytest.raises(ValueError, match=rf"; \.\.\. and {len(reasons) - 4} more\. Prune with pruning.uniform=true"):
        check_holdable(compile_encoder(gated).config)


# ------------------------------------------------------------------------------ (d) the command line
def _cli(capsys, *args):
    from prune.cli import main

    with pytest.raises(SystemExit) as done:
        main(["convert", *map(str, args)])
    captured = capsys.readouterr()
    code = done.value.code  # a message: printed to stderr, exit status 1
    return (code if isinstance(code, int) else 1), captured.out + captured.err + ("" if isinstance(code, int) else code)


def test_convert_command_end_to_end(tmp_path, capsys):
    from prune.checkpoints import export_pruned

    model, kept = uniform_pruned("wav2vec2_large_lv60k_tiny", remove_layer=2)
    src = export_pruned(model, tmp_path / "export")
    out = tmp_path / "hf"
    code, text = _cli(capsys, src, out, "--to", "hf")
    assert code == 0, text
    lines = text.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith(f"wrote {out} (Wav2Vec2Model: config.json, "), text
    assert "do_normalize true" in lines[-1] and "Writing model shards" not in text
    assert_same_hidden_states(model, out, kept)
    # an existing folder needs --overwrite; with it, the folder is replaced
    code, text = _cli(capsys, src, out, "--to", "hf")
    assert code == 1 and "the folder is not empty (pass --overwrite to replace it)" in text
    code, text = _cli(capsys, src, out, "--to", "hf", "--overwrite")
    assert code == 0 and folder_files(out) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_convert_refuses_a_free_shape_in_one_line_writing_nothing(tmp_path, capsys, monkeypatch):
    from helpers import randomize_gates

    from prune.checkpoints import export_pruned, hf_export

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' model was built for a refused shape")

    monkeypatch.setattr(hf_export, "build_hf_model", refuse)
    gated = randomize_gates(GatedEncoder(build_preset("hubert_base_tiny"))).eval()
    src = export_pruned(compile_encoder(gated), tmp_path / "export")
    code, text = _cli(capsys, src, tmp_path / "hf", "--to", "hf")
    assert code == 1 and len(text.strip().splitlines()) == 1, text
    assert text.startswith("prune convert: --to hf: transformers' HubertModel cannot hold this model: ")
    assert "the last conv layer keeps 14 of 16 channels" in text and "layer 0 has attention but no FFN" in text
    assert folder_files(tmp_path) == ["export"]
    code, text = _cli(capsys, src, tmp_path / "hf", "--to", "hf", "--layers", "1")
    assert code == 1 and "--layers is an option of --to onnx, not of --to hf" in text


def test_a_mismatch_with_transformers_writes_nothing(tmp_path, capsys, monkeypatch):
    from prune.checkpoints import export_pruned, hf_export

    monkeypatch.setattr(hf_export, "TOLERANCE", -1.0)  # any error is too much
    src = export_pruned(build_preset("hubert_base_tiny").eval(), tmp_path / "export")
    code, text = _cli(capsys, src, tmp_path / "hf", "--to", "hf")
    assert code == 1 and "above -1: nothing written" in text and folder_files(tmp_path) == ["export"]


def test_without_transformers_the_line_says_how_to_install(tmp_path):
    from prune.checkpoints import export_pruned

    src = export_pruned(build_preset("hubert_base_tiny").eval(), tmp_path / "export")
    code = ("import sys\n"
            "sys.modules['transformers'] = None  # any import of it now fails\n"
            "from prune.cli import main\n"
            "main(['convert', sys.argv[1], sys.argv[2], '--to', 'hf'])\n")
    result = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "hf")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == (
        "prune convert: --to hf needs transformers, which is not installed: pip install 'prune[hf]'"), result.stderr
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------ fine-tuning
def test_the_exported_demo_teacher_fine_tunes_with_transformers_ctc(tmp_path):
    """The demo teacher (a pre-trained HuBERT) through --to hf, then transformers' own HubertForCTC
    (new head, SpecAugment on) on the 4 shortest demo utterances' phones: 10 AdamW steps on CPU lower
    the CTC loss (measured 12.8 -> 3.8)."""
    from prune.data.audio import load_audio
    from prune.evaluate.probe import phone_vocab, read_phones
    from prune.train.config import demo_data

    from pathlib import Path

    corpus = Path(demo_data("demo_corpus"))
    out = tmp_path / "hf"
    convert(demo_data("demo_teacher"), out, "hf")
    phones = read_phones(corpus / "transcripts.tsv")
    vocab = phone_vocab(phones)  # phone -> 1..V; 0 is the CTC blank
    rows = [line.split("\t") for line in (corpus / "train.tsv").read_text().splitlines()[1:]]
    names = [name for name, _ in sorted(rows, key=lambda row: int(row[1]))[:4]]  # the shortest, ~0.9 s
    waves = [load_audio(corpus / "audio" / name) for name in names]
    labels = [torch.tensor([vocab[p] for p in phones[name.rsplit(".", 1)[0]]]) for name in names]
    extractor = transformers.AutoFeatureExtractor.from_pretrained(out)
    inputs = extractor([w.numpy() for w in waves], sampling_rate=16000, padding=True, return_tensors="pt")
    targets = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)

    torch.manual_seed(0)
    model = transformers.AutoModelForCTC.from_pretrained(out, vocab_size=len(vocab) + 1, pad_token_id=0,
                                                         ctc_loss_reduction="mean", ctc_zero_infinity=True)
    assert type(model).__name__ == "HubertForCTC"
    model.freeze_feature_encoder()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(10):
        loss = model(inputs["input_values"], attention_mask=inputs["attention_mask"], labels=targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("CTC loss:", " ".join(f"{v:.2f}" for v in losses))
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_a_cut_hidden_dimension_is_refused():
    """prune's LayerNorms over a cut hidden dimension still average over the original width."""
    from prune.structures import GateConfig

    gated = GatedEncoder(build_preset("hubert_base_tiny"), GateConfig(hidden_dim=True))
    with torch.no_grad():
        gated.hidden[0].gate.log_alpha[:3] = CLOSED
    config = compile_encoder(gated.eval()).config
    assert config.encoder_embed_dim < config.encoder_hidden_total
    assert any(r.startswith(f"the hidden dimension keeps {config.encoder_embed_dim} of "
                            f"{config.encoder_hidden_total} channels") for r in blockers(config))


def test_a_uniform_training_run_with_a_removed_layer_converts_to_hf(tmp_path):
    """``prune train tiny_demo pruning.uniform=true`` (post-norm, one of its two layers removed by
    the shape), then ``prune convert EXPORT OUT --to hf``: transformers loads the folder and its
    hidden states are those of prune's export."""
    from helpers_train import noise_corpus, prune_cli, short_run_args

    train, valid = noise_corpus(tmp_path)
    run = tmp_path / "run"
    extra = ["pruning.uniform=true", "pruning.shape.layers=1"]
    proc = prune_cli(short_run_args(train, valid, run, prune_steps=10, final_steps=0, extra=extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_pretrained(run / "export")
    c = model.config
    assert c.encoder_layer_kept is not None and sum(c.encoder_layer_kept) == 1
    kept = [i for i, k in enumerate(c.encoder_layer_kept) if k]
    proc = prune_cli(["convert", str(run / "export"), str(tmp_path / "hf"), "--to", "hf"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"prune's layers {kept[0]} are transformers' layers 0-0" in proc.stdout
    assert_same_hidden_states(model, tmp_path / "hf", kept)
