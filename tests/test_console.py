"""The console's HTTP surface and the `fedtune runs` tables, on a store written like a real run's."""

from __future__ import annotations

import csv
import io
import json
import time
from collections import OrderedDict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from console_store import CAPS, FINGERPRINT, HOSTILE, RUN, SIGMA, bank_spec, write_bank_store
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fedtune.cli import app as cli_app
from fedtune.common.adapter import save_state
from fedtune.server.aggregation import RoundUpdate, SiteTrain
from fedtune.server.console.app import create_app
from fedtune.server.console.auth import resolve_token
from fedtune.server.console.axes import fitted_axis
from fedtune.server.console.rounds_csv import COLUMNS
from fedtune.server.console.session import COOKIE_PREFIX, SESSION_TTL_S, Sessions
from fedtune.server.federation import RoundReport, SiteEval
from fedtune.server.store import RunStore

TOKEN = "test-token-0123456789abcdef"
NODES = {101: "bank", 202: "clinic"}


def _round(round_: int) -> RoundReport:
    report = RoundReport(round=round_, sampled=2, wall_s=2.0)
    report.evals = {
        n: SiteEval(name, 20, 2.0 - 0.2 * round_, 0.2 + 0.2 * round_, 1.5 * round_) for n, name in NODES.items()
    }
    report.bytes_down = dict.fromkeys(NODES, 4096)
    if round_:
        sites = {101: SiteTrain("bank", 80, 1.5 * round_, 8.0, 1.2, 2048)}
        sites[202] = (
            SiteTrain("clinic", 0, 3.0, 0.0, 0.0, 64, declined="site clinic: epsilon cap 3.0 reached")
            if round_ == 2
            else SiteTrain("clinic", 80, 1.5 * round_, 3.0, 1.4, 2048)
        )
        report.update = RoundUpdate(mean_delta=None, sites=sites)
    return report


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "store.sqlite"
    with RunStore(path) as store:
        store.create_run(
            "abc123def456",
            name="bank-intents",
            federation_json='{"name": "bank-intents", "training": {"rounds": 3, "local_steps": 2}, '
            '"secagg": {"enabled": true}}',
            rounds_total=3,
            fingerprint="",
            out_dir=tmp_path,
        )
        for r in range(3):
            ckpt = tmp_path / f"round-{r}.safetensors"
            save_state(OrderedDict(w=np.full(3, r, dtype=np.float32)), ckpt)
            store.record_round("abc123def456", _round(r), names=NODES, attempt=1, checkpoint=ckpt)
        store.round_started("abc123def456", 3, 1)
    return path


@pytest.fixture
def client(store_path: Path) -> TestClient:
    return TestClient(create_app(store_path, TOKEN))


@pytest.mark.parametrize(
    "url",
    [
        "/",
        "/api/runs",
        "/runs/abc123def456",
        "/api/runs/abc123def456",
        "/api/runs/abc/checkpoints/1/adapter.zip",
        "/api/runs/abc123def456/recipe",
        "/api/runs/abc123def456/rounds.csv",
        "/metrics",
    ],
)
def test_every_route_requires_the_token(client: TestClient, url: str) -> None:
    assert client.get(url).status_code == 401
    assert client.get(url, headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}).status_code == 401
    assert client.get(url + "?token=wrong").status_code == 401
    denied = client.get(url, headers={"Authorization": f"Basic {TOKEN}"})
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert "fedtune console" in denied.json()["detail"]  # tells the user where the token comes from


