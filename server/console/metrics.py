"""Prometheus metrics of the run store, computed when Prometheus scrapes, for the operator's alerts.

A collector, not module-level gauges: the store is the single source of truth (the federation process writes it,
the console only reads it), so every scrape reads it afresh and the figures can never drift from what the console
and `fedtune runs show` display; nothing is held between scrapes, and two consoles on one store agree.

Only what the store holds is exported. Per run: its status, rounds planned, completed and failed, attempts
(restarts), when its last completed round finished (and how long ago), the newest weighted held-out accuracy and
loss, and of its newest finished round the stage durations, the bytes each way and how many sites trained,
declined or failed. Per run and site: epsilon spent (the figure the site reported), its cap where the site sent
one, the own-share epsilon of distributed noise, rounds trained and declined. Per site: last seen and status.
Decline and failure reasons are free text and stay out of the labels (they would make a new series each); the
console and `fedtune runs show` list them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily, InfoMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.registry import CollectorRegistry

from fedtune.server.console.views import privacy_table
from fedtune.server.store import FINISHED, RunStore, StoreError

SITE_STATES = ("trained", "ok", "declined", "unreachable")  # what the store's `sites.status` holds
STAGES = ("wall", "train", "eval")  # per-round durations the store records (`wall_s`, `train_s`, `eval_s`)


class StoreCollector:
    """Reads the run store read-only on every `collect`; an unreadable store gives `fedtune_store_up 0` only."""

    def __init__(self, store_path: Path, clock: Callable[[], float] = time.time) -> None:
        self.store_path = Path(store_path)
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fedtune_store_up", "1 if the console could read the run store at this scrape")
        try:
            with RunStore(self.store_path, readonly=True) as store:
                families = _families(store, self.clock())  # all read before any is yielded: one consistent view
        except (StoreError, sqlite3.DatabaseError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families


def registry_for(store_path: Path) -> CollectorRegistry:
    """A registry of its own per console app: the process-wide default would mix in unrelated collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store_path))
    return registry


