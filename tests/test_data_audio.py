"""load_audio and resample: every bad file is an AudioError naming the file; resampling keeps
tones and removes what would alias."""

import math
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch

import prune.data.audio as audio_mod
from prune.data.audio import AudioError, load_audio, resample, resampled_length


def tone(freq, sr, seconds=1.0, amp=0.5):
    """(samples,) float64 sine."""
    t = torch.arange(int(sr * seconds), dtype=torch.float64) / sr
    return amp * torch.sin(2 * math.pi * freq * t)


def peak_hz(wave, sr):
    spectrum = torch.fft.rfft(wave.double() * torch.hann_window(len(wave), dtype=torch.float64))
    return spectrum.abs().argmax().item() * sr / len(wave)


# --- resample -------------------------------------------------------------------------------

@pytest.mark.parametrize("orig, new, freq", [(44100, 16000, 440), (22050, 16000, 3000), (8000, 16000, 1000),
                                             (48000, 16000, 6000), (16000, 8000, 1500), (16000, 44100, 5000)])
def test_resample_keeps_a_tone(orig, new, freq):
    y = resample(tone(freq, orig).float(), orig, new)
    assert y.dtype == torch.float32
    assert len(y) == resampled_length(orig, orig, new) == new
    ref = tone(freq, new)[:len(y)]
    inner = slice(100, len(y) - 100)  # the edges see zero padding
    assert abs(peak_hz(y, new) - freq) <= 1.0
    # tones up to 75% of the lower Nyquist are in the passband: amplitude/phase error < 0.01%
    assert (y.double()[inner] - ref[inner]).abs().max() / 0.5 < 1e-4


def test_resample_suppresses_what_would_alias():
    # 10 kHz is above the 8 kHz Nyquist of 16 kHz: unfiltered it would fold to 6 kHz
    y = resample(tone(10000, 44100, amp=1.0).float(), 44100, 16000)
    rms = y[100:-100].double().pow(2).mean().sqrt().item()
    assert rms < 1e-3, f"10 kHz leaked through at {20 * math.log10(rms):.0f} dB"


def test_resample_shapes_and_identity():
    x = torch.randn(2, 3, 4410)
    y = resample(x, 44100, 16000)
    assert y.shape == (2, 3, 1600)
    torch.testing.assert_close(y[1, 2], resample(x[1, 2], 44100, 16000))
    assert resample(x, 16000, 16000) is x
    assert resampled_length(7, 3, 2) == 5  # 4.67 rounds to 5
    assert resampled_length(3, 2, 1) == 2  # 1.5: halves round up


def test_direct_path_matches_polyphase(monkeypatch):
    x = torch.randn(3000)
    poly = resample(x, 22050, 16000)
    monkeypatch.setattr(audio_mod, "MAX_POLYPHASE_TAPS", 0)  # force the per-sample path
    torch.testing.assert_close(resample(x, 22050, 16000), poly, atol=1e-5, rtol=0)


def test_coprime_rates_take_the_direct_path():
    y = resample(tone(440, 16001, 0.25).float(), 16001, 16000)  # 16000 phases: no polyphase kernel
    assert len(y) == resampled_length(4000, 16001, 16000)
    assert (y.double()[100:-100] - tone(440, 16000, 0.25)[100:len(y) - 100]).abs().max() < 1e-3


@pytest.mark.parametrize("args", [(0, 16000), (16000, -1), (44100.5, 16000)])
def test_resample_rejects_bad_rates(args):
    with pytest.raises(ValueError, match="sample rates"):
        resample(torch.zeros(10), *args)


def test_resample_rejects_integer_waves():
    with pytest.raises(TypeError, match="floating-point"):
        resample(torch.zeros(10, dtype=torch.int16), 8000, 16000)


# --- load_audio: good files -----------------------------------------------------------------

def test_reads_mono_16k(tmp_path):
    x = tone(300, 16000).numpy()
    sf.write(tmp_path / "a.wav", x, 16000, subtype="PCM_16")
    wave = load_audio(tmp_path / "a.wav")
    assert wave.dtype == torch.float32 and wave.shape == (16000,)
    np.testing.assert_allclose(wave.numpy(), x, atol=1 / 32768)


