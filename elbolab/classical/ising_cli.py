"""CLI commands: ``elbolab denoise`` (Ising denoising) and ``elbolab functional shortest-curve``.

Each writes a report, ``index.html`` in its --out folder (``elbolab.report.write_command_report``): ``denoise``
also runs the two other methods at the same settings for a side-by-side comparison (``--no-compare`` skips them).

The lead's ``elbolab/cli.py`` mounts them: ``app.command("denoise")(denoise_command)`` and
``app.add_typer(functional_app, name="functional")``. Bad input raises ElbolabError (one-line message, exit 2).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Optional

import typer

from elbolab.errors import ElbolabError
from elbolab.outputs import check_memory, check_output_folder, round_down

# NumPy, torch, matplotlib and the estimators are imported inside the commands: this module is imported by
# 'elbolab --help', which must start in a fraction of a second.

DENOISE_OUTPUTS = ("clean.png", "noisy.png", "denoised.png", "posterior_mean.png", "elbo.png", "result.json",
                   "index.html")
CURVE_OUTPUTS = ("iterates.png", "result.json", "index.html")
METHOD_NAMES = {"meanfield": "mean-field", "icm": "ICM", "gibbs": "Gibbs"}
# Peak memory per pixel of a denoise run (the image, its noisy copy, the posterior and the fields in float64, the
# torch work arrays and the PNG writer): 75-95 bytes measured for every method at 1024 and 2048 pixels a side.
BYTES_PER_PIXEL = 128


def _check_image_memory(height: int, width: int, what: str, hint) -> None:
    check_memory(float(height) * float(width) * BYTES_PER_PIXEL, what, hint)


def _for_the_command_line(message: str) -> str:
    """The denoiser's advice names its Python arguments; on the command line they are flags."""
    for python, flag in (("(max_sweeps)", "(--sweeps)"), ("a smaller damping", "a smaller --damping"),
                         ("schedule='checkerboard'", "--schedule checkerboard")):
        message = message.replace(python, flag)
    return message


def _figure():
    from matplotlib.figure import Figure

    return Figure(figsize=(6, 4), dpi=100)


def _png(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _convergence_png(fits: dict) -> bytes:
    """The mean-field ELBO per sweep, and the ICM state's and Gibbs samples' log p~(z|x), as one PNG."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6), dpi=100)
    ax = fig.add_subplot(1, 2, 1)
    if "meanfield" in fits:
        elbo = fits["meanfield"][0].elbo_history_
        ax.plot(np.arange(len(elbo)), elbo, color="C0")
        ax.set(xlabel="sweep (0 = initialisation; log scale beyond 1)", ylabel="ELBO (nats)",
               title="mean-field: ELBO per sweep")
        ax.set_xscale("symlog", linthresh=1.0)  # the first sweeps change the most
    else:
        ax.set_axis_off()
    ax = fig.add_subplot(1, 2, 2)
    for colour, method in (("C1", "icm"), ("C2", "gibbs")):
        if method in fits:
            curve = fits[method][0].log_joint_history_
            ax.plot(np.arange(1, len(curve) + 1), curve, color=colour, label=METHOD_NAMES[method])
    ax.set(xlabel="sweep (log scale)", ylabel="log p~(z | x) (nats)", title="ICM state and Gibbs samples: "
           "unnormalised log posterior")
    ax.set_xscale("log")
    if ax.lines:
        ax.legend(loc="lower right")
    else:
        ax.set_axis_off()
    fig.tight_layout()
    return _png(fig)


def write_denoise_report(out: Path, clean, noisy, fits: dict, result: dict, noisy_spread: float) -> Path:
    """index.html of a ``denoise`` folder: clean, noisy and each method's estimate side by side with its pixel
    error rate, the mean-field ELBO per sweep (and ICM's and Gibbs's log p~(z|x)), a table of the methods.

    ``fits``: {method: (fitted IsingDenoiser, seconds)}, the command's own method first.
    """
    import numpy as np
    from matplotlib.figure import Figure

    from elbolab.classical.images import error_rate
    from elbolab.report import figure_html, note_html, table_html, write_command_report

    panels = [("clean", clean, -1.0, 1.0), (f"noisy\nerror {error_rate(noisy, clean):.2%}", noisy, -noisy_spread,
                                            noisy_spread)]
    for method in ("meanfield", "icm", "gibbs"):
        if method in fits:
            fitted = fits[method][0]
            shown = "posterior mean" if method != "icm" else "state"
            panels.append((f"{METHOD_NAMES[method]} {shown}\nerror {error_rate(fitted.predict(), clean):.2%}",
                           fitted.posterior_mean_, -1.0, 1.0))
    fig = Figure(figsize=(2.6 * len(panels), 3.0), dpi=100)
    for i, (title, image, low, high) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(np.asarray(image), cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(title, fontsize=11)
        ax.set_axis_off()
    fig.tight_layout()
    images_png = _png(fig)

    curves_png = _convergence_png(fits)

    rows = []
    for method, (fitted, seconds) in fits.items():
        final = fitted.elbo_history_[-1] if fitted.elbo_history_ else fitted.log_joint_history_[-1]
        what = "ELBO" if fitted.elbo_history_ else "log p~(z|x)"
        rows.append((METHOD_NAMES[method] + (" (this run)" if method == result["method"] else ""),
                     f"{error_rate(fitted.predict(), clean):.4f}", str(fitted.n_sweeps_),
                     "yes" if fitted.converged_ else "no", f"{final:.1f} ({what})", f"{seconds:.2f}"))
    noise = (f"Gaussian, sigma = {result['sigma']:g}" if result["noise"] == "gaussian"
             else f"flips, p = {result['flip_prob']:g}")
    cards = [("Image", f"{result['shape'][1]} x {result['shape'][0]}", result["image"]), ("Noise", noise),
             ("Coupling J", f"{result['coupling']:g}"),
             ("Method", METHOD_NAMES[result["method"]], f"{result['n_sweeps']} sweeps"
              + ("" if result["converged"] else ", not converged")),
             ("Pixel error", f"{result['error_rate_noisy']:.2%} -> {result['error_rate_denoised']:.2%}",
              "noisy -> denoised")]
    if result.get("final_elbo") is not None:
        cards.append(("Final ELBO", f"{result['final_elbo']:.1f}", "nats, mean-field"))
    notes = "" if len(fits) == 3 else note_html("Run without --no-compare to see the other methods here.")
    sections = [
        ("Images", figure_html(images_png, "Clean and noisy images and the estimates (grey: posterior means in "
                                           "[-1, 1]); error = fraction of pixels whose sign differs from the clean "
                                           "image") + notes),
        ("Convergence", figure_html(curves_png, "Mean-field ELBO per sweep (a lower bound on log Z(x)), and the "
                                                "unnormalised log posterior of the ICM state and of the Gibbs "
                                                "samples")),
        ("Methods", table_html(rows, ("Method", "Pixel error", "Sweeps", "Converged", "Final value", "Seconds"),
                               numeric_cols=(1, 2, 5))),
        ("Settings", table_html([(k, json.dumps(result[k])) for k in (
            "noise", "sigma", "flip_prob", "coupling", "damping", "schedule", "seed") if k in result])),
    ]
    return write_command_report(out, f"elbolab denoise: {METHOD_NAMES[result['method']]}", subtitle=str(out),
                                cards=cards, sections=sections)


def denoise_command(
    image: Optional[Path] = typer.Argument(  # noqa: UP045 - typer needs Optional here on Python 3.10
        None, help="PNG of the clean image (grey > 0.5 is white = +1); default: the built-in test image."),
    noise: str = typer.Option("gaussian", help="Noise added to the clean image and assumed by the model: "
                                               "gaussian or flip."),
    sigma: float = typer.Option(2.0, help="Gaussian noise standard deviation."),
    p: float = typer.Option(0.1, "--p", help="Flip noise: probability that a pixel is flipped, in (0, 0.5)."),
    method: str = typer.Option("meanfield", help="meanfield, icm or gibbs."),
    coupling: float = typer.Option(1.0, help="Ising coupling J (each neighbour pair counted once)."),
    damping: float = typer.Option(0.5, help="Mean-field damping lambda in (0, 1]; 1 = undamped."),
    schedule: str = typer.Option("parallel", help="Mean-field schedule: parallel or checkerboard."),
    sweeps: int = typer.Option(1000, help="Maximum sweeps (mean-field, ICM); sweeps run (Gibbs)."),
    seed: int = typer.Option(0, help="Seed of the noise and of the Gibbs sampler."),
    size: int = typer.Option(128, help="Side of the built-in image in pixels."),
    out: Path = typer.Option(..., "--out", help="Output folder (created; an earlier run's files in it are "
                                                "replaced only with --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier run in --out."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Also run the other two methods (same model "
                                 "and --sweeps) for the side-by-side comparison in index.html."),
) -> None:
    """Add noise to a binary image, denoise it, and write the pictures, ELBO curve, error rates and a report."""
    check_output_folder(out, DENOISE_OUTPUTS, overwrite=overwrite)
    if image is None:
        if size < 8:
            raise ElbolabError(f"expected --size of at least 8 pixels, got {size}; the default is 128")
        _check_image_memory(size, size, f"--size {size}", lambda budget: (
            f"use --size {round_down(math.isqrt(int(budget // BYTES_PER_PIXEL)))} or less (the default is 128)"))
    else:
        from elbolab.classical.images import image_size

        height, width = image_size(image)
        _check_image_memory(height, width, f"denoising {image} ({width} x {height} pixels)", lambda budget: (
            f"shrink it to at most {round_down(budget // BYTES_PER_PIXEL)} pixels"))


    from elbolab.classical.images import add_gaussian_noise, builtin_image, error_rate, flip_pixels, load_png, save_png
    from elbolab.classical.ising import IsingDenoiser, IsingModel

    IsingModel(coupling, noise, sigma, p)  # checks the noise settings before any work
    clean = builtin_image(size) if image is None else load_png(image)
    noisy = add_gaussian_noise(clean, sigma, seed) if noise == "gaussian" else flip_pixels(clean, p, seed)
    denoiser = IsingDenoiser(coupling=coupling, noise=noise, sigma=sigma, flip_prob=p, damping=damping,
                             method=method, schedule=schedule, max_sweeps=sweeps, random_state=seed, progress=True)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        denoiser.fit(noisy)
    elapsed = time.perf_counter() - start
    for warning in caught:
        typer.echo(f"warning: {_for_the_command_line(str(warning.message))}", err=True)

    out.mkdir(parents=True, exist_ok=True)
    for name in DENOISE_OUTPUTS:  # --overwrite: no file of the earlier run survives
        (out / name).unlink(missing_ok=True)
    spread = 1.0 + 2.0 * sigma if noise == "gaussian" else 1.0
    save_png(clean, out / "clean.png")
    save_png(noisy, out / "noisy.png", vmin=-spread, vmax=spread)
    save_png(denoiser.predict(), out / "denoised.png")
    save_png(denoiser.posterior_mean_, out / "posterior_mean.png")

    _plot_sweeps(denoiser, method, out / "elbo.png")

    result = {
        "image": "builtin" if image is None else str(image), "shape": list(clean.shape), "noise": noise,
        "sigma": sigma if noise == "gaussian" else None, "flip_prob": p if noise == "flip" else None,
        "method": method, "coupling": coupling, "damping": damping, "schedule": schedule, "seed": seed,
        "n_sweeps": denoiser.n_sweeps_, "converged": denoiser.converged_,
        "final_elbo": denoiser.elbo_history_[-1] if denoiser.elbo_history_ else None,
        "final_log_joint": denoiser.log_joint_history_[-1] if denoiser.log_joint_history_ else None,
        "error_rate_noisy": error_rate(noisy, clean), "error_rate_denoised": error_rate(denoiser.predict(), clean),
        "seconds": elapsed,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    fits = {method: (denoiser, elapsed), **(_other_methods(denoiser, noisy) if compare else {})}
    write_denoise_report(out, clean, noisy, fits, result, spread)
    typer.echo(f"{method}: pixel error {result['error_rate_noisy']:.4f} (noisy) -> "
               f"{result['error_rate_denoised']:.4f} (denoised) after {denoiser.n_sweeps_} sweeps; wrote {out}")
    others = [f"{name} {error_rate(fitted.predict(), clean):.4f} ({fitted.n_sweeps_} sweeps, {seconds:.1f} s)"
              for name, (fitted, seconds) in fits.items() if name != method]
    if others:
        typer.echo("for comparison, same model and settings: " + ", ".join(others) + f"; see {out / 'index.html'}")


def _plot_sweeps(denoiser, method: str, path: Path) -> None:
    """The ELBO (mean field) or the log joint (ICM, Gibbs) per sweep."""
    import numpy as np

    curve = denoiser.elbo_history_ or denoiser.log_joint_history_
    label = "ELBO" if denoiser.elbo_history_ else ("log p~(z|x) of the state" if method == "icm"
                                                  else "mean log p~(z|x) of the samples")
    fig = _figure()
    ax = fig.add_subplot()
    first = 0 if denoiser.elbo_history_ else 1  # the ELBO history starts at the initialisation
    ax.plot(np.arange(first, first + len(curve)), curve)
    ax.set(xlabel="sweep", ylabel=label, title=f"{method}: {label} per sweep")
    fig.tight_layout()
    fig.savefig(path)


def _other_methods(denoiser, noisy) -> dict:
    """The other two methods on the same model and settings, for the comparison: {method: (fit, seconds)}."""
    from elbolab.classical.ising import IsingDenoiser

    fits = {}
    for other in ("meanfield", "icm", "gibbs"):
        if other != denoiser.method:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the comparison's own convergence notes are in its table row
                fitted = IsingDenoiser(**{**denoiser.get_params(), "method": other}).fit(noisy)
            fits[other] = (fitted, time.perf_counter() - start)
    return fits


def write_curve_report(out: Path, result, line, summary: dict) -> Path:
    """index.html of a ``functional shortest-curve`` folder: the final curve against the straight line (the
    Euler-Lagrange solution) with the iterates, the Euler-Lagrange residual along the final curve, and the arc length
    above the straight line's per recorded step."""
    import numpy as np
    from matplotlib.figure import Figure

    from elbolab.classical.variations import arc_length_lagrangian, euler_lagrange_residual
    from elbolab.report import figure_html, table_html, write_command_report

    fig = Figure(figsize=(12, 3.8), dpi=100)
    ax = fig.add_subplot(1, 3, 1)
    ax.plot(result.x, result.iterates[0], color="0.6", lw=1.0, label="initial curve")
    ax.plot(result.x, line, "r--", lw=1.5, label="straight line")
    ax.plot(result.x, result.y, "b-", lw=1.5, marker=".", ms=4, label=f"final (step {result.n_steps})")
    ax.set(xlabel="x", ylabel="y", title="curve")
    ax.legend(loc="upper left", fontsize=8)
    ax = fig.add_subplot(1, 3, 2)
    residual = euler_lagrange_residual(arc_length_lagrangian, result.x, result.y)  # [N - 2], interior nodes
    ax.plot(result.x[1:-1], residual, "k.-", ms=4)
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.set(xlabel="x (interior nodes)", ylabel="residual R_k", title="Euler-Lagrange residual, final curve")
    ax = fig.add_subplot(1, 3, 3)
    excess = np.asarray(result.history, dtype=np.float64) - summary["straight_line_length"]
    ax.semilogy(np.arange(len(excess)), np.maximum(excess, 1e-16), "g.-", ms=4)
    ax.set(xlabel="recorded step", ylabel="length - straight line length",
           title="excess arc length")
    fig.tight_layout()
    png = _png(fig)
    rows = [(key.replace("_", " "), f"{value:.6g}" if isinstance(value, float) else json.dumps(value))
            for key, value in summary.items()]
    cards = [("Optimizer", summary["optimizer"], f"{summary['steps']} steps"),
             ("Converged", "yes" if summary["converged"] else "no"),
             ("Max deviation from the line", f"{summary['max_deviation_from_line']:.2e}"),
             ("Euler-Lagrange residual", f"{summary['euler_lagrange_residual']:.2e}", "max over interior nodes"),
             ("Length", f"{summary['length']:.6f}", f"straight line {summary['straight_line_length']:.6f}")]
    iterates = out / "iterates.png"
    figures = figure_html(png, "The final curve against the straight line, the Euler-Lagrange residual along it "
                               "(0 at a stationary curve), and the arc length above the minimum per step")
    if iterates.is_file():
        figures += figure_html(iterates.read_bytes(), "Iterates of the optimizer (grey, light = early)")
    return write_command_report(out, "elbolab functional shortest-curve", subtitle=str(out), cards=cards,
                                sections=[("Figures", f'<div class="figures">{figures}</div>'),
                                          ("Result", table_html(rows, ("Quantity", "Value"), numeric_cols=(1,)))])


functional_app = typer.Typer(help="Calculus of variations by direct minimisation (notes 002 s1).",
                             no_args_is_help=True)


@functional_app.command("shortest-curve")
def shortest_curve_command(
    points: int = typer.Option(33, help="Nodes of the discretised curve, end points included (>= 3)."),
    steps: int = typer.Option(1000, help="Most optimizer steps."),
    optimizer: str = typer.Option("lbfgs", help="lbfgs, adam or gd."),
    out: Path = typer.Option(..., "--out", help="Output folder (created; an earlier run's files in it are "
                                                "replaced only with --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier run in --out."),
) -> None:
    """Minimise the arc length between (0, 0) and (1, 1) from a curvy start; plot the iterates."""
    check_output_folder(out, CURVE_OUTPUTS, overwrite=overwrite)

    import numpy as np

    from elbolab.classical.variations import arc_length_lagrangian, minimize_functional

    x0, x1, y0, y1 = 0.0, 1.0, 0.0, 1.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = minimize_functional(arc_length_lagrangian, x0, x1, y0, y1, n_points=points, steps=steps,
                                     optimizer=optimizer)
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    line = y0 + (y1 - y0) * (result.x - x0) / (x1 - x0)
    deviation = float(np.abs(result.y - line).max())

    out.mkdir(parents=True, exist_ok=True)
    for name in CURVE_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    fig = _figure()
    ax = fig.add_subplot()
    # At most 12 curves, spaced evenly in log(step) because the early steps change the curve most.
    shown = sorted({int(round(v)) for v in np.geomspace(1, len(result.iterates), 12)} | {1})
    colours = [(0.2 + 0.6 * k / max(len(shown) - 1, 1),) * 3 for k in range(len(shown))]
    for index, colour in zip(shown, colours[::-1]):
        ax.plot(result.x, result.iterates[index - 1], color=colour, lw=0.8)
    ax.plot(result.x, result.y, "b-", lw=1.5, label=f"final iterate (step {result.n_steps})")
    ax.plot(result.x, line, "r--", lw=1.5, label="straight line (Euler-Lagrange solution)")
    ax.set(xlabel="x", ylabel="y", title="Shortest curve: iterates (grey, light = early)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "iterates.png")

    summary = {
        "points": points, "optimizer": optimizer, "steps": result.n_steps, "converged": result.converged,
        "max_deviation_from_line": deviation, "euler_lagrange_residual": result.euler_lagrange_residual,
        "length": result.value, "straight_line_length": math.hypot(x1 - x0, y1 - y0),
        "initial_length": result.history[0],
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    write_curve_report(out, result, line, summary)
    typer.echo(f"shortest curve: max deviation from the line {deviation:.2e}, Euler-Lagrange residual "
               f"{result.euler_lagrange_residual:.2e} after {result.n_steps} steps; wrote {out}")


__all__ = ["denoise_command", "functional_app", "shortest_curve_command", "ElbolabError"]
