"""Server-rendered HTML: the runs overview, the shell of a run page, the sign-in form.

No build step and no CDN (operators' networks are often closed): the run page inlines one small script that
polls the JSON API and draws SVG charts. The run's recipe never changes, so it is rendered here once.

No link or form here carries the token: the browser proves itself with the session cookie (`session.py`), so
every address the pages show or request is safe to copy, bookmark or log. Every inline `<script>` and `<style>`
carries the response's CSP nonce (`security.py`).
"""

from __future__ import annotations

import datetime as dt
import json
from functools import cache
from html import escape
from importlib import resources
from typing import Any
from urllib.parse import quote

from fedtune.server.console.recipe import Section


@cache
def _asset(name: str) -> str:
    return resources.files("fedtune.server.console").joinpath("static", name).read_text(encoding="utf-8")


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _page(title: str, body: str, nonce: str, *, script: str = "", refresh_s: int | None = None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta name='referrer' content='no-referrer'><link rel='icon' href='data:,'>"  # no favicon request
        f"{refresh}<title>{escape(title)}</title><style nonce='{nonce}'>{_asset('console.css')}</style></head>"
        f"<body><header><a class='brand' href='/'>fedtune console</a></header><main>{body}</main>"
        f"{script}</body></html>"
    )


def overview_page(runs: list[dict[str, Any]], nonce: str) -> str:
    rows = "".join(
        f"<tr data-run='{escape(r['id'])}'><td><a href='/runs/{quote(r['id'])}'>{escape(r['id'])}</a></td>"
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
    return _page("fedtune runs", body, nonce, refresh_s=5)


def login_page(nonce: str, *, next_url: str = "/", error: str | None = None) -> str:
    """A password form: the one way into the pages with no token in any URL at all (nor in the history)."""
    problem = f"<p class='error' role='alert'>{escape(error)}</p>" if error else ""
    body = f"""
<h1>Sign in</h1>
<section class="login">
<p>Paste the console token (<code>fedtune console</code> printed it, or it is in
<code>$FEDTUNE_CONSOLE_TOKEN</code>). The browser keeps a session cookie for the day; the token itself is not kept.</p>
{problem}
<form method="post" action="/login">
  <input type="hidden" name="next" value="{escape(next_url)}">
  <label>token <input type="password" name="token" autocomplete="current-password" required autofocus></label>
  <button type="submit">Sign in</button>
</form></section>
"""
    return _page("fedtune console: sign in", body, nonce)


def recipe_html(sections: list[Section], federation: dict[str, Any]) -> str:
    """The recipe as readable tables, with the stored spec itself folded away below them."""
    blocks = "".join(
        f"<div class='recipe-part' id='recipe-{escape(s['id'])}'><h3>{escape(s['title'])}</h3><table class='kv'>"
        + "".join(f"<tr><th>{escape(row['label'])}</th><td>{escape(row['value'])}</td></tr>" for row in s["rows"])
        + "</table></div>"
        for s in sections
    )
    raw = escape(json.dumps(federation, indent=2, sort_keys=True))
    return (
        f"<div class='recipe'>{blocks}</div>"
        "<details id='recipe-raw'><summary>Federation spec as stored with the run (JSON)</summary>"
        f"<pre>{raw}</pre></details>"
    )


def run_page(run: dict[str, Any], recipe: str, nonce: str) -> str:
    config = json.dumps({"run": run["id"], "pollMs": 2000}).replace("<", "\\u003c")  # never closes the script
    csv_href = f"/api/runs/{quote(run['id'])}/rounds.csv"
    body = f"""
<h1>Run <code>{escape(run["id"])}</code> <span id="run-status" class="status {escape(run["status"])}">
{escape(run["status"])}</span></h1>
<p id="run-meta" class="muted">{escape(run["name"])}</p>
<p class="actions"><a href="#recipe">Recipe and privacy settings</a>
<a id="csv-link" href="{csv_href}" download="fedtune-{escape(run["id"])}-rounds.csv">Download per-round figures
(CSV)</a></p>
<section><h2>Round timeline</h2><div id="timeline" class="timeline"></div></section>
<section class="grid2">
  <div><h2>Accuracy per round</h2><svg id="chart-accuracy" class="chart" viewBox="0 0 560 260"></svg></div>
  <div><h2>Eval loss per round</h2><svg id="chart-loss" class="chart" viewBox="0 0 560 260"></svg></div>
</section>
<section><h2>Privacy: epsilon spent vs cap</h2>
    <table id="eps-table"><thead><tr><th>site</th><th>epsilon spent</th>
    <th class="eps-worst" hidden>own share alone</th><th>cap</th><th>used</th>
    <th>rounds trained</th><th>declined</th></tr></thead><tbody></tbody></table>
    <p id="eps-note" class="muted" hidden>Distributed noise: epsilon spent is what each site charged against its cap,
    assuming its <code>min_honest_sites</code> sites add their noise honestly; <em>own share alone</em> is its epsilon
    if the server colluded with every other site of the sums.</p></section>
<section class="grid2">
  <div><h2>Epsilon spent after each round</h2>
    <svg id="chart-epsilon" class="chart" viewBox="0 0 560 260"></svg></div>
  <div><h2>Bytes per round</h2><svg id="chart-bytes" class="chart" viewBox="0 0 560 260"></svg></div>
</section>
<section><h2>Epsilon and noise per round</h2>
  <table id="eps-rounds"><thead></thead><tbody></tbody></table>
  <p class="muted">Each cell: epsilon spent after the round (the site's ledger total for this dataset, earlier runs
  included) / its cap, and sigma, the noise multiplier of its DP-SGD steps that round. "-": the site reported no
  such figure (no training that round; under distributed noise a site reports no sigma, the sum's follows from
  the recipe).</p></section>
<section><h2>Site health</h2>
  <table id="health-table"><thead><tr><th>site</th><th>node</th><th>status</th><th>last seen</th>
  <th>declined rounds</th><th>failures</th></tr></thead><tbody></tbody></table></section>
<section><h2>Model versions</h2>
  <table id="checkpoint-table"><thead><tr><th>round</th><th>accuracy</th><th>SHA-256</th><th>saved</th>
  <th>PEFT adapter</th></tr></thead><tbody></tbody></table></section>
<section id="recipe"><h2>Recipe and privacy settings</h2>{recipe}</section>
<p id="updated" class="muted"></p>
"""
    script = (
        f"<script nonce='{nonce}'>window.FEDTUNE = {config};</script>"
        f"<script nonce='{nonce}'>{_asset('console.js')}</script>"
    )
    return _page(f"fedtune run {run['id']}", body, nonce, script=script)
