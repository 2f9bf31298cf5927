#!/usr/bin/env python
"""Synthesise the small demo speech corpus in data/demo_corpus/ with espeak-ng.

    python scripts/make_demo_corpus.py [--out data/demo_corpus] [--sentences 280] [--seed 0] [--overwrite]

Needs the ``espeak-ng`` binary (Debian: ``apt-get install espeak-ng``) only to *make* the corpus;
the corpus is committed, and nothing that reads it needs espeak-ng.

Sentences are generated from a small grammar and vocabulary (below), each spoken once by one
of several voices at a slightly varied speed and pitch. espeak-ng's 22.05 kHz output is
trimmed, resampled to 16 kHz with ``prune.data.audio.resample`` and written as FLAC. For each
utterance the text and espeak-ng's IPA phone transcript are kept (``transcripts.tsv``), for
phone-recognition probes. Sentences are split 90/10 into train/valid, so valid sentences are
unseen in training. Everything is deterministic given ``--seed`` and the espeak-ng version.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import soundfile as sf
import torch

from prune.data.audio import SAMPLE_RATE, resample
from prune.data.manifest import write_manifest

VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb+m3", "en-gb-x-rp+f4"]
SPEED_WPM = (150, 195)  # espeak-ng default 175
PITCH = (38, 62)  # espeak-ng default 50
VALID_FRACTION = 0.1
MARGIN_S = 0.05  # silence kept before and after the speech when trimming
# Samples are rounded to 12 bits and stored as 16-bit FLAC, whose encoder drops the 4 always-zero
# low bits: ~35% smaller files, and the quantisation noise (about -77 dBFS) is far below the speech.
BITS = 12
# stress marks are not phones; espeak-ng 1.51 writes some Scottish long vowels with an ASCII ':'
IPA_FIXES = str.maketrans({"ˈ": None, "ˌ": None, ":": "ː"})

# --- grammar -------------------------------------------------------------------------------
NOUNS = ["dog", "cat", "farmer", "teacher", "river", "window", "garden", "bottle", "letter", "kitchen",
         "mountain", "doctor", "child", "bird", "apple", "engine", "table", "bridge", "market", "ship",
         "horse", "road", "lamp", "basket", "blanket", "island", "pencil", "village", "storm", "clock",
         "sailor", "painter", "violin", "forest", "wagon", "castle", "orange", "jacket", "museum", "rabbit"]
PLURALS = ["dogs", "cats", "apples", "letters", "boxes", "candles", "bottles", "flowers", "stones",
           "children", "feathers", "oranges", "pencils", "shoes", "wolves", "keys"]
ADJECTIVES = ["old", "small", "quiet", "bright", "heavy", "green", "yellow", "broken", "happy", "cold",
              "narrow", "ancient", "purple", "tired", "careful", "gentle", "noisy", "empty", "strange",
              "wooden", "silver", "hungry", "muddy", "clever"]
VERBS = [("find", "found"), ("carry", "carried"), ("paint", "painted"), ("open", "opened"),
         ("wash", "washed"), ("watch", "watched"), ("drop", "dropped"), ("follow", "followed"),
         ("clean", "cleaned"), ("repair", "repaired"), ("visit", "visited"), ("push", "pushed"),
         ("borrow", "borrowed"), ("catch", "caught"), ("build", "built"), ("bring", "brought"),
         ("sell", "sold"), ("hide", "hid"), ("throw", "threw"), ("measure", "measured")]
INTRANSITIVE = ["slept", "waited", "laughed", "arrived", "vanished", "shouted", "jumped", "listened",
                "rested", "whispered", "danced", "stumbled"]
PREPOSITIONS = ["near", "under", "behind", "beside", "across", "inside", "above", "along", "toward"]
ADVERBS = ["quickly", "slowly", "yesterday", "again", "today", "silently", "early", "twice", "happily"]
NAMES = ["Anna", "Peter", "Maria", "Thomas", "Lucy", "George", "Sarah", "David", "Emma", "Oliver"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
QUESTION_WORDS = ["where", "why", "when", "how"]


def _np(r: random.Random) -> List[str]:
    """A noun phrase: the/a, maybe an adjective, a noun."""
    words = [r.choice(["the", "the", "a", "my", "this"])]
    if r.random() < 0.5:
        words.append(r.choice(ADJECTIVES))
    words.append(r.choice(NOUNS))
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return words


def _tail(r: random.Random) -> List[str]:
    words = []
    if r.random() < 0.35:
        words += [r.choice(PREPOSITIONS)] + _np(r)
    if r.random() < 0.3:
        words.append(r.choice(ADVERBS))
    return words


def sentence(r: random.Random) -> str:
    kind = r.randrange(7)
    if kind == 0:
        words = _np(r) + [r.choice(VERBS)[1]] + _np(r) + _tail(r)
    elif kind == 1:
        words = _np(r) + [r.choice(INTRANSITIVE)] + _tail(r)
    elif kind == 2:
        words = ["did"] + _np(r) + [r.choice(VERBS)[0]] + _np(r) + ["?"]
    elif kind == 3:
        words = [r.choice(QUESTION_WORDS), "did", r.choice(NAMES), r.choice(VERBS)[0]] + _np(r) + ["?"]
    elif kind == 4:
        words = [r.choice(["please", "now", "quickly"]), r.choice(VERBS)[0]] + _np(r) + _tail(r)
    elif kind == 5:
        words = [r.choice(NAMES), r.choice(VERBS)[1], r.choice(NUMBERS)]
        words += ([r.choice(ADJECTIVES)] if r.random() < 0.5 else []) + [r.choice(PLURALS)] + _tail(r)
    else:
        words = [r.choice(NAMES), "said", "that"] + _np(r) + ["was", r.choice(ADJECTIVES)]
    text = " ".join(words).replace(" ?", "?")
    end = "" if text.endswith("?") else "."
    return text[0].upper() + text[1:] + end


def make_sentences(n: int, seed: int) -> List[str]:
    """``n`` distinct sentences of 3-10 words, deterministic given ``seed``."""
    r = random.Random(seed)
    seen: Dict[str, None] = {}  # insertion-ordered set
    while len(seen) < n:
        s = sentence(r)
        if 3 <= len(s.split()) <= 10:
            seen.setdefault(s)
    return list(seen)


# --- espeak-ng -----------------------------------------------------------------------------
def espeak(args: List[str]) -> bytes:
    try:
        return subprocess.run(["espeak-ng", *args], check=True, capture_output=True).stdout
    except FileNotFoundError:
        sys.exit("espeak-ng not found: install it (Debian: apt-get install espeak-ng) to make the corpus")


def phones(text: str, voice: str) -> List[str]:
    """espeak-ng's IPA transcript of ``text`` in ``voice``, as phone tokens (stress marks dropped,
    ASCII ':' normalised to the IPA length mark).
    ``--sep=_`` separates the phones within a word (multi-letter phones like 'aʊ', 'dʒ', 'ɑː'
    stay whole); words are separated by spaces."""
    ipa = espeak(["-q", "-v", voice, "--ipa", "--sep=_", text]).decode("utf-8")
    tokens = [t.translate(IPA_FIXES) for t in re.split(r"[\s_]+", ipa)]
    return [t for t in tokens if t]


def synthesise(text: str, voice: str, speed: int, pitch: int, tmp: Path) -> np.ndarray:
    """Speech for ``text`` at 16 kHz: (samples,) float32, leading/trailing silence trimmed."""
    wav = tmp / "utt.wav"
    espeak(["-v", voice, "-s", str(speed), "-p", str(pitch), "-z", "-w", str(wav), text])
    audio, sr = sf.read(str(wav), dtype="float32")
    loud = np.nonzero(np.abs(audio) > 0.01 * np.abs(audio).max())[0]
    margin = int(MARGIN_S * sr)
    audio = audio[max(0, loud[0] - margin):loud[-1] + margin]
    return resample(torch.from_numpy(np.ascontiguousarray(audio)), sr, SAMPLE_RATE).numpy()


def quantise(audio: np.ndarray, bits: int = BITS) -> np.ndarray:
    """(samples,) float in [-1, 1] -> int16 samples that are multiples of 2**(16 - bits)."""
    levels = 1 << (bits - 1)
    ints = np.clip(np.round(audio * levels), -levels, levels - 1).astype(np.int16)
    return ints * np.int16(1 << (16 - bits))


def espeak_version() -> str:
    out = espeak(["--version"]).decode().strip()
    m = re.search(r"text-to-speech: (\S+)", out)
    return m.group(1) if m else out


# --- corpus --------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo_corpus"))
    parser.add_argument("--sentences", type=int, default=280)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing corpus")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny convolutions: threads only add overhead

    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            sys.exit(f"{out} is not empty: pass --overwrite to replace it")
        shutil.rmtree(out)
    (out / "audio").mkdir(parents=True)

    sentences = make_sentences(args.sentences, args.seed)
    r = random.Random(args.seed + 1)
    # voices cycle in a shuffled order, so every voice speaks about the same number of sentences
    voices = [VOICES[i % len(VOICES)] for i in range(len(sentences))]
    r.shuffle(voices)
    valid = set(r.sample(range(len(sentences)), round(VALID_FRACTION * len(sentences))))

    train_entries: List[Tuple[str, int]] = []
    valid_entries: List[Tuple[str, int]] = []
    rows = ["id\tvoice\ttext\tphones"]
    per_voice: Counter = Counter()
    seconds: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (text, voice) in enumerate(zip(sentences, voices)):
            speed, pitch = r.randint(*SPEED_WPM), r.randint(*PITCH)
            uid = f"{i:04d}_{voice.replace('+', '-')}"
            audio = synthesise(text, voice, speed, pitch, Path(tmp))
            sf.write(str(out / "audio" / f"{uid}.flac"), quantise(audio), SAMPLE_RATE, subtype="PCM_16",
                     compression_level=1.0)
            (valid_entries if i in valid else train_entries).append((f"{uid}.flac", len(audio)))
            rows.append(f"{uid}\t{voice}\t{text}\t{' '.join(phones(text, voice))}")
            per_voice[voice] += 1
            seconds[voice] += len(audio) / SAMPLE_RATE
            if (i + 1) % 50 == 0:
                print(f"{i + 1}/{len(sentences)}", flush=True)

    write_manifest(out / "train.tsv", "audio", train_entries)
    write_manifest(out / "valid.tsv", "audio", valid_entries)
    (out / "transcripts.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in (out / "audio").iterdir())
    phone_set = sorted({p for row in rows[1:] for p in row.split("\t")[3].split()})
    write_readme(out, args, per_voice, seconds, len(train_entries), len(valid_entries), size, phone_set)
    total = sum(seconds.values())
    print(f"{len(sentences)} utterances, {total / 60:.1f} min, {size / 1e6:.1f} MB of FLAC in {out}")
    return 0


def write_readme(out: Path, args, per_voice: Counter, seconds: Counter, n_train: int, n_valid: int,
                 size: int, phone_set: List[str]) -> None:
    total = sum(seconds.values())
    n = sum(per_voice.values())
    command = "python scripts/make_demo_corpus.py"
    if args.out != Path("data/demo_corpus"):
        command += f" --out {args.out}"
    command += f" --sentences {args.sentences} --seed {args.seed} --overwrite"
    voice_rows = "\n".join(f"| `{v}` | {per_voice[v]} | {seconds[v]:.1f} |" for v in VOICES)
    text = f"""# Demo speech corpus (synthetic)

