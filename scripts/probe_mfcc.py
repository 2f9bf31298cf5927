"""The phone probe on MFCC features instead of an encoder: the reference point for what the demo
teacher learned (its targets are k-means clusters of these features).

    python scripts/probe_mfcc.py [--corpus data/demo_corpus] [--steps 1000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prune.evaluate.probe import fit_probe, phone_vocab, read_phones, utterance_features
from prune.pretrain.clusters import mfcc_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("data/demo_corpus"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    phones = read_phones(args.corpus / "transcripts.tsv")
    def featurize(wave):  # the MFCCs as one "layer": (1, frames, 39)
        return mfcc_features(wave)[None]

    train, valid = (utterance_features(featurize, args.corpus / f"{split}.tsv", phones) for split in ("train", "valid"))
    result = fit_probe(train, valid, phone_vocab(phones), steps=args.steps)
    print(f"phone probe on MFCC + deltas ({args.corpus}, {args.steps} steps): "
          f"PER train {result['train_per']:.3f}, valid {result['valid_per']:.3f}")


if __name__ == "__main__":
    main()
