"""Disentanglement on the procedural sprites at Kim & Mnih's step budget: beta-VAE and FactorVAE, resumable runs.

Kim & Mnih 2018 ("Disentangling by Factorising", ICML) train on dSprites for 3e5 steps at batch 64 with Adam (lr 1e-4)
and score with their FactorVAE metric; Locatello et al. 2019 report the spread of such scores over seeds. Issue 24's
target: at least one setting with MIG >= 0.15 and the FactorVAE metric >= 0.7, then the trade-off over beta and
gamma with at least 3 seeds.

Protocol here (one run per setting and seed; differences from the paper stated):
  * data: ``elbolab.data.sprites`` (737,280 images drawn from dSprites' five factors; 717,280 for training, 10,000
    for validation, 10,000 for testing; rendered here, not the dSprites file);
  * networks: an MLP 4096-400-10 encoder and the mirrored decoder, Bernoulli p(x|z), latent 10 (the paper: four
    convolutions and a 128-unit layer; elbolab's conv network trains about 6x slower per image on this CPU, which
    would make one run take most of a day: BENCHMARKS.md); the ``-2layer`` settings add a second hidden layer of 400
    on each side (4096-400-400-10), at about the same cost;
  * training: batch 64, Adam lr 1e-4 (betas 0.9, 0.999), 27 epochs = 302,616 steps (the paper: 3e5); FactorVAE's
    discriminator has 4 layers of 256 (the paper: 6 x 1000, which would make a run take over a day here), Adam lr 1e-4,
    betas (0.5, 0.9) as in the paper;
  * scores (``elbolab.disentanglement``, "quick" protocol: 2,000 training and 1,000 evaluation votes, 5,000 points
    for MIG): the beta-VAE metric, the FactorVAE metric and MIG, after every training chunk (about 30 minutes), so
    the file holds each run's scores against steps; the reconstruction error and KL are the validation split's, from
    metrics.jsonl; and how the code holds position (``position_geometry``: linear and nearest-neighbour R^2 of
    posX / posY, the dimensions and the angle of one sprite's 32 x 32 position grid), which tells a folded code
    from a rotated one where MIG scores both near 0.

One call trains one run for at most --hours and resumes it with ``--resume`` the next time:
  OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/reproduce/disentanglement.py beta-vae-b4 --seed 0 --hours 2 \\
      >> /work/runs/disentanglement/beta-vae-b4-seed0.log 2>&1 &
It writes benchmarks/reproduce/results/disentanglement_SETTING-seedS.json (small: scores and curves, no weights).
``--table`` prints the scoreboard rows, ``--figure PNG`` draws the scores against steps, the trade-off and each
run's position grid; ``--rescore`` scores a run's current weights again (after the scores gained a field).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
from chunked import (
    add_budget_arguments,
    add_output_arguments,
    cpu_model,
    deadline_from,
    elbolab,
    epochs_done,
    log,
    read_metrics,
    read_sessions,
    table_or_figure,
    train_in_chunks,
    train_seconds,
)

RESULTS = Path(__file__).resolve().parent / "results"
RUNS_DEFAULT = Path("/work/runs/disentanglement")
EPOCHS = 27  # 27 x 11,208 steps of 64 = 302,616 steps (Kim & Mnih: 3e5)
TARGET = {"mig": 0.15, "factor_vae_metric": 0.7}
ONE_LAYER = ["--arch", "mlp", "--hidden", "400", "--latent-dim", "10"]  # MLP 4096-400-10 and its mirror
# one more hidden layer each side, at about the same cost: can the decoder then draw a sprite at (x, y) from a flat
# 2-D position code, instead of the folded one the one-layer runs learn (docs/reproductions.md)?
TWO_LAYER = ["--arch", "mlp", "--hidden", "400,400", "--latent-dim", "10"]
# the paper's 6 x 1000 discriminator would make a run take over a day on this CPU (docs/reproductions.md); 4 x 256
# costs little more than the beta-VAE
SMALL_DISCRIMINATOR = ["--set", "discriminator_width=256", "--set", "discriminator_depth=4"]
# setting -> (elbolab model, its options, its networks)
SETTINGS = {
    "beta-vae-b1": ("beta-vae", ["--beta", "1"], ONE_LAYER),
    "beta-vae-b4": ("beta-vae", ["--beta", "4"], ONE_LAYER),
    "beta-vae-b16": ("beta-vae", ["--beta", "16"], ONE_LAYER),
    "factor-vae-g10": ("factor-vae", ["--set", "gamma=10", *SMALL_DISCRIMINATOR], ONE_LAYER),
    "factor-vae-g40": ("factor-vae", ["--set", "gamma=40", *SMALL_DISCRIMINATOR], ONE_LAYER),
    "beta-vae-b4-2layer": ("beta-vae", ["--beta", "4"], TWO_LAYER),
    "beta-vae-b16-2layer": ("beta-vae", ["--beta", "16"], TWO_LAYER),
    "factor-vae-g40-2layer": ("factor-vae", ["--set", "gamma=40", *SMALL_DISCRIMINATOR], TWO_LAYER),
}


def train_command(setting: str, run: Path, seed: int, target: int, resume: bool, train_size: int = 0) -> list[str]:
    common = ["--epochs", str(target), "--checkpoint-every", "2000", "--no-progress", "--no-tensorboard"]
    if resume:
        return elbolab() + ["train", "--out", str(run), "--resume", *common]
    model, options, network = SETTINGS[setting]
    subset = ["--train-size", str(train_size)] if train_size else []
    return elbolab() + ["train", model, "--out", str(run), "--data", "sprites", *network, *options, "--batch-size",
                        "64", "--lr", "1e-4", "--seed", str(seed), *subset, *common]


def position_geometry(encode, data, *, seed: int = 0, num_points: int = 5000, sprites: int = 3) -> dict:
    """How a code holds the sprite's position (posX, posY): what MIG and the FactorVAE metric cannot tell apart.

    * ``r2_linear`` / ``r2_knn``: the fraction of each position factor's variance that a linear map / 10 nearest
      neighbours of the code predict, fitted on half of ``num_points`` random images and scored on the other half.
      Position in the code but not linear in it (kNN high, linear low) is a folded code, not a rotated one (a rotation
      keeps the linear R^2 at 1).
    * ``grid_dims``: the participation ratio (sum l)^2 / sum l^2 of the eigenvalues l of the codes' covariance over the
      32 x 32 positions of one sprite (shape, scale and orientation fixed), averaged over ``sprites`` random sprites:
      2 for a flat grid on two axes (aligned or rotated), more when the grid is folded through more dimensions.
    * ``axis_angle``: the angle (degrees, 0 to 45) between the x or y axis, whichever is nearer, and each code
      dimension's linear trend over that grid (its least-squares slope in x and in y), averaged with the weight of the
      variance the trend explains: 0 when each dimension follows x alone or y alone (folded or not), 45 for a code
      of x + y and x - y, which a Gaussian prior scores like x and y.
    * ``grid``: the first sprite's 32 x 32 grid projected on its two principal axes, [x][y] -> (u, v), for a figure.
    """
    from sklearn.linear_model import LinearRegression
    from sklearn.neighbors import KNeighborsRegressor

    from elbolab.disentanglement import encode_factors

    names = list(data.factor_names)
    ix, iy = names.index("posX"), names.index("posY")
    rng = np.random.default_rng(seed)
    factors = data.sample_factors(num_points, rng)
    codes = encode_factors(encode, data, factors)  # [N, d]
    half = num_points // 2
    r2_linear, r2_knn = {}, {}
    for name, k in (("posX", ix), ("posY", iy)):
        target = factors[:, k].astype(float)
        for r2, model in ((r2_linear, LinearRegression()), (r2_knn, KNeighborsRegressor(n_neighbors=10))):
            model.fit(codes[:half], target[:half])
            r2[name] = round(float(model.score(codes[half:], target[half:])), 3)
    nx, ny = data.factor_sizes[ix], data.factor_sizes[iy]
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    position = np.stack([gx.ravel() - gx.mean(), gy.ravel() - gy.mean()], axis=1).astype(float)  # [nx * ny, 2]
    dims, angles, grid = [], [], None
    for sprite in data.sample_factors(sprites, rng):
        rows = np.repeat(sprite[None], nx * ny, axis=0)
        rows[:, ix], rows[:, iy] = gx.ravel(), gy.ravel()
        centred = encode_factors(encode, data, rows)
        centred -= centred.mean(0)  # [nx * ny, d]
        eigen = np.clip(np.linalg.eigvalsh(centred.T @ centred / len(centred)), 0, None)
        dims.append(float(eigen.sum() ** 2 / max((eigen ** 2).sum(), 1e-300)))
        slopes = np.linalg.lstsq(position, centred, rcond=None)[0]  # [2, d]: each dimension's slope in x and in y
        angle = np.degrees(np.arctan2(np.abs(slopes[1]), np.abs(slopes[0])))  # [d], 0 (x) .. 90 (y)
        weight = ((position @ slopes) ** 2).sum(0)  # [d] variance of each dimension's linear trend
        angles.append(float((np.minimum(angle, 90 - angle) * weight).sum() / max(weight.sum(), 1e-300)))
        if grid is None:
            _, _, axes = np.linalg.svd(centred, full_matrices=False)
            grid = np.round(centred @ axes[:2].T, 3).reshape(nx, ny, 2).tolist()
    return {"r2_linear": r2_linear, "r2_knn": r2_knn, "grid_dims": round(float(np.mean(dims)), 2),
            "axis_angle": round(float(np.mean(angles)), 1), "grid": grid}


def score(run: Path, seed: int) -> dict:
    """The three metrics of the run's current weights (quick protocol), with the epoch and step they belong to."""
    import torch

    from elbolab import loading
    from elbolab.disentanglement import disentanglement_scores, model_encoder, run_factor_data

    torch.set_num_threads(1)
    metrics = read_metrics(run)
    done = epochs_done(metrics)
    model, config = loading.load_run(run)
    data = run_factor_data(config["data"])
    scores = disentanglement_scores(model_encoder(model), data, seed=seed, protocol="quick", progress=False)
    val = metrics.get(done, {}).get("val", {})
    return {"epoch": done, "step": metrics[done]["train"].get("step"), "mig": round(scores["mig"]["mig"], 4),
            "mig_per_factor": {k: round(v, 4) for k, v in scores["mig"]["per_factor"].items()},
            "factor_vae_metric": scores["factor_vae"]["eval_accuracy"],
            "factor_vae_metric_se": scores["factor_vae"].get("eval_accuracy_se"),
            "beta_vae_metric": scores["beta_vae"]["eval_accuracy"],
            "active_dims": scores["factor_vae"]["num_active_dims"],
            "val_recon_error": round(-val["recon"], 3) if "recon" in val else None,
            "val_kl": round(val["kl"], 3) if "kl" in val else None,
            "position": position_geometry(model_encoder(model), data, seed=seed),
            "protocol": scores["protocol"], "scored_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def result_path(args, name: str) -> Path:
    return Path(args.results_dir) / f"disentanglement_{name}.json"


def without_old_grids(scores: list[dict]) -> list[dict]:
    """The scores with the position grid (2,048 numbers) kept for the last one only: the file stays small."""
    slim = [{**x, "position": {k: v for k, v in x["position"].items() if k != "grid"}} if "position" in x else x
            for x in scores[:-1]]
    return slim + scores[-1:]


def write_result(setting: str, seed: int, run: Path, args, scores: list[dict]) -> Path:
    model, options, network = SETTINGS[setting]
    metrics = read_metrics(run)
    done = epochs_done(metrics)
    curve = {"epoch": [], "step": [], "val_recon_error": [], "val_kl": []}
    for e in sorted(metrics):
        val = metrics[e].get("val", {})
        if "train" in metrics[e] and "recon" in val:
            curve["epoch"].append(e)
            curve["step"].append(metrics[e]["train"].get("step"))
            curve["val_recon_error"].append(round(-val["recon"], 3))
            curve["val_kl"].append(round(val["kl"], 3))
    result = {"setting": setting, "model": model, "options": options, "seed": seed, "epochs_done": done,
              "epochs": EPOCHS, "steps_done": metrics[done]["train"].get("step") if done else 0,
              "protocol": f"sprites (elbolab.data.sprites), MLP 4096-{network[3].replace(',', '-')}-10 + mirrored "
                          "decoder, Bernoulli, batch 64, Adam lr 1e-4, 27 epochs = 302,616 steps; scores: "
                          "elbolab.disentanglement quick protocol",
              "train_hours": round(train_seconds(metrics) / 3600, 3), "cpu": cpu_model(), "torch_threads": 1,
              "precision": "fp32", "run_dir": str(run), "scores": without_old_grids(scores), "curve": curve,
              "chunks": read_sessions(run),
              "command": f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce/disentanglement.py {setting} "
                         f"--seed {seed} --hours H",
              "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    out = result_path(args, run.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out


def load_results(args) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(args.results_dir).glob("disentanglement_*.json"))]


