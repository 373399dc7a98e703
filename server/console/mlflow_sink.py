"""MLflow tracking from the run store, for teams whose experiments live in MLflow.

One MLflow run per fedtune run (named by its id, tagged with what tells runs apart: federation, task, base model
and fingerprint, noise mode, secure aggregation), the recipe as params (`lora.*`, `training.*`, `privacy.*`,
`secagg.*`), per-round metrics with step = round (the same figures TensorBoard gets, from `round_figures`), and
the final adapter directory as artifacts. The store stays the source of truth: only what it holds is logged, which
is only what already left the sites, so tracking sends nothing new out of a site, and a run can be logged again
later (`fedtune runs mlflow RUN`) into the same MLflow run without a round counted twice.

Optional: needs `mlflow-skinny` (`pip install 'fedtune[tracking]'`), imported only when tracking is asked for.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from fedtune.server.console.round_figures import ROUND_MARKER, round_scalars
from fedtune.server.store import FINISHED, RunStore, StoreError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

INSTALL_HINT = "MLflow tracking needs the `mlflow-skinny` package: `pip install 'fedtune[tracking]'`"
PARAM_SECTIONS = ("lora", "training", "privacy", "secagg")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH_METRICS, _BATCH_PARAMS = 1000, 100  # MLflow's limits per log_batch call
# fedtune's terminal run states -> MLflow's; a run still "running" in the store is left RUNNING in MLflow
_MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_RUN_TAG = "fedtune.run_id"


class MlflowUnavailable(RuntimeError):
    """`mlflow` (from `mlflow-skinny` or full `mlflow`) is not installed."""


class TrackingError(RuntimeError):
    """The tracking server or store refused or could not be reached; one line, with its URI."""


def _import_mlflow() -> ModuleType:
    try:
        import mlflow
        from mlflow.tracking import MlflowClient  # noqa: F401  (the part fedtune uses; broken installs fail here)
    except ImportError:
        raise MlflowUnavailable(INSTALL_HINT) from None
    return mlflow


def require_mlflow() -> None:
    """Fail before anything starts when tracking is asked for but MLflow is not installed."""
    _import_mlflow()


def _is_file_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file")


@dataclass(frozen=True)
class Tracking:
    """A tracking store that answered, and the experiment to log into (None: $MLFLOW_EXPERIMENT_NAME, else the
    federation's name, so that one federation's runs sit side by side)."""

    client: MlflowClient
    uri: str
    experiment: str | None = None

    def reporting(self) -> AbstractContextManager[None]:
        return _one_line(self.uri)


@contextmanager
def _one_line(uri: str) -> Iterator[None]:
    """MLflow's errors (long, multi-line, sometimes a whole HTTP body) as one line naming the store."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as exc:
        first = str(getattr(exc, "message", exc)).strip().splitlines()
        raise TrackingError(f"MLflow at {uri}: {first[0][:300] if first else type(exc).__name__}") from None


def connect(uri: str | None = None, experiment: str | None = None) -> Tracking:
    """Open the tracking store at `uri` (default: $MLFLOW_TRACKING_URI, else MLflow's own default) and check it
    answers, so that a wrong URI stops a simulation before it trains rather than after.

    A `file:` URI (or a bare path) is MLflow's file store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE
    is set; naming one is taken as that opt-in (an explicit MLFLOW_ALLOW_FILE_STORE=false still wins).
    """
    mlflow = _import_mlflow()
    from mlflow.tracking import MlflowClient

    resolved = uri or mlflow.get_tracking_uri()
    if _is_file_store(resolved):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # MLflow announces creating and migrating a sqlite store at INFO, and SQLAlchemy 2.1 warns about a loader MLflow
    # uses: notices a fedtune user cannot act on, in the middle of the progress display (named, so new ones show)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", r"The ``noload`` loader strategy is deprecated", DeprecationWarning)
    with _one_line(resolved):
        client = MlflowClient(tracking_uri=resolved)  # refuses a URI scheme it has no store for
        client.search_experiments(max_results=1)
    return Tracking(client, resolved, experiment)


