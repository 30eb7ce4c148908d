"""A self-contained HTML page for one run folder: figures embedded, CSS inline, nothing fetched.

Reads whatever the run folder holds (config.json, eval.json, metrics.jsonl, manifest.json, figures/*.png)
and notes what is missing instead of failing, so a half-finished run still gets a page.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath

from elbolab.errors import CheckpointError

__all__ = ["write_report", "write_command_report", "figure_html", "table_html", "note_html"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_EMBED_BYTES = 10_000_000  # a page of tens of MB is unusable; such figures get a note instead
_LIST_PREVIEW = 8
# Figure order on the page: (kind, substrings of the file stem that select it, caption).
_FIGURE_KINDS = (
    ("samples", ("sample",), "Samples from the model"),
    ("reconstructions", ("recon",), "Inputs (top) and their reconstructions (beneath)"),
    ("curves", ("curve",), "Training curves by epoch, train vs val"),
    ("manifold", ("manifold",), "Latent manifold: decoder mean over a grid of normal quantiles"),
    ("latent_scatter", ("scatter",),
     "Latent codes coloured by label: 2-D (or a projection), or a histogram for a 1-D latent"),
    ("is_diagnostics", ("is_diagnostics",),
     "Importance-sampling diagnostics: ESS per example, log weights of three examples, log p(x) against K"),
)
# Fallback headline when eval.json has no log p(x) block: the first top-level number whose key matches.
_HEADLINE_FALLBACKS = (("elbo", "ELBO"), ("log_likelihood", "Log-likelihood"), ("loglik", "Log-likelihood"),
                       ("nll", "NLL"))
# Fields of a log p(x) estimate (evaluate.LogLikelihoodEstimate.to_dict, plus the flags evaluate_model adds);
# "stderr" is the older name of the s.e. over examples.
_ESTIMATE_FIELDS = ("mean", "mc_stderr", "bias_estimate", "sd_over_examples", "stderr_over_examples", "stderr",
                    "ess_mean", "ess_min", "k", "n_examples", "is_density", "is_exact_estimate")
_CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --accent:#2f6fb0; --bg:#fafbfc; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1100px; margin:0 auto; padding:24px 28px 48px; }
@media (max-width:600px) { main { padding:16px 12px 32px; } }
h1 { font-size:1.6rem; margin:0 0 4px; }
h2 { font-size:1.2rem; margin:36px 0 12px; padding-bottom:4px; border-bottom:2px solid var(--line); }
h3 { font-size:1rem; margin:20px 0 8px; color:var(--muted); }
nav { margin:8px 0 4px; font-size:.9rem; display:flex; flex-wrap:wrap; row-gap:4px; }
nav a { color:var(--accent); text-decoration:none; margin-right:14px; }
.subtitle, .note, figcaption, footer { color:var(--muted); }
.note { font-size:.9rem; font-style:italic; margin:6px 0; }
.cards { display:grid; grid-template-columns:repeat(auto-fill,minmax(min(200px,100%),1fr)); gap:12px; }
.card { background:#fff; border:1px solid var(--line); border-radius:8px; padding:10px 14px; }
.card .label { font-size:.82rem; color:var(--muted); }
.card .value { font-size:1.15rem; font-weight:600; word-break:break-word; }
.card .sub { font-size:.8rem; color:var(--muted); }
.card.warn { border-color:#d9a400; background:#fffbea; }
.callout { background:#fffbea; border:1px solid #e8c547; border-left:5px solid #d9a400; border-radius:6px;
  padding:8px 14px; margin:10px 0; }
.callout strong { color:#7a5a00; }
td.meaning { color:var(--muted); font-size:.85rem; }
table.eval { width:100%; }
table.eval col.quantity { width:30%; }
table.eval col.value { width:22%; }
table { border-collapse:collapse; background:#fff; border:1px solid var(--line); margin:6px 0 12px;
  font-size:.9rem; min-width:50%; }
th, td { text-align:left; padding:5px 12px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#f1f4f8; font-weight:600; }
td.num { font-variant-numeric:tabular-nums; text-align:right; white-space:nowrap; }
tr:nth-child(even) td { background:#fbfcfd; }
code { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:.85em; }
.figures { display:grid; grid-template-columns:repeat(auto-fill,minmax(min(440px,100%),1fr)); gap:18px;
  align-items:start; }
.table-wrap { max-width:100%; overflow-x:auto; }
figure.wide { grid-column:1 / -1; }
figure { margin:0; background:#fff; border:1px solid var(--line); border-radius:8px; padding:10px; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto; cursor:zoom-in; }
.hint { color:#6b7280; font-size:.8rem; }
#zoom { display:none; position:fixed; inset:0; background:rgba(20,24,31,.92); z-index:10; overflow:auto;
        cursor:zoom-out; padding:24px; box-sizing:border-box; }
#zoom.open { display:block; }
#zoom img { display:block; margin:0 auto; background:#fff; max-width:none; min-width:min(100%, 1100px); }
figcaption { font-size:.88rem; margin-top:6px; text-align:center; }
footer { margin-top:40px; font-size:.8rem; }
"""


