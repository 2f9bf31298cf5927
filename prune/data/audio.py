"""Audio loading for training: any file soundfile reads becomes a mono float32 waveform at
16 kHz, or an ``AudioError`` that names the file and what is wrong with it.

Resampling is a windowed-sinc polyphase filter written in torch (no torchaudio dependency).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import Tensor

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # the conv feature extractor's receptive field: shorter input yields no frame

# Filter defaults: 16 zero crossings each side and a Kaiser window (beta 8.6, about -85 dB
# sidelobes) keep the stopband below -60 dB; rolloff 0.99 puts the cutoff just under Nyquist.
LOWPASS_WIDTH = 16
ROLLOFF = 0.99
KAISER_BETA = 8.6
# Above this many kernel taps (phases x taps) the polyphase kernel is too big to build
# (e.g. 16001 -> 16000 Hz has 16000 phases); such ratios are filtered sample by sample instead.
MAX_POLYPHASE_TAPS = 1 << 22

PathLike = Union[str, Path]


class AudioError(ValueError):
    """An audio file that cannot be used: ``str(e)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: PathLike, reason: str):
        super().__init__(str(path), reason)  # both in args, so the error pickles (DataLoader workers)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def resampled_length(num_samples: int, orig_sr: int, new_sr: int) -> int:
    """Samples after resampling ``num_samples`` from ``orig_sr`` to ``new_sr``:
    ``round(num_samples * new_sr / orig_sr)``, halves rounded up, in exact integer arithmetic.
    Manifests count lengths with this, so a manifest and ``load_audio`` agree to the sample."""
    return (2 * num_samples * new_sr + orig_sr) // (2 * orig_sr)


def _windowed_sinc(t: Tensor, lowpass_width: int, beta: float) -> Tensor:
    """Kaiser-windowed sinc at ``t`` (in zero crossings of the cutoff), zero beyond
    ``|t| >= lowpass_width``."""
    t = t.clamp(-lowpass_width, lowpass_width)
    # clamping makes sin(pi * t) exactly 0 outside the window, since lowpass_width is an integer
    window = torch.i0(beta * torch.sqrt((1 - (t / lowpass_width) ** 2).clamp(min=0))) / torch.i0(
        torch.tensor(beta, dtype=t.dtype))
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    return sinc * window


def _check_rates(orig_sr: int, new_sr: int, lowpass_width: int, rolloff: float) -> None:
    if int(orig_sr) != orig_sr or int(new_sr) != new_sr or orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} -> {new_sr}")
    if int(lowpass_width) != lowpass_width or lowpass_width < 1:
        raise ValueError(f"lowpass_width must be a positive integer, got {lowpass_width}")
    if not 0.0 < rolloff <= 1.0:
        raise ValueError(f"rolloff must be in (0, 1], got {rolloff}")


def resample(wave: Tensor, orig_sr: int, new_sr: int, lowpass_width: int = LOWPASS_WIDTH,
             rolloff: float = ROLLOFF, beta: float = KAISER_BETA) -> Tensor:
    """Band-limited resampling with a Kaiser-windowed sinc.

    The rates are reduced by their gcd to ``up = new_sr / g`` output phases per ``down = orig_sr / g``
    input samples; each phase is one FIR kernel, and one strided ``conv1d`` applies all of them.
    The anti-aliasing cutoff is ``rolloff * min(orig_sr, new_sr) / 2``.

    Args:
        wave (Tensor): shape (..., samples), floating point.
    Returns:
        Tensor: shape (..., resampled_length(samples, orig_sr, new_sr)), same dtype.
    """
    _check_rates(orig_sr, new_sr, lowpass_width, rolloff)
    if not wave.is_floating_point():
        raise TypeError(f"resample needs a floating-point waveform, got {wave.dtype}")
    if orig_sr == new_sr:
        return wave
    g = math.gcd(int(orig_sr), int(new_sr))
    down, up = int(orig_sr) // g, int(new_sr) // g
    shape = wave.shape
    x = wave.reshape(-1, shape[-1])  # (batch, samples)
    n_out = resampled_length(shape[-1], down, up)
    base = min(down, up) * rolloff  # cutoff x 2, in units where the input rate is ``down``
    width = math.ceil(lowpass_width * down / base)  # kernel half-length, input samples
    if up * (2 * width + down) > MAX_POLYPHASE_TAPS:
        y = _resample_direct(x, down, up, n_out, width, base, lowpass_width, beta)
    else:
        y = _resample_polyphase(x, down, up, n_out, width, base, lowpass_width, beta)
    return y.reshape(*shape[:-1], n_out)


