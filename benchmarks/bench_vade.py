"""Clustering MNIST: GMM on pixels, AE + GMM, VAE + GMM and VaDE (Jiang et al. 2017, table 2), by elbolab.

Every method is unsupervised (labels only score the result). The GMMs are the project's EM
(``elbolab.classical.GaussianMixture``); AE + GMM and VAE + GMM fit it on the encoder means of the training images.
VaDE: 784-500-500-2000-10 encoder, mirrored decoder, Bernoulli p(x|z) on grey levels, Adam lr 2e-3 (decayed x0.9
every 10 epochs when the trainer has the ``step`` schedule), batch 100, initialised from our own autoencoder
pretraining (the AE run of the same seed) and EM on its codes. Scores: accuracy (Hungarian matching), NMI, ARI on
the training images used, on the held-out test set, and on both together; every model is fitted on the training
images only. Paper (fitted and scored on all 70k): GMM 53.73, AE+GMM 82.18, VAE+GMM 72.94, VaDE 94.46 % accuracy.

The budget is a parameter: --train-size, --epochs (VaDE, VAE), --pretrain-epochs (AE), --seeds. Long: run it in the
background with one thread:

  nohup .venv/bin/python benchmarks/bench_vade.py --data-dir /work/shared/data/mnist --workdir /tmp/bench-vade \
      --train-size 10000 --epochs 10 --pretrain-epochs 10 --seeds 0 > /tmp/bench-vade.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _common as common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

PAPER = {"GMM (pixels)": 53.73, "AE + GMM": 82.18, "VAE + GMM": 72.94, "VaDE": 94.46}
ARCH = dict(hidden=(500, 500, 2000), latent_dim=10)


def fit_gmm(features: np.ndarray, seed: int, covariance: str, n_init: int, selection: str = "likelihood"):
    """EM with n_init restarts; the one kept has the highest likelihood or (``information``) the highest I(x; c)."""
    from elbolab.models.vade import fit_gmm as fit

    return fit(features, 10, covariance=covariance, n_init=n_init, selection=selection, seed=seed, max_iter=200,
               reg_covar=1e-4)


def scores(train_y, train_c, test_y, test_c) -> dict:
    from elbolab.clustering import clustering_scores

    both = clustering_scores(np.concatenate([train_y, test_y]), np.concatenate([train_c, test_c]))
    return {"train": clustering_scores(train_y, train_c), "test": clustering_scores(test_y, test_c),
            "train+test": both}


def lr_schedule() -> dict:
    """The paper's decay (x0.9 every 10 epochs) when the trainer knows a step schedule; else a constant lr."""
    from elbolab.errors import ElbolabError
    from elbolab.schedules import Schedule

    try:
        Schedule.parse("step:0.002:0.9:10", "lr")
        return {"lr": "step:0.002:0.9:10"}
    except ElbolabError:
        return {}