def _explorer_css() -> str:
    from elbolab.explorer import EXPLORER_CSS

    return EXPLORER_CSS


# Click a figure to see it full size over the page (plain JavaScript, nothing fetched); click or Esc closes.
_ZOOM = (
    '<div id="zoom" role="dialog" aria-label="enlarged figure"><img alt=""></div><script>'
    '(function(){var z=document.getElementById("zoom"),im=z.querySelector("img");'
    'document.querySelectorAll("figure img").forEach(function(f){f.addEventListener("click",function(){'
    'im.src=f.src;im.alt=f.alt;z.classList.add("open");});});'
    'z.addEventListener("click",function(){z.classList.remove("open");});'
    'document.addEventListener("keydown",function(e){if(e.key==="Escape")z.classList.remove("open");});'
    '})();</script>'
)


# ---------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> tuple[object | None, str | None]:
    if not path.is_file():
        return None, f"{path.name} not found; section skipped."
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path.name} could not be read ({type(exc).__name__}: {exc}); section skipped."


def _read_jsonl(path: Path) -> tuple[list[dict], str | None]:
    if not path.is_file():
        return [], f"{path.name} not found; section skipped."
    from elbolab.runs import read_metrics

    try:
        records, bad = read_metrics(path)
    except CheckpointError as exc:
        return [], f"{exc}; section skipped."
    if not bad:
        return records, None
    shown = ", ".join(str(n) for n in bad[:_LIST_PREVIEW]) + (", ..." if len(bad) > _LIST_PREVIEW else "")
    return records, (f"{len(bad)} unreadable line(s) in {path.name} were skipped (line {shown}): not a JSON record, "
                     "e.g. cut short when a run was killed, or edited by hand.")


# -------------------------------------------------------------------------------------------- formatting
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(value) -> str:
    """Metrics: 4 decimals, scientific when very large or small; everything else as text."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}"
    if isinstance(value, list):
        if value and all(_is_number(v) for v in value) and len(value) > _LIST_PREVIEW:
            return f"[{len(value)} values, min {_fmt(min(value))}, max {_fmt(max(value))}]"
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _text(value) -> str:
    """Config/manifest values exactly as written (no rounding of user settings)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "n/a"
    text = json.dumps(value, default=str)
    return text if len(text) <= 300 else text[:297] + "..."


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _table(rows, header=("Key", "Value"), numeric_cols=()) -> str:
    """A table; a last column headed "Meaning" is set in small muted type."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    meaning_col = len(header) - 1 if header and header[-1] == "Meaning" else -1
    opening = "<table>"
    if len(header) == 3 and meaning_col == 2:  # the evaluation tables: aligned columns from one table to the next
        opening = ('<table class="eval"><colgroup><col class="quantity"><col class="value"><col class="meaning">'
                   "</colgroup>")
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i in numeric_cols
            else f'<td class="meaning">{_e(c)}</td>' if i == meaning_col else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return (f'<div class="table-wrap">{opening}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _png_size(png: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None."""
    if len(png) < 24 or not png.startswith(_PNG_SIGNATURE) or png[12:16] != b"IHDR":
        return None
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _figure(png: bytes, caption: str) -> str:
    """A figure; wide ones (e.g. the three-panel training curves) take a whole row of the grid."""
    size = _png_size(png)
    wide = size is not None and size[0] > 700 and size[0] >= 1.8 * size[1]  # too small at half width
    opening = '<figure class="wide">' if wide else "<figure>"
    return (f"{opening}{_img(png, caption)}<figcaption>{_e(caption)} <span class=\"hint\">(click to enlarge)"
            f"</span></figcaption></figure>")


# -------------------------------------------------------------------------------------------- sections
def _finite(v) -> bool:
    return _is_number(v) and math.isfinite(v)


def _count(v) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else _fmt(v)


def _with_mc_se(mean, mc_se) -> str:
    """'-93.700 ± 0.010 (MC s.e.)': two significant digits of the Monte-Carlo s.e., at least 2 decimals."""
    if not _finite(mean):
        return _fmt(mean)
    if not _finite(mc_se) or mc_se < 0:
        return f"{mean:.2f}"
    decimals = 2 if mc_se == 0 else max(2, min(6, 1 - math.floor(math.log10(mc_se))))
    return f"{mean:.{decimals}f} ± {mc_se:.{decimals}f} (MC s.e.)"


def _estimate_block(evaluation: dict, key: str) -> tuple[dict | None, set[str]]:
    """A log p(x) estimate as a dict: ``evaluation[key]`` if it is one, else the flat ``key_<field>`` keys of
    older files. Returns (block or None, top-level keys it used)."""
    if isinstance(evaluation.get(key), dict):
        return dict(evaluation[key]), {key}
    flat = {f: evaluation[f"{key}_{f}"] for f in _ESTIMATE_FIELDS if f"{key}_{f}" in evaluation}
    return (flat or None), {f"{key}_{f}" for f in flat}