def markdown_table(args) -> str:
    """One row per setting: the last scores of each seed's run (median [min, max] over seeds)."""
    groups: dict[str, list[dict]] = {}
    for r in load_results(args):
        if r["scores"]:
            groups.setdefault(r["setting"], []).append(r)

    def spread(rows, key, digits=3):
        values = [r["scores"][-1][key] for r in rows]
        med = statistics.median(values)
        return f"{med:.{digits}f}" + (f" [{min(values):.{digits}f}, {max(values):.{digits}f}]" if len(values) > 1
                                      else "")

    lines = ["| setting | seeds | steps (of 302,616) | MIG | FactorVAE metric | beta-VAE metric | active dims | "
             "val recon error (nats) | val KL (nats) | position R^2, linear / kNN (posX; posY) | position grid: "
             "dims (flat: 2) / angle to the axes (deg) | training h per run | target met (MIG >= 0.15 and "
             "FactorVAE >= 0.7) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def position(rows):
        last = [r["scores"][-1].get("position") for r in rows]
        if not all(last):
            return "-", "-"
        r2 = "; ".join(", ".join(f"{p['r2_linear'][f]:.2f} / {p['r2_knn'][f]:.2f}" for p in last)
                       for f in ("posX", "posY"))
        if not all("axis_angle" in p for p in last):
            return r2, spread([{"scores": [p]} for p in last], "grid_dims", 1) + " / -"
        return r2, (spread([{"scores": [p]} for p in last], "grid_dims", 1) + " / "
                    + spread([{"scores": [p]} for p in last], "axis_angle", 0))

    for setting in SETTINGS:
        rows = groups.get(setting)
        if not rows:
            continue
        met = sum(r["scores"][-1]["mig"] >= TARGET["mig"] and r["scores"][-1]["factor_vae_metric"] >=
                  TARGET["factor_vae_metric"] for r in rows)
        steps = ", ".join(f"{r['scores'][-1]['step']:,}" for r in rows)
        hours = ", ".join(f"{r['train_hours']:.2f}" for r in rows)
        lines.append(f"| {setting} | {', '.join(str(r['seed']) for r in rows)} | {steps} | {spread(rows, 'mig')} | "
                     f"{spread(rows, 'factor_vae_metric')} | {spread(rows, 'beta_vae_metric')} | "
                     f"{spread(rows, 'active_dims', 0)} | {spread(rows, 'val_recon_error', 1)} | "
                     f"{spread(rows, 'val_kl', 1)} | {' | '.join(position(rows))} | {hours} | {met} of {len(rows)} |")
    return "\n".join(lines)


def figure(args, path: Path) -> None:
    """Left: MIG and the FactorVAE metric against steps per run; right: reconstruction error against the FactorVAE
    metric at each run's last score (Kim & Mnih's trade-off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load_results(args)
    grids = [(i, r) for i, r in enumerate(results) if r["scores"] and r["scores"][-1].get("position")]
    columns = max(len(grids), 2)
    fig = plt.figure(figsize=(max(11, 3.2 * columns), 4.5 + (3.6 if grids else 0)))
    rows = plt.GridSpec(2 if grids else 1, 2 * columns, figure=fig, height_ratios=[4.5, 3.6] if grids else None)
    left, right = fig.add_subplot(rows[0, :columns]), fig.add_subplot(rows[0, columns:])
    for k, (i, r) in enumerate(grids):
        # the position grid of one sprite in the code's two principal axes: x lines blue, y lines red
        ax, last = fig.add_subplot(rows[1, 2 * k:2 * k + 2]), r["scores"][-1]
        grid = np.asarray(last["position"]["grid"])  # [32, 32, 2]
        for j in range(grid.shape[0]):
            ax.plot(grid[j, :, 0], grid[j, :, 1], color="tab:blue", lw=0.5)
            ax.plot(grid[:, j, 0], grid[:, j, 1], color="tab:red", lw=0.5)
        ax.set_title(f"{r['setting']} seed {r['seed']}, step {last['step']:,}\nposition grid spans "
                     f"{last['position']['grid_dims']:.1f} dims (flat: 2)", fontsize=9, color=f"C{i}")
        ax.set(xticks=[], yticks=[], xlabel="one sprite's 32 x 32 positions, coded,\non the code's 2 principal "
               "axes (blue: x fixed,\nred: y fixed)")
    for i, r in enumerate(results):
        s = [x for x in r["scores"] if x.get("step")]
        if not s:
            continue
        steps = [x["step"] for x in s]
        label = f"{r['setting']} seed {r['seed']}"
        left.plot(steps, [x["mig"] for x in s], "o-", color=f"C{i}", lw=1, label=f"{label}: MIG")
        left.plot(steps, [x["factor_vae_metric"] for x in s], "s--", color=f"C{i}", lw=1, label=f"{label}: FactorVAE")
        right.plot(s[-1]["val_recon_error"], s[-1]["factor_vae_metric"], "o", color=f"C{i}", label=label)
    for value in TARGET.values():
        left.axhline(value, color="0.6", lw=0.7, ls=":")
    left.axvline(302_616, color="0.6", lw=0.7)
    left.set(xlabel="training steps (batch 64; grey line: the paper's 3e5)", ylabel="score",
             title="scores against steps (dotted: issue 24's targets)", ylim=(0, 1))
    right.set(xlabel="validation reconstruction error (nats per image)", ylabel="FactorVAE metric",
              title="reconstruction vs disentanglement (last scores)", ylim=(0, 1))
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("setting", nargs="?", choices=list(SETTINGS))
    p.add_argument("--seed", type=int, default=0)
    add_budget_arguments(p)
    p.add_argument("--runs-dir", default=str(RUNS_DEFAULT), help="run folders (outside the repository)")
    p.add_argument("--results-dir", default=str(RESULTS), help="where the result JSON goes (a test: elsewhere)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="the run's length (the protocol: 27; a smoke test: 1)")
    p.add_argument("--train-size", type=int, default=0, help="first N training images only (a smoke test; 0: all)")
    p.add_argument("--rescore", action="store_true",
                   help="score the run's current weights again (replacing that epoch's scores) and exit, no training")
    add_output_arguments(p)
    args = p.parse_args(argv)
    if table_or_figure(args, markdown_table, figure):
        return 0
    if args.setting is None:
        p.error("a setting is needed (or --table / --figure)")
    run = Path(args.runs_dir) / f"{args.setting}-seed{args.seed}"
    run.parent.mkdir(parents=True, exist_ok=True)
    previous = result_path(args, run.name)
    scores = json.loads(previous.read_text())["scores"] if previous.is_file() else []
    if args.rescore:
        done = epochs_done(read_metrics(run))
        if not done:
            p.error(f"--rescore: expected a run with trained epochs in {run}, found none; train it first")
        scores = [x for x in scores if x["epoch"] != done] + [score(run, args.seed)]
        scores.sort(key=lambda x: x["epoch"])
        log(f"{run.name}: rescored epoch {done}; wrote {write_result(args.setting, args.seed, run, args, scores)}")
        return 0
    deadline = deadline_from(args.hours, args.until)
    log(f"{run.name}: deadline {dt.datetime.fromtimestamp(deadline, dt.timezone.utc).strftime('%H:%M')} UTC; "
        f"CPU {cpu_model()}; load {os.getloadavg()[0]:.2f}")

    def after_chunk() -> None:
        done = epochs_done(read_metrics(run))
        if done and not any(s["epoch"] == done for s in scores):
            scores.append(score(run, args.seed))
            last = scores[-1]
            log(f"{run.name}: epoch {done} (step {last['step']:,}): MIG {last['mig']:.3f}, FactorVAE metric "
                f"{last['factor_vae_metric']:.3f}, beta-VAE metric {last['beta_vae_metric']:.3f}, active dims "
                f"{last['active_dims']} ({last['protocol']['seconds']:.0f} s)")
        log(f"{run.name}: wrote {write_result(args.setting, args.seed, run, args, scores)}")

    # scoring takes a minute or two after each chunk: keep that much more margin before the deadline
    code = train_in_chunks(run, args.epochs, lambda target, resume: train_command(args.setting, run, args.seed, target,
                                                                                  resume, args.train_size),
                           deadline, chunk_minutes=args.chunk_minutes, margin_seconds=args.margin_seconds + 180,
                           after_chunk=after_chunk)
    return code


if __name__ == "__main__":
    sys.exit(main())
