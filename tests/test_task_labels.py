"""Task labels (#16): the label TSV, the training split's vocabulary, and the one-line errors a bad
label file gets before any compute."""

import pytest
from helpers_train import noise_corpus, prune_cli, short_run_args

from prune.data.labels import BLANK, LabelError, Vocabulary, read_labels, split_targets, tokenize
from prune.data.manifest import read_manifest


def write_labels(path, rows, header="id\tvoice\ttext\tphones"):
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def corpus_labels(tmp_path, train, valid, voice=lambda i: f"v{i % 3}", phones=lambda i: "a b" if i % 2 else "b c"):
    """One row per utterance of the noise corpus (ids 0..19)."""
    ids = read_manifest(train).ids + read_manifest(valid).ids
    return write_labels(tmp_path / "labels.tsv", [f"{u}\t{voice(int(u))}\tsome text\t{phones(int(u))}" for u in ids])


def test_ids_are_file_names_without_extension(tmp_path):
    train, _ = noise_corpus(tmp_path, n_train=3, n_valid=1)
    assert read_manifest(train).ids == ["0", "1", "2"]


def test_vocabulary_of_the_training_split(tmp_path):
    labels = read_labels(write_labels(tmp_path / "l.tsv", ["u1\tx\thi you\tb a", "u2\ty\tok\ta c a"]), "phones")
    assert labels["u2"].value == "a c a" and labels["u2"].line == 3
    vocab = Vocabulary.build([labels[u].value for u in ("u1", "u2")], "ctc", "spaces")
    assert vocab.symbols == (BLANK, "a", "b", "c")  # blank at 0, then sorted
    assert vocab.encode("c a b", "here") == [3, 1, 2]
    chars = Vocabulary.build(["hi you"], "ctc", "chars")
    assert tokenize("hi  you", "chars") == ["h", "i", "|", "y", "o", "u"]
    assert chars.symbols == (BLANK, "h", "i", "o", "u", "y", "|")
    classes = Vocabulary.build(["y", "x", "y"], "classify")
    assert classes.symbols == ("x", "y") and classes.encode("y", "here") == 1
    assert Vocabulary.from_dict(classes.to_dict()) == classes


@pytest.mark.parametrize("rows, column, message", [
    (["u1\tx\thi\ta", "u1\ty\tho\tb"], "phones", r"l\.tsv:3: duplicate id 'u1' \(first at line 2\)"),
    (["u1\tx\thi\ta", "u2\ty\tho\t "], "phones", r"l\.tsv:3: utterance 'u2' has an empty 'phones'"),
    (["u1\tx\thi\ta"], "speaker", r"l\.tsv:1: no column 'speaker' \(task\.column\); the header has: voice, text, "
                                  r"phones"),
    (["u1\tx"], "phones", r"l\.tsv:2: 2 tab-separated fields, the header has 4"),
])
def test_bad_label_files(tmp_path, rows, column, message):
    with pytest.raises(LabelError, match=message):
        read_labels(write_labels(tmp_path / "l.tsv", rows), column)


def test_a_label_file_that_cannot_be_read(tmp_path):
    for path, message in [(tmp_path / "nope.tsv", "label file not found"), (tmp_path, "a folder, not a label file")]:
        with pytest.raises(LabelError, match=f"^{path}: {message}$"):
            read_labels(path, "phones")
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("id\tphones\nu1\t\xe9\n".encode("latin-1"))
    with pytest.raises(LabelError, match="latin.tsv: not UTF-8 text"):
        read_labels(latin, "phones")


def test_missing_and_unknown_labels(tmp_path):
    path = write_labels(tmp_path / "l.tsv", ["u1\tx\thi\ta b", "u2\ty\tho\ta z", "u3\tq\tho\ta"])
    phones, voices = read_labels(path, "phones"), read_labels(path, "voice")
    vocab = Vocabulary.build([phones["u1"].value], "ctc")
    with pytest.raises(LabelError, match=r"no label for utterance 'u9' of train\.tsv and 1 more"):
        split_targets(phones, ["u1", "u9", "u8"], vocab, path, "train.tsv")
    with pytest.raises(LabelError, match=r"l\.tsv:3 \(utterance 'u2' of valid\.tsv\): token 'z' does not occur in "
                                         r"the training split"):
        split_targets(phones, ["u2"], vocab, path, "valid.tsv")
    classes = Vocabulary.build([voices["u1"].value, voices["u2"].value], "classify")
    with pytest.raises(LabelError, match=r"l\.tsv:4 \(utterance 'u3' of valid\.tsv\): label 'q' does not occur in "
                                         r"the training split"):
        split_targets(voices, ["u3"], classes, path, "valid.tsv")


@pytest.mark.parametrize("case", ["missing", "unknown_valid", "empty"])
def test_a_bad_label_file_stops_the_run_in_one_line_before_compute(tmp_path, case):
    train, valid = noise_corpus(tmp_path / "corpus", n_train=6, n_valid=2)
    if case == "missing":
        labels = corpus_labels(tmp_path, train, valid)
        labels.write_text("\n".join(l for l in labels.read_text().splitlines() if not l.startswith("3\t")) + "\n")
        task, expect = "task=classify", "no label for utterance '3' of"
    elif case == "unknown_valid":  # valid ids are 6, 7: a voice of their own
        labels = corpus_labels(tmp_path, train, valid, voice=lambda i: "new" if i >= 6 else f"v{i % 2}")
        task, expect = "task=classify", "label 'new' does not occur in the training split"
    else:
        labels = corpus_labels(tmp_path, train, valid, phones=lambda i: "" if i == 4 else "a")
        task, expect = "task=ctc", "utterance '4' has an empty 'phones'"
    run = tmp_path / "run"
    result = prune_cli(short_run_args(train, valid, run, extra=[task, f"task.labels={labels}"]))
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("prune train: ") and expect in line and str(labels) in line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (run / "checkpoints").exists()
