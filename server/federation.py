"""The federation loop: rounds of train (scoring the adapter sent) -> aggregate -> checkpoint, then a last score.

Runs unchanged inside Flower's simulation engine and inside a deployed
ServerApp; everything it learns about a round is committed to the run store
(which the console and `fedtune runs` read, and which makes a killed server
resumable) and then handed to the `Reporter`, which the CLI renders.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flwr.app import RecordDict
from flwr.serverapp import Grid

from fedtune.common.adapter import (
    AdapterState,
    adapter_state,
    add_scaled,
    check_compatible,
    load_state,
    save_state,
    to_record,
)
from fedtune.common.config import FederationSpec
from fedtune.common.model import LoadedModel, fingerprint_model, load_lora_model
from fedtune.common.recipe import phase_of, select, trained_keys
from fedtune.server.aggregation import RoundUpdate, plain_round
from fedtune.server.console.export import write_adapter
from fedtune.server.distributed import DistributedHead
from fedtune.server.evaluation import evaluate_round, round_config
from fedtune.server.roster import Roster
from fedtune.server.scores import EvalTotals, SiteEval, roster_name, totals_of
from fedtune.server.secure_round import secure_round
from fedtune.server.store import RunStore, StoreError

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    round: int
    sampled: int = 0
    update: RoundUpdate | None = None
    evals: dict[int, SiteEval] = field(default_factory=dict)
    totals: EvalTotals | None = None  # the secure sum's; else the sites' own figures, pooled
    missing: dict[str, str] = field(default_factory=dict)  # site -> why it did not contribute to the update
    bytes_down: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0
    error: str | None = None

    @property
    def pooled(self) -> EvalTotals | None:
        return self.totals or totals_of(self.evals)

    @property
    def weighted_accuracy(self) -> float | None:
        return self.pooled.accuracy if self.pooled else None

    @property
    def weighted_loss(self) -> float | None:
        return self.pooled.loss if self.pooled else None


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
    resumed_after: int | None = None  # last round completed before this process took over, if resumed


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


@dataclass
class _Scoring:
    """Fills a finished round's report with the scores its adapter got, which arrive with the next message.

    The round itself (update, checkpoint) is committed as soon as it ends, so a crash never loses it; its
    scores are added to the store when they come, and only then is the round shown to the operator.
    """

    store: RunStore
    reporter: Reporter
    run: str
    roster: Roster
    pending: RoundReport | None = None

    def scored(self, evals: dict[int, SiteEval], totals: EvalTotals | None, eval_s: float | None = None) -> None:
        report, self.pending = self.pending, None
        if report is None:
            return
        report.evals, report.totals = evals, totals
        self.store.record_scores(self.run, report, names=self.roster.names, eval_s=eval_s)
        self.reporter.round_finished(report)


def _missing(update: RoundUpdate, sampled: list[int], names: dict[int, str]) -> dict[str, str]:
    """Every sampled site that did not contribute, by its roster name, with the reason the operator can act on."""
    out = {}
    for node in sampled:
        site = update.sites.get(node)
        if node in update.failed:
            reason = update.failed[node]
        elif site is not None and site.declined:
            reason = f"declined: {site.declined}"
        elif site is None:
            reason = "no reply"
        else:
            continue
        out[roster_name(names, node)] = reason
    return out


def _check_same_federation(run: str, stored_json: str, spec: FederationSpec) -> None:
    """A resumed run must train what it started training; only where the files live may change."""
    old = FederationSpec.model_validate_json(stored_json).model_dump(mode="json", exclude={"output_dir"})
    new = spec.model_dump(mode="json", exclude={"output_dir"})
    old["base_model"]["path"] = new["base_model"]["path"]  # the fingerprint, compared here too, is what counts
    differ = sorted(k for k in old if old[k] != new.get(k))
    if differ:
        raise ValueError(
            f"run {run} was started with a different federation ({', '.join(differ)} differ); resume it with "
            "the federation stored in the run store (`fedtune runs show RUN`), or start a new run"
        )


@dataclass
class _Start:
    """Where a run (re)starts: the adapter to start from, the first round to execute, which attempt this is."""

    state: AdapterState
    next_round: int
    attempt: int


def _start_or_resume(store: RunStore, run: str, spec: FederationSpec, out_dir: Path, initial: AdapterState) -> _Start:
    if not store.has_run(run):
        store.create_run(
            run,
            name=spec.name,
            federation_json=spec.model_dump_json(),
            rounds_total=spec.training.rounds,
            fingerprint=spec.base_model.fingerprint or "",
            out_dir=out_dir,
        )
        return _Start(initial, 0, 1)
    _check_same_federation(run, store.run(run)["federation"], spec)
    last = store.last_completed_round(run)
    if last is None:
        return _Start(initial, 0, store.begin_attempt(run))
    # Rounds without an update keep the previous adapter, so the newest checkpoint up to `last` is the state.
    newest = max((c.round for c in store.checkpoints(run) if c.round <= last), default=None)
    if newest is None:
        raise StoreError(f"run {run} completed round {last} but has no checkpoint up to it; it cannot be resumed")
    saved = load_state(store.checkpoint(run, newest).path)  # SHA-256 verified against the store
    # safetensors files list tensors by name; secure aggregation needs the adapter's own order.
    state = OrderedDict((name, saved[name]) for name in initial if name in saved)
    if len(state) != len(saved):
        raise StoreError(f"run {run}: the round-{newest} checkpoint has tensors this model does not")
    check_compatible(state, initial)
    attempt = store.begin_attempt(run)  # only once the checkpoint proved good: a refused resume changes nothing
    log.info("run %s: resuming after round %d (attempt %d) from the round-%d checkpoint", run, last, attempt, newest)
    return _Start(state, last + 1, attempt)


def _checkpoint_path(out_dir: Path, round_: int) -> Path:
    return out_dir / "checkpoints" / f"round-{round_:04d}.safetensors"


def run_federation(
    grid: Grid,
    spec: FederationSpec,
    *,
    out_dir: Path,
    reporter: Reporter | None = None,
    run: str | None = None,
    store: RunStore | Path | None = None,
) -> FederationResult:
    """Run (or resume) a federation, recording every finished round in the run store.

    `store` defaults to `out_dir/store.sqlite`. If `run` is already in the store, the
    run resumes after its last completed round from that round's checkpoint (SHA-256
    checked). A round that was in flight when the server died is re-executed under a
    new attempt id (`RUN.N`), which is what sites key their privacy ledgers on: sites
    that had already trained it pay for it again, openly in their ledgers and within
    their caps, rather than declining it as a duplicate and leaving a hole in the run.
    """
    own_store = not isinstance(store, RunStore)
    db = store if isinstance(store, RunStore) else RunStore(store or Path(out_dir) / "store.sqlite")
    run = run or uuid.uuid4().hex[:12]
    try:
        return _run(grid, spec, db, out_dir=Path(out_dir), reporter=reporter or _Silent(), run=run)
    finally:
        if own_store:
            db.close()


def _run(
    grid: Grid, spec: FederationSpec, store: RunStore, *, out_dir: Path, reporter: Reporter, run: str
) -> FederationResult:
    out_dir = out_dir / run
    fingerprint = fingerprint_model(spec.base_model.path)
    if spec.base_model.fingerprint and spec.base_model.fingerprint != fingerprint:
        raise ValueError(
            f"the server's base model at {spec.base_model.path} has fingerprint {fingerprint[:16]}..., "
            f"not the federation's {spec.base_model.fingerprint[:16]}..."
        )
    # Sites check their local weights against this exact value.
    spec = spec.model_copy(update={"base_model": spec.base_model.model_copy(update={"fingerprint": fingerprint})})
    loaded = load_lora_model(spec, seed=spec.training.seed)
    start = _start_or_resume(store, run, spec, out_dir, adapter_state(loaded.model))
    try:  # from here on the run is marked running in the store: leave it marked as what happened
        result = _rounds(grid, spec, store, start, out_dir=out_dir, reporter=reporter, run=run, loaded=loaded)
    except BaseException as exc:
        status = "failed" if isinstance(exc, Exception) else "interrupted"
        store.finish_run(run, status, error=f"{type(exc).__name__}: {exc}")
        raise
    store.finish_run(run, "completed", adapter_dir=result.adapter_dir)
    return result


def _rounds(
    grid: Grid,
    spec: FederationSpec,
    store: RunStore,
    start: _Start,
    *,
    out_dir: Path,
    reporter: Reporter,
    run: str,
    loaded: LoadedModel,
) -> FederationResult:
    """Rounds of train -> aggregate -> checkpoint. Each training message also makes the sites score the adapter it
    carries, so round r's scores arrive with round r + 1 and fill in its report (`_Scoring`); the last round's
    adapter is scored by one evaluation at the end. The adapter goes down once per round."""
    t = spec.training
    state, attempt = start.state, start.attempt
    wire_run = run if attempt == 1 else f"{run}.{attempt}"  # the id sites see and key their ledgers on
    nodes = _wait_for_nodes(grid, t.min_sites, t.round_timeout_s)
    log.info("run %s: %d site(s) connected, adapter has %d tensors", run, len(nodes), len(state))
    roster = Roster()
    scoring = _Scoring(store, reporter, run, roster)

    if start.next_round == 0:
        reports: list[RoundReport] = []
        store.round_started(run, 0, attempt)
        reporter.round_started(0, t.rounds)
        baseline = RoundReport(round=0, sampled=len(nodes))
        # Round 0's "checkpoint" is the initial adapter (fresh LoRA + head): a resume never depends on re-seeding.
        save_state(state, _checkpoint_path(out_dir, 0), {"round": "0"})
        roster.refresh(grid, spec, wire_run, 0, nodes)
        store.record_round(run, baseline, names=roster.names, attempt=attempt, checkpoint=_checkpoint_path(out_dir, 0))
        reports.append(baseline)
    else:
        # Node ids are per connection: learn who is who again.
        roster.refresh(grid, spec, wire_run, start.next_round - 1, nodes)
        reports = store.round_reports(run, node_of={name: node for node, name in roster.names.items()})
    scoring.pending = reports[-1] if reports else None  # the last finished round: the next message scores it
    distributed = DistributedHead(grid, spec, wire_run, roster.names) if spec.privacy.noise == "distributed" else None

    for round_ in range(max(1, start.next_round), t.rounds + 1):
        started = time.monotonic()
        store.round_started(run, round_, attempt)
        reporter.round_started(round_, t.rounds)
        nodes = sorted(grid.get_node_ids())
        roster.refresh(grid, spec, wire_run, round_, nodes)
        ready = roster.ready(nodes)
        # Seeded per round so that a resumed run samples exactly as an uninterrupted one would.
        rng = random.Random(f"{t.seed}:{round_}")
        sampled = sorted(rng.sample(ready, min(t.sites_per_round, len(ready)))) if t.sites_per_round else ready
        report = RoundReport(round=round_, sampled=len(sampled))
        content = RecordDict({"global": to_record(state), "config": round_config(spec, wire_run, round_)})
        group = f"{wire_run}:{round_}"
        trained = select(state, trained_keys(state, spec, phase_of(spec, round_)))  # what sites send back
        if distributed is not None:  # the server's optimizer took the steps: the delta applies as it is
            update = distributed.round(state, round_, sampled)
        elif spec.secagg.enabled:
            update = secure_round(
                grid, spec, content, sampled, names=roster.names, round_=round_, group=group, template=trained
            )
        else:
            update = plain_round(grid, spec, content, sampled, names=roster.names, group=group, template=trained)
        report.update = update
        scoring.scored(update.evals, update.totals)
        for node, problem in roster.problems.items():
            if node in nodes:
                update.failed.setdefault(node, problem)
        checkpoint = None
        if update.mean_delta is None:
            report.error = update.error
            log.warning("round %d: no update applied: %s", round_, update.error)
        else:
            state = add_scaled(state, update.mean_delta, 1.0 if distributed else t.server_learning_rate)
            checkpoint = _checkpoint_path(out_dir, round_)
            save_state(state, checkpoint, {"round": str(round_)})
        report.missing = _missing(update, sorted(set(sampled) | set(update.failed)), roster.names)
        report.bytes_down = dict(update.bytes_down)
        report.wall_s = time.monotonic() - started
        store.record_round(
            run, report, names=roster.names, attempt=attempt, checkpoint=checkpoint, train_s=report.wall_s
        )
        reports.append(report)
        scoring.pending = report

    if scoring.pending is not None:  # the last adapter: no training message carries it, so one evaluation
        last_round = scoring.pending.round
        nodes = sorted(grid.get_node_ids())
        roster.refresh(grid, spec, wire_run, last_round, nodes)
        began = time.monotonic()
        ev = evaluate_round(grid, spec, wire_run, last_round, state, roster.ready(nodes), roster.names)
        if ev.error:
            log.warning("round %d: no federation-level evaluation: %s", last_round, ev.error)
        for node, reason in ev.failed.items():
            log.warning("round %d: %s was not scored: %s", last_round, roster.names.get(node, node), reason)
        for node, down_bytes in ev.bytes_down.items():
            scoring.pending.bytes_down[node] = scoring.pending.bytes_down.get(node, 0) + down_bytes
        scoring.scored(ev.evals, ev.totals, eval_s=time.monotonic() - began)

    last = reports[-1].round if reports else 0
    adapter_dir = write_adapter(loaded.model, state, out_dir / "adapter", spec, store, run, last)
    return FederationResult(
        run=run,
        rounds=reports,
        adapter_dir=adapter_dir,
        final_state=state,
        resumed_after=start.next_round - 1 if start.next_round > 0 else None,
    )