def _likelihood_name(config, note: str | None) -> str | None:
    model_config = config.get("model_config") if isinstance(config, dict) else None
    name = model_config.get("likelihood") if isinstance(model_config, dict) else None
    if isinstance(name, str) and name:
        return " ".join(w.capitalize() for w in name.replace("_", "-").split("-"))
    if note and "bernoulli" in note.lower():
        return "Bernoulli"
    return None


def _log_px_name(block: dict, note: str | None, config) -> str:
    """What the number is: 'log p(x)' only when it is a log-density without caveats."""
    if block.get("is_density") is False:
        likelihood = _likelihood_name(config, note)
        return f"{likelihood} score (not a log-density)" if likelihood else "Score (not a log-density)"
    if block.get("is_exact_estimate") is False:
        return "log p(x) (approximate)"
    return "log p(x) (see note)" if note else "log p(x)"


def _estimate_rows(block: dict, name: str, split: str) -> list[tuple[str, str, str]]:
    """(quantity, value, meaning) rows of one log p(x) estimate; the ± pairs only the mean and its MC s.e."""
    rows = []
    mc_se = block.get("mc_stderr")
    meaning = "mean over the examples, in nats"
    if _finite(mc_se):
        meaning += "; ± is the Monte-Carlo standard error (other importance samples, same examples)"
    else:
        meaning += "; no Monte-Carlo standard error recorded for this estimate"
    rows.append((name, _with_mc_se(block.get("mean"), mc_se), meaning))
    if _finite(block.get("bias_estimate")):
        rows.append(("Estimated bias of the mean", _fmt(float(block["bias_estimate"])),
                     "delta-method estimate of the (downward) bias from a finite K; small against the MC s.e. "
                     "is good"))
    if _finite(block.get("sd_over_examples")):
        rows.append(("s.d. over examples", f"{block['sd_over_examples']:.2f}",
                     "spread of the per-example values: how different the examples are"))
    over = block.get("stderr_over_examples", block.get("stderr"))
    if _finite(over):
        rows.append((f"s.e. over examples (sampling of the {split} set)", _fmt(float(over)),
                     f"how much the mean would move with another {split} set of this size; not a Monte-Carlo "
                     "error, and not for comparing two models on the same examples"))
    ess_mean, ess_min, k = block.get("ess_mean"), block.get("ess_min"), block.get("k")
    of_k = f" of K = {k:,}" if isinstance(k, int) and not isinstance(k, bool) else ""
    if _finite(ess_mean):
        rows.append(("Effective sample size, mean over examples", f"{ess_mean:,.1f}{of_k}",
                     "Kish ESS of the importance weights; small values make the MC s.e. optimistic"))
    if _finite(ess_min):
        rows.append(("Effective sample size, worst example", f"{ess_min:,.1f}{of_k}", ""))
    if isinstance(k, int) and not isinstance(k, bool):
        rows.append(("Importance samples per example (K)", f"{k:,}", ""))
    if block.get("n_examples") is not None:
        rows.append(("Examples", _count(block["n_examples"]), f"{split} examples averaged over"))
    return rows


def _evaluation_history(latest: dict[str, dict], n_kept: int) -> str:
    """The newest evaluation of each split with its protocol (K, examples, weights, date)."""
    if not latest:
        return ""
    rows = []
    for split, record in latest.items():
        block = record.get("log_px") if isinstance(record.get("log_px"), dict) else {}
        limit = record.get("limit")
        rows.append((
            split, _fmt(block.get("mean")), _fmt(block.get("mc_stderr")), _fmt(record.get("elbo")),
            _fmt(block.get("k")), _count(block["n_examples"]) + (" (--limit)" if limit else "")
            if isinstance(block.get("n_examples"), int) else "",
            _text(record.get("weights", "")), _text(str(record.get("evaluated_at", "")).replace("T", " ")[:19]),
        ))
    header = ("Split", "log p(x) (nats)", "Monte-Carlo s.e.", "ELBO", "K", "Examples", "Weights", "Evaluated (UTC)")
    kept = (f"{n_kept} evaluation{'s' if n_kept != 1 else ''} kept in evaluations/; the newest of each split is "
            "shown (the tables above detail the first row; a Bernoulli score on grey levels is not a log-density).")
    return "<h3>Every split, newest evaluation</h3>" + _table(rows, header, numeric_cols=(1, 2, 3, 4)) + _note(kept)


