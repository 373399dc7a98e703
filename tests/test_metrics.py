"""Prometheus `/metrics` and `/healthz`: the console's from the run store, the site agent's from its own files.

Every figure is checked against what the store, the console's view or the ledger says, through the text a real
scraper parses (`prometheus_client.parser`), so a renamed column or a dropped label fails here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from fedtune.client.audit import EgressLog, egress_path
from fedtune.client.ledger import PrivacyLedger
from fedtune.client.metrics_endpoint import MetricsEndpoint
from fedtune.client.site_metrics import ledger_path, site_health, site_registry
from fedtune.server.aggregation import RoundUpdate, SiteTrain
from fedtune.server.console.app import create_app
from fedtune.server.console.views import run_view
from fedtune.server.federation import RoundReport, SiteEval
from fedtune.server.store import RunStore

TOKEN = "metrics-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NODES = {101: "bank", 202: "clinic"}
RUN, OTHER = "abc123def456", "fff000run"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    """(sample name, sorted labels) -> value, from Prometheus text as a scraper reads it."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(samples: Samples, metric: str, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


def _has(samples: Samples, metric: str) -> bool:
    return any(key[0] == metric for key in samples)


# -- the console ------------------------------------------------------------------------------------------


def _round(round_: int, *, clinic_fails: bool = False) -> RoundReport:
    """Round 0 is the baseline; in round 2 clinic declines at its cap; `clinic_fails`: clinic never answers."""
    report = RoundReport(round=round_, sampled=2, wall_s=2.0)
    report.evals = {
        n: SiteEval(name, 20, 2.0 - 0.2 * round_, 0.2 + 0.2 * round_, 1.5 * round_)
        for n, name in NODES.items()
        if not (clinic_fails and name == "clinic")
    }
    report.bytes_down = dict.fromkeys(NODES, 4096)
    if round_:
        sites = {101: SiteTrain("bank", 80, 1.5 * round_, 8.0, 1.2, 2048)}
        if round_ == 2:
            sites[202] = SiteTrain("clinic", 0, 3.0, 0.0, 0.0, 64, declined="site clinic: epsilon cap 3.0 reached")
        elif not clinic_fails:
            sites[202] = SiteTrain("clinic", 80, 1.5 * round_, 3.0, 1.4, 2048)
        report.update = RoundUpdate(mean_delta=None, sites=sites)
        if clinic_fails:
            report.update.failed[202] = "no reply within the round timeout"
    return report


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """Run RUN: baseline and two rounds completed, round 3 running. Then run OTHER, whose round 1 clinic missed."""
    path = tmp_path / "store.sqlite"
    with RunStore(path) as store:
        for run, total in ((RUN, 3), (OTHER, 5)):
            store.create_run(
                run,
                name="bank-intents",
                federation_json='{"name": "bank-intents", "training": {"rounds": 3}, "secagg": {"enabled": true}}',
                rounds_total=total,
                fingerprint="",
                out_dir=tmp_path,
            )
        for r in range(3):
            store.record_round(RUN, _round(r), names=NODES, attempt=1, train_s=1.25 * r, eval_s=0.5)
        store.round_started(RUN, 3, 1)
        store.record_round(OTHER, _round(0), names=NODES, attempt=1)
        store.record_round(OTHER, _round(1, clinic_fails=True), names=NODES, attempt=1)
    return path


@pytest.fixture
def client(store_path: Path) -> TestClient:
    return TestClient(create_app(store_path, TOKEN))


