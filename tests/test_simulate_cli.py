"""`fedtune simulate` as a researcher meets it: what it refuses before anything trains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedtune.client.ledger import PrivacyLedger, classification_identity
from fedtune.common.data import load_classification
from fedtune.server.demo import write_demo_data

FEDTUNE = [sys.executable, "-c", "from fedtune.cli import main; main()"]


def _demo(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FEDTUNE, "simulate", "--out", str(out), "--sites", "2", "--rows-per-site", "60", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )


def _spend_on(path: Path, rows: Path, labels: list[str], epsilon_steps: int) -> None:
    """An earlier run's spend on the rows in `rows`, charged as the site charges them (by their records)."""
    data = load_classification(rows, "text", "label", labels)
    identity = classification_identity(data.texts, data.labels, labels, values=data.values, source=None)
    with PrivacyLedger(path) as ledger:
        ledger.record_spend(
            identity,
            run_id="earlier",
            round_=1,
            noise_multiplier=0.6,
            sample_rate=0.5,
            steps=epsilon_steps,
            delta=1e-5,
        )


def test_a_second_demo_in_one_out_stops_when_its_sites_budget_is_spent(tmp_path: Path) -> None:
    """A second demo in the same OUT composes with the first's spends on the same rows, so it would train on almost
    no budget and end with no gain; it stops with one line saying so and what to run (issue 23). Spends on other
    rows (the demo before a real-data run in the default OUT) do not stop it."""
    out = tmp_path / "sim"
    labels, files = write_demo_data(out, 2, 60, seed=0)  # what `simulate` writes for this demo
    _spend_on(out / "sites" / "site-1" / "ledger.sqlite", files[0], labels, 200)
    done = _demo(out)
    assert done.returncode == 2, done.stdout + done.stderr
    text = " ".join(done.stdout.split())  # rich wraps a long line at the terminal's width
    assert text.count("error:") == 1 and "site-1 already spent epsilon" in text and "--out NEW_DIR" in text
    assert "Traceback" not in done.stdout + done.stderr
    assert not (out / "runs").exists() and not (out / "store.sqlite").exists()  # nothing started

    other = tmp_path / "other"
    other_labels, other_files = write_demo_data(tmp_path / "elsewhere", 2, 60, seed=7)  # other rows
    _spend_on(other / "sites" / "site-1" / "ledger.sqlite", other_files[0], other_labels, 200)
    done = _demo(other)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    printed = done.stdout + done.stderr  # a default run shows fedtune's own output, no third-party notice
    assert "Warning" not in printed and "DEPRECATED" not in printed, printed[-3000:]


def test_a_run_that_ends_below_its_base_model_says_so_and_why() -> None:
    """A 300-row, 2-round run can end below its base model with all its budget spent; the adapter is still
    written, but the researcher is told, with the usual causes (issue 23). A run that gains says nothing."""
    from fedtune.server.federation import FederationResult, RoundReport
    from fedtune.server.report import worse_than_base
    from fedtune.server.scores import EvalTotals, SiteEval

    def run(final_accuracy: float) -> FederationResult:
        base = RoundReport(round=0, totals=EvalTotals(60, 1.1, 0.517, 2))
        last = RoundReport(round=2, totals=EvalTotals(60, 2.0, final_accuracy, 2))
        last.evals = {1: SiteEval("site-1", 30, 2.0, final_accuracy, 7.96)}
        return FederationResult("r", [base, RoundReport(round=1), last], Path("adapter"), {})

    warning = worse_than_base(run(0.217))
    assert warning is not None
    assert "0.217, below the base model's 0.517" in warning and "epsilon 7.96 spent" in warning
    assert "2 round(s)" in warning and "larger epsilon cap" in warning
    assert worse_than_base(run(0.6)) is None