def _resample_polyphase(x: Tensor, down: int, up: int, n_out: int, width: int, base: float,
                        lowpass_width: int, beta: float) -> Tensor:
    """x (Tensor): shape (batch, samples) -> shape (batch, n_out)."""
    # the kernel is built in float64: its taps are small differences of large phases
    taps = torch.arange(-width, width + down, dtype=torch.float64) / down  # (K,), input time of each tap
    phase = -torch.arange(up, dtype=torch.float64)[:, None] / up  # (up, 1), minus each output phase's time
    kernel = _windowed_sinc((taps[None] + phase) * base, lowpass_width, beta) * (base / down)  # (up, K)
    kernel = kernel.to(x.dtype)[:, None, :]  # (up, 1, K)
    # pad so that output frame f sees input samples f*down - width ... f*down + down + width
    padded = F.pad(x[:, None, :], (width, width + down))  # (batch, 1, samples + 2 width + down)
    y = F.conv1d(padded, kernel, stride=down)  # (batch, up, frames): phase p of frame f is output f*up + p
    return y.transpose(1, 2).reshape(x.shape[0], -1)[:, :n_out]


def _resample_direct(x: Tensor, down: int, up: int, n_out: int, width: int, base: float,
                     lowpass_width: int, beta: float, chunk: int = 1 << 14) -> Tensor:
    """The same filter as ``_resample_polyphase``, evaluated per output sample (for ratios
    whose polyphase kernel would be huge). x (Tensor): shape (batch, samples) -> (batch, n_out)."""
    out = x.new_empty(x.shape[0], n_out)
    offsets = torch.arange(-width, width + 1)  # (W,)
    for start in range(0, n_out, chunk):
        n = torch.arange(start, min(start + chunk, n_out), dtype=torch.int64)  # (C,)
        left = (n * down) // up  # the input sample at or before each output's time, exact in integers
        frac = ((n * down) % up).to(torch.float64) / up
        idx = left[:, None] + offsets  # (C, W)
        t = (offsets[None].to(torch.float64) - frac[:, None]) / down * base
        weights = _windowed_sinc(t, lowpass_width, beta) * (base / down)  # (C, W)
        weights = weights * ((idx >= 0) & (idx < x.shape[1]))  # zero padding beyond the edges
        gathered = x[:, idx.clamp(0, x.shape[1] - 1)]  # (batch, C, W)
        out[:, start:start + len(n)] = (gathered * weights.to(x.dtype)).sum(-1)
    return out


def load_audio(path: PathLike, sample_rate: int = SAMPLE_RATE, min_samples: int = MIN_SAMPLES) -> Tensor:
    """Read an audio file as a mono float32 waveform at ``sample_rate``.

    Multichannel audio is averaged to mono; other rates are resampled with ``resample``.
    Raises ``AudioError`` (naming the file) for a missing or empty file, data soundfile
    cannot decode (corrupt, truncated, not audio), zero samples, NaN/Inf samples, or fewer
    than ``min_samples`` samples after resampling.

    Returns:
        wave (Tensor): shape (samples,), float32.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "no such file")
    if not path.is_file():
        raise AudioError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (frames, channels)
    except (sf.SoundFileError, RuntimeError, ValueError, OSError, EOFError) as e:
        raise AudioError(path, f"cannot decode audio: {e}") from e
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioError(path, "contains no samples")
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - finite.sum())
        raise AudioError(path, f"{bad} of {data.size} samples are NaN or Inf")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    wave = torch.from_numpy(np.ascontiguousarray(mono))
    if sr != sample_rate:
        wave = resample(wave, sr, sample_rate)
    if wave.numel() < min_samples:
        raise AudioError(path, f"{wave.numel()} samples at {sample_rate} Hz, fewer than "
                               f"min_samples={min_samples}")
    return wave
