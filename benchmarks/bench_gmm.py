"""EM for Gaussian mixtures: elbolab vs scikit-learn, side by side in one run, from the same initial parameters.

Default problem: 100k x 50 data, K = 10, exactly 50 EM iterations (tol = 0), full and diag covariances.
Prints a markdown table: time per fit (best of --repeats; scikit-learn and every elbolab variant take turns within
each repetition, so background load hits all alike), the time ratio, the difference in final mean log-likelihood
per sample, and the GFLOP/s reached against the machine's estimated peak. Target: >= 5x on full at |diff| < 1e-4
nats/sample.

scikit-learn at its best: numpy's OpenBLAS reads OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE when it loads; some machines
set them (for old OpenBLAS builds) and they slow a current one down. This script drops both from its own
environment before numpy is imported (this process only; --keep-openblas-env keeps them) and prints the kernel
OpenBLAS then runs (threadpoolctl), next to the CPU model, its AVX-512/AMX flags and torch's BLAS.

``--before REV`` adds the estimator as it was at git revision REV (read with ``git show``, loaded under another
module name; the work tree is not touched), so before/after ratios come from the same run.

    .venv/bin/python benchmarks/bench_gmm.py [--n 100000 --d 50 --k 10 --iters 50 --repeats 2 --threads 2]
"""

from __future__ import annotations

import os
import sys

OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_DROPPED = {}
if "--keep-openblas-env" not in sys.argv:  # must run before numpy (and its OpenBLAS) is loaded
    _DROPPED = {name: os.environ.pop(name) for name in OPENBLAS_VARIABLES if name in os.environ}

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.mixture import GaussianMixture as SkGaussianMixture  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from elbolab.classical import GaussianMixture  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


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


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def timed_fit(model, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol = 0: a fixed number of iterations on purpose
        t0 = clock()
        model.fit(X)
        return clock() - t0, model


def load_before(rev: str):
    """GaussianMixture as of git revision ``rev``, its two modules loaded under private names."""
    names = {"elbolab.classical._mixture_common": "_before_mixture_common",
             "elbolab.classical.gaussian_mixture": "_before_gaussian_mixture"}
    module = None
    for name, alias in names.items():
        path = name.replace(".", "/") + ".py"
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True,
                                check=True).stdout
        for original, renamed in names.items():
            source = source.replace(f"from {original} import", f"from {renamed} import")
        module = types.ModuleType(alias)
        module.__file__ = f"{rev}:{path}"
        sys.modules[alias] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own repository's code
    return module.GaussianMixture


