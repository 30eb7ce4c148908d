"""Pyro's CVAE tutorial table (MNIST quadrant completion) on Pyro's own protocol, resumable across sessions.

The table (Pyro, tutorial/source/cvae.ipynb, "estimating the marginal conditional log-likelihoods (CLLs)", lower is
better; read from github.com/pyro-ppl/pyro at commit ff6ae1c, 2024-10-24), columns 1 / 2 / 3 quadrants given:
  NN (baseline)       100.4 / 61.9 / 25.4
  CVAE (Monte Carlo)   71.8 / 51.0 / 24.2
The text under it: "We trained only for 50 epochs with early stopping patience of 3 epochs".

Pyro's protocol as its source runs it (examples/cvae: main.py, mnist.py, baseline.py, cvae.py, util.py):
  * data: torchvision MNIST, grey levels in [0, 1] (to_tensor: no binarisation) under a Bernoulli likelihood (so
    the numbers are cross-entropies); the missing pixels only are scored. Quadrants given: 1 = bottom-left,
    2 = left half, 3 = all but bottom-right (elbolab.models.cvae.quadrant_mask is the same mask).
  * "train" is all 60,000 training images; "val" is the 10,000 MNIST test images (``train=False``): early stopping
    and the table are both on the test images.
  * Adam, lr 1e-3, batch 128; at most --num-epochs epochs (the text: 50; main.py's default is 101), stopping when the
    validation loss (1-particle -ELBO for the CVAE, masked cross-entropy for the baseline) has not improved for 3
    epochs in a row (patience 3), then the best-on-validation weights are restored.
  * the baseline: [image with missing pixels = -1] -> 500 -> 500 -> 784 sigmoid (ReLU), masked cross-entropy.
  * the CVAE: z of 200, MLPs 500-500 (ReLU); prior network p(z|x, y_hat) fed with the baseline's guess; decoder
    p(y|z); recognition network q(z|x, y).
  * table: baseline = masked cross-entropy per image; CVAE = Trace_ELBO(num_particles=10) loss per image, i.e. the
    -ELBO of the missing pixels with q(z|x, y), log p(z|x) and log q sampled (10 particles), on the 10,000 test
    images (batches of 32, the mean of the per-batch means).

Ours: elbolab's ``cvae`` (condition=quadrants, conditional_prior=True, hidden 500,500, latent_dim 200, relu,
Bernoulli) trained by elbolab's Trainer on all 60,000 training images with the 10,000 test images as its
validation set (as Pyro), one epoch at a time, with Pyro's early-stopping rule on the logged validation ELBO
(1 sample, analytic KL) and the best-on-validation weights kept (keep_best); the baseline is Pyro's network
(benchmarks/bench_cvae.py's ``baseline_nll``), trained here with the same rule. Reported on the 10,000 test images:
the -ELBO with 10 particles per image (Pyro's quantity: log w = log p(y|z,c) + log p(z|c) - log q(z|x,c), averaged
over the particles, then over the images), the same -ELBO averaged over K particles (less noise, same expectation),
and the importance-sampled -log p(y | x) from the same K particles (a tighter bound than Pyro reports).

Differences that remain: elbolab's CVAE decodes from (z, observed pixels) and its prior network sees the observed
pixels and their mask, with no baseline inside (Pyro's prior network sees the baseline's guess, its decoder sees z
only); elbolab's validation ELBO uses the analytic KL; our table mean is over images, not over batches of 32.

Run folders: /work/runs/cvae_pyro/cvae-qN (elbolab run folder) and /work/runs/cvae_pyro/baseline-qN.pt (the baseline's
checkpoint); the result file benchmarks/reproduce/results/cvae_pyro.json is rewritten after every stage. A second call
continues where the first stopped (by the deadline, or killed: from the last epoch's checkpoint).

  OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/reproduce/cvae_pyro.py --until 21:20 \\
      >> /work/runs/cvae_pyro/cvae_pyro.log 2>&1 &
  .venv/bin/python benchmarks/reproduce/cvae_pyro.py --table     # the markdown rows from the result file
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path

from chunked import cpu_model, log

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: bench_cvae's baseline network, _common

RESULTS = HERE / "results" / "cvae_pyro.json"
RUNS_DEFAULT = Path("/work/runs/cvae_pyro")
PYRO = {"CVAE": {1: 71.8, 2: 51.0, 3: 24.2}, "baseline": {1: 100.4, 2: 61.9, 3: 25.4}}
PYRO_SOURCE = ("Pyro CVAE tutorial (tutorial/source/cvae.ipynb, results table: rows 'NN (baseline)' and "
               "'CVAE (Monte Carlo)'), github.com/pyro-ppl/pyro commit ff6ae1c (2024-10-24), read 2026-12-07")
HIDDEN, LATENT = (500, 500), 200


def load_splits(data_dir: str):
    """(all 60,000 training images, the 10,000 test images), grey levels in [0, 1], as Pyro."""
    from elbolab.data import load_data

    s = load_data("mnist", data_dir=data_dir, binarize="none", seed=0, val_size=10000)
    tr, va = s.train, s.val
    order = torch.cat([tr.source_index, va.source_index]).argsort()
    full = dataclasses.replace(tr, x=torch.cat([tr.x, va.x])[order], y=torch.cat([tr.y, va.y])[order],
                               source_index=torch.cat([tr.source_index, va.source_index])[order],
                               name="mnist/train (all 60000)")
    return full, s.test


# ----- early stopping (Pyro's rule) -----
def early_stop_state(losses: list[float], patience: int) -> tuple[int, int, bool]:
    """(best epoch (1-based), epochs since it, stop?) for validation losses in epoch order, Pyro's rule: a strictly
    lower loss resets the count, otherwise it grows; stop when it reaches ``patience``."""
    best, best_epoch, count = math.inf, 0, 0
    for epoch, loss in enumerate(losses, start=1):
        if loss < best:
            best, best_epoch, count = loss, epoch, 0
        else:
            count += 1
        if count >= patience:
            return best_epoch, count, True
    return best_epoch, count, False


# ----- the CVAE -----
def cvae_val_losses(run: Path) -> tuple[list[float], list[float]]:
    from elbolab import runs

    records, _ = runs.read_metrics(run / "metrics.jsonl")
    val = {r["epoch"]: -r["elbo"] for r in records if r.get("split") == "val" and "elbo" in r}
    secs = {r["epoch"]: r.get("seconds", 0.0) for r in records if r.get("split") == "train"}
    epochs = sorted(val)
    return [val[e] for e in epochs], [secs.get(e, 0.0) for e in epochs]


def cvae_train_epoch(run: Path, q: int, epoch: int, train, test, seed: int) -> None:
    """Train the run to ``epoch`` epochs (a new run at epoch 1, else a resume from its checkpoint)."""
    from elbolab.config import TrainConfig
    from elbolab.models.cvae import CVAE, CVAEConfig
    from elbolab.trainer import Trainer

    config = CVAEConfig.from_data(train, condition="quadrants", given_quadrants=q, conditional_prior=True,
                                  hidden=HIDDEN, latent_dim=LATENT, activation="relu", likelihood="bernoulli")
    torch.manual_seed(seed)
    model = CVAE(config)
    tc = TrainConfig(epochs=epoch, batch_size=128, lr=1e-3, seed=seed, progress=False, tensorboard=False,
                     keep_best=True)
    data_info = {"source": "mnist", "binarize": "none", "seed": 0, "val_size": None, "data_dir": None,
                 "train_size": None, "note": "all 60000 training images; validation = the 10000 test images "
                                             "(Pyro's CVAE tutorial protocol); built by benchmarks/reproduce/"
                                             "cvae_pyro.py"}
    resume = (run / "checkpoint.safetensors").is_file() and (run / "config.json").is_file()
    trainer = Trainer(model, tc, run, model_name="cvae", data_info=data_info)
    trainer.fit(train, test, resume=resume, overwrite=not resume)


@torch.no_grad()
def cvae_scores(run: Path, test, k: int, particles: int, seed: int = 0) -> dict:
    """On the test images, with the best-on-validation weights: -ELBO from ``particles`` particles (Pyro's
    estimator), -ELBO from all k, and -log p(y|x) by importance sampling with k; per image, then averaged."""
    from elbolab.loading import load_run

    model, _ = load_run(run, weights="best")
    torch.manual_seed(seed)
    elbo_p, elbo_k, is_k = [], [], []
    gen = torch.Generator().manual_seed(seed)
    for index in torch.arange(len(test)).split(250):
        batch = test.batch(index, gen)
        q = model.encode(batch)
        z = q.sample((k,))  # [k, B, d]
        logw = model.decode(z, batch).log_prob(batch.x) + model.prior(batch).log_prob(z) - q.log_prob(z)
        logw = logw.double()
        elbo_p.append(logw[:particles].mean(0))
        elbo_k.append(logw.mean(0))
        is_k.append(torch.logsumexp(logw, 0) - math.log(k))
    out = {}
    for name, values in (("neg_elbo_pyro_particles", elbo_p), ("neg_elbo_k", elbo_k), ("neg_log_p_is", is_k)):
        v = -torch.cat(values)
        out[name] = round(float(v.mean()), 3)
        out[name + "_se_over_images"] = round(float(v.std() / math.sqrt(len(v))), 3)
    out.update(particles=particles, k=k, n_test_images=len(test), weights="best (model.best.safetensors)")
    return out


# ----- the baseline (Pyro's BaselineNet) -----
def baseline_train(path: Path, q: int, train, test, args, deadline: float, status: dict) -> dict:
    """Train with Pyro's early stopping, one epoch at a time, checkpointing to ``path`` after each."""
    import _common as common
    from bench_cvae import baseline_nll

    from elbolab.models.cvae import quadrant_mask

    observed = quadrant_mask(train.image_shape, q)
    torch.manual_seed(args.seed)
    net = common.mlp_layers((train.dim, *HIDDEN, train.dim), "relu", final_activation=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    state = {"epoch": 0, "val": [], "seconds": [], "best": None}
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"])
    x_test = test.batch(torch.arange(len(test))).x
    while True:
        best_epoch, count, stop = early_stop_state(state["val"], args.patience)
        if stop or state["epoch"] >= args.max_epochs:
            break
        spe = max(state["seconds"][-3:]) if state["seconds"] else 10.0
        if time.time() + 1.3 * spe + args.margin_seconds > deadline:
            status["stopped_by_deadline"] = True
            log(f"baseline q{q}: the next epoch does not fit before the deadline; stopping at {state['epoch']}")
            break
        t0 = time.perf_counter()
        net.train()
        g = torch.Generator().manual_seed(args.seed * 1000 + state["epoch"])
        for index in torch.randperm(len(train), generator=g).split(128):
            loss = baseline_nll(net, train.batch(index).x, observed).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val = float(torch.cat([baseline_nll(net, x, observed) for x in x_test.split(1000)]).double().mean())
        state["epoch"] += 1
        state["val"].append(round(val, 4))
        state["seconds"].append(round(time.perf_counter() - t0, 2))
        if state["best"] is None or val < min(state["val"][:-1], default=math.inf):
            state["best"] = {k: v.clone() for k, v in net.state_dict().items()}
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "state": state,
                    "rng": torch.get_rng_state()}, path)
        log(f"baseline q{q}: epoch {state['epoch']}, test cross-entropy {val:.3f} ({state['seconds'][-1]:.1f} s)")
    best_epoch, count, stop = early_stop_state(state["val"], args.patience)
    done = stop or state["epoch"] >= args.max_epochs
    out = {"epochs_trained": state["epoch"], "best_epoch": best_epoch, "early_stopped": stop, "complete": done,
           "val_curve": state["val"], "train_seconds": round(sum(state["seconds"]), 1),
           "seconds_per_epoch_median": sorted(state["seconds"])[len(state["seconds"]) // 2]
           if state["seconds"] else None}
    if done and state["best"] is not None:  # the table value: the best weights' masked cross-entropy
        net.load_state_dict(state["best"])
        net.eval()
        with torch.no_grad():
            v = torch.cat([baseline_nll(net, x, observed) for x in x_test.split(1000)]).double()
        out["test_cross_entropy"] = round(float(v.mean()), 3)
        out["test_cross_entropy_se_over_images"] = round(float(v.std() / math.sqrt(len(v))), 3)
    return out


# ----- one quadrant setting -----
def run_quadrants(q: int, args, deadline: float, result: dict, train, test) -> None:
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    entry = result["quadrants"].setdefault(str(q), {})
    status: dict = {}
    # the CVAE
    run = runs_dir / f"cvae-q{q}"
    while True:
        losses, secs = cvae_val_losses(run) if (run / "metrics.jsonl").is_file() else ([], [])
        best_epoch, count, stop = early_stop_state(losses, args.patience)
        if stop or len(losses) >= args.max_epochs:
            break
        spe = max(secs[-3:]) if secs else 30.0
        if time.time() + 1.3 * spe + args.margin_seconds > deadline:
            status["stopped_by_deadline"] = True
            log(f"cvae q{q}: the next epoch does not fit before the deadline; stopping at {len(losses)}")
            break
        cvae_train_epoch(run, q, len(losses) + 1, train, test, args.seed)
        losses, secs = cvae_val_losses(run)
        log(f"cvae q{q}: epoch {len(losses)}, test -ELBO (1 sample) {losses[-1]:.3f} ({secs[-1]:.1f} s); "
            f"load {os.getloadavg()[0]:.2f}")
        entry["cvae"] = cvae_summary(run, args, losses, secs, entry.get("cvae", {}))
        write_result(result)
    losses, secs = cvae_val_losses(run) if (run / "metrics.jsonl").is_file() else ([], [])
    cvae = cvae_summary(run, args, losses, secs, entry.get("cvae", {}))
    if cvae["complete"] and "test" not in cvae:
        need = 1.5 * (cvae.get("eval_seconds_guess") or 120) + args.margin_seconds
        if time.time() + need > deadline:
            status["stopped_by_deadline"] = True
            log(f"cvae q{q}: the evaluation does not fit before the deadline")
        else:
            t0 = time.perf_counter()
            cvae["test"] = cvae_scores(run, test, args.k, args.particles)
            cvae["test"]["seconds"] = round(time.perf_counter() - t0, 1)
            log(f"cvae q{q}: {cvae['test']}")
    entry["cvae"] = cvae
    write_result(result)
    # the baseline
    if not args.skip_baseline and not entry.get("baseline", {}).get("test_cross_entropy"):
        entry["baseline"] = baseline_train(runs_dir / f"baseline-q{q}.pt", q, train, test, args, deadline, status)
        write_result(result)
    entry["stopped_by_deadline"] = bool(status.get("stopped_by_deadline"))


def cvae_summary(run: Path, args, losses, secs, previous: dict) -> dict:
    best_epoch, count, stop = early_stop_state(losses, args.patience)
    out = {"run_dir": str(run), "epochs_trained": len(losses), "best_epoch": best_epoch, "early_stopped": stop,
           "complete": stop or len(losses) >= args.max_epochs,
           "val_curve_neg_elbo_1sample": [round(v, 3) for v in losses], "train_seconds": round(sum(secs), 1),
           "seconds_per_epoch_median": sorted(secs)[len(secs) // 2] if secs else None}
    if "test" in previous and previous.get("epochs_trained") == len(losses):
        out["test"] = previous["test"]
    return out


def read_result() -> dict:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text())
    return {}


def write_result(result: dict) -> None:
    result["written_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


def smoke_settings(args) -> None:
    """--results and --train-size: a quick test elsewhere (never the scoreboard's file)."""
    global RESULTS
    if args.results:
        RESULTS = Path(args.results)


def stopped_how(r: dict, cap: int) -> str:
    if (r.get("epochs_trained") or 0) >= cap:
        return f" (the {cap}-epoch cap)"
    if r.get("early_stopped"):
        return " (patience 3)"
    return " (unfinished)" if r else ""


def markdown_table(result: dict) -> str:
    lines = ["| quadrants given | Pyro: baseline | ours: baseline (cross-entropy; ± s.e. over test images) | "
             "Pyro: CVAE (-ELBO, 10 particles) | ours: CVAE -ELBO, 10 particles (± s.e. over test images) | "
             "ours: CVAE -ELBO, K particles | ours: CVAE -log p (IS, K) | epochs (best / trained), CVAE; baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for q in ("1", "2", "3"):
        e = result.get("quadrants", {}).get(q)
        pb, pc = PYRO["baseline"][int(q)], PYRO["CVAE"][int(q)]
        if not e:
            lines.append(f"| {q} | {pb} | not run yet | {pc} | not run yet | | | |")
            continue
        c, b = e.get("cvae", {}), e.get("baseline", {})
        t = c.get("test")
        bl = (f"{b['test_cross_entropy']:.1f} (± {b['test_cross_entropy_se_over_images']:.1f})"
              if b.get("test_cross_entropy") is not None else "not finished")
        if t:
            c10 = f"{t['neg_elbo_pyro_particles']:.1f} (± {t['neg_elbo_pyro_particles_se_over_images']:.1f})"
            ck = f"{t['neg_elbo_k']:.1f} (K = {t['k']})"
            cis = f"{t['neg_log_p_is']:.1f} (K = {t['k']})"
        else:
            c10 = ck = cis = "not finished"
        cap = result.get("ours", {}).get("max_epochs", 50)
        ep = (f"{c.get('best_epoch')} / {c.get('epochs_trained')}{stopped_how(c, cap)}; "
              f"{b.get('best_epoch', '-')} / {b.get('epochs_trained', '-')}{stopped_how(b, cap)}")
        lines.append(f"| {q} | {pb} | {bl} | {pc} | {c10} | {ck} | {cis} | {ep} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quadrants", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--hours", type=float, help="stop cleanly before this many hours from now")
    budget.add_argument("--until", help="stop cleanly before this UTC time today, HH:MM")
    p.add_argument("--runs-dir", default=str(RUNS_DEFAULT))
    p.add_argument("--data-dir", default=os.environ.get("ELBOLAB_DATA", "/work/shared/data"))
    p.add_argument("--max-epochs", type=int, default=50, help="Pyro's tutorial text: 50")
    p.add_argument("--patience", type=int, default=3, help="Pyro's early_stop_patience: 3")
    p.add_argument("--particles", type=int, default=10, help="Pyro's num_particles for the table: 10")
    p.add_argument("--k", type=int, default=100, help="importance samples per test image (our IS column)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--margin-seconds", type=float, default=60.0)
    p.add_argument("--table", action="store_true", help="print the markdown rows from the result file and exit")
    p.add_argument("--results", help="another result file (a test); default benchmarks/reproduce/results/"
                                     "cvae_pyro.json")
    p.add_argument("--train-size", type=int, help="a test only: the first N training images")
    args = p.parse_args(argv)
    smoke_settings(args)
    if args.table:
        print(markdown_table(read_result()))
        return 0
    torch.set_num_threads(1)
    started = time.time()
    if args.until:
        hh, mm = (int(v) for v in args.until.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        target = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if target <= now:
            sys.exit(f"--until {args.until}: that time has passed today (UTC)")
        deadline = started + (target - now).total_seconds()
    else:
        deadline = started + 3600 * (args.hours if args.hours is not None else 1.0)
    result = read_result()
    result.update({
        "pyro": {"source": PYRO_SOURCE, "baseline": PYRO["baseline"], "cvae_neg_elbo_10_particles": PYRO["CVAE"],
                 "protocol": "all 60,000 MNIST training images; the 10,000 test images as validation (early "
                             "stopping) and for the table; grey levels, Bernoulli likelihood on the missing "
                             "pixels; Adam lr 1e-3, batch 128; up to 50 epochs (text), patience 3; CVAE column "
                             "= Trace_ELBO(num_particles=10) per image"},
        "ours": {"model": f"elbolab cvae, condition=quadrants, conditional_prior=True, hidden {HIDDEN}, latent_dim "
                          f"{LATENT}, relu, bernoulli; Adam lr 1e-3, batch 128, seed {args.seed}",
                 "max_epochs": args.max_epochs, "patience": args.patience, "particles": args.particles,
                 "k": args.k, "precision": "fp32", "torch_threads": 1, "cpu": cpu_model(),
                 "logical_cores": os.cpu_count(),
                 "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce/cvae_pyro.py --until HH:MM"},
    })
    result.setdefault("quadrants", {})
    result.setdefault("sessions", [])
    session = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "load_at_start": round(os.getloadavg()[0], 2), "quadrants": args.quadrants}
    result["sessions"].append(session)  # visible even when the session is killed (then it has no "ended")
    write_result(result)
    log(f"deadline {dt.datetime.fromtimestamp(deadline, dt.timezone.utc).strftime('%H:%M:%S')} UTC; CPU "
        f"{cpu_model()}; load {os.getloadavg()[0]:.2f}")
    train, test = load_splits(args.data_dir)
    if args.train_size:
        train = train.head(args.train_size)
    log(f"{len(train)} training images, {len(test)} test images")
    for q in args.quadrants:
        if time.time() + args.margin_seconds > deadline:
            log(f"q{q}: no time left")
            break
        run_quadrants(q, args, deadline, result, train, test)
    session.update(ended=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   wall_seconds=round(time.time() - started, 1), load_at_end=round(os.getloadavg()[0], 2))
    write_result(result)
    print(markdown_table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
