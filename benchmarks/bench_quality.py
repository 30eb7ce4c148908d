"""Model quality: the IWAE paper's one-stochastic-layer VAE trained by elbolab (its CLI) and by pythae, test
log p(x) with K=5000 importance samples, next to the paper's number.

Burda, Grosse & Salakhutdinov 2016 ("Importance Weighted Autoencoders"), table 1, VAE with k=1 and one stochastic
layer: 784-200-200-50 tanh MLPs, Bernoulli decoder, dynamically binarised MNIST, Adam (lr 1e-3, betas 0.9/0.999,
eps 1e-4), batch 20; test NLL 86.76 nats after 3280 passes (their learning-rate schedule; we keep lr 1e-3).

  elbolab  `elbolab train vae --data mnist --binarize dynamic --hidden 200,200 --latent-dim 50 --activation tanh
           --adam-eps 1e-4 --batch-size 20 --val-size 1000 --epochs E` then `elbolab eval RUN --iw-samples 5000`
           (the whole 10k test set, binarised once with seed 0). Its model is the last epoch's.
  pythae   BaseTrainer on the same 59k training images, re-binarised on every access by a BaseDataset subclass,
           the same 1000 validation images (binarised once) as its eval set; its model is the best-on-validation
           epoch, as pythae returns it. Evaluated by VAE.get_nll(n_samples=5000, batch_size=5000) image by image
           on the very same binarised test images.

By default the two trainings (then the two evaluations) run at the same time, one torch thread each: with batch
20 the step is dominated by per-operation overhead, so two processes on two cores finish far sooner than one
after the other. Long: run it in the background and read the log.

Run:  ELBOLAB_DATA=/work/shared/data nohup /work/bench-venv/bin/python benchmarks/bench_quality.py \
        --workdir /work/bench-runs/quality --epochs 80 > /work/bench-runs/quality.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # pythae always adds a tqdm bar

import _common as common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

HIDDEN, LATENT, INPUT_DIM, ACT = (200, 200), 50, 784, "tanh"
PAPER_NLL, PAPER_EPOCHS = 86.76, 3280
VAL_SIZE, BATCH, LR, ADAM_EPS = 1000, 20, 1e-3, 1e-4


def elbolab_cli() -> list[str]:
    script = Path(sys.executable).with_name("elbolab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "elbolab"]


def test_images(args, n: int | None = None) -> torch.Tensor:
    """The test images exactly as `elbolab eval --seed 0` binarises them (one draw with Generator seed 0)."""
    from elbolab.data import load_data

    splits = load_data("mnist", data_dir=args.data_dir, binarize="dynamic", seed=0, val_size=VAL_SIZE)
    test = splits.test
    return test.batch(torch.arange(len(test)), torch.Generator().manual_seed(0))[: n or None]


# ----- workers (subprocesses) -----
def pythae_train_worker(args) -> None:
    from pythae.data.datasets import BaseDataset, DatasetOutput
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback
    from safetensors.torch import save_file

    from elbolab.data import load_data

    common.set_threads(args.threads_each)
    common.quiet_pythae_logging()
    work = Path(args.workdir) / "pythae"
    work.mkdir(parents=True, exist_ok=True)
    splits = load_data("mnist", data_dir=args.data_dir, binarize="dynamic", seed=args.seed, val_size=VAL_SIZE)

    class DynamicallyBinarised(BaseDataset):
        """pythae has no dynamic binarisation: draw a fresh binary image on every access."""

        def __getitem__(self, index):
            return DatasetOutput(data=torch.bernoulli(self.data[index]), labels=self.labels[index])

    x_train = splits.train.x
    x_val = splits.val.batch(torch.arange(len(splits.val)), torch.Generator().manual_seed(args.seed + 7919))
    torch.manual_seed(args.seed)
    model = common.build_pythae_vae(INPUT_DIM, HIDDEN, LATENT, ACT)
    config = BaseTrainerConfig(output_dir=str(work / "out"), per_device_train_batch_size=BATCH,
                               per_device_eval_batch_size=1000, num_epochs=args.epochs, learning_rate=LR,
                               optimizer_cls="Adam", optimizer_params={"betas": (0.9, 0.999), "eps": ADAM_EPS},
                               seed=args.seed, no_cuda=True)
    log_path = work / "epochs.jsonl"
    log_path.write_text("")
    start = time.perf_counter()

    class EpochLog(TrainingCallback):
        def on_log(self, training_config, logs, **kwargs):
            record = {"epoch": kwargs.get("global_step"), "seconds": time.perf_counter() - start, **logs}
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    trainer = BaseTrainer(model, DynamicallyBinarised(x_train, torch.zeros(len(x_train))),
                          BaseDataset(x_val, torch.zeros(len(x_val))), training_config=config,
                          callbacks=[EpochLog()])
    common.quiet_pythae_logging()
    trainer.train()
    best = trainer._best_model  # what pythae saves as final_model: the best epoch on the eval set
    save_file({k: v.detach().contiguous() for k, v in best.state_dict().items()}, str(work / "weights.safetensors"))


def pythae_eval_worker(args) -> None:
    from safetensors.torch import load_file

    common.set_threads(args.threads_each)
    common.quiet_pythae_logging()
    work = Path(args.workdir) / "pythae"
    model = common.build_pythae_vae(INPUT_DIM, HIDDEN, LATENT, ACT)
    model.load_state_dict(load_file(str(work / "weights.safetensors")))
    model.eval()
    x = test_images(args, args.n_test)
    torch.manual_seed(args.seed)
    per_image = np.empty(len(x))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(len(x)):  # get_nll loops over images anyway; one call per image keeps each estimate
            per_image[i] = model.get_nll(x[i:i + 1], n_samples=args.k, batch_size=args.k)
            if (i + 1) % 1000 == 0:
                print(f"pythae eval {i + 1}/{len(x)} images, {time.perf_counter() - start:.0f} s", flush=True)
    np.save(work / "test_log_px.npy", per_image, allow_pickle=False)
    result = {"mean": float(per_image.mean()), "stderr": float(per_image.std(ddof=1) / math.sqrt(len(x))),
              "n_examples": len(x), "k": args.k, "seconds": time.perf_counter() - start}
    (work / "eval.json").write_text(json.dumps(result, indent=2))


def elbolab_eval_subset_worker(args) -> None:
    """Only for --n-test: the CLI evaluates the whole test set; this evaluates its first n images the same way."""
    from elbolab import loading
    from elbolab.estimators import importance_sampled_log_px

    common.set_threads(args.threads_each)
    model, _ = loading.load_run(Path(args.workdir) / "elbolab-run")
    x = test_images(args, args.n_test)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        estimate = importance_sampled_log_px(model, x, k=args.k)
    result = {"log_px": estimate.to_dict(), "seconds": time.perf_counter() - start}
    (Path(args.workdir) / "elbolab-eval-subset.json").write_text(json.dumps(result, indent=2))


def elbolab_per_example_worker(args) -> None:
    """Per-image log p(x) of the elbolab run, drawn exactly as `elbolab eval --seed S` draws them (the CLI keeps
    only the summary): lets the report pair the two libraries image by image."""
    from elbolab import loading
    from elbolab.estimators import importance_sampled_log_px

    common.set_threads(args.threads_each)
    model, _ = loading.load_run(Path(args.workdir) / "elbolab-run")
    x = test_images(args, args.n_test)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        estimate = importance_sampled_log_px(model, x, k=args.k)
    np.save(Path(args.workdir) / "elbolab-test-log-px.npy", estimate.per_example.numpy(), allow_pickle=False)


# ----- orchestration -----
def launch(command: list[str], log: Path, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    handle = open(log, "w")
    print(f"launch: {' '.join(command)}  (log {log})", flush=True)
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parent)


def run_jobs(jobs: dict[str, tuple[list[str], Path]], args, timings: dict, phase: str) -> None:
    """Run the jobs together (default) or one after another (--sequential); record each one's wall time."""
    threads = args.threads_each
    pending = list(jobs.items())
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    while pending or running:
        while pending and (not args.sequential or not running):
            name, (command, log) = pending.pop(0)
            running[name] = (launch(command, log, threads), time.perf_counter())
        time.sleep(5)
        for name, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                seconds = time.perf_counter() - started
                timings[f"{name}_{phase}_seconds"] = seconds
                print(f"{name} {phase}: exit {proc.returncode} after {seconds / 60:.1f} min", flush=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} {phase} failed; see {jobs[name][1]}")


