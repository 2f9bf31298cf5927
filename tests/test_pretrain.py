"""Masked-prediction pre-training: masks, batches, the model's head, and the CLI run end to end."""

import pytest
import torch
from helpers_train import noise_corpus, prune_cli
from safetensors.torch import load_file

from prune.checkpoints import load_pruned
from prune.models import build_preset
from prune.pretrain.masked_prediction import IGNORE, MaskedPrediction, masked_loss, span_mask
from prune.data.manifest import ManifestError
from prune.pretrain.recipe import get_batch, load_corpus
from prune.pretrain.clusters import HOP_LENGTH, num_frames


def test_span_mask_covers_spans_of_valid_frames_only():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([200, 120, 5, 0])
    masks = torch.stack([span_mask(lengths, 200, 0.8, 10, g) for _ in range(200)])  # (draws, batch, frames)
    assert not masks[:, 1, 120:].any() and not masks[:, 2, 5:].any() and not masks[:, 3].any()
    fraction = masks[:, 0].float().mean()
    # 16 spans of 10 over 200 frames, overlapping: 1 - (1 - 10/191)^16 ~ 0.58 expected
    assert 0.5 < fraction < 0.66
    runs = [len(r) for r in "".join("1" if v else "0" for v in masks[0, 0].tolist()).split("0") if r]
    assert min(runs) >= 10  # a run is one span or several merged
    assert masks[:, 2, :5].any(1).float().mean() > 0.3  # shorter than a span: masked whole, sometimes


def test_get_batch_crops_at_whole_frames_with_aligned_labels():
    waves = [torch.arange(float(n)) for n in (40000, 9000)]
    labels = [torch.arange(num_frames(w.numel())) for w in waves]
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        batch = get_batch(waves, labels, [0, 1], 16000, g)
        waveforms, lengths, batch_labels = batch.waveforms, batch.lengths, batch.labels
        assert lengths.tolist() == [16000, 9000]
        first = int(waveforms[0, 0]) // HOP_LENGTH
        assert int(waveforms[0, 0]) == first * HOP_LENGTH  # crops start on a frame boundary
        assert batch_labels[0].tolist() == list(range(first, first + num_frames(16000)))
        assert batch_labels[1, :num_frames(9000)].tolist() == list(range(num_frames(9000)))
        assert (batch_labels[1, num_frames(9000):] == IGNORE).all()


def test_masked_loss_ignores_unmasked_and_padding_frames():
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 1] = 10.0
    labels = torch.tensor([[1, 2, 0, IGNORE]])
    mask = torch.tensor([[True, False, False, True]])
    loss, accuracy = masked_loss(logits, labels, mask)
    assert accuracy == 1.0 and loss < 1e-3


def test_every_frame_masked_hides_the_input():
    torch.manual_seed(0)
    model = MaskedPrediction(build_preset("hubert_base_tiny"), num_clusters=10, final_dim=16).eval()
    a, b = torch.randn(2, 8000), torch.randn(2, 8000)
    lengths = torch.tensor([8000, 8000])
    every = torch.ones(2, num_frames(8000), dtype=torch.bool)
    with torch.no_grad():
        la, pa, frames = model(a, lengths, every)
        lb, pb, _ = model(b, lengths, every)
        open_a, _, _ = model(a, lengths, None)
    assert la.shape == (2, num_frames(8000), 10) and frames.tolist() == [num_frames(8000)] * 2
    assert torch.allclose(la, lb, atol=1e-5) and pa != pb  # the conv features still differ
    assert not torch.allclose(la, open_a, atol=1e-3)
    assert (la.abs() <= 1 / model.logit_temp + 1e-4).all()  # cosine / temperature