def param_value(value: object) -> str:
    """A spec value as an MLflow param: strings as they are, everything else as JSON (`true`, `null`, `["query",
    "value"]`), so a value reads back to what the spec holds; cut at MLflow's limit."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def flat_params(federation: dict[str, Any]) -> dict[str, str]:
    """The recipe, flattened: `lora.r`, `training.head.learning_rate`, `privacy.noise`, `secagg.enabled`, ...

    Read from the spec as stored (not re-validated), so a store from an older fedtune logs what it has.
    """
    out: dict[str, str] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        else:
            out[prefix] = param_value(value)

    for section in PARAM_SECTIONS:
        if isinstance(federation.get(section), dict):
            walk(section, federation[section])
    return out


def _base_model(federation: dict[str, Any]) -> str | None:
    """The base model's name as the model card gives it, where the stored spec is a whole one."""
    from pydantic import ValidationError

    from fedtune.common.config import FederationSpec
    from fedtune.common.inference import base_model_name

    try:
        return base_model_name(FederationSpec.model_validate(federation))
    except ValidationError:
        return None


def run_tags(info: dict[str, Any], federation: dict[str, Any]) -> dict[str, str]:
    """What tells one fedtune run from another in MLflow's run list; unset sections read as the spec's defaults."""
    base = federation.get("base_model") or {}
    tags = {
        _RUN_TAG: info["id"],
        "fedtune.federation": info["name"],
        "fedtune.task": (federation.get("task") or {}).get("kind", "classification"),
        "fedtune.base_model_fingerprint": info["base_fingerprint"] or base.get("fingerprint") or "",
        "fedtune.noise": (federation.get("privacy") or {}).get("noise", "local"),
        "fedtune.secure_aggregation": "on" if (federation.get("secagg") or {}).get("enabled", True) else "off",
    }
    if name := _base_model(federation):
        tags["fedtune.base_model"] = name
    return {k: v for k, v in tags.items() if v}


def metric_key(name: str) -> str:
    """A figure's name as MLflow accepts it: a site name with other characters (a roster name, `node-N`) keeps
    its shape, and no part resolves to `.` or `..`."""
    parts = [re.sub(r"[^\w.\- ]", "_", part) for part in name.split("/")]
    return "/".join("_" * len(p) if not p.strip(".") else p for p in parts)


@dataclass(frozen=True)
class MlflowExport:
    """What a sync left in MLflow."""

    run: str
    mlflow_run: str
    experiment: str
    uri: str
    rounds: int  # rounds the MLflow run holds
    status: str  # the fedtune run's, in the store
    adapter: Path | None  # the directory logged under artifacts/adapter
    note: str | None = None  # what could not be logged, and why

    def describe(self) -> str:
        line = (
            f"run {self.run}: {self.rounds} round(s) in MLflow run {self.mlflow_run} "
            f"(experiment {self.experiment!r}) at {self.uri}"
        )
        if self.adapter is not None:
            line += f"; adapter from {self.adapter} under artifacts 'adapter'"
        if self.status == "running":
            line += "; the run is still going: log it again to add its newer rounds"
        return line + (f"; {self.note}" if self.note else "")


