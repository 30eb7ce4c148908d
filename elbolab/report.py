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
from elbolab.records import Estimate, Evaluation

# The classical commands (gmm fit, denoise, functional) write their reports with this module and must start without
# torch: what needs torch or matplotlib (the explorer, loading a run, the plots) is imported where it is used.

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
    ("cluster_scatter", ("cluster_scatter",), "Latent codes coloured by their cluster and by their class"),
    ("latent_scatter", ("scatter",),
     "Latent codes, coloured by label when the data have labels: 2-D (or a projection), or a histogram for a 1-D "
     "latent"),
    ("is_diagnostics", ("is_diagnostics",),
     "Importance-sampling diagnostics: ESS per example, log weights of three examples, log p(x) against K"),
)
# Fallback headline when eval.json has no log p(x) block: the first top-level number whose key matches.
_HEADLINE_FALLBACKS = (("elbo", "ELBO"), ("log_likelihood", "Log-likelihood"), ("loglik", "Log-likelihood"),
                       ("nll", "NLL"))
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
@media (max-width:600px) {
  /* a phone: each row of an evaluation table becomes a small card (quantity, value, then its meaning), and the
     other tables keep their columns and scroll sideways inside their box */
  table.eval, table.eval tbody, table.eval tr, table.eval td { display:block; width:auto; }
  table.eval thead, table.eval colgroup { display:none; }
  table.eval tr { padding:6px 0; border-bottom:1px solid var(--line); }
  table.eval td { border:0; padding:1px 10px; }
  table.eval td.num { text-align:left; white-space:normal; font-weight:600; }
  table { min-width:0; }
}
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


def _likelihood_name(config, note: str | None) -> str | None:
    model_config = config.get("model_config") if isinstance(config, dict) else None
    name = model_config.get("likelihood") if isinstance(model_config, dict) else None
    if isinstance(name, str) and name:
        return " ".join(w.capitalize() for w in name.replace("_", "-").split("-"))
    if note and "bernoulli" in note.lower():
        return "Bernoulli"
    return None


def _log_px_name(block: Estimate, note: str | None, config) -> str:
    """What the number is: 'log p(x)' only when it is a log-density without caveats."""
    if block.is_density is False:
        likelihood = _likelihood_name(config, note)
        return f"{likelihood} score (not a log-density)" if likelihood else "Score (not a log-density)"
    if block.is_exact_estimate is False:
        return "log p(x) (approximate)"
    return "log p(x) (see note)" if note else "log p(x)"


def _estimate_rows(block: Estimate, name: str, split: str) -> list[tuple[str, str, str]]:
    """(quantity, value, meaning) rows of one log p(x) estimate; the ± pairs only the mean and its MC s.e."""
    rows = []
    meaning = "mean over the examples, in nats"
    if _finite(block.mc_stderr):
        meaning += "; ± is the Monte-Carlo standard error (other importance samples, same examples)"
    else:
        meaning += "; no Monte-Carlo standard error recorded for this estimate"
    rows.append((name, _with_mc_se(block.mean, block.mc_stderr), meaning))
    if _finite(block.bias_estimate):
        rows.append(("Estimated bias of the mean", _fmt(float(block.bias_estimate)),
                     "delta-method estimate of the (downward) bias from a finite K; small against the MC s.e. "
                     "is good"))
    if _finite(block.sd_over_examples):
        rows.append(("s.d. over examples", f"{block.sd_over_examples:.2f}",
                     "spread of the per-example values: how different the examples are"))
    if _finite(block.stderr_over_examples):
        rows.append((f"s.e. over examples (sampling of the {split} set)", _fmt(float(block.stderr_over_examples)),
                     f"how much the mean would move with another {split} set of this size; not a Monte-Carlo "
                     "error, and not for comparing two models on the same examples"))
    of_k = f" of K = {block.k:,}" if block.k is not None else ""
    if _finite(block.ess_mean):
        rows.append(("Effective sample size, mean over examples", f"{block.ess_mean:,.1f}{of_k}",
                     "Kish ESS of the importance weights; small values make the MC s.e. optimistic"))
    if _finite(block.ess_min):
        rows.append(("Effective sample size, worst example", f"{block.ess_min:,.1f}{of_k}", ""))
    if block.k is not None:
        rows.append(("Importance samples per example (K)", f"{block.k:,}", ""))
    if block.n_examples is not None:
        rows.append(("Examples", _count(block.n_examples), f"{split} examples averaged over"))
    return rows


