"""A 2-process gloo run under torchrun gives the parameters and the metrics of a 1-process run on the same global
batches: with one parameter group (DDP) and with several (explicit gradient all-reduce per group)."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from elbolab.models import build_model
from elbolab.models.autoencoder import AutoencoderConfig

ARGS = ["train", "autoencoder", "--epochs", "2", "--batch-size", "32", "--hidden", "8", "--latent-dim", "2",
        "--likelihood", "gaussian", "--no-progress", "--no-tensorboard"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _torchrun(*args):
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               "2", *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]


def _train_records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"]


def _assert_same_run(one, two):
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for key in a:
        # same global batches and averaged gradients: equal up to float summation order
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # train metrics are over the whole global batch, not rank 0's shard
    for r1, r2 in zip(_train_records(one), _train_records(two), strict=True):
        for key, value in r1.items():
            if isinstance(value, float) and key != "seconds":
                assert abs(value - r2[key]) <= 1e-5 * max(1.0, abs(value)), (key, value, r2[key])
    return a


def test_two_process_ddp_matches_one_process(small_npy, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "elbolab", *ARGS, "--data", str(small_npy), "--out", str(one)],
                   check=True, env=ENV, capture_output=True, timeout=300)
    _torchrun("-m", "elbolab", *ARGS, "--data", str(small_npy), "--out", str(two))
    a = _assert_same_run(one, two)
    # training moved the weights far more than that tolerance, so the comparison is meaningful
    torch.manual_seed(0)  # the initialisation pipeline.train uses for seed 0
    init = build_model("autoencoder", AutoencoderConfig(input_dim=16, latent_dim=2, hidden=(8,), likelihood="gaussian"))
    moved = max((a[k] - v).abs().max().item() for k, v in init.state_dict().items())
    assert moved > 1e-3


SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from elbolab import pipeline
    from elbolab.models import register_model
    from elbolab.models.base import LossOutput
    from elbolab.models.autoencoder import Autoencoder

    @register_model("ddp-two-groups")
    class TwoGroups(Autoencoder):
        # a deterministic model (no sampling) with a second group that gets no gradient from the first loss
        def __init__(self, config):
            super().__init__(config)
            self.critic = nn.Linear(config.latent_dim, 1)

        def parameter_groups(self):
            return {"model": [p for n, p in self.named_parameters() if not n.startswith("critic.")],
                    "critic": list(self.critic.parameters())}

        def loss(self, batch, ctx):
            out = super().loss(batch, ctx)
            code = self.encoder(batch.x).detach()
            critic = (self.critic(code).squeeze(-1) - batch.x.sum(-1)).pow(2)  # [B]
            return LossOutput({"model": out.loss, "critic": critic.mean()}, {**out.metrics, "critic": critic})

    pipeline.train("ddp-two-groups", sys.argv[1], out=sys.argv[2], epochs=2, batch_size=32, hidden=(8,),
                   latent_dim=2, likelihood="gaussian", progress=False, tensorboard=False, figures=False)
    import os
    sys.stdout.flush()
    os._exit(0)  # as the CLI does under torchrun: skip a teardown that gloo's threads can abort (README, DDP)
""")


def test_two_process_run_with_two_optimisers_matches_one_process(small_npy, tmp_path):
    script = tmp_path / "two_groups.py"
    script.write_text(SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(script), str(small_npy), str(one)], check=True, env=ENV,
                   capture_output=True, timeout=300)
    _torchrun(str(script), str(small_npy), str(two))
    a = _assert_same_run(one, two)
    assert any(key.startswith("critic.") for key in a)


def test_a_two_process_run_stopped_after_a_checkpoint_resumes_bit_identically(small_npy, tmp_path):
    # a VAE draws noise every step: each rank's random stream must continue where it stopped (the checkpoint keeps
    # every rank's RNG state); two uninterrupted torchrun runs are identical, so a resumed one must be too
    vae = ["train", "vae", "--batch-size", "32", "--hidden", "8", "--latent-dim", "2", "--no-progress",
           "--no-tensorboard", "--data", str(small_npy)]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _torchrun("-m", "elbolab", *vae, "--epochs", "3", "--out", str(straight))
    _torchrun("-m", "elbolab", *vae, "--epochs", "1", "--out", str(stopped))
    _torchrun("-m", "elbolab", "train", "--out", str(stopped), "--resume", "--epochs", "3", "--no-progress")
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(stopped / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert _train_records(straight) == [{**r, "seconds": s["seconds"], "time": s["time"]}
                                        for r, s in zip(_train_records(stopped), _train_records(straight))]