def test_stereo_is_averaged(tmp_path):
    left, right = tone(300, 16000).numpy(), tone(500, 16000, amp=0.25).numpy()
    sf.write(tmp_path / "st.flac", np.stack([left, right], axis=1), 16000)
    wave = load_audio(tmp_path / "st.flac")
    assert wave.shape == (16000,)
    np.testing.assert_allclose(wave.numpy(), (left + right) / 2, atol=2 / 32768)


def test_multichannel_is_averaged(tmp_path):
    x = np.stack([np.full(1000, v) for v in (0.1, 0.2, 0.3, 0.6)], axis=1)
    sf.write(tmp_path / "quad.wav", x, 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "quad.wav").numpy(), 0.3, atol=1e-6)


@pytest.mark.parametrize("sr", [8000, 22050, 44100])
def test_other_rates_are_resampled(tmp_path, sr):
    sf.write(tmp_path / "r.flac", tone(440, sr).numpy(), sr)
    wave = load_audio(tmp_path / "r.flac")
    assert len(wave) == resampled_length(sr, sr, 16000) == 16000
    assert abs(peak_hz(wave, 16000) - 440) <= 1.0
    assert (wave.double()[100:-100] - tone(440, 16000)[100:-100]).abs().max() < 2e-3


def test_min_samples_counts_after_resampling(tmp_path):
    sf.write(tmp_path / "short8k.wav", tone(440, 8000, 0.03).numpy(), 8000)  # 240 samples -> 480 at 16 kHz
    assert len(load_audio(tmp_path / "short8k.wav")) == 480


# --- load_audio: bad files ------------------------------------------------------------------

def expect_error(path, *words, **kwargs):
    with pytest.raises(AudioError) as info:
        load_audio(path, **kwargs)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for word in words:
        assert word in message, message
    return info.value


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.wav", "no such file")


def test_directory(tmp_path):
    expect_error(tmp_path, "not a regular file")


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    expect_error(tmp_path / "empty.wav", "empty file")


def test_zero_samples(tmp_path):
    sf.write(tmp_path / "zero.wav", np.zeros(0, dtype=np.float32), 16000)
    expect_error(tmp_path / "zero.wav", "no samples")


def test_truncated_flac(tmp_path):
    sf.write(tmp_path / "full.flac", tone(440, 16000).numpy(), 16000)
    data = (tmp_path / "full.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[:len(data) // 2])
    expect_error(tmp_path / "cut.flac", "cannot decode")


def test_corrupt_header(tmp_path):
    sf.write(tmp_path / "ok.flac", tone(440, 16000).numpy(), 16000)
    (tmp_path / "bad.flac").write_bytes((tmp_path / "ok.flac").read_bytes()[:20])
    expect_error(tmp_path / "bad.flac", "cannot decode")


def test_text_file_named_wav(tmp_path):
    (tmp_path / "notes.wav").write_text("this is not audio\n")
    expect_error(tmp_path / "notes.wav", "cannot decode")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_samples(tmp_path, bad):
    x = tone(440, 16000).numpy().astype(np.float32)
    x[[10, 500]] = bad
    sf.write(tmp_path / "nf.wav", x, 16000, subtype="FLOAT")
    expect_error(tmp_path / "nf.wav", "2 of 16000 samples are NaN or Inf")


def test_shorter_than_min_samples(tmp_path):
    sf.write(tmp_path / "short.wav", tone(440, 16000, 0.02).numpy(), 16000)  # 320 samples
    expect_error(tmp_path / "short.wav", "320 samples", "min_samples=400")
    assert len(load_audio(tmp_path / "short.wav", min_samples=0)) == 320
    expect_error(tmp_path / "short.wav", "min_samples=1000", min_samples=1000)


def test_audio_error_pickles(tmp_path):
    err = expect_error(tmp_path / "nope.wav", "no such file")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ValueError) and str(again) == str(err) and again.reason == "no such file"
