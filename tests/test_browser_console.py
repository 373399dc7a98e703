"""The console in a real headless Chromium, watching a simulated federation as it runs.

Everything real: `fedtune simulate` writes the store from one process, `fedtune
console` serves it from another, and the page updates itself by polling.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx
import pytest

from fedtune.server.console.views import privacy_table, run_view
from fedtune.server.store import RunStore, StoreError

if TYPE_CHECKING:
    from playwright.sync_api import Page

T = TypeVar("T")
pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TOKEN = "browser-test-token-0123456789"
ROUNDS = 2


def _fedtune(*args: str) -> list[str]:
    return [sys.executable, "-c", "from fedtune.cli import main; main()", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], T], timeout: float, what: str, proc: subprocess.Popen | None = None) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}")
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _store_state(path: Path) -> tuple[str, list[dict], list[dict], str] | None:
    try:
        with RunStore(path, readonly=True) as store:
            runs = store.runs()
            if not runs:
                return None
            run = runs[0]["id"]
            return run, store.rounds(run), store.site_rounds(run), store.run(run)["status"]
    except StoreError:
        return None


def _completed(rounds: list[dict]) -> list[int]:
    return [r["round"] for r in rounds if r["status"] == "completed"]


def _scored(rounds: list[dict], round_: int) -> bool:
    return any(r["round"] == round_ and r["weighted_accuracy"] is not None for r in rounds)


def _check_page_matches_store(page: Page, store_path: Path, *, final: bool = True) -> int:
    """The charts and the epsilon table show exactly the store's values; returns the rounds charted.

    Mid-run (`final=False`) the store may be one poll ahead of the page: every charted value must be the
    store's, and the page may lack the newest rounds; the site charts and the epsilon table are checked at the end.
    """
    _, rounds, site_rounds, _ = _store_state(store_path)
    # a round's scores arrive with the next round's messages: a completed round is charted once they are in
    weighted = {
        r["round"]: r["weighted_accuracy"]
        for r in rounds
        if r["status"] == "completed" and r["weighted_accuracy"] is not None
    }
    dots = page.locator('#chart-accuracy circle[data-series="weighted"]')
    charted = {int(d.get_attribute("data-round")): float(d.get_attribute("data-value")) for d in dots.all()}
    if not final:
        assert charted and set(charted) <= set(weighted), (charted, weighted)
        for round_, value in charted.items():
            assert value == pytest.approx(weighted[round_])
        return len(charted)
    assert charted.keys() == weighted.keys()
    for round_, value in weighted.items():
        assert charted[round_] == pytest.approx(value)
    for site in {s["site"] for s in site_rounds}:
        site_dots = page.locator(f'#chart-loss circle[data-series="{site}"]')
        assert site_dots.count() == len([s for s in site_rounds if s["site"] == site and s["eval_loss"] is not None])
    for row in privacy_table(site_rounds):
        cells = page.locator(f'#eps-table tr[data-site="{row["site"]}"]')
        assert cells.locator("td.eps").inner_text() == f"{row['epsilon']:.2f}"
        if row["cap"] is not None:
            assert cells.locator("td.cap").inner_text() == f"{row['cap']:.2f}"
    return len(charted)


def test_console_follows_a_live_simulation(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: `apt-get install -y chromium`")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: `pip install playwright`")

    out = tmp_path / "sim"
    store_path = out / "store.sqlite"
    port = _free_port()
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("sim", "console")}
    console = subprocess.Popen(
        _fedtune("console", "--store", str(store_path), "--port", str(port)),
        stdout=logs["console"],
        stderr=subprocess.STDOUT,
        env={**os.environ, "FEDTUNE_CONSOLE_TOKEN": TOKEN},
    )
    sim = subprocess.Popen(
        _fedtune(
            "simulate",
            *("--sites", "2", "--rounds", str(ROUNDS), "--rows-per-site", "60", "--local-steps", "3"),
            *("--batch-size", "16", "--epsilon", "6", "--out", str(out)),
        ),
        stdout=logs["sim"],
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so that cleanup can take Ray's workers down with it
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def console_up() -> bool:
            try:
                return httpx.get(f"{base}/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).is_success
            except httpx.TransportError:
                return False

        _wait(console_up, 180, "the console to listen", console)  # the store appears once the simulation starts
        assert httpx.get(f"{base}/api/runs").status_code == 401  # the real server, not only the test client

        run, *_ = _wait(lambda: _store_state(store_path), 300, "the run to appear in the store", sim)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base}/runs/{run}?token={TOKEN}")
            page.wait_for_selector("#timeline .round")
            opened_with = len(_completed(_store_state(store_path)[1]))
            assert opened_with < ROUNDS + 1, "the run finished before the page opened; nothing was live"

            # Round 1 lands in the store while the page is open: the page must show it without a reload.
            _wait(lambda: 1 in _completed(_store_state(store_path)[1]), 420, "round 1 in the store", sim)
            page.wait_for_selector('#timeline .round[data-round="1"][data-status="completed"]', timeout=15_000)
            # round 1's scores come with round 2's training messages, and the chart follows the store
            _wait(lambda: _scored(_store_state(store_path)[1], 1), 420, "round 1's scores in the store", sim)
            page.wait_for_selector('#chart-accuracy circle[data-series="weighted"][data-round="1"]', timeout=15_000)
            assert _check_page_matches_store(page, store_path, final=False) >= 2  # rounds 0 and 1, live

            assert sim.wait(timeout=600) == 0, (tmp_path / "sim.log").read_text()[-3000:]
            page.wait_for_selector("#run-status.completed", timeout=15_000)
            page.wait_for_function(
                f"document.querySelectorAll('#chart-accuracy circle[data-series=\"weighted\"]').length == {ROUNDS + 1}",
                timeout=15_000,
            )
            assert _check_page_matches_store(page, store_path) == ROUNDS + 1
            assert page.locator("#checkpoint-table tbody tr").count() == ROUNDS + 1
            assert page.locator("#health-table tbody tr").count() == 2
            assert "download zip" in page.locator("#checkpoint-table").inner_text()

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
            browser.close()
    finally:
        if sim.poll() is None:
            os.killpg(sim.pid, signal.SIGKILL)
            sim.wait()
        console.terminate()
        try:
            console.wait(timeout=20)
        except subprocess.TimeoutExpired:
            console.kill()
        for fh in logs.values():
            fh.close()
    assert (ARTIFACTS / "console.png").stat().st_size > 10_000


@contextmanager
def _serving(store_path: Path) -> Iterator[str]:
    """The console app on a free loopback port in this process (a thread), stopped and joined on exit."""
    import uvicorn

    from fedtune.server.console.app import create_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(store_path, TOKEN), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started, 30, "the console to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
    assert not thread.is_alive(), "the console thread did not stop"


def test_page_fits_the_axis_shows_the_recipe_and_keeps_the_token_out(tmp_path: Path) -> None:
    """No federation needed: a store as a bank run leaves it, in a real browser (CSP, cookies and SVG included)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: `apt-get install -y chromium`")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: `pip install playwright`")
    from console_store import ACCURACY, CAPS, RUN, write_bank_store

    store_path = write_bank_store(tmp_path / "bank.sqlite")
    with RunStore(store_path, readonly=True) as store:
        view = run_view(store, RUN)
    axis = view["axes"]["accuracy"]
    with _serving(store_path) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))

        page.goto(f"{base}/runs/{RUN}?token={TOKEN}")
        assert page.url == f"{base}/runs/{RUN}"  # the address bar (and so the history entry) without the token
        (cookie,) = context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
        assert page.evaluate("document.cookie") == ""  # no script on the page can read it
        page.wait_for_selector('#chart-accuracy circle[data-series="weighted"]')

        # the accuracy axis is the server's fitted one: 0.88 -> 0.92 spans most of the chart's height
        chart = page.locator("#chart-accuracy")
        ticks = chart.locator("text.ytick").all_text_contents()
        steps = round((axis["max"] - axis["min"]) / axis["step"])
        assert ticks == [f"{axis['min'] + i * axis['step']:.{axis['digits']}f}" for i in range(steps + 1)]
        assert float(ticks[0]) > 0.5 and float(ticks[-1]) <= 1.0
        assert chart.locator("text.ylabel").text_content() == "held-out accuracy"
        ys = {
            float(d.get_attribute("data-value")): float(d.get_attribute("cy"))
            for d in chart.locator('circle[data-series="weighted"]').all()
        }
        low, high = min(ys), max(ys)
        assert low == pytest.approx(min(a + b for a, b in ACCURACY.values()) / 2, abs=0.01)
        assert ys[low] - ys[high] > 80  # pixels (of 218): a visible climb, not a flat line at the top

        # epsilon over rounds: one line per site, a dashed cap line per site, the table per round with sigma
        eps_chart = page.locator("#chart-epsilon")
        assert eps_chart.locator('circle[data-series="lender"]').count() == 3
        refs = eps_chart.locator("line.ref[data-ref]").all()
        caps = {r.get_attribute("data-ref"): float(r.get_attribute("data-value")) for r in refs}
        assert caps == CAPS
        lender_r1 = page.locator('#eps-rounds tr[data-round="1"] td.sigma[data-site="lender"]')
        assert lender_r1.inner_text() == "1.100"
        branch_r2 = page.locator('#eps-rounds tr[data-round="2"] td.site-status[data-site="branch"]')
        assert branch_r2.inner_text() == "declined"

        # the recipe: readable sections, raw JSON folded away until asked for
        lora = page.locator("#recipe-lora").inner_text()
        assert "rank r\t4" in lora and "top 2" in lora and "query, value, dense" in lora
        privacy = page.locator("#recipe-privacy").inner_text()
        assert "local" in privacy and "1e-06" in privacy and "rdp" in privacy
        raw = page.locator("#recipe-raw pre")
        assert not raw.is_visible()
        page.locator("#recipe-raw summary").click()
        assert raw.is_visible() and '"target_modules"' in raw.inner_text()

        # no link on the page carries the token; the CSV downloads on the cookie alone
        hrefs = page.eval_on_selector_all("[href], [src], [action]", "els => els.map(e => e.href || e.src || e.action)")
        assert hrefs and not [h for h in hrefs if "token" in h]
        with page.expect_download() as download:
            page.locator("#csv-link").click()
        rows = list(csv.DictReader(Path(download.value.path()).read_text().splitlines()))
        assert len(rows) == len(view["site_rounds"]) and rows[0]["run"] == RUN

        assert not problems, problems  # a CSP violation, a script error or a failed request shows up here

        # a signed-out browser is sent to the form (a 401, which the browser logs), which signs it in
        context.clear_cookies()
        page.goto(f"{base}/runs/{RUN}")
        page.fill("input[name=token]", TOKEN)
        page.locator("button[type=submit]").click()
        page.wait_for_selector('#chart-accuracy circle[data-series="weighted"]')
        assert page.url == f"{base}/runs/{RUN}"
        page.screenshot(path=str(tmp_path / "console-bank.png"), full_page=True)
        browser.close()
    assert [p for p in problems if "401" not in p] == []