def run_seed(args, seed: int) -> dict:
    from elbolab import loading, pipeline
    from elbolab.data import load_data

    splits = load_data("mnist", data_dir=args.data_dir, seed=seed, val_size=args.val_size) \
        .with_train_size(args.train_size)
    train, test = splits.train, splits.test
    g = torch.Generator().manual_seed(0)
    x_train = train.batch(torch.arange(len(train)), g).x
    x_test = test.batch(torch.arange(len(test)), g).x
    y_train, y_test = train.y.numpy(), test.y.numpy()
    out, times = {}, {}
    work = Path(args.workdir) / f"seed{seed}"
    common_opts = dict(data_dir=args.data_dir, val_size=args.val_size, train_size=args.train_size, seed=seed,
                       progress=False, tensorboard=False, figures=False, **ARCH)

    def train(model_name, out, **options):
        """A new run, or with --resume the run already in ``out`` continued from its checkpoint."""
        if args.resume and (out / "checkpoint.safetensors").exists():
            from elbolab.errors import CheckpointError

            options.pop("init_from", None)
            try:
                return pipeline.train(model_name, "mnist", out=out, resume=True, **{**common_opts, **options})
            except CheckpointError as error:
                if "has already trained" not in str(error):
                    raise
                return out  # finished before the stop
        return pipeline.train(model_name, "mnist", out=out, overwrite=True, **{**common_opts, **options})

    if not args.skip_pixel_gmm:
        t0 = time.perf_counter()
        gmm = fit_gmm(x_train.double().numpy(), seed, args.pixel_covariance, args.gmm_n_init)
        out["GMM (pixels)"] = scores(y_train, gmm.predict(x_train.double().numpy()), y_test,
                                     gmm.predict(x_test.double().numpy()))
        times["GMM (pixels)"] = time.perf_counter() - t0
        print(f"seed {seed}: GMM on pixels done in {times['GMM (pixels)']:.0f} s", flush=True)

    vae_epochs = args.epochs if args.vae_epochs is None else args.vae_epochs
    for name, model_name, epochs in (("AE + GMM", "autoencoder", args.pretrain_epochs),
                                     ("VAE + GMM", "vae", vae_epochs)):
        if epochs == 0:
            continue
        t0 = time.perf_counter()
        denoise = model_name == "autoencoder" and args.pretrain_dropout > 0
        extra = {"input_dropout": args.pretrain_dropout} if denoise else {}
        run = train(model_name, work / model_name, epochs=epochs, lr=args.lr, batch_size=args.batch_size, **extra)
        model, _ = loading.load_run(run)
        with torch.no_grad():
            z_train = torch.cat([model.latent_means(x_train[i:i + 1000])["z"] for i in range(0, len(x_train), 1000)])
            z_test = torch.cat([model.latent_means(x_test[i:i + 1000])["z"] for i in range(0, len(x_test), 1000)])
        gmm = fit_gmm(z_train.double().numpy(), seed, args.latent_covariance, args.gmm_n_init, args.gmm_selection)
        out[name] = scores(y_train, gmm.predict(z_train.double().numpy()), y_test, gmm.predict(z_test.double().numpy()))
        if args.latent_covariance != "full":  # the same codes under a full-covariance GMM, for comparison
            gmm = fit_gmm(z_train.double().numpy(), seed, "full", args.gmm_n_init, args.gmm_selection)
            out[f"{name}, full covariances"] = scores(y_train, gmm.predict(z_train.double().numpy()), y_test,
                                                      gmm.predict(z_test.double().numpy()))
        times[name] = time.perf_counter() - t0
        print(f"seed {seed}: {name} done in {times[name]:.0f} s", flush=True)

    for covariance in args.vade_covariance:  # every VaDE from the same pretrained autoencoder
        name = "VaDE" if covariance == "diag" else "VaDE, full covariances"
        t0 = time.perf_counter()
        run = train("vade", work / f"vade-{covariance}", epochs=args.epochs, lr=2e-3, batch_size=100,
                    init_from=work / "autoencoder", schedules=lr_schedule(), gmm_n_init=args.gmm_n_init,
                    gmm_selection=args.gmm_selection,
                    gmm_covariance=covariance)
        model, _ = loading.load_run(run)
        out[name] = scores(y_train, model.predict(x_train).numpy(), y_test, model.predict(x_test).numpy())
        times[name] = time.perf_counter() - t0  # after pretraining (counted in AE + GMM)
        print(f"seed {seed}: {name} done in {times[name]:.0f} s, accuracy {100 * out[name]['train']['accuracy']:.1f}% "
              "(train)", flush=True)
    return {"scores": out, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("ELBOLAB_DATA") or "/work/shared/data/mnist")
    parser.add_argument("--workdir", default="/tmp/bench-vade")
    parser.add_argument("--train-size", type=int, default=None, help="training images (default: all 59k)")
    parser.add_argument("--val-size", type=int, default=1000, help="held out from training (logged only)")
    parser.add_argument("--epochs", type=int, default=300, help="VaDE and VAE epochs")
    parser.add_argument("--vae-epochs", type=int, default=None, help="VAE (+ GMM) epochs (default: --epochs; 0: no "
                        "VAE + GMM)")
    parser.add_argument("--vade-covariance", nargs="+", default=["diag"], choices=["diag", "full"],
                        help="VaDE's prior covariances, each a VaDE run from the same autoencoder (the paper: diag)")
    parser.add_argument("--pretrain-epochs", type=int, default=50, help="autoencoder epochs")
    parser.add_argument("--pretrain-dropout", type=float, default=0.0,
                        help="denoising pretraining: the autoencoder's input_dropout (DEC: 0.2)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AE and VAE learning rate")
    parser.add_argument("--batch-size", type=int, default=256, help="AE and VAE batch size")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--pixel-covariance", default="diag", help="GMM on pixels: diag (full is 784x784 x 10)")
    parser.add_argument("--latent-covariance", default="diag", help="GMM on latent means: diag | full")
    parser.add_argument("--gmm-n-init", type=int, default=1)
    parser.add_argument("--gmm-selection", default="likelihood", choices=["likelihood", "information"],
                        help="which EM restart every GMM keeps (on codes and VaDE's prior): the likeliest or the one "
                             "with the highest I(x; c)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-pixel-gmm", action="store_true", help="no GMM on pixels (minutes per seed)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs already in --workdir from their checkpoints (a stopped benchmark)")
    parser.add_argument("--out", default=None, help="append the markdown here too")
    parser.add_argument("--merge", nargs="+", default=None, metavar="WORKDIR",
                        help="no training: the table from the results.json of these workdirs (seeds run in "
                             "parallel processes, one --workdir each), with the budget given by the other options")
    args = parser.parse_args()
    if args.merge:
        results, wall = {}, 0.0
        for workdir in args.merge:
            saved = json.loads((Path(workdir) / "results.json").read_text())
            results.update({int(seed): r for seed, r in saved.items()})
            wall = max(wall, float(json.loads((Path(workdir) / "wall.json").read_text())["seconds"]))
        report(args, common.machine_info(), dict(sorted(results.items())), wall, parallel=len(args.merge))
        return
    if not (Path(args.data_dir) / "train-images-idx3-ubyte.gz").exists() and not (
            Path(args.data_dir) / "mnist" / "train-images-idx3-ubyte.gz").exists():
        print(f"skipped: no MNIST under {args.data_dir} (give --data-dir)")
        sys.exit(0)
    common.set_threads(args.threads)
    info = common.machine_info()
    started = time.perf_counter()
    results = {}
    for seed in args.seeds:  # saved after every seed: a stopped benchmark keeps the seeds it finished
        results[seed] = run_seed(args, seed)
        wall = time.perf_counter() - started
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        (Path(args.workdir) / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()},
                                                                    indent=1))
        (Path(args.workdir) / "wall.json").write_text(json.dumps({"seconds": wall}))
    report(args, info, results, wall)


