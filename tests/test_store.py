"""The run store: what the federation writes comes back intact, and resume points are exact."""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from fedtune.common.adapter import save_state
from fedtune.server.aggregation import RoundUpdate, SiteTrain
from fedtune.server.console.views import privacy_table, run_view
from fedtune.server.federation import RoundReport, SiteEval
from fedtune.server.store import CheckpointError, RunStore, StoreError

NODE_A, NODE_B = 2**64 - 5, 17  # Flower node ids are unsigned 64-bit


def _report(round_: int, *, decline_b: bool = False, error: str | None = None) -> RoundReport:
    report = RoundReport(round=round_, sampled=2, wall_s=1.5)
    report.evals = {
        NODE_A: SiteEval("bank", 10, 1.0 - 0.1 * round_, 0.5 + 0.1 * round_, 1.0 * round_),
        NODE_B: SiteEval("clinic", 30, 2.0 - 0.1 * round_, 0.3 + 0.1 * round_, 2.0 * round_),
    }
    report.bytes_down = {NODE_A: 1000, NODE_B: 1000}
    if round_ > 0:
        sites = {NODE_A: SiteTrain("bank", 40, 1.0 * round_, 8.0, 1.1, 500)}
        sites[NODE_B] = (
            SiteTrain("clinic", 0, 2.0, 0.0, 0.0, 50, declined="budget exhausted")
            if decline_b
            else SiteTrain("clinic", 120, 2.0 * round_, 6.0, 1.3, 500)
        )
        report.update = RoundUpdate(mean_delta=None, sites=sites, error=error)
        report.error = error
    return report


def _state(value: float) -> OrderedDict[str, np.ndarray]:
    return OrderedDict(w=np.full((2, 3), value, dtype=np.float32))


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    s = RunStore(tmp_path / "store.sqlite")
    s.create_run(
        "run1", name="demo", federation_json='{"training": {}}', rounds_total=3, fingerprint="ab" * 32, out_dir=tmp_path
    )
    return s


def test_round_trip_and_weighted_numbers(store: RunStore, tmp_path: Path) -> None:
    for r in range(3):
        ckpt = tmp_path / f"round-{r}.safetensors"
        save_state(_state(r), ckpt)
        store.round_started("run1", r, 1)
        store.record_round(
            "run1", _report(r, decline_b=r == 2), names={NODE_A: "bank", NODE_B: "clinic"}, attempt=1, checkpoint=ckpt
        )
    rounds = store.rounds("run1")
    assert [r["status"] for r in rounds] == ["completed"] * 3
    assert rounds[1]["weighted_accuracy"] == pytest.approx((0.6 * 10 + 0.4 * 30) / 40)
    assert rounds[1]["weighted_loss"] == pytest.approx((0.9 * 10 + 1.9 * 30) / 40)
    rows = {(s["round"], s["site"]): s for s in store.site_rounds("run1")}
    assert int(rows[(1, "bank")]["node_id"]) == NODE_A  # survives SQLite's signed 64-bit integers
    assert rows[(1, "bank")]["bytes_up"] == 500 and rows[(1, "bank")]["bytes_down"] == 1000
    assert rows[(2, "clinic")]["declined"] == "budget exhausted" and rows[(2, "clinic")]["train_loss"] is None
    assert store.last_completed_round("run1") == 2
    assert store.checkpoint("run1").round == 2

    sites = {s["name"]: s for s in store.sites()}
    assert sites["clinic"]["status"] == "declined" and sites["bank"]["status"] == "trained"

    privacy = {p["site"]: p for p in privacy_table(store.site_rounds("run1"))}
    assert privacy["bank"]["epsilon"] == pytest.approx(2.0) and privacy["bank"]["cap"] == pytest.approx(8.0)
    assert privacy["clinic"]["declined"] == 1 and privacy["clinic"]["cap"] == pytest.approx(6.0)

    view = run_view(store, "run")  # unique prefix
    assert view["charts"]["accuracy"]["weighted"][2] == [2, pytest.approx(rounds[2]["weighted_accuracy"])]
    assert [b["up"] for b in view["bytes"]] == [0, 1000, 550]

    rebuilt = store.round_reports("run1", node_of={"bank": 99})
    assert len(rebuilt) == 3
    assert rebuilt[1].evals[99].accuracy == pytest.approx(0.6)
    assert rebuilt[2].update is not None and rebuilt[2].update.sites[NODE_B].declined == "budget exhausted"


def test_a_round_in_flight_is_not_completed(store: RunStore, tmp_path: Path) -> None:
    save_state(_state(0), tmp_path / "r0.safetensors")
    store.record_round("run1", _report(0), names={}, attempt=1, checkpoint=tmp_path / "r0.safetensors")
    store.round_started("run1", 1, 1)  # the server dies here
    assert store.last_completed_round("run1") == 0
    assert store.begin_attempt("run1") == 2
    assert store.rounds("run1")[1]["status"] == "interrupted"


def test_failed_round_counts_as_done_without_checkpoint(store: RunStore, tmp_path: Path) -> None:
    save_state(_state(0), tmp_path / "r0.safetensors")
    store.record_round("run1", _report(0), names={}, attempt=1, checkpoint=tmp_path / "r0.safetensors")
    store.record_round("run1", _report(1, error="1 usable update(s)"), names={}, attempt=1)
    assert store.last_completed_round("run1") == 1
    assert store.rounds("run1")[1]["status"] == "failed"
    assert [c.round for c in store.checkpoints("run1")] == [0]