def _evaluation_section(evaluation: dict, config, *, draw_kl: bool = True) -> tuple[str, dict | None, str | None]:
    """eval.json as grouped, human-named tables (log p(x) estimate, latent diagnostics, the rest), with a bar chart
    of the KL per dimension when ``draw_kl``.

    Returns (html, headline card or None, note to show prominently next to log p(x) or None).
    """
    used: set[str] = set()
    parts: list[str] = []
    split = evaluation.get("split") if isinstance(evaluation.get("split"), str) else "test"
    header = ("Quantity", "Value", "Meaning")

    context = []
    if isinstance(evaluation.get("dataset"), str):
        context.append(f"data {evaluation['dataset']}")
    if isinstance(evaluation.get("model"), str):
        context.append(f"model {evaluation['model']}")
    if evaluation.get("seed") is not None:
        context.append(f"seed {_text(evaluation['seed'])}")
    for key, label in (("weights", "weights"), ("precision", "precision"), ("device", "device")):
        if isinstance(evaluation.get(key), str):
            context.append(f"{label} {evaluation[key]}")
    if isinstance(evaluation.get("limit"), int):
        context.append(f"first {evaluation['limit']:,} examples only (--limit)")
    if isinstance(evaluation.get("evaluated_at"), str):
        context.append(f"at {evaluation['evaluated_at'].replace('T', ' ')[:16]} UTC")
    # shown in this line or as the IS-diagnostics figure, not as raw values
    used |= {"weights", "precision", "device", "limit", "evaluated_at", "seed", "log_px_against_k", "saved_to"}
    if "split" in evaluation or context:
        parts.append(f"<p>Evaluated on the <strong>{_e(split)}</strong> split"
                     + (f" ({_e(', '.join(context))})" if context else "") + ".</p>")

    # ---- log p(x)
    block, keys = _estimate_block(evaluation, "log_px")
    used |= keys
    note = evaluation.get("log_px_note") if isinstance(evaluation.get("log_px_note"), str) else None
    used.add("log_px_note")
    headline = None
    callout = None
    rows: list[tuple[str, str, str]] = []
    if block is not None:
        for legacy in ("ess_mean", "ess_min", "k"):  # older files kept these at the top level
            if legacy not in block and legacy in evaluation:
                block[legacy] = evaluation[legacy]
                used.add(legacy)
        if "n_examples" not in block and "n_examples" in evaluation:
            block["n_examples"] = evaluation["n_examples"]
        name = _log_px_name(block, note, config)
        rows += _estimate_rows(block, name, split)
        caveat = block.get("is_density") is False or note is not None
        if caveat:
            callout = note or ("this number is a score of the likelihood on data outside its support, "
                               "not a log-density")
        sub = "nats; ± Monte-Carlo s.e." if _finite(block.get("mc_stderr")) else "nats; no Monte-Carlo s.e."
        if isinstance(block.get("k"), int):
            sub += f"; K = {block['k']:,}"
        value = _with_mc_se(block.get("mean"), block.get("mc_stderr")).replace(" (MC s.e.)", "")
        headline = {"label": f"{split} {name}", "value": value,
                    "sub": sub + ("; see the note below" if caveat else ""), "warn": caveat}
    if _is_number(evaluation.get("elbo")):
        rows.append(("ELBO", f"{evaluation['elbo']:.2f}", "mean evidence lower bound over the same examples, nats"))
        used.add("elbo")
        if headline is None:
            headline = {"label": f"{split} ELBO", "value": f"{evaluation['elbo']:.2f}", "sub": "nats"}
    compare = evaluation.get("compare")
    if isinstance(compare, dict) and _finite(compare.get("mean_difference")):
        used.add("compare")
        other = compare.get("other_run", "the other run")
        diff, se, n = compare["mean_difference"], compare.get("stderr"), compare.get("n_examples")
        value = f"{diff:+.3f}" + (f" ± {se:.3f}" if _finite(se) else "")
        over = f"s.e. over {_count(n)} examples" if n is not None else "s.e. over the examples"
        rows.append((f"Paired difference vs {other}", f"{value} ({over})" if _finite(se) else value,
                     "this run minus the other, example by example on the same examples; ± is the s.e. of the "
                     "mean difference over examples"))
        if _finite(compare.get("other_mean")):
            rows.append((f"log p(x) of {other}", f"{compare['other_mean']:.2f}", "same examples, same settings"))
    if rows:
        parts.append("<h3>log p(x) estimate</h3>")
        if callout:
            parts.append(f'<div class="callout"><strong>Note:</strong> {_e(callout)}</div>')
        parts.append(_table(rows, header, numeric_cols=(1,)))

    # ---- the naive estimator, for comparison
    for key in ("log_px_naive", "naive_log_px"):
        naive, keys = _estimate_block(evaluation, key)
        if naive is not None:
            used |= keys
            parts.append("<h3>Naive estimator (samples from the prior), for comparison</h3>")
            parts.append(_table(_estimate_rows(naive, "log p(x), naive estimate", split), header, numeric_cols=(1,)))

    # ---- latent diagnostics
    rows = []
    latent_dim = evaluation.get("latent_dim")
    if _is_number(latent_dim):
        rows.append(("Latent dimensions", _count(latent_dim), ""))
        used.add("latent_dim")
    if _is_number(evaluation.get("active_units")):
        of = f" of {latent_dim}" if _is_number(latent_dim) else ""
        rows.append(("Active units", f"{_count(evaluation['active_units'])}{of}",
                     "units whose posterior mean varies across examples (Cov_x E[z_u|x] > 0.01)"))
        used.add("active_units")
    if isinstance(evaluation.get("active_units_per_group"), dict):
        for group, count in evaluation["active_units_per_group"].items():
            rows.append((f"Active units, group {group}", _count(count), ""))
        used.add("active_units_per_group")
    kl_per_dim = evaluation.get("kl_per_dim")
    if isinstance(kl_per_dim, list) and kl_per_dim and all(_is_number(v) for v in kl_per_dim):
        kl_per_dim = [float(v) for v in kl_per_dim]
        rows.append(("KL, sum over dimensions", f"{sum(kl_per_dim):.2f}", "mean KL(q(z|x) || p(z)) in nats"))
        spread = (_fmt(kl_per_dim[0]) if len(kl_per_dim) == 1 else
                  f"{len(kl_per_dim)} values, min {_fmt(min(kl_per_dim))}, max {_fmt(max(kl_per_dim))}")
        rows.append(("KL per dimension", spread, "near 0: an inactive unit; see the chart"))
        used.add("kl_per_dim")
    else:
        if "kl_per_dim" in evaluation and kl_per_dim is None:
            used.add("kl_per_dim")  # a model without a per-dimension KL
        kl_per_dim = None
    if isinstance(evaluation.get("kl_per_group"), dict):
        for group, value in evaluation["kl_per_group"].items():
            rows.append((f"KL, group {group}", _fmt(value), "nats"))
        used.add("kl_per_group")
    if rows:
        parts.append("<h3>Latent diagnostics</h3>")
        parts.append(_table(rows, header, numeric_cols=(1,)))
    if kl_per_dim is not None and draw_kl:
        from elbolab.plots import _kl_bar_figure, figure_png_bytes  # matplotlib only when needed

        parts.append('<div class="figures">' + _figure(figure_png_bytes(_kl_bar_figure(kl_per_dim)),
                             "Average KL per latent dimension (near 0: an inactive unit)") + "</div>")

    # ---- disentanglement (eval --disentanglement), the model's own numbers, then anything else
    scores = evaluation.get("disentanglement")
    if isinstance(scores, dict):
        used.add("disentanglement")
        rows = [(label, _fmt(scores.get(key, {}).get(field))) for label, key, field in (
            ("beta-VAE metric (held-out accuracy)", "beta_vae", "eval_accuracy"),
            ("FactorVAE metric (held-out accuracy)", "factor_vae", "eval_accuracy"),
            ("Mutual information gap (MIG)", "mig", "mig"))]
        per_factor = scores.get("mig", {}).get("per_factor") or {}
        rows += [(f"MIG of factor {name}", _fmt(value)) for name, value in per_factor.items()]
        parts.append("<h3>Disentanglement</h3>")
        parts.append(_table(rows, ("Metric", "Value"), numeric_cols=(1,)))
    if isinstance(evaluation.get("model_metrics"), dict) and evaluation["model_metrics"]:
        used.add("model_metrics")
        parts.append("<h3>Model-specific metrics</h3>")
        parts.append(_table([(k.replace("_", " "), _fmt(v)) for k, v in _flatten(evaluation["model_metrics"]).items()],
                            ("Metric", "Value"), numeric_cols=(1,)))
    used |= {"split", "dataset", "model", "seed", "n_examples"}
    rest = {k: v for k, v in evaluation.items() if k not in used}
    if rest:
        parts.append("<h3>Other values</h3>")
        parts.append(_table([(k, _fmt(v)) for k, v in _flatten(rest).items()], ("Key", "Value"), numeric_cols=(1,)))
    if not parts:
        parts.append(_note("eval.json holds no values."))
    return "".join(parts), headline, callout


