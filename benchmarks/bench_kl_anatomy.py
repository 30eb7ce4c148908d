"""Where the KL goes: the KL anatomy of a VAE, a beta-VAE (beta 4) and a FactorVAE (gamma 10) trained alike, and the
FactorVAE's two total-correlation estimates over training.

The mean KL(q(z|x) || p(z)) over test images splits into index-code mutual information I(x; z), the total correlation
TC of the aggregate posterior q(z) and the dimension-wise KL sum_j KL(q(z_j) || p(z_j)) (Hoffman & Johnson 2016;
Chen et al. 2018; ``elbolab.kl_anatomy``). ``elbolab eval`` computes it on every evaluation (the exact-aggregate
estimator over the first min(5000, N) evaluated images; there is no separate flag): this script trains the three
models with the CLI on the same data and budget, runs ``elbolab eval RUN --iw-samples K --limit N`` on each and
tabulates ``kl_anatomy`` from RUN/eval.json with the ELBO and log p(x).

The FactorVAE logs, at each validation epoch, its discriminator's TC estimate (``tc_estimate``: E_q[T(z)], the
density-ratio trick) and the non-adversarial one (``tc_kl_anatomy``: ``kl_anatomy``'s exact aggregate over each
validation batch of 1000 images, biased high as an estimate of the population's TC when I(x; z) nears log 1000; see
``elbolab.models.factor_vae``); the figure draws both against the epoch, with the test-set value of the final model
(the exact aggregate over the N evaluated images) as a marker. A second panel (``--tc-sizes``) draws the final
model's anatomy TC and I(x; z) against N, the number of test images in the aggregate (``kl_anatomy`` called on the
encoder's posteriors from Python): I pinned at log N and TC falling by log 2 per doubling of N mark the regime where
the exact aggregate over N images is N separate bumps, i.e. where its TC is mostly finite-N bias.

Data (defaults): the procedural sprites (``--data sprites``, 64 x 64 binary, dSprites' factors), the first
--train-size training images, --val-size validation images, latent_dim 10, MLP 4096-400-10, batch 64, Adam lr 1e-3,
--epochs epochs. FactorVAE's discriminator is 4 x 256 (``--disc``; the paper's 6 x 1000 costs about 190 MFLOP per
image, 28x the VAE step on MNIST, unaffordable on this budget), its Adam lr 1e-4 with betas (0.5, 0.9).

Run (one torch thread):

  OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/bench_kl_anatomy.py --workdir /tmp/bench23/anatomy \\
      > /tmp/bench23/anatomy.log 2>&1 &

``--smoke``: the built-in digits, two epochs of tiny models (a test of the script, seconds; its numbers mean nothing):
``python benchmarks/bench_kl_anatomy.py --smoke --workdir DIR --out-json DIR/kl_anatomy.json --figure DIR/tc.png``.
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

MODELS = {"vae": ("vae", []), "beta-vae": ("beta-vae", ["--beta", "4"]), "factor-vae": ("factor-vae", [])}
RESULTS = Path(__file__).parent / "results"


def elbolab_cli() -> list[str]:
    script = Path(sys.executable).with_name("elbolab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "elbolab"]


def run_cli(cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - started


def train(name: str, run: Path, args, log: Path) -> dict:
    model, extra = MODELS[name]
    if name == "factor-vae":
        width, depth = args.disc.split("x")
        extra = extra + ["--set", f"discriminator_width={width}", "--set", f"discriminator_depth={depth}"]
    cmd = elbolab_cli() + ["train"]
    resumed = (run / "checkpoint.safetensors").exists()
    done = resumed and (json.loads((run / "manifest.json").read_text()).get("summary") or {}).get(
        "last_epoch", 0) >= args.epochs
    if done:  # reuse the finished run as it is (the CLI refuses a --resume with nothing to train)
        cmd = ["(reused)", str(run)]
    elif resumed:
        cmd += ["--out", str(run), "--resume", "--epochs", str(args.epochs)]
    else:
        cmd += [model, "--out", str(run), "--data", args.data, "--train-size", str(args.train_size), "--val-size",
                str(args.val_size), "--latent-dim", str(args.latent_dim), "--hidden", args.hidden, "--batch-size",
                str(args.batch_size), "--epochs", str(args.epochs), "--seed", "0", *extra]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
    cmd += ["--no-progress", "--no-tensorboard"]
    load = os.getloadavg()[0]
    seconds = 0.0 if done else run_cli(cmd, log)
    manifest = json.loads((run / "manifest.json").read_text())
    return {"command": " ".join(cmd), "resumed": resumed, "call_seconds": round(seconds, 1),
            "training_wall_seconds": manifest.get("wall_time_s"), "load_at_start": round(load, 2)}


def evaluate(run: Path, args, log: Path) -> dict:
    cmd = elbolab_cli() + ["eval", str(run), "--iw-samples", str(args.iw_samples), "--limit", str(args.eval_images),
                           "--seed", "0", "--no-progress"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    load = os.getloadavg()[0]
    seconds = run_cli(cmd, log)
    record = json.loads((run / "eval.json").read_text())
    return {"command": " ".join(cmd), "call_seconds": round(seconds, 1), "load_at_start": round(load, 2),
            "elbo": record.get("elbo"), "log_px": record.get("log_px"), "kl_anatomy": record.get("kl_anatomy"),
            "active_units": record.get("active_units"), "n_examples": record.get("n_examples")}


def validation_history(run: Path) -> list[dict]:
    keys = ("epoch", "elbo", "kl", "tc_estimate", "tc_kl_anatomy", "discriminator_accuracy")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in keys if k in r} for r in rows if r.get("split") == "val"]


def tc_against_n(run: Path, sizes: list[int], data_dir: str | None) -> list[dict]:
    """kl_anatomy (exact aggregate, one z per image, seed 0) of the final model on the first N test images, for each
    N in ``sizes``: how I(x; z) and TC move with N shows the finite-N bias (I <= log N; once I nears log N the
    aggregate is N separate bumps and TC falls by about log 2 per doubling of N)."""
    import torch

    from elbolab.kl_anatomy import kl_anatomy
    from elbolab.loading import load_run, load_run_data

    model, config = load_run(run)
    model.eval()
    test = load_run_data(config["data"], data_dir).test
    n_max = min(max(sizes), len(test))
    batch = test.batch(torch.arange(n_max), torch.Generator().manual_seed(0))
    with torch.no_grad():
        qs = [model.encode(batch[i:i + 1000]) for i in range(0, n_max, 1000)]
    means = torch.cat([q.base_dist.loc for q in qs])
    stds = torch.cat([q.base_dist.scale for q in qs])
    out = []
    for n in sorted(s for s in sizes if s <= n_max):
        started = time.perf_counter()
        a = kl_anatomy(means[:n], stds[:n], seed=0)
        out.append({"n": n, "log_n": a["mutual_information_bound"], "seconds": round(time.perf_counter() - started, 1),
                    **{k: a[k] for k in ("mutual_information", "mutual_information_se", "total_correlation",
                                         "total_correlation_se", "dimension_wise_kl", "dimension_wise_kl_se",
                                         "average_kl")}})
    return out


def figure(history: list[dict], final: dict | None, path: Path, title: str, study: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2 if study else 1, figsize=(11.5 if study else 6.4, 4.3), dpi=150, squeeze=False)
    ax = axes[0, 0]
    ax.plot(epochs, [r.get("tc_estimate") for r in history], "o-", color="#c44e52",
            label="discriminator: E_q[T(z)] on each validation batch")
    ax.plot(epochs, [r.get("tc_kl_anatomy") for r in history], "s-", color="#4c72b0",
            label="kl_anatomy: exact aggregate per validation batch of 1000")
    if final and final.get("total_correlation") is not None:
        n = final.get("n_points")
        ax.errorbar([epochs[-1]], [final["total_correlation"]], yerr=[2 * final.get("total_correlation_se", 0.0)],
                    fmt="D", color="#55a868", capsize=4, markersize=7,
                    label=f"kl_anatomy on {n:,} test images, final model (± 2 s.e.)")
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.set_xlabel("epoch", fontsize=10)
    ax.set_ylabel("total correlation of q(z) (nats)", fontsize=10)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=9)
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    if study:
        ax = axes[0, 1]
        ns = [r["n"] for r in study]
        ax.errorbar(ns, [r["total_correlation"] for r in study], yerr=[2 * r["total_correlation_se"] for r in study],
                    fmt="s-", color="#4c72b0", capsize=3, label="TC by kl_anatomy (exact aggregate over N)")
        ax.errorbar(ns, [r["mutual_information"] for r in study],
                    yerr=[2 * r["mutual_information_se"] for r in study], fmt="^-", color="#8172b2", capsize=3,
                    label="I(x; z) by kl_anatomy")
        ax.plot(ns, [r["log_n"] for r in study], ":", color="0.3", label="log N (the ceiling of I)")
        if history and history[-1].get("tc_estimate") is not None:
            ax.axhline(history[-1]["tc_estimate"], color="#c44e52", linestyle="--",
                       label="discriminator's TC, last validation epoch")
        ax.set_xscale("log")
        ax.set_xlabel("N: test images in the aggregate q(z) (log scale)", fontsize=10)
        ax.set_ylabel("nats", fontsize=10)
        ax.set_title("Final model: the anatomy's TC and I against N", fontsize=10)
        ax.tick_params(labelsize=9)
        ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 0.08))
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def f2(value, digits: int = 2) -> str:
    return common.fmt(value, digits) if isinstance(value, (int, float)) else "n/a"


def pm(anatomy: dict, key: str) -> str:
    return f"{f2(anatomy.get(key))} ± {f2(anatomy.get(key + '_se'))}" if anatomy else "n/a"


def tables(results: dict) -> list[str]:
    extra = {"budget": results["budget"], "evaluation": results["evaluation"]}
    lines = common.header_lines("KL anatomy: VAE, beta-VAE (beta 4), FactorVAE (gamma 10)", results["machine"], extra)
    headers = ["model", "ELBO", "log p(x) (IS)", "mean KL", "I(x; z)", "TC", "dim-wise KL", "log N", "sum - KL",
               "active units", "train s", "eval s"]
    rows = []
    for name, e in results["models"].items():
        ev = e.get("eval") or {}
        a = ev.get("kl_anatomy") or {}
        lp = ev.get("log_px") or {}
        rows.append([name, f2(ev.get("elbo")), f"{f2(lp.get('mean'))} (K = {lp.get('k')})", f2(a.get("average_kl")),
                     pm(a, "mutual_information"), pm(a, "total_correlation"), pm(a, "dimension_wise_kl"),
                     f2(a.get("mutual_information_bound")), f2(a.get("sum_minus_average_kl"), 3),
                     f"{ev.get('active_units')}", f2(e["training"].get("training_wall_seconds"), 0),
                     f2(ev.get("call_seconds"), 0)])
    lines += common.markdown_table(headers, rows)
    history = results["models"].get("factor-vae", {}).get("validation")
    if history:
        lines += ["", "FactorVAE, per validation epoch: the discriminator's TC estimate against kl_anatomy's "
                  "(exact aggregate per validation batch of 1000 images):", ""]
        lines += common.markdown_table(
            ["epoch", "val ELBO", "val KL", "TC, discriminator", "TC, kl_anatomy", "discriminator accuracy"],
            [[r["epoch"], f2(r.get("elbo")), f2(r.get("kl")), f2(r.get("tc_estimate"), 3),
              f2(r.get("tc_kl_anatomy"), 3), f2(r.get("discriminator_accuracy"), 3)] for r in history])
    for name, e in results["models"].items():
        if e.get("tc_against_n"):
            lines += ["", f"{name}, final model: kl_anatomy (exact aggregate) on the first N test images:", ""]
            lines += common.markdown_table(
                ["N", "log N", "I(x; z)", "TC", "dim-wise KL", "mean KL", "seconds"],
                [[f"{r['n']:,}", f2(r["log_n"]), pm(r, "mutual_information"), pm(r, "total_correlation"),
                  pm(r, "dimension_wise_kl"), f2(r["average_kl"]), f2(r["seconds"], 1)] for r in e["tc_against_n"]])
    return lines


def save(results: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench23/anatomy")
    parser.add_argument("--data", default="sprites")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--models", default="vae,beta-vae,factor-vae")
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--val-size", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--hidden", default="400")
    parser.add_argument("--disc", default="256x4", help="FactorVAE discriminator WIDTHxDEPTH (paper: 1000x6)")
    parser.add_argument("--eval-images", type=int, default=2_000, help="test images for the anatomy and log p(x)")
    parser.add_argument("--iw-samples", type=int, default=10)
    parser.add_argument("--tc-sizes", default="500,1000,2000,5000,10000",
                        help="N for the anatomy of the final models against N ('' for none)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-json", default=str(RESULTS / "kl_anatomy.json"))
    parser.add_argument("--figure", default=str(RESULTS / "factorvae_tc.png"))
    parser.add_argument("--out", default=None, help="also append the markdown to this file")
    parser.add_argument("--report", action="store_true", help="only redraw the figure and print the tables of "
                        "--out-json")
    args = parser.parse_args()
    if args.smoke:
        args.data, args.train_size, args.val_size, args.epochs = "digits", 300, 200, 2
        args.latent_dim, args.hidden, args.disc, args.eval_images, args.iw_samples = 3, "16", "16x2", 100, 5
        args.tc_sizes = "50"
    if args.report:
        results = json.loads(Path(args.out_json).read_text())
        e = results["models"].get("factor-vae")
        if e:
            figure(e["validation"], e["eval"].get("kl_anatomy"), Path(args.figure),
                   f"FactorVAE on {args.data}: two estimates of TC(q(z)) during training", e.get("tc_against_n"))
        common.write_output(tables(results), args.out)
        return
    common.set_threads(1)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "cli.log"
    results = {"machine": common.machine_info(), "smoke": args.smoke,
               "budget": (f"{args.data}, first {args.train_size:,} training images, {args.epochs} epochs, batch "
                          f"{args.batch_size}, Adam lr 1e-3, MLP {args.hidden} / latent {args.latent_dim}; "
                          f"FactorVAE discriminator {args.disc}"),
               "evaluation": (f"elbolab eval --iw-samples {args.iw_samples} --limit {args.eval_images}: the first "
                              f"{args.eval_images:,} test images; anatomy by the exact aggregate over them, one z "
                              "per image; ± is the s.e. over images"), "models": {}}
    started = time.perf_counter()
    for name in args.models.split(","):
        run = workdir / name
        entry = results["models"].setdefault(name, {"run": str(run)})
        entry["training"] = train(name, run, args, log)
        save(results, args.out_json)
        entry["eval"] = evaluate(run, args, log)
        if name == "factor-vae":
            entry["validation"] = validation_history(run)
        save(results, args.out_json)
    sizes = [int(n) for n in args.tc_sizes.split(",") if n.strip()]
    for entry in results["models"].values():
        if sizes:
            entry["tc_against_n"] = tc_against_n(Path(entry["run"]), sizes, args.data_dir)
            save(results, args.out_json)
    if "factor-vae" in results["models"]:
        e = results["models"]["factor-vae"]
        figure(e["validation"], e["eval"].get("kl_anatomy"), Path(args.figure),
               f"FactorVAE on {args.data}: two estimates of TC(q(z)) during training", e.get("tc_against_n"))
        results["figure"] = args.figure
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["load_at_end"] = "{:.2f} / {:.2f}".format(*os.getloadavg()[:2])
    save(results, args.out_json)
    lines = tables(results)
    lines += ["", f"Total {results['total_seconds']:.0f} s; load average at the end {results['load_at_end']}."]
    common.write_output(lines, args.out)


if __name__ == "__main__":
    main()
