"""MLflow tracking: a run from the store, read back with MLflow's own client, and the one line when it is missing.

Local stores only (a `file:` directory, a sqlite file): no tracking server, nothing leaves the machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from console_store import FINGERPRINT, NODES, RUN, bank_spec, write_bank_store
from typer.testing import CliRunner

from fedtune.cli import app as cli_app
from fedtune.common.config import FederationSpec
from fedtune.server.aggregation import RoundUpdate, SiteTrain
from fedtune.server.console.mlflow_sink import (
    INSTALL_HINT,
    MAX_PARAM_CHARS,
    MlflowSink,
    TrackingError,
    connect,
    export_run,
    metric_key,
    param_value,
)
from fedtune.server.console.round_figures import round_scalars
from fedtune.server.federation import RoundReport
from fedtune.server.scores import SiteEval
from fedtune.server.store import RunStore


def _mlflow() -> ModuleType:
    """MLflow itself, for reading back (the missing-package test needs none, so this is not module-wide)."""
    return pytest.importorskip("mlflow", reason="MLflow tracking is optional: `pip install 'fedtune[tracking]'`")


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "fedtune.json", "README.md")


def _flat(section: str, value: object) -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, inner in value.items() for k, v in _flat(f"{section}.{key}", inner).items()}
    return {section: value}


def _spec_values(spec: FederationSpec) -> dict[str, object]:
    dumped = spec.model_dump(mode="json")
    return {k: v for s in ("lora", "training", "privacy", "secagg") for k, v in _flat(s, dumped[s]).items()}


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture
def file_store_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLFLOW_ALLOW_FILE_STORE, as on a fresh shell: naming a file: store must be enough (undone after)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset-by-test")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


@pytest.fixture
def bank_store(tmp_path: Path) -> Path:
    """The console's bank run, completed, with its final adapter directory on disk."""
    path = write_bank_store(tmp_path / "store.sqlite")
    adapter = tmp_path / "runs" / RUN / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (adapter / "fedtune.json").write_text(json.dumps({"run": RUN}))
    (adapter / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    with RunStore(path) as store:
        store.finish_run(RUN, "completed", adapter_dir=adapter)
    return path


def test_runs_mlflow_logs_the_store_as_one_run(bank_store: Path, tmp_path: Path, file_store_env: None) -> None:
    mlflow = _mlflow()
    uri = (tmp_path / "mlruns").as_uri()
    args = ["runs", "mlflow", "bank0", "--tracking-uri", uri, "--store", str(bank_store)]
    result = CliRunner().invoke(cli_app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "3 round(s) in MLflow run" in result.output and "card-disputes" in result.output

    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("card-disputes")  # default: the federation's name
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == RUN and run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["fedtune.run_id"] == RUN and tags["fedtune.federation"] == "card-disputes"
    assert tags["fedtune.task"] == "classification" and tags["fedtune.base_model"] == "minilm"
    assert tags["fedtune.base_model_fingerprint"] == FINGERPRINT
    assert tags["fedtune.noise"] == "local" and tags["fedtune.secure_aggregation"] == "on"

    # the recipe: every lora/training/privacy/secagg value, as the spec holds it
    expected = _spec_values(bank_spec())
    params = run.data.params
    assert set(params) == set(expected)
    for key, value in expected.items():
        assert (params[key] if isinstance(value, str) else json.loads(params[key])) == value, key
    assert params["lora.target_modules"] == '["query", "value", "dense"]' and params["privacy.accountant"] == "rdp"

    # one point per round, the store's values, under the names TensorBoard uses
    with RunStore(bank_store, readonly=True) as store:
        figures = round_scalars(store, RUN)
        rounds = store.rounds(RUN)
    assert sorted(figures) == [0, 1, 2]
    names = {name for scalars in figures.values() for name, _ in scalars}
    assert set(run.data.metrics) == names
    for name in names:
        want = sorted((r, v) for r, scalars in figures.items() for n, v in scalars if n == name)
        assert _history(client, run.info.run_id, name) == want, name
    assert [v for _, v in _history(client, run.info.run_id, "global/weighted_accuracy")] == [
        pytest.approx(r["weighted_accuracy"]) for r in rounds
    ]
    assert _history(client, run.info.run_id, "site/lender/eval_accuracy") == [(0, 0.88), (1, 0.9), (2, 0.915)]
    assert _history(client, run.info.run_id, "site/lender/epsilon") == [(0, 0.0), (1, 1.5), (2, 3.0)]
    assert {"global/wall_s", "global/bytes_up", "global/bytes_down", "site/branch/eval_loss"} <= names
    assert not [n for n in names if n.endswith("epsilon_worst")]  # local noise: no own-share figure

    # the final adapter as artifacts, loadable where PEFT expects its files
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert {f"adapter/{name}" for name in ADAPTER_FILES} <= logged

    # logged again: the same MLflow run, still one point per round
    again = CliRunner().invoke(cli_app, args)
    assert again.exit_code == 0, again.output
    [same] = client.search_runs([experiment.experiment_id])
    assert same.info.run_id == run.info.run_id
    assert _history(client, run.info.run_id, "site/lender/epsilon") == [(0, 0.0), (1, 1.5), (2, 3.0)]


def _distributed_report(round_: int, *, scored: bool) -> RoundReport:
    report = RoundReport(round=round_, sampled=2, wall_s=1.0 + round_)
    if scored:
        report.evals = {
            node: SiteEval(site, 40, 1.0 - 0.1 * round_, 0.5 + 0.1 * round_ + 0.01 * i, 2.0 * round_)
            for i, (node, site) in enumerate(NODES.items())
        }
    report.bytes_down = dict.fromkeys(NODES, 1000 * (round_ + 1))
    if round_:
        report.update = RoundUpdate(
            mean_delta=None,
            sites={
                node: SiteTrain(site, 0, 2.0 * round_, 8.0, 4.0, 500, epsilon_worst=5.0 * round_)
                for node, site in NODES.items()
            },
        )
    return report


def test_live_sink_follows_the_rounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As `fedtune simulate --mlflow` drives it, into MLflow's default store ($MLFLOW_TRACKING_URI, sqlite here):
    rounds as they are scored, a round whose scores have not come back held until they have, the own-share
    epsilon of distributed noise, and a second sink (a resumed run) going on in the same MLflow run."""
    mlflow = _mlflow()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dp-sweeps")
    base = bank_spec()
    spec = FederationSpec.model_validate(
        base.model_copy(update={"privacy": base.privacy.model_copy(update={"noise": "distributed"})}).model_dump()
    )
    path = tmp_path / "store.sqlite"
    tracking = connect()
    assert tracking.uri == uri
    sink = MlflowSink(tracking, path, "live0run")
    with RunStore(path) as store:
        store.create_run(
            "live0run",
            name=spec.name,
            federation_json=spec.model_dump_json(),
            rounds_total=2,
            fingerprint=FINGERPRINT,
            out_dir=tmp_path,
        )
        store.record_round("live0run", _distributed_report(0, scored=True), names=NODES, attempt=1)
        sink.write_round(0)
        store.record_round("live0run", _distributed_report(1, scored=False), names=NODES, attempt=1)
        # an export meanwhile leaves round 1 out: its scores arrive with round 2's messages
        assert export_run(store, "live0", connect()).rounds == 1
        store.record_scores("live0run", _distributed_report(1, scored=True), names=NODES)
        sink.write_round(1)

    [run] = mlflow.search_runs(experiment_names=["dp-sweeps"], output_format="list")
    client = mlflow.tracking.MlflowClient(uri)
    assert run.info.status == "RUNNING" and run.data.tags["fedtune.noise"] == "distributed"
    assert _history(client, run.info.run_id, "site/lender/epsilon_worst") == [(1, 5.0)]
    assert _history(client, run.info.run_id, "site/branch/eval_accuracy") == [(0, 0.51), (1, pytest.approx(0.61))]

    # a resumed run: a new sink finds the MLflow run by its tag, does not log round 1 again, and ends it
    resumed = MlflowSink(connect(), path, "live0run")
    with RunStore(path) as store:
        resumed.write_round(1)
        store.record_round("live0run", _distributed_report(2, scored=True), names=NODES, attempt=2)
        resumed.write_round(2)
        store.finish_run("live0run", "failed", error="RuntimeError: stopped")
    done = resumed.close()
    assert done is not None and done.mlflow_run == run.info.run_id and done.rounds == 3 and done.adapter is None
    [ended] = mlflow.search_runs(experiment_names=["dp-sweeps"], output_format="list")
    assert ended.info.run_id == run.info.run_id and ended.info.status == "FAILED"
    assert [s for s, _ in _history(client, run.info.run_id, "global/weighted_accuracy")] == [0, 1, 2]
    assert _history(client, run.info.run_id, "site/lender/epsilon_worst") == [(1, 5.0), (2, 10.0)]


def test_missing_mlflow_is_one_line(bank_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import mlflow...` raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow", None)
    runner = CliRunner()
    exported = runner.invoke(cli_app, ["runs", "mlflow", RUN, "--store", str(bank_store)], env={"COLUMNS": "250"})
    assert exported.exit_code == 2
    assert exported.output.strip().splitlines() == [f"error: {INSTALL_HINT}"]
    out = tmp_path / "sim"
    simulated = runner.invoke(cli_app, ["simulate", "--mlflow", "--out", str(out)], env={"COLUMNS": "250"})
    assert simulated.exit_code == 2, simulated.output
    assert simulated.output.strip().splitlines() == [f"error: {INSTALL_HINT}"]
    assert not out.exists()  # refused before anything was written


def test_unusable_tracking_uri_is_one_line(bank_store: Path) -> None:
    _mlflow()
    result = CliRunner().invoke(
        cli_app, ["runs", "mlflow", RUN, "--tracking-uri", "nosuch://x", "--store", str(bank_store)]
    )
    assert result.exit_code == 2
    text = " ".join(result.output.split())  # one line, as the terminal wraps it
    assert text.startswith("error: MLflow at nosuch://x: ") and text.count("error:") == 1 and "Traceback" not in text


def test_names_and_values_mlflow_accepts() -> None:
    assert metric_key("site/bank.eu/epsilon") == "site/bank.eu/epsilon"
    assert metric_key("site/a#b?/eval_loss") == "site/a_b_/eval_loss"
    assert metric_key("site/../epsilon") == "site/__/epsilon"
    assert param_value(None) == "null" and param_value(True) == "true" and param_value("rdp") == "rdp"
    long = param_value(["x" * 10] * 1000)
    assert len(long) == MAX_PARAM_CHARS and long.endswith("...")


def test_a_tracking_store_failing_mid_run_costs_only_its_logging(capsys: pytest.CaptureFixture[str]) -> None:
    from fedtune.server.simulate_cli import _close_sinks, _Tee

    class Down:
        def write_round(self, round_: int) -> None:
            raise TrackingError("MLflow at http://tracking.example: connection refused")

        def close(self) -> None:
            raise AssertionError("a sink that failed is not written again")

    class Terminal:
        def __init__(self) -> None:
            self.finished: list[int] = []

        def round_started(self, round_: int, total: int) -> None:
            pass

        def round_finished(self, report: RoundReport) -> None:
            self.finished.append(report.round)

    terminal, sinks = Terminal(), [Down()]
    tee = _Tee(terminal, sinks, "fedtune runs mlflow R --store S")  # type: ignore[list-item]
    for round_ in (0, 1):
        tee.round_finished(RoundReport(round=round_))
    _close_sinks(sinks, "fedtune runs mlflow R --store S")  # type: ignore[arg-type]
    assert terminal.finished == [0, 1] and sinks == []
    said = " ".join(capsys.readouterr().out.split())
    assert said.count("warning:") == 1 and "connection refused" in said and "`fedtune runs mlflow R --store S`" in said