def test_metrics_match_the_store_and_the_console(client: TestClient, store_path: Path) -> None:
    scraped = client.get("/metrics", headers=AUTH)
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = _samples(scraped.text)
    assert _get(m, "fedtune_store_up") == 1
    with RunStore(store_path, readonly=True) as store:
        view = run_view(store, RUN)
        rounds = {r["round"]: r for r in store.rounds(RUN)}
        runs = {r["id"]: r for r in store.runs()}

    assert _get(m, "fedtune_run_info", run=RUN, name="bank-intents", status="running") == 1
    assert _get(m, "fedtune_run_rounds_planned", run=RUN) == 3
    assert _get(m, "fedtune_run_rounds_completed", run=RUN) == runs[RUN]["rounds_done"] == 2  # as `fedtune runs`
    assert _get(m, "fedtune_run_rounds_failed", run=RUN) == 0
    assert _get(m, "fedtune_run_attempts", run=RUN) == 1
    assert _get(m, "fedtune_run_last_round", run=RUN) == 2  # round 3 is still running
    assert _get(m, "fedtune_run_last_completed_round_timestamp_seconds", run=RUN) == rounds[2]["finished"]
    assert 0 <= _get(m, "fedtune_run_seconds_since_last_completed_round", run=RUN) < 60
    assert _get(m, "fedtune_run_weighted_accuracy", run=RUN) == pytest.approx(view["timeline"][2]["accuracy"])
    assert _get(m, "fedtune_run_weighted_loss", run=RUN) == pytest.approx(view["timeline"][2]["loss"])
    assert _get(m, "fedtune_run_scored_round", run=RUN) == 2
    assert _get(m, "fedtune_run_last_round_duration_seconds", run=RUN, stage="train") == 2.5
    assert _get(m, "fedtune_run_last_round_duration_seconds", run=RUN, stage="wall") == 2.0

    last_bytes = view["bytes"][-1]  # the console's bytes chart, round 2
    assert _get(m, "fedtune_run_last_round_bytes", run=RUN, direction="up") == last_bytes["up"] == 2048 + 64
    assert _get(m, "fedtune_run_last_round_bytes", run=RUN, direction="down") == last_bytes["down"] == 2 * 4096
    assert _get(m, "fedtune_run_last_round_sites", run=RUN, outcome="trained") == 1
    assert _get(m, "fedtune_run_last_round_sites", run=RUN, outcome="declined") == 1
    assert _get(m, "fedtune_run_last_round_sites", run=RUN, outcome="failed") == 0

    for p in view["privacy"]:  # epsilon per site, its cap, rounds trained and declined: the console's figures
        site = p["site"]
        assert _get(m, "fedtune_site_epsilon_spent", run=RUN, site=site) == p["epsilon"]
        assert _get(m, "fedtune_site_epsilon_cap", run=RUN, site=site) == p["cap"]
        assert _get(m, "fedtune_site_rounds_trained", run=RUN, site=site) == p["trained"]
        assert _get(m, "fedtune_site_rounds_declined", run=RUN, site=site) == p["declined"]
    assert _get(m, "fedtune_site_epsilon_spent", run=RUN, site="bank") == 3.0
    assert _get(m, "fedtune_site_epsilon_cap", run=RUN, site="clinic") == 3.0
    assert _get(m, "fedtune_site_rounds_declined", run=RUN, site="clinic") == 1
    assert not _has(m, "fedtune_site_epsilon_own_share")  # a local-noise run has no second epsilon

    # the second run: clinic failed its round 1, so the sites registry now says unreachable
    assert _get(m, "fedtune_run_rounds_completed", run=OTHER) == 1
    assert _get(m, "fedtune_run_rounds_planned", run=OTHER) == 5
    assert _get(m, "fedtune_run_last_round_sites", run=OTHER, outcome="failed") == 1
    assert _get(m, "fedtune_run_last_round_sites", run=OTHER, outcome="trained") == 1
    assert _get(m, "fedtune_site_status", site="clinic", fedtune_site_status="unreachable") == 1
    assert _get(m, "fedtune_site_status", site="clinic", fedtune_site_status="declined") == 0
    assert _get(m, "fedtune_site_status", site="bank", fedtune_site_status="trained") == 1
    assert _get(m, "fedtune_site_last_seen_timestamp_seconds", site="bank") > 0
    assert not any(
        "epsilon cap 3.0 reached" in str(labels) or "timeout" in str(labels) for _, labels in m
    )  # free-text reasons stay out of the labels


def test_metrics_take_the_console_token(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}).status_code == 401
    assert client.get("/metrics?token=wrong").status_code == 401
    assert client.get(f"/metrics?token={TOKEN}").status_code == 200  # Prometheus `params: {token: [...]}`
    assert client.get("/", headers=AUTH).status_code == 200  # the pages still sit behind the same check
    assert client.get("/").status_code == 401


def test_metrics_speak_openmetrics_when_asked(client: TestClient) -> None:
    scraped = client.get("/metrics", headers={**AUTH, "Accept": "application/openmetrics-text; version=1.0.0"})
    assert scraped.headers["content-type"].startswith("application/openmetrics-text")
    assert scraped.text.rstrip().endswith("# EOF")


def test_healthz_is_open_and_reports_the_store(client: TestClient, store_path: Path) -> None:
    healthy = client.get("/healthz")  # no token: probes send none
    assert healthy.status_code == 200
    body = healthy.json()
    with RunStore(store_path, readonly=True) as store:
        newest = max(r["finished"] for run in (RUN, OTHER) for r in store.rounds(run) if r["status"] == "completed")
    assert body == {"status": "ok", "store": "readable", "runs": 2, "last_round_completed": newest}


@pytest.mark.parametrize("damage", ["missing", "not-sqlite", "other-schema"])
def test_healthz_503_and_metrics_down_on_an_unreadable_store(tmp_path: Path, damage: str) -> None:
    import sqlite3

    path = tmp_path / "secret-folder" / "store.sqlite"
    path.parent.mkdir()
    if damage == "not-sqlite":
        path.write_bytes(b"this is not a database, just bytes " * 200)
    elif damage == "other-schema":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    client = TestClient(create_app(path, TOKEN))
    sick = client.get("/healthz")
    assert sick.status_code == 503
    body = sick.json()
    assert body["status"] == "unavailable" and body["store"] == "unreadable"
    assert "store.sqlite" in body["reason"] and "secret-folder" not in body["reason"]  # no path for anonymous callers
    scraped = client.get("/metrics", headers=AUTH)
    assert scraped.status_code == 200  # the exporter answers; the store is what is down
    m = _samples(scraped.text)
    assert _get(m, "fedtune_store_up") == 0 and not _has(m, "fedtune_run_rounds_planned")
    assert not path.with_name("store.sqlite-wal").exists() and (damage != "missing" or not path.exists())


def test_distributed_noise_exports_the_own_share_epsilon(tmp_path: Path) -> None:
    path = tmp_path / "dist.sqlite"
    with RunStore(path) as store:
        store.create_run("dist00run", name="d", federation_json="{}", rounds_total=1, fingerprint="", out_dir=tmp_path)
        report = _round(1)
        assert report.update is not None
        report.update.sites[101].epsilon_worst = 4.25
        store.record_round("dist00run", report, names=NODES, attempt=1)
    m = _samples(TestClient(create_app(path, TOKEN)).get("/metrics", headers=AUTH).text)
    assert _get(m, "fedtune_site_epsilon_own_share", run="dist00run", site="bank") == 4.25
    assert ("fedtune_site_epsilon_own_share", (("run", "dist00run"), ("site", "clinic"))) not in m


# -- the site agent ---------------------------------------------------------------------------------------


def _log(log: EgressLog, run: str, round_: int, *, delivered: bool, spend: bool) -> int:
    """One reply (a metrics record and a key record); returns its bytes. Undelivered: prepared, never taken."""
    mark = log.mark()
    entries = log.record(
        run=run,
        round_=round_,
        kinds={"metrics": "metrics", "keys": "public-keys"},
        content=RecordDict({"metrics": MetricRecord({"epsilon": 0.5}), "keys": ConfigRecord({"pk": b"x" * 32})}),
        delivered=False,
        spend=spend,
    )
    if delivered:
        log.confirm(since=mark)
    return sum(e.bytes for e in entries)


@pytest.fixture
def site_state(tmp_path: Path) -> Path:
    """A site that trained run-a round 1 (a committed spend), declined run-b round 1 and sent one reply."""
    state = tmp_path / "state"
    with PrivacyLedger(ledger_path(state)) as ledger:
        ledger.record_spend(
            "ds-bank", run_id="run-a", round_=1, noise_multiplier=1.1, sample_rate=0.3, steps=3, delta=1e-5,
            accountant="rdp",
        )  # fmt: skip
        ledger.record_decline("ds-bank", run_id="run-b", round_=1, reason="epsilon cap 3.0 reached")
    log = EgressLog(egress_path(state))
    _log(log, "run-a", 1, delivered=True, spend=True)
    _log(log, "run-a", 2, delivered=False, spend=False)
    return state


def _scrape(registry: CollectorRegistry) -> Samples:
    return _samples(generate_latest(registry).decode())


def test_site_metrics_are_what_the_ledger_and_the_log_say(site_state: Path) -> None:
    alive = {"supernode": True, "worker": False}
    m = _scrape(site_registry(site_state, epsilon_cap=8.0, processes=lambda: alive))
    with PrivacyLedger(ledger_path(site_state)) as ledger:
        (entry,) = ledger.entries()
        declines = ledger.declines()
    sent = [e for e in EgressLog(egress_path(site_state)).entries() if e.delivered]
    assert _get(m, "fedtune_agent_ledger_ok") == 1
    assert _get(m, "fedtune_agent_epsilon_spent", dataset=entry.dataset) == entry.epsilon_after > 0
    assert _get(m, "fedtune_agent_epsilon_cap") == 8.0
    assert _get(m, "fedtune_agent_rounds_trained_total", dataset=entry.dataset) == 1
    assert _get(m, "fedtune_agent_rounds_declined_total") == len(declines) == 1
    for kind in ("metrics", "public-keys"):  # only the delivered reply: round 2's never left
        assert _get(m, "fedtune_agent_egress_bytes_total", kind=kind) == sum(e.bytes for e in sent if e.kind == kind)
    assert _get(m, "fedtune_agent_egress_log_ok") == 1
    newest = max(entry.created, declines[-1][3], *(e.time for e in sent))
    assert _get(m, "fedtune_agent_last_activity_timestamp_seconds") == newest
    assert _get(m, "fedtune_agent_process_up", process="supernode") == 1
    assert _get(m, "fedtune_agent_process_up", process="worker") == 0
    assert not any("cap" in str(labels) for _, labels in m)  # the decline's text is not a label

    code, body = site_health(site_state, lambda: alive)
    assert code == 503 and body["ledger"] == "ok" and body["problems"] == ["worker is not running"]
    alive["worker"] = True
    assert site_health(site_state, lambda: alive) == (
        200,
        {"status": "ok", "processes": {"supernode": True, "worker": True}, "ledger": "ok"},
    )


def test_a_ledger_that_fails_closed_is_a_health_failure_and_no_epsilon(site_state: Path) -> None:
    for suffix in ("", "-wal", "-shm"):  # the ledger is lost; its high-water mark remembers the spend
        Path(f"{ledger_path(site_state)}{suffix}").unlink(missing_ok=True)
    m = _scrape(site_registry(site_state, epsilon_cap=None, processes=None))
    assert _get(m, "fedtune_agent_ledger_ok") == 0
    assert not _has(m, "fedtune_agent_epsilon_spent") and not _has(m, "fedtune_agent_epsilon_cap")
    assert _get(m, "fedtune_agent_egress_bytes_total", kind="metrics") > 0  # the log still reads
    code, body = site_health(site_state, lambda: {"supernode": True, "worker": True})
    assert code == 503 and body["ledger"] == "refused"
    assert "trained before" in body["problems"][0] and "ledger restore" in body["problems"][0]
    assert not ledger_path(site_state).exists()  # a scrape never starts a fresh ledger over a lost one


def test_a_site_that_never_trained_is_healthy_and_writes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    state.mkdir()
    m = _scrape(site_registry(state, epsilon_cap=8.0, processes=None))
    assert _get(m, "fedtune_agent_ledger_ok") == 1 and _get(m, "fedtune_agent_rounds_declined_total") == 0
    assert not _has(m, "fedtune_agent_last_activity_timestamp_seconds")
    assert site_health(state, lambda: {"supernode": True, "worker": True})[0] == 200
    assert sorted(p.name for p in state.iterdir()) == []


