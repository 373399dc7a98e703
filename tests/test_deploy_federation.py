"""A real deployment on loopback: SuperLink (TLS, SuperNode auth, SQLite), three site agents, signed app.

bank and hospital train; clinic has already spent more than its epsilon cap on
its dataset and must decline every round while the run goes on. The second
test kills hospital mid-round and restarts it at once: it rejoins within seconds and trains the next round,
its ledger intact.
Measurements (wall time, per-round egress bytes) are printed and written to
`deploy-measurements.json` in the test's temp folder.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

pytestmark = pytest.mark.slow


def _spec(base_model_path: Path, out: Path, **training: object):
    from fedtune.common.config import FederationSpec
    from fedtune.common.synthetic import BANK_INTENTS

    return FederationSpec.model_validate(
        {
            "name": "loopback",
            "base_model": {"path": str(base_model_path), "max_length": 32},
            "task": {"kind": "classification", "labels": list(BANK_INTENTS)},
            "lora": {"r": 4, "alpha": 8},
            # Round 1 trains the head, round 2 FFA-LoRA: both phases cross the real transport.
            "training": {
                "rounds": 2,
                "local_steps": 3,
                "batch_size": 16,
                "min_sites": 2,
                "head": {"rounds": 1, "local_steps": 3},
                **training,
            },
            # A fixed sigma makes each round's spend small and known, so one run does not use up a site's
            # whole cap (by default a site spreads its entire remaining budget over the run's rounds).
            "privacy": {"default_epsilon_cap": 50.0, "noise_multiplier": 1.0},
            # t = 2 of 3: a round goes on with one site declining (clinic) or down (hospital killed); the sites
            # accept it (threshold_floor and min_round_sites 2 in their files, `fed` below), knowingly.
            "secagg": {"enabled": True, "stage_timeout_s": 60, "threshold_fraction": 0.5},
            "output_dir": str(out),
        }
    )


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, base_model_path: Path) -> Iterator:
    from deploy_harness import start_superlink

    from fedtune.client.ledger import PrivacyLedger
    from fedtune.common.data import dataset_fingerprint
    from fedtune.server.demo import write_demo_data

    root = tmp_path_factory.mktemp("deploy-federation")
    os.environ["FLWR_HOME"] = str(root / "flwr-home-operator")
    fed = start_superlink(root)
    try:
        _, files = write_demo_data(root, 3, 60, seed=0)
        for name, f in zip(("bank", "hospital", "clinic"), files, strict=True):
            fed.add_site(name, f, epsilon_cap=1.0 if name == "clinic" else 20.0)
        fed.pin_peers(threshold_floor=0.5, min_round_sites=2)
        # clinic spent its budget on this dataset in an earlier federation: it is at (beyond) its cap of 1.0.
        with PrivacyLedger(fed.sites["clinic"].ledger) as ledger:
            ledger.record_spend(
                dataset_fingerprint(files[2]),
                run_id="earlier-federation",
                round_=1,
                noise_multiplier=0.8,
                sample_rate=0.3,
                steps=200,
                delta=1e-5,
            )
        for name in fed.sites:
            fed.register(name)
            fed.start_site(name)
        fed.wait_online(3)
        yield fed
    finally:
        fed.close()


def _egress(path: Path, run: str) -> list[dict]:
    from dataclasses import asdict

    from fedtune.client.audit import EgressLog

    return [asdict(e) for e in EgressLog(path).entries() if e.run == run]


def _forwarded(supernode_log: str, run: str) -> int:
    """Replies of `run` the SuperNode sent on to the SuperLink, from its log ("[RUN r, ...]" then "Sending:")."""
    current, sent = None, 0
    for line in supernode_log.splitlines():
        if m := re.search(r"\[RUN (\d+)", line):
            current = m.group(1)
        elif "Sending:" in line and current == run:
            sent += 1
    return sent


def _run_cli(args: list[str]):
    from fedtune.server import cli
    from fedtune.server.cli import run_command

    cli.console.width = 200  # keep each progress line whole in the captured output

    app = typer.Typer()
    app.command()(run_command)
    return CliRunner().invoke(app, args)


def test_two_round_secure_run_completes_and_capped_site_declines(fed, base_model_path: Path) -> None:
    from deploy_harness import write_federation

    from fedtune.client.cli import app as client_app
    from fedtune.client.worker import tasks_log_path

    federation = write_federation(fed.root / "federation.toml", _spec(base_model_path, fed.root / "runs"))
    started = time.monotonic()
    result = _run_cli(
        [
            str(federation),
            "--superlink",
            fed.address,
            "--root-certificates",
            str(fed.certs / "ca.pem"),
            "--signing-key",
            str(fed.signing_key),
            "--database",
            str(fed.database),
        ]
    )
    wall = time.monotonic() - started
    logs = {n: s.process.log_text()[-3000:] for n, s in fed.sites.items()}
    assert result.exit_code == 0, f"{result.output}\n{logs}"
    run = re.search(r"run (\d+) started", result.output).group(1)
    assert "round 2 done" in result.output

    per_round: dict[int, int] = defaultdict(int)
    per_site: dict[str, dict[int, int]] = {}
    for name in ("bank", "hospital"):
        entries = _egress(fed.sites[name].egress, run)
        kinds = {e["kind"] for e in entries}
        # Secure aggregation: the delta leaves only masked; keys, shares, signatures and metrics are the rest.
        assert {"masked-vector", "public-keys", "encrypted-shares", "consistency-signature", "unmask-shares"} <= kinds
        assert "adapter-delta" not in kinds and "decline" not in kinds
        assert all(e["delivered"] for e in entries)  # the worker pushed every reply and confirmed each one
        # one warm worker ran every message of the run: no process per message
        tasks = [json.loads(x) for x in tasks_log_path(fed.sites[name].state).read_text().splitlines()]
        assert len({t["pid"] for t in tasks}) == 1 and len(tasks) >= 10, tasks
        # No plaintext training loss, row count or held-out score: metrics carry the privacy spend only.
        sent = {k for e in entries if e["kind"] == "metrics" for k in e["detail"].removeprefix("keys: ").split(", ")}
        assert sent <= {"epsilon", "epsilon-cap", "site"}, sent  # sigma, like exact epsilons, tells the row count
        per_site[name] = defaultdict(int)
        for e in entries:
            per_site[name][e["round"]] += e["bytes"]
            per_round[e["round"]] += e["bytes"]
        audit = CliRunner().invoke(client_app, ["audit", str(fed.sites[name].config)])
        assert audit.exit_code == 0, audit.output
        assert "verified" in audit.output

    clinic = _egress(fed.sites["clinic"].egress, run)
    assert {e["round"] for e in clinic if e["kind"] == "decline"} == {1, 2}
    # A declining site still takes part in the secure sum (zeros, weight 0), so the round keeps its threshold.
    assert "adapter-delta" not in {e["kind"] for e in clinic}
    status = CliRunner().invoke(client_app, ["status", str(fed.sites["clinic"].config)])
    assert status.exit_code == 0 and "declined rounds" in status.output, status.output
    assert (fed.root / "runs" / run / "adapter" / "adapter_model.safetensors").is_file()

    measurements = {
        "run": run,
        "wall_s_submit_to_finish": round(wall, 1),
        "egress_bytes_per_round_all_sites": dict(per_round),
        "egress_bytes_per_round_per_site": {k: dict(v) for k, v in per_site.items()},
        "clinic_egress_bytes": sum(e["bytes"] for e in clinic),
        "server_log": [line for line in result.output.splitlines() if "round" in line],
    }
    (fed.root / "deploy-measurements.json").write_text(json.dumps(measurements, indent=2))
    print("\nDEPLOY MEASUREMENTS", json.dumps(measurements, indent=2))


def test_killed_site_fails_round_cleanly_and_restarts_with_ledger_intact(fed, base_model_path: Path) -> None:
    from deploy_harness import write_federation

    from fedtune.client.ledger import PrivacyLedger
    from fedtune.server.appbundle import build_bundle, load_signing_key, sign_bundle, store_signed_bundle
    from fedtune.server.submit import start_run, stream_logs

    hospital = fed.sites["hospital"]
    with PrivacyLedger(hospital.ledger) as ledger:
        before = ledger.entries()
    spec = _spec(base_model_path, fed.root / "runs", rounds=3, round_timeout_s=40)
    bundle = build_bundle(write_federation(fed.root / "federation-kill.toml", spec))
    store_signed_bundle(fed.database, bundle, sign_bundle(bundle, load_signing_key(fed.signing_key)))
    run = str(start_run(fed.conn, bundle, signed=True))

    # The spend is committed (fsync) before training starts: seeing it means hospital is mid-round.
    deadline = time.monotonic() + 420  # the baseline evaluation comes first (model load, pooled features)
    while True:
        with PrivacyLedger(hospital.ledger) as ledger:
            if any(e.run_id == run for e in ledger.entries()):
                break
        assert time.monotonic() < deadline, hospital.process.log_text()[-3000:]
        time.sleep(0.5)
    hospital.process.kill()  # SIGKILL the agent, its worker and SuperNode: no goodbye, no cleanup
    hospital.process.proc.wait(timeout=30)
    killed_log = hospital.process.log_text()
    # Flower keeps the killed node "online" until its heartbeat lapses (30 to 60 s after the kill) and refuses
    # the same key meanwhile; the restarted agent releases its own node first and is back at once.
    restarted, t0 = time.time(), time.monotonic()
    fed.start_site("hospital")
    # The SuperNode gives up (exit 305) when activation is refused, so an activation well inside the lapse
    # window is the release at work (on a quiet machine: seconds, see benchmarks/deploy.py).
    assert hospital.process.wait_for_log("SuperNode ID", timeout=120), hospital.process.log_text()[-3000:]
    rejoined = time.monotonic() - t0
    print(f"\nREJOIN: hospital active again {rejoined:.1f} s after its restart")
    assert rejoined < 60 and "Failed to activate" not in hospital.process.log_text()

    lines: list[str] = []
    stream_logs(fed.conn, int(run), lines.append)
    log = "".join(lines)
    assert "round 1 done" in log, log[-3000:]
    # bank alone (clinic declines) is below the secure-aggregation threshold: the round fails cleanly,
    # the global adapter is left unchanged and the run goes on; the restarted hospital trains again in the
    # last round (round 2 may start before it is back).
    assert re.search(r"round 1 done .*error", log), log[-3000:]
    assert re.search(r"round 3 done in [0-9.]+s: 3 site\(s\), 1 declined", log), log[-3000:]
    assert not re.search(r"round 3 done .*error", log), log[-3000:]
    assert "site node " not in log  # every failure is named by its site, none by a bare node id
    assert "finished" in log

    with PrivacyLedger(hospital.ledger) as ledger:
        after = ledger.entries()
    assert after[: len(before)] == before  # earlier spends untouched
    ran = [e.round for e in after if e.run_id == run]
    assert ran[0] == 1 and ran[-1] == 3  # the interrupted round stays paid for; the restarted site trains again
    # Killed mid-round: every reply its SuperNode forwarded (the SuperNode's own log, independent of fedtune's code)
    # is in the egress log, and none is marked delivered that the SuperNode had not taken. A reply the SuperNode was
    # sending when SIGKILL came stays logged as pending: it may have left, and the log says so.
    before_kill = [e for e in _egress(hospital.egress, run) if e["time"] < restarted]
    delivered = {e["reply"] for e in before_kill if e["delivered"]}
    logged = {e["reply"] for e in before_kill}
    forwarded = _forwarded(killed_log, run)
    assert len(delivered) <= forwarded <= len(logged), (len(delivered), forwarded, len(logged), killed_log[-3000:])
    with sqlite3.connect(hospital.ledger) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert "released this site's node" in hospital.process.log_text()


def test_sites_that_cannot_train_are_named_with_their_reason_and_spend_nothing(
    fed, base_model_path: Path, tmp_path: Path
) -> None:
    """A ledger truncated to 0 bytes and a wrong base model, in real site processes: both sites refuse before
    training, the run store names each with its reason, and neither spends."""
    import tomllib

    import tomli_w
    from deploy_harness import write_federation
    from transformers import BertConfig, BertForSequenceClassification

    from fedtune.client.ledger import HighWater, PrivacyLedger, hwm_path
    from fedtune.server.store import RunStore

    clinic, hospital = fed.sites["clinic"], fed.sites["hospital"]
    os.truncate(clinic.ledger, 0)  # `truncate -s 0 ledger.sqlite` on a site with a history (egress log, mark)
    mark_before = HighWater.read(hwm_path(clinic.ledger))
    wrong = tmp_path / "other-model"
    BertForSequenceClassification(
        BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(wrong)
    data = tomllib.loads(hospital.config.read_text())
    hospital.config.write_text(tomli_w.dumps({**data, "base_model_path": str(wrong)}))  # read per message
    try:
        with PrivacyLedger(hospital.ledger) as ledger:
            hospital_before = ledger.entries()
        out = fed.root / "runs-refusals"
        federation = write_federation(fed.root / "federation-refusals.toml", _spec(base_model_path, out, rounds=1))
        result = _run_cli(
            [str(federation), "--superlink", fed.address, "--root-certificates", str(fed.certs / "ca.pem"),
             "--signing-key", str(fed.signing_key), "--database", str(fed.database)]
        )  # fmt: skip
        run = re.search(r"run (\d+) started", result.output).group(1)
        with RunStore(out / "store.sqlite", readonly=True) as store:
            reasons = {r["site"]: r["failed"] or r["declined"] or "" for r in store.site_rounds(run)}
        # the reason names the ledger and what to do; its detail (spend counts) stays at the site
        assert "privacy ledger is not trusted" in reasons.get("clinic", ""), (reasons, result.output)
        assert "privacy ledger is empty" in clinic.process.log_text()
        assert "fingerprint" in reasons.get("hospital", ""), (reasons, result.output)
        assert "site clinic" in result.output and "site hospital" in result.output  # named in `fedtune run` too
        assert clinic.ledger.stat().st_size == 0  # refused, not replaced by a fresh ledger
        assert HighWater.read(hwm_path(clinic.ledger)) == mark_before  # and nothing spent
        with PrivacyLedger(hospital.ledger) as ledger:
            assert ledger.entries() == hospital_before
    finally:
        hospital.config.write_text(tomli_w.dumps(data))