def report(args, info: dict, results: dict, wall: float, parallel: int = 1) -> None:
    vae_epochs = args.epochs if args.vae_epochs is None else args.vae_epochs
    denoising = f" (denoising, input dropout {args.pretrain_dropout})" if args.pretrain_dropout else ""
    budget = (f"train images {args.train_size or 'all'}, VaDE epochs {args.epochs}, VAE epochs {vae_epochs}, AE epochs "
              f"{args.pretrain_epochs}{denoising}, seeds {sorted(results)}, VaDE lr schedule "
              f"{lr_schedule() or 'constant 2e-3'}; "
              f"GMMs: {args.gmm_n_init} EM restart(s) chosen by {args.gmm_selection}, {args.latent_covariance} "
              "covariances on codes; VaDE prior "
              f"covariances {' and '.join(args.vade_covariance)}")
    lines = common.header_lines("Clustering MNIST (VaDE, Jiang et al. 2017)", info,
                                {"budget": budget, "wall time": f"{wall / 60:.1f} min" + (
                                    f" ({parallel} processes side by side, one thread each)" if parallel > 1 else "")})
    rows = []
    methods = dict(PAPER)
    for extra in ("AE + GMM, full covariances", "VAE + GMM, full covariances", "VaDE, full covariances"):
        methods[extra] = None
    for method, paper in methods.items():
        if not all(method in r["scores"] for r in results.values()):
            continue
        def cell(split, key, method=method):
            values = [100 * r["scores"][method][split][key] for r in results.values()]
            med = statistics.median(values)
            return f"{med:.2f}" + (f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else "")

        # a GMM row on codes reuses its method's training time
        timed = method if method in next(iter(results.values()))["seconds"] else method.split(",")[0]
        secs = statistics.median(r["seconds"][timed] for r in results.values())
        rows.append([method, cell("train", "accuracy"), cell("test", "accuracy"), cell("train+test", "accuracy"),
                     cell("train+test", "nmi"), cell("train+test", "ari"),
                     "-" if paper is None else f"{paper:.2f}", f"{secs:.0f}"])
    lines += common.markdown_table(["method", "acc train %", "acc test %", "acc train+test %", "NMI train+test %",
                                    "ARI train+test %", "paper acc %", "seconds"], rows)
    lines.append("")
    lines.append("Median over seeds (min-max in brackets when several). Fitted on the training images only; "
                 "'train+test' scores the same fits on both sets together. VaDE's seconds exclude the AE pretraining.")
    common.write_output(lines, args.out)


if __name__ == "__main__":
    main()