def _args(train, valid, run_dir, steps=20):
    return ["pretrain", "demo_teacher", "model.preset=hubert_base_tiny", "~model.overrides",
            "model.final_dim=16", "targets.num_clusters=8", f"data.train_manifest={train}",
            f"data.valid_manifest={valid}", "data.max_samples=16000", "data.batch_size=4",
            f"trainer.steps={steps}", "trainer.ckpt_every=10", "trainer.valid_every=10", "trainer.log_every=5",
            "trainer.threads=1", "optim.warmup_steps=5", "probe.corpus=null", f"hydra.run.dir={run_dir}"]


def test_pretrain_runs_exports_and_resumes_to_the_same_weights(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=12, n_valid=4)
    straight = prune_cli(_args(train, valid, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "export" in straight.stdout
    model = load_pruned(tmp_path / "straight" / "export")
    assert model.config.encoder_embed_dim == 32
    assert (tmp_path / "straight" / "tensorboard").is_dir()

    killed = prune_cli(_args(train, valid, tmp_path / "resumed"), env={"PRUNE_FAULT": "mid_step:15"})
    assert killed.returncode != 0 and not (tmp_path / "resumed" / "export").exists()
    resumed = prune_cli(_args(train, valid, tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 10" in resumed.stderr + resumed.stdout
    a = load_file(tmp_path / "straight" / "export" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_checkpoints_are_skipped_and_all_damaged_stops(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=8, n_valid=2)
    run = tmp_path / "run"
    assert prune_cli(_args(train, valid, run)).returncode == 0
    newest = run / "checkpoints" / "step_00000020.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn
    again = prune_cli(_args(train, valid, run))
    assert again.returncode == 0 and "resumed from step 10" in again.stderr + again.stdout
    for path in (run / "checkpoints").glob("step_*.pt"):
        path.write_bytes(b"garbage")
    broken = prune_cli(_args(train, valid, run))
    assert broken.returncode != 0 and "every checkpoint in" in broken.stderr and "Traceback" not in broken.stderr
    assert all(p.read_bytes() == b"garbage" for p in (run / "checkpoints").glob("step_*.pt"))


def test_unusable_audio_is_skipped_and_named(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=6, n_valid=2)
    audio = tmp_path / "corpus" / "audio"
    (audio / "0.flac").write_bytes((audio / "0.flac").read_bytes()[:3000])  # truncated past its header
    (audio / "1.flac").write_bytes(b"")  # empty
    waves, skipped = load_corpus(str(train), 400)
    assert len(waves) == 4 and set(skipped) == {str(audio / "0.flac"), str(audio / "1.flac")}
    for i in range(2, 6):
        (audio / f"{i}.flac").write_text("not audio")
    with pytest.raises(ManifestError, match="no usable audio"):
        load_corpus(str(train), 400)


@pytest.mark.parametrize("override, message", [
    ("masking.prob=1.5", "masking.prob"),
    ("model.preset=hubert_huge", "model.preset: unknown preset"),
    ("+model.overrides.encoder_embed_dims=3", "model.overrides"),
    ("data.train_manifest=/nowhere.tsv", "data.train_manifest: /nowhere.tsv does not exist"),
    ("trainer.stepz=3", "trainer.stepz"),
    ("optim.lr=nan", "optim.lr: must be a finite number"),
    ("optim.betas=[0.9,1.0]", "optim.betas"),
    ("masking.unmasked_weight=-1", "masking.unmasked_weight"),
    ("model.logit_temp=0", "model.logit_temp"),
])
def test_bad_pretrain_config_is_one_line_before_any_compute(tmp_path, override, message):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=2, n_valid=1)
    result = prune_cli([*_args(train, valid, tmp_path / "run"), override])
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_recipe_given_to_the_wrong_command_says_which_one_it_is():
    wrong = prune_cli(["train", "demo_teacher"])
    assert wrong.returncode != 0 and "demo_teacher is a `prune pretrain` recipe" in wrong.stderr
    wrong = prune_cli(["pretrain", "demo"])
    assert wrong.returncode != 0 and "demo is a `prune train` recipe" in wrong.stderr
    assert "Traceback" not in wrong.stderr