def _gauge(name: str, doc: str, labels: Iterable[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _last_finished(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in rounds if r["status"] in FINISHED]
    return max(done, key=lambda r: r["round"]) if done else None


def _newest_scored(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Scores of round N arrive with round N+1's messages, so the newest completed round may not have them yet."""
    scored = [
        r
        for r in rounds
        if r["status"] == "completed" and (r["weighted_accuracy"] is not None or r["weighted_loss"] is not None)
    ]
    return max(scored, key=lambda r: r["round"]) if scored else None


def _families(store: RunStore, now: float) -> list[Metric]:
    run_l, site_l = ("run",), ("run", "site")
    info = InfoMetricFamily("fedtune_run", "A run in the store: its federation name and status", labels=run_l)
    planned = _gauge("fedtune_run_rounds_planned", "Training rounds the run was started with", run_l)
    completed = _gauge("fedtune_run_rounds_completed", "Training rounds (round > 0) completed", run_l)
    failed = _gauge("fedtune_run_rounds_failed", "Training rounds that failed (never re-run)", run_l)
    attempts = _gauge("fedtune_run_attempts", "Times the run was started (1 + resumes after a stop)", run_l)
    last_round = _gauge("fedtune_run_last_round", "Number of the newest finished round (0: the baseline)", run_l)
    last_ts = _gauge(
        "fedtune_run_last_completed_round_timestamp_seconds",
        "Unix time the newest completed round (baseline included) finished",
        run_l,
    )
    since = _gauge(
        "fedtune_run_seconds_since_last_completed_round", "Seconds from that round's end to this scrape", run_l
    )
    durations = _gauge(
        "fedtune_run_last_round_duration_seconds",
        "Stage durations of the newest finished round (wall: the whole round)",
        ("run", "stage"),
    )
    bytes_ = _gauge(
        "fedtune_run_last_round_bytes",
        "Bytes of the newest finished round, summed over sites (up: sites to server)",
        ("run", "direction"),
    )
    outcomes = _gauge(
        "fedtune_run_last_round_sites",
        "Sites of the newest finished round by outcome (trained, declined, failed)",
        ("run", "outcome"),
    )
    accuracy = _gauge(
        "fedtune_run_weighted_accuracy", "Held-out accuracy weighted by examples, newest scored round", run_l
    )
    loss = _gauge("fedtune_run_weighted_loss", "Held-out loss weighted by examples, newest scored round", run_l)
    scored = _gauge("fedtune_run_scored_round", "The round the weighted accuracy and loss are of", run_l)
    eps = _gauge("fedtune_site_epsilon_spent", "Epsilon the site reported spent, latest figure", site_l)
    cap = _gauge("fedtune_site_epsilon_cap", "Epsilon cap the site reported enforcing", site_l)
    own = _gauge(
        "fedtune_site_epsilon_own_share",
        "Distributed noise only: the site's epsilon were its own noise share all there is",
        site_l,
    )
    trained = _gauge("fedtune_site_rounds_trained", "Rounds of the run the site trained", site_l)
    declined = _gauge("fedtune_site_rounds_declined", "Rounds of the run the site declined", site_l)

    for run in store.runs():
        rid = run["id"]
        info.add_metric([rid], {"name": run["name"], "status": run["status"]})
        rounds = store.rounds(rid)
        planned.add_metric([rid], run["rounds_total"])
        completed.add_metric([rid], sum(r["round"] > 0 and r["status"] == "completed" for r in rounds))
        failed.add_metric([rid], sum(r["round"] > 0 and r["status"] == "failed" for r in rounds))
        attempts.add_metric([rid], run["attempts"])
        ends = [r["finished"] for r in rounds if r["status"] == "completed" and r["finished"] is not None]
        if ends:
            last_ts.add_metric([rid], max(ends))
            since.add_metric([rid], max(0.0, now - max(ends)))
        if (best := _newest_scored(rounds)) is not None:
            scored.add_metric([rid], best["round"])
            if best["weighted_accuracy"] is not None:
                accuracy.add_metric([rid], best["weighted_accuracy"])
            if best["weighted_loss"] is not None:
                loss.add_metric([rid], best["weighted_loss"])
        site_rounds = store.site_rounds(rid)
        if (last := _last_finished(rounds)) is not None:
            last_round.add_metric([rid], last["round"])
            for stage in STAGES:
                if last[f"{stage}_s"] is not None:
                    durations.add_metric([rid, stage], last[f"{stage}_s"])
            rows = [s for s in site_rounds if s["round"] == last["round"]]
            bytes_.add_metric([rid, "up"], sum(s["bytes_up"] for s in rows))
            bytes_.add_metric([rid, "down"], sum(s["bytes_down"] for s in rows))
            outcomes.add_metric([rid, "trained"], sum(bool(s["trained"]) for s in rows))
            outcomes.add_metric([rid, "declined"], sum(bool(s["declined"]) for s in rows))
            outcomes.add_metric([rid, "failed"], sum(bool(s["failed"]) for s in rows))
        for p in privacy_table(site_rounds):  # the console's own figures, so the two never disagree
            labels = [rid, p["site"]]
            trained.add_metric(labels, p["trained"])
            declined.add_metric(labels, p["declined"])
            for family, value in ((eps, p["epsilon"]), (cap, p["cap"]), (own, p["epsilon_worst"])):
                if value is not None:
                    family.add_metric(labels, value)

    status = StateSetMetricFamily("fedtune_site_status", "Each site's status after its last round", labels=["site"])
    seen = _gauge("fedtune_site_last_seen_timestamp_seconds", "Unix time the server last heard from the site", ["site"])
    for s in store.sites():
        states = dict.fromkeys((*SITE_STATES, s["status"]), False) | {s["status"]: True}
        status.add_metric([s["name"]], states)
        if s["last_seen"] is not None:
            seen.add_metric([s["name"]], s["last_seen"])
    return [
        info,
        planned,
        completed,
        failed,
        attempts,
        last_round,
        last_ts,
        since,
        durations,
        bytes_,
        outcomes,
        accuracy,
        loss,
        scored,
        eps,
        cap,
        own,
        trained,
        declined,
        status,
        seen,
    ]
