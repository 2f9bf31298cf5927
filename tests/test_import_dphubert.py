"""DPHuBERT's checkpoint files, read exactly.

The fixtures (tests/fixtures/dphubert) were written by DPHuBERT's own code
(scripts/make_dphubert_fixtures.py): its models, its prune_from_ckpt, its outputs on a padded
batch. ``extract_features`` returns the projected features and then every layer's output;
``forward`` adds the final LayerNorm of a pre-norm model, which prune's last hidden state includes.
"""

from pathlib import Path

import pytest
import torch

from prune import load_pretrained
from prune.checkpoints import CheckpointError, inspect_checkpoint

from helpers_train import noise_corpus, prune_cli, short_run_args

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dphubert"
NAMES = ["hubert_teacher", "hubert_gated", "hubert_pruned", "wavlm_gated", "wavlm_pruned", "prenorm_gated",
         "prenorm_pruned"]
TOL = 1e-5


def reference(name):
    return torch.load(FIXTURES / f"{name}.ref.pt", weights_only=True)


def layer_errors(model, ref):
    """max|diff| / max|ref| on the valid frames, per DPHuBERT output: the projected features, then
    each layer."""
    x, lengths = ref["waveforms"], ref["lengths"]
    with torch.no_grad():
        waveforms = model.prepare_waveforms(x, lengths)
        projected, _ = model.encoder.preprocess(*model.feature_extractor(waveforms, lengths))
        hiddens, frames = model(x, lengths)
    assert torch.equal(frames, ref["frames"])
    ours = [projected] + hiddens[1:]
    theirs = list(ref["hiddens"])
    if model.config.encoder_layer_norm_first:
        theirs[-1] = ref["final"]
    assert len(ours) == len(theirs)
    valid = [slice(0, int(n)) for n in frames]
    return [max(float((a[b, v] - r[b, v]).abs().max() / r[b, v].abs().max()) for b, v in enumerate(valid))
            for a, r in zip(ours, theirs)]


@pytest.mark.parametrize("name", NAMES)
def test_every_layer_matches_dphubert(name):
    model, report = load_pretrained(FIXTURES / f"{name}.pth", return_report=True)
    assert report.format == "dphubert"
    errors = layer_errors(model, reference(name))
    assert max(errors) < TOL, errors


def test_pruned_files_keep_what_dphubert_computes():
    """The parts torchaudio's layout lacks are loaded: the extractor's output scale (the last conv
    layer's soft gates), the kept WavLM heads, the removed blocks; the distillation heads are
    reported, not loaded."""
    model, report = load_pretrained(FIXTURES / "wavlm_pruned.pth", return_report=True)
    file = torch.load(FIXTURES / "wavlm_pruned.pth", weights_only=True)
    config = model.config
    assert config.extractor_output_scale and config.is_wavlm
    assert torch.equal(model.feature_extractor.output_scale, file["state_dict"]["feature_extractor.dummy_weight"])
    assert config.encoder_head_index == file["config"]["encoder_remaining_heads"]
    assert config.encoder_attention_kept == file["config"]["encoder_use_attention"]
    assert config.encoder_ff_kept == file["config"]["encoder_use_feed_forward"]
    assert "distill_linear_projs.0.weight" in report.ignored
    teacher = load_pretrained(FIXTURES / "hubert_teacher.pth")
    assert not teacher.config.extractor_output_scale  # all ones: the identity


@pytest.mark.parametrize("name", ["hubert_pruned", "wavlm_pruned", "prenorm_gated"])
def test_the_parity_check_catches_a_dropped_extra(name, tmp_path):
    """Loading the file without DPHuBERT's extractor scale (as torchaudio's layout would) is far
    off: the check above would fail on it."""
    file = torch.load(FIXTURES / f"{name}.pth", weights_only=True)
    file["state_dict"]["feature_extractor.dummy_weight"] = torch.ones_like(
        file["state_dict"]["feature_extractor.dummy_weight"])
    for key in [k for k in file["state_dict"] if k.endswith("hard_concrete.log_alpha")][-1:]:
        file["state_dict"][key] = torch.full_like(file["state_dict"][key], 10.0)  # its last conv gates open
    torch.save(file, tmp_path / "x.pth")
    assert max(layer_errors(load_pretrained(tmp_path / "x.pth"), reference(name))) > 1e-3


def test_inspect_names_the_format():
    text = inspect_checkpoint(FIXTURES / "prenorm_pruned.pth")
    assert "format:         DPHuBERT (torchaudio wav2vec2_model config + state_dict; pruned, 2 block(s) removed)" \
        in text
    assert "pre-norm transformer" in text and "distill_linear_projs.0.weight" in text


def test_gated_file_without_its_gates_is_refused(tmp_path):
    file = torch.load(FIXTURES / "hubert_gated.pth", weights_only=True)
    del file["state_dict"]["encoder.transformer.layers.1.attention.hard_concrete_for_heads.log_alpha"]
    torch.save(file, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="encoder_prune_attention_heads=True but the state dict has no "
                                              r"encoder\.transformer\.layers\.1\.attention\.hard_concrete_for_heads"):
        load_pretrained(tmp_path / "x.pth")


def test_wavlm_without_layer_0_attention_is_refused(tmp_path):
    file = torch.load(FIXTURES / "wavlm_pruned.pth", weights_only=True)
    file["config"]["encoder_use_attention"][0] = False
    file["state_dict"] = {k: v for k, v in file["state_dict"].items()
                          if not k.startswith("encoder.transformer.layers.0.attention.")}
    torch.save(file, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="layer 0's attention was pruned away.*relative position bias"):
        load_pretrained(tmp_path / "x.pth")


def test_a_pickled_callable_is_refused_and_never_runs(tmp_path):
    file = torch.load(FIXTURES / "hubert_pruned.pth", weights_only=True)
    file["config"]["hook"] = print  # unpickling this global would hand the file a callable
    torch.save(file, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="print"):
        load_pretrained(tmp_path / "x.pth")


def test_train_prunes_a_dphubert_model_further(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=8, n_valid=2)
    run = tmp_path / "run"
    teacher = FIXTURES / "hubert_pruned.pth"
    result = prune_cli(short_run_args(train, valid, run, prune_steps=12, final_steps=4, extra=[
        f"teacher.checkpoint={teacher}", "trainer.ckpt_every=4"]))
    assert result.returncode == 0, result.stderr[-3000:]
    source = load_pretrained(teacher)
    pruned = load_pretrained(run / "export")
    assert pruned.config.extractor_output_scale
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in source.parameters())


def test_gates_the_config_does_not_switch_on_are_refused(tmp_path):
    """DPHuBERT would not apply them (its model has no such gate): loading them silently as
    "folded" would compute something else."""
    file = torch.load(FIXTURES / "hubert_gated.pth", weights_only=True)
    file["config"]["encoder_prune_feed_forward_intermediate"] = False
    torch.save(file, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"gates its config does not switch on.*layers\.0\.feed_forward\."
                                              r"hard_concrete_for_intermediate\.log_alpha"):
        load_pretrained(tmp_path / "x.pth")
