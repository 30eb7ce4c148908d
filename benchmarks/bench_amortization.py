"""The inference gap of an MNIST VAE split as Cremer, Li & Duvenaud 2018 ("Inference suboptimality in variational
autoencoders", table 2) do:

    log p(x) - ELBO(q_phi)  =  [log p(x) - ELBO(q*)]  +  [ELBO(q*) - ELBO(q_phi)]
                             =  approximation gap     +  amortisation gap

q_phi is the trained encoder's q(z|x); q* the best diagonal Gaussian for each test image, fitted at test time by
``elbolab.inference.fit_local_posterior`` (Adam on its mean and log-scale, the decoder fixed, started from the
encoder's q); log p(x) is the importance-sampled estimate with K draws of q_phi (a stochastic lower bound, so the
approximation gap is slightly underestimated). Every quantity is computed per image; the table gives the mean and
its standard error over the images.

Trains the VAE first (dynamically binarised MNIST, MLP 784-200-200-20, Adam 1e-3, --epochs) unless --run names a
trained run. Skips (exit 0, a message) when the MNIST files are absent (--data-dir, default
/work/shared/data/mnist).

Run:  nohup .venv/bin/python benchmarks/bench_amortization.py --workdir /tmp/amortization \
        --out /tmp/amortization/table.md > /tmp/amortization.log 2>&1 &
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import _common as common
import torch

from elbolab import loading, pipeline
from elbolab.estimators import importance_sampled_log_px
from elbolab.inference import fit_local_posterior, local_elbo

MNIST = Path("/work/shared/data/mnist")


def mean_se(values: torch.Tensor) -> str:
    values = values.double()
    return f"{float(values.mean()):.2f} ± {float(values.std() / math.sqrt(len(values))):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a trained run folder (skips training)")
    parser.add_argument("--workdir", default="/tmp/amortization")
    parser.add_argument("--data-dir", default=str(MNIST))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-size", type=int, default=None, help="only the first N training images (a quick check)")
    parser.add_argument("--images", type=int, default=200, help="test images in the table")
    parser.add_argument("--k", type=int, default=5000, help="importance samples for log p(x)")
    parser.add_argument("--elbo-samples", type=int, default=1000)
    parser.add_argument("--fit-steps", type=int, default=1000)
    parser.add_argument("--fit-lr", type=float, default=0.01)
    parser.add_argument("--fit-mc", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.run is None and not any(Path(args.data_dir).glob("train-images-idx3-ubyte*")):
        print(f"skipped: no MNIST files in {args.data_dir} (pass --data-dir or --run)")
        return
    info = common.machine_info()
    started = time.perf_counter()
    if args.run is None:
        run = pipeline.train("vae", "mnist", data_dir=args.data_dir, out=Path(args.workdir) / "vae", overwrite=True,
                             epochs=args.epochs, hidden=(200, 200), latent_dim=20, binarize="dynamic",
                             val_size=1000, train_size=args.train_size, progress=True, tensorboard=False, figures=False)
    else:
        run = Path(args.run)
    train_seconds = time.perf_counter() - started
    model, config = loading.load_run(run)
    model.eval()
    test = loading.load_run_data(config["data"]).test
    batch = test.batch(torch.arange(min(args.images, len(test))), torch.Generator().manual_seed(0))
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        local = fit_local_posterior(model, batch, steps=args.fit_steps, lr=args.fit_lr, mc_samples=args.fit_mc,
                                    init="encoder")
        fit_seconds = time.perf_counter() - started
        with torch.no_grad():
            log_px = importance_sampled_log_px(model, batch, k=args.k).per_example  # [n]
            amortized = local_elbo(model, batch, model.encode(batch), args.elbo_samples).double()  # [n]
            optimal = local_elbo(model, batch, local.distribution(), args.elbo_samples).double()  # [n]
    rows = [[f"log p(x) (IS, K = {args.k})", mean_se(log_px)],
            ["ELBO, amortised q_phi(z|x)", mean_se(amortized)],
            ["ELBO, optimal per-image q*(z)", mean_se(optimal)],
            ["inference gap log p(x) - ELBO(q_phi)", mean_se(log_px - amortized)],
            ["approximation gap log p(x) - ELBO(q*)", mean_se(log_px - optimal)],
            ["amortisation gap ELBO(q*) - ELBO(q_phi)", mean_se(optimal - amortized)]]
    history = local.elbo_history
    tail = sum(history[-50:]) / len(history[-50:])
    lines = common.header_lines("Amortisation gap of an MNIST VAE (Cremer, Li & Duvenaud 2018)", info, {
        "model": f"{run}: {config['model']} {config['model_config']['hidden']}, latent "
                 f"{config['model_config']['latent_dim']}, {config['train_config']['epochs']} epochs "
                 f"(training {train_seconds:.0f} s)" if args.run is None else f"{run} (given)",
        "data": f"the first {len(batch)} test images, binarised once (seed 0)",
        "q* fit": f"{args.fit_steps} Adam steps, lr {args.fit_lr} decaying to lr/20, {args.fit_mc} draws per step, "
                  f"from the encoder's q; {fit_seconds:.0f} s for {len(batch)} images; mean ELBO over the last 50 "
                  f"steps {tail:.2f} (MC estimates during the fit)",
        "ELBOs": f"{args.elbo_samples} draws per image; closed-form KL",
    })
    lines += common.markdown_table(["quantity (nats, mean ± s.e. over images)", "value"], rows)
    common.write_output(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
