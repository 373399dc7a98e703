"""A server killed mid-run resumes from its last completed round: nothing lost, nothing repeated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.common.config import FederationSpec
from fedtune.server.store import RunStore, StoreError

ROUNDS = 3
# Tiny on purpose: other work shares these CPU cores.
TINY = ["--sites", "2", "--rows-per-site", "60", "--local-steps", "3", "--batch-size", "16", "--parallel", "2"]


def _fedtune(*args: str) -> list[str]:
    return [sys.executable, "-c", "from fedtune.cli import main; main()", *args]


def _completed_rounds(store_path: Path) -> list[dict]:
    try:
        with RunStore(store_path, readonly=True) as store:
            runs = store.runs()
            return [r for r in store.rounds(runs[0]["id"]) if r["status"] == "completed"] if runs else []
    except StoreError:
        return []  # not created yet


def _wait_for_round(proc: subprocess.Popen, store_path: Path, round_: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["round"] >= round_ for r in _completed_rounds(store_path)):
            return
        if proc.poll() is not None:
            pytest.fail(f"the simulation exited ({proc.returncode}) before round {round_} was stored")
        time.sleep(0.2)
    pytest.fail(f"round {round_} not in the store after {timeout:.0f}s")


@pytest.mark.slow
def test_killed_server_resumes_without_losing_or_repeating_rounds(tmp_path: Path) -> None:
    out, log = tmp_path / "sim", (tmp_path / "first.log").open("w")
    store_path = out / "store.sqlite"
    first = subprocess.Popen(
        _fedtune("simulate", *TINY, "--rounds", str(ROUNDS), "--out", str(out)),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes Ray's workers down with it
    )
    try:
        _wait_for_round(first, store_path, 1, timeout=420)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash, not a shutdown: no handler runs
        first.wait()
        log.close()

    with RunStore(store_path, readonly=True) as store:
        (run,) = store.runs()
        before = {r["round"]: r for r in store.rounds(run["id"]) if r["status"] == "completed"}
        killed_after = store.last_completed_round(run["id"])
    assert run["status"] == "running"  # nobody got to mark it otherwise
    assert killed_after is not None and killed_after >= 1
    if killed_after >= ROUNDS:
        pytest.skip("the run finished before the kill landed; nothing left to resume")

    resumed = subprocess.run(
        _fedtune("simulate", *TINY, "--out", str(out), "--resume", run["id"][:6]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming run {run['id']} after round {killed_after}" in " ".join(resumed.stdout.split())

    with RunStore(store_path, readonly=True) as store:
        info = store.run(run["id"])
        rounds = store.rounds(run["id"])
        site_rounds = store.site_rounds(run["id"])
        checkpoints = store.checkpoints(run["id"])
        for c in checkpoints:
            store.checkpoint(run["id"], c.round)  # every file still matches its recorded SHA-256
    # The same rounds an uninterrupted run records: baseline + 1..ROUNDS, each once, all completed.
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    assert all(r["status"] == "completed" for r in rounds), rounds
    assert info["status"] == "completed" and info["attempts"] == 2
    assert [c.round for c in checkpoints] == list(range(ROUNDS + 1))
    # Completed rounds were not re-run: same attempt, same finish time as before the kill.
    for n, old in before.items():
        assert rounds[n]["attempt"] == 1 and rounds[n]["finished"] == old["finished"]
    # The rest ran in the second attempt, every site training in it (no DuplicateRound declines).
    for r in rounds[killed_after + 1 :]:
        assert r["attempt"] == 2
        trained = [s for s in site_rounds if s["round"] == r["round"] and s["trained"]]
        assert len(trained) == 2, [s for s in site_rounds if s["round"] == r["round"]]
    assert (out / "runs" / run["id"] / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_refuses_a_different_federation(tiny_spec: FederationSpec) -> None:
    from fedtune.server.federation import _check_same_federation

    stored = tiny_spec.model_dump_json()
    moved = tiny_spec.model_copy(update={"output_dir": Path("/elsewhere")})
    _check_same_federation("r1", stored, moved)  # where files live may change
    changed = tiny_spec.model_copy(update={"training": tiny_spec.training.model_copy(update={"local_steps": 99})})
    with pytest.raises(ValueError, match="training differ"):
        _check_same_federation("r1", stored, changed)
