"""Training data: a dataset of random crops, a padding collate, and a length-bucketing batch
sampler that shards across ranks and resumes mid-epoch.

Typical use::

    manifest = read_manifest("train.tsv")
    good, skipped = validate_manifest(manifest)        # raises if nothing is usable
    print(format_skipped(skipped, len(manifest)))
    dataset = AudioDataset(manifest.subset(good), max_samples=64000)
    sampler = LengthBucketSampler(dataset.lengths, batch_size=8, num_replicas=world, rank=rank)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    for epoch in ...:
        sampler.set_epoch(epoch); dataset.set_epoch(epoch)   # before iter(loader)
        for batch in loader:
            if batch is None: continue                        # every file in it was bad
            hiddens, frames = model(batch.waveforms, batch.lengths)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import soundfile as sf
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .audio import MIN_SAMPLES, SAMPLE_RATE, AudioError, load_audio
from .manifest import Manifest, ManifestError, audio_length, read_manifest

log = logging.getLogger(__name__)

class Batch(NamedTuple):
    """A padded batch. ``labels`` and ``ids`` are for objectives and tools that need them (None
    when the data has none): per-frame or per-utterance targets, and the utterances' names."""

    waveforms: Tensor  # (batch, samples) float32, zero-padded to the longest
    lengths: Tensor  # (batch,) long: valid samples of each row
    labels: Optional[Tensor] = None  # (batch, ...) e.g. (batch, frames) frame labels
    ids: Optional[List[str]] = None  # (batch,) e.g. manifest paths

    def to(self, device: Union[torch.device, str]) -> "Batch":
        """The batch with its tensors on ``device``."""
        return self._replace(waveforms=self.waveforms.to(device), lengths=self.lengths.to(device),
                             labels=None if self.labels is None else self.labels.to(device))


def _as_manifest(manifest: Union[Manifest, str, Path]) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else read_manifest(manifest)


def _check_seed(seed: int) -> int:
    # numpy's SeedSequence, which mixes (seed, epoch, index), takes non-negative integers only
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


class AudioDataset(Dataset):
    """The files of a manifest as mono 16 kHz waveforms, randomly cropped to ``max_samples``.

    ``dataset[i]`` is a waveform (Tensor, shape (samples,), float32), or ``None`` when file ``i``
    cannot be used: a bad file must not kill a long run. The reason is kept in
    ``self.skipped`` (path -> reason) and logged once; ``collate`` drops the ``None``.

    The crop offset (and ``augment``'s draws) come from a generator seeded by ``(seed, epoch, index)``, so a resumed run
    reads exactly the crops the interrupted one would have. Call ``set_epoch`` before creating
    the DataLoader iterator: workers get a copy of the dataset at that moment (so with
    ``persistent_workers=True`` a later ``set_epoch`` does not reach them), and each worker fills
    its own copy of ``skipped``; the log lines are the record across processes.
    """

    def __init__(self, manifest: Union[Manifest, str, Path], max_samples: Optional[int] = None,
                 min_samples: int = MIN_SAMPLES, seed: int = 0, sample_rate: int = SAMPLE_RATE,
                 augment: Optional[Callable[[Tensor, int, int, int], Tensor]] = None):
        self.augment = augment  # (wave, seed, epoch, index) -> wave, after the crop (prune.data.augment.Augmenter)
        self.manifest = _as_manifest(manifest)
        if max_samples is not None and max_samples < max(min_samples, 1):
            raise ValueError(f"max_samples={max_samples} is below min_samples={min_samples}")
        self.max_samples = max_samples
        self.min_samples = min_samples
        self.seed = _check_seed(seed)
        self.sample_rate = sample_rate
        self.epoch = 0
        self.skipped: Dict[str, str] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_seed(epoch)

    def batch(self, indices: Sequence[int]) -> Optional[Batch]:
        """The items at ``indices`` collated, with their utterance ids (None: none usable)."""
        return collate([self[i] for i in indices], [self.manifest.utterance_id(i) for i in indices])

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def lengths(self) -> List[int]:
        """Each item's length after cropping, per the manifest: what a batch sampler should group on."""
        cap = self.max_samples
        return [n if cap is None else min(n, cap) for n in self.manifest.lengths]

    def crop_offset(self, index: int, num_samples: int) -> int:
        """Start of the crop of item ``index`` (``num_samples`` long) in the current epoch."""
        if self.max_samples is None or num_samples <= self.max_samples:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(rng.integers(0, num_samples - self.max_samples + 1))

    def __getitem__(self, index: int) -> Optional[Tensor]:
        path = self.manifest.path(index)
        try:
            wave = load_audio(path, self.sample_rate, self.min_samples)
        except AudioError as e:
            if str(path) not in self.skipped:
                log.warning("skipping %s", e)
            self.skipped[str(path)] = e.reason
            return None
        offset = self.crop_offset(index, wave.numel())
        if self.max_samples is not None and wave.numel() > self.max_samples:
            # clone: a view would keep (and send between processes) the whole file's storage
            wave = wave[offset:offset + self.max_samples].clone()
        if self.augment is not None:
            wave = self.augment(wave, self.seed, self.epoch, index)
        return wave


