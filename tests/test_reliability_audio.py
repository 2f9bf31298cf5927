"""Bad audio in a manifest of otherwise good files: each bad file is either used (downmixed,
resampled) or skipped, counted and named; a manifest with nothing usable stops before training."""

import json

import numpy as np
import pytest
import soundfile as sf
from helpers_train import noise_corpus, prune_cli, short_run_args


def tone(sr, seconds=1.0, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.stack([x, -x], axis=1) if channels == 2 else x


def write_bad_files(audio):
    """(relative path, declared samples at 16 kHz) of every bad kind; the files, in ``audio``."""
    (audio / "empty.wav").write_bytes(b"")
    sf.write(audio / "zero.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(audio / "full.flac", tone(16000), 16000)
    data = (audio / "full.flac").read_bytes()
    (audio / "truncated.flac").write_bytes(data[: len(data) // 2])
    (audio / "full.flac").unlink()
    (audio / "notes.wav").write_text("this is a text file, not audio\n")
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        x = tone(16000)
        x[[100, 9000]] = value
        sf.write(audio / name, x, 16000, subtype="FLOAT")
    sf.write(audio / "short.wav", tone(16000, 0.02), 16000)  # 320 samples < 400
    return {"empty.wav": "empty file", "zero.wav": "0 samples", "truncated.flac": "cannot decode",
            "notes.wav": "unreadable", "nan.wav": "NaN or Inf", "inf.wav": "NaN or Inf",
            "short.wav": "fewer than min_samples=400", "missing.wav": "no such file"}


def write_handled_files(audio):
    """Files that must be converted and used, not skipped."""
    sf.write(audio / "stereo.wav", tone(16000, channels=2), 16000)
    sf.write(audio / "rate8k.wav", tone(8000), 8000)
    sf.write(audio / "rate44k.flac", tone(44100), 44100)
    return {"stereo.wav": 16000, "rate8k.wav": 16000, "rate44k.flac": 16000}


def run_args(train, valid, run, prune_steps=10, final_steps=4):
    return short_run_args(train, valid, run, prune_steps=prune_steps, final_steps=final_steps)


def test_bad_files_are_skipped_counted_and_named(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=8, n_valid=2)
    audio = tmp_path / "corpus" / "audio"
    bad = write_bad_files(audio)
    handled = write_handled_files(audio)
    lines = train.read_text().splitlines()
    lines += [f"{name}\t16000" for name in bad] + [f"{name}\t{n}" for name, n in handled.items()]
    train.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"

    result = prune_cli(run_args(train, valid, run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    skipped = json.loads((run / "report.json").read_text())["skipped_files"]
    assert set(skipped) == {str(audio / name) for name in bad}, skipped
    for name, reason in bad.items():
        assert reason in skipped[str(audio / name)], (name, skipped[str(audio / name)])
    assert f"skipped audio files: {len(bad)}" in result.stdout  # the printed report counts them

    # the end-of-run summary names every skipped file, on the console and in the run's log
    console = result.stdout + result.stderr
    summary = console[console.rindex(f"skipped {len(bad)} files:"):]
    for name in bad:
        assert str(audio / name) in summary, name
    log = (run / "cli.log").read_text()
    assert all(str(audio / name) in log[log.rindex(f"skipped {len(bad)} files:"):] for name in bad)

    # a finished run resumed is left alone: its report still lists what was skipped during training
    again = prune_cli(["resume", str(run)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "report.json").read_text())["skipped_files"] == skipped


def test_malformed_manifest_line_stops_before_training(tmp_path):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=4, n_valid=2)
    lines = train.read_text().splitlines()
    lines.insert(3, "no_tab_here.wav 16000")
    train.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    result = prune_cli(run_args(train, valid, run))
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"prune train: {train}:4: expected 'relative_path<TAB>num_samples'"), message
    assert "Traceback" not in result.stderr
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize("kind", ["rejected_up_front", "rejected_when_read"])
def test_all_bad_manifest_stops_before_training(tmp_path, kind):
    """Files a header check rejects, and files only decoding reveals (NaN samples, a truncated
    flac): either way one clear error naming the manifest, no step trained, no checkpoint."""
    corpus = tmp_path / "corpus"
    train, valid = noise_corpus(corpus, n_train=2, n_valid=2)
    audio = corpus / "audio"
    bad = write_bad_files(audio)
    names = [n for n in bad if (n in ("nan.wav", "inf.wav", "truncated.flac")) == (kind == "rejected_when_read")]
    train.write_text("\n".join(["audio"] + [f"{name}\t16000" for name in names]) + "\n")
    run = tmp_path / "run"
    result = prune_cli(run_args(train, valid, run), timeout=60)
    assert result.returncode != 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error = result.stderr[result.stderr.index("prune train:"):].splitlines()
    assert error[0].startswith(f"prune train: {train}: no usable audio"), error[0]
    for name in names:
        assert any(str(audio / name) in line for line in error[1:]), name
    assert not (run / "checkpoints").exists()
