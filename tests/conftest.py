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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny problems: a second OpenMP thread only adds synchronisation (badly so
    on a busy machine). Restored afterwards. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compile_fails(monkeypatch):
    """``elbolab.evaluate`` on a machine where torch.compile fails: the compiled function raises on its first call,
    as inductor does without a working C++ compiler. The message the error carries is returned."""
    import elbolab.evaluate as evaluate

    message = "InvalidCxxCompiler: no working C++ compiler found"

    def broken_compile(fn, **options):
        def compiled(*args):
            raise RuntimeError(message)
        return compiled

    monkeypatch.setattr(evaluate, "_compile", broken_compile)
    return message
