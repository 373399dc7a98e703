"""The console's HTTP surface and the `fedtune runs` tables, on a store written like a real run's."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fedtune.cli import app as cli_app
from fedtune.common.adapter import save_state
from fedtune.server.aggregation import RoundUpdate, SiteTrain
from fedtune.server.console.app import create_app
from fedtune.server.console.auth import resolve_token
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
    "url", ["/", "/api/runs", "/runs/abc123def456", "/api/runs/abc123def456", "/api/runs/abc/checkpoints/1/adapter.zip"]
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


def test_pages_render_with_query_token(client: TestClient) -> None:
    page = client.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and "abc123def456" in page.text
    assert f"/runs/abc123def456?token={TOKEN}" in page.text
    run = client.get(f"/runs/abc123def456?token={TOKEN}")
    assert run.status_code == 200
    for element in ("chart-accuracy", "chart-loss", "chart-bytes", "eps-table", "health-table", "checkpoint-table"):
        assert f'id="{element}"' in run.text
    assert "<script>" in run.text and "http" not in run.text.split("<script>", 1)[1].replace(
        "http://www.w3.org/2000/svg", ""
    )  # no CDN: the page loads nothing from anywhere else


def test_console_without_store_yet(tmp_path: Path) -> None:
    client = TestClient(create_app(tmp_path / "later.sqlite", TOKEN))
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).json() == []
    assert "No runs" in client.get(f"/?token={TOKEN}").text


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
    privacy = {p["site"]: p for p in dist.get("/api/runs/dist00run", headers=auth).json()["privacy"]}
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