def _headline_fallback(evaluation: dict) -> dict | None:
    for key, label in _HEADLINE_FALLBACKS:
        for name, value in evaluation.items():
            if key in name.lower() and _finite(value):
                return {"label": label if name.lower() == key else name, "value": _fmt(float(value))}
    return None


def _training_section(records: list[dict]) -> tuple[str, dict[str, str]]:
    """Last-epoch values per split, plus the facts the summary shows."""
    from elbolab.plots import epoch_means  # matplotlib import only when there are metrics

    table = epoch_means(records)
    if not table:
        return _note("metrics.jsonl has no records with an epoch; nothing to tabulate."), {}
    splits = [s for s in ("train", "val", "test") if s in table] + sorted(
        s for s in table if s not in ("train", "val", "test"))
    last = {s: max(table[s]) for s in splits}
    order = ("elbo", "kl", "recon", "loss")
    keys = sorted({k for s in splits for k in table[s][last[s]] if k != "step"},
                  key=lambda k: (order.index(k) if k in order else len(order), k))
    rows = [[k] + [_fmt(table[s][last[s]][k]) if k in table[s][last[s]] else "–" for s in splits]
            for k in keys]
    header = ["Metric"] + [f"{s} (epoch {last[s]})" for s in splits]
    parts = ["<p>Values of the last epoch of each split (mean over the epoch's records).</p>",
             _table(rows, header, numeric_cols=tuple(range(1, len(header))))]
    facts = {"Epochs": str(max(last.values()))}
    for split in ("train", "val"):
        final = table.get(split, {}).get(last.get(split), {})
        key = next((k for k in ("elbo", "loss") if k in final), None)
        if key is not None:
            facts[f"Final {split} {key}"] = _fmt(final[key])
    val_elbos = [(f["elbo"], ep) for ep, f in table.get("val", {}).items()
                 if "elbo" in f and math.isfinite(f["elbo"])]
    if val_elbos:
        best, best_epoch = max(val_elbos)
        parts.append(_note(f"Best val ELBO {_fmt(best)} at epoch {best_epoch}."))
    return "".join(parts), facts


