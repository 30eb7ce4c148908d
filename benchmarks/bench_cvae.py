"""MNIST quadrant inpainting: the conditional VAE against a deterministic network (Sohn et al. 2015, s4; Pyro's CVAE
tutorial table), negative conditional log-likelihood of the missing quadrants in nats per test image.

Set-up as Pyro's examples/cvae (checked against its source): grey-level MNIST (no binarisation), Bernoulli
likelihood on grey levels (so the "NLL" is a cross-entropy, as in Pyro), 1 / 2 / 3 given quadrants = bottom-left /
left half / all but bottom-right, only the missing pixels scored, MLPs of 500-500 hidden units, z of 200 dimensions,
Adam lr 1e-3, batch 128. The baseline is Pyro's: an MLP from the image with its missing pixels set to -1 to the
784 pixel probabilities, trained on the cross-entropy of the missing pixels; its NLL is that cross-entropy.
The CVAE is elbolab's ``cvae`` (condition=quadrants, conditional_prior=True). For it we report the importance-sampled
-log p(x_missing | x_observed) (k samples from q(z|x, c)) and -ELBO (Pyro's table reports -ELBO, 10 particles).

Differences from Pyro's run: Pyro trains up to 50 epochs with early stopping (patience 3) on the test set; here a
fixed, small budget of epochs, validation split held out of the training images. Pyro's decoder p(y|z) sees only z
(x enters through a prior network fed with the baseline's guess); ours decodes from (z, observed pixels) and its
prior network sees the observed pixels, with no baseline inside. Run in the background with one thread:

  nohup .venv/bin/python benchmarks/bench_cvae.py --epochs 5 --out /tmp/bench-cvae/table.md \
      > /tmp/bench-cvae.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _common as common  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

PYRO = {"CVAE": {1: 71.8, 2: 51.0, 3: 24.2}, "baseline": {1: 100.4, 2: 61.9, 3: 25.4}}
ARCH = dict(hidden=(500, 500), latent_dim=200)


def train_baseline(train, observed: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int):
    """Pyro's BaselineNet: [x with missing pixels = -1] -> 500 -> 500 -> 784 logits, masked cross-entropy."""
    torch.manual_seed(seed)
    d = train.dim
    net = common.mlp_layers((d, *ARCH["hidden"], d), "relu", final_activation=False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(train), generator=g).split(batch_size):
            x = train.batch(index, g).x  # [B, D]
            loss = baseline_nll(net, x, observed).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def baseline_nll(net, x: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the missing pixels per image, [B]."""
    logits = net(torch.where(observed, x, torch.full_like(x, -1.0)))
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").masked_fill(observed, 0.0).sum(-1)


def run_quadrants(args, q: int) -> dict:
    from elbolab import loading, pipeline
    from elbolab.data import load_data
    from elbolab.evaluate import evaluate_model
    from elbolab.models.cvae import quadrant_mask

    splits = load_data("mnist", data_dir=args.data_dir, binarize="none", seed=args.seed, val_size=args.val_size)
    splits = splits.with_train_size(args.train_size)
    test = splits.test.head(min(args.limit, len(splits.test)))
    observed = quadrant_mask(splits.train.image_shape, q)  # [D]
    out: dict = {}
    t0 = time.perf_counter()
    run = pipeline.train("cvae", "mnist", out=Path(args.workdir) / f"cvae_q{q}", overwrite=True, epochs=args.epochs,
                         condition="quadrants", given_quadrants=q, conditional_prior=True, lr=args.lr,
                         batch_size=args.batch_size, data_dir=args.data_dir, val_size=args.val_size,
                         train_size=args.train_size, seed=args.seed, progress=False, tensorboard=False,
                         figures=True, **ARCH)
    out["cvae_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, _ = loading.load_run(run)
    result = evaluate_model(model.eval(), test, k=args.k, seed=0)
    out["cvae_eval_s"] = time.perf_counter() - t0
    out.update(cvae_is_nll=-result["log_px"]["mean"], cvae_is_mc_stderr=result["log_px"]["mc_stderr"],
               cvae_neg_elbo=-result["elbo"], cvae_ess_mean=result["log_px"]["ess_mean"])
    print(f"q{q}: CVAE trained in {out['cvae_train_s']:.0f} s; IS NLL {out['cvae_is_nll']:.2f}, "
          f"-ELBO {out['cvae_neg_elbo']:.2f}", flush=True)
    t0 = time.perf_counter()
    net = train_baseline(splits.train, observed, args.epochs, args.batch_size, args.lr, args.seed)
    out["baseline_train_s"] = time.perf_counter() - t0
    with torch.no_grad():
        x = test.batch(torch.arange(len(test)), torch.Generator().manual_seed(0)).x
        out["baseline_nll"] = float(baseline_nll(net, x, observed).double().mean())
    print(f"q{q}: baseline trained in {out['baseline_train_s']:.0f} s; NLL {out['baseline_nll']:.2f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("ELBOLAB_DATA") or "/work/shared/data/mnist")
    parser.add_argument("--workdir", default="/tmp/bench-cvae")
    parser.add_argument("--quadrants", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=5, help="epochs for the CVAE and for the baseline")
    parser.add_argument("--train-size", type=int, default=None, help="training images (default: all 50k)")
    parser.add_argument("--val-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=100, help="importance samples per test image")
    parser.add_argument("--limit", type=int, default=10000, help="test images scored (the first N of t10k)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="append the markdown here too")
    args = parser.parse_args()
    folder = Path(args.data_dir)
    if not any((f / "train-images-idx3-ubyte.gz").exists() for f in (folder, folder / "mnist")):
        print(f"skipped: no MNIST under {args.data_dir} (give --data-dir or set ELBOLAB_DATA)")
        sys.exit(0)
    common.set_threads(args.threads)
    info = common.machine_info()
    started = time.perf_counter()
    results = {q: run_quadrants(args, q) for q in args.quadrants}
    wall = time.perf_counter() - started
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    (Path(args.workdir) / "results.json").write_text(json.dumps(results, indent=1))
    budget = (f"{args.epochs} epochs each (CVAE and baseline), {args.train_size or 'all 50000'} training images, "
              f"batch {args.batch_size}, lr {args.lr}, seed {args.seed}; scored on the first {args.limit} t10k "
              f"images, k = {args.k}")
    lines = common.header_lines("Conditional VAE: MNIST quadrant inpainting (Sohn et al. 2015; Pyro's CVAE tutorial)",
                                info, {"budget": budget, "wall time": f"{wall / 60:.1f} min"})
    headers = ["nats per image (lower is better)", *[f"{q} quadrant{'s' if q > 1 else ''} given" for q in results]]
    rows = [["baseline MLP, cross-entropy", *[f"{r['baseline_nll']:.1f}" for r in results.values()]],
            ["CVAE, -ELBO", *[f"{r['cvae_neg_elbo']:.1f}" for r in results.values()]],
            [f"CVAE, -log p(x_missing \\| x_observed), IS k={args.k}",
             *[f"{r['cvae_is_nll']:.1f} ± {r['cvae_is_mc_stderr']:.2f}" for r in results.values()]],
            ["Pyro tutorial: baseline", *[f"{PYRO['baseline'][q]}" for q in results]],
            ["Pyro tutorial: CVAE (-ELBO, 10 particles)", *[f"{PYRO['CVAE'][q]}" for q in results]],
            ["seconds: CVAE train / eval, baseline train",
             *[f"{r['cvae_train_s']:.0f} / {r['cvae_eval_s']:.0f}, {r['baseline_train_s']:.0f}"
               for r in results.values()]]]
    lines += common.markdown_table(headers, rows)
    lines += ["", "± is the Monte-Carlo standard error of the IS mean. Grey-level targets under a Bernoulli "
                  "likelihood, as Pyro: cross-entropies, not log-likelihoods of binary images."]
    common.write_output(lines, args.out)


if __name__ == "__main__":
    main()
