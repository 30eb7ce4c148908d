"""Bottom-up hierarchical VAE (hvae) against the Ladder VAE (ladder-vae) at the same budget: active units per layer
and test log p(x) (Sønderby et al. 2016, s3 and table 1/figure 4: the LVAE keeps more units active, deeper).
``--models hvae ladder-vae ladder-iwae`` adds the ladder trained on L_k (table 1's importance-weighted row, k = 10;
no KL warm-up: L_k has no KL weight).

Both models share the generative model and its size (default: the LVAE paper's MNIST model, latent 64-32-16-8-4,
MLP widths 512-256-128-64-32, two deterministic layers per block, batch norm), the data (MNIST with dynamic
binarisation, or the built-in digits), the epochs, the learning rate and the KL warm-up (beta linear from 0 to 1).
Reported per layer: active units (Burda et al. 2016: Cov_x E_q[z_u] > 0.01) with E_q[z_l|x] estimated by sampling
(the models' ``latent_means``, S = ``mean_samples`` joint draws) and by the mean pass (parents at their q-means:
exact only for linear layers), the largest change of a unit's Cov_x between the two, and units with a mean KL term
above 0.01 nats; the test ELBO and the importance-sampled log p(x) with K samples (stated).

Measured (2026-12-07; --train-size 10000 --epochs 5 --warmup 2, first 2000 test images, S = 1000), active units per
layer z1..z5, sampled vs mean pass: hvae 64/32/14/2/0 = 112 vs 64/32/15/3/0 = 114; ladder-vae 64/26/14/2/4 = 110 vs
64/30/14/3/4 = 115 (near the threshold the mean pass mostly overstated a unit's Cov_x, by 1.1-6x); ladder-iwae
(k = 10, no warm-up) 19/18/7/1/1 = 46 vs 27/26/10/4/1 = 68. Test log p(x), K = 200: hvae -111.56, ladder-vae
-110.43, ladder-iwae -115.83 (at 5 epochs L_k without warm-up trails the warmed-up ELBO; the paper trains far longer).

Long: run it in the background with one thread, e.g.

  nohup .venv/bin/python benchmarks/bench_hierarchical.py --train-size 10000 --epochs 20 --warmup 10 \
      --workdir /tmp/bench-hier > /tmp/bench-hier.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _common as common  # noqa: E402
import torch  # noqa: E402

MODELS = ("hvae", "ladder-vae")


def test_images(out: Path, args):
    """The run's model and the evaluated test images ``[N, D]`` (the evaluator's binarisation, seed 0)."""
    from elbolab import loading
    from elbolab.data import load_data

    model, config = loading.load_run(out)
    info = config["data"]
    test = load_data(info["source"], data_dir=info.get("data_dir"), binarize=info["binarize"], seed=info["seed"],
                     val_size=info.get("val_size")).test.head(args.test_size)
    return model, test.batch(torch.arange(len(test)), torch.Generator().manual_seed(0)).x


def mean_pass_active_units(out: Path, args) -> tuple[dict, dict]:
    """Active units per layer with E_q[z_l|x] by the mean pass, and per layer the largest |Cov_x| change of a unit
    between the mean pass and the sampled means (the models' latent_means) on the same images."""
    model, x = test_images(out, args)
    model.eval()
    with torch.no_grad():
        passed = [model.mean_pass(x[i:i + 500]) for i in range(0, len(x), 500)]  # {z_l: [500, d_l]} each
        sampled = [model.latent_means(x[i:i + 500]) for i in range(0, len(x), 500)]
    active, change = {}, {}
    for g in passed[0]:
        var_pass = torch.cat([p[g] for p in passed]).double().var(0)  # [d_l]
        var_sampled = torch.cat([s[g] for s in sampled]).double().var(0)
        active[g] = int((var_pass > 0.01).sum())
        change[g] = float((var_pass - var_sampled).abs().max())
    return active, change


def kl_active_units(out: Path, args) -> tuple[dict, dict]:
    """Units whose mean KL term exceeds 0.01 nats, per layer, and each layer's KL (nats), on the evaluated test images
    (the evaluator's binarisation), each example's KL terms averaged over ``--kl-draws`` joint draws of q: the hvae's
    lower layers have one-draw estimates only (see elbolab/models/hvae.py), too noisy for a 0.01 threshold alone."""
    from elbolab.data.core import Batch
    from elbolab.evaluate import kl_per_dimension

    model, x = test_images(out, args)
    torch.manual_seed(args.seed)
    kl = kl_per_dimension(model, Batch(x.repeat(args.kl_draws, 1)))  # [sum d_l], mean over examples and draws
    active, per_layer, start = {}, {}, 0
    for i, d in enumerate(args.latent_dims):
        active[f"z{i + 1}"] = int((kl[start:start + d] > 0.01).sum())
        per_layer[f"z{i + 1}"] = float(kl[start:start + d].sum())
        start += d
    return active, per_layer


def run_model(name: str, args, data: str, data_options: dict) -> dict:
    from elbolab import pipeline, runs

    out = Path(args.workdir) / name
    if args.reuse and (out / "model.safetensors").exists():
        train_seconds = runs.read_json(out / "manifest.json").get("summary", {}).get("session_seconds")
    else:
        if out.exists():
            shutil.rmtree(out)
        warmup = {} if name == "ladder-iwae" else {"kl_warmup_epochs": args.warmup}  # L_k: no KL weight
        with common.Stopwatch() as train_time:
            pipeline.train(name, data, out=out, epochs=args.epochs, latent_dims=tuple(args.latent_dims),
                           hidden=tuple(args.hidden), depth=2, batch_norm=not args.no_batch_norm,
                           activation=args.activation, lr=args.lr, **warmup,
                           batch_size=args.batch_size, train_size=args.train_size, seed=args.seed, progress=False,
                           tensorboard=False, figures=False, **data_options)
        train_seconds = train_time.seconds
    with common.Stopwatch() as eval_time:
        result = pipeline.evaluate(out, k=args.k, limit=args.test_size, refresh_report=False)
    kl_active, kl_layers = kl_active_units(out, args)
    pass_active, pass_change = mean_pass_active_units(out, args)
    return {"name": name, "train_seconds": train_seconds, "eval_seconds": eval_time.seconds,
            "log_px": result["log_px"]["mean"], "log_px_mc_stderr": result["log_px"]["mc_stderr"],
            "elbo": result.get("elbo"), "active_units_per_group": result.get("active_units_per_group"),
            "active_units": result["active_units"], "kl_active_per_group": kl_active,
            "kl_per_group": kl_layers, "mean_pass_active_per_group": pass_active,
            "mean_pass_max_cov_change": pass_change, "n_examples": result["n_examples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist", help="mnist (dynamic binarisation) | digits")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=["hvae", "ladder-vae", "ladder-iwae"])
    parser.add_argument("--data-dir", default=os.environ.get("ELBOLAB_DATA") or "/work/shared/data/mnist")
    parser.add_argument("--workdir", default="/tmp/bench-hierarchical")
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--test-size", type=int, default=1000, help="test images evaluated")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--warmup", type=float, default=10, help="epochs of KL warm-up (beta 0 -> 1)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--latent-dims", type=int, nargs="+", default=[64, 32, 16, 8, 4])
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 256, 128, 64, 32])
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--no-batch-norm", action="store_true")
    parser.add_argument("--k", type=int, default=200, help="importance samples for the test log p(x)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kl-draws", type=int, default=20, help="joint draws per example for the KL per unit")
    parser.add_argument("--reuse", action="store_true", help="evaluate the runs already in --workdir (no training)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="append the markdown here too")
    args = parser.parse_args()
    common.set_threads(args.threads)
    if args.data == "mnist":
        if not Path(args.data_dir, "train-images-idx3-ubyte.gz").exists() and \
                not Path(args.data_dir, "train-images-idx3-ubyte").exists():
            print(f"SKIPPED: no MNIST IDX files in {args.data_dir}; give --data-dir or use --data digits")
            sys.exit(0)
        data, data_options = "mnist", {"data_dir": args.data_dir, "binarize": "dynamic"}
    else:
        data, data_options = "digits", {}
    info = common.machine_info()
    results = []
    for name in args.models:
        print(f"training {name} ...", flush=True)
        results.append(run_model(name, args, data, data_options))
        print(json.dumps(results[-1]), flush=True)
    layers = [f"z{i + 1}" for i in range(len(args.latent_dims))]
    rows = []
    for r in results:
        au = r["active_units_per_group"] or {layers[0]: r["active_units"]}
        rows.append([r["name"], " / ".join(f"{au.get(g, 0)}" for g in layers), f"{r['active_units']}",
                     " / ".join(f"{r['mean_pass_active_per_group'][g]}" for g in layers),
                     f"{sum(r['mean_pass_active_per_group'].values())}",
                     " / ".join(f"{r['mean_pass_max_cov_change'][g]:.3f}" for g in layers),
                     " / ".join(f"{r['kl_active_per_group'][g]}" for g in layers),
                     " / ".join(f"{r['kl_per_group'][g]:.2f}" for g in layers),
                     common.fmt(r["elbo"], 2), f"{r['log_px']:.2f} ± {r['log_px_mc_stderr']:.2f}",
                     common.fmt(r["train_seconds"]), common.fmt(r["eval_seconds"])])
    dims = "-".join(map(str, args.latent_dims))
    lines = common.header_lines("Hierarchical VAEs: bottom-up (hvae) vs ladder (ladder-vae)", info, {
        "data": f"{data} ({'dynamic binarisation, ' if data == 'mnist' else ''}{args.train_size} training images, "
                f"first {args.test_size} test images)",
        "model": f"latent {dims}, MLP widths {'-'.join(map(str, args.hidden))} x2, {args.activation}, "
                 f"batch norm {'off' if args.no_batch_norm else 'on'}",
        "budget": f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}, KL warm-up {args.warmup} "
                  f"epochs, seed {args.seed}",
        "evaluation": f"log p(x) by importance sampling, K = {args.k}; active: Cov_x E_q[z_u] > 0.01, E_q by sampling "
                      "(the models' mean_samples joint draws) or by the mean pass; "
                      f"KL-active: mean KL term of the unit > 0.01 nats ({args.kl_draws} draws per example)",
    })
    lines += common.markdown_table(
        ["model", f"active units per layer ({' / '.join(layers)})", "active total", "mean-pass active per layer",
         "mean-pass total", "max |Cov_x change| per layer",
         "KL-active per layer", "KL per layer (nats)", "test ELBO", f"test log p(x), K={args.k} (± MC s.e.)",
         "train s", "eval s"], rows)
    named = {r["name"]: r for r in results}
    if "hvae" in named and "ladder-vae" in named:
        hv, lv = named["hvae"], named["ladder-vae"]
        verdict = "holds" if lv["active_units"] > hv["active_units"] else "does not hold"
        lines += ["", f"The LVAE claim (more active units than the bottom-up hierarchy) {verdict} at this budget: "
                  f"{lv['active_units']} vs {hv['active_units']} of {sum(args.latent_dims)} units.", ""]
    if "ladder-vae" in named and "ladder-iwae" in named:
        lv, li = named["ladder-vae"], named["ladder-iwae"]
        lines += ["", f"Importance-weighted training (k = 10 by default; paper table 1: 81.74 vs 82.12 nats): test "
                  f"log p(x) {li['log_px']:.2f} (ladder-iwae) vs {lv['log_px']:.2f} (ladder-vae).", ""]
    common.write_output(lines, args.out)


if __name__ == "__main__":
    main()
