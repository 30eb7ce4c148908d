import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when pytest and torchrun subprocesses run side by side.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def small_npy(tmp_path):
    """A small [0, 1] dataset on disk, with an even number of training rows (for the DDP equivalence test)."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "small.npy"
    np.save(path, rng.random((400, 16)).astype("float32"))
    return path
