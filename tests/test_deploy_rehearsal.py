"""DEPLOY.md's rehearsal block, run exactly as written, from an empty folder, with real processes.

The block is the operator's and the sites' whole path (certificates, signing key, SuperLink, site init, key
pinning, registration, checks, agents, a signed secure run, status and audit); if a command or an option in the
guide drifts from the CLI, this test fails on that line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY_MD = Path(__file__).resolve().parents[1] / "deploy" / "DEPLOY.md"
PORTS = (9093, 9094, 9095)


def rehearsal_block() -> str:
    text = DEPLOY_MD.read_text()
    section = text.split("## Rehearsal on one machine", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "DEPLOY.md's rehearsal section has no bash block"
    return match.group(1)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.skipif(not all(_port_free(p) for p in PORTS), reason="DEPLOY.md's rehearsal needs ports 9093-9095")
def test_deploy_md_rehearsal_runs_verbatim_from_an_empty_folder(tmp_path: Path) -> None:
    from fedtune.client.audit import EgressLog
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.server.store import RunStore

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["HF_HUB_OFFLINE"] = "1"
    env["FLWR_HOME"] = str(tmp_path / "flwr-home")
    proc = subprocess.Popen(
        ["bash", "-c", rehearsal_block()],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=1500)
    finally:  # whatever the script left behind (agents, SuperLink) goes with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
    assert proc.returncode == 0, f"{out[-4000:]}\n{json.dumps(logs, indent=1)[-4000:]}"

    with RunStore(tmp_path / "runs" / "store.sqlite", readonly=True) as store:
        (run,) = store.runs()
        rounds = [r for r in store.rounds(run["id"]) if r["round"] >= 1]
    assert [r["status"] for r in rounds] == ["completed", "completed"], rounds
    for site in ("bank-a", "bank-b"):
        state = tmp_path / site / "state"
        with PrivacyLedger(state / "ledger.sqlite") as ledger:
            spent = ledger.entries()
        assert len(spent) == 2, spent  # one spend per round, recorded at the site itself
        sent = [e for e in EgressLog(state / "egress.jsonl").entries() if e.delivered]
        assert sent, f"{site} logged no delivered reply"
        assert site in out  # status and audit printed for each site
