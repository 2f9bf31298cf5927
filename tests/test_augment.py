"""Seeded augmentation (#16): the noise lands on the drawn SNR exactly, the reverberation is a
linear convolution with an RIR decaying 60 dB over its RT60, every draw is fixed by
(seed, epoch, index), padding stays 0, and bad ranges stop in one line before compute."""

import math

import numpy as np
import pytest
import torch
from helpers_train import noise_corpus

from prune.data.augment import Augmenter, add_noise, reverberate, synthetic_rir
from prune.data.dataset import AudioDataset
from prune.train.config import ConfigError, compose, validate

NOISE_ONLY = Augmenter(noise_prob=1.0, snr_db=(0.0, 30.0), reverb_prob=0.0, rt60=(0.2, 0.8))


def snr_db(clean, noisy):
    clean, noisy = clean.double(), noisy.double()
    return 10 * math.log10(clean.pow(2).sum() / (noisy - clean).pow(2).sum())


def test_the_noise_hits_the_drawn_snr_and_padding_stays_zero(tmp_path):
    train, _ = noise_corpus(tmp_path, n_train=6, n_valid=1)
    clean = AudioDataset(train, seed=3)
    noisy = AudioDataset(train, seed=3, augment=NOISE_ONLY)
    noisy.set_epoch(2)
    batch = noisy.batch(range(6))
    snrs = []
    for i in range(6):
        n = int(batch.lengths[i])
        wave, draw = NOISE_ONLY.apply(clean[i], 3, 2, i)
        assert torch.equal(wave, batch.waveforms[i, :n])  # the dataset's item is this draw's
        assert abs(snr_db(clean[i], batch.waveforms[i, :n]) - draw.snr_db) < 1e-3, (i, draw)
        assert torch.all(batch.waveforms[i, n:] == 0)
        snrs.append(draw.snr_db)
    assert len(set(snrs)) == 6 and all(0 <= s <= 30 for s in snrs)
    assert abs(snr_db(torch.ones(100), add_noise(torch.ones(100), torch.randn(100), -7.5)) + 7.5) < 1e-6


def test_draws_are_fixed_by_seed_epoch_and_index():
    wave = torch.randn(8000)
    aug = Augmenter(noise_prob=0.5, snr_db=(5.0, 20.0), reverb_prob=0.5, rt60=(0.2, 0.8))
    assert torch.equal(aug(wave, 1, 4, 9), aug(wave, 1, 4, 9))
    assert not torch.equal(aug(wave, 1, 4, 9), aug(wave, 1, 5, 9))
    draws = [aug.apply(wave, 0, 0, i)[1] for i in range(200)]
    assert 0.35 < np.mean([d.snr_db is not None for d in draws]) < 0.65
    assert 0.35 < np.mean([d.rt60 is not None for d in draws]) < 0.65
    fixed = Augmenter(**{**aug.__dict__, "fixed_seed": 11})  # data.valid_augment: whatever the run's seed
    assert torch.equal(fixed(wave, 1, 4, 9), fixed(wave, 2, 0, 9))


def test_reverberation_is_a_linear_convolution_with_a_decaying_rir():
    rng = np.random.default_rng(0)
    rir = synthetic_rir(0.5, rng)
    assert rir.numel() == 8000 and abs(float(rir.norm()) - 1) < 1e-12 and float(rir[0]) > 0
    # 60 dB down at RT60 = 0.5 s: the 0.1 s windows around 0.1 s and 0.4 s differ by 60 x 0.3 / 0.5 = 36 dB
    energy = rir.pow(2).numpy()
    early, late = energy[800:2400].mean(), energy[5600:7200].mean()
    assert abs(10 * math.log10(late / early) + 36) < 1.5
    x = torch.randn(4000, dtype=torch.float64)
    wet = reverberate(x, rir)
    expect = np.convolve(x.numpy(), rir.numpy())[:4000]
    expect *= np.sqrt((x.numpy() ** 2).sum() / (expect ** 2).sum())  # scaled back to the dry energy
    assert np.abs(wet.numpy() - expect).max() < 1e-9


@pytest.mark.parametrize("override, message", [
    ("data.augment.snr_db=[20,5]", "data.augment.snr_db: must be a range [lo, hi] in dB with lo <= hi, got [20.0, 5.0]"),
    ("data.augment.rt60=[0.9,0.1]", "data.augment.rt60: must be a range [lo, hi] in s with lo <= hi"),
    ("data.augment.rt60=[0,0.5]", "data.augment.rt60: a reverberation time must be above 0 s"),
    ("data.augment.noise_prob=1.5", "data.augment.noise_prob: a probability must be in [0, 1], got 1.5"),
    ("data.augment.reverb_prob=-0.1", "data.augment.reverb_prob: a probability must be in [0, 1], got -0.1"),
])
def test_bad_augment_settings_fail_in_one_line(tmp_path, override, message):
    train, valid = noise_corpus(tmp_path, n_train=2, n_valid=1)
    cfg = compose("tiny_demo", [f"data.train_manifest={train}", "data.augment.enabled=true", override])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