def _figure_kind(stem: str) -> int:
    lowered = stem.lower()
    for index, (_, patterns, _) in enumerate(_FIGURE_KINDS):
        if any(p in lowered for p in patterns):
            return index
    return len(_FIGURE_KINDS)


def _caption(stem: str) -> str:
    kind = _figure_kind(stem)
    readable = stem.replace("_", " ").replace("-", " ").strip()
    if kind == len(_FIGURE_KINDS):
        return readable[:1].upper() + readable[1:]
    name, _, caption = _FIGURE_KINDS[kind]
    if name == "is_diagnostics" and stem.lower().startswith("is_diagnostics_"):  # is_diagnostics_SPLIT.png
        return f"{caption}, {stem[len('is_diagnostics_'):]} split"
    return caption if stem.lower() == name else f"{caption} ({readable})"


def _figures_section(figures_dir: Path) -> str:
    if not figures_dir.is_dir():
        return _note("No figures/ folder; no figures to show.")
    paths = sorted(figures_dir.glob("*.png"), key=lambda p: (_figure_kind(p.stem), p.stem))
    if not paths:
        return _note("figures/ holds no PNG files.")
    items, notes = [], []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            notes.append(f"{path.name} could not be read ({exc}); skipped.")
            continue
        if not data.startswith(_PNG_SIGNATURE):
            notes.append(f"{path.name} is not a valid PNG file; skipped.")
        elif len(data) > _MAX_EMBED_BYTES:
            notes.append(f"{path.name} is {len(data) / 1e6:.1f} MB, too large to embed; open it directly.")
        else:
            items.append(_figure(data, _caption(path.stem)))
    grid = f'<div class="figures">{"".join(items)}</div>' if items else ""
    return grid + "".join(_note(n) for n in notes)


def _manifest_section(manifest: dict) -> str:
    fields = {k: v for k, v in manifest.items() if k not in ("versions", "extra")}
    parts = [_table([(k, _text(v)) for k, v in fields.items()])]
    if isinstance(manifest.get("versions"), dict):
        parts.append("<h3>Package versions</h3>")
        parts.append(_table([(k, _text(v)) for k, v in manifest["versions"].items()], ("Package", "Version")))
    if isinstance(manifest.get("extra"), dict) and manifest["extra"]:
        parts.append("<h3>Extra</h3>")
        parts.append(_table([(k, _text(v)) for k, v in _flatten(manifest["extra"]).items()]))
    return "".join(parts)


def _source_name(source: str) -> str:
    """A data source: a registered name as is, a file or folder path as its last component."""
    if "/" in source or "\\" in source:
        name = PureWindowsPath(source).name if "\\" in source else PurePosixPath(source.rstrip("/")).name
        return name or source
    return source


def _data_description(config) -> tuple[str, str | None] | None:
    """('digits (binarize dynamic)', full source or None) from config ``data`` (a dict or, in older files, a name)."""
    if not isinstance(config, dict):
        return None
    data = next((config[k] for k in ("data", "dataset") if config.get(k)), None)
    if isinstance(data, str):
        return _source_name(data), (data if _source_name(data) != data else None)
    if not isinstance(data, dict):
        return None
    source = next((data[k] for k in ("source", "name", "dataset") if isinstance(data.get(k), str) and data[k]), None)
    if source is None:
        return None
    text = short = _source_name(source)
    binarize = data.get("binarize")
    if binarize is True:
        text += " (binarized)"
    elif isinstance(binarize, str) and binarize.lower() not in ("", "none", "false", "no"):
        text += f" (binarize {binarize})"
    return text, (source if short != source else None)


def _card(label: str, value: str, sub: str | None = None, title: str | None = None, warn: bool = False) -> str:
    title_attr = f' title="{_e(title)}"' if title else ""
    sub_html = f'<div class="sub">{_e(sub)}</div>' if sub else ""
    return (f'<div class="card{" warn" if warn else ""}"{title_attr}><div class="label">{_e(label)}</div>'
            f'<div class="value">{_e(value)}</div>{sub_html}</div>')


def _training_seconds(manifest: dict) -> float | None:
    """Wall time of the training loop over every session of the run (the trainer sums it in manifest.json)."""
    seconds = manifest.get("wall_time_s")
    return float(seconds) if _finite(seconds) else None


