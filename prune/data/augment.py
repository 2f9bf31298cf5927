"""Seeded data augmentation: additive white noise at a drawn SNR and reverberation by a synthetic
room impulse response, applied to one utterance before padding (so padding stays 0).

Every draw comes from a generator seeded by ``(seed, epoch, index)``: a resumed run, and the
teacher and student of a step (they share the batch), see exactly the same audio. The RIR is
Gaussian noise under an exponential envelope that decays by 60 dB over the drawn RT60, the
usual synthetic stand-in for a measured room response (Habets, "Room impulse response
generator", 2006; Ko et al., "A study on data augmentation of reverberant speech for robust
speech recognition", ICASSP 2017, who use simulated RIRs the same way).

    aug = Augmenter.from_config(cfg.data.augment)
    wave = aug(wave, seed, epoch, index)        # (samples,) -> (samples,), float32
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

SAMPLE_RATE = 16000
_STREAM = 7  # a 4th seed word, so these draws never coincide with the crop offsets' (seed, epoch, index)
DECAY_60DB = 3.0 * math.log(10.0)  # amplitude exp(-DECAY_60DB t / rt60) is 60 dB down at t = rt60
VALID_SEED = 20240  # data.valid_augment: the same augmented valid set for every run, whatever trainer.seed


def add_noise(wave: Tensor, noise: Tensor, snr_db: float) -> Tensor:
    """``wave + g * noise`` with ``g`` such that 10 log10(sum wave^2 / sum (g noise)^2) = ``snr_db``
    exactly (computed in float64). wave, noise (samples,). A silent wave is returned as it is."""
    w, n = wave.double(), noise.double()
    signal, power = w.pow(2).sum(), n.pow(2).sum()
    if signal == 0 or power == 0:
        return wave.clone()
    gain = torch.sqrt(signal / (power * 10.0 ** (snr_db / 10.0)))
    return (w + gain * n).to(wave.dtype)


def synthetic_rir(rt60: float, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """(rt60 * sample_rate,) float64: a direct path of 1 at t=0, then Gaussian reflections under
    an envelope 60 dB down at ``rt60`` seconds; unit energy."""
    n = max(int(round(rt60 * sample_rate)), 2)
    t = np.arange(n) / sample_rate
    h = rng.standard_normal(n) * np.exp(-DECAY_60DB * t / rt60)
    h[0] = 1.0
    return torch.from_numpy(h / np.linalg.norm(h))


def reverberate(wave: Tensor, rir: Tensor) -> Tensor:
    """``wave`` convolved with ``rir`` (FFT, linear not circular), cut to ``wave``'s length (aligned
    on the direct path) and scaled back to ``wave``'s energy. wave (samples,), rir (taps,)."""
    w = wave.double()
    size = w.numel() + rir.numel() - 1
    wet = torch.fft.irfft(torch.fft.rfft(w, n=size) * torch.fft.rfft(rir.double(), n=size), n=size)[:w.numel()]
    energy, wet_energy = w.pow(2).sum(), wet.pow(2).sum()
    if wet_energy > 0:
        wet = wet * torch.sqrt(energy / wet_energy)
    return wet.to(wave.dtype)


@dataclass(frozen=True)
class Draw:
    """What one utterance gets: an SNR in dB (None: no noise), an RT60 in s (None: no reverb)."""

    snr_db: Optional[float]
    rt60: Optional[float]


@dataclass(frozen=True)
class Augmenter:
    """Noise with probability ``noise_prob`` at an SNR uniform in ``snr_db``; reverberation with
    probability ``reverb_prob`` at an RT60 uniform in ``rt60`` (reverb first, so the SNR is that
    of the signal the listener gets). ``fixed_seed``: draws ignore the run's seed and epoch
    (data.valid_augment: the same valid set for every run)."""

    noise_prob: float
    snr_db: Tuple[float, float]
    reverb_prob: float
    rt60: Tuple[float, float]
    fixed_seed: Optional[int] = None

    @classmethod
    def from_config(cls, a: Mapping[str, Any], fixed_seed: Optional[int] = None) -> "Augmenter":
        """From a ``data.augment`` section (prune/train/config.py AugmentConfig, checked there)."""
        return cls(float(a["noise_prob"]), tuple(map(float, a["snr_db"])), float(a["reverb_prob"]),
                   tuple(map(float, a["rt60"])), fixed_seed)

    def rng(self, seed: int, epoch: int, index: int) -> np.random.Generator:
        if self.fixed_seed is not None:
            seed, epoch = self.fixed_seed, 0
        return np.random.default_rng([seed, epoch, index, _STREAM])

    def draw(self, rng: np.random.Generator) -> Draw:
        """The utterance's SNR and RT60 (always four numbers drawn, so one choice moves no other)."""
        noisy, snr = rng.random() < self.noise_prob, rng.uniform(*self.snr_db)
        reverb, rt60 = rng.random() < self.reverb_prob, rng.uniform(*self.rt60)
        return Draw(float(snr) if noisy else None, float(rt60) if reverb else None)

    def __call__(self, wave: Tensor, seed: int, epoch: int, index: int) -> Tensor:
        """wave (samples,) float32 -> the augmented (samples,) float32 of item ``index``."""
        out, _ = self.apply(wave, seed, epoch, index)
        return out

    def apply(self, wave: Tensor, seed: int, epoch: int, index: int) -> Tuple[Tensor, Draw]:
        """(the augmented wave, the draw): the tests measure the SNR against the draw."""
        rng = self.rng(seed, epoch, index)
        d = self.draw(rng)
        if d.rt60 is not None:
            wave = reverberate(wave, synthetic_rir(d.rt60, rng))
        if d.snr_db is not None:
            wave = add_noise(wave, torch.from_numpy(rng.standard_normal(wave.numel())), d.snr_db)
        return wave, d