def numpy_blas() -> str:
    infos = [i for i in threadpool_info() if i.get("user_api") == "blas" and "numpy" in i.get("filepath", "")]
    infos = infos or [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if not infos:
        return "unknown"
    i = infos[0]
    return (f"{i.get('internal_api')} {i.get('version')} running kernel {i.get('architecture', '?')} "
            f"({i.get('num_threads')} threads)")


def missing_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16", "amx_tile"))


def peak_gflops(threads: int) -> tuple[float, float, str]:
    """Peak (float32, float64) GFLOP/s of ``threads`` cores: clock x FMA units x SIMD lanes x 2, from lscpu/cpuinfo.

    lscpu does not say how many FMA units a core has: AVX-512 server cores (Skylake-SP and later Xeons, Zen 4/5
    EPYC's 2 x 256-bit) are taken to retire two 512-bit-equivalent FMAs... this is an assumption, printed as such.
    """
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    model = _common.cpu_model()
    clock = re.search(r"@\s*([0-9.]+)\s*GHz", model)
    ghz = float(clock.group(1)) if clock else None
    if ghz is None:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
            mhz = re.search(r"CPU max MHz:\s*([0-9.]+)", out) or re.search(r"CPU MHz:\s*([0-9.]+)", out)
            ghz = float(mhz.group(1)) / 1000 if mhz else 2.0
        except (OSError, subprocess.CalledProcessError):
            ghz = 2.0
    lanes32 = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma_units = 2 if "fma" in flags or "avx512f" in flags else 1
    peak32 = threads * ghz * fma_units * lanes32 * 2
    how = (f"{threads} cores x {ghz:.2f} GHz x {fma_units} FMA units (assumed) x {lanes32} float32 lanes x 2 "
           "flop/FMA; float64 half that")
    return peak32, peak32 / 2, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--before", metavar="REV", help="also time GaussianMixture as of this git revision")
    parser.add_argument("--covariances", default="full,diag", help="comma-separated covariance types")
    parser.add_argument("--keep-openblas-env", action="store_true",
                        help=f"keep {' / '.join(OPENBLAS_VARIABLES)} (dropped by default, this process only)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall: elapsed seconds; cpu: this process's CPU seconds (all threads), steadier on a "
                             "machine shared with other jobs (use it with --threads 1)")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    threadpool_limits(limits=args.threads)  # numpy's BLAS (scikit-learn) gets the same number of threads
    X = make_data(args.n, args.d, args.k, args.seed)
    before = load_before(args.before) if args.before else None
    peak32, peak64, peak_how = peak_gflops(args.threads)
    info = _common.machine_info()

    print(f"# EM for Gaussian mixtures: elbolab vs scikit-learn ({datetime.date.today().isoformat()})\n")
    print(f"- machine: {info['cpu']}, {os.cpu_count()} cores; CPU flags: {info['flags']} ({missing_flags()}); "
          f"threads (torch and numpy BLAS): {args.threads}; load average at start: {info['load']}")
    print(f"- torch {torch.__version__} (BLAS: {info['blas']}), scikit-learn {sklearn.__version__}, numpy "
          f"{np.__version__} (BLAS: {numpy_blas()}), Python {platform.python_version()}")
    dropped = ", ".join(f"{k}={v}" for k, v in _DROPPED.items()) or "neither was set"
    print(f"- OpenBLAS environment: {'kept' if args.keep_openblas_env else 'dropped for this process'} "
          f"({' / '.join(OPENBLAS_VARIABLES)}: {dropped})")
    print(f"- peak estimate: {peak32:.0f} GFLOP/s float32, {peak64:.0f} float64 ({peak_how})")
    print(f"- data {args.n} x {args.d}, K = {args.k}, {args.iters} EM iterations (tol = 0) from the same "
          f"weights/means/precisions; time = best of {args.repeats} ({args.clock} clock), all contenders taking "
          "turns in each repeat")
    print("- GFLOP/s counts the same useful work for everyone: full covariances 4 N K D^2 per iteration (whitening "
          "the data under each component, then its weighted scatter), diag 6 N K D\n")
    print("| covariance | implementation | s/fit | speed-up vs scikit-learn | GFLOP/s | % of peak | "
          "final mean log-lik | abs diff per sample vs sklearn | max abs diff over the curve |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for cov_type in args.covariances.split(","):
        settings = dict(n_components=args.k, covariance_type=cov_type, max_iter=args.iters, tol=0.0,
                        **start(X, args.k, cov_type, args.seed))
        contenders = {"scikit-learn (float64)": (SkGaussianMixture, {})}  # name -> (estimator class, options)
        for dtype in ("float64", "float32") if cov_type == "full" else ("float64",):
            if before is not None:
                contenders[f"elbolab before ({dtype})"] = (before, {"dtype": dtype})
            contenders[f"elbolab ({dtype})"] = (GaussianMixture, {"dtype": dtype})
        times = {name: [] for name in contenders}
        fitted = {}
        for _ in range(args.repeats):
            for name, (estimator, options) in contenders.items():
                seconds, fitted[name] = timed_fit(estimator(**options, **settings), X)
                times[name].append(seconds)
        ref = fitted["scikit-learn (float64)"]
        ll_ref = ref.score(X)
        work = (4 * args.d**2 if cov_type == "full" else 6 * args.d) * args.n * args.k * args.iters
        for name, model in fitted.items():
            best = min(times[name])
            peak = peak32 if "float32" in name else peak64
            ll = model.score(X)
            curve = np.max(np.abs(np.asarray(model.lower_bounds_) - np.asarray(ref.lower_bounds_)))
            print(f"| {cov_type} | {name} | {best:.2f} | {min(times['scikit-learn (float64)']) / best:.2f}x | "
                  f"{work / best / 1e9:.1f} | {100 * work / best / 1e9 / peak:.0f}% | {ll:.6f} | "
                  f"{abs(ll - ll_ref):.1e} | {curve:.1e} |", flush=True)


if __name__ == "__main__":
    main()