def _evaluation_history(latest: dict[str, Evaluation], n_kept: int) -> str:
    """The newest evaluation of each split with its protocol (K, examples, weights, date)."""
    if not latest:
        return ""
    rows = []
    for split, record in latest.items():
        block = record.log_px or Estimate()
        rows.append((
            split, _fmt(block.mean), _fmt(block.mc_stderr), _fmt(record.elbo), _fmt(block.k),
            _count(block.n_examples) + _subset(record) if block.n_examples is not None
            else "",
            _text(record.weights or ""), _text(str(record.evaluated_at or "").replace("T", " ")[:19]),
        ))
    header = ("Split", "log p(x) (nats)", "Monte-Carlo s.e.", "ELBO", "K", "Examples", "Weights", "Evaluated (UTC)")
    kept = (f"{n_kept} evaluation{'s' if n_kept != 1 else ''} kept in evaluations/; the newest of each split is "
            "shown (the tables above detail the first row; a Bernoulli score on grey levels is not a log-density).")
    return "<h3>Every split, newest evaluation</h3>" + _table(rows, header, numeric_cols=(1, 2, 3, 4)) + _note(kept)


_MEANING = ("Quantity", "Value", "Meaning")


def _evaluation_section(evaluation: Evaluation, config, *, draw_kl: bool = True) -> tuple[str, dict | None,
                                                                                           str | None]:
    """The evaluation record as grouped, human-named tables (what was evaluated, log p(x), the latent space, the
    rest), with a bar chart of the KL per dimension when ``draw_kl``.

    Returns (html, headline card or None, note to show prominently next to log p(x) or None)."""
    log_px_html, headline, callout = _log_px_section(evaluation, config)
    parts = [_context_line(evaluation), log_px_html, _naive_section(evaluation),
             _latent_section(evaluation, draw_kl), _further_section(evaluation)]
    html = "".join(parts)
    return (html or _note("eval.json holds no values.")), headline, callout


def _subset(ev: Evaluation) -> str:
    """Why only some examples were scored: --limit, or the default budget (and how to score them all)."""
    if ev.limit is None:
        return ""
    if ev.limit_reason == "budget":
        of = f" of {ev.split_size:,}" if ev.split_size else ""
        return f"{of} (the default budget; eval --full scores all)"
    return " (--limit)"


def _context_line(ev: Evaluation) -> str:
    context = [f"{label} {value}" for label, value in (("data", ev.dataset), ("model", ev.model)) if value]
    if ev.seed is not None:
        context.append(f"seed {_text(ev.seed)}")
    context += [f"{label} {value}" for label, value in (("weights", ev.weights), ("precision", ev.precision),
                                                        ("device", ev.device)) if value]
    if ev.limit is not None:
        context.append(f"first {ev.limit:,} examples only{_subset(ev)}")
    if ev.evaluated_at:
        context.append(f"at {ev.evaluated_at.replace('T', ' ')[:16]} UTC")
    return (f"<p>Evaluated on the <strong>{_e(ev.split)}</strong> split"
            + (f" ({_e(', '.join(context))})" if context else "") + ".</p>")


