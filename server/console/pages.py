"""Server-rendered HTML: the runs overview and the shell of a run page.

No build step and no CDN (operators' networks are often closed): the run page
inlines one small script that polls the JSON API and draws SVG charts.
"""

from __future__ import annotations

import datetime as dt
import json
from functools import cache
from html import escape
from importlib import resources
from typing import Any
from urllib.parse import quote


@cache
def _asset(name: str) -> str:
    return resources.files("fedtune.server.console").joinpath("static", name).read_text(encoding="utf-8")


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _page(title: str, body: str, *, script: str = "", refresh_s: int | None = None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"{refresh}<title>{escape(title)}</title><style>{_asset('console.css')}</style></head>"
        f"<body><header><a class='brand' href='{{home}}'>fedtune console</a></header><main>{body}</main>"
        f"{script}</body></html>"
    )


def overview_page(runs: list[dict[str, Any]], token: str) -> str:
    q = f"?token={quote(token)}"
    rows = "".join(
        f"<tr data-run='{escape(r['id'])}'><td><a href='/runs/{quote(r['id'])}{q}'>{escape(r['id'])}</a></td>"
        f"<td>{escape(r['name'])}</td><td><span class='status {escape(r['status'])}'>{escape(r['status'])}</span></td>"
        f"<td class='num'>{r['rounds_done']}/{r['rounds_total']}</td>"
        f"<td class='num'>{_num(r['accuracy'])}</td>"
        f"<td class='num'>{r['attempts']}</td><td>{_when(r['started'])}</td><td>{_when(r['finished'])}</td></tr>"
        for r in runs
    )
    empty = "<p class='muted'>No runs in this store yet. Start one with <code>fedtune simulate</code>.</p>"
    table = (
        "<table id='runs'><thead><tr><th>run</th><th>federation</th><th>status</th><th>rounds</th>"
        "<th>accuracy</th><th>attempts</th><th>started</th><th>finished</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )
    body = f"<h1>Runs</h1>{table if runs else empty}"
    return _page("fedtune runs", body, refresh_s=5).replace("{home}", "/" + q)


def run_page(run: dict[str, Any], token: str) -> str:
    q = f"?token={quote(token)}"
    config = json.dumps({"run": run["id"], "pollMs": 2000})
    body = f"""
<h1>Run <code>{escape(run["id"])}</code> <span id="run-status" class="status {escape(run["status"])}">
{escape(run["status"])}</span></h1>
<p id="run-meta" class="muted">{escape(run["name"])}</p>
<section><h2>Round timeline</h2><div id="timeline" class="timeline"></div></section>
<section class="grid2">
  <div><h2>Accuracy per round</h2><svg id="chart-accuracy" class="chart" viewBox="0 0 560 260"></svg></div>
  <div><h2>Eval loss per round</h2><svg id="chart-loss" class="chart" viewBox="0 0 560 260"></svg></div>
</section>
<section class="grid2">
  <div><h2>Privacy: epsilon spent vs cap</h2>
    <table id="eps-table"><thead><tr><th>site</th><th>epsilon spent</th>
    <th class="eps-worst" hidden>own share alone</th><th>cap</th><th>used</th>
    <th>rounds trained</th><th>declined</th></tr></thead><tbody></tbody></table>
    <p id="eps-note" class="muted" hidden>Distributed noise: epsilon spent is what each site charged against its cap,
    assuming its <code>min_honest_sites</code> sites add their noise honestly; <em>own share alone</em> is its epsilon
    if the server colluded with every other site of the sums.</p></div>
  <div><h2>Bytes per round</h2><svg id="chart-bytes" class="chart" viewBox="0 0 560 260"></svg></div>
</section>
<section><h2>Site health</h2>
  <table id="health-table"><thead><tr><th>site</th><th>node</th><th>status</th><th>last seen</th>
  <th>declined rounds</th><th>failures</th></tr></thead><tbody></tbody></table></section>
<section><h2>Model versions</h2>
  <table id="checkpoint-table"><thead><tr><th>round</th><th>accuracy</th><th>SHA-256</th><th>saved</th>
  <th>PEFT adapter</th></tr></thead><tbody></tbody></table></section>
<p id="updated" class="muted"></p>
"""
    script = f"<script>window.FEDTUNE = {config};</script><script>{_asset('console.js')}</script>"
    return _page(f"fedtune run {run['id']}", body, script=script).replace("{home}", "/" + q)
