"""`fedtune client init/check/start/status/audit` on real files (no network, no Flower processes)."""

from __future__ import annotations

import json
import shutil
import stat
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from fedtune.client.cli import app
from fedtune.common.config import DataSpec, SiteSpec, load_site

runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps tables at the terminal width; assertions look for whole phrases."""
    from fedtune.client import cli

    monkeypatch.setattr(cli.console, "width", 250)
    monkeypatch.setattr(cli.err_console, "width", 250)


def _init(tmp_path: Path, name: str = "bank") -> Path:
    result = runner.invoke(app, ["init", str(tmp_path / name), "--name", name])
    assert result.exit_code == 0, result.output
    return tmp_path / name / "site.toml"


def _point_at(config: Path, train: Path, **extra: object) -> None:
    data = tomllib.loads(config.read_text())
    data["data"]["train"] = str(train)
    data.update(extra)
    config.write_text(tomli_w.dumps(data))


def test_init_writes_documented_config_and_private_keys(tmp_path: Path) -> None:
    config = _init(tmp_path)
    text = config.read_text()
    for field in [*SiteSpec.model_fields, *DataSpec.model_fields]:
        assert f"{field} =" in text or f"[{field}]" in text, f"site template does not document {field}"
    site = load_site(config)
    assert site.name == "bank"
    pub = site.peers["bank"]
    assert len(pub) == 64
    for key in (site.identity_key_path, Path(site.state_dir) / "supernode-auth"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (Path(site.state_dir) / "supernode-auth.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    again = runner.invoke(app, ["init", str(config.parent), "--name", "bank"])
    assert again.exit_code == 2 and "already exists" in again.output


def test_init_printed_key_is_the_pinned_one(tmp_path: Path) -> None:
    result = runner.invoke(app, ["init", str(tmp_path / "h"), "--name", "hospital"])
    assert load_site(tmp_path / "h" / "site.toml").peers["hospital"] in result.output.replace("\n", "")


@pytest.fixture
def federation_file(tmp_path: Path, tiny_spec) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(tomli_w.dumps(tiny_spec.model_dump(mode="json", exclude_none=True)))
    return path


@pytest.fixture
def train_csv(tmp_path: Path) -> Path:
    from fedtune.common.synthetic import write_demo_sites

    return write_demo_sites(tmp_path / "data", 2, 40, alpha=0.5, seed=0)[0]


def _with_peer(config: Path, train: Path) -> None:
    data = tomllib.loads(config.read_text())
    data["peers"]["hospital"] = "ab" * 32
    data["data"]["train"] = str(train)
    config.write_text(tomli_w.dumps(data))


def test_check_passes_and_lists_what_leaves_the_site(tmp_path: Path, federation_file: Path, train_csv: Path) -> None:
    from fedtune.server.certs import create_certificates

    config = _init(tmp_path)
    _with_peer(config, train_csv)
    ca = create_certificates(tmp_path / "certs").ca_cert
    result = runner.invoke(
        app, ["check", str(config), "--federation", str(federation_file), "--root-certificates", str(ca)]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "lora_A" in out and "lora_B" in out  # adapter tensor names from the real model
    assert "uint32" in out  # masked under secure aggregation
    assert "train-loss" not in out and "epsilon-cap" in out  # privacy accounting only, never the loss
    assert "noise-multiplier" not in out  # sigma is a function of the row count: it stays at the site
    assert "secure sum: none" in out and "eval-loss" not in out  # held-out scores: none by default
    assert "ready" in out


def test_check_names_file_line_and_column_of_bad_data(tmp_path: Path, federation_file: Path) -> None:
    config = _init(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nmy card is gone,card_lost\nwhat is my balance,not_a_label\n")
    _with_peer(config, bad)
    result = runner.invoke(app, ["check", str(config), "--federation", str(federation_file), "--no-inspect-model"])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "bad.csv" in out and "3" in out and "label" in out
    assert "not_a_label" in out


def test_check_refuses_wrong_model_and_unpinned_self(tmp_path: Path, tiny_spec, train_csv: Path) -> None:
    fed = tmp_path / "federation.toml"
    data = tiny_spec.model_dump(mode="json", exclude_none=True)
    data["base_model"]["fingerprint"] = "0" * 64
    fed.write_text(tomli_w.dumps(data))
    config = _init(tmp_path)
    _point_at(config, train_csv, peers={"hospital": "ab" * 32})
    result = runner.invoke(app, ["check", str(config), "--federation", str(fed)])
    out = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "fingerprint" in out and "differs" in out
    assert "must list this site" in out


def test_start_requires_tls_or_loud_insecure(tmp_path: Path) -> None:
    from fedtune.server.certs import create_certificates

    config = _init(tmp_path)
    refused = runner.invoke(app, ["start", str(config), "--superlink", "127.0.0.1:9093", "--dry-run"])
    assert refused.exit_code == 2 and "TLS is required" in refused.output
    insecure = runner.invoke(app, ["start", str(config), "--superlink", "127.0.0.1:9093", "--insecure", "--dry-run"])
    assert insecure.exit_code == 0 and "INSECURE" in insecure.output
    cmd = json.loads(insecure.output.strip().splitlines()[-1])
    assert "--insecure" in cmd and "--auth-supernode-private-key" not in cmd
    ca = create_certificates(tmp_path / "certs").ca_cert
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text("fpk_x: ssh-ed25519 AAAA\n")
    ok = runner.invoke(
        app,
        ["start", str(config), "--superlink", "10.0.0.5:9093", "--root-certificates", str(ca),
         "--trusted-entities", str(trusted), "--dry-run"],
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    cmd = json.loads(ok.output.strip().splitlines()[-1])
    assert cmd[cmd.index("--root-certificates") + 1] == str(ca.resolve())
    assert cmd[cmd.index("--auth-supernode-private-key") + 1].endswith("supernode-auth")
    assert cmd[cmd.index("--trusted-entities") + 1] == str(trusted.resolve())
    assert cmd[cmd.index("--node-config") + 1] == f'site-config="{config.resolve()}"'
    assert "--insecure" not in cmd


def _populate(config: Path, train: Path) -> None:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedtune.client.audit import EgressLog
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.common.data import dataset_fingerprint

    site = load_site(config)
    state = Path(site.state_dir)
    with PrivacyLedger(state / "ledger.sqlite") as ledger:
        ds = dataset_fingerprint(train)
        for r in (1, 2):
            ledger.record_spend(
                ds, run_id="run-a", round_=r, noise_multiplier=1.1, sample_rate=0.3, steps=3, delta=1e-5
            )
        ledger.record_decline(ds, run_id="run-b", round_=1, reason="cap reached")
    log = EgressLog(state / "egress.jsonl")
    for r in (1, 2):
        mark = log.mark()
        log.record(
            run="run-a",
            round_=r,
            kinds={"metrics": "metrics", "keys": "public-keys"},
            content=RecordDict({"metrics": MetricRecord({"epsilon": 0.5}), "keys": ConfigRecord({"pk": b"x" * 32})}),
            delivered=False,
            spend=False,
        )
        if r == 1:  # round 2's reply was prepared, then the site was killed before the SuperNode took it
            log.confirm(since=mark)


def test_status_shows_budget_spends_declines_and_rounds(tmp_path: Path, train_csv: Path) -> None:
    config = _init(tmp_path)
    _point_at(config, train_csv, epsilon_cap=3.0)
    _populate(config, train_csv)
    result = runner.invoke(app, ["status", str(config)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "current train file" in out and "run-a" in out and "cap reached" in out
    assert "declined rounds" in out and "last rounds" in out
    rounds = out[out.index("last rounds") :]
    assert "run-a" in rounds and "│ 1 " in rounds and "│ 2 " not in rounds  # round 2 never left
    assert "own share alone" not in out  # local noise only: no second epsilon, no second sigma


def _row(out: str, first: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(f"│ {first}"))
    return [c.strip() for c in line.split("│")[1:-1]]


def test_status_shows_both_epsilons_of_distributed_spends(tmp_path: Path, train_csv: Path) -> None:
    from fedtune.client.ledger import PrivacyLedger
    from fedtune.common.data import dataset_fingerprint
    from fedtune.common.privacy import epsilon_spent

    config = _init(tmp_path)
    _point_at(config, train_csv, epsilon_cap=30.0)
    ledger_path = Path(load_site(config).state_dir) / "ledger.sqlite"
    ds = dataset_fingerprint(train_csv)
    with PrivacyLedger(ledger_path) as ledger:
        ledger.record_spend(ds, run_id="run-l", round_=1, noise_multiplier=1.1, sample_rate=0.3, steps=3, delta=1e-5)
        for r in (1, 2):  # distributed: charged at sigma 2.0 (h honest sites), own share alone sigma 0.8
            ledger.commit(
                ds, run_id="run-d", round_=r, decide=lambda _: (2.0, 0.3, 3), delta=1e-5,
                worst_noise_multiplier=0.8,
            )  # fmt: skip
        charged = ledger.entries(ds)[-1].epsilon_after
        worst = epsilon_spent([(1.1, 0.3, 3), (0.8, 0.3, 3), (0.8, 0.3, 3)], 1e-5, "prv")
    assert worst > charged * 1.5  # the figures differ enough that the one shown is the one meant
    result = runner.invoke(app, ["status", str(config)])
    assert result.exit_code == 0, result.output
    out = result.output
    budget = _row(out, ds[:16])
    assert budget[1:3] == [f"{charged:.3f}", f"{worst:.3f}"]  # epsilon spent, then own share alone
    assert "epsilon, own share alone" in out and "min_honest_sites" in out
    assert _row(out, "run-d")[2:4] == ["2.000", "0.800"]  # sigma, sigma own share alone
    assert _row(out, "run-l")[2:4] == ["1.100", "-"]


def test_status_reads_a_ledger_from_before_distributed_noise(tmp_path: Path, train_csv: Path) -> None:
    import sqlite3

    config = _init(tmp_path)
    _point_at(config, train_csv, epsilon_cap=3.0)
    _populate(config, train_csv)
    ledger_path = Path(load_site(config).state_dir) / "ledger.sqlite"
    with sqlite3.connect(ledger_path) as db:  # the spends table as ledgers wrote it before
        db.execute("ALTER TABLE spends DROP COLUMN worst_noise_multiplier")
    result = runner.invoke(app, ["status", str(config)])
    assert result.exit_code == 0, result.output
    assert "current train file" in result.output and "run-a" in result.output
    assert "own share alone" not in result.output
    assert _row(result.output, "run-a")[2] == "1.100"


def test_audit_verifies_kinds_and_flags_anything_else(tmp_path: Path, train_csv: Path) -> None:
    config = _init(tmp_path)
    _point_at(config, train_csv)
    _populate(config, train_csv)
    ok = runner.invoke(app, ["audit", str(config)])
    assert ok.exit_code == 0 and "verified" in ok.output, ok.output
    summary = runner.invoke(app, ["audit", str(config), "--json"])
    summary = json.loads(summary.output.strip().splitlines()[0])
    assert summary["entries"] == 4 and summary["undelivered"] == 2
    assert "not delivered" in ok.output and "never taken by the SuperNode" in ok.output
    log = Path(load_site(config).state_dir) / "egress.jsonl"
    entry = {"time": time.time(), "run": "run-a", "round": 3, "kind": "raw-rows", "record": "rows", "bytes": 900,
             "sha256": "0" * 64, "detail": "?"}  # fmt: skip
    with log.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    bad = runner.invoke(app, ["audit", str(config)])
    assert bad.exit_code == 1 and "raw-rows" in bad.output


def test_an_error_naming_brackets_keeps_them(tmp_path):
    """Rich reads `[prod]` as markup: an error naming such a path must still show it as written (issue 23)."""
    missing = tmp_path / "site[prod].toml"
    result = runner.invoke(app, ["status", str(missing)])
    assert result.exit_code == 2
    assert "site[prod].toml: file not found" in " ".join(result.output.split())


def test_init_writes_absolute_paths_so_the_file_can_be_installed_elsewhere(tmp_path):
    """DEPLOY.md copies site.toml to /etc/fedtune: relative paths would then point into /etc (issue 23)."""
    config = _init(tmp_path, "bank")
    installed = tmp_path / "etc" / "site.toml"
    installed.parent.mkdir()
    shutil.copy(config, installed)
    site = load_site(installed)
    assert site.state_dir == config.parent.resolve() / "state"
    assert site.identity_key_path.exists()
    assert site.data.train == config.parent.resolve() / "data" / "train.csv"