def _log_px_section(ev: Evaluation, config) -> tuple[str, dict | None, str | None]:
    """The log p(x) table (the estimate, the ELBO, a paired comparison), the headline card and the caveat."""
    rows: list[tuple[str, str, str]] = []
    headline, callout, note = None, None, ev.log_px_note
    block = ev.log_px
    if block is not None:
        name = _log_px_name(block, note, config)
        rows += _estimate_rows(block, name, ev.split)
        caveat = block.is_density is False or note is not None or block.warning is not None
        if caveat:
            callout = "; ".join(c for c in (note, block.warning) if c) or (
                "this number is a score of the likelihood on data outside its support, not a log-density")
        sub = "nats; ± Monte-Carlo s.e." if _finite(block.mc_stderr) else "nats; no Monte-Carlo s.e."
        if _finite(block.ess_mean):  # what the delta-method s.e. rests on
            sub += f" (ESS {block.ess_mean:,.0f} on average, {block.ess_min:,.1f} at worst)" if _finite(
                block.ess_min) else f" (mean ESS {block.ess_mean:,.0f})"
        if block.k is not None:
            sub += f"; K = {block.k:,}"
        if block.n_examples is not None:
            sub += f"; {block.n_examples:,} examples" + _subset(ev)
        value = _with_mc_se(block.mean, block.mc_stderr).replace(" (MC s.e.)", "")
        headline = {"label": f"{ev.split} {name}", "value": value,
                    "sub": sub + ("; see the note below" if caveat else ""), "warn": caveat}
    if ev.elbo is not None:
        rows.append(("ELBO", f"{ev.elbo:.2f}", "mean evidence lower bound over the same examples, nats"))
        if headline is None:
            headline = {"label": f"{ev.split} ELBO", "value": f"{ev.elbo:.2f}", "sub": "nats"}
    rows += _sandwich_rows(ev)
    compare = ev.compare
    if compare is not None and _finite(compare.mean_difference):
        other = compare.other_run or "the other run"
        value = f"{compare.mean_difference:+.3f}" + (f" ± {compare.stderr:.3f}" if _finite(compare.stderr) else "")
        over = f"s.e. over {_count(compare.n_examples)} examples" if compare.n_examples is not None else \
            "s.e. over the examples"
        rows.append((f"Paired difference vs {other}", f"{value} ({over})" if _finite(compare.stderr) else value,
                     "this run minus the other, example by example on the same examples; ± is the s.e. of the "
                     "mean difference over examples"))
        if _finite(compare.other_mean):
            rows.append((f"log p(x) of {other}", f"{compare.other_mean:.2f}", "same examples, same settings"))
    if not rows:
        return "", headline, callout
    html = "<h3>log p(x) estimate</h3>"
    if callout:
        html += f'<div class="callout"><strong>Note:</strong> {_e(callout)}</div>'
    return html + _table(rows, _MEANING, numeric_cols=(1,)), headline, callout


def _sandwich_rows(ev: Evaluation) -> list[tuple[str, str, str]]:
    """AIS (a stochastic lower bound on these examples) and BDMC (two bounds on data simulated from the model)."""
    rows = []
    ais = ev.log_px_ais or {}
    if _finite(ais.get("mean")):
        rows.append(("log p(x) by AIS", _with_mc_se(ais["mean"], ais.get("mc_stderr")),
                     f"annealed importance sampling, {_count(ais.get('steps'))} steps x {_count(ais.get('chains'))} "
                     f"chains, on the first {_count(ais.get('n_examples'))} examples (a stochastic lower bound; "
                     f"HMC acceptance {_fmt(ais.get('acceptance'))}; {_fmt(ais.get('seconds'))} s)"))
    sandwich = ev.bdmc or {}
    if _finite(sandwich.get("lower")) and _finite(sandwich.get("upper")):
        rows.append(("BDMC bounds on simulated data", f"{sandwich['lower']:.2f} to {sandwich['upper']:.2f}",
                     f"true log p(x) of {_count(sandwich.get('n_examples'))} examples drawn from the model lies "
                     f"between them; gap {_fmt(sandwich.get('gap'))} nats at {_count(sandwich.get('steps'))} steps "
                     "(a small gap: AIS at this budget can be trusted)"))
    return rows


def _naive_section(ev: Evaluation) -> str:
    if ev.log_px_naive is None:
        return ""
    return ("<h3>Naive estimator (samples from the prior), for comparison</h3>"
            + _table(_estimate_rows(ev.log_px_naive, "log p(x), naive estimate", ev.split), _MEANING,
                     numeric_cols=(1,)))