def worker_command(args, worker: str) -> list[str]:
    return [sys.executable, __file__, "--worker", worker, "--workdir", args.workdir, "--epochs", str(args.epochs),
            "--k", str(args.k), "--n-test", str(args.n_test), "--seed", str(args.seed),
            "--threads-each", str(args.threads_each)] + (["--data-dir", args.data_dir] if args.data_dir else [])


def phase_train(args, timings: dict, only: list[str]) -> None:
    work = Path(args.workdir)
    jobs = {}
    if "elbolab" in only:
        command = elbolab_cli() + [
            "train", "vae", "--data", "mnist", "--binarize", "dynamic", "--hidden", "200,200", "--latent-dim", "50",
            "--activation", "tanh", "--lr", str(LR), "--adam-eps", str(ADAM_EPS), "--batch-size", str(BATCH),
            "--val-size", str(VAL_SIZE), "--epochs", str(args.epochs), "--seed", str(args.seed), "--no-progress",
            "--no-tensorboard", "--out", str(work / "elbolab-run")]
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        jobs["elbolab"] = (command, work / "elbolab-train.log")
    if "pythae" in only:
        jobs["pythae"] = (worker_command(args, "pythae-train"), work / "pythae-train.log")
    run_jobs(jobs, args, timings, "train")


