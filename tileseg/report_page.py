"""One self-contained HTML page for a run folder: items, timings, errors, quicklooks.

``tileseg report RUN_DIR`` (and ``tileseg run --report-page``) reads every
run report kept in the folder (``tileseg-runs/*.json``, one per run, or the
latest ``tileseg-report.json``) and writes ``tileseg-report.html``: per item
its status, stage timings, throughput, peak memory, error and Dice, with a
quicklook of its input and output read at low resolution
(:mod:`tileseg.quicklook`); below, the history of runs. Images are embedded
as ``data:`` URIs and styles are inline: the page makes no network request.
"""

from __future__ import annotations

import base64
import glob
import html
import json
import os
from typing import Any

from .report import REPORT_NAME, RUNS_DIR, write_text_atomic

#: File name of the page inside the run folder.
PAGE_NAME = "tileseg-report.html"

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d2327;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#5a6570;margin-bottom:16px}
table{border-collapse:collapse;font-size:13px}th,td{border-bottom:1px solid #e3e6e8;padding:6px 8px;
text-align:left;vertical-align:top}th{background:#f5f7f8;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#137333;font-weight:600}.failed{color:#b3261e;font-weight:600}.skipped{color:#5a6570;font-weight:600}
.err{color:#b3261e;max-width:420px;white-space:pre-wrap;word-break:break-word;font-family:monospace;font-size:12px}
img.ql{width:160px;height:auto;image-rendering:pixelated;border:1px solid #d0d5d8;background:#000}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #e3e6e8;border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:20px}.path{font-family:monospace;font-size:12px;word-break:break-all;max-width:360px}
"""


def load_runs(run_dir: str) -> list[dict[str, Any]]:
    """Every run report kept in ``run_dir``, oldest first.

    Reads ``tileseg-runs/*.json`` (one file per run, kept by every run, named
    by start time) or,
    for folders written before runs were kept, ``tileseg-report.json``.

    Raises
    ------
    FileNotFoundError
        When the folder holds no run report.
    """
    paths = sorted(glob.glob(os.path.join(run_dir, RUNS_DIR, "*.json")))
    if not paths and os.path.isfile(os.path.join(run_dir, REPORT_NAME)):
        paths = [os.path.join(run_dir, REPORT_NAME)]
    if not paths:
        raise FileNotFoundError(f"{run_dir}: no tileseg run report here ({RUNS_DIR}/*.json or {REPORT_NAME})")
    runs = []
    for p in paths:
        with open(p, encoding="utf-8") as fh:
            runs.append(json.load(fh))
    # file names start with the run's start time in ns (report.RunReport.write): already in order
    return runs


def latest_items(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per input: its latest result, with the figures of the run that computed it.

    An item ``skipped`` by a later run (already complete) keeps the timings,
    memory and Dice of the run that did the work; ``run`` names that run.
    """
    rows: dict[str, dict[str, Any]] = {}
    for k, run in enumerate(runs):
        for item in run.get("items", []):
            key = str(item.get("input"))
            prev = rows.get(key)
            row = dict(item, run=k + 1)
            if item.get("status") == "skipped" and prev is not None and prev.get("status") == "ok":
                row = dict(prev, status="ok", run=prev["run"], skipped_in=k + 1)
            rows[key] = row
    return sorted(rows.values(), key=lambda r: (r.get("index", 0), str(r.get("input"))))


def _fmt(v: Any, unit: str = "", digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}{unit}"
    return f"{v}{unit}"


def _mib(v: Any) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f} MiB"


def _img(data: bytes | None, mime: str, alt: str, note: str | None) -> str:
    if data is None:
        return f'<span class="sub">{html.escape(note or "no preview")}</span>'
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<img class="ql" alt="{html.escape(alt)}" src="{uri}">'


def _quicklooks(row: dict[str, Any], pipeline: dict[str, Any], max_side: int) -> tuple[str, str]:
    from .quicklook import quicklook

    cells = []
    array = (pipeline.get("input") or {}).get("array")
    out = (row.get("outputs") or [row.get("output")])[0]
    for path, kind, arr, mime in ((row.get("input"), "image", array, "image/jpeg"),
                                  (out, "labels", None, "image/png")):
        data, note = None, None
        if not path or (kind == "labels" and row.get("status") == "failed"):
            note = "no output"
        else:
            try:
                data = quicklook(path, kind=kind, max_side=max_side, array=arr)
            except Exception as exc:  # noqa: BLE001 - a preview never stops the page
                note = f"no preview: {type(exc).__name__}"
        cells.append(_img(data, mime, f"{kind} {os.path.basename(str(path))}", note))
    return cells[0], cells[1]


def render_page(runs: list[dict[str, Any]], *, images: bool = True, max_side: int = 160) -> str:
    """The HTML page for ``runs`` (see :func:`load_runs`).

    Parameters
    ----------
    runs : list of dict
        Run reports, oldest first.
    images : bool
        Embed quicklooks of each item's input and first output.
    max_side : int
        Longest side of a quicklook in pixels.
    """
    latest = runs[-1]
    rows = latest_items(runs)
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "failed")}
    pipeline = latest.get("pipeline") or {}
    title = pipeline.get("description") or "tileseg run"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<div class='sub'>{len(runs)} run(s); latest started {html.escape(str(latest.get('started')))}, "
        f"tileseg {html.escape(str((latest.get('versions') or {}).get('tileseg', '?')))}</div>",
        "<div class='cards'>",
        f"<div class='card'><b>{len(rows)}</b>items</div>",
        f"<div class='card'><b class='ok'>{counts['ok']}</b>done</div>",
        f"<div class='card'><b class='failed'>{counts['failed']}</b>failed</div>",
        f"<div class='card'><b>{_fmt(sum((r.get('duration_s') or 0) for r in runs), ' s')}</b>run time, all runs</div>",
        "</div><h2>Items</h2><table id='items'><thead><tr><th>#</th><th>input</th><th>status</th>"
        "<th>input quicklook</th><th>output quicklook</th><th>timings (s)</th><th>Mpx/s</th>"
        "<th>peak RSS</th><th>Dice</th><th>error</th></tr></thead><tbody>",
    ]
    for row in rows:
        status = str(row.get("status"))
        timings = row.get("timings") or {}
        tim = "<br>".join(f"{html.escape(k)} {v:.2f}" for k, v in timings.items() if isinstance(v, (int, float)))
        dice = row.get("dice") or {}
        dice_s = "<br>".join(f"{html.escape(str(k))}: {'-' if v is None else f'{v:.4f}'}" for k, v in dice.items())
        ql_in, ql_out = _quicklooks(row, pipeline, max_side) if images else ("", "")
        note = f" (run {row['run']}, complete in run {row['skipped_in']})" if row.get("skipped_in") else ""
        pps = row.get("pixels_per_s")
        parts.append(
            f"<tr class='item' data-status='{html.escape(status)}'><td class='num'>{row.get('index', '')}</td>"
            f"<td class='path'>{html.escape(str(row.get('input')))}</td>"
            f"<td class='{html.escape(status)}'>{html.escape(status)}{html.escape(note)}</td>"
            f"<td>{ql_in}</td><td>{ql_out}</td><td class='num'>{tim or '-'}</td>"
            f"<td class='num'>{'-' if pps is None else f'{pps / 1e6:.2f}'}</td>"
            f"<td class='num'>{_mib(row.get('peak_rss_bytes'))}</td><td>{dice_s or '-'}</td>"
            f"<td class='err'>{html.escape(str(row.get('error') or ''))}</td></tr>"
        )
    parts.append("</tbody></table><h2>Runs</h2><table id='runs'><thead><tr><th>run</th><th>started</th>"
                 "<th>finished</th><th>duration</th><th>ok</th><th>skipped</th><th>failed</th>"
                 "<th>scheduler</th></tr></thead><tbody>")
    for k, run in enumerate(runs):
        c = run.get("summary") or {}
        info = run.get("scheduler") or {}
        sched = " ".join(str(x) for x in (info.get("scheduler"), info.get("workers") and f"x{info['workers']}") if x)
        parts.append(
            f"<tr><td class='num'>{k + 1}</td><td>{html.escape(str(run.get('started')))}</td>"
            f"<td>{html.escape(str(run.get('finished')))}</td><td class='num'>{_fmt(run.get('duration_s'), ' s')}</td>"
            f"<td class='num'>{c.get('ok', 0)}</td><td class='num'>{c.get('skipped', 0)}</td>"
            f"<td class='num'>{c.get('failed', 0)}</td><td>{html.escape(str(sched))}</td></tr>"
        )
    # marks how many quicklooks decoded (read by tests in a headless browser)
    parts.append("</tbody></table><script>window.addEventListener('load',function(){var n=0;"
                 "document.querySelectorAll('img.ql').forEach(function(i){if(i.complete&&i.naturalWidth>0)n++;});"
                 "document.body.setAttribute('data-images-loaded',String(n));});</script></body></html>\n")
    return "".join(parts)


def write_report_page(run_dir: str, out: str | None = None, *, images: bool = True, max_side: int = 160) -> str:
    """Write the HTML page for the runs kept in ``run_dir``; returns its path.

    Parameters
    ----------
    run_dir : str
        The folder of a run's outputs (where its reports are).
    out : str, optional
        Where to write the page (default ``run_dir/tileseg-report.html``).
    images : bool
        Embed quicklooks of inputs and outputs.
    max_side : int
        Longest side of a quicklook in pixels.
    """
    runs = load_runs(run_dir)
    out = out or os.path.join(run_dir, PAGE_NAME)
    write_text_atomic(out, render_page(runs, images=images, max_side=max_side))
    return out
