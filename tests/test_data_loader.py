"""AudioDataset, collate, validate_manifest, LengthBucketSampler, and the committed demo corpus."""

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from prune.data.audio import load_audio
from prune.data.dataset import AudioDataset, Batch, LengthBucketSampler, collate, format_skipped, validate_manifest
from prune.data.manifest import ManifestError, read_manifest, write_manifest

CORPUS = Path(__file__).resolve().parent.parent / "data" / "demo_corpus"


def make_corpus(root: Path, bad: bool = True) -> Path:
    """A manifest of 6 good files (lengths 800 ... 24000) plus, with ``bad``, one of each bad kind."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i, n in enumerate([800, 24000, 3000, 16000, 5000, 12000]):
        sf.write(audio / f"good{i}.wav", (rng.standard_normal(n) * 0.1).astype(np.float32), 16000, subtype="FLOAT")
        entries.append((f"good{i}.wav", n))
    if bad:
        (audio / "empty.wav").write_bytes(b"")
        (audio / "text.wav").write_text("not audio")
        sf.write(audio / "short.wav", np.zeros(100, np.float32), 16000)
        sf.write(audio / "nan.wav", np.full(2000, np.nan, np.float32), 16000, subtype="FLOAT")
        sf.write(audio / "full.flac", (rng.standard_normal(16000) * 0.1).astype(np.float32), 16000)
        data = (audio / "full.flac").read_bytes()
        (audio / "truncated.flac").write_bytes(data[:len(data) // 2])
        for name, n in [("empty.wav", 1000), ("text.wav", 1000), ("short.wav", 100), ("missing.wav", 1000),
                        ("nan.wav", 2000), ("truncated.flac", 16000)]:
            entries.insert(len(entries) // 2, (name, n))
    write_manifest(root / "train.tsv", "audio", entries)
    return root / "train.tsv"


# --- dataset and collate ---------------------------------------------------------------------

def test_crops_are_seeded_by_seed_epoch_index(tmp_path):
    ds = AudioDataset(make_corpus(tmp_path, bad=False), max_samples=4000, seed=3)
    full = load_audio(ds.manifest.path(1))  # 24000 samples
    first = ds[1]
    assert first.shape == (4000,) and first.dtype == torch.float32
    offset = ds.crop_offset(1, 24000)
    torch.testing.assert_close(first, full[offset:offset + 4000])
    torch.testing.assert_close(ds[1], first)  # same (seed, epoch, index): same crop
    again = AudioDataset(ds.manifest, max_samples=4000, seed=3)  # a resumed run
    torch.testing.assert_close(again[1], first)
    offsets = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        offsets.add(ds.crop_offset(1, 24000))
    assert len(offsets) > 3  # the crop moves between epochs
    assert ds[0].shape == (800,)  # short files are not cropped or padded
    assert ds.lengths == [800, 4000, 3000, 4000, 4000, 4000]


def test_bad_files_are_skipped_not_raised(tmp_path, caplog):
    ds = AudioDataset(make_corpus(tmp_path), max_samples=4000)
    items = [ds[i] for i in range(len(ds))]
    assert sum(w is not None for w in items) == 6
    names = {Path(p).name: reason for p, reason in ds.skipped.items()}
    assert names.keys() == {"empty.wav", "text.wav", "short.wav", "missing.wav", "nan.wav", "truncated.flac"}
    assert "empty file" in names["empty.wav"] and "no such file" in names["missing.wav"]
    assert "cannot decode" in names["text.wav"] and "cannot decode" in names["truncated.flac"]
    assert "NaN or Inf" in names["nan.wav"] and "min_samples=400" in names["short.wav"]
    assert all(str(tmp_path) in p for p in ds.skipped)  # full paths, so the files can be found
    assert sum("skipping" in r.message for r in caplog.records) == 6
    _ = [ds[i] for i in range(len(ds))]  # logged once per file, not once per read
    assert sum("skipping" in r.message for r in caplog.records) == 6


def test_collate_pads_and_drops_none():
    a, b = torch.ones(3), torch.full((5,), 2.0)
    batch = collate([a, None, b])
    assert isinstance(batch, Batch) and batch.labels is None and batch.ids is None
    waves, lengths = batch.waveforms, batch.lengths
    assert waves.shape == (2, 5) and waves.dtype == torch.float32
    assert lengths.tolist() == [3, 5] and lengths.dtype == torch.long
    assert waves[0].tolist() == [1, 1, 1, 0, 0] and waves[1].tolist() == [2] * 5
    assert collate([None, None]) is None and collate([]) is None


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_end_to_end(tmp_path, workers):
    manifest = read_manifest(make_corpus(tmp_path))
    ds = AudioDataset(manifest, max_samples=4000)
    sampler = LengthBucketSampler(ds.lengths, batch_size=3, seed=1)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    seen, batches = 0, 0
    for batch in loader:
        batches += 1
        if batch is None:  # every file in the batch was bad
            continue
        waves, lengths = batch.waveforms, batch.lengths
        assert waves.shape[0] == len(lengths) and waves.shape[1] == lengths.max()
        seen += len(lengths)
    assert batches == len(sampler) == 4 and seen == 6


def test_validate_manifest(tmp_path):
    manifest = read_manifest(make_corpus(tmp_path))
    good, skipped = validate_manifest(manifest)
    kept = {manifest.entries[i][0] for i in good}
    assert kept == {f"good{i}.wav" for i in range(6)} | {"nan.wav", "truncated.flac"}
    # the cheap header check cannot see NaN samples or a truncated FLAC body: AudioDataset skips those later
    names = {Path(p).name: reason for p, reason in skipped.items()}
    assert set(names) == {"empty.wav", "text.wav", "short.wav", "missing.wav"}
    assert "unreadable" in names["text.wav"] and "100 samples" in names["short.wav"]
    summary = format_skipped(skipped, len(manifest))
    assert summary.startswith("skipped 4 of 12 files:") and "missing.wav: no such file" in summary
    assert "and 2 more" in format_skipped(skipped, limit=2)
    assert format_skipped({}, 5) == "all 5 files usable"
    assert AudioDataset(manifest.subset(good)).manifest.entries[0] == ("good0.wav", 800)


def test_validate_warns_about_stale_lengths(tmp_path, caplog):
    path = make_corpus(tmp_path, bad=False)
    m = read_manifest(path)
    m.entries[0] = ("good0.wav", 5000)
    validate_manifest(m)
    assert "differ from the manifest" in caplog.text


def test_all_bad_manifest_raises_before_training(tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_text("text")
    sf.write(tmp_path / "audio" / "b.wav", np.zeros(10, np.float32), 16000)
    write_manifest(tmp_path / "bad.tsv", "audio", [("a.wav", 100), ("b.wav", 10), ("c.wav", 500)])
    with pytest.raises(ManifestError) as info:
        validate_manifest(tmp_path / "bad.tsv")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'bad.tsv'}: no usable audio, all 3 files are bad")
    for name in ("a.wav", "b.wav", "c.wav"):
        assert name in message


# --- LengthBucketSampler ----------------------------------------------------------------------

LENGTHS = [int(x) for x in np.random.default_rng(0).integers(400, 64000, size=203)]


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("kwargs", [dict(batch_size=8), dict(max_batch_samples=200000),
                                    dict(batch_size=6, max_batch_samples=150000), dict(batch_size=5, shuffle=False)])
def test_sampler_covers_each_index_once_and_respects_caps(kwargs):
    sampler = LengthBucketSampler(LENGTHS, **kwargs)
    for epoch in (0, 1):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
        for b in batches:
            if "batch_size" in kwargs:
                assert len(b) <= kwargs["batch_size"]
            if "max_batch_samples" in kwargs:
                assert len(b) * max(LENGTHS[i] for i in b) <= kwargs["max_batch_samples"]


def test_sampler_groups_similar_lengths():
    sampler = LengthBucketSampler(LENGTHS, batch_size=8, bucket_size=64)
    padded = sum(len(b) * max(LENGTHS[i] for i in b) for b in sampler)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(LENGTHS))
    random_padded = sum(len(c) * max(LENGTHS[i] for i in c) for c in np.array_split(order, len(order) // 8 + 1))
    assert padded < 0.8 * random_padded
    assert padded / sum(LENGTHS) < 1.15  # under 15% padding


def test_sampler_is_deterministic_per_seed_and_epoch():
    a = LengthBucketSampler(LENGTHS, batch_size=8, seed=5)
    b = LengthBucketSampler(LENGTHS, batch_size=8, seed=5)
    assert epoch_batches(a, 0) == epoch_batches(b, 0)
    assert epoch_batches(a, 3) == epoch_batches(b, 3)
    assert epoch_batches(a, 0) != epoch_batches(a, 1)  # reshuffled each epoch
    assert epoch_batches(a, 0) != epoch_batches(LengthBucketSampler(LENGTHS, batch_size=8, seed=6), 0)
    assert list(a) == list(a)  # iterating again repeats the epoch
    fixed = LengthBucketSampler(LENGTHS, batch_size=8, shuffle=False)
    assert epoch_batches(fixed, 0) == epoch_batches(fixed, 1)


def test_two_ranks_get_disjoint_equal_shards():
    total = len(LengthBucketSampler(LENGTHS, batch_size=7).global_batches(2))
    assert total % 2 == 1  # an odd batch count: the split must pad or drop
    for drop_last in (True, False):
        shards = [epoch_batches(LengthBucketSampler(LENGTHS, batch_size=7, num_replicas=2, rank=r,
                                                    drop_last=drop_last), 2) for r in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == (total // 2 if drop_last else total // 2 + 1)
        items = [[i for b in s for i in b] for s in shards]
        if drop_last:
            assert not set(items[0]) & set(items[1])
            assert len(set(items[0])) + len(set(items[1])) == len(items[0]) + len(items[1])
        else:
            # every index is seen; the only overlap is rank 1's padding batch, a repeat of batch 0
            assert set(items[0]) | set(items[1]) == set(range(len(LENGTHS)))
            assert shards[1][-1] == shards[0][0]
            assert set(items[0]) & set(items[1]) == set(shards[0][0])


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 5000), min_size=1, max_size=60), batch=st.integers(1, 9),
       replicas=st.integers(1, 4), seed=st.integers(0, 2 ** 32), epoch=st.integers(0, 5))
def test_sampler_shards_property(lengths, batch, replicas, seed, epoch):
    shards = [epoch_batches(LengthBucketSampler(lengths, batch_size=batch, seed=seed, num_replicas=replicas,
                                                rank=r), epoch) for r in range(replicas)]
    assert len({len(s) for s in shards}) == 1  # equal counts
    seen = Counter(i for s in shards for b in s for i in b)
    assert set(seen) == set(range(len(lengths)))  # padding repeats batches, never loses one
    dropped = [epoch_batches(LengthBucketSampler(lengths, batch_size=batch, seed=seed, num_replicas=replicas,
                                                 rank=r, drop_last=True), epoch) for r in range(replicas)]
    assert len({len(s) for s in dropped}) == 1
    assert max(Counter(i for s in dropped for b in s for i in b).values(), default=1) == 1  # disjoint


@pytest.mark.parametrize("replicas, rank", [(1, 0), (2, 1)])
def test_sampler_resumes_mid_epoch(replicas, rank):
    kwargs = dict(max_batch_samples=200000, seed=7, num_replicas=replicas, rank=rank)
    sampler = LengthBucketSampler(LENGTHS, **kwargs)
    sampler.set_epoch(4)
    expected = list(sampler)
    it = iter(sampler)
    head = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    assert state["epoch"] == 4 and state["yielded"] == 5

    resumed = LengthBucketSampler(LENGTHS, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # the trainer's loop sets the epoch again: the resume must survive it
    assert head + list(resumed) == expected
    assert list(resumed) == expected  # the next pass is a whole epoch again
    resumed.set_epoch(5)
    assert list(resumed) == epoch_batches(LengthBucketSampler(LENGTHS, **kwargs), 5)

    # a DataLoader's workers run ahead: the trainer says how many batches it really consumed
    consumed = LengthBucketSampler(LENGTHS, **kwargs)
    consumed.load_state_dict(sampler.state_dict(consumed=3))
    assert list(consumed) == expected[3:]


def test_resume_through_a_dataloader(tmp_path):
    ds = AudioDataset(make_corpus(tmp_path, bad=False), max_samples=4000, seed=2)
    sampler = LengthBucketSampler(ds.lengths, batch_size=2, seed=2)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    sampler.set_epoch(1)
    ds.set_epoch(1)
    full = [batch.waveforms for batch in loader]
    it = iter(loader)
    next(it)
    state = sampler.state_dict()
    sampler2 = LengthBucketSampler(ds.lengths, batch_size=2, seed=2)
    sampler2.load_state_dict(state)
    ds2 = AudioDataset(ds.manifest, max_samples=4000, seed=2)
    ds2.set_epoch(1)
    rest = [batch.waveforms for batch in DataLoader(ds2, batch_sampler=sampler2, collate_fn=collate)]
    assert len(rest) == len(full) - 1
    for a, b in zip(rest, full[1:]):
        torch.testing.assert_close(a, b)


def test_sampler_rejects_bad_settings_and_states():
    with pytest.raises(ValueError, match="batch_size, max_batch_samples"):
        LengthBucketSampler(LENGTHS)
    with pytest.raises(ValueError, match="longer than max_batch_samples=1000"):
        LengthBucketSampler([500, 2000], max_batch_samples=1000)
    with pytest.raises(ValueError, match="rank"):
        LengthBucketSampler(LENGTHS, batch_size=2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="non-empty"):
        LengthBucketSampler([], batch_size=2)
    state = LengthBucketSampler(LENGTHS, batch_size=4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        LengthBucketSampler(LENGTHS, batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batches"):
        LengthBucketSampler(LENGTHS, batch_size=8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_replicas"):
        LengthBucketSampler(LENGTHS, batch_size=4, seed=1, num_replicas=2).load_state_dict(state)


# --- the committed demo corpus ----------------------------------------------------------------

def test_demo_corpus_reads_at_16k():
    train, valid = read_manifest(CORPUS / "train.tsv"), read_manifest(CORPUS / "valid.tsv")
    assert train.root == valid.root == CORPUS / "audio"
    assert len(train) >= 200 and len(valid) >= 20
    for manifest in (train, valid):
        good, skipped = validate_manifest(manifest)
        assert not skipped and len(good) == len(manifest)
        for i, (rel, n) in enumerate(manifest.entries):
            info = sf.info(str(manifest.path(i)))
            assert (info.samplerate, info.channels, info.frames) == (16000, 1, n), rel
            assert load_audio(manifest.path(i)).shape == (n,)

    with open(CORPUS / "transcripts.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert list(rows[0]) == ["id", "voice", "text", "phones"]
    by_id = {r["id"]: r for r in rows}
    ids = lambda m: {Path(rel).stem for rel, _ in m.entries}  # noqa: E731
    assert ids(train) | ids(valid) == set(by_id) and not ids(train) & ids(valid)
    assert all(r["text"] and r["phones"].split() for r in rows)
    # split by sentence: no valid sentence is heard in training
    assert not {by_id[i]["text"] for i in ids(train)} & {by_id[i]["text"] for i in ids(valid)}
    assert len({r["voice"] for r in rows}) >= 4