def phase_eval(args, timings: dict, only: list[str]) -> None:
    work = Path(args.workdir)
    jobs = {}
    if "elbolab" in only:
        if args.n_test:
            command = worker_command(args, "elbolab-eval-subset")
        else:
            command = elbolab_cli() + ["eval", str(work / "elbolab-run"), "--iw-samples", str(args.k),
                                       "--seed", str(args.seed), "--no-progress"]
            if args.data_dir:
                command += ["--data-dir", args.data_dir]
        jobs["elbolab"] = (command, work / "elbolab-eval.log")
    if "pythae" in only:
        jobs["pythae"] = (worker_command(args, "pythae-eval"), work / "pythae-eval.log")
    run_jobs(jobs, args, timings, "eval")


def phase_report(args, timings: dict) -> list[str]:
    work = Path(args.workdir)
    info = json.loads((work / "machine.json").read_text()) if (work / "machine.json").exists() else \
        common.machine_info()
    rows = [["IWAE paper (Burda et al. 2016, table 1, VAE k=1, 1 layer)", str(PAPER_EPOCHS), "", "", "",
             f"{PAPER_NLL:.2f}", "10000", ""]]
    run = work / "elbolab-run"
    if (run / "metrics.jsonl").exists():
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        epochs = max(r["epoch"] for r in records)
        train_loss = next(r["loss"] for r in reversed(records) if r["split"] == "train")
        val = next((r["loss"] for r in reversed(records) if r["split"] == "val"), float("nan"))
        eval_file = work / "elbolab-eval-subset.json" if args.n_test else run / "eval.json"
        log_px = json.loads(eval_file.read_text())["log_px"] if eval_file.exists() else None
        minutes = timings.get("elbolab_train_seconds", float("nan")) / 60
        rows.append(["elbolab (CLI train + eval, last epoch)", str(epochs), f"{minutes:.1f}",
                     f"{60 * minutes / epochs:.1f}", f"{train_loss:.2f} / {val:.2f}",
                     f"{-log_px['mean']:.2f} ± {log_px['stderr']:.2f}" if log_px else "not evaluated",
                     str(log_px["n_examples"]) if log_px else "",
                     f"{timings.get('elbolab_eval_seconds', float('nan')) / 60:.1f}"])
    pythae_log = work / "pythae" / "epochs.jsonl"
    if pythae_log.exists():
        records = [json.loads(line) for line in pythae_log.read_text().splitlines() if line]
        result_file = work / "pythae" / "eval.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        best = min(records, key=lambda r: r.get("eval_epoch_loss", float("inf")))
        minutes = timings.get("pythae_train_seconds", float("nan")) / 60
        version = common.package_version("pythae") or ""
        rows.append([f"pythae {version} (BaseTrainer, best-on-val epoch {best['epoch']})",
                     str(len(records)), f"{minutes:.1f}", f"{60 * minutes / max(1, len(records)):.1f}",
                     f"{records[-1]['train_epoch_loss']:.2f} / {records[-1].get('eval_epoch_loss', float('nan')):.2f}",
                     f"{-result['mean']:.2f} ± {result['stderr']:.2f}" if result else "not evaluated",
                     str(result["n_examples"]) if result else "",
                     f"{timings.get('pythae_eval_seconds', float('nan')) / 60:.1f}"])
    paired = paired_difference(work, args)
    mode = "sequentially" if args.sequential else "at the same time"
    lines = common.header_lines(
        "Quality: IWAE-paper VAE (784-200-200-50 tanh, dynamic binarisation), test NLL with K="
        f"{args.k} importance samples", info,
        {"setup": f"Adam lr {LR}, betas 0.9/0.999, eps {ADAM_EPS}, batch {BATCH}, 59000 training / {VAL_SIZE} "
                  f"validation images, seed {args.seed}; the two libraries ran {mode}, "
                  f"{args.threads_each} torch thread(s) each",
         "test set": "MNIST t10k binarised once (seed 0), the same images for both libraries"})
    lines += common.markdown_table(
        ["model", "epochs", "train wall min", "s / epoch", "last train / val loss (-ELBO)",
         f"test NLL (K={args.k}) ± s.e.", "test images", "eval wall min"], rows)
    lines += ["", "NLL = -mean log p(x) in nats (lower is better); s.e. over test images. Train wall time includes "
              "data loading and, for elbolab, its figures and report; the paper trained 3280 epochs."]
    if paired:
        lines += ["", paired]
    return lines


