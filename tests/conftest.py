import pytest
import torch

from prune.models import PRESETS

TINY = sorted(n for n in PRESETS if n.endswith("_tiny"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
