"""EM for Gaussian mixtures: elbolab vs scikit-learn, side by side in one run, from the same initial parameters.

Default problem: 100k x 50 data, K = 10, exactly 50 EM iterations (tol = 0), full and diag covariances.
Prints a markdown table: time per fit (best of --repeats, the two libraries interleaved), the time ratio,
and the difference in final mean log-likelihood per sample. Target: >= 5x on full at |diff| < 1e-4 nats.

    .venv/bin/python benchmarks/bench_gmm.py [--n 100000 --d 50 --k 10 --iters 50 --repeats 2 --threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import time
import warnings

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from threadpoolctl import threadpool_limits

from elbolab.classical import GaussianMixture


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def make_data(n: int, d: int, k: int, seed: int) -> np.ndarray:
    """A K-component mixture with random full covariances and overlapping clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(k, d))
    factors = rng.normal(scale=1.0 / np.sqrt(d), size=(k, d, d)) + 0.3 * np.eye(d)
    labels = rng.integers(0, k, size=n)
    return centres[labels] + np.einsum("nd,nde->ne", rng.normal(size=(n, d)), factors[labels])


def start(X: np.ndarray, k: int, cov_type: str, seed: int) -> dict:
    """Shared starting point: K random rows as means, equal weights, the data's precision for every component."""
    rng = np.random.default_rng(seed)
    d = X.shape[1]
    means = X[rng.choice(len(X), k, replace=False)]
    if cov_type == "full":
        precisions = np.broadcast_to(np.linalg.inv(np.cov(X.T)), (k, d, d)).copy()
    else:
        precisions = np.broadcast_to(1.0 / X.var(0), (k, d)).copy()
    return dict(weights_init=np.full(k, 1.0 / k), means_init=means, precisions_init=precisions)


def timed_fit(model, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol = 0: a fixed number of iterations on purpose
        t0 = time.perf_counter()
        model.fit(X)
        return time.perf_counter() - t0, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(limits=args.threads)  # numpy's BLAS (scikit-learn) gets the same number of threads
    X = make_data(args.n, args.d, args.k, args.seed)

    print(f"# EM for Gaussian mixtures: elbolab vs scikit-learn ({datetime.date.today().isoformat()})\n")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} cores; threads (torch and numpy BLAS): {args.threads}; "
          f"load average at start: {os.getloadavg()[0]:.2f}")
    print(f"- torch {torch.__version__}, scikit-learn {sklearn.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}")
    print(f"- data {args.n} x {args.d}, K = {args.k}, {args.iters} EM iterations (tol = 0) from the same "
          f"weights/means/precisions; time = best of {args.repeats}, the two libraries alternating\n")
    print("| covariance | elbolab dtype | scikit-learn s/fit | elbolab s/fit | ratio | "
          "final mean log-lik (sklearn) | abs diff per sample | max abs diff over the curve |")
    print("|---|---|---|---|---|---|---|---|")
    for cov_type in ("full", "diag"):
        settings = dict(n_components=args.k, covariance_type=cov_type, max_iter=args.iters, tol=0.0,
                        **start(X, args.k, cov_type, args.seed))
        for dtype in ("float64", "float32") if cov_type == "full" else ("float64",):
            times_ref, times_ours = [], []
            for _ in range(args.repeats):
                t_ref, ref = timed_fit(SkGaussianMixture(**settings), X)
                t_ours, ours = timed_fit(GaussianMixture(dtype=dtype, **settings), X)
                times_ref.append(t_ref)
                times_ours.append(t_ours)
            ll_ref = ref.score(X)
            diff = abs(ours.score(X) - ll_ref)
            curve = np.max(np.abs(np.asarray(ours.lower_bound_history_) - np.asarray(ref.lower_bounds_)))
            best_ref, best_ours = min(times_ref), min(times_ours)
            print(f"| {cov_type} | {dtype} | {best_ref:.2f} | {best_ours:.2f} | {best_ref / best_ours:.1f}x | "
                  f"{ll_ref:.6f} | {diff:.1e} | {curve:.1e} |", flush=True)


if __name__ == "__main__":
    main()
