"""HuBERT's first-iteration targets: k-means cluster ids of MFCC frames.

    targets = ClusterTargets.fit([mfcc_features(w) for w in waves], num_clusters=100)
    labels = targets.labels(wave)        # (frames,) int64, one per encoder frame

The MFCCs are computed on the encoder's own frame grid (25 ms windows every 20 ms: the conv
extractor's receptive field and stride), so frame ``t`` of the labels is frame ``t`` of the
encoder's output for the same waveform, with no resampling of labels. (HuBERT computes them at
100 Hz and subsamples; the result is the same grid.)

Features: 13 MFCCs (HTK mel scale, 40 filters, log, orthonormal DCT-II, no lifter) with
first and second differences (39 dims), standardised with the corpus mean and std before
k-means so that c0 does not dominate the Euclidean distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Sequence

import torch
from torch import Tensor

from ..models import SAMPLE_RATE

WIN_LENGTH = 400   # samples: the conv extractor's receptive field (25 ms)
HOP_LENGTH = 320   # samples: its stride (20 ms)
N_FFT = 512


def num_frames(num_samples: int) -> int:
    """Frames of the encoder (and of ``mfcc``) for a waveform of ``num_samples``."""
    return max(0, (num_samples - WIN_LENGTH) // HOP_LENGTH + 1)


def hz_to_mel(hz: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filter_bank(num_freqs: int, num_mels: int, f_min: float, f_max: float,
                    sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Triangular filters, equally spaced on the HTK mel scale, peak 1 -> (num_freqs, num_mels)."""
    freqs = torch.linspace(0, sample_rate / 2, num_freqs, dtype=torch.float64)
    mels = torch.linspace(float(hz_to_mel(torch.tensor(f_min))), float(hz_to_mel(torch.tensor(f_max))),
                          num_mels + 2, dtype=torch.float64)
    edges = mel_to_hz(mels)  # (num_mels + 2,): lower edge, centre, upper edge of each filter
    rising = (freqs[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[None, 2:] - freqs[:, None]) / (edges[2:] - edges[1:-1])
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def dct_matrix(num_coeffs: int, num_inputs: int) -> Tensor:
    """Orthonormal DCT-II as a matrix (num_inputs, num_coeffs): ``x @ M`` keeps the first coefficients."""
    n = torch.arange(num_inputs, dtype=torch.float64)
    k = torch.arange(num_coeffs, dtype=torch.float64)
    m = torch.cos(math.pi / num_inputs * (n[:, None] + 0.5) * k[None, :]) * math.sqrt(2.0 / num_inputs)
    m[:, 0] /= math.sqrt(2.0)
    return m.float()


def mfcc(wave: Tensor, num_coeffs: int = 13, num_mels: int = 40, f_min: float = 20.0,
         f_max: float = SAMPLE_RATE / 2, preemphasis: float = 0.97) -> Tensor:
    """wave: (samples,) at 16 kHz -> (frames, num_coeffs), frames = ``num_frames(samples)``."""
    if wave.ndim != 1:
        raise ValueError(f"expected one waveform of shape (samples,), got {tuple(wave.shape)}")
    if wave.numel() < WIN_LENGTH:
        raise ValueError(f"a waveform of {wave.numel()} samples is shorter than one frame ({WIN_LENGTH})")
    frames = wave.float().unfold(0, WIN_LENGTH, HOP_LENGTH)  # (frames, WIN_LENGTH)
    frames = frames - frames.mean(-1, keepdim=True)  # per-frame DC removal, as Kaldi does
    frames = torch.cat([frames[:, :1] * (1 - preemphasis), frames[:, 1:] - preemphasis * frames[:, :-1]], -1)
    window = torch.hamming_window(WIN_LENGTH, periodic=False)
    power = torch.fft.rfft(frames * window, n=N_FFT).abs().pow(2)  # (frames, N_FFT // 2 + 1)
    mel = power @ mel_filter_bank(power.shape[-1], num_mels, f_min, f_max)
    return torch.log(mel.clamp(min=1e-10)) @ dct_matrix(num_coeffs, num_mels)


def deltas(x: Tensor, window: int = 2) -> Tensor:
    """x: (frames, dims) -> regression differences over +-``window`` frames (edges repeated)."""
    padded = torch.cat([x[:1].expand(window, -1), x, x[-1:].expand(window, -1)])
    frames = x.shape[0]
    num = sum(n * (padded[window + n:window + n + frames] - padded[window - n:window - n + frames])
              for n in range(1, window + 1))
    return num / (2 * sum(n * n for n in range(1, window + 1)))


def mfcc_features(wave: Tensor) -> Tensor:
    """wave: (samples,) -> (frames, 39): MFCCs with first and second differences."""
    c = mfcc(wave)
    d = deltas(c)
    return torch.cat([c, d, deltas(d)], -1)


def kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0) -> Tensor:
    """Lloyd's k-means with k-means++ seeding. x: (points, dims) -> centroids (k, dims).
    An emptied cluster is re-seeded at the point farthest from its centroid."""
    if x.shape[0] < k:
        raise ValueError(f"k-means with {k} clusters needs at least {k} points, got {x.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    centroids = x[torch.randint(x.shape[0], (1,), generator=g)]
    closest = torch.cdist(x, centroids).squeeze(1).pow(2)
    for _ in range(1, k):
        pick = torch.multinomial(closest / closest.sum(), 1, generator=g)
        centroids = torch.cat([centroids, x[pick]])
        closest = torch.minimum(closest, torch.cdist(x, x[pick]).squeeze(1).pow(2))
    for _ in range(iters):
        distances = torch.cdist(x, centroids)
        assign = distances.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        new = sums / counts.clamp(min=1)[:, None]
        for empty in (counts == 0).nonzero().flatten().tolist():
            far = distances.gather(1, assign[:, None]).squeeze(1).argmax()
            new[empty] = x[far]
            assign[far] = empty
        if torch.allclose(new, centroids):
            break
        centroids = new
    return centroids.float()


@dataclass
class ClusterTargets:
    """Standardisation statistics and k-means centroids of MFCC features."""

    mean: Tensor       # (39,)
    std: Tensor        # (39,)
    centroids: Tensor  # (num_clusters, 39)

    @classmethod
    def fit(cls, features: Sequence[Tensor], num_clusters: int = 100, iters: int = 50, seed: int = 0
            ) -> "ClusterTargets":
        """features: ``mfcc_features`` of each utterance, (frames, 39) each."""
        feats = torch.cat(list(features))
        mean, std = feats.mean(0), feats.std(0).clamp(min=1e-5)
        return cls(mean, std, kmeans((feats - mean) / std, num_clusters, iters, seed))

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def assign(self, features: Tensor) -> Tensor:
        """features: (frames, 39) from ``mfcc_features`` -> (frames,) int64 cluster ids."""
        return torch.cdist((features - self.mean) / self.std, self.centroids).argmin(1)

    def labels(self, wave: Tensor) -> Tensor:
        """wave: (samples,) -> (frames,) int64 cluster ids."""
        return self.assign(mfcc_features(wave))

    def state_dict(self) -> Dict[str, Tensor]:
        return {"mean": self.mean, "std": self.std, "centroids": self.centroids}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Tensor]) -> "ClusterTargets":
        return cls(state["mean"], state["std"], state["centroids"])

