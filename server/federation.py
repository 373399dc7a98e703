"""The federation loop: rounds of train -> aggregate -> checkpoint -> evaluate.

Runs unchanged inside Flower's simulation engine and inside a deployed
ServerApp; everything it learns about a round goes to the `Reporter`, which
the CLI renders and the run store persists.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedtune.common.adapter import (
    AdapterState,
    adapter_state,
    add_scaled,
    save_peft_adapter,
    save_state,
    to_record,
)
from fedtune.common.config import FederationSpec
from fedtune.common.model import fingerprint_model, load_lora_model
from fedtune.server.aggregation import RoundUpdate, plain_round
from fedtune.server.messaging import broadcast, exchange
from fedtune.server.secure_round import secure_round

log = logging.getLogger(__name__)


@dataclass
class SiteEval:
    site: str
    num_examples: int
    loss: float
    accuracy: float | None
    epsilon: float


@dataclass
class RoundReport:
    round: int
    sampled: int = 0
    update: RoundUpdate | None = None
    evals: dict[int, SiteEval] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0
    error: str | None = None

    @property
    def weighted_accuracy(self) -> float | None:
        scored = [e for e in self.evals.values() if e.accuracy is not None]
        total = sum(e.num_examples for e in scored)
        return sum(e.accuracy * e.num_examples for e in scored) / total if total else None


class Reporter(Protocol):
    def round_started(self, round_: int, total: int) -> None: ...
    def round_finished(self, report: RoundReport) -> None: ...


class _Silent:
    def round_started(self, round_: int, total: int) -> None:
        pass

    def round_finished(self, report: RoundReport) -> None:
        pass


@dataclass
class FederationResult:
    run: str
    rounds: list[RoundReport]
    adapter_dir: Path
    final_state: AdapterState


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} site(s) connected after {timeout:.0f}s, the federation needs {minimum}; "
                "check that the site agents are running and registered"
            )
        time.sleep(1.0)
    return nodes


def _round_config(spec: FederationSpec, run: str, round_: int) -> ConfigRecord:
    return ConfigRecord(
        {"federation": spec.model_dump_json(), "run": run, "round": round_, "rounds": spec.training.rounds}
    )


def evaluate_round(
    grid: Grid, spec: FederationSpec, run: str, round_: int, state: AdapterState, nodes: list[int]
) -> tuple[dict[int, SiteEval], dict[int, int]]:
    content = RecordDict({"global": to_record(state), "config": _round_config(spec, run, round_)})
    stage = exchange(
        grid,
        broadcast(nodes, content),
        "evaluate",
        group=f"{run}:{round_}:eval",
        timeout=spec.training.round_timeout_s,
    )
    evals = {}
    for node, reply in stage.replies.items():
        m = reply["metrics"]
        evals[node] = SiteEval(
            site=str(reply["info"]["site"]),
            num_examples=int(m["num-examples"]),
            loss=float(m["eval-loss"]),
            accuracy=float(m["eval-accuracy"]) if "eval-accuracy" in m else None,
            epsilon=float(m["epsilon"]),
        )
    return evals, stage.bytes_down


def run_federation(
    grid: Grid,
    spec: FederationSpec,
    *,
    out_dir: Path,
    reporter: Reporter | None = None,
    run: str | None = None,
) -> FederationResult:
    reporter = reporter or _Silent()
    run = run or uuid.uuid4().hex[:12]
    out_dir = Path(out_dir) / run
    fingerprint = fingerprint_model(spec.base_model.path)
    if spec.base_model.fingerprint and spec.base_model.fingerprint != fingerprint:
        raise ValueError(
            f"the server's base model at {spec.base_model.path} has fingerprint {fingerprint[:16]}..., "
            f"not the federation's {spec.base_model.fingerprint[:16]}..."
        )
    # Sites check their local weights against this exact value.
    spec = spec.model_copy(update={"base_model": spec.base_model.model_copy(update={"fingerprint": fingerprint})})
    loaded = load_lora_model(spec, seed=spec.training.seed)
    state = adapter_state(loaded.model)
    rng = random.Random(spec.training.seed)
    t = spec.training
    nodes = _wait_for_nodes(grid, t.min_sites, t.round_timeout_s)
    log.info("run %s: %d site(s) connected, adapter has %d tensors", run, len(nodes), len(state))

    reports: list[RoundReport] = []
    reporter.round_started(0, t.rounds)
    evals, down = evaluate_round(grid, spec, run, 0, state, nodes)
    names = {n: e.site for n, e in evals.items()}  # node id -> site name, as each site reports it
    baseline = RoundReport(round=0, evals=evals, bytes_down=down, sampled=len(nodes))
    reports.append(baseline)
    reporter.round_finished(baseline)

    for round_ in range(1, t.rounds + 1):
        started = time.monotonic()
        reporter.round_started(round_, t.rounds)
        nodes = sorted(grid.get_node_ids())
        sampled = sorted(rng.sample(nodes, min(t.sites_per_round, len(nodes)))) if t.sites_per_round else nodes
        report = RoundReport(round=round_, sampled=len(sampled))
        content = RecordDict({"global": to_record(state), "config": _round_config(spec, run, round_)})
        if spec.secagg.enabled:
            update = secure_round(
                grid, spec, content, sampled, names=names, round_=round_, group=f"{run}:{round_}", template=state
            )
        else:
            update = plain_round(grid, spec, content, sampled, group=f"{run}:{round_}", template=state)
        report.update = update
        if update.mean_delta is None:
            report.error = update.error
            log.warning("round %d: no update applied: %s", round_, update.error)
        else:
            state = add_scaled(state, update.mean_delta, t.server_learning_rate)
            save_state(state, out_dir / "checkpoints" / f"round-{round_:04d}.safetensors", {"round": str(round_)})
        report.evals, report.bytes_down = evaluate_round(grid, spec, run, round_, state, nodes)
        names.update({n: e.site for n, e in report.evals.items()})
        for node, down_bytes in update.bytes_down.items():
            report.bytes_down[node] = report.bytes_down.get(node, 0) + down_bytes
        report.wall_s = time.monotonic() - started
        reports.append(report)
        reporter.round_finished(report)

    adapter_dir = save_peft_adapter(loaded.model, state, out_dir / "adapter")
    return FederationResult(run=run, rounds=reports, adapter_dir=adapter_dir, final_state=state)