def collate(items: Sequence[Optional[Tensor]], ids: Optional[Sequence[str]] = None) -> Optional[Batch]:
    """Zero-pad waveforms into a batch, dropping ``None`` (unusable files).

    Args:
        items: waveforms (Tensor, shape (samples,)) or ``None``.
        ids: the items' utterance ids (``Manifest.utterance_id``), if the batch should carry them.
    Returns:
        a ``Batch``: waveforms (Tensor, shape (B, S), float32, zero-padded to the longest S),
        lengths (Tensor, shape (B,), long), ids of the kept items (or None); ``None`` if no item is left.
    """
    waves = [w for w in items if w is not None]
    if not waves:
        return None
    kept_ids = None if ids is None else [i for w, i in zip(items, ids) if w is not None]
    lengths = torch.tensor([w.numel() for w in waves], dtype=torch.long)
    waveforms = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
    for row, w in zip(waveforms, waves):
        row[:w.numel()] = w
    return Batch(waveforms, lengths, ids=kept_ids)


def validate_manifest(manifest: Union[Manifest, str, Path], min_samples: int = MIN_SAMPLES,
                      ) -> Tuple[List[int], Dict[str, str]]:
    """Check every file cheaply before training (exists, header readable by ``soundfile.info``,
    at least ``min_samples`` samples at 16 kHz); no audio is decoded, so a file corrupt past its
    header is only caught at train time (where ``AudioDataset`` skips it).

    Returns ``(good_indices, skipped)``, skipped mapping path -> reason. Raises ``ManifestError``
    if no file is usable.
    """
    manifest = _as_manifest(manifest)
    good: List[int] = []
    skipped: Dict[str, str] = {}
    stale = 0
    for i, (_, declared) in enumerate(manifest.entries):
        path = manifest.path(i)
        if not path.is_file():
            skipped[str(path)] = "no such file"
            continue
        if path.stat().st_size == 0:
            skipped[str(path)] = "empty file (0 bytes)"
            continue
        try:
            n = audio_length(path)
        except (sf.SoundFileError, RuntimeError, ValueError, OSError) as e:
            skipped[str(path)] = f"unreadable: {e}"
            continue
        if n < max(min_samples, 1):
            skipped[str(path)] = f"{n} samples at {SAMPLE_RATE} Hz, fewer than min_samples={min_samples}"
            continue
        stale += abs(n - declared) > 1
        good.append(i)
    if stale:
        log.warning("%s: %d files' lengths differ from the manifest's (stale manifest?)", manifest, stale)
    if not good:
        raise ManifestError(f"{manifest}: no usable audio, all {len(manifest)} files are bad\n"
                            + format_skipped(skipped, len(manifest)))
    return good, skipped


