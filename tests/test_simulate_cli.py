"""`fedtune simulate` as a researcher meets it: what it refuses before anything trains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedtune.client.ledger import PrivacyLedger


def test_a_second_demo_in_one_out_stops_when_its_sites_budget_is_spent(tmp_path: Path) -> None:
    """A second demo in the same OUT composes with the first's spends on the same rows, so it would train on almost
    no budget and end with no gain; it stops with one line saying so and what to run (issue 23)."""
    out = tmp_path / "sim"
    with PrivacyLedger(out / "sites" / "site-1" / "ledger.sqlite") as ledger:  # what an earlier run left
        ledger.record_spend(
            "demo", run_id="earlier", round_=1, noise_multiplier=0.6, sample_rate=0.5, steps=200, delta=1e-5
        )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fedtune.cli import main; main()",
            "simulate",
            "--out",
            str(out),
            "--sites",
            "2",
            "--rows-per-site",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    text = " ".join(done.stdout.split())  # rich wraps a long line at the terminal's width
    assert text.count("error:") == 1 and "site-1 already spent epsilon" in text and "--out NEW_DIR" in text
    assert "Traceback" not in done.stdout + done.stderr
    assert not (out / "runs").exists() and not (out / "store.sqlite").exists()  # nothing started
