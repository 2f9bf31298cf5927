"""MFCC + k-means targets of the masked-prediction pre-training: frame grid, parts, clustering."""

import math

import pytest
import torch

from prune.models import build_preset
from prune.pretrain.clusters import (HOP_LENGTH, ClusterTargets, dct_matrix, deltas, kmeans, mel_filter_bank, mfcc,
                                 mfcc_features, num_frames)


@pytest.mark.parametrize("samples", [400, 401, 719, 720, 1000, 16000, 32123])
def test_mfcc_frames_are_the_encoders_frames(samples):
    model = build_preset("hubert_base_tiny").eval()
    with torch.no_grad():
        hiddens, _ = model(torch.randn(1, samples))
    assert hiddens[0].shape[1] == num_frames(samples) == mfcc(torch.randn(samples)).shape[0]


def test_a_crop_at_a_whole_frame_sees_the_same_frames():
    wave = torch.randn(16000)
    first = 7
    crop = wave[first * HOP_LENGTH:first * HOP_LENGTH + 8000]
    full, cropped = mfcc(wave), mfcc(crop)
    assert torch.allclose(cropped, full[first:first + cropped.shape[0]], atol=1e-4)


def test_mel_filter_bank_matches_transformers():
    audio_utils = pytest.importorskip("transformers.audio_utils")
    ref = audio_utils.mel_filter_bank(num_frequency_bins=257, num_mel_filters=40, min_frequency=20.0,
                                      max_frequency=8000.0, sampling_rate=16000, norm=None, mel_scale="htk")
    ours = mel_filter_bank(257, 40, 20.0, 8000.0)
    assert ours.shape == (257, 40)
    assert torch.allclose(ours, torch.from_numpy(ref).float(), atol=1e-5)


def test_a_tone_lands_in_the_filter_around_its_frequency():
    t = torch.arange(16000) / 16000
    for hz in (300.0, 1000.0, 4000.0):
        wave = torch.sin(2 * math.pi * hz * t)
        frames = wave.unfold(0, 400, 320) * torch.hamming_window(400, periodic=False)
        power = torch.fft.rfft(frames, n=512).abs().pow(2).mean(0)
        bank = mel_filter_bank(257, 40, 20.0, 8000.0)
        peak = int((power @ bank).argmax())
        centre_bin = int(bank[:, peak].argmax())
        assert abs(centre_bin * 16000 / 512 - hz) < 0.1 * hz + 60


def test_dct_is_orthonormal_and_deltas_recover_a_slope():
    m = dct_matrix(40, 40)
    assert torch.allclose(m.T @ m, torch.eye(40), atol=1e-5)
    ramp = torch.arange(20.0)[:, None] * torch.tensor([[1.0, -2.0]])
    d = deltas(ramp)
    assert torch.allclose(d[2:-2], torch.tensor([[1.0, -2.0]]).expand(16, 2))
    assert mfcc_features(torch.randn(8000)).shape == (num_frames(8000), 39)


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = torch.randint(4, (400,), generator=g)
    points = centres[truth] + 0.5 * torch.randn(400, 2, generator=g)
    found = kmeans(points, 4, seed=1)
    assign = torch.cdist(points, found).argmin(1)
    for k in range(4):  # each found cluster holds exactly one true cluster
        assert len(set(truth[assign == k].tolist())) == 1
    assert torch.allclose(torch.sort(found.sum(1)).values, torch.sort(centres.sum(1)).values, atol=0.3)
    with pytest.raises(ValueError, match="at least 5 points"):
        kmeans(points[:4], 5)


def test_cluster_targets_label_every_frame_and_round_trip():
    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(int(n), generator=g) * 0.1 for n in (8000, 12000, 16000)]
    targets = ClusterTargets.fit([mfcc_features(w) for w in waves], num_clusters=8, seed=0)
    labels = targets.labels(waves[1])
    assert labels.shape == (num_frames(12000),) and labels.dtype == torch.int64
    assert 0 <= int(labels.min()) and int(labels.max()) < 8
    again = ClusterTargets.from_state_dict(targets.state_dict())
    assert torch.equal(again.labels(waves[2]), targets.labels(waves[2]))
    with pytest.raises(ValueError, match="shorter than one frame"):
        mfcc(torch.randn(399))