def test_json_api_serves_the_store(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    runs = client.get("/api/runs", headers=auth).json()
    assert [(r["id"], r["status"], r["rounds_done"]) for r in runs] == [("abc123def456", "running", 2)]

    view = client.get("/api/runs/abc123", headers=auth).json()  # unique prefix
    assert [t["status"] for t in view["timeline"]] == ["completed", "completed", "completed", "running"]
    assert view["charts"]["accuracy"]["weighted"] == [[0, 0.2], [1, 0.4], [2, pytest.approx(0.6)]]
    assert view["charts"]["accuracy"]["bank"][1] == [1, 0.4]
    privacy = {p["site"]: p for p in view["privacy"]}
    assert privacy["bank"]["epsilon"] == 3.0 and privacy["bank"]["cap"] == 8.0
    assert privacy["clinic"]["declined"] == 1 and privacy["clinic"]["cap"] == 3.0
    health = {h["site"]: h for h in view["health"]}
    assert health["clinic"]["status"] == "declined"
    assert health["clinic"]["declined"] == [{"round": 2, "reason": "site clinic: epsilon cap 3.0 reached"}]
    assert [b["up"] for b in view["bytes"]] == [0, 4096, 2048 + 64]
    assert [c["round"] for c in view["checkpoints"]] == [0, 1, 2]

    assert client.get("/api/runs/nope", headers=auth).status_code == 404


def test_pages_render_after_the_token_is_swapped_for_a_cookie(client: TestClient) -> None:
    page = client.get(f"/?token={TOKEN}")  # follows the redirect, with the cookie it set
    assert page.status_code == 200 and "abc123def456" in page.text
    assert [r.status_code for r in page.history] == [303] and page.url.query == b""
    assert "href='/runs/abc123def456'" in page.text
    run = client.get("/runs/abc123def456")
    assert run.status_code == 200
    for element in (
        "chart-accuracy",
        "chart-loss",
        "chart-bytes",
        "chart-epsilon",
        "eps-table",
        "eps-rounds",
        "health-table",
        "checkpoint-table",
        "recipe",
    ):
        assert f'id="{element}"' in run.text
    assert "<script" in run.text and "http" not in run.text.split("<script", 1)[1].replace(
        "http://www.w3.org/2000/svg", ""
    )  # no CDN: the page loads nothing from anywhere else


def test_console_without_store_yet(tmp_path: Path) -> None:
    client = TestClient(create_app(tmp_path / "later.sqlite", TOKEN))
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).json() == []
    assert "No runs" in client.get(f"/?token={TOKEN}").text
    assert client.get("/api/runs/nope/rounds.csv", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 503


def test_token_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDTUNE_CONSOLE_TOKEN", raising=False)
    generated, fresh = resolve_token(None)
    assert fresh and len(generated) >= 24
    monkeypatch.setenv("FEDTUNE_CONSOLE_TOKEN", TOKEN)
    assert resolve_token(None) == (TOKEN, False)
    with pytest.raises(ValueError, match="16 characters"):
        resolve_token("short")


def test_runs_cli_tables(store_path: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(cli_app, ["runs", "--store", str(store_path)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "abc123def456" in listed.output and "2/3" in listed.output
    shown = runner.invoke(cli_app, ["runs", "show", "abc1", "--store", str(store_path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "epsilon cap 3.0 reached" in shown.output and "running" in shown.output
    assert "own share alone" not in shown.output and "distributed noise" not in shown.output  # local noise
    missing = runner.invoke(cli_app, ["runs", "show", "zzz", "--store", str(store_path)])
    assert missing.exit_code == 2 and "no run 'zzz'" in " ".join(missing.output.split())
    nostore = runner.invoke(cli_app, ["runs", "--store", str(store_path.parent / "none.sqlite")])
    assert nostore.exit_code == 2 and "no run store here" in " ".join(nostore.output.split())


def test_tensorboard_events_from_the_store(store_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="TensorBoard export is optional: `pip install tensorboard`")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = CliRunner().invoke(
        cli_app, ["runs", "tensorboard", "abc1", str(tmp_path / "tb"), "--store", str(store_path)]
    )
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "tb" / "abc123def456"))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("global/weighted_accuracy")]
    assert accuracy == [(0, pytest.approx(0.2)), (1, pytest.approx(0.4)), (2, pytest.approx(0.6))]
    assert [e.value for e in events.Scalars("site/bank/epsilon")] == [0.0, 1.5, 3.0]


@pytest.fixture
def distributed_store(tmp_path: Path) -> Path:
    """A distributed-noise run: bank reports both epsilons; clinic (an older site build) the charged one only."""
    path = tmp_path / "distributed.sqlite"
    with RunStore(path) as store:
        store.create_run(
            "dist00run",
            name="bank-intents",
            federation_json='{"name": "bank-intents", "training": {"rounds": 2, "local_steps": 2}, '
            '"secagg": {"enabled": true}, "privacy": {"noise": "distributed"}}',
            rounds_total=2,
            fingerprint="",
            out_dir=tmp_path,
        )
        for r in range(3):
            report = _round(r)
            if report.update is not None:
                report.update.sites[101].epsilon_worst = 4.25 * r
            store.record_round("dist00run", report, names=NODES, attempt=1)
    return path


def test_both_epsilons_of_a_distributed_run(distributed_store: Path, client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    dist = TestClient(create_app(distributed_store, TOKEN))
    view = dist.get("/api/runs/dist00run", headers=auth).json()
    privacy = {p["site"]: p for p in view["privacy"]}
    # over rounds: the own-share epsilon beside the charged one, where the site reported it, and on the axis
    assert view["charts"]["epsilon_worst"] == {"bank": [[1, 4.25], [2, 8.5]]}
    assert [p["epsilon_worst"] for p in view["privacy_rounds"] if p["site"] == "bank"] == [None, 4.25, 8.5]
    assert view["axes"]["epsilon"]["max"] >= 8.5
    rows = list(csv.DictReader(io.StringIO(dist.get("/api/runs/dist00run/rounds.csv", headers=auth).text)))
    assert [r["epsilon_worst"] for r in rows if r["site"] == "bank"] == ["", "4.25", "8.5"]
    assert privacy["bank"]["epsilon"] == 3.0 and privacy["bank"]["epsilon_worst"] == 8.5
    assert privacy["clinic"]["epsilon_worst"] is None
    local = {p["site"]: p for p in client.get("/api/runs/abc123def456", headers=auth).json()["privacy"]}
    assert local["bank"]["epsilon_worst"] is None  # a local-noise run reports none
    page = dist.get(f"/runs/dist00run?token={TOKEN}").text
    assert '<th class="eps-worst" hidden>own share alone</th>' in page and 'id="eps-note"' in page

    shown = CliRunner().invoke(
        cli_app, ["runs", "show", "dist00", "--store", str(distributed_store)], env={"COLUMNS": "250"}
    )
    assert shown.exit_code == 0, shown.output
    assert "distributed noise" in shown.output and "epsilon own share alone" in shown.output
    bank = next(line for line in shown.output.splitlines() if line.startswith("│ bank "))
    cells = [c.strip() for c in bank.split("│")[1:-1]]
    assert cells[:4] == ["bank", "3.00", "8.50", "8.00"]  # charged, own share alone, cap
    clinic = next(line for line in shown.output.splitlines() if line.startswith("│ clinic "))
    assert [c.strip() for c in clinic.split("│")[1:-1]][:3] == ["clinic", "3.00", "-"]
    assert "min_honest_sites" in " ".join(shown.output.split())


def test_tensorboard_events_carry_the_worst_epsilon(distributed_store: Path, store_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="TensorBoard export is optional: `pip install tensorboard`")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run, path in (("dist00run", distributed_store), ("abc123def456", store_path)):
        result = CliRunner().invoke(cli_app, ["runs", "tensorboard", run, str(tmp_path / "tb"), "--store", str(path)])
        assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "tb" / "dist00run"))
    events.Reload()
    assert [e.value for e in events.Scalars("site/bank/epsilon_worst")] == [4.25, 8.5]
    assert "site/clinic/epsilon_worst" not in events.Tags()["scalars"]
    local = EventAccumulator(str(tmp_path / "tb" / "abc123def456"))
    local.Reload()
    assert not [t for t in local.Tags()["scalars"] if t.endswith("epsilon_worst")]


# -- the token out of links ------------------------------------------------------------------------------------


class _Links(HTMLParser):
    """Every URL-bearing attribute of a page: where a token would leak from (history, Referer, copied links)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v or "" for k, v in attrs if k in ("href", "src", "action", "formaction", "content")]


def _urls(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.urls


def test_first_visit_sets_a_strict_httponly_cookie_and_drops_the_token(client: TestClient) -> None:
    first = client.get(f"/runs/abc123def456?token={TOKEN}&view=privacy", follow_redirects=False)
    assert first.status_code == 303
    assert first.headers["location"] == "/runs/abc123def456?view=privacy"  # the token gone, the rest kept
    cookie = first.headers["set-cookie"]
    attrs = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")}
    assert "httponly" in attrs and attrs["samesite"].lower() == "samesite=strict" and attrs["path"] == "Path=/"
    assert "secure" not in attrs  # plain HTTP on loopback; over HTTPS it is set (below)
    assert TOKEN not in cookie  # the cookie is a signed session, never the token itself
    assert first.headers["referrer-policy"] == "no-referrer" and first.headers["cache-control"] == "no-store"

    for url in ("/runs/abc123def456", "/"):
        page = client.get(url)  # the cookie alone
        assert page.status_code == 200
        assert TOKEN not in page.text
        urls = _urls(page.text)
        assert urls and not [u for u in urls if "token" in u], urls
        nonce = page.headers["content-security-policy"].split("'nonce-", 1)[1].split("'", 1)[0]
        assert page.text.count(f"nonce='{nonce}'") == page.text.count("<script") + page.text.count("<style")
    run_page = client.get("/runs/abc123def456").text
    assert "href='/api/runs/abc123def456/rounds.csv'" in run_page.replace('"', "'")
    # what the page's script fetches and links to works on the cookie alone
    assert client.get("/api/runs/abc123def456").status_code == 200
    assert client.get("/api/runs/abc123def456/rounds.csv").status_code == 200
    assert "token" not in (Path(__file__).parents[1] / "server/console/static/console.js").read_text().replace(
        "The token is never", ""
    )


def test_secure_cookie_over_https(store_path: Path) -> None:
    https = TestClient(create_app(store_path, TOKEN), base_url="https://console.bank.example")
    first = https.get(f"/?token={TOKEN}", follow_redirects=False)
    assert first.status_code == 303 and "secure" in first.headers["set-cookie"].lower()


def test_wrong_tokens_and_forged_cookies_are_refused(store_path: Path) -> None:
    client = TestClient(create_app(store_path, TOKEN))
    wrong = client.get("/runs/abc123def456?token=wrong-token-0123456789", follow_redirects=False)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    name = COOKIE_PREFIX  # the test client's origin has no port
    now = time.time()
    forged = {
        "the token itself": TOKEN,
        "garbage": "12345.deadbeef",
        "another console's": Sessions("another-token-0123456789abc").issue(),
        "expired": Sessions(TOKEN, clock=lambda: now - SESSION_TTL_S - 5).issue(),
        "from the future": Sessions(TOKEN, clock=lambda: now + 3600).issue(),
    }
    for what, value in forged.items():
        probe = TestClient(create_app(store_path, TOKEN), cookies={name: value})
        assert probe.get("/api/runs").status_code == 401, what
    good = TestClient(create_app(store_path, TOKEN), cookies={name: Sessions(TOKEN).issue()})
    assert good.get("/api/runs").status_code == 200
    # a wrong token is refused even when a good cookie rides along: it never looks accepted
    assert good.get("/api/runs", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}).status_code == 401
    assert good.get("/api/runs?token=wrong-token-xxxxxxxx").status_code == 401


def test_bearer_and_query_still_serve_scripts_and_healthz_stays_open(client: TestClient) -> None:
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get(f"/api/runs/abc123def456/rounds.csv?token={TOKEN}").status_code == 200  # curl-style
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    page = client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert page.status_code == 200 and "set-cookie" not in page.headers  # a script gets no session
    assert client.get("/healthz").status_code == 200
    assert "set-cookie" not in client.get("/healthz").headers


def test_login_form_signs_in_without_a_token_in_any_url(client: TestClient) -> None:
    browser = {"Accept": "text/html,application/xhtml+xml"}
    bounced = client.get("/runs/abc123def456", headers=browser)
    assert bounced.status_code == 401 and '<form method="post" action="/login">' in bounced.text
    assert 'name="next" value="/runs/abc123def456"' in bounced.text
    assert "content-security-policy" in bounced.headers
    assert client.get("/login").status_code == 200  # open: it is how one gets in

    refused = client.post(
        "/login", data={"token": "wrong-token-0123456789", "next": "/runs/abc123def456"}, follow_redirects=False
    )
    assert refused.status_code == 401 and "set-cookie" not in refused.headers and "not this console" in refused.text
    assert client.get("/api/runs").status_code == 401
    huge = client.post("/login", data={"token": TOKEN, "pad": "x" * 10_000}, follow_redirects=False)
    assert huge.status_code == 401  # an open route reads a few KiB at most

    signed = client.post("/login", data={"token": TOKEN, "next": "/runs/abc123def456"}, follow_redirects=False)
    assert signed.status_code == 303 and signed.headers["location"] == "/runs/abc123def456"
    assert "httponly" in signed.headers["set-cookie"].lower()
    assert client.get("/api/runs").status_code == 200
    for hostile in ("//evil.example/x", "https://evil.example", "/\\evil.example", "javascript:alert(1)"):
        again = client.post("/login", data={"token": TOKEN, "next": hostile}, follow_redirects=False)
        assert again.headers["location"] == "/", hostile


# -- recipe, epsilon over rounds, fitted axes, CSV ---------------------------------------------------------------


@pytest.fixture
def bank(tmp_path: Path) -> tuple[Path, TestClient]:
    path = write_bank_store(tmp_path / "bank.sqlite")
    return path, TestClient(create_app(path, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})


def test_recipe_shows_the_stored_spec_in_sections(bank: tuple[Path, TestClient]) -> None:
    _, client = bank
    recipe = client.get(f"/api/runs/{RUN}/recipe").json()
    assert recipe["federation"] == json.loads(bank_spec().model_dump_json())
    rows = {s["id"]: {r["label"]: r["value"] for r in s["rows"]} for s in recipe["sections"]}
    assert [s["title"] for s in recipe["sections"]] == [
        "Task",
        "Base model",
        "LoRA",
        "Training schedule",
        "Privacy",
        "Secure aggregation",
    ]
    assert rows["task"]["kind"] == "classification" and rows["task"]["labels"].startswith("15: intent_0, intent_1")
    assert rows["task"]["labels"].endswith("... and 3 more")
    assert rows["base-model"]["path"] == "/srv/models/minilm"
    assert rows["base-model"]["fingerprint (SHA-256 of the weights)"] == FINGERPRINT
    assert rows["lora"]["rank r"] == "4" and rows["lora"]["layers"] == "top 2"
    assert rows["lora"]["target modules"] == "query, value, dense" and rows["lora"]["factors"].startswith("b (FFA")
    assert rows["training"]["rounds"] == "2 (2 head-only, then 0 LoRA)"
    assert rows["training"]["DP-SGD steps per site per round"] == "12"
    assert rows["training"]["batch size (expected, Poisson)"] == "32"
    assert rows["training"]["learning rate"] == "0.05"
    assert rows["privacy"]["noise"].startswith("local (")
    assert rows["privacy"]["delta"] == "1e-06" and rows["privacy"]["accountant"].startswith("rdp")
    assert rows["privacy"]["clipping norm (per example)"] == "0.8"
    assert rows["privacy"]["default epsilon cap"].startswith("6 ")
    assert rows["privacy"]["noise multiplier sigma"].startswith("chosen by each site")
    assert rows["secagg"]["enabled"].startswith("yes") and rows["secagg"]["weighting"].startswith("examples")

    page = client.get(f"/runs/{RUN}").text
    for section in ("task", "base-model", "lora", "training", "privacy", "secagg"):
        assert f"id='recipe-{section}'" in page
    assert "<th>rank r</th><td>4</td>" in page and "<th>layers</th><td>top 2</td>" in page
    assert "<details id='recipe-raw'>" in page and "&quot;target_modules&quot;" in page  # raw JSON, escaped


def test_recipe_of_an_older_partial_spec_says_what_is_missing(client: TestClient) -> None:
    recipe = client.get("/api/runs/abc123def456/recipe", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    rows = {s["id"]: {r["label"]: r["value"] for r in s["rows"]} for s in recipe["sections"]}
    assert rows["lora"]["rank r"] == "not recorded"  # never this version's default passed off as the run's
    assert rows["training"]["DP-SGD steps per site per round"] == "2"
    assert rows["base-model"]["fingerprint (SHA-256 of the weights)"].startswith("not pinned")


def test_epsilon_and_sigma_over_rounds_are_the_stores(bank: tuple[Path, TestClient]) -> None:
    path, client = bank
    view = client.get(f"/api/runs/{RUN}").json()
    with RunStore(path, readonly=True) as store:
        stored = store.site_rounds(RUN)
    assert [(p["round"], p["site"]) for p in view["privacy_rounds"]] == [(s["round"], s["site"]) for s in stored]
    for p, s in zip(view["privacy_rounds"], stored, strict=True):
        assert (p["epsilon"], p["cap"], p["sigma"], p["epsilon_worst"]) == (
            s["epsilon"],
            s["epsilon_cap"],
            s["noise_multiplier"],
            s["epsilon_worst"],
        )
    by = {(p["round"], p["site"]): p for p in view["privacy_rounds"]}
    assert by[(1, "lender")]["sigma"] == SIGMA["lender"] and by[(1, "lender")]["cap"] == CAPS["lender"]
    assert by[(0, "lender")]["sigma"] is None  # round 0 only scores: no DP step, no sigma invented
    assert by[(2, "branch")]["status"] == "declined" and by[(2, "branch")]["sigma"] is None
    assert view["charts"]["epsilon"]["lender"] == [[0, 0.0], [1, 1.5], [2, 3.0]]
    assert view["charts"]["epsilon_worst"] == {}  # local noise: no own-share figure
    eps_axis = view["axes"]["epsilon"]
    assert eps_axis["min"] == 0 and eps_axis["max"] >= max(CAPS.values()) and eps_axis["label"] == "epsilon spent"


def test_accuracy_axis_fits_the_data(bank: tuple[Path, TestClient], client: TestClient) -> None:
    _, bank_client = bank
    axis = bank_client.get(f"/api/runs/{RUN}").json()["axes"]["accuracy"]
    assert axis["label"] == "held-out accuracy"
    assert 0.8 <= axis["min"] < 0.88 and 0.92 < axis["max"] <= 0.95  # 0.88 -> 0.92 fills the chart, not 4% of it
    assert (0.92 - 0.88) / (axis["max"] - axis["min"]) > 0.4
    ticks = round((axis["max"] - axis["min"]) / axis["step"])
    labels = [f"{axis['min'] + i * axis['step']:.{axis['digits']}f}" for i in range(ticks + 1)]
    assert len(set(labels)) == len(labels)  # every tick prints distinctly
    wide = client.get("/api/runs/abc123def456", headers={"Authorization": f"Bearer {TOKEN}"}).json()["axes"]
    assert wide["accuracy"]["min"] >= 0 and wide["accuracy"]["max"] <= 1  # never past what accuracy can be
    assert wide["loss"]["min"] >= 0


@pytest.mark.parametrize(
    ("values", "floor", "ceil"),
    [
        ([0.88, 0.92], 0.0, 1.0),
        ([0.999, 1.0], 0.0, 1.0),
        ([0.0, 0.01], 0.0, 1.0),
        ([], 0.0, 1.0),
        ([3.0, 250.0], 0.0, None),
    ],
)
def test_fitted_axis_contains_its_data_within_bounds(values: list[float], floor: float, ceil: float | None) -> None:
    axis = fitted_axis(values, "y", floor=floor, ceil=ceil, min_span=0.02)
    assert axis["min"] >= floor and (ceil is None or axis["max"] <= ceil)
    assert all(axis["min"] <= v <= axis["max"] for v in values)
    assert axis["max"] > axis["min"]
    steps = (axis["max"] - axis["min"]) / axis["step"]
    assert abs(steps - round(steps)) < 1e-6 and 2 <= round(steps) <= 8


def test_csv_export_is_the_store_row_for_row(bank: tuple[Path, TestClient]) -> None:
    path, client = bank
    response = client.get(f"/api/runs/{RUN}/rounds.csv")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"] == f'attachment; filename="fedtune-{RUN}-rounds.csv"'
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == list(COLUMNS)
    with RunStore(path, readonly=True) as store:
        stored = store.site_rounds(RUN)
        status = {r["round"]: r["status"] for r in store.rounds(RUN)}

    def num(text: str) -> float | None:
        return None if text == "" else float(text)

    assert len(rows) == len(stored) == 6
    for row, s in zip(rows, stored, strict=True):
        assert (int(row["round"]), row["site"], row["run"]) == (s["round"], s["site"], RUN)
        assert row["round_status"] == status[s["round"]] == "completed"
        assert num(row["accuracy"]) == s["eval_accuracy"] and num(row["loss"]) == s["eval_loss"]
        assert num(row["epsilon"]) == s["epsilon"] and num(row["epsilon_cap"]) == s["epsilon_cap"]
        assert num(row["noise_multiplier"]) == s["noise_multiplier"] and num(row["epsilon_worst"]) is None
        assert int(row["bytes_up"]) == s["bytes_up"] and int(row["bytes_down"]) == s["bytes_down"]
        assert row["failed"] == ""
    by = {(int(r["round"]), r["site"]): r for r in rows}
    assert [by[(r, "lender")]["site_status"] for r in range(3)] == ["eval-only", "trained", "trained"]
    assert by[(2, "branch")]["site_status"] == "declined"
    assert by[(2, "branch")]["declined"] == "'" + HOSTILE  # defused: a spreadsheet shows it, never runs it
    assert by[(1, "lender")]["accuracy"] == "0.9"  # the store's value, not a rounded one