def _summary_cards(run_dir: Path, config, manifest, headline, callout, training_facts, evaluation=None) -> str:
    cards = [_card("Run", run_dir.resolve().name)]
    flat_config = _flatten(config) if isinstance(config, dict) else {}
    model = next((flat_config[k] for k in ("model", "model.name", "model_name", "model.kind")
                  if isinstance(flat_config.get(k), str)), None)
    if model is not None:
        cards.append(_card("Model", model))
    data = _data_description(config)
    if data is not None:
        cards.append(_card("Data", data[0], sub=None, title=data[1]))
    seed = manifest.get("seed") if isinstance(manifest, dict) else None
    seed = next((flat_config[k] for k in ("seed", "train_config.seed") if k in flat_config), None) \
        if seed is None else seed
    if seed is not None:
        cards.append(_card("Seed", _text(seed)))
    if headline is not None:
        cards.append(_card(headline["label"], headline["value"], headline.get("sub"), warn=headline.get("warn", False)))
    if isinstance(evaluation, dict):
        if _finite(evaluation.get("elbo")):
            cards.append(_card(f"{evaluation.get('split', 'test')} ELBO", f"{evaluation['elbo']:.2f}",
                               "nats per example, same examples"))
        kl = evaluation.get("kl_per_dim")
        if isinstance(kl, list) and kl and all(_finite(v) for v in kl):
            cards.append(_card("KL(q(z|x) || p(z))", f"{sum(kl):.2f}", f"nats, over {len(kl)} latent dimensions"))
        if isinstance(evaluation.get("active_units"), int) and isinstance(evaluation.get("latent_dim"), int):
            cards.append(_card("Active units", f"{evaluation['active_units']} of {evaluation['latent_dim']}",
                               "Cov_x E[z|x] > 0.01", warn=evaluation["active_units"] == 0))
    cards += [_card(k, v) for k, v in training_facts.items()]
    if isinstance(manifest, dict):
        seconds = _training_seconds(manifest)
        if seconds is not None:
            minutes, secs = divmod(seconds, 60)
            cards.append(_card("Training wall time", f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s",
                               "every session of this run"))
        if manifest.get("timestamp_utc"):
            cards.append(_card("Started (UTC)", str(manifest["timestamp_utc"]).replace("T", " ")[:19]))
        if manifest.get("git_commit"):
            cards.append(_card("Git commit", str(manifest["git_commit"])[:12] + (
                " (dirty)" if manifest.get("git_dirty") else "")))
    page = f'<div class="cards">{"".join(cards)}</div>'
    if callout:
        label = headline["label"] if headline else "log p(x)"
        page += f'<div class="callout"><strong>About the {_e(label)}:</strong> {_e(callout)}</div>'
    summary = manifest.get("summary") if isinstance(manifest, dict) else None
    if isinstance(summary, dict) and summary.get("collapse_warning"):  # written at the end of training
        page += f'<div class="callout"><strong>Training:</strong> {_e(str(summary["collapse_warning"]))}</div>'
    return page


def _explorer_section(run_dir: Path) -> str | None:
    """The interactive latent explorer (elbolab.explorer) when the run's model qualifies, else a note saying why;
    None when the folder holds no weights. Any failure becomes a note: the page is written regardless."""
    from elbolab.runs import WEIGHTS

    if not (run_dir / WEIGHTS).is_file():
        return None
    from elbolab.explorer import ExplorerUnavailable, decoder_spec, explorer_html
    from elbolab.runs import load_run

    static = "the static figures below show the decoder instead."
    try:
        model, config = load_run(run_dir)
        decoder_spec(model)  # refuse before loading any data
    except ExplorerUnavailable as exc:
        return _note(f"No interactive explorer for this run: {exc}; {static}")
    except Exception as exc:  # noqa: BLE001 - a report never breaks on the explorer
        return _note(f"The interactive explorer could not load the model ({type(exc).__name__}: {exc}); {static}")
    data, data_note = None, None
    try:
        from elbolab.pipeline import _load_splits

        data = _load_splits(config["data"]).test
    except Exception as exc:  # noqa: BLE001
        data_note = (f"The test data could not be loaded ({type(exc).__name__}: {exc}), so the plane shows no "
                     "encoded examples.")
    try:
        page = explorer_html(model, data)
    except ExplorerUnavailable as exc:
        return _note(f"No interactive explorer for this run: {exc}; {static}")
    except Exception as exc:  # noqa: BLE001
        return _note(f"The interactive explorer failed ({type(exc).__name__}: {exc}); {static}")
    return page + (_note(data_note) if data_note else "")


