"""Deployment security on loopback: who may connect, and which app bundles a site will run.

Real `flower-superlink` (TLS + SuperNode auth + SQLite) and `flower-supernode`
processes; no training happens here, so the module stays under two minutes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, base_model_path: Path) -> Iterator:
    import os

    from deploy_harness import start_superlink

    from fedtune.server.demo import write_demo_data

    root = tmp_path_factory.mktemp("deploy-security")
    os.environ["FLWR_HOME"] = str(root / "flwr-home-operator")
    fed = start_superlink(root)
    try:
        _, files = write_demo_data(root, 1, 30, seed=1)
        fed.add_site("strict", files[0])
        fed.add_site("stranger", files[0])
        fed.add_site("nocert", files[0])
        fed.register("strict")
        fed.register("nocert")
        yield fed
    finally:
        fed.close()


def _spec(base_model_path: Path, out: Path):
    from fedtune.common.config import FederationSpec
    from fedtune.common.synthetic import BANK_INTENTS

    return FederationSpec.model_validate(
        {
            "name": "signing-check",
            "base_model": {"path": str(base_model_path), "max_length": 32},
            "task": {"kind": "classification", "labels": list(BANK_INTENTS)},
            "training": {"rounds": 1, "local_steps": 1, "batch_size": 8, "min_sites": 1, "round_timeout_s": 60},
            "secagg": {"enabled": False},
            "output_dir": str(out),
        }
    )


def test_site_without_ca_certificate_cannot_connect(fed) -> None:
    import certifi

    s = fed.sites["nocert"]
    # The system CAs instead of the federation's: none of them signed our server certificate.
    fed.start_site("nocert", root_certificates=Path(certifi.where()), max_retries=2, max_wait_time=20)
    s.process.proc.wait(timeout=180)  # the worker starts first (imports), then the SuperNode gives up
    log = s.process.log_text()
    assert s.process.proc.returncode != 0, log[-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log.lower(), log[-2000:]
    from fedtune.server.submit import online_nodes

    assert "online" not in online_nodes(fed.conn).values()


def test_unregistered_site_is_refused(fed) -> None:
    s = fed.sites["stranger"]
    proc = fed.start_site("stranger", max_retries=2, max_wait_time=20)
    proc.proc.wait(timeout=90)
    log = s.process.log_text()
    assert proc.proc.returncode != 0, log[-2000:]
    assert "SuperNode ID" not in log  # never admitted to the federation
    # TLS worked (same CA as the admitted sites); the SuperLink refused to activate an unknown key.
    assert "Failed to activate SuperNode" in log, log[-2000:]
    assert "certificate verify failed" not in log.lower()
    assert not s.egress.exists()


def _egress_runs(path: Path) -> set[str]:
    from fedtune.client.audit import EgressLog

    if not path.exists():
        return set()
    return {e.run for e in EgressLog(path).entries()}


def test_site_runs_only_bundles_signed_by_a_trusted_key(fed, base_model_path: Path, tmp_path: Path) -> None:
    from deploy_harness import write_federation

    from fedtune.server.appbundle import (
        build_bundle,
        generate_signing_key,
        load_signing_key,
        sign_bundle,
        store_signed_bundle,
    )
    from fedtune.server.submit import ControlError, start_run, stop_run

    s = fed.sites["strict"]
    proc = fed.start_site("strict")
    fed.wait_online(1)
    bundle = build_bundle(write_federation(tmp_path / "federation.toml", _spec(base_model_path, tmp_path / "runs")))
    rogue, _ = generate_signing_key(tmp_path / "rogue-signing")

    def stop(run_id: int) -> None:
        with contextlib.suppress(ControlError):  # already finished
            stop_run(fed.conn, run_id)

    # 1. Unsigned: Flower 1.42's SuperNode refuses any FAB without verifications once trust is configured.
    unsigned = start_run(fed.conn, bundle, signed=False)
    assert proc.wait_for_log("The FAB could not be verified", timeout=120), proc.log_text()[-3000:]
    stop(unsigned)
    # 2. Signed by a key the site does not trust.
    store_signed_bundle(fed.database, bundle, sign_bundle(bundle, load_signing_key(rogue)))
    wrong = start_run(fed.conn, bundle, signed=True)
    assert proc.wait_for_log("FAB verification failed", timeout=120), proc.log_text()[-3000:]
    stop(wrong)
    assert str(unsigned) not in _egress_runs(s.egress) and str(wrong) not in _egress_runs(s.egress)
    # 3. Signed by the operator key in the site's trusted-entities file: the site runs it.
    store_signed_bundle(fed.database, bundle, sign_bundle(bundle, load_signing_key(fed.signing_key)))
    good = start_run(fed.conn, bundle, signed=True)
    deadline = time.monotonic() + 180
    while str(good) not in _egress_runs(s.egress):
        assert time.monotonic() < deadline, proc.log_text()[-3000:]
        time.sleep(1.0)
    stop(good)
    assert str(unsigned) not in _egress_runs(s.egress) and str(wrong) not in _egress_runs(s.egress)


def test_registering_a_site_twice_says_so(fed) -> None:
    """The SuperLink answers a duplicate key with a bare 412; the operator is told what it means instead."""
    from fedtune.server.submit import ControlError, register_node

    with pytest.raises(ControlError, match="already registered") as exc:
        register_node(fed.conn, fed.sites["strict"].state / "supernode-auth.pub", "strict")
    assert "412" not in str(exc.value)
