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
from pathlib import Path

from elbolab.errors import CheckpointError

__all__ = ["write_report"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_EMBED_BYTES = 10_000_000  # a page of tens of MB is unusable; such figures get a note instead
_LIST_PREVIEW = 8
# Figure order on the page: (kind, substrings of the file stem that select it, caption).
_FIGURE_KINDS = (
    ("samples", ("sample",), "Samples from the model"),
    ("reconstructions", ("recon",), "Inputs (top) and their reconstructions (beneath)"),
    ("curves", ("curve",), "Training curves by epoch, train vs val"),
    ("manifold", ("manifold",), "Latent manifold: decoder mean over a grid of normal quantiles"),
    ("latent_scatter", ("scatter",), "Latent codes in 2-D, coloured by label"),
)
_HEADLINE_PATTERNS = ("log_px", "log_likelihood", "loglik", "nll", "elbo")
_STDERR_SUFFIXES = ("_stderr", "_se", "_sem", ".stderr", ".se", ".sem")
_CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --accent:#2f6fb0; --bg:#fafbfc; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1100px; margin:0 auto; padding:24px 28px 48px; }
h1 { font-size:1.6rem; margin:0 0 4px; }
h2 { font-size:1.2rem; margin:36px 0 12px; padding-bottom:4px; border-bottom:2px solid var(--line); }
h3 { font-size:1rem; margin:20px 0 8px; color:var(--muted); }
nav { margin:8px 0 4px; font-size:.9rem; }
nav a { color:var(--accent); text-decoration:none; margin-right:14px; }
.subtitle, .note, figcaption, footer { color:var(--muted); }
.note { font-size:.9rem; font-style:italic; margin:6px 0; }
.cards { display:grid; grid-template-columns:repeat(auto-fill,minmax(200px,1fr)); gap:12px; }
.card { background:#fff; border:1px solid var(--line); border-radius:8px; padding:10px 14px; }
.card .label { font-size:.78rem; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); }
.card .value { font-size:1.15rem; font-weight:600; word-break:break-word; }
table { border-collapse:collapse; background:#fff; border:1px solid var(--line); margin:6px 0 12px;
  font-size:.9rem; min-width:50%; }
th, td { text-align:left; padding:5px 12px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#f1f4f8; font-weight:600; }
td.num { font-variant-numeric:tabular-nums; text-align:right; white-space:nowrap; }
tr:nth-child(even) td { background:#fbfcfd; }
code { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:.85em; }
.figures { display:grid; grid-template-columns:repeat(auto-fill,minmax(440px,1fr)); gap:18px; }
figure { margin:0; background:#fff; border:1px solid var(--line); border-radius:8px; padding:10px; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto; }
figcaption { font-size:.88rem; margin-top:6px; text-align:center; }
footer { margin-top:40px; font-size:.8rem; }
"""


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
    records, bad = [], 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return [], f"{path.name} could not be read ({type(exc).__name__}: {exc}); section skipped."
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # e.g. a line cut short by an interrupted run
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, (f"{bad} unreadable line(s) in {path.name} were skipped." if bad else None)


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
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i in numeric_cols else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _figure(png: bytes, caption: str) -> str:
    return f"<figure>{_img(png, caption)}<figcaption>{_e(caption)}</figcaption></figure>"


# -------------------------------------------------------------------------------------------- sections
def _eval_rows(evaluation: dict) -> tuple[list[tuple[str, str]], list[float] | None]:
    """Flattened eval.json as (label, value) rows; mean/stderr pairs merged into "m ± s".

    Also returns the KL-per-dimension list if there is one (drawn as a bar chart).
    """
    flat = _flatten(evaluation)
    used: set[str] = set()
    rows: list[tuple[str, str]] = []
    kl_per_dim = None
    for key, value in flat.items():
        if key in used:
            continue
        last = key.rsplit(".", 1)[-1].lower()
        if kl_per_dim is None and "kl" in last and "dim" in last and isinstance(value, list) \
                and value and all(_is_number(v) for v in value):
            kl_per_dim = [float(v) for v in value]
        label = key
        for mean_suffix in ("_mean", ".mean"):
            if key.endswith(mean_suffix):
                label = key[: -len(mean_suffix)]
        stderr_key = next((stem + suffix for stem in (key, label) for suffix in _STDERR_SUFFIXES
                           if stem + suffix in flat and _is_number(flat[stem + suffix])), None)
        if stderr_key is not None and _is_number(value):
            used.add(stderr_key)
            rows.append((label, f"{_fmt(float(value))} ± {_fmt(float(flat[stderr_key]))}"))
        else:
            rows.append((key, _fmt(value)))
    return rows, kl_per_dim


def _headline(eval_rows: list[tuple[str, str]]) -> tuple[str, str] | None:
    for pattern in _HEADLINE_PATTERNS:
        for label, value in eval_rows:
            if pattern in label.lower():
                return label, value
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


def _summary_cards(run_dir: Path, config, manifest, eval_rows, training_facts) -> str:
    cards: dict[str, str] = {"Run": run_dir.resolve().name}
    flat_config = _flatten(config) if isinstance(config, dict) else {}
    for label, keys in (("Model", ("model", "model.name", "model_name", "model.kind")),
                        ("Data", ("data", "dataset", "data.name", "dataset.name"))):
        value = next((flat_config[k] for k in keys if isinstance(flat_config.get(k), str)), None)
        if value is not None:
            cards[label] = value
    seed = manifest.get("seed") if isinstance(manifest, dict) else None
    seed = flat_config.get("seed") if seed is None else seed
    if seed is not None:
        cards["Seed"] = _text(seed)
    headline = _headline(eval_rows)
    if headline is not None:
        cards[headline[0]] = headline[1]
    cards.update(training_facts)
    if isinstance(manifest, dict):
        if manifest.get("timestamp_utc"):
            cards["Started (UTC)"] = str(manifest["timestamp_utc"])
        if manifest.get("git_commit"):
            cards["Git commit"] = str(manifest["git_commit"])[:12] + (
                " (dirty)" if manifest.get("git_dirty") else "")
    body = "".join(f'<div class="card"><div class="label">{_e(k)}</div><div class="value">{_e(v)}</div></div>'
                   for k, v in cards.items())
    return f'<div class="cards">{body}</div>'


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
    evaluation, eval_note = _read_json(run_dir / "eval.json")
    manifest, manifest_note = _read_json(run_dir / "manifest.json")
    records, metrics_note = _read_jsonl(run_dir / "metrics.jsonl")

    def not_an_object(name, value, note):
        return note if value is None or isinstance(value, dict) else f"{name} is not a JSON object; skipped."

    config_note = not_an_object("config.json", config, config_note)
    eval_note = not_an_object("eval.json", evaluation, eval_note)
    manifest_note = not_an_object("manifest.json", manifest, manifest_note)

    eval_rows, kl_per_dim = _eval_rows(evaluation) if isinstance(evaluation, dict) else ([], None)
    eval_html = _table(eval_rows, ("Metric", "Value"), numeric_cols=(1,)) if eval_rows else ""
    has_kl_figure = any("kl_per_dim" in p.stem.lower() for p in (run_dir / "figures").glob("*.png"))
    if kl_per_dim is not None and not has_kl_figure:
        from elbolab.plots import _kl_bar_figure, figure_png_bytes

        eval_html += _figure(figure_png_bytes(_kl_bar_figure(kl_per_dim)),
                             "Average KL per latent dimension (near 0: an inactive unit)")
    training_html, training_facts = _training_section(records) if records else ("", {})

    sections = [
        ("summary", "Summary", _summary_cards(run_dir, config, manifest, eval_rows, training_facts)),
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
    from elbolab import __version__

    title = f"elbolab run: {run_dir.resolve().name}"
    nav = "".join(f'<a href="#{anchor}">{_e(heading)}</a>' for anchor, heading, _ in sections)
    body = "".join(f'<section id="{anchor}"><h2>{_e(heading)}</h2>{content}</section>'
                   for anchor, heading, content in sections)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f'<h1>{_e(title)}</h1><div class="subtitle">{_e(str(run_dir))}</div><nav>{nav}</nav>{body}'
        f"<footer>Generated by elbolab {_e(__version__)} at {_e(generated)} UTC.</footer>"
        "</main></body></html>\n"
    )
    out = run_dir / "index.html"
    tmp = run_dir / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)  # readers never see a half-written page
    return out
