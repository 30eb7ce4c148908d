"""A 2-process gloo run under torchrun gives the parameters of a 1-process run on the same global batch."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from elbolab.models import ModelConfig, build_model

ARGS = ["train", "autoencoder", "--epochs", "2", "--batch-size", "32", "--hidden", "8", "--latent-dim", "2",
        "--likelihood", "gaussian", "--no-progress", "--no-tensorboard"]


def test_two_process_ddp_matches_one_process(small_npy, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "elbolab", *ARGS, "--data", str(small_npy), "--out", str(one)],
                   check=True, env=env, capture_output=True, timeout=300)
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "elbolab", *ARGS, "--data", str(small_npy), "--out", str(two)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for key in a:
        # same global batches and averaged gradients: equal up to float summation order
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # training moved the weights far more than that tolerance, so the comparison is meaningful
    torch.manual_seed(0)  # the initialisation pipeline.train uses for seed 0
    init = build_model("autoencoder", ModelConfig(input_dim=16, latent_dim=2, hidden=(8,), likelihood="gaussian"))
    moved = max((a[k] - v).abs().max().item() for k, v in init.state_dict().items())
    assert moved > 1e-3
