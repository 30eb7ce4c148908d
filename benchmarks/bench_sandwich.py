"""The log-likelihood sandwich of a trained MNIST VAE and IWAE (k = 5): importance sampling, AIS and BDMC side by side.

For each model, on the same first --examples test images (binarised once with seed 0, as ``elbolab eval`` does):

* importance sampling with q(z|x) (IS) at K in --iw-ks (default 1, 50, 5000; K = 1 is a one-sample ELBO), with its
  Monte-Carlo s.e.; every IS estimate is a stochastic lower bound on log p(x) (E log p^ <= log p);
* AIS from the prior with HMC transitions (``elbolab.ais``) at each of --ais-steps (default 100, 1000) with
  --ais-chains chains per image: also a stochastic lower bound, so the larger of two estimates is the tighter;
* BDMC (Grosse et al. 2015) on --bdmc-examples images simulated from the model, at the same step counts: forward AIS
  (a lower bound) and reverse AIS from the exact posterior sample (an upper bound) on those images; their gap bounds
  the error of AIS at that many steps on data the model generates (not on the test images);
* IS at --equal-cost-k (default 50000): roughly the wall time of AIS at the first step count on the same images,
  to answer "is AIS at equal cost no looser than IS with q?" (the larger lower bound at about equal time wins).

Everything goes through the CLI: ``elbolab train`` (or ``--resume`` of an existing run folder, so reruns reuse the
training) and ``elbolab eval RUN --iw-samples K --limit N [--ais-steps T --ais-chains C --ais-examples N --bdmc M]``;
the numbers are read from RUN/eval.json after each call (``log_px``, ``log_px_ais``, ``bdmc``). Wall times: the
CLI call's, and for AIS and BDMC their own (``seconds`` in eval.json). The IS cost is the call's wall time minus that
of the K = 1 call (same start-up, data loading, diagnostics and report refresh).

Models: the IWAE paper's one-stochastic-layer architecture (784-200-200-50 tanh, Bernoulli, dynamic binarisation),
Adam lr 1e-3, batch 100, --epochs epochs (default 20) on the 50,000 training images.

Run (one torch thread; about 45 minutes on a free EPYC core with the defaults):

  OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/bench_sandwich.py --workdir /tmp/bench23/sandwich \\
      --data-dir /work/shared/data > /tmp/bench23/sandwich.log 2>&1 &

``--smoke`` trains a tiny VAE on the built-in digits for one epoch and runs every estimator with tiny settings (five
CLI calls: a test of the script, 15-30 s on a quiet machine, minutes on a loaded one; its numbers mean nothing):
``python benchmarks/bench_sandwich.py --smoke --workdir DIR --out-json DIR/sandwich.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _common as common  # noqa: E402

ARCH = ["--hidden", "200,200", "--latent-dim", "50", "--activation", "tanh"]
MODELS = {"vae": ("vae", []), "iwae-k5": ("iwae", ["--set", "k=5"])}
SMOKE = dict(models="vae", epochs=1, examples=6, bdmc_examples=3, ais_steps=[4], ais_chains=2, iw_ks=[1, 5],
             equal_cost_k=[20], train_size=200)  # five CLI calls


def elbolab_cli() -> list[str]:
    script = Path(sys.executable).with_name("elbolab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "elbolab"]


def run_cli(cmd: list[str], log: Path) -> float:
    """Run one CLI command with its output appended to ``log``; its wall time in seconds."""
    started = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return seconds


def train(name: str, run: Path, args, log: Path) -> dict:
    model, extra = MODELS[name]
    data = ["--data", "digits"] if args.smoke else ["--data", "mnist"] + (
        ["--data-dir", args.data_dir] if args.data_dir else [])
    arch = ["--hidden", "16", "--latent-dim", "2"] if args.smoke else ARCH
    cmd = elbolab_cli() + ["train"]
    resumed = (run / "checkpoint.safetensors").exists()
    done = resumed and (json.loads((run / "manifest.json").read_text()).get("summary") or {}).get(
        "last_epoch", 0) >= args.epochs
    if done:  # reuse the finished run as it is (the CLI refuses a --resume with nothing to train)
        cmd = ["(reused)", str(run)]
    elif resumed:  # reuse the run: extend it to --epochs (nothing to do when it is there already)
        cmd += ["--out", str(run), "--resume", "--epochs", str(args.epochs)]
    else:
        cmd += [model, "--out", str(run), *data, "--binarize", "dynamic", *arch, *extra, "--batch-size", "100",
                "--epochs", str(args.epochs), "--seed", "0"]
        if args.train_size:
            cmd += ["--train-size", str(args.train_size)]
    cmd += ["--no-progress", "--no-tensorboard"]
    load = os.getloadavg()[0]
    seconds = 0.0 if done else run_cli(cmd, log)
    manifest = json.loads((run / "manifest.json").read_text())
    summary = manifest.get("summary", {})
    return {"command": " ".join(cmd), "resumed": resumed, "call_seconds": round(seconds, 1),
            "training_wall_seconds": manifest.get("wall_time_s"), "load_at_start": round(load, 2),
            "epochs": summary.get("last_epoch"), "best_val_elbo": summary.get("best_val_elbo"),
            "active_units": summary.get("active_units")}


def evaluate(run: Path, args, log: Path, *, k: int, ais_steps: int = 0) -> dict:
    cmd = elbolab_cli() + ["eval", str(run), "--iw-samples", str(k), "--limit", str(args.examples), "--seed", "0",
                           "--no-progress"]
    if args.data_dir and not args.smoke:
        cmd += ["--data-dir", args.data_dir]
    if ais_steps:
        cmd += ["--ais-steps", str(ais_steps), "--ais-chains", str(args.ais_chains), "--ais-examples",
                str(args.examples)]
        if args.bdmc_examples:
            cmd += ["--bdmc", str(args.bdmc_examples)]
    load = os.getloadavg()[0]
    seconds = run_cli(cmd, log)
    record = json.loads((run / "eval.json").read_text())
    return {"command": " ".join(cmd), "call_seconds": round(seconds, 2), "load_at_start": round(load, 2),
            "log_px": record.get("log_px"), "elbo": record.get("elbo"), "log_px_ais": record.get("log_px_ais"),
            "bdmc": record.get("bdmc"), "n_examples": record.get("n_examples"), "saved_to": record.get("saved_to")}


def measure(name: str, args, workdir: Path, log: Path, results: dict) -> None:
    run = workdir / name
    entry = results["models"].setdefault(name, {"run": str(run)})
    if "training" not in entry:
        entry["training"] = train(name, run, args, log)
        save(results, args.out_json)
    entry.setdefault("is", {})
    for k in args.iw_ks:
        if str(k) not in entry["is"]:  # with --reuse-evals, what the JSON holds already is kept
            entry["is"][str(k)] = evaluate(run, args, log, k=k)
            save(results, args.out_json)
    entry.setdefault("ais", {})
    for steps in args.ais_steps:
        if str(steps) not in entry["ais"]:
            entry["ais"][str(steps)] = evaluate(run, args, log, k=1, ais_steps=steps)
            save(results, args.out_json)


def measure_equal_cost(name: str, k: int, args, workdir: Path, log: Path, results: dict) -> None:
    entry = results["models"][name]
    if str(k) not in entry["is"]:
        entry["is"][str(k)] = evaluate(workdir / name, args, log, k=k)
        save(results, args.out_json)


def save(results: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1) + "\n")


def f2(value, digits: int = 2) -> str:
    return common.fmt(value, digits) if isinstance(value, (int, float)) else "n/a"


def table(results: dict) -> list[str]:
    info = results["machine"]
    extra = {"budget": results["budget"], "images": results["images"]}
    lines = common.header_lines("Log-likelihood sandwich: IS, AIS and BDMC on an MNIST VAE and IWAE (k = 5)", info,
                                extra)
    headers = ["model", "estimator", "setting", "on", "log p(x) (nats)", "MC s.e.", "seconds (own / CLI call)"]
    rows = []
    for name, entry in results["models"].items():
        k1 = (entry.get("is", {}).get("1") or {}).get("call_seconds")
        for k, ev in sorted(entry.get("is", {}).items(), key=lambda kv: int(kv[0])):
            est = ev["log_px"] or {}
            own = ev["call_seconds"] - k1 if k1 is not None and k != "1" else None
            rows.append([name, "IS with q(z\\|x)", f"K = {int(k):,}", f"{est.get('n_examples')} test images",
                         f2(est.get("mean")), f2(est.get("mc_stderr"), 3) if k != "1" else "n/a (one sample)",
                         f"{f2(own, 1)} / {f2(ev['call_seconds'], 1)}"])
        for steps, ev in sorted(entry.get("ais", {}).items(), key=lambda kv: int(kv[0])):
            ais, b = ev.get("log_px_ais") or {}, ev.get("bdmc") or {}
            rows.append([name, "AIS (lower bound)", f"{int(steps):,} steps x {ais.get('chains')} chains",
                         f"{ais.get('n_examples')} test images", f2(ais.get("mean")), f2(ais.get("mc_stderr"), 3),
                         f"{f2(ais.get('seconds'), 1)} / {f2(ev['call_seconds'], 1)}"])
            if b:
                rows.append([name, "BDMC lower / upper (gap)", f"{int(steps):,} steps x {b.get('chains')} chains",
                             f"{b.get('n_examples')} simulated images",
                             f"{f2(b.get('lower'))} / {f2(b.get('upper'))} ({f2(b.get('gap'))})", "",
                             f"{f2(b.get('seconds'), 1)} / (same call)"])
    lines += common.markdown_table(headers, rows)
    lines += ["", "Training: " + "; ".join(
        f"{name} {e['training'].get('epochs')} epochs, {f2(e['training'].get('training_wall_seconds'), 0)} s "
        f"(best val ELBO {f2(e['training'].get('best_val_elbo'))})" for name, e in results["models"].items())]
    verdicts = results.get("equal_cost") or []
    if verdicts:
        lines += ["", "AIS against IS at about equal wall time (both lower bounds: the larger is the tighter):", ""]
        lines += common.markdown_table(
            ["model", "AIS", "seconds", "log p(x)", "IS", "seconds", "log p(x)", "AIS - IS", "tighter"],
            [[v["model"], v["ais"], f2(v["ais_seconds"], 1), f2(v["ais_log_px"]), v["is"], f2(v["is_seconds"], 1),
              f2(v["is_log_px"]), f"{v['difference']:+.2f} ± {v['difference_se']:.2f}", v["tighter"]]
             for v in verdicts])
    return lines


def equal_cost(results: dict, args) -> list[dict]:
    """AIS at the i-th --ais-steps against IS at the i-th --equal-cost-k, for each model."""
    out = []
    for name, entry in results["models"].items():
        for steps, k in zip(args.ais_steps, args.equal_cost_k):
            ev_ais, ev_is, ev_k1 = (entry.get("ais", {}).get(str(steps)), entry.get("is", {}).get(str(k)),
                                    entry.get("is", {}).get("1"))
            if not (ev_ais and ev_is and ev_k1 and ev_ais.get("log_px_ais")):
                continue
            ais, est = ev_ais["log_px_ais"], ev_is["log_px"]
            diff = ais["mean"] - est["mean"]
            se = (ais["mc_stderr"] ** 2 + est["mc_stderr"] ** 2) ** 0.5
            tighter = "AIS" if diff > 2 * se else "IS" if diff < -2 * se else "neither (within 2 s.e.)"
            out.append({"model": name, "ais": f"{steps:,} steps x {ais['chains']} chains",
                        "ais_seconds": ais["seconds"], "ais_log_px": ais["mean"], "is": f"K = {k:,}",
                        "is_seconds": ev_is["call_seconds"] - ev_k1["call_seconds"], "is_log_px": est["mean"],
                        "difference": diff, "difference_se": se, "tighter": tighter})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench23/sandwich", help="run folders (kept; reused with --resume)")
    parser.add_argument("--data-dir", default=common.data_dir_default(), help="folder holding mnist/")
    parser.add_argument("--models", default="vae,iwae-k5", help=f"some of {', '.join(MODELS)}")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-size", type=int, default=0, help="train on the first N training images (0: all)")
    parser.add_argument("--examples", type=int, default=50, help="test images for IS and AIS (the first N)")
    parser.add_argument("--bdmc-examples", type=int, default=20, help="simulated images for BDMC (0: no BDMC)")
    parser.add_argument("--iw-ks", default="1,50,5000", help="IS sample counts (1 is needed for the IS cost)")
    parser.add_argument("--ais-steps", default="100,1000")
    parser.add_argument("--ais-chains", type=int, default=8)
    parser.add_argument("--equal-cost-k", default="50000,500000",
                        help="IS K at about the cost of AIS at each --ais-steps, in order ('' for none)")
    parser.add_argument("--reuse-evals", action="store_true",
                        help="keep the measurements --out-json holds; run only the missing ones")
    parser.add_argument("--smoke", action="store_true", help="digits, tiny models and settings: a test of the script")
    parser.add_argument("--out-json", default=str(Path(__file__).parent / "results" / "sandwich.json"))
    parser.add_argument("--out", default=None, help="also append the markdown to this file")
    parser.add_argument("--report", action="store_true", help="only print the tables of --out-json (a cut run)")
    args = parser.parse_args()
    args.iw_ks = [int(k) for k in args.iw_ks.split(",")]
    args.ais_steps = [int(s) for s in args.ais_steps.split(",")]
    args.equal_cost_k = [int(k) for k in args.equal_cost_k.split(",") if k.strip()]
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if 1 not in args.iw_ks:
        args.iw_ks = [1] + args.iw_ks
    if args.report:
        results = json.loads(Path(args.out_json).read_text())
        results["equal_cost"] = equal_cost(results, args)
        common.write_output(table(results), args.out)
        return
    common.set_threads(1)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "cli.log"
    names = args.models.split(",")
    results = {"machine": common.machine_info(), "smoke": args.smoke,
               "budget": f"{args.epochs} epochs, batch 100, Adam lr 1e-3, 784-200-200-50 tanh, dynamic binarisation"
                         + (f", first {args.train_size} training images" if args.train_size else ""),
               "images": f"the first {args.examples} MNIST test images (binarised once, seed 0); BDMC on "
                         f"{args.bdmc_examples} simulated images", "models": {}}
    if args.smoke:
        results["budget"], results["images"] = "smoke test: digits, 1 epoch, 64-16-2", "digits (smoke test)"
    if args.reuse_evals and Path(args.out_json).exists():
        results = json.loads(Path(args.out_json).read_text())
        results.setdefault("sessions", []).append(common.machine_info())  # when and under what load it resumed
    started = time.perf_counter()
    for name in names:
        measure(name, args, workdir, log, results)
    for k in args.equal_cost_k:  # the long IS runs last: the table is complete without them if they must be cut
        for name in names:
            measure_equal_cost(name, k, args, workdir, log, results)
    results["equal_cost"] = equal_cost(results, args)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["load_at_end"] = "{:.2f} / {:.2f}".format(*os.getloadavg()[:2])
    save(results, args.out_json)
    lines = table(results)
    lines += ["", f"Total {results['total_seconds']:.0f} s; load average at the end {results['load_at_end']}."]
    common.write_output(lines, args.out)


if __name__ == "__main__":
    main()
