"""bf16 mixed precision, quality: does a VAE trained with --precision bf16 reach the log p(x) of the fp32 one, and how
far is a bf16 evaluation from the fp32 one on the same weights and the same importance samples?

Two runs of the 784-400-20 ReLU Bernoulli VAE on dynamically binarised MNIST (50,000 training images, batch 128,
Adam lr 1e-3, --epochs each, seed 0), identical but for --precision, through ``pipeline.train`` (what ``elbolab
train`` runs). Both evaluated on the first --n-test test images (binarised once by seed) with K = --k importance
samples, seed 0 for both, in fp32:

* training: the paired difference of the per-example log p(x) estimates, bf16-trained minus fp32-trained, with the
  standard error over examples (the issue's target: under 0.1 nats);
* evaluation: the fp32-trained weights evaluated in bf16 and in fp32 with the same seed (the same draws of eps),
  paired per example: the bias of a bf16 evaluation.

Run:  ELBOLAB_DATA=/work/shared/data nohup .venv/bin/python benchmarks/bench_bf16_quality.py --epochs 10 \
        --workdir /tmp/bench-bf16 --out /tmp/bench-bf16/table.md > /tmp/bench-bf16.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common as common


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=common.data_dir_default(), help="folder with mnist/ (default $ELBOLAB_DATA)")
    p.add_argument("--workdir", default="/tmp/bench-bf16")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from elbolab import loading, pipeline, runs
    from elbolab.data import load_data
    from elbolab.evaluate import evaluate_model, paired_difference

    common.set_threads(args.threads)
    info = common.machine_info()
    work = Path(args.workdir)
    timings, per_example, results = {}, {}, {}
    for precision in ("fp32", "bf16"):
        out = work / precision
        started = time.perf_counter()
        if not (out / runs.WEIGHTS).is_file():
            pipeline.train("vae", "mnist", out=out, overwrite=True, data_dir=args.data_dir, binarize="dynamic",
                           epochs=args.epochs, batch_size=128, lr=1e-3, latent_dim=20, hidden=(400,), seed=0,
                           precision=precision, progress=False, tensorboard=False, figures=False)
        timings[precision] = time.perf_counter() - started
        print(f"{precision}: trained in {timings[precision]:.0f} s", flush=True)
    splits = load_data("mnist", data_dir=args.data_dir, binarize="dynamic", seed=0)
    test = splits.test.head(min(args.n_test, len(splits.test)))
    for name, run, precision in (("fp32-trained", "fp32", "fp32"), ("bf16-trained", "bf16", "fp32"),
                                 ("fp32-trained, bf16 eval", "fp32", "bf16")):
        model, _ = loading.load_run(work / run)
        started = time.perf_counter()
        result, estimates = evaluate_model(model, test, k=args.k, seed=0, return_per_example=True,
                                           precision=precision)
        results[name] = {"log_px": result["log_px"]["mean"], "mc_stderr": result["log_px"]["mc_stderr"],
                         "elbo": result["elbo"], "seconds": time.perf_counter() - started}
        per_example[name] = estimates
        print(f"{name}: log p(x) {results[name]['log_px']:.3f} ({results[name]['seconds']:.0f} s)", flush=True)
    training = paired_difference(per_example["bf16-trained"], per_example["fp32-trained"])
    evaluation = paired_difference(per_example["fp32-trained, bf16 eval"], per_example["fp32-trained"])
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps({"results": results, "training": training,
                                                   "evaluation": evaluation, "train_s": timings}, indent=1))
    lines = common.header_lines("bf16 mixed precision: quality (784-400-20 VAE, dynamically binarised MNIST)", info, {
        "budget": f"{args.epochs} epochs each, batch 128, Adam 1e-3, seed 0; K = {args.k}, first {len(test)} test "
                  "images binarised once (seed 0), evaluation seed 0"})
    rows = [[name, f"{r['log_px']:.3f} ± {r['mc_stderr']:.3f}", f"{r['elbo']:.3f}", f"{r['seconds']:.0f}"]
            for name, r in results.items()]
    lines += common.markdown_table(["model / evaluation", "test log p(x) ± MC s.e.", "ELBO", "eval s"], rows)
    lines += ["", f"Paired per example: bf16-trained minus fp32-trained {training['mean_difference']:+.3f} ± "
                  f"{training['stderr']:.3f} nats (s.e. over {training['n_examples']} examples); bf16 evaluation minus "
                  f"fp32 evaluation of the same weights and draws {evaluation['mean_difference']:+.4f} ± "
                  f"{evaluation['stderr']:.4f} nats. Training wall time: fp32 {timings['fp32']:.0f} s, bf16 "
                  f"{timings['bf16']:.0f} s (one run each, not a throughput measurement: see bench_vae_train)."]
    common.write_output(lines, args.out)


if __name__ == "__main__":
    main()