def format_skipped(skipped: Dict[str, str], total: Optional[int] = None, limit: int = 10) -> str:
    """A short human summary of ``skipped`` (path -> reason), at most ``limit`` files listed."""
    if not skipped:
        return "no files skipped" if total is None else f"all {total} files usable"
    of = "" if total is None else f" of {total}"
    lines = [f"skipped {len(skipped)}{of} files:"]
    lines += [f"  {path}: {reason}" for path, reason in list(skipped.items())[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


def pack_sorted(indices: Sequence[int], lengths: Sequence[int], batch_size: Optional[int] = None,
                max_batch_samples: Optional[int] = None) -> List[List[int]]:
    """``indices`` (sorted by length) -> consecutive batches of at most ``batch_size`` items and at
    most ``max_batch_samples`` padded samples (items x longest item); an item longer than that cap
    is a batch of its own."""
    batches: List[List[int]] = []
    current: List[int] = []
    longest = 0
    for i in indices:
        n = int(lengths[i])
        full = batch_size is not None and len(current) >= batch_size
        over = max_batch_samples is not None and (len(current) + 1) * max(longest, n) > max_batch_samples
        if current and (full or over):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


class LengthBucketSampler(Sampler[List[int]]):
    """Batches of similar lengths, deterministic given ``(seed, epoch)``, sharded across ranks,
    resumable mid-epoch.

    Each epoch: shuffle the indices, cut them into buckets of ``bucket_size``, sort each bucket by
    length and cut it into batches (at most ``batch_size`` items and/or at most
    ``max_batch_samples`` padded samples, i.e. items x longest item), then shuffle the batch
    order. Without ``shuffle`` the batches run in length order and are the same every epoch.

    Rank ``r`` of ``num_replicas`` gets batches ``r, r + num_replicas, ...`` of that list, so ranks
    are disjoint and all get the same count: the batch list is first padded by repeating batches
    from its start (those repeated items are seen twice), or with ``drop_last`` cut to a multiple
    of ``num_replicas`` (those items are not seen this epoch).

    ``state_dict()`` records (epoch, batches yielded); after ``load_state_dict`` the next
    iteration yields exactly the remaining batches of that epoch, then iterations are whole again.
    A DataLoader with workers draws batches ahead of training: pass the number of batches the
    training loop actually consumed, ``state_dict(consumed=k)``.
    """

    def __init__(self, lengths: Sequence[int], batch_size: Optional[int] = None,
                 max_batch_samples: Optional[int] = None, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, drop_last: bool = False,
                 bucket_size: Optional[int] = None):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("LengthBucketSampler needs a non-empty list of lengths")
        if (self.lengths < 0).any():
            raise ValueError(f"negative length at index {int(np.argmax(self.lengths < 0))}")
        if batch_size is None and max_batch_samples is None:
            raise ValueError("give batch_size, max_batch_samples, or both")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_batch_samples is not None:
            too_long = np.nonzero(self.lengths > max_batch_samples)[0]
            if len(too_long):
                i = int(too_long[0])
                raise ValueError(f"{len(too_long)} items are longer than max_batch_samples={max_batch_samples}, "
                                 f"e.g. index {i} ({int(self.lengths[i])} samples): crop them (max_samples) first")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.batch_size = batch_size
        self.max_batch_samples = max_batch_samples
        self.shuffle = shuffle
        self.seed = _check_seed(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        if bucket_size is None:
            # ~16 batches a bucket: enough to sort away most padding, few enough that batches
            # are composed differently each epoch
            per_batch = batch_size or max(1, max_batch_samples // max(1, int(np.mean(self.lengths))))
            bucket_size = 16 * per_batch
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be at least 1, got {bucket_size}")
        self.bucket_size = bucket_size
        self.epoch = 0
        self._yielded = 0  # batches handed out so far this epoch (for state_dict)
        self._resume = 0  # batches the next iteration skips (set by load_state_dict, used once)
        self._cache: Optional[Tuple[int, List[List[int]]]] = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle. Setting the epoch already current keeps a pending resume,
        so ``load_state_dict(...); set_epoch(saved_epoch)`` still resumes mid-epoch."""
        epoch = _check_seed(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self._yielded = self._resume = 0

    def _split(self, bucket: np.ndarray) -> List[List[int]]:
        """bucket: indices sorted by length -> consecutive batches within the caps."""
        return pack_sorted(bucket.tolist(), self.lengths, self.batch_size, self.max_batch_samples)

    def global_batches(self, epoch: int) -> List[List[int]]:
        """All ranks' batches of ``epoch``, before padding/dropping for the rank split."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        if self.shuffle:
            order = rng.permutation(n)
            buckets = [order[i:i + self.bucket_size] for i in range(0, n, self.bucket_size)]
        else:
            buckets = [np.arange(n)]
        batches: List[List[int]] = []
        for bucket in buckets:
            # stable sort: ties keep the shuffled order, so equal lengths still mix across epochs
            batches += self._split(bucket[np.argsort(self.lengths[bucket], kind="stable")])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _rank_batches(self) -> List[List[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            batches = self.global_batches(self.epoch)
            r, total = self.num_replicas, len(batches)
            if total % r:
                if self.drop_last:
                    batches = batches[:total - total % r]
                else:
                    batches = batches + [batches[i % total] for i in range(r - total % r)]
            self._cache = (self.epoch, batches[self.rank::r])
        return self._cache[1]

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch (a resumed iteration yields fewer)."""
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[List[int]]:
        batches = self._rank_batches()
        start, self._resume = self._resume, 0
        self._yielded = start
        for batch in batches[start:]:
            self._yielded += 1
            yield list(batch)  # a copy: the caller may mutate it

    def state_dict(self, consumed: Optional[int] = None) -> Dict[str, Any]:
        """``consumed``: batches of this epoch actually trained on, if fewer than were yielded."""
        yielded = self._yielded if consumed is None else consumed
        return {"epoch": self.epoch, "yielded": int(yielded), "seed": self.seed,
                "num_replicas": self.num_replicas, "num_batches": len(self)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("seed", "num_replicas"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]} but this sampler has "
                                 f"{key}={getattr(self, key)}: the batches would differ, cannot resume")
        self.epoch = _check_seed(state["epoch"])
        count = len(self)
        if "num_batches" in state and state["num_batches"] != count:
            raise ValueError(f"sampler state has {state['num_batches']} batches in epoch {self.epoch}, "
                             f"this sampler {count}: the dataset or batch settings changed, cannot resume")
        yielded = int(state["yielded"])
        if not 0 <= yielded <= count:
            raise ValueError(f"sampler state yielded={yielded} is outside [0, {count}]")
        self._yielded = self._resume = yielded
