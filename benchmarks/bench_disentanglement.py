"""Reconstruction against disentanglement on the procedural sprites: beta-vae across beta, factor-vae across gamma.

Kim & Mnih (2018, fig. 4-7) report that FactorVAE reaches a better trade-off than beta-VAE on dSprites: for the same
reconstruction error, a higher disentanglement score (their metric). This script measures both models on
``elbolab.data.sprites`` (737,280 images, dSprites' factors) on a small CPU budget:

* models: beta-vae (beta in --betas; beta = 1 is the plain VAE) and factor-vae (gamma in --gammas), latent_dim 10
  (the papers'), an MLP 4096-400-10 encoder with the mirrored decoder, Bernoulli p(x|z). The repo's ``--arch conv``
  handles 64x64 but is not the papers' network (two stride-2 convolutions, not four plus a 128-unit layer) and takes
  0.35 s a step of 64 on one thread against 0.08 s for the MLP, so the MLP is used. FactorVAE's discriminator is
  4 x 256 (the paper: 6 x 1000, 0.2 s a step more here), its Adam lr 1e-4, betas (0.5, 0.9) as in the paper.
* training: the first --train-size images of the seeded training split, --epochs epochs, batch 64, Adam lr 1e-3
  (the papers: 1e-4 for 3e5 steps; this budget is about 1e3 steps).
* scores on held-out images: reconstruction error -E_q log p(x|z) (nats per image, one z per image, 2,000 test
  images), KL(q(z|x) || p(z)), the beta-VAE metric (Higgins et al. 2017), the FactorVAE metric (Kim & Mnih 2018) and
  MIG (Chen et al. 2018) from ``elbolab.disentanglement`` with smaller samples than the papers' (--metric-* flags).
* several seeds per setting: median and [min, max].

One process per model family, in the background with one thread each (about 10 minutes each on a free core):

  nohup .venv/bin/python benchmarks/bench_disentanglement.py --family beta-vae --workdir /tmp/bench-dis \
      > /tmp/bench-dis-beta.log 2>&1 &
  nohup .venv/bin/python benchmarks/bench_disentanglement.py --family factor-vae --workdir /tmp/bench-dis \
      > /tmp/bench-dis-factor.log 2>&1 &
  .venv/bin/python benchmarks/bench_disentanglement.py --table --workdir /tmp/bench-dis   # when both are done
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _common as common  # noqa: E402
import torch  # noqa: E402

ARCH = dict(latent_dim=10, hidden=(400,), architecture="mlp")
FACTOR = dict(discriminator_width=256, discriminator_depth=4)
SETTING = {"beta-vae": "beta", "factor-vae": "gamma"}


def reduced_splits(train_size: int, val_size: int, seed: int):
    """The sprites splits cut to the first ``train_size`` training rows (a uniform sample: the training split is
    shuffled; drawn per batch) and 2,000 random test rows, drawn once."""
    from elbolab.data import load_data
    from elbolab.data.core import TensorData

    splits = load_data("sprites", seed=seed, val_size=val_size)
    train = splits.train.head(train_size)
    pick = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(seed))[:2000]
    test = splits.test
    test = TensorData(x=test.x[pick], y=test.y[pick], image_shape=test.image_shape, binarize=test.binarize,
                      name=test.name, source_index=test.source_index[pick], meta=test.meta)  # [2000, 4096] bool
    return train, splits.val, test


@torch.no_grad()
def reconstruction(model, data, seed: int) -> dict:
    """-E_q log p(x|z) (one z per image) and KL(q(z|x) || p(z)), nats per image, averaged over ``data``."""
    from torch.distributions import kl_divergence

    torch.manual_seed(seed)
    batch = data.batch(torch.arange(len(data)))
    q = model.encode(batch)  # batch [N], event [d]
    recon = model.decode(q.sample(), batch).log_prob(batch.x)  # [N]
    kl = kl_divergence(q, model.prior(batch))  # [N]
    return {"recon_error": float(-recon.mean()), "kl": float(kl.mean())}


def run_one(family: str, value: float, seed: int, splits, args) -> dict:
    from elbolab.config import TrainConfig
    from elbolab.data.sprites import Sprites
    from elbolab.disentanglement import disentanglement_scores, model_encoder
    from elbolab.models import get_model_class
    from elbolab.trainer import Trainer

    train, val, test = splits
    cls = get_model_class(family)
    options = {**ARCH, SETTING[family]: value, **(FACTOR if family == "factor-vae" else {})}
    config = cls.config_class.from_data(train, **options)
    torch.manual_seed(seed)
    model = cls(config)
    out = Path(args.workdir) / f"{family}-{SETTING[family]}{value:g}-seed{seed}"
    train_config = TrainConfig(epochs=args.epochs, batch_size=64, lr=1e-3, seed=seed, progress=False,
                               tensorboard=False)
    started = time.perf_counter()
    Trainer(model, train_config, out, model_name=family,
            data_info={"source": "sprites", "binarize": "none", "seed": 0, "val_size": len(val), "data_dir": None,
                       "train_size": len(train)}).fit(train, val, overwrite=True)
    trained = time.perf_counter() - started
    model.eval()
    result = {"family": family, SETTING[family]: value, "seed": seed, "train_seconds": round(trained, 1),
              **reconstruction(model, test, seed)}
    started = time.perf_counter()
    scores = disentanglement_scores(model_encoder(model), Sprites(), seed=seed, batch_size=args.metric_batch,
                                    num_train=args.metric_train, num_eval=args.metric_eval,
                                    num_points=args.metric_points)
    result.update(beta_vae_metric=scores["beta_vae"]["eval_accuracy"],
                  factor_vae_metric=scores["factor_vae"]["eval_accuracy"],
                  active_dims=scores["factor_vae"]["num_active_dims"], mig=scores["mig"]["mig"],
                  mig_per_factor=scores["mig"]["per_factor"], metric_seconds=round(time.perf_counter() - started, 1))
    return result


def table(workdir: Path) -> list[str]:
    results = [json.loads(line) for path in sorted(workdir.glob("results-*.jsonl"))
               for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["family"], r.get("beta", r.get("gamma"))), []).append(r)

    def spread(rows, key, digits):
        values = [r[key] for r in rows]
        return (f"{common.fmt(common.median(values), digits)} "
                f"[{common.fmt(min(values), digits)}, {common.fmt(max(values), digits)}]")

    rows = []
    for (family, value), group in sorted(groups.items()):
        rows.append([family, f"{SETTING[family]} = {value:g}", str(len(group)), spread(group, "recon_error", 1),
                     spread(group, "kl", 1), spread(group, "beta_vae_metric", 3), spread(group, "factor_vae_metric", 3),
                     spread(group, "mig", 3), spread(group, "active_dims", 0),
                     common.fmt(common.median([r["train_seconds"] for r in group]), 0)])
    headers = ["model", "setting", "seeds", "recon error (nats)", "KL (nats)", "beta-VAE metric",
               "FactorVAE metric", "MIG", "active dims", "train s"]
    return common.markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(SETTING))
    parser.add_argument("--betas", default="1,4,16")
    parser.add_argument("--gammas", default="10,30,100")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-size", type=int, default=24_576)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--metric-batch", type=int, default=32, help="L, images per beta-VAE / FactorVAE example")
    parser.add_argument("--metric-train", type=int, default=500)
    parser.add_argument("--metric-eval", type=int, default=300)
    parser.add_argument("--metric-points", type=int, default=5000, help="MIG images and FactorVAE scale images")
    parser.add_argument("--workdir", default="/tmp/bench-disentanglement")
    parser.add_argument("--table", action="store_true", help="print the table of the results in --workdir")
    parser.add_argument("--out", help="also append the table to this markdown file")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    common.set_threads(1)
    if args.table:
        extra = {"budget": "see the module docstring; settings in each results-*.jsonl line"}
        common.write_output(common.header_lines("Disentanglement on sprites", common.machine_info(), extra)
                            + table(workdir), args.out)
        return
    if args.family is None:
        parser.error("give --family beta-vae or --family factor-vae (or --table)")
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    splits = reduced_splits(args.train_size, 2000, seed=0)
    print(f"sprites loaded and cut in {time.perf_counter() - started:.1f} s; peak memory "
          f"{common.proc_status_mib('VmHWM'):.0f} MiB", flush=True)
    values = [float(v) for v in (args.betas if args.family == "beta-vae" else args.gammas).split(",")]
    results_path = workdir / f"results-{args.family}.jsonl"
    results_path.unlink(missing_ok=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for value in values:
            result = run_one(args.family, value, seed, splits, args)
            result.update(train_size=args.train_size, epochs=args.epochs, metric_batch=args.metric_batch,
                          metric_train=args.metric_train, metric_eval=args.metric_eval,
                          metric_points=args.metric_points)
            with open(results_path, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps({k: v for k, v in result.items() if k != "mig_per_factor"}), flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
