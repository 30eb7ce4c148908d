import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when pytest and torchrun subprocesses run side by side.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# The busy-machine warning (pipeline.warn_if_cores_busy) follows the load: off, so that no test depends on it;
# tests/test_cli_progress.py switches it on where it is the subject.
os.environ["ELBOLAB_BUSY_WARNING"] = "0"


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
    """``elbolab.estimators`` on a machine where torch.compile fails: the compiled function raises on its first
    call, as inductor does without a working C++ compiler. The message the error carries is returned."""
    import elbolab.estimators as estimators

    message = "InvalidCxxCompiler: no working C++ compiler found"

    def broken_compile(fn, **options):
        def compiled(*args):
            raise RuntimeError(message)
        return compiled

    monkeypatch.setattr(estimators, "_compile", broken_compile)
    return message


def write_bow_corpus(folder, n_train=60, n_test=20, vocabulary=12, seed=0):
    """Documents from two planted topics over ``vocabulary`` words (ids from 1), in the 20news format."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.new").write_text("".join(f"word{j} 0\n" for j in range(vocabulary)))
    rng = np.random.default_rng(seed)
    half = vocabulary // 2
    topic = np.stack([np.r_[np.full(half, 2.0), np.full(vocabulary - half, 0.1)],
                      np.r_[np.full(half, 0.1), np.full(vocabulary - half, 2.0)]])
    for name, n in (("train.feat", n_train), ("test.feat", n_test)):
        lines = []
        for i in range(n):
            p = topic[i % 2] / topic[i % 2].sum()
            counts = rng.multinomial(rng.integers(5, 30), p)
            lines.append(" ".join(["1"] + [f"{j + 1}:{c}" for j, c in enumerate(counts) if c]))
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder
