"""``elbolab gmm fit``: fit a Gaussian mixture (EM or variational Bayes) to a .csv / .npy file and write the
parameters (JSON), the labels, the bound per iteration, for 2-D data a contour plot, the components over the data
(components.png) and a report (index.html).

Both methods report their bound in nats per sample: EM the mean log-likelihood, VB the complete ELBO divided by
the number of samples, so the two curves can be compared on one scale."""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from elbolab.errors import DataError, ElbolabError
from elbolab.outputs import check_output_folder

# NumPy, scikit-learn, torch and the estimators are imported inside the functions: this module is imported by
# 'elbolab --help', which must start in a fraction of a second.
if TYPE_CHECKING:
    import numpy as np

app = typer.Typer(help="Gaussian mixtures fitted by EM (maximum likelihood) or variational Bayes (CAVI).",
                  add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
METHODS = ("em", "vb")
COVARIANCES = ("full", "tied", "diag", "spherical")  # as _mixture_common.COVARIANCE_TYPES (checked by a test)
OUTPUTS = ("params.json", "labels.npy", "curve.csv", "curve.png", "contours.png", "components.png", "index.html")
# A variational-Bayes component whose expected weight is below this is drawn and listed as pruned: VB empties the
# components the data do not need (their weight tends to 0) instead of sharing the points among all K.
PRUNED_WEIGHT = 0.01
PRUNED_COLOUR = "0.6"  # pruned components: faint grey, dotted, no marker (a red or black x would read as a point)


@app.callback()
def _group() -> None:
    """Gaussian mixtures fitted by EM (maximum likelihood) or variational Bayes (CAVI)."""


def _read_text(path: Path) -> str:
    """The text of a CSV file (UTF-8, a byte-order mark dropped); binary content is one DataError, not a
    UnicodeDecodeError traceback."""
    data = path.read_bytes()
    kinds = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"PK\x03\x04": "a zip archive (.npz?)",
             b"\x93NUMPY": "a NumPy .npy array", b"%PDF": "a PDF document"}
    kind = next((name for magic, name in kinds.items() if data.startswith(magic)), None)
    where = None
    if kind is None:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            where = f"byte {err.start} is not UTF-8 text"
        else:
            if "\x00" not in text:
                return text
            where = f"a NUL byte at position {data.index(0)}"
    got = kind or f"binary data ({where})"
    hint = "rename it to .npy" if kind == "a NumPy .npy array" else (
        "export the data as comma-separated text (UTF-8), or save it with np.save as .npy")
    raise DataError(f"expected a text CSV file of numbers in {path}, got {got}; {hint}")


def load_matrix(path: Path) -> np.ndarray:
    """A numeric [N, D] float64 array from .npy or .csv (comma-separated UTF-8 text, optional header row; 1-D = one
    feature)."""
    return load_table(path)[0]


def load_table(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """(the [N, D] array of ``load_matrix``, the column names of a .csv's header row or None): the figures name
    their axes after the columns."""
    import numpy as np

    from elbolab.data.arrays import is_number_cell  # one CSV cell rule for every reader

    if not path.is_file():
        raise DataError(f"expected a data file, got no file at {path}")
    suffix = path.suffix.lower()
    names = None
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise DataError(f"expected a numeric .npy array in {path}, could not read it ({err}); save it with "
                            "np.save(path, X.astype(float))") from None
    elif suffix == ".csv":
        rows = [row for row in csv.reader(io.StringIO(_read_text(path), newline=""))
                if any(cell.strip() for cell in row)]
        if rows and not all(is_number_cell(cell) for cell in rows[0]):
            names = [cell.strip() or f"column {j + 1}" for j, cell in enumerate(rows[0])]
            rows = rows[1:]  # header line
        widths = {len(row) for row in rows}
        if not rows or len(widths) != 1:
            raise DataError(f"expected comma-separated rows of equal length in {path}, got "
                            f"{len(rows)} rows with {sorted(widths)} columns")
        for number, row in enumerate(rows, start=1):
            bad = [cell for cell in row if not is_number_cell(cell)]
            if bad:
                raise DataError(f"expected numbers only in {path}, got {bad[0]!r} in data row {number}; "
                                "remove label or text columns")
        array = np.asarray(rows, dtype=np.float64)
    else:
        raise DataError(f"expected a .csv or .npy file, got {path.name!r}")
    if array.dtype.kind not in "biuf":
        raise DataError(f"expected numbers in {path}, got dtype {array.dtype}")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.size == 0:
        raise DataError(f"expected a 2-D array [n_samples, n_features] in {path}, got shape {array.shape}")
    return array.astype(np.float64), names


def axis_names(names, n_features: int) -> list[str]:
    """The name of each column: the CSV header's, else "feature 1", "feature 2", ... (counting from 1)."""
    if names is not None and len(names) == n_features:
        return [str(n) for n in names]
    return [f"feature {j + 1}" for j in range(n_features)]


def _plot_curve(history, ylabel: str, path: Path) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(np.arange(1, len(history) + 1), history, marker=".")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole iterations, no 1.25 ticks
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _legend_below(ax, handles, title: str, ncol: int) -> None:
    """The legend under the axes, in type large enough for the report, which shows the figure at about 2/3 size (the
    axis labels too)."""
    ax.xaxis.label.set_fontsize(11)
    ax.yaxis.label.set_fontsize(11)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=ncol, fontsize=11,
              title=title, title_fontsize=11, frameon=False, columnspacing=1.2)


def _pruned_handle(pruned: np.ndarray, drawn: bool = True, left_out: str = "not marked"):
    """The one legend entry of every pruned component: a faint dotted grey line, no marker (``drawn=False``: an
    empty handle saying what the figure leaves out, ``left_out``)."""
    import numpy as np
    from matplotlib.lines import Line2D

    which = ", ".join(str(k + 1) for k in np.flatnonzero(pruned))
    plural = "s" if pruned.sum() > 1 else ""
    if not drawn:
        return Line2D([], [], ls="none", label=f"{left_out}: pruned component{plural} {which} "
                                               f"(weight < {PRUNED_WEIGHT:g})")
    return Line2D([], [], color=PRUNED_COLOUR, ls=":", lw=1.2,
                  label=f"pruned (weight < {PRUNED_WEIGHT:g}): component{plural} {which}")


def contours_figure(model, X: np.ndarray, labels: np.ndarray, title: str, pruned: np.ndarray | None = None,
                    names=None):
    """2-D data coloured by component (the colours of components.png), the log density of the mixture as contours,
    a black x at the mean of each used component; pruned components get no marker (their mean is the prior's,
    where no data are) and are named in the legend. The axes carry the columns' names."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    k = len(model.means_)
    pruned = np.zeros(k, dtype=bool) if pruned is None else np.asarray(pruned, dtype=bool)
    low, high = X.min(0), X.max(0)
    pad = 0.1 * (high - low) + 1e-9
    gx, gy = np.meshgrid(np.linspace(low[0] - pad[0], high[0] + pad[0], 150),
                         np.linspace(low[1] - pad[1], high[1] + pad[1], 150))
    density = model.score_samples(np.column_stack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
    fig = Figure(figsize=(6.2, 5.6), dpi=100)
    ax = fig.add_subplot()
    colours = [f"C{j % 10}" for j in range(k)]
    ax.scatter(X[:, 0], X[:, 1], c=[colours[j] for j in labels], s=6, alpha=0.5, linewidths=0)
    levels = np.linspace(density.max() - 12.0, density.max(), 13)
    contour = ax.contour(gx, gy, density, levels=levels, cmap="viridis", linewidths=0.8)
    fig.colorbar(contour, ax=ax, label="log density")
    used = ~pruned
    means = np.asarray(model.means_)
    ax.plot(means[used, 0], means[used, 1], marker="x", ms=9, mew=2.2, color="black", ls="none")
    handles = [Line2D([], [], marker="x", ms=8, mew=2, color="black", ls="none", label="mean of a used component")]
    if pruned.any():
        handles.append(_pruned_handle(pruned, drawn=False))
    xlabel, ylabel = axis_names(names, X.shape[1])[:2]
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    _legend_below(ax, handles, "", ncol=1)
    fig.tight_layout()
    return fig


def _plot_contours(model, X: np.ndarray, labels: np.ndarray, title: str, path: Path, pruned=None,
                   names=None) -> None:
    contours_figure(model, X, labels, title, pruned, names).savefig(path, dpi=100, bbox_inches="tight")


def full_covariances(covariances, covariance_type: str, n_components: int, n_features: int) -> np.ndarray:
    """[K, D, D] covariance matrices from the estimator's ``covariances_`` of any ``covariance_type``."""
    import numpy as np

    c = np.asarray(covariances, dtype=np.float64)
    if covariance_type == "full":
        return c.reshape(n_components, n_features, n_features)
    if covariance_type == "tied":
        return np.broadcast_to(c.reshape(n_features, n_features), (n_components, n_features, n_features)).copy()
    if covariance_type == "diag":
        return np.stack([np.diag(row) for row in c.reshape(n_components, n_features)])
    return c.reshape(n_components, 1, 1) * np.eye(n_features)  # spherical


def pruned_components(weights, method: str) -> np.ndarray:
    """Boolean [K]: the VB components whose weight fell below PRUNED_WEIGHT (never for EM)."""
    import numpy as np

    w = np.asarray(weights, dtype=np.float64)
    return (w < PRUNED_WEIGHT) if method == "vb" else np.zeros(w.shape, dtype=bool)


def components_figure(X: np.ndarray, labels: np.ndarray, means: np.ndarray, covs: np.ndarray, weights,
                      pruned: np.ndarray, title: str, names=None):
    """The data (the first two columns, named after the CSV header when there is one) coloured by component, each
    used component's mean (x) and its 1- and 2-s.d. ellipses in its colour; a pruned component (variational Bayes,
    weight < PRUNED_WEIGHT) only as a faint dotted grey 1-s.d. ellipse with no marker, all pruned ones in one
    legend entry. The legend sits below the axes, never over the points."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Ellipse

    fig = Figure(figsize=(6.4, 5.6), dpi=100)
    ax = fig.add_subplot()
    colours = [f"C{k % 10}" for k in range(len(means))]
    columns = axis_names(names, X.shape[1])
    handles = []
    if X.shape[1] == 1:
        grid = np.linspace(X.min() - 0.1 * np.ptp(X) - 1e-9, X.max() + 0.1 * np.ptp(X) + 1e-9, 400)
        ax.hist(X[:, 0], bins=40, density=True, color="0.8")
        for k, (mean, cov, w) in enumerate(zip(means, covs, weights)):
            if pruned[k]:
                continue  # weight ~0: its curve is flat at zero
            sd = float(np.sqrt(cov[0, 0]))
            density = w * np.exp(-0.5 * ((grid - mean[0]) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
            ax.plot(grid, density, color=colours[k], ls="-")
            handles.append(Line2D([], [], color=colours[k], lw=2, label=f"{k + 1}: w = {w:.3f}"))
        ax.set(xlabel=columns[0], ylabel="density", title=title)
        legend_title = "component: weight (curves: weight x density)"
    else:
        ax.scatter(X[:, 0], X[:, 1], c=[colours[k] for k in labels], s=7, alpha=0.5, linewidths=0)
        for k, (mean, cov, w) in enumerate(zip(means, covs, weights)):
            values, vectors = np.linalg.eigh(cov[:2, :2])
            angle = float(np.degrees(np.arctan2(vectors[1, -1], vectors[0, -1])))
            for n_sd in ((1,) if pruned[k] else (1, 2)):
                width, height = 2 * n_sd * np.sqrt(np.maximum(values[::-1], 0))
                style = (dict(edgecolor=PRUNED_COLOUR, ls=":", lw=1.0, alpha=0.8) if pruned[k] else
                         dict(edgecolor=colours[k], lw=1.6, alpha=1.0 if n_sd == 1 else 0.6))
                ax.add_patch(Ellipse(mean[:2], width, height, angle=angle, fill=False, **style))
            if not pruned[k]:
                ax.plot(mean[0], mean[1], marker="x", ms=9, mew=2.2, color="black", ls="none")
                handles.append(Line2D([], [], color=colours[k], lw=2, marker="x", mec="black", mew=2, ms=7,
                                      label=f"{k + 1}: w = {w:.3f}"))
        ax.set(xlabel=columns[0], ylabel=columns[1], title=title)
        ax.set_aspect("equal", adjustable="datalim")
        legend_title = "component: weight (x = mean; ellipses 1 and 2 s.d.)"
    if pruned.any():  # 1-D: a pruned component's curve is flat at 0 and not drawn
        handles.append(_pruned_handle(pruned, drawn=X.shape[1] > 1, left_out="not drawn"))
    _legend_below(ax, handles, legend_title, ncol=min(2, len(handles)))
    fig.tight_layout()
    return fig


def write_fit_report(out: Path, X: np.ndarray, labels: np.ndarray, params: dict, history: np.ndarray,
                     source: Path, names=None) -> Path:
    """index.html of a ``gmm fit`` folder: the numbers, the components over the data (components.png), the bound
    per iteration in nats per sample, and a table of the components."""
    import numpy as np

    from elbolab.report import figure_html, note_html, table_html, write_command_report

    method, k = params["method"], params["n_components"]
    means = np.asarray(params["means"], dtype=np.float64).reshape(k, -1)
    covs = full_covariances(params["covariances"], params["covariance_type"], k, X.shape[1])
    weights = np.asarray(params["weights"], dtype=np.float64)
    pruned = pruned_components(weights, method)
    columns = axis_names(names, X.shape[1])
    what = f"{columns[0]} and {columns[1]} of {X.shape[1]} columns" if X.shape[1] > 2 else ""
    used = f" ({k - int(pruned.sum())} used)" if pruned.any() else ""
    title = f"{method.upper()} {params['covariance_type']}, K = {k}{used}" + (f"\n{what}" if what else "")
    fig = components_figure(X, labels, means, covs, weights, pruned, title, names)
    fig.savefig(out / "components.png", dpi=100, bbox_inches="tight")
    components_png = (out / "components.png").read_bytes()
    figures = [figure_html(components_png, "The data coloured by their most probable component, each component's "
                           "mean and its 1- and 2-s.d. ellipses" + (
                               f"; pruned components (weight < {PRUNED_WEIGHT:g}, unused by the data) as a faint "
                               "dotted grey ellipse, without a mean marker" if pruned.any() else ""))]
    figures.append(figure_html((out / "curve.png").read_bytes(),
                               params["bound_name"][:1].upper() + params["bound_name"][1:] + " per iteration"))
    if (out / "contours.png").is_file():
        figures.append(figure_html((out / "contours.png").read_bytes(), "Log density of the fitted mixture" + (
            "; x marks the mean of each used component (pruned ones are not marked)" if pruned.any() else "")))
    rows = []
    for j in range(k):
        counts = int(np.sum(labels == j))
        rows.append((str(j + 1), f"{weights[j]:.4f}", ", ".join(f"{v:.3g}" for v in means[j][:6])
                     + (", ..." if means.shape[1] > 6 else ""), f"{counts:,}", "pruned" if pruned[j] else ""))
    table = table_html(rows, ("Component", "Weight", "Mean", "Points assigned", "Status"), numeric_cols=(1, 3))
    status = (f"converged in {params['n_iter']} iterations" if params["converged"]
              else f"not converged after {params['n_iter']} iterations")
    cards = [("Method", "EM (maximum likelihood)" if method == "em" else "variational Bayes (CAVI)"),
             ("Data", f"{params['n_samples']:,} x {params['n_features']}", source.name),
             ("Components", f"{k}" if method == "em" else f"{k - int(pruned.sum())} of {k} used",
              None if method == "em" else f"weight >= {PRUNED_WEIGHT:g}"),
             ("Covariance", params["covariance_type"]),
             (params["bound_name"].split(" (")[0], f"{params['lower_bound']:.4f}", "nats per sample"),
             ("Fit", status)]
    if method == "em":
        cards += [("BIC", f"{params['bic']:.1f}"), ("AIC", f"{params['aic']:.1f}")]
    notes = [] if method == "em" else [note_html(
        "Variational Bayes bounds the log evidence, so its ELBO per sample sits a little below the EM mean "
        "log-likelihood of the same data; both curves are in nats per sample.")]
    sections = [("Figures", '<div class="figures">' + "".join(figures) + "</div>" + "".join(notes)),
                ("Components", table),
                ("Settings", table_html([(key, json.dumps(params[key])) for key in (
                    "method", "covariance_type", "n_components", "seed", "reg_covar", "n_iter", "converged")]))]
    return write_command_report(out, f"elbolab gmm fit: {source.name}", subtitle=str(out), cards=cards,
                                sections=sections)


def _tolist(value):
    import numpy as np

    return value.tolist() if isinstance(value, np.ndarray) else value


def bound_per_sample(model, method: str, n_samples: int) -> tuple[str, float, np.ndarray]:
    """``(name, final value, history)`` of the bound the command reports, in nats per sample for both methods.

    EM's ``lower_bound_`` is already the mean log-likelihood per sample; VB's is the complete ELBO of the whole
    data set, divided here by the number of samples so that the two methods' numbers and curves share one scale
    (the VB value then sits a little below the EM one: the ELBO bounds the log evidence, not the maximised
    likelihood).
    """
    import numpy as np

    history = np.asarray(model.lower_bound_history_, dtype=np.float64)
    final = float(model.lower_bound_)
    if method == "em":
        return "mean log-likelihood per sample (nats)", final, history
    return "ELBO per sample (nats)", final / n_samples, history / n_samples


def _check_vb_prior(X: np.ndarray, covariance: str, path: Path) -> None:
    """Variational Bayes scales its Wishart (or Gamma) prior by the data covariance (its diagonal for diag, the
    mean variance for spherical); refuse data for which that is singular, naming what the command line offers."""
    import numpy as np

    if X.shape[0] < 2:
        return  # the estimator then uses unit variances
    constant = [int(j) + 1 for j in np.flatnonzero(np.ptp(X, axis=0) == 0)]
    if constant and (covariance != "spherical" or len(constant) == X.shape[1]):
        others = "--method em (its --reg-covar keeps the covariances invertible)"
        if covariance != "spherical" and len(constant) < X.shape[1]:
            others += " or --covariance spherical"
        raise DataError(f"--method vb --covariance {covariance} needs every column to vary (its prior is scaled by "
                        f"the data's variances), got constant column(s) {constant} (counting from 1) in {path}; "
                        f"remove them from the file (a constant says nothing about the clusters), or use {others}")
    if covariance in ("full", "tied") and X.shape[1] > 1:
        try:
            np.linalg.cholesky(np.atleast_2d(np.cov(X.T)))
        except np.linalg.LinAlgError:
            raise DataError(f"--method vb --covariance {covariance} needs columns that are not linearly dependent "
                            f"(its prior is scaled by the data covariance, which is singular for {path}: a column "
                            "is a multiple or a sum of others); remove the redundant column(s), or use "
                            "--covariance diag or --method em") from None


def _check_no_overflow(X: np.ndarray, path: Path) -> None:
    """Values so large that their squares overflow float64 (near 1e300): say so before any fit, which would call
    the infinite covariances singular."""
    import numpy as np
    import torch

    from elbolab.classical._mixture_common import check_no_overflow

    try:
        check_no_overflow(torch.from_numpy(np.asarray(X, dtype=np.float64)))
    except DataError as err:
        raise DataError(f"{path}: {err}") from None


def _for_the_command_line(err: ElbolabError) -> ElbolabError:
    """An estimator's message names its Python arguments; on the command line they are flags."""
    text = str(err)
    for python, flag in (("reg_covar", "--reg-covar"), ("fewer components (now", "fewer components with -k (now"),
                         (", or use dtype='float64'", ""), (" ; float64 (dtype='float64') is also more robust", "")):
        text = text.replace(python, flag)  # the CLI always fits in float64
    return ElbolabError(text)


@app.command("fit")
def fit_command(
    data: Path = typer.Argument(..., help=".csv (optional header row) or .npy file, one row per sample"),
    n_components: int = typer.Option(..., "-k", "--n-components", help="number of mixture components K"),
    covariance: str = typer.Option("full", "--covariance", help="full | diag | spherical | tied"),
    method: str = typer.Option("em", "--method", help="em (maximum likelihood) | vb (variational Bayes)"),
    out: Path = typer.Option(Path("gmm-out"), "--out", help="output folder (created; an earlier fit's files in it "
                                                            "are replaced only with --overwrite)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the files of an earlier fit in --out"),
    seed: int = typer.Option(0, "--seed", help="random seed of the k-means initialisation"),
    max_iter: int = typer.Option(100, "--max-iter"),
    tol: float = typer.Option(1e-3, "--tol", help="stop when the fitted bound changes by less than this "
                              "(EM: per sample; VB: the whole-data ELBO, as the estimators define tol)"),
    n_init: int = typer.Option(1, "--n-init", help="restarts; the best bound is kept"),
    reg_covar: float = typer.Option(1e-6, "--reg-covar", help="added to the diagonal of every covariance estimate "
                                    "(as scikit-learn); raise it when a component collapses onto a few points"),
):
    """Fit a Gaussian mixture and write params.json, labels.npy, curve.csv/.png, (2-D data) contours.png,
    components.png and a report, index.html."""
    if method not in METHODS:
        raise ElbolabError(f"expected --method in {list(METHODS)}, got {method!r}")
    if covariance not in COVARIANCES:
        raise ElbolabError(f"expected --covariance in {list(COVARIANCES)}, got {covariance!r}")
    if not reg_covar >= 0:
        raise ElbolabError(f"expected --reg-covar >= 0, got {reg_covar}; the default is 1e-6")
    check_output_folder(out, OUTPUTS, overwrite=overwrite)
    X, names = load_table(data)
    _check_no_overflow(X, data)
    if method == "vb":
        _check_vb_prior(X, covariance, data)

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning

    from elbolab.classical import BayesianGaussianMixture, GaussianMixture

    settings = dict(n_components=n_components, covariance_type=covariance, random_state=seed,
                    max_iter=max_iter, tol=tol, n_init=n_init, reg_covar=reg_covar, progress=True)
    model = GaussianMixture(**settings) if method == "em" else BayesianGaussianMixture(**settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        try:
            model.fit(X)
        except ElbolabError as err:
            raise _for_the_command_line(err) from err
    labels = model.predict(X)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # --overwrite: no file of the earlier fit survives (e.g. contours.png of other data)
        (out / name).unlink(missing_ok=True)
    bound_name, bound, history = bound_per_sample(model, method, X.shape[0])
    params = {"method": method, "covariance_type": covariance, "n_components": n_components,
              "n_samples": int(X.shape[0]), "n_features": int(X.shape[1]), "columns": axis_names(names, X.shape[1]),
              "seed": seed,
              "reg_covar": reg_covar,
              "converged": bool(model.converged_), "n_iter": int(model.n_iter_), "bound_name": bound_name,
              "lower_bound": bound, "weights": _tolist(model.weights_),
              "means": _tolist(model.means_), "covariances": _tolist(model.covariances_)}
    if method == "em":
        params.update(bic=float(model.bic(X)), aic=float(model.aic(X)))
    else:
        concentration = model.weight_concentration_
        params.update(weight_concentration=_tolist(concentration), mean_precision=_tolist(model.mean_precision_),
                      degrees_of_freedom=_tolist(model.degrees_of_freedom_))
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    np.save(out / "labels.npy", labels.astype(np.int64), allow_pickle=False)
    np.savetxt(out / "curve.csv", np.column_stack([np.arange(1, len(history) + 1), history]), delimiter=",",
               header="iteration,bound_per_sample", comments="", fmt=["%d", "%.10g"])
    written = ["params.json", "labels.npy", "curve.csv", "curve.png"]
    _plot_curve(history, bound_name, out / "curve.png")
    if X.shape[1] == 2:
        pruned = pruned_components(model.weights_, method)
        used = f" ({n_components - int(pruned.sum())} used)" if pruned.any() else ""
        _plot_contours(model, X, labels, f"{method.upper()} {covariance}, K = {n_components}{used}",
                       out / "contours.png", pruned, names)
        written.append("contours.png")
    write_fit_report(out, X, labels, params, history, data, names)
    written += ["components.png", "index.html"]
    status = f"converged in {model.n_iter_} iterations" if model.converged_ else (
        f"NOT converged after {model.n_iter_} iterations (try a larger --max-iter or --tol)")
    typer.echo(f"{method.upper()} Gaussian mixture, K = {n_components}, {covariance} covariance, "
               f"{X.shape[0]} x {X.shape[1]} data: {status}")
    typer.echo(f"{bound_name}: {bound:.6g}")
    typer.echo("weights: " + " ".join(f"{w:.3f}" for w in np.asarray(model.weights_)))
    if caught and not model.converged_:
        typer.echo(f"warning: {caught[-1].message}")
    typer.echo(f"wrote {', '.join(written)} to {out}")