def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_site_endpoint_serves_both_routes_and_stops(site_state: Path) -> None:
    alive = {"supernode": True, "worker": True}

    def health() -> tuple[int, dict]:
        return site_health(site_state, lambda: alive)

    endpoint = MetricsEndpoint("127.0.0.1", 0, site_registry(site_state, epsilon_cap=8.0, processes=None), health)
    base = f"http://127.0.0.1:{endpoint.port}"
    with endpoint:
        code, text = _http(base + "/metrics")
        assert code == 200 and _get(_samples(text), "fedtune_agent_rounds_declined_total") == 1
        code, text = _http(base + "/healthz")
        assert code == 200 and json.loads(text)["status"] == "ok"
        alive["worker"] = False
        code, text = _http(base + "/healthz")
        assert code == 503 and json.loads(text)["problems"] == ["worker is not running"]
        assert _http(base + "/nothing")[0] == 404
        assert _http(f"http://localhost:{endpoint.port}/metrics")[0] == 200
        rebound = urllib.request.Request(base + "/metrics", headers={"Host": f"attacker.example:{endpoint.port}"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # DNS rebinding: a foreign page's name, our address
            urllib.request.urlopen(rebound, timeout=5)
        assert refused.value.code == 421
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", endpoint.port), timeout=1):
        pass  # stopped: the port is closed


AGENT = """
import sys, time
from pathlib import Path
import fedtune.client.agent as agent
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
agent.worker_command = lambda state_dir: sleeper
agent.wait_ready = lambda path, timeout, alive: None  # no model to load: the children only have to run
metrics = agent.MetricsOptions(int(sys.argv[2]), epsilon_cap=3.0)
sys.exit(agent.run_site_agent(Path(sys.argv[1]), sleeper, metrics=metrics))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_agent_serves_metrics_while_it_runs_and_closes_them_with_itself(site_state: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", AGENT, str(site_state), str(port)], env=env)
    try:
        deadline, code, text = time.monotonic() + 60, 0, ""
        while time.monotonic() < deadline and code != 200:
            assert proc.poll() is None, "the agent exited"
            try:
                code, text = _http(f"http://127.0.0.1:{port}/healthz")
            except OSError:
                time.sleep(0.2)
        assert code == 200, text
        assert json.loads(text)["processes"] == {"supernode": True, "worker": True}
        m = _samples(_http(f"http://127.0.0.1:{port}/metrics")[1])
        assert _get(m, "fedtune_agent_process_up", process="worker") == 1
        assert _get(m, "fedtune_agent_epsilon_cap") == 3.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_agent_refuses_a_taken_metrics_port_before_starting_anything(
    site_state: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fedtune.client.agent as agent

    started: list[list[str]] = []
    monkeypatch.setattr(agent, "ManagedProcess", lambda cmd, *a, **k: started.append(cmd))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = agent.run_site_agent(site_state, ["flower-supernode"], metrics=agent.MetricsOptions(port))
    assert code == 2 and started == []
    err = capsys.readouterr().err
    assert f"--metrics-port {port}" in err and len(err.strip().splitlines()) == 1


def test_start_takes_metrics_options_and_warns_off_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from fedtune.client import cli

    monkeypatch.setattr(cli.err_console, "width", 250)
    runner = CliRunner()
    assert runner.invoke(cli.app, ["init", str(tmp_path / "bank"), "--name", "bank"]).exit_code == 0
    start = ["start", str(tmp_path / "bank" / "site.toml"), "--superlink", "127.0.0.1:9093", "--insecure", "--dry-run"]
    local = runner.invoke(cli.app, [*start, "--metrics-port", "9464"])
    assert local.exit_code == 0 and "not loopback" not in local.output
    exposed = runner.invoke(cli.app, [*start, "--metrics-port", "9464", "--metrics-host", "0.0.0.0"])
    assert exposed.exit_code == 0 and "--metrics-host 0.0.0.0 is not loopback" in exposed.output
    assert runner.invoke(cli.app, [*start, "--metrics-port", "70000"]).exit_code == 2