def _latent_section(ev: Evaluation, draw_kl: bool) -> str:
    rows = []
    if ev.latent_dim is not None:
        rows.append(("Latent dimensions", _count(ev.latent_dim), ""))
    if ev.active_units is not None:
        of = f" of {ev.latent_dim}" if ev.latent_dim is not None else ""
        rows.append(("Active units", f"{_count(ev.active_units)}{of}",
                     "units whose posterior mean varies across examples (Cov_x E[z_u|x] > 0.01)"))
    for group, count in (ev.active_units_per_group or {}).items():
        rows.append((f"Active units, group {group}", _count(count), ""))
    kl_per_dim = [float(v) for v in ev.kl_per_dim] if ev.kl_per_dim else None
    if kl_per_dim:
        rows.append(("KL, sum over dimensions", f"{sum(kl_per_dim):.2f}", "mean KL(q(z|x) || p(z)) in nats"))
        spread = (_fmt(kl_per_dim[0]) if len(kl_per_dim) == 1 else
                  f"{len(kl_per_dim)} values, min {_fmt(min(kl_per_dim))}, max {_fmt(max(kl_per_dim))}")
        rows.append(("KL per dimension", spread, "near 0: an inactive unit; see the chart"))
    for group, value in (ev.kl_per_group or {}).items():
        rows.append((f"KL, group {group}", _fmt(value), "nats"))
    anatomy = ev.kl_anatomy or {}
    keys = ("mutual_information", "total_correlation", "dimension_wise_kl", "average_kl")
    if all(_finite(anatomy.get(k)) for k in keys):
        for label, key, meaning in (
                ("KL anatomy: index-code mutual information I(x; z)", "mutual_information",
                 f"how much z says about which example it came from; at most log N = "
                 f"{_fmt(anatomy.get('mutual_information_bound'))}"),
                ("KL anatomy: total correlation of q(z)", "total_correlation",
                 "dependence between the latent dimensions of the aggregate posterior (0: factorised)"),
                ("KL anatomy: dimension-wise KL", "dimension_wise_kl",
                 "sum_j KL(q(z_j) || p(z_j)): how far each marginal of q(z) is from the prior's")):
            se = anatomy.get(f"{key}_se")
            rows.append((label, _with_mc_se(anatomy[key], se).replace(" (MC s.e.)", ""), meaning))
    html = ("<h3>Latent diagnostics</h3>" + _table(rows, _MEANING, numeric_cols=(1,))) if rows else ""
    if all(_finite(anatomy.get(k)) for k in keys):
        from elbolab.plots import figure_png_bytes, kl_anatomy_figure  # matplotlib only when needed

        caption = (f"The mean KL split three ways over {_count(anatomy.get('n_points'))} examples (exact aggregate "
                   "posterior; Chen et al. 2018)")
        html += '<div class="figures">' + _figure(figure_png_bytes(kl_anatomy_figure(anatomy)), caption) + "</div>"
    if kl_per_dim and draw_kl:
        from elbolab.plots import figure_png_bytes, kl_bar_figure  # matplotlib only when needed

        html += ('<div class="figures">' + _figure(figure_png_bytes(kl_bar_figure(kl_per_dim)),
                                                   "Average KL per latent dimension (near 0: an inactive unit)")
                 + "</div>")
    return html


def _further_section(ev: Evaluation) -> str:
    """Disentanglement metrics, the model's own numbers, and whatever else the record holds."""
    parts = []
    scores = ev.disentanglement
    if scores:
        rows = []
        for label, key in (("beta-VAE metric (held-out accuracy)", "beta_vae"),
                           ("FactorVAE metric (held-out accuracy)", "factor_vae")):
            block = scores.get(key) or {}
            if _finite(block.get("eval_accuracy")):
                se = block.get("eval_accuracy_se")
                rows.append((label, f"{block['eval_accuracy']:.3f}" + (f" ± {se:.3f}" if _finite(se) else ""),
                             f"{block['chance']:.3f}" if _finite(block.get("chance")) else ""))
        mig = scores.get("mig") or {}
        if _finite(mig.get("mig")):
            rows.append(("Mutual information gap (MIG)", f"{mig['mig']:.3f}", "0.000"))
        rows += [(f"MIG of factor {name}", f"{value:.3f}", "0.000") for name, value in
                 (mig.get("per_factor") or {}).items() if _finite(value)]
        protocol = scores.get("protocol") or {}
        note = (f"{protocol.get('name', '')} protocol: {_count(protocol.get('images'))} images drawn and encoded; ± "
                "is the binomial s.e. of a held-out accuracy") if protocol else ""
        parts.append("<h3>Disentanglement</h3>" + _table(rows, ("Metric", "Value", "Chance level"),
                                                         numeric_cols=(1, 2)) + (_note(note) if note else ""))
    if ev.model_metrics:
        parts.append("<h3>Model-specific metrics</h3>" + _table(
            [(k.replace("_", " "), _fmt(v)) for k, v in _flatten(ev.model_metrics).items()], ("Metric", "Value"),
            numeric_cols=(1,)))
    shown_elsewhere = {"saved_to", "compiled", "compile_fallback"}
    rest = {k: v for k, v in ev.other.items() if k not in shown_elsewhere}
    if rest:
        parts.append("<h3>Other values</h3>" + _table([(k, _fmt(v)) for k, v in _flatten(rest).items()],
                                                      ("Key", "Value"), numeric_cols=(1,)))
    return "".join(parts)


