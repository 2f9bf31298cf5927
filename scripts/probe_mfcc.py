"""The phone probe on MFCC features instead of an encoder: the reference point for what the demo
teacher learned (its targets are k-means clusters of these features).

    python scripts/probe_mfcc.py [--corpus data/demo_corpus] [--steps 1000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prune.train.audio import load_audio
from prune.train.manifest import read_manifest
from prune.train.probe import fit_probe, phone_vocab, read_phones
from prune.train.targets import mfcc_features


def features(corpus: Path, split: str, phones):
    """(1, frames, 39) MFCC features (one "layer") and the phones of every file with a transcript."""
    manifest = read_manifest(corpus / f"{split}.tsv")
    return [(mfcc_features(load_audio(manifest.path(i)))[None], phones[Path(rel).stem])
            for i, (rel, _) in enumerate(manifest.entries) if Path(rel).stem in phones]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("data/demo_corpus"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    phones = read_phones(args.corpus / "transcripts.tsv")
    result = fit_probe(features(args.corpus, "train", phones), features(args.corpus, "valid", phones),
                       phone_vocab(phones), steps=args.steps)
    print(f"phone probe on MFCC + deltas ({args.corpus}, {args.steps} steps): "
          f"PER train {result['train_per']:.3f}, valid {result['valid_per']:.3f}")


if __name__ == "__main__":
    main()
