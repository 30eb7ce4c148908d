"""How VaDE's starting point depends on the autoencoder pretraining: AE + GMM clustering accuracy on MNIST after
10, 25, 50, 100 ... epochs of one autoencoder run (continued with --resume between the stops).

The autoencoder is bench_vade.py's (784-500-500-2000-10, Bernoulli cross-entropy on grey levels, Adam lr 1e-3,
batch 256, all 59,000 training images after a 1,000-image validation split). At each stop, EM with diagonal and
with full covariances (the project's GaussianMixture, k-means initialisation, one restart) is fitted on the
encoder's codes of the training images with --gmm-seeds EM seeds; the table shows each seed's accuracy (Hungarian
matching) on the same images: the spread over EM seeds on ONE set of codes shows how much of VaDE's variance comes
from the GMM initialisation alone.

  nohup .venv/bin/python benchmarks/bench_ae_pretraining.py --data-dir /work/shared/data/mnist \\
      --stops 10,25,50,100 > /tmp/bench-ae.log 2>&1 &
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _common as common  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("ELBOLAB_DATA") or "/work/shared/data/mnist")
    p.add_argument("--workdir", default="/tmp/bench-ae-pretraining")
    p.add_argument("--stops", default="10,25,50,100", help="epochs at which to score the codes")
    p.add_argument("--seed", type=int, default=0, help="training seed of the autoencoder")
    p.add_argument("--gmm-seeds", type=int, default=3)
    p.add_argument("--likelihood", default="bernoulli", help="bernoulli (cross-entropy) | gaussian (SSE)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    common.set_threads(args.threads)
    from elbolab import loading, pipeline
    from elbolab.classical import GaussianMixture
    from elbolab.clustering import clustering_scores
    from elbolab.data import load_data

    splits = load_data("mnist", data_dir=args.data_dir, seed=args.seed, val_size=1000)
    x = splits.train.batch(torch.arange(len(splits.train)), torch.Generator().manual_seed(0)).x
    y = splits.train.y.numpy()
    out = Path(args.workdir) / f"ae-{args.likelihood}-seed{args.seed}"
    options = dict(data_dir=args.data_dir, val_size=1000, seed=args.seed, progress=False, tensorboard=False,
                   figures=False, hidden=(500, 500, 2000), latent_dim=10, likelihood=args.likelihood, lr=1e-3,
                   batch_size=256)
    info, started, rows = common.machine_info(), time.perf_counter(), []
    for i, epochs in enumerate(int(s) for s in args.stops.split(",")):
        if i == 0:
            pipeline.train("autoencoder", "mnist", out=out, epochs=epochs, overwrite=True, **options)
        else:
            pipeline.train(out=out, resume=True, epochs=epochs)
        model, _ = loading.load_run(out)
        with torch.no_grad():
            codes = torch.cat([model.latent_means(x[s:s + 1000])["z"] for s in range(0, len(x), 1000)])
        codes = codes.double().numpy()
        cells = []
        for covariance in ("diag", "full"):
            accuracies = [100 * clustering_scores(y, GaussianMixture(
                10, covariance_type=covariance, random_state=s, max_iter=200, reg_covar=1e-4).fit(codes).predict(
                codes))["accuracy"] for s in range(args.gmm_seeds)]
            cells.append(" / ".join(f"{a:.1f}" for a in accuracies))
        minutes = (time.perf_counter() - started) / 60
        rows.append([epochs, *cells, f"{minutes:.1f}"])
        print(f"epochs {epochs}: diag {cells[0]}, full {cells[1]} ({minutes:.1f} min)", flush=True)
    lines = common.header_lines("AE pretraining budget against AE + GMM accuracy (MNIST)", info, {
        "autoencoder": f"784-500-500-2000-10, {args.likelihood}, Adam 1e-3, batch 256, {len(x)} images, "
                       f"seed {args.seed}",
        "GMM": f"EM seeds 0-{args.gmm_seeds - 1}, one k-means-initialised restart each, reg_covar 1e-4"})
    lines += common.markdown_table(["AE epochs", "accuracy %, diag GMM (per EM seed)",
                                    "accuracy %, full GMM (per EM seed)", "minutes so far"], rows)
    common.write_output(lines, args.out)


if __name__ == "__main__":
    main()