def _headline_fallback(evaluation: Evaluation) -> dict | None:
    """A headline from a foreign eval.json (an "nll" or "loglik" key of another program)."""
    for key, label in _HEADLINE_FALLBACKS:
        for name, value in evaluation.other.items():
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


_TOPICS_JSON = "topics.json"  # written by elbolab.figures.topics for document models (nvdm)


def _topics_section(run_dir: Path, evaluation: Evaluation | None) -> str | None:
    """The Topics table of a document model: one row per latent dimension, its top words as text, its spread (and
    its KL from the evaluation, when there is one per dimension); None when the run has no topics.json."""
    data, note = _read_json(run_dir / _TOPICS_JSON)
    if data is None:
        return None if not (run_dir / _TOPICS_JSON).exists() else _note(note)
    topics = data.get("topics") if isinstance(data, dict) else None
    if not isinstance(topics, list) or not all(isinstance(t, dict) and isinstance(t.get("words"), list)
                                               for t in topics):
        return _note(f"{_TOPICS_JSON} holds no list of topics; section skipped.")
    kl = evaluation.kl_per_dim if isinstance(evaluation, Evaluation) else None
    dims = [t.get("dim") for t in topics]
    use_kl = bool(kl) and all(isinstance(j, int) and 0 <= j < len(kl) and _finite(kl[j]) for j in dims)
    rows = []
    for t in topics:
        row = [f"h{t.get('dim')}", " ".join(str(w) for w in t["words"]),
               f"{t['spread']:.3f}" if _finite(t.get("spread")) else ""]
        if use_kl:
            row.append(f"{kl[t['dim']]:.2f}")
        rows.append(row)
    top = max((len(t["words"]) for t in topics), default=0)
    header = ["Latent dimension", f"Top {top} words (largest R_jw first)", "Spread of R_j"] + (
        ["KL (nats)"] if use_kl else [])
    explain = ("Each row is one latent dimension j of the decoder p(w|h) = softmax(R^T h + b): the words whose "
               "probability rises most when h_j rises. Spread is the s.d. of R_jw over the vocabulary; rows are "
               "ordered by it, so the dimensions the decoder uses most come first (a small spread: a dimension it "
               "barely uses, with a noisy word list).")
    if use_kl:
        explain += " KL is the dimension's mean KL(q(h_j|d) || p(h_j)) in the evaluation (near 0: an inactive unit)."
    return _table(rows, header, numeric_cols=tuple(range(2, len(header)))) + _note(explain + (
        " The same words as 'elbolab topics RUN'."))


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


def _summary_cards(run_dir: Path, config, manifest, headline, callout, training_facts,
                   evaluation: Evaluation | None = None) -> str:
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
    if evaluation is not None:
        if _finite(evaluation.elbo):
            cards.append(_card(f"{evaluation.split} ELBO", f"{evaluation.elbo:.2f}", "nats per example, same examples"))
        kl = evaluation.kl_per_dim
        if kl and all(_finite(v) for v in kl):
            cards.append(_card("KL(q(z|x) || p(z))", f"{sum(kl):.2f}", f"nats, over {len(kl)} latent dimensions"))
        if evaluation.active_units is not None and evaluation.latent_dim is not None:
            cards.append(_card("Active units", f"{evaluation.active_units} of {evaluation.latent_dim}",
                               "Cov_x E[z|x] > 0.01", warn=evaluation.active_units == 0))
        cards += _model_metric_cards(evaluation)
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
    if isinstance(summary, dict):  # written at the end of training
        warnings = summary.get("warnings") or ([summary["collapse_warning"]] if summary.get("collapse_warning") else [])
        for warning in warnings:
            page += f'<div class="callout"><strong>Training:</strong> {_e(str(warning))}</div>'
    return page


