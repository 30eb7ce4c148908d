"""The inference gap of an MNIST VAE split as Cremer, Li & Duvenaud 2018 ("Inference suboptimality in variational
autoencoders", table 2) do:

    log p(x) - ELBO(q_phi)  =  [log p(x) - ELBO(q*)]  +  [ELBO(q*) - ELBO(q_phi)]
                             =  approximation gap     +  amortisation gap

q_phi is the trained encoder's q(z|x); q* the best diagonal Gaussian for each test image, fitted at test time by
``elbolab.inference.fit_local_posterior`` (Adam on its mean and log-scale, the decoder fixed, started from the
encoder's q). log p(x) is estimated as Cremer et al. do, with the best available estimate: importance sampling
with K draws of the fitted q* and, as well, of q_phi, keeping the larger per image (``elbolab.inference.
amortization_gap(proposal="both")``; with --ais-steps also AIS from elbolab.ais). Each is a stochastic lower bound;
the per-image maximum can sit slightly above log p(x) when the two are equally good (selection of upward noise).
The IS estimate with q_phi alone (the estimator of earlier versions) is reported as well, for contrast.

Every quantity is per image; the table gives the mean with two standard errors: Monte-Carlo (for these images:
how much it would move with other draws) and over images (how much another test set would move it).

Trains the VAE first (dynamically binarised MNIST, MLP 784-200-200-20, Adam 1e-3, --epochs) unless --run names a
trained run. Skips (exit 0, a message) when the MNIST files are absent (--data-dir, default
/work/shared/data/mnist). --json writes the numbers (benchmarks/results/ is gitignored).

Run:  nohup .venv/bin/python benchmarks/bench_amortization.py --workdir /tmp/amortization \
        --out /tmp/amortization/table.md --json benchmarks/results/amortization.json > /tmp/amortization.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import _common as common
import torch

from elbolab import loading, pipeline
from elbolab.inference import amortization_gap

MNIST = Path("/work/shared/data/mnist")


def mean_se(result: dict, key: str) -> str:
    return (f"{result[key]:.2f} ± {result[key + '_mc_stderr']:.3f} (MC) ± {result[key + '_stderr_over_examples']:.2f} "
            "(images)")


def last_epoch(run: Path) -> int | None:
    """The last epoch the run's metrics.jsonl records (a line cut by a kill is skipped)."""
    epochs = []
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            epochs.append(json.loads(line).get("epoch"))
        except ValueError:
            continue
    return max((e for e in epochs if isinstance(e, int)), default=None)


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
    parser.add_argument("--ais-steps", type=int, default=0, help="also AIS with this many steps (0: none)")
    parser.add_argument("--ais-chains", type=int, default=16)
    parser.add_argument("--ais-leapfrog", type=int, default=10)
    parser.add_argument("--ais-initial", default="posterior", help="prior | posterior (the encoder's q)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="write the numbers here (e.g. benchmarks/results/...json)")
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
    ais = ({"steps": args.ais_steps, "chains": args.ais_chains, "leapfrog_steps": args.ais_leapfrog,
            "initial": args.ais_initial} if args.ais_steps else None)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = amortization_gap(model, batch, k=args.k, elbo_samples=args.elbo_samples, proposal="both", ais=ais,
                                  steps=args.fit_steps, lr=args.fit_lr, mc_samples=args.fit_mc, init="encoder")
    eval_seconds = time.perf_counter() - started
    candidates = result["log_px_candidates"]
    per = result["per_example"]
    old = per["log_px_is_amortized"]  # [n], the estimate of earlier versions
    old_approximation = old - per["elbo_optimal"]
    total = per["log_px"] - per["elbo_amortized"]  # [n], the inference gap
    n = len(batch)
    rows = [[f"log p(x): {result['log_px_estimator']}", mean_se(result, "log_px")],
            *[[f"  candidate {name} (chosen on {c['chosen']} of {n} images)",
               f"{c['mean']:.2f} ± {c['mc_stderr']:.3f} (MC)"] for name, c in candidates.items()],
            ["ELBO, amortised q_phi(z|x)", mean_se(result, "elbo_amortized")],
            ["ELBO, optimal per-image q*(z)", mean_se(result, "elbo_optimal")],
            ["approximation gap log p(x) - ELBO(q*)", mean_se(result, "approximation_gap")],
            ["amortisation gap ELBO(q*) - ELBO(q_phi)", mean_se(result, "amortization_gap")],
            ["inference gap log p(x) - ELBO(q_phi)",
             f"{float(total.mean()):.2f} ± {float(total.std() / math.sqrt(n)):.2f} (images)"],
            ["(old) approximation gap with log p(x) from IS with q_phi alone",
             f"{float(old_approximation.mean()):.2f} ± {float(old_approximation.std() / math.sqrt(n)):.2f} (images)"]]
    tail = result["fit_final_elbo"]
    lines = common.header_lines("Amortisation gap of an MNIST VAE (Cremer, Li & Duvenaud 2018)", info, {
        "model": f"{run}: {config['model']} {config['model_config']['hidden']}, latent "
                 f"{config['model_config']['latent_dim']}, {config['train_config']['epochs']} epochs "
                 f"(training {train_seconds:.0f} s)" if args.run is None else f"{run} (given)",
        "data": f"the first {len(batch)} test images, binarised once (seed 0)",
        "q* fit": f"{args.fit_steps} Adam steps, lr {args.fit_lr} decaying to lr/20, {args.fit_mc} draws per step, "
                  f"from the encoder's q; mean ELBO at the last step {tail:.2f} (an MC estimate during the fit)",
        "ELBOs": f"{args.elbo_samples} draws per image; closed-form KL",
        "evaluation": f"{eval_seconds:.0f} s (fit, IS with both proposals, ELBOs)",
    })
    lines += common.markdown_table(["quantity (nats, mean ± MC s.e. ± s.e. over images)", "value"], rows)
    common.write_output(lines, args.out)
    if args.json:
        summary = {key: value for key, value in result.items() if key != "per_example"}
        summary["old_estimator"] = {"log_px": float(old.mean()), "log_px_mc_stderr": candidates["is_amortized"][
            "mc_stderr"], "approximation_gap": float(old_approximation.mean()),
            "approximation_gap_stderr_over_examples": float(old_approximation.std() / math.sqrt(n))}
        record = {"machine": info, "run": str(run), "model_config": config["model_config"],
                  "weights_epoch": last_epoch(run),  # the epoch of model.safetensors unless the run is training
                  "train_config": config["train_config"], "train_seconds": train_seconds,
                  "eval_seconds": eval_seconds, "args": vars(args), "result": summary,
                  "per_example": {key: value.tolist() for key, value in per.items()}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