# ---------------------------------------------------------------------------------------------- public
def write_report(run_dir) -> Path:
    """Build ``run_dir/index.html`` from whatever the run folder holds and return its path.

    Missing or unreadable pieces become notes on the page. Raises CheckpointError if ``run_dir``
    is not an existing folder. The page is written atomically (index.html.tmp, then renamed).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "a file" if run_dir.exists() else "nothing there"
        raise CheckpointError(
            f"report: expected a run folder (with config.json, metrics.jsonl, figures/...), got {what} at "
            f"'{run_dir}'; pass the folder a training run wrote, e.g. runs/demo."
        )
    config, config_note = _read_json(run_dir / "config.json")
    from elbolab.runs import latest_per_split, read_evaluations

    history = read_evaluations(run_dir)
    latest = latest_per_split(history)
    if latest:  # the detailed tables show the newest test evaluation (else the newest of any split)
        evaluation, eval_note = next(iter(latest.values())), None
    else:
        evaluation, eval_note = _read_json(run_dir / "eval.json")
    manifest, manifest_note = _read_json(run_dir / "manifest.json")
    records, metrics_note = _read_jsonl(run_dir / "metrics.jsonl")

    def not_an_object(name, value, note):
        return note if value is None or isinstance(value, dict) else f"{name} is not a JSON object; skipped."

    config_note = not_an_object("config.json", config, config_note)
    eval_note = not_an_object("eval.json", evaluation, eval_note)
    manifest_note = not_an_object("manifest.json", manifest, manifest_note)

    if isinstance(evaluation, dict):
        has_kl_figure = any("kl_per_dim" in p.stem.lower() for p in (run_dir / "figures").glob("*.png"))
        eval_html, headline, callout = _evaluation_section(evaluation, config, draw_kl=not has_kl_figure)
        eval_html += _evaluation_history(latest, len(history))
        headline = headline or _headline_fallback(evaluation)
    else:
        eval_html, headline, callout = "", None, None
    training_html, training_facts = _training_section(records) if records else ("", {})

    sections = [
        ("summary", "Summary", _summary_cards(run_dir, config, manifest, headline, callout, training_facts,
                                              evaluation if isinstance(evaluation, dict) else None)),
    ]
    explorer = _explorer_section(run_dir)
    if explorer is not None:
        sections.append(("explorer", "Explorer", explorer))
    sections += [
        ("evaluation", "Evaluation", eval_html + (_note(eval_note) if eval_note else "")),
        ("training", "Training", training_html + (_note(metrics_note) if metrics_note else "")),
        ("figures", "Figures", _figures_section(run_dir / "figures")),
        ("configuration", "Configuration",
         (_table([(k, _text(v)) for k, v in _flatten(config).items()]) if isinstance(config, dict) else "")
         + (_note(config_note) if config_note else "")),
        ("manifest", "Manifest",
         (_manifest_section(manifest) if isinstance(manifest, dict) else "")
         + (_note(manifest_note) if manifest_note else "")),
    ]
    return _write_page(run_dir, f"elbolab run: {run_dir.resolve().name}", str(run_dir), sections,
                       extra_css=_explorer_css() if explorer else "")


def _write_page(folder: Path, title: str, subtitle: str, sections, extra_css: str = "") -> Path:
    """folder/index.html: title, a navigation bar, the sections (anchor, heading, html), the figure zoom."""
    from elbolab import __version__

    nav = "".join(f'<a href="#{anchor}">{_e(heading)}</a>' for anchor, heading, _ in sections)
    body = "".join(f'<section id="{anchor}"><h2>{_e(heading)}</h2>{content}</section>'
                   for anchor, heading, content in sections)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}{extra_css}</style></head><body><main>"
        f'<h1>{_e(title)}</h1><div class="subtitle">{_e(subtitle)}</div><nav>{nav}</nav>{body}'
        f"<footer>Generated by elbolab {_e(__version__)} at {_e(generated)} UTC.</footer>"
        "</main>" + _ZOOM + "</body></html>\n"
    )
    out = folder / "index.html"
    tmp = folder / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)  # readers never see a half-written page
    return out


def figure_html(png: bytes, caption: str) -> str:
    """An embedded PNG figure with its caption (click to enlarge); wide figures take a whole row."""
    return _figure(png, caption)


def table_html(rows, header=("Key", "Value"), numeric_cols=()) -> str:
    """A table of rows (values as given; format numbers first); a last column headed "Meaning" is muted."""
    return _table(rows, header, numeric_cols)


def note_html(text: str) -> str:
    return _note(text)


def write_command_report(out_dir, title: str, *, subtitle: str | None = None, cards=(), sections=()) -> Path:
    """``out_dir/index.html`` for a command's output folder (``gmm fit``, ``denoise``, ``functional``), in the run
    report's style: summary cards, then sections.

    ``cards``: (label, value) or (label, value, sub) text triples. ``sections``: (heading, html) pairs, the html
    built with ``figure_html``, ``table_html`` and ``note_html`` (or escaped by the caller). Written atomically.
    """
    out_dir = Path(out_dir)
    page_sections = [("summary", "Summary", '<div class="cards">' + "".join(
        _card(str(c[0]), str(c[1]), str(c[2]) if len(c) > 2 and c[2] else None) for c in cards) + "</div>")]
    for heading, content in sections:
        anchor = "".join(ch if ch.isalnum() else "-" for ch in heading.lower()).strip("-") or "section"
        while any(anchor == a for a, _, _ in page_sections):
            anchor += "-2"
        page_sections.append((anchor, heading, content))
    return _write_page(out_dir, title, subtitle if subtitle is not None else str(out_dir), page_sections)