{n} short English utterances synthesised with espeak-ng {espeak_version()}, for demos, smoke
tests and small probes of `prune` training. It is synthetic speech: useful to check that the
pipeline runs and that a model learns something, not to measure real-world accuracy.

Made by (from the repository root, with `espeak-ng` installed):

```
{command}
```

The output is deterministic for a given espeak-ng version.

## Contents

- `audio/<id>.flac`: 16 kHz mono FLAC, leading/trailing silence trimmed to {MARGIN_S * 1000:.0f} ms.
  Samples have {BITS}-bit precision stored as 16-bit (FLAC drops the unused low bits), to keep
  the corpus small.
- `train.tsv` ({n_train} utterances), `valid.tsv` ({n_valid}): manifests for `prune.data.manifest`
  (root line `audio`, then `file<TAB>samples`). The split is by sentence: no valid sentence
  occurs in train.
- `transcripts.tsv`: a header line, then `id<TAB>voice<TAB>text<TAB>phones` per utterance.
  `phones` is espeak-ng's IPA transcript for that voice
  (`espeak-ng -q -v VOICE --ipa --sep=_ TEXT`) as space-separated phone tokens: stress marks
  removed, the ASCII `:` espeak-ng writes in a few Scottish vowels normalised to `ː`,
  multi-letter phones (`aʊ`, `dʒ`, `ɑː`) kept as one token. The transcript follows the
  voice's accent, so a word can differ across voices. {len(phone_set)} distinct phones occur.

```python
from prune.data.dataset import AudioDataset
dataset = AudioDataset("data/demo_corpus/train.tsv", max_samples=32000)
```

## Statistics

- utterances: {n} ({n_train} train, {n_valid} valid), each sentence spoken once
- total duration: {total:.1f} s ({total / 60:.1f} min), mean {total / n:.2f} s per utterance
- audio size: {size / 1e6:.2f} MB
- sentences: 3-10 words from a small grammar and vocabulary (in `scripts/make_demo_corpus.py`),
  seed {args.seed}
- speed {SPEED_WPM[0]}-{SPEED_WPM[1]} words/min and pitch {PITCH[0]}-{PITCH[1]} (espeak-ng `-s`, `-p`),
  drawn per utterance

| voice | utterances | seconds |
|---|---|---|
{voice_rows}

Phones: {' '.join(phone_set)}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