def paired_difference(work: Path, args) -> str | None:
    """Image-by-image NLL difference when both per-image arrays exist (``--phase paired`` for elbolab's)."""
    mine, theirs = work / "elbolab-test-log-px.npy", work / "pythae" / "test_log_px.npy"
    if not (mine.exists() and theirs.exists()):
        return None
    a, b = np.load(mine), np.load(theirs)
    if a.shape != b.shape:
        return None
    cli = work / "elbolab-run" / "eval.json"
    check = ""
    if cli.exists() and not args.n_test:
        cli_mean = json.loads(cli.read_text())["log_px"]["mean"]
        check = f" (the recomputed elbolab mean {a.mean():.4f} vs the CLI's {cli_mean:.4f})"
    d = b - a  # NLL(elbolab) - NLL(pythae) = log p_pythae - log p_elbolab
    se = d.std(ddof=1) / math.sqrt(len(d))
    return (f"Paired over the same {len(d)} test images{check}: NLL elbolab - NLL pythae = {d.mean():+.3f} ± "
            f"{se:.3f} nats (s.e. of the mean per-image difference).")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with mnist/ (default: elbolab's lookup, $ELBOLAB_DATA)")
    p.add_argument("--workdir", default="/work/bench-runs/quality", help="run folders and results (kept)")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--k", type=int, default=5000, help="importance samples per test image")
    p.add_argument("--n-test", type=int, default=0, help="first N test images (0 = all 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads-each", type=int, default=1, help="torch threads per training/evaluation process")
    p.add_argument("--sequential", action="store_true", help="run the libraries one after the other")
    p.add_argument("--phase", default="all", choices=("all", "train", "eval", "paired", "report"),
                   help="all = train, eval, report; paired (optional, one more elbolab evaluation) stores elbolab's "
                        "per-image estimates so that the report adds an image-by-image difference")
    p.add_argument("--only", default="elbolab,pythae")
    p.add_argument("--out", default=None, help="also append the markdown to this file")
    p.add_argument("--worker", choices=("pythae-train", "pythae-eval", "elbolab-eval-subset", "elbolab-per-example"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        {"pythae-train": pythae_train_worker, "pythae-eval": pythae_eval_worker,
         "elbolab-eval-subset": elbolab_eval_subset_worker,
         "elbolab-per-example": elbolab_per_example_worker}[args.worker](args)
        return
    common.set_threads(args.threads_each)  # the header reports the per-process thread count
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if "pythae" in only and common.optional_module("pythae")[1]:
        print(f"pythae is not importable ({common.optional_module('pythae')[1]}); running elbolab only")
        only.remove("pythae")
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    if args.phase in ("all", "train"):
        (work / "machine.json").write_text(json.dumps(common.machine_info(), indent=2))
        phase_train(args, timings, only)
        timings_path.write_text(json.dumps(timings, indent=2))
    if args.phase in ("all", "eval"):
        phase_eval(args, timings, only)
        timings_path.write_text(json.dumps(timings, indent=2))
    if args.phase == "paired":
        run_jobs({"elbolab": (worker_command(args, "elbolab-per-example"), work / "elbolab-per-example.log")},
                 args, timings, "per_example")
    common.write_output(phase_report(args, timings), args.out)


if __name__ == "__main__":
    main()