@dataclass
class MlflowSink:
    """Logs one fedtune run to MLflow as the federation records its rounds (`write_round`), and at the end its
    final status and adapter (`close`); or a finished run in one go (`export_run`).

    The MLflow run is found by its `fedtune.run_id` tag or created on first use, when the store holds the run: a
    resumed run goes on in the MLflow run it started, and rounds that run already holds are not logged again.
    """

    tracking: Tracking
    store_path: Path
    run: str  # the full fedtune run id
    _mlflow_run: str | None = field(default=None, init=False)
    _experiment: str = field(default="", init=False)
    _logged: set[int] = field(default_factory=set, init=False)  # rounds the MLflow run holds

    def write_round(self, round_: int) -> None:
        with RunStore(self.store_path, readonly=True) as store, self.tracking.reporting():
            self._ensure_run(store.run(self.run))
            self._log_rounds(store, [round_])

    def close(self) -> MlflowExport | None:
        """Log what is left, the final status and (for a completed run) the adapter; None if the run never
        reached the store (it failed before its first round)."""
        try:
            store = RunStore(self.store_path, readonly=True)
        except StoreError:
            return None
        with store, self.tracking.reporting():
            return self.sync(store) if store.has_run(self.run) else None

    def sync(self, store: RunStore) -> MlflowExport:
        """Bring the MLflow run up to date with the store: every finished round not yet logged, then status and
        adapter once the run has ended."""
        info = store.run(self.run)
        self._ensure_run(info)
        finished = [r for r in store.rounds(self.run) if r["status"] in FINISHED]
        if info["status"] == "running" and finished and finished[-1]["weighted_accuracy"] is None:
            finished.pop()  # its scores come with the next round's messages: logged when they have
        self._log_rounds(store, [r["round"] for r in finished])
        adapter, note = None, None
        if info["status"] == "completed" and info["adapter_dir"]:
            adapter = Path(info["adapter_dir"])
            if adapter.is_dir():
                self.tracking.client.log_artifacts(self._run_id, str(adapter), "adapter")
            else:
                adapter, note = None, f"adapter directory {info['adapter_dir']} is gone, so no artifacts were logged"
        if info["status"] in _MLFLOW_STATUS:
            end = int(info["finished"] * 1000) if info["finished"] else None
            self.tracking.client.set_terminated(self._run_id, _MLFLOW_STATUS[info["status"]], end_time=end)
        logged = len(self._logged)
        return MlflowExport(
            info["id"], self._run_id, self._experiment, self.tracking.uri, logged, info["status"], adapter, note
        )

    @property
    def _run_id(self) -> str:
        assert self._mlflow_run is not None, "_ensure_run first"
        return self._mlflow_run

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        client = self.tracking.client
        found = client.get_experiment_by_name(name)
        if found is None:
            try:
                return str(client.create_experiment(name))
            except MlflowException:  # created meanwhile by another process
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow at {self.tracking.uri}: experiment {name!r} is deleted; restore it "
                "(`mlflow experiments restore`) or log to another with --experiment or $MLFLOW_EXPERIMENT_NAME"
            )
        return str(found.experiment_id)

    def _ensure_run(self, info: dict[str, Any]) -> None:
        if self._mlflow_run is not None:
            return
        federation = json.loads(info["federation"])
        self._experiment = self.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or info["name"]
        experiment_id = self._experiment_id(self._experiment)
        client, tags = self.tracking.client, run_tags(info, federation)
        existing = None
        if re.fullmatch(r"[\w.-]+", info["id"]):  # quotable in a filter string
            hits = client.search_runs([experiment_id], f"tags.`{_RUN_TAG}` = '{info['id']}'", max_results=1)
            existing = hits[0] if hits else None
        if existing is None:
            started = int(info["started"] * 1000)
            created = client.create_run(experiment_id, start_time=started, tags=tags, run_name=info["id"])
            self._mlflow_run = created.info.run_id
        else:
            self._mlflow_run = existing.info.run_id
            self._logged = {m.step for m in client.get_metric_history(self._mlflow_run, ROUND_MARKER)}
            if info["status"] == "running" and existing.info.status != "RUNNING":
                client.update_run(self._mlflow_run, status="RUNNING")  # a resumed run goes on where it stopped
        self._batch(params=flat_params(federation), tags=tags)

    def _log_rounds(self, store: RunStore, rounds: Sequence[int]) -> None:
        from mlflow.entities import Metric

        todo = [r for r in rounds if r not in self._logged]
        if not todo:
            return
        ended = {r["round"]: r["finished"] for r in store.rounds(self.run)}
        metrics = []
        for round_, scalars in sorted(round_scalars(store, self.run, todo).items()):
            when = int((ended.get(round_) or time.time()) * 1000)
            metrics += [Metric(metric_key(name), value, when, round_) for name, value in scalars]
        # in order, so the marker of a round goes in after its other figures
        for i in range(0, len(metrics), _BATCH_METRICS):
            self.tracking.client.log_batch(self._run_id, metrics=metrics[i : i + _BATCH_METRICS])
        self._logged.update(m.step for m in metrics)

    def _batch(self, *, params: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        items = [Param(k, v) for k, v in params.items()]
        labels = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, max(len(items), len(labels)), _BATCH_PARAMS):
            self.tracking.client.log_batch(
                self._run_id, params=items[i : i + _BATCH_PARAMS], tags=labels[i : i + _BATCH_PARAMS]
            )


def export_run(store: RunStore, run: str, tracking: Tracking) -> MlflowExport:
    """Log a run from the store (id or unique prefix) to MLflow, or bring the MLflow run it has up to date."""
    run_id = store.run(run)["id"]
    with tracking.reporting():
        return MlflowSink(tracking, store.path, run_id).sync(store)
