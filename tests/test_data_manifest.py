"""Manifests: parse errors name the file and line; write/read round-trips; build_manifest skips
what soundfile cannot read; `prune manifest` (train/valid split, every soundfile format)."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prune.cli import main as prune_main
from prune.data.manifest import (AUDIO_EXTENSIONS, Manifest, ManifestError, build_manifest, read_manifest,
                                   split_entries, write_manifest)

HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write_text(path, text):
    path.write_bytes(text.encode("utf-8"))
    return path


def test_round_trip_and_relative_root(tmp_path):
    write_manifest(tmp_path / "m.tsv", "audio", [("a.flac", 16000), ("sub/b.wav", 400)])
    assert (tmp_path / "m.tsv").read_text() == "audio\na.flac\t16000\nsub/b.wav\t400\n"
    m = read_manifest(tmp_path / "m.tsv")
    assert m.root == tmp_path / "audio"  # resolved against the manifest's folder, not the cwd
    assert m.entries == [("a.flac", 16000), ("sub/b.wav", 400)]
    assert len(m) == 2 and m.lengths == [16000, 400] and m.path(1) == tmp_path / "audio" / "sub/b.wav"
    assert m.subset([1]).entries == [("sub/b.wav", 400)]
    assert str(m) == str(tmp_path / "m.tsv")


def test_absolute_root_is_kept(tmp_path):
    write_manifest(tmp_path / "m.tsv", "/data/corpus", [("a.flac", 1)])
    assert read_manifest(tmp_path / "m.tsv").root == Path("/data/corpus")


def test_blank_lines_and_crlf_are_tolerated(tmp_path):
    path = write_text(tmp_path / "m.tsv", "root\r\na.wav\t10\r\n\r\n\nb.wav\t20\n\n")
    assert read_manifest(path).entries == [("a.wav", 10), ("b.wav", 20)]


@pytest.mark.parametrize("line, line_no, words", [
    ("a.wav", 3, ["expected", "1 tab-separated field"]),
    ("a.wav\t12\textra", 3, ["3 tab-separated fields"]),
    ("\t12", 3, ["empty path"]),
    ("   \t12", 3, ["empty path"]),
    ("a.wav\tabc", 3, ["'abc' is not a non-negative integer"]),
    ("a.wav\t1.5", 3, ["not a non-negative integer"]),
    ("a.wav\t", 3, ["not a non-negative integer"]),
    ("a.wav\t1_000", 3, ["not a non-negative integer"]),
    ("a.wav\t-3", 3, ["negative sample count -3"]),
    ("\t", 3, ["empty path"]),
])
def test_malformed_line_names_file_and_line(tmp_path, line, line_no, words):
    path = write_text(tmp_path / "bad.tsv", f"root\nok.wav\t5\n{line}\nlater.wav\t7\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line_no}:"), message
    for word in words:
        assert word in message, message


def test_missing_root_line(tmp_path):
    path = write_text(tmp_path / "m.tsv", "a.wav\t10\nb.wav\t20\n")
    with pytest.raises(ManifestError, match=r"m\.tsv:1: .*root line missing"):
        read_manifest(path)


@pytest.mark.parametrize("text", ["", "\n", "root\n", "root\n\n\n"])
def test_empty_manifest_is_an_error(tmp_path, text):
    path = write_text(tmp_path / "m.tsv", text)
    with pytest.raises(ManifestError, match="m.tsv"):
        read_manifest(path)


def test_missing_and_binary_manifests(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.tsv")
    (tmp_path / "bin.tsv").write_bytes(b"root\n\xff\xfe\t12\n")
    with pytest.raises(ManifestError, match="bin.tsv: not UTF-8"):
        read_manifest(tmp_path / "bin.tsv")


@pytest.mark.parametrize("root, entries, words", [
    ("audio", [], "no entries"),
    ("", [("a", 1)], "root"),
    ("audio", [("a\tb", 1)], "entry 0"),
    ("audio", [("", 1)], "entry 0"),
    ("audio", [("a", 1), ("b", -1)], "entry 1 (b)"),
    ("audio", [("a", 1.5)], "entry 0 (a)"),
    ("audio", [("a", "12")], "entry 0 (a)"),
])
def test_write_rejects_what_read_would(tmp_path, root, entries, words):
    target = write_text(tmp_path / "m.tsv", "old\nx.wav\t1\n")
    with pytest.raises(ManifestError) as info:
        write_manifest(target, root, entries)
    assert words in str(info.value)
    assert target.read_text() == "old\nx.wav\t1\n"  # the old manifest survives
    assert [p.name for p in tmp_path.iterdir()] == ["m.tsv"]  # and no temp file is left behind


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    target = write_text(tmp_path / "m.tsv", "old\nx.wav\t1\n")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_manifest(target, "audio", [("a.wav", 3)])
    assert target.read_text() == "old\nx.wav\t1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.tsv"]


# --- property tests -------------------------------------------------------------------------

# paths: any text without tabs/newlines that is not all whitespace (the format cannot hold those)
paths = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\t\n\r"), min_size=1,
                max_size=30).filter(lambda s: s.strip())
entries = st.lists(st.tuples(paths, st.integers(0, 10 ** 12)), min_size=1, max_size=20)
roots = st.sampled_from(["audio", "a/b c", "/abs/root", "../up", "ünïcode"])


@HYPOTHESIS
@given(root=roots, entries=entries)
def test_round_trip_property(tmp_path, root, entries):
    write_manifest(tmp_path / "m.tsv", root, entries)
    m = read_manifest(tmp_path / "m.tsv")
    assert m.entries == entries
    assert m.root == (Path(root) if Path(root).is_absolute() else tmp_path / root)


bad_lines = st.one_of(
    paths.filter(lambda s: "\t" not in s),  # one field
    st.tuples(paths, st.integers(0, 99), paths).map(lambda t: f"{t[0]}\t{t[1]}\t{t[2]}"),  # three fields
    st.integers(0, 99).map(lambda n: f"\t{n}"),  # empty path
    st.tuples(paths, st.integers(1, 10 ** 9)).map(lambda t: f"{t[0]}\t-{t[1]}"),  # negative
    st.tuples(paths, st.text(max_size=8).filter(lambda s: not s.strip().isascii() or not s.strip().isdigit()))
    .filter(lambda t: "\t" not in t[1] and "\n" not in t[1] and "\r" not in t[1])
    .map(lambda t: f"{t[0]}\t{t[1]}"),  # count that is not an ASCII integer
).filter(lambda s: s.strip())  # a blank line is skipped, not an error


@HYPOTHESIS
@given(entries=entries, bad=bad_lines, where=st.integers(0, 20))
def test_garbage_line_raises_manifest_error(tmp_path, entries, bad, where):
    where = min(where, len(entries))
    lines = ["root"] + [f"{p}\t{n}" for p, n in entries]
    lines.insert(1 + where, bad)
    path = write_text(tmp_path / "m.tsv", "\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert str(info.value).startswith(f"{path}:{where + 2}:"), str(info.value)


@HYPOTHESIS
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(lambda s: s.encode("utf-8")))
def test_any_bytes_parse_or_raise_manifest_error(tmp_path, data):
    (tmp_path / "m.tsv").write_bytes(data)
    try:
        m = read_manifest(tmp_path / "m.tsv")
    except ManifestError:
        return
    assert isinstance(m, Manifest) and m.entries and all(n >= 0 for _, n in m.entries)


# --- build_manifest -------------------------------------------------------------------------

def make_folder(root: Path) -> Path:
    (root / "b_sub").mkdir(parents=True)
    t = np.sin(np.arange(16000) * 0.05).astype(np.float32) * 0.3
    sf.write(root / "z.wav", t, 16000)
    sf.write(root / "a.flac", t[:8000], 8000)  # 1 s at 8 kHz -> 16000 samples
    sf.write(root / "b_sub" / "c.WAV", t[:4410], 44100)  # 0.1 s -> 1600
    sf.write(root / "b_sub" / "d.ogg", t, 16000, format="OGG", subtype="VORBIS")
    (root / "b_sub" / "text.wav").write_text("not audio")
    sf.write(root / "zero.wav", np.zeros(0, np.float32), 16000)
    (root / "notes.txt").write_text("ignored: not an audio extension")
    return root


def test_build_manifest(tmp_path):
    entries, skipped = build_manifest(make_folder(tmp_path / "corpus"))
    assert entries == [("a.flac", 16000), ("b_sub/c.WAV", 1600), ("b_sub/d.ogg", 16000), ("z.wav", 16000)]
    assert [p for p, _ in skipped] == ["b_sub/text.wav", "zero.wav"]
    assert "unreadable" in skipped[0][1] and "no samples" in skipped[1][1]
    only_wav, _ = build_manifest(tmp_path / "corpus", extensions=(".wav",))
    assert [p for p, _ in only_wav] == ["b_sub/c.WAV", "z.wav"]
    with pytest.raises(ManifestError, match="not a folder"):
        build_manifest(tmp_path / "missing")


def prune_manifest(args):
    with pytest.raises(SystemExit) as e:
        prune_main(["manifest", *map(str, args)])
    return e.value.code


def test_prune_manifest_writes_a_seeded_train_valid_split(tmp_path, capsys):
    folder = make_folder(tmp_path / "corpus")
    assert prune_manifest([folder, tmp_path / "out", "--valid-fraction", "0.25"]) == 0
    out, err = capsys.readouterr()
    assert "3 files" in out and "1 files" in out and "2 skipped" in out
    assert "skipped b_sub/text.wav" in err and "skipped zero.wav" in err
    train, valid = read_manifest(tmp_path / "out" / "train.tsv"), read_manifest(tmp_path / "out" / "valid.tsv")
    assert (tmp_path / "out" / "train.tsv").read_text().startswith("../corpus\n")  # relocatable
    assert train.root.resolve() == folder.resolve() == valid.root.resolve()
    assert sorted(train.entries + valid.entries) == sorted(build_manifest(folder)[0])  # split by file, disjoint
    assert train.entries == sorted(train.entries)
    assert prune_manifest([folder, tmp_path / "again", "--valid-fraction", "0.25"]) == 0  # seeded: the same split
    assert (tmp_path / "again" / "valid.tsv").read_text() == (tmp_path / "out" / "valid.tsv").read_text()
    assert prune_manifest([folder, tmp_path / "out", "--valid-fraction", "0"]) == 0
    assert not (tmp_path / "out" / "valid.tsv").exists()  # the earlier split's valid.tsv would overlap train


def test_split_entries():
    entries = [(f"{i}.wav", i + 1) for i in range(200)]
    train, valid = split_entries(entries, 0.01, seed=3)
    assert len(valid) == 2 and len(train) == 198 and not set(train) & set(valid)
    assert split_entries(entries, 0.01, seed=3) == (train, valid) != split_entries(entries, 0.01, seed=4)
    assert split_entries(entries[:5], 0.01) != (entries[:5], [])  # a positive fraction holds out one file at least
    with pytest.raises(ManifestError, match="valid fraction"):
        split_entries(entries, 1.0)


def test_every_format_soundfile_reads_is_found_by_default(tmp_path):
    """`.mp3` (and AIFF, ...) were left out of the defaults."""
    for fmt, ext in (("MP3", ".mp3"), ("AIFF", ".aiff"), ("FLAC", ".flac"), ("WAV", ".wav")):
        assert fmt not in sf.available_formats() or ext in AUDIO_EXTENSIONS
    t = np.sin(np.arange(16000) * 0.05).astype(np.float32) * 0.3
    (tmp_path / "c").mkdir()
    sf.write(tmp_path / "c" / "a.mp3", t, 16000, format="MP3")
    sf.write(tmp_path / "c" / "b.aiff", t, 16000)
    entries, skipped = build_manifest(tmp_path / "c")
    assert [p for p, _ in entries] == ["a.mp3", "b.aiff"] and not skipped


def test_prune_manifest_without_audio_names_the_extensions_and_ext(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.m4a").write_bytes(b"not read by soundfile")
    with pytest.raises(SystemExit) as e:
        prune_main(["manifest", str(tmp_path / "empty"), str(tmp_path / "out")])
    message = str(e.value.code)
    assert message.startswith(f"prune manifest: {tmp_path / 'empty'}: no readable audio file; looked for ")
    assert ".mp3" in message and "give other extensions with --ext" in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(SystemExit) as e:
        prune_main(["manifest", str(tmp_path / "empty"), str(tmp_path / "out"), "--ext", "m4a"])
    assert "1 found, none readable" in str(e.value.code) and "looked for .m4a" in str(e.value.code)


def test_a_folder_read_as_a_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(ManifestError, match=f"^{tmp_path} is a folder, not a manifest; make one with: "
                                            f"prune manifest {tmp_path} OUT_DIR$"):
        read_manifest(tmp_path)