def _model_metric_cards(evaluation: Evaluation) -> list[str]:
    """The model's own headline numbers from the evaluation: clustering (vade) and perplexity (nvdm)."""
    metrics, split, cards = evaluation.model_metrics or {}, evaluation.split, []
    if _finite(metrics.get("accuracy")):
        sub = ", ".join(f"{name} {metrics[key]:.3f}" for name, key in (("NMI", "nmi"), ("ARI", "ari"))
                        if _finite(metrics.get(key)))
        cards.append(_card(f"{split} clustering accuracy", f"{100 * metrics['accuracy']:.1f}%",
                           sub + "; clusters matched to classes (Hungarian)"))
    if _finite(metrics.get("perplexity_is")):
        sub = (f"exp(-mean log p(d) / words), importance sampled; from the ELBO {metrics['perplexity_elbo']:.0f}"
               if _finite(metrics.get("perplexity_elbo")) else "importance sampled")
        cards.append(_card(f"{split} perplexity", f"{metrics['perplexity_is']:.0f}", sub))
    return cards


def _explorer_section(run_dir: Path) -> str | None:
    """The interactive latent explorer (elbolab.explorer) when the run's model qualifies, else a note saying why;
    None when the folder holds no weights. Any failure becomes a note: the page is written regardless."""
    from elbolab.runs import WEIGHTS

    if not (run_dir / WEIGHTS).is_file():
        return None
    from elbolab.explorer import ExplorerUnavailable, decoder_spec, explorer_html
    from elbolab.loading import load_run, load_run_data

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
        data = load_run_data(config["data"]).test
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
    latest = {split: Evaluation.from_dict(record) for split, record in latest_per_split(history).items()}
    if latest:  # the detailed tables show the newest test evaluation (else the newest of any split)
        evaluation, eval_note = next(iter(latest.values())), None
    else:
        evaluation, eval_note = _read_json(run_dir / "eval.json")
    manifest, manifest_note = _read_json(run_dir / "manifest.json")
    records, metrics_note = _read_jsonl(run_dir / "metrics.jsonl")

    def not_an_object(name, value, note):
        return note if value is None or isinstance(value, dict) else f"{name} is not a JSON object; skipped."

    config_note = not_an_object("config.json", config, config_note)
    eval_note = not_an_object("eval.json", evaluation, eval_note) if not isinstance(evaluation, Evaluation) else None
    manifest_note = not_an_object("manifest.json", manifest, manifest_note)

    evaluation = Evaluation.from_dict(evaluation) if isinstance(evaluation, dict) else evaluation
    if isinstance(evaluation, Evaluation):
        has_kl_figure = any("kl_per_dim" in p.stem.lower() for p in (run_dir / "figures").glob("*.png"))
        eval_html, headline, callout = _evaluation_section(evaluation, config, draw_kl=not has_kl_figure)
        eval_html += _evaluation_history(latest, len(history))
        headline = headline or _headline_fallback(evaluation)
    else:
        eval_html, headline, callout = "", None, None
    training_html, training_facts = _training_section(records) if records else ("", {})

    sections = [
        ("summary", "Summary", _summary_cards(run_dir, config, manifest, headline, callout, training_facts,
                                              evaluation if isinstance(evaluation, Evaluation) else None)),
    ]
    explorer = _explorer_section(run_dir)
    if explorer is not None:
        sections.append(("explorer", "Explorer", explorer))
    sections += [
        ("evaluation", "Evaluation", eval_html + (_note(eval_note) if eval_note else "")),
        ("training", "Training", training_html + (_note(metrics_note) if metrics_note else "")),
    ]
    topics = _topics_section(run_dir, evaluation if isinstance(evaluation, Evaluation) else None)
    if topics is not None:
        sections.append(("topics", "Topics", topics))
    sections += [
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