def test_checkpoint_tampering_is_detected(store: RunStore, tmp_path: Path) -> None:
    ckpt = tmp_path / "r0.safetensors"
    save_state(_state(0), ckpt)
    store.record_round("run1", _report(0), names={}, attempt=1, checkpoint=ckpt)
    save_state(_state(5), ckpt)
    with pytest.raises(CheckpointError, match="SHA-256"):
        store.checkpoint("run1", 0)


def test_reader_sees_writes_from_another_connection_and_cannot_write(store: RunStore) -> None:
    reader = RunStore(store.path, readonly=True)
    store.round_started("run1", 0, 1)
    assert reader.rounds("run1")[0]["status"] == "running"
    with pytest.raises(sqlite3.OperationalError):
        reader._db.execute("DELETE FROM runs")


def test_errors_name_what_to_do(tmp_path: Path, store: RunStore) -> None:
    with pytest.raises(StoreError, match="fedtune simulate"):
        RunStore(tmp_path / "missing.sqlite", readonly=True)
    with pytest.raises(StoreError, match="fedtune runs"):
        store.run("nope")
    with pytest.raises(StoreError, match="already exists"):
        store.create_run("run1", name="x", federation_json="{}", rounds_total=1, fingerprint="", out_dir=tmp_path)


def _distributed_report(round_: int) -> RoundReport:
    """A distributed-noise round: bank reports both epsilons, clinic (local figures only) the charged one."""
    report = _report(round_)
    if report.update is not None:
        report.update.sites[NODE_A].epsilon_worst = 2.5 * round_
    return report


def test_distributed_worst_epsilon_is_stored_and_read_back(store: RunStore) -> None:
    names = {NODE_A: "bank", NODE_B: "clinic"}
    for r in range(3):
        store.record_round("run1", _distributed_report(r), names=names, attempt=1)
    rows = {(s["round"], s["site"]): s for s in store.site_rounds("run1")}
    assert rows[(2, "bank")]["epsilon_worst"] == pytest.approx(5.0)
    assert rows[(2, "bank")]["epsilon"] == pytest.approx(2.0)  # the charged figure, unchanged beside it
    assert rows[(2, "clinic")]["epsilon_worst"] is None and rows[(0, "bank")]["epsilon_worst"] is None

    privacy = {p["site"]: p for p in run_view(store, "run1")["privacy"]}
    assert privacy["bank"]["epsilon_worst"] == pytest.approx(5.0) and privacy["bank"]["epsilon"] == pytest.approx(2.0)
    assert privacy["clinic"]["epsilon_worst"] is None

    rebuilt = store.round_reports("run1")
    assert rebuilt[2].update is not None
    assert rebuilt[2].update.sites[NODE_A].epsilon_worst == pytest.approx(5.0)
    assert rebuilt[2].update.sites[NODE_B].epsilon_worst is None


def _columns(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[1] for row in db.execute("PRAGMA table_info(site_rounds)")}


def test_a_store_from_before_epsilon_worst_still_opens(store: RunStore, tmp_path: Path) -> None:
    names = {NODE_A: "bank", NODE_B: "clinic"}
    store.record_round("run1", _report(1), names=names, attempt=1)
    store.close()
    with sqlite3.connect(store.path) as db:  # the schema as fedtune wrote it before distributed noise
        db.execute("ALTER TABLE site_rounds DROP COLUMN epsilon_worst")
    assert "epsilon_worst" not in _columns(store.path)

    with RunStore(store.path, readonly=True) as reader:  # the console and `runs show`: read, never migrate
        rows = reader.site_rounds("run1")
        assert rows and all(r["epsilon_worst"] is None for r in rows)
        assert {p["site"]: p["epsilon_worst"] for p in run_view(reader, "run1")["privacy"]} == {
            "bank": None,
            "clinic": None,
        }
        assert reader.round_reports("run1")[0].update.sites[NODE_A].epsilon_worst is None
    assert "epsilon_worst" not in _columns(store.path)

    with RunStore(store.path) as writer:  # a server resuming on it adds the column
        assert "epsilon_worst" in _columns(store.path)
        writer.record_round("run1", _distributed_report(2), names=names, attempt=1)
        worst = {(s["round"], s["site"]): s["epsilon_worst"] for s in writer.site_rounds("run1")}
    assert worst[(1, "bank")] is None and worst[(2, "bank")] == pytest.approx(5.0)
    with RunStore(store.path) as again:  # a second open finds nothing to add
        assert len(again.site_rounds("run1")) == 4


def _final_table_text(rounds: list[RoundReport]) -> str:
    from rich.console import Console

    from fedtune.server.federation import FederationResult
    from fedtune.server.report import final_table

    console = Console(record=True, width=200)
    console.print(final_table(FederationResult("run1", rounds, Path("adapter"), OrderedDict())))
    return console.export_text()


def test_final_table_shows_the_worst_epsilon_of_a_distributed_run(store: RunStore) -> None:
    names = {NODE_A: "bank", NODE_B: "clinic"}
    for r in range(3):
        store.record_round("run1", _distributed_report(r), names=names, attempt=1)
    text = _final_table_text(store.round_reports("run1"))  # as a resumed run's result rebuilds it
    assert "own share alone" in text
    bank = next(line for line in text.splitlines() if line.startswith("│ bank "))
    assert [c.strip() for c in bank.split("│")[5:7]] == ["2.00", "5.00"]  # epsilon spent, own share alone
    clinic = next(line for line in text.splitlines() if line.startswith("│ clinic "))
    assert [c.strip() for c in clinic.split("│")[5:7]] == ["4.00", "-"]
    assert "own share alone" not in _final_table_text([_report(r) for r in range(3)])  # local noise
