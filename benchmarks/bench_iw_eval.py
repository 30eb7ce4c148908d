"""Importance-sampled log p(x) at K=5000 on MNIST test images: elbolab vs pythae's VAE.get_nll.

Both evaluate the same 784-400-20 ReLU Bernoulli VAE (the same weights, copied into pythae's model layer by
layer) on the same images: the first --n-images MNIST test images, binarised once with a fixed seed. Each
evaluation runs in a fresh subprocess (so its peak resident memory, VmHWM, is its own); rounds alternate the
contenders and the table shows the median time. A warm-up on 2 images precedes each timed call.

  elbolab  elbolab.evaluate.importance_sampled_log_px(model, x, k=K) with its automatic chunking.
  pythae   model.get_nll(x, n_samples=K, batch_size=S) inside torch.no_grad() (get_nll itself does not disable
           autograd); it loops over images one at a time and runs the encoder on S copies of each image.

GFLOP/s counts the same minimal work for both: per image, the encoder once, 2*(784*400 + 400*2*20) FLOPs, and
per importance sample the decoder, 2*(20*400 + 400*784) FLOPs; elementwise log-density work is ignored.

The test images are the data's grey levels (elbolab stores MNIST as uint8; ``TensorData.rows`` gives floats in
[0, 1]) binarised with torch.bernoulli.

--smoke: a few seconds on scikit-learn's embedded digits (8x8, no data files): a 64-32-4 VAE trained one epoch,
the first 16 test images, K=64, one round of the elbolab worker only, run in the main process (no subprocess);
for tests/test_fast_path.py, not for numbers.

Run:  ELBOLAB_DATA=/work/shared/data /work/bench-venv/bin/python benchmarks/bench_iw_eval.py
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as common
import numpy as np
import torch

HIDDEN, LATENT, INPUT_DIM = (400,), 20, 784
SMOKE_SIZES = {"input_dim": 64, "image_shape": (8, 8), "hidden": (32,), "latent": 4}  # --smoke: digits


def sizes(args) -> dict:
    """The network: 784-400-20 on MNIST, 64-32-4 on the digits with --smoke."""
    if args.smoke:
        return SMOKE_SIZES
    return {"input_dim": INPUT_DIM, "image_shape": (28, 28), "hidden": HIDDEN, "latent": LATENT}


def flops_per_image(args) -> tuple[int, int]:
    """(encoder FLOPs per image, decoder FLOPs per importance sample), matrix products only, one hidden layer."""
    net = sizes(args)
    d_in, h, d = net["input_dim"], net["hidden"][0], net["latent"]
    return 2 * (d_in * h + h * 2 * d), 2 * (d * h + h * d_in)


def build_elbolab_model(args):
    from elbolab.models import get_model_class

    net = sizes(args)
    cls = get_model_class("vae")
    return cls(cls.config_class(input_dim=net["input_dim"], image_shape=net["image_shape"], latent_dim=net["latent"],
                                hidden=net["hidden"], activation="relu", likelihood="bernoulli"))


# ----- worker: one timed evaluation in its own process -----
def worker(args) -> None:
    common.set_threads(args.threads)
    from safetensors.torch import load_file

    state = load_file(args.weights_file)
    x = torch.from_numpy(np.load(args.x_file, allow_pickle=False))  # [N, 784] binary
    rss_before = common.proc_status_mib("VmRSS")
    torch.manual_seed(args.seed)
    if args.worker == "elbolab":
        from elbolab.estimators import importance_sampled_log_px

        model = build_elbolab_model(args)
        model.load_state_dict(state)
        model.eval()
        importance_sampled_log_px(model, x[:2], k=args.k)  # warm-up
        with common.Stopwatch() as watch:
            estimate = importance_sampled_log_px(model, x, k=args.k)
        mean = estimate.mean
        np.save(args.per_example_file, estimate.per_example.numpy(), allow_pickle=False)
    else:
        common.quiet_pythae_logging()
        net = sizes(args)
        model = common.build_pythae_vae(net["input_dim"], net["hidden"], net["latent"], "relu")
        model.load_state_dict(common.elbolab_to_pythae_state(state))
        model.eval()
        with torch.no_grad():
            model.get_nll(x[:2], n_samples=args.k, batch_size=args.pythae_batch_size)  # warm-up
            with common.Stopwatch() as watch:
                mean = float(model.get_nll(x, n_samples=args.k, batch_size=args.pythae_batch_size))
    print(json.dumps({"seconds": watch.seconds, "mean": mean, "rss_before_mib": rss_before,
                      "peak_mib": common.proc_status_mib("VmHWM")}))


def run_worker(args, name: str, seed: int, files: dict, pythae_batch_size: int = 0) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--weights-file", files["weights"], "--x-file", files["x"],
               "--k", str(args.k), "--seed", str(seed), "--threads", str(args.threads),
               "--pythae-batch-size", str(pythae_batch_size or 1),
               "--per-example-file", str(Path(files["dir"]) / f"elbolab-{seed}.npy")]
    if args.smoke:  # in this process (an interpreter less: seconds): the same worker, its peak memory not its own
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(command[2:] + ["--smoke"])
        return json.loads(out.getvalue().strip().splitlines()[-1])
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----- weights and images -----
def prepare(args, scratch: Path) -> dict:
    from elbolab.data import load_data

    if args.smoke:  # scikit-learn's embedded 8x8 digits: no data files needed
        splits = load_data("digits", binarize="none")
    else:
        splits = load_data("mnist", data_dir=args.data_dir, binarize="none", val_size=10000)
    grey = splits.test.rows(torch.arange(min(args.n_images, len(splits.test))))  # float [N, D] (MNIST is uint8)
    args.n_images = grey.shape[0]
    x = torch.bernoulli(grey, generator=torch.Generator().manual_seed(1234))
    np.save(scratch / "x.npy", x.numpy(), allow_pickle=False)
    torch.manual_seed(0)
    model = build_elbolab_model(args)
    described = "random initialisation (seed 0)"
    if args.weights:
        from elbolab import loading

        model, config = loading.load_run(args.weights)
        described = f"weights of the run {args.weights}"
    elif args.train_epochs:
        from elbolab.config import TrainConfig
        from elbolab.trainer import Trainer

        train = splits.train
        config = TrainConfig(epochs=args.train_epochs, batch_size=128, lr=1e-3, progress=False, tensorboard=False)
        Trainer(model, config, scratch / "train-run", model_name="vae").fit(train, None)
        described = (f"elbolab VAE trained {args.train_epochs} epochs on the {len(train)} grey-level "
                     f"{'digits' if args.smoke else 'MNIST'} training images (batch 128, Adam 1e-3)")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(scratch / "weights.safetensors"))
    return {"weights": str(scratch / "weights.safetensors"), "x": str(scratch / "x.npy"), "dir": str(scratch),
            "described": described}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=common.data_dir_default(), help="folder with mnist/ (default $ELBOLAB_DATA)")
    p.add_argument("--n-images", type=int, default=200, help="first N MNIST test images")
    p.add_argument("--k", type=int, default=5000, help="importance samples per image")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the table shows the median")
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    p.add_argument("--pythae-batch-sizes", default="100,5000",
                   help="get_nll batch_size values to time (100 is its default; 5000 = all K samples at once)")
    p.add_argument("--train-epochs", type=int, default=2, help="train the weights this many epochs (0 = random init)")
    p.add_argument("--weights", default=None, help="use the weights of this elbolab run folder instead (784-400-20)")
    p.add_argument("--wait-load", type=float, default=0.0, help="first wait until the 1-min load is below this")
    p.add_argument("--wait-max", type=float, default=1800.0)
    p.add_argument("--scratch", default=None)
    p.add_argument("--out", default=None, help="also append the markdown to this file")
    # worker-only options
    p.add_argument("--worker", choices=("elbolab", "pythae"), help=argparse.SUPPRESS)
    p.add_argument("--weights-file", help=argparse.SUPPRESS)
    p.add_argument("--x-file", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--pythae-batch-size", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--per-example-file", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true",
                   help="seconds on the embedded digits, tiny network, elbolab only (checks that the script runs)")
    args = p.parse_args(argv)
    if args.smoke and not args.worker:
        args.n_images, args.k, args.rounds, args.train_epochs, args.threads = 16, 64, 1, 1, 1
        args.pythae_batch_sizes, args.weights = "", None
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    common.set_threads(args.threads)
    _, pythae_missing = common.optional_module("pythae")
    batch_sizes = [] if pythae_missing else [int(s) for s in args.pythae_batch_sizes.split(",") if s.strip()]
    scratch = Path(tempfile.mkdtemp(prefix="iw-eval-", dir=args.scratch))
    files = prepare(args, scratch)
    waited = common.wait_until_idle(args.wait_load, args.wait_max)
    info = common.machine_info()

    contenders = [("elbolab", 0)] + [("pythae", s) for s in batch_sizes]
    results: dict[tuple[str, int], list[dict]] = {c: [] for c in contenders}
    for r in range(args.rounds):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        for name, size in order:
            res = run_worker(args, name, seed=100 + r, files=files, pythae_batch_size=size)
            results[(name, size)].append(res)
            print(f"round {r + 1}/{args.rounds} {name} {size or ''}: {res['seconds']:.2f} s, mean log p(x) "
                  f"{res['mean']:.3f}, peak {res['peak_mib']:.0f} MiB  load {os.getloadavg()[0]:.2f}", flush=True)

    n, k = args.n_images, args.k
    encoder_flops, decoder_flops = flops_per_image(args)
    flops = n * (encoder_flops + k * decoder_flops)
    seconds = {c: common.median([r["seconds"] for r in v]) for c, v in results.items()}
    pythae_best = min((c for c in contenders if c[0] == "pythae"), key=lambda c: seconds[c], default=None)
    rows = []
    for c in contenders:
        name, size = c
        label = "elbolab importance_sampled_log_px" if name == "elbolab" else f"pythae get_nll(batch_size={size})"
        peak = max(r["peak_mib"] for r in results[c])
        before = max(r["rss_before_mib"] for r in results[c])
        rows.append([label, f"{seconds[c]:.2f}", common.fmt(n / seconds[c], 1), f"{flops / seconds[c] / 1e9:.1f}",
                     f"{peak:.0f}", f"{peak - before:.0f}",
                     f"{np.mean([r['mean'] for r in results[c]]):.3f}",
                     common.ratio(seconds[c], seconds[("elbolab", 0)]) if name == "pythae" else "1.00x"])
    if pythae_missing:
        rows.append(["pythae", "not run", "", "", "", "", "", f"not importable ({pythae_missing})"])

    # Monte-Carlo error of one run's mean, from the per-image spread between two elbolab runs (other seeds)
    per_example = [np.load(scratch / f"elbolab-{100 + r}.npy") for r in range(args.rounds)]
    agreement = "needs --rounds >= 2"
    if len(per_example) >= 2:
        se_one_run = float(np.std(per_example[0] - per_example[1], ddof=1) / math.sqrt(2 * n))
        el_mean = float(np.mean([r["mean"] for r in results[("elbolab", 0)]]))
        lines_agree = []
        for c in contenders[1:]:
            py_runs = [r["mean"] for r in results[c]]
            diff = el_mean - float(np.mean(py_runs))
            se = se_one_run * math.sqrt(1 / args.rounds + 1 / len(py_runs))  # both averaged over their runs
            lines_agree.append(f"batch_size={c[1]}: elbolab - pythae = {diff:+.2e} nats, MC s.e. {se:.4f} "
                               f"({abs(diff) / se:.1f} s.e., {'agree' if abs(diff) < 3 * se else 'DIFFER'})")
        agreement = "; ".join(lines_agree) or "no pythae runs"
        agreement += f" [one run's MC s.e. of the mean: {se_one_run:.4f} nats]"

    net = sizes(args)
    net_name = f"{net['input_dim']}-{'-'.join(map(str, net['hidden']))}-{net['latent']}"
    data_name = "digits (smoke test)" if args.smoke else "MNIST"
    lines = common.header_lines(
        f"Importance-sampled log p(x), K={k}: {net_name} Bernoulli VAE, first {n} {data_name} test images", info,
        {"weights": files["described"] + "; the same weights in both libraries",
         "data": f"first {n} test images, binarised once (torch.bernoulli, seed 1234)",
         "setup": f"each evaluation in its own subprocess, {args.rounds} interleaved rounds, median time; "
                  f"pythae {common.package_version('pythae') or 'not installed'}",
         "idle wait": waited})
    lines += common.markdown_table(
        ["contender", "seconds", "images/s", "GFLOP/s", "peak RSS MiB (VmHWM)", "peak - RSS before MiB",
         "mean log p(x)", "time / elbolab's"], rows)
    if pythae_best is not None:
        lines += ["", f"elbolab vs the fastest pythae setting (batch_size={pythae_best[1]}): "
                      f"{seconds[pythae_best] / seconds[('elbolab', 0)]:.2f}x faster."]
    lines += ["", f"Agreement of the estimates (same weights, same images): {agreement}. Each round seeds both "
                  "workers alike; when elbolab's chunking takes one image at a time (all K samples in one block) it "
                  "draws the normals in the same order as get_nll, so the two means then coincide up to float "
                  "rounding, a check sharper than the Monte-Carlo error.",
              "GFLOP/s credits both with the same minimal FLOP count (encoder once per image, decoder once per "
              "sample; elementwise work ignored); pythae actually runs its encoder on every copy of the image."]
    common.write_output(lines, args.out)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
