"""How well ``elbolab eval``'s cost probe predicts the log p(x) it budgets: ``evaluate.estimated_log_px_seconds``
(the estimator timed on 2 examples at K = min(K, 1,000), scaled in N and K) against the measured time of
``estimators.importance_sampled_log_px`` on the first N test examples of a run, for each N:K asked. The earlier
probe (``importance_samples`` on 8 examples x 64 draws, scaled the same way) is computed alongside for comparison.

Run:  ELBOLAB_DATA=/work/shared/data .venv/bin/python benchmarks/bench_eval_probe.py RUN [RUN ...] --threads 1
      .venv/bin/python benchmarks/bench_eval_probe.py --smoke      (a tiny digits VAE trained here; not a measurement)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common as common
import torch


def older_probe(model, data, n: int, k: int) -> float:
    """The probe before 2026-12-07: importance_samples on 8 examples x 64 draws, timed on its second call."""
    batch = data.batch(torch.arange(min(8, len(data))), torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.importance_samples(batch, min(k, 64))
        started = time.perf_counter()
        model.importance_samples(batch, min(k, 64))
        return (time.perf_counter() - started) * (n / len(batch)) * (k / min(k, 64))


def calibrate(run: Path, sizes: list[tuple[int, int]]) -> list[dict]:
    from elbolab.estimators import importance_sampled_log_px
    from elbolab.evaluate import estimated_log_px_seconds
    from elbolab.loading import load_run, load_run_data

    loaded = load_run(run)
    model = (loaded[0] if isinstance(loaded, tuple) else loaded).eval()
    test = load_run_data(json.loads((run / "config.json").read_text())["data"]).test
    rows = []
    for n, k in sizes:
        data = test.head(min(n, len(test)))
        predicted = estimated_log_px_seconds(model, data, k)
        before = older_probe(model, data, len(data), k)
        batch = data.batch(torch.arange(len(data)), torch.Generator().manual_seed(0))
        started = time.perf_counter()
        with torch.no_grad():
            importance_sampled_log_px(model, batch, k=k)
        measured = time.perf_counter() - started
        rows.append({"run": run.name, "n": len(data), "k": k, "predicted_s": predicted, "measured_s": measured,
                     "measured_over_predicted": measured / predicted, "older_probe_s": before,
                     "measured_over_older": measured / before})
        print(f"{run.name}: N={len(data)} K={k}: predicted {predicted:.2f} s, measured {measured:.2f} s "
              f"({measured / predicted:.2f}); older probe {before:.2f} s ({measured / before:.2f})", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="run folders (a trained model each)")
    p.add_argument("--sizes", default="200:5000,100:1000", help="N:K pairs, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--smoke", action="store_true", help="a tiny digits VAE, N=20 K=50 (checks that the script runs)")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    sizes = [tuple(int(v) for v in pair.split(":")) for pair in args.sizes.split(",")]
    runs = list(args.runs)
    if args.smoke:
        from elbolab import pipeline

        scratch = Path(tempfile.mkdtemp(prefix="bench-eval-probe-"))
        runs = [pipeline.train("vae", "digits", out=scratch / "vae", epochs=1, latent_dim=2, hidden=(16,),
                               progress=False, tensorboard=False, figures=False)]
        sizes = [(20, 50)]
    if not runs:
        p.error("give at least one run folder (or --smoke)")
    info = common.machine_info()
    rows = [row for run in runs for row in calibrate(Path(run), sizes)]
    lines = common.header_lines("eval's cost probe: predicted against measured log p(x) time", info,
                                {"setup": "estimated_log_px_seconds vs importance_sampled_log_px on the first N test "
                                          "examples" + (" (smoke test)" if args.smoke else "")})
    lines += common.markdown_table(
        ["run", "N", "K", "predicted s", "measured s", "measured / predicted", "older probe: measured / predicted"],
        [[r["run"], r["n"], r["k"], f"{r['predicted_s']:.2f}", f"{r['measured_s']:.2f}",
          f"{r['measured_over_predicted']:.2f}", f"{r['measured_over_older']:.2f}"] for r in rows])
    common.write_output(lines, None)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
