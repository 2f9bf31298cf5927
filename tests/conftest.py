import pytest
import torch

from prune.models import PRESETS

TINY = sorted(n for n in PRESETS if n.endswith("_tiny"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def batch():
    """A padded batch of two utterances: 1 s and 0.69 s (waveforms, lengths)."""
    return torch.randn(2, 16000), torch.tensor([16000, 11000])
