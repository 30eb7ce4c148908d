"""The Ladder VAE against the bottom-up hierarchy at the same budget (Sønderby et al. 2016, Table 1 and the active
units of their section 3), resumable across sessions.

Sønderby, Raiko, Maaløe, Sønderby & Winther 2016, "Ladder Variational Autoencoders" (NIPS), Table 1, MNIST test
log-likelihood: the 5-layer LVAE with batch normalisation and KL warm-up, trained on the ELBO: -82.12 (as issue 24
quotes it; the importance-weighted, fine-tuned variant: -81.74). Their claim: the ladder keeps more units active,
in the higher layers above all, than the bottom-up VAE of the same size.

Protocol here (the paper's text was not available in the sessions that wrote this; the training settings are those
of the authors' code, github.com/casperkaae/LVAE: its README's command and run_models.py's defaults):
  * MNIST, a fresh Bernoulli draw of every image at every use (``--binarize dynamic``; the code's "mnistresample"),
    50,000 training images, 10,000 held out (seed 0), the full 10,000 test images;
  * 5 stochastic layers 64-32-16-8-4, under MLPs of 512-256-128-64-32 (two layers each), batch normalisation, ReLU
    (the code's README: leaky ReLU; elbolab has none), for both models (``ladder-vae`` and ``hvae`` with the same
    sizes);
  * Adam lr 2e-3 (run_models.py's default), batch 256, KL warm-up over 200 epochs (the README: -temp_epochs 200),
    2,000 epochs (the README: -num_epochs 2000);
  * test log p(x) by importance sampling, K = 5000 on all test images at the end; on the way, after each session,
    K = 1000 on the first 1,000 test images, with active units per layer (Cov_x E_q[z_u] > 0.01).

  OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/reproduce/ladder_vae.py ladder-vae --hours 2 \\
      >> /work/runs/ladder_vae/ladder-vae.log 2>&1 &
writes benchmarks/reproduce/results/ladder_vae_NAME.json; ``--table`` prints the scoreboard rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from chunked import (
    add_budget_arguments,
    add_output_arguments,
    cpu_model,
    deadline_from,
    elbolab,
    epochs_done,
    evaluate_run,
    log,
    progress_figure,
    read_metrics,
    read_sessions,
    seconds_per_epoch,
    table_or_figure,
    train_in_chunks,
    train_seconds,
)

RESULTS = Path(__file__).resolve().parent / "results"
RUNS_DEFAULT = Path("/work/runs/ladder_vae")
DATA_DIR_DEFAULT = os.environ.get("ELBOLAB_DATA", "/work/shared/data")
EPOCHS, WARMUP = 2000, 200
SIZES = ["--set", "latent_dims=64,32,16,8,4", "--hidden", "512,256,128,64,32", "--activation", "relu",
         "--set", "batch_norm=true"]
# name -> (elbolab model, the paper's value or None, what the row is)
CONTENDERS = {
    "ladder-vae": ("ladder-vae", 82.12, "Table 1: LVAE, 5 layers, batch norm + warm-up, trained on the ELBO"),
    "hvae": ("hvae", None, "the bottom-up VAE of the same size and budget (the paper's VAE rows: not quoted here)"),
}


def train_command(name: str, run: Path, target: int, args, resume: bool) -> list[str]:
    common = ["--epochs", str(target), "--checkpoint-every", "200", "--no-progress", "--no-tensorboard"]
    if resume:
        return elbolab() + ["train", "--out", str(run), "--resume", *common]
    return elbolab() + ["train", CONTENDERS[name][0], "--out", str(run), "--data", "mnist", "--data-dir",
                        args.data_dir, "--binarize", "dynamic", "--val-size", "10000", *SIZES, "--batch-size", "256",
                        "--lr", "2e-3", "--kl-warmup", str(WARMUP), "--seed", str(args.seed), *common]


def write_result(name: str, run: Path, args, evaluations: list[dict]) -> Path:
    model, paper, row = CONTENDERS[name]
    metrics = read_metrics(run)
    done = epochs_done(metrics)
    curve = {"epoch": [], "val_elbo": [], "beta": []}
    for e in sorted(metrics):
        if "val" in metrics[e] and (e <= 100 or e % 10 == 0 or e == done):
            curve["epoch"].append(e)
            curve["val_elbo"].append(round(metrics[e]["val"]["elbo"], 3))
            curve["beta"].append(metrics[e]["val"].get("beta"))
    spe = seconds_per_epoch(metrics)
    result = {"contender": name, "model": model, "paper": {"value": paper, "row": row},
              "protocol": f"MNIST dynamic, 50,000 training images; elbolab {model} {' '.join(SIZES)}; Adam lr 2e-3, "
                          f"batch 256, KL warm-up {WARMUP} epochs, {EPOCHS} epochs; IS on the test set",
              "epochs_done": done, "epochs": EPOCHS, "train_hours": round(train_seconds(metrics) / 3600, 3),
              "seconds_per_epoch_recent": round(spe, 3) if spe else None, "cpu": cpu_model(), "torch_threads": 1,
              "precision": "fp32", "seed": args.seed, "run_dir": str(run), "test": evaluations[-1] if evaluations
              else None, "test_evaluations": evaluations, "curve": curve, "chunks": read_sessions(run),
              "command": f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce/ladder_vae.py {name} --hours H",
              "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.results_dir) / f"ladder_vae_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out


def markdown_table(args) -> str:
    lines = ["| contender | paper | ours: test NLL (MC s.e.; K, images, epoch) | active units z1..z5 "
             "(of 64/32/16/8/4) | budget so far | verdict |", "|---|---|---|---|---|---|"]
    for name, (_, paper, row) in CONTENDERS.items():
        path = Path(args.results_dir) / f"ladder_vae_{name}.json"
        if not path.is_file():
            lines.append(f"| {name} ({row}) | {paper or '-'} | not run yet | - | - | - |")
            continue
        r = json.loads(path.read_text())
        t = r["test"]
        ours = (f"{t['test_nll']:.2f} (± {t['mc_stderr']:.2f}; K = {t['k']}, {t['n_examples']:,} images, epoch "
                f"{t['epoch']:,})" if t else "no test evaluation yet")
        units = "/".join(str(v) for v in (t.get("active_units_per_group") or {}).values()) if t else "-"
        complete = r["epochs_done"] >= EPOCHS and t and t["n_examples"] >= 10000 and t["epoch"] >= EPOCHS
        if complete and paper:
            verdict = f"{'reproduced' if abs(t['test_nll'] - paper) <= 0.5 else 'not reproduced'}: " \
                      f"{t['test_nll'] - paper:+.2f} nats"
        else:
            verdict = f"in progress: {r['epochs_done']:,} of {EPOCHS:,} epochs"
        budget = (f"{r['epochs_done']:,} epochs, {r['train_hours']:.2f} h ({r['seconds_per_epoch_recent']} s/epoch), "
                  f"{r['cpu']}, 1 thread, fp32")
        lines.append(f"| {name} ({row}) | {paper or '-'} | {ours} | {units} | {budget} | {verdict} |")
    return "\n".join(lines)


def figure(args, path: Path) -> None:
    """-(validation ELBO) against epochs (log axis) per contender, and the test NLL evaluations as points."""
    results = {name: json.loads((Path(args.results_dir) / f"ladder_vae_{name}.json").read_text())
               for name in CONTENDERS if (Path(args.results_dir) / f"ladder_vae_{name}.json").is_file()}
    progress_figure(path, results, {name: c[1] for name, c in CONTENDERS.items()},
                    held_out="10,000 held-out images", marks=[WARMUP], marks_label="end of the KL warm-up",
                    last_epoch=EPOCHS, title="Ladder VAE protocol: ladder-vae against hvae")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", choices=list(CONTENDERS))
    add_budget_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default=str(RUNS_DEFAULT), help="run folders (outside the repository)")
    p.add_argument("--data-dir", default=DATA_DIR_DEFAULT)
    p.add_argument("--results-dir", default=str(RESULTS), help="where the result JSON goes (a test: elsewhere)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="train to this epoch (the protocol: 2,000)")
    add_output_arguments(p)
    args = p.parse_args(argv)
    if table_or_figure(args, markdown_table, figure):
        return 0
    if args.name is None:
        p.error("a contender name is needed (or --table / --figure)")
    run = Path(args.runs_dir) / args.name
    run.parent.mkdir(parents=True, exist_ok=True)
    previous = Path(args.results_dir) / f"ladder_vae_{args.name}.json"
    evaluations = json.loads(previous.read_text())["test_evaluations"] if previous.is_file() else []
    deadline = deadline_from(args.hours, args.until)
    log(f"{args.name}: deadline {dt.datetime.fromtimestamp(deadline, dt.timezone.utc).strftime('%H:%M')} UTC; "
        f"CPU {cpu_model()}; load {os.getloadavg()[0]:.2f}")
    margin = args.margin_seconds + 300  # the session's evaluation (K = 1000, 1,000 images) comes after training
    code = train_in_chunks(run, args.epochs, lambda target, resume: train_command(args.name, run, target, args,
                                                                                  resume),
                           deadline, chunk_minutes=args.chunk_minutes, margin_seconds=margin,
                           after_chunk=lambda: write_result(args.name, run, args, evaluations))
    done = epochs_done(read_metrics(run))
    if code == 0 and done and not any(e["epoch"] == done for e in evaluations):
        final = done >= EPOCHS
        record = evaluate_run(run, args.data_dir, 5000 if final else 1000, 0 if final else 1000, done)
        if record:
            evaluations.append(record)
            log(f"{args.name}: test NLL {record['test_nll']:.2f} (K = {record['k']}, {record['n_examples']} images), "
                f"active units {record.get('active_units_per_group')} at epoch {done}")
    log(f"{args.name}: wrote {write_result(args.name, run, args, evaluations)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
