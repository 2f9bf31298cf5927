"""The phone-recognition probe: CTC training, greedy decoding and PER, end to end."""

import re
import subprocess
import sys

import pytest
import torch
from helpers_train import DEMO_CORPUS, REPO, demo_corpus_split

from prune.models import build_preset
from prune.evaluate.probe import edit_distance, fit_probe, greedy_decode, phone_probe, read_phones


def test_edit_distance_and_greedy_decoding():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], [1, 2]) == 2 and edit_distance([1, 2], [1, 2]) == 0
    frames = torch.log_softmax(torch.tensor([[0, 5, 0], [0, 5, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5], [0, 0, 5.0]]), -1)
    assert greedy_decode(frames, 6) == [1, 1, 2]  # a blank separates the two 1s; repeats merge
    assert greedy_decode(frames, 2) == [1]


def test_probe_learns_decodable_features():
    """Features that encode the phone of each frame (3 frames per phone, noise added): the probe
    must reach a near-zero PER, while noise alone cannot get far below 1."""
    g = torch.Generator().manual_seed(0)
    vocab = {p: k + 1 for k, p in enumerate("abcdef")}

    def utterance(informative: bool):
        ids = [int(torch.randint(0, 6, (1,), generator=g))]
        while len(ids) < 8:  # no phone twice in a row: without a blank frame between, CTC merges them
            k = int(torch.randint(0, 6, (1,), generator=g))
            if k != ids[-1]:
                ids.append(k)
        seq = [list(vocab)[i] for i in ids]
        frames = torch.tensor([vocab[p] for p in seq]).repeat_interleave(3)
        x = torch.randn(2, len(frames), 16, generator=g) * 0.3
        if informative:
            x[1, torch.arange(len(frames)), frames] += 3.0  # layer 1 knows the phone, layer 0 does not
        return x, seq

    good = fit_probe([utterance(True) for _ in range(40)], [utterance(True) for _ in range(10)], vocab,
                     steps=300, lr=1e-2)
    noise = fit_probe([utterance(False) for _ in range(40)], [utterance(False) for _ in range(10)], vocab,
                      steps=300, lr=1e-2)
    assert good["final_ctc_loss"] < good["first_ctc_loss"] / 5
    assert good["valid_per"] < 0.05
    assert noise["valid_per"] > 0.6


@pytest.mark.skipif(not (DEMO_CORPUS / "transcripts.tsv").exists(), reason="no demo corpus")
def test_probe_runs_on_the_demo_corpus():
    phones = read_phones(DEMO_CORPUS / "transcripts.tsv")
    assert len(phones) == 280 and all(phones.values())
    result = phone_probe(build_preset("hubert_base_tiny"), DEMO_CORPUS, steps=20)
    assert result["train_files"] == 252 and result["valid_files"] == 28
    assert 0.0 <= result["valid_per"] <= 1.5 and result["final_ctc_loss"] < result["first_ctc_loss"]


@pytest.mark.skipif(not (DEMO_CORPUS / "transcripts.tsv").exists(), reason="no demo corpus")
def test_mfcc_baseline_script_runs(tmp_path):
    corpus = demo_corpus_split(tmp_path / "corpus", n_train=20)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "probe_mfcc.py"), "--corpus", str(corpus),
                             "--steps", "200"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    valid = float(re.search(r"valid (\S+)$", result.stdout.strip()).group(1))
    assert valid < 0.9  # MFCCs carry the phones: far below the random-encoder floor even from 20 files
