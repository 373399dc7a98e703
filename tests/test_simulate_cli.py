"""`fedtune simulate` as a researcher meets it: what it refuses before anything trains."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

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


def _refused(args: list[str]) -> str:
    """`fedtune simulate ARGS` in this process: exit 2 and one line (the terminal made wide, so that rich does not
    wrap it), which is returned."""
    from typer.testing import CliRunner

    from fedtune.cli import app

    result = CliRunner().invoke(app, ["simulate", *args], env={"COLUMNS": "1000"})
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ")
    return line.removeprefix("error: ")


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--epsilon", "-1"], "--epsilon -1: must be > 0"),
        (["--rounds", "0"], "--rounds 0: must be >= 1 and <= 10000"),
        (["--batch-size", "-5"], "--batch-size -5: must be >= 1"),
        (["--local-steps", "0"], "--local-steps 0: must be >= 1"),
        (["--sites", "0"], "--sites 0: a round needs at least 2 sites (training.min_sites = 2)"),
        (["--sites", "1"], "--sites 1: a round needs at least 2 sites (training.min_sites = 2)"),
        (["--noise", "bogus"], "--noise bogus: choose 'local' or 'distributed'"),
        (["--base-model", "no-such-model"], "no-such-model: base model directory not found"),
        (["--task", "bogus"], "--task bogus: choose 'classification' or 'causal-lm'"),
        (
            ["--task", "causal-lm", "--split", "rows.csv"],
            "--task causal-lm needs --base-model (a model directory, or smollm2-135m-instruct) or --federation",
        ),
    ],
)
def test_a_flag_out_of_range_is_one_line_naming_it_before_anything_is_written(
    tmp_path: Path, flags: list[str], said: str
) -> None:
    """The flag and its allowed range (the federation field's own bounds), not pydantic's text and docs URL; and a
    single site refused before Flower starts, not after (issue 23)."""
    out = tmp_path / "sim"
    assert _refused(["--out", str(out), *flags]) == said
    assert not out.exists()


def test_more_sites_than_a_split_file_can_fill_is_said_in_the_commands_terms(tmp_path: Path) -> None:
    """`--sites 1000 --split FILE` on 300 rows names the flag, the file, its rows and how many sites fit, not the
    partitioner's num_parts/min_size (issue 23)."""
    rows = tmp_path / "rows.csv"
    with rows.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([f"row {i}", f"label-{i % 3}"] for i in range(300))
    out = tmp_path / "sim"
    line = _refused(["--out", str(out), "--split", str(rows), "--sites", "1000"])
    assert line == f"--sites 1000: {rows} has 300 rows, too few for 1000 sites of at least 10 rows each " + (
        "(at most 30 sites fit)"
    )
    assert "num_parts" not in line and "min_size" not in line
    assert not out.exists()


def test_a_federation_files_missing_base_model_is_refused_before_flower_starts(tmp_path: Path) -> None:
    """README's `fedtune simulate --federation F --site a.toml --site b.toml` with F's base model not there: one line
    naming F, the key and the directory, and no store, run or site files (issue 23: Flower started, then a 76-line
    traceback, with the store and site keys left behind)."""
    federation = tmp_path / "federation.toml"
    federation.write_text(
        '[base_model]\npath = "models/not-here"\n[task]\nkind = "classification"\nlabels = ["a", "b"]\n',
        encoding="utf-8",
    )
    site_files = []
    for name in ("a", "b"):
        site = tmp_path / f"{name}.toml"
        toml = f'name = "{name}"\nstate_dir = "state-{name}"\n[data]\ntrain = "{name}.csv"\n'
        site.write_text(toml, encoding="utf-8")
        site_files += ["--site", str(site)]
    out = tmp_path / "sim"
    line = _refused(["--federation", str(federation), *site_files, "--out", str(out)])
    missing = tmp_path / "models" / "not-here"
    assert line.startswith(f"{federation}: base_model.path: {missing}: base model directory not found; ")
    assert "fedtune base-model import" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.toml", "b.toml", "federation.toml"]  # nothing written


def test_verbose_takes_effect_although_an_import_configured_the_root_logger_first():
    """Opacus' import runs logging.basicConfig, so a plain basicConfig in the CLI did nothing and --verbose was
    ignored: debug records went nowhere and warnings printed twice."""
    import logging

    import opacus  # noqa: F401  # the import that configures the root logger
    from rich.logging import RichHandler

    from fedtune.cli import _main

    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        logging.basicConfig(level=logging.WARNING)  # what an import may already have done
        _main(verbose=True)
        assert root.level == logging.DEBUG
        assert [type(h) for h in root.handlers] == [RichHandler]
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
