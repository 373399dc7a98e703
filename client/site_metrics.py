"""The site agent's Prometheus metrics and health, read from the site's own ledger and egress audit log.

For the site's operator, on the site's machine: the same figures `fedtune client status` and `audit` print,
and nothing more. Epsilon spent per dataset budget (the ledger's figure after its last spend), rounds trained
(spends) and declined, bytes that left the site per egress kind, the last activity, whether the SuperNode and
the worker run and whether the ledger passes its checks (a ledger that fails closed refuses every round, which
is what a site operator must be paged for). Decline reasons are free text with numbers in them, so they stay out
of the labels; `fedtune client status` lists them.

A collector that reads the files on every scrape, not gauges the training code updates: the worker is another
process, the ledger and the log are the single source of truth, and reading them is what the CLI does too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from fedtune.client.audit import EgressLog, egress_path
from fedtune.client.ledger import LedgerError, LedgerUnavailable, PrivacyLedger, verify

Processes = Callable[[], Mapping[str, bool]]  # process name -> alive, e.g. {"supernode": True, "worker": True}
LEDGER_TIMEOUT_S = 5.0  # a scrape waits this long for a worker's ledger commit, well inside Prometheus' 10 s


def ledger_path(state_dir: Path) -> Path:
    return Path(state_dir) / "ledger.sqlite"


@dataclass(frozen=True)
class LedgerFigures:
    epsilon: dict[str, float] = field(default_factory=dict)  # budget -> epsilon after its last spend
    spends: dict[str, int] = field(default_factory=dict)  # budget -> rounds paid for
    declines: int = 0
    last: float | None = None  # time of the newest spend or decline


@dataclass(frozen=True)
class EgressFigures:
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    last: float | None = None


def read_ledger(path: Path) -> LedgerFigures:
    """The ledger's figures, opened with every check training uses; raises LedgerError where training would refuse.

    A site that never trained has no ledger yet: that is reported as empty, and no file is created for it.
    """
    path = Path(path)
    if not path.exists():
        check = verify(path)  # a missing ledger is fine only where the state dir shows no spend
        if not check.ok:
            raise LedgerUnavailable(check.lines[-1])
        return LedgerFigures()
    with PrivacyLedger(path, timeout=LEDGER_TIMEOUT_S) as ledger:
        entries, declines = ledger.entries(), ledger.declines()
    epsilon: dict[str, float] = {}
    spends: dict[str, int] = {}
    for e in entries:  # commit order: the last spend of a budget carries its current figure, as `status` shows
        epsilon[e.dataset] = e.epsilon_after
        spends[e.dataset] = spends.get(e.dataset, 0) + 1
    times = [e.created for e in entries] + [created for *_, created in declines]
    return LedgerFigures(epsilon, spends, len(declines), max(times, default=None))


def read_egress(state_dir: Path) -> EgressFigures:
    """Bytes that left the site per kind: records whose reply the SuperNode never took did not leave."""
    sent: dict[str, int] = {}
    last = None
    for e in EgressLog(egress_path(state_dir)).entries():
        if e.delivered is False:
            continue
        sent[e.kind] = sent.get(e.kind, 0) + e.bytes
        last = e.time if last is None else max(last, e.time)
    return EgressFigures(sent, last)


class SiteCollector:
    """Prometheus collector over one site's state dir; `processes` reports the agent's children where it runs."""

    def __init__(
        self, state_dir: Path, *, epsilon_cap: float | None = None, processes: Processes | None = None
    ) -> None:
        self.state_dir = Path(state_dir)
        self.epsilon_cap = epsilon_cap
        self.processes = processes

    def collect(self) -> Iterator[Metric]:
        if self.processes is not None:
            up = GaugeMetricFamily("fedtune_agent_process_up", "1 while the agent's child runs", labels=["process"])
            for name, alive in sorted(self.processes().items()):
                up.add_metric([name], int(alive))
            yield up
        if self.epsilon_cap is not None:
            yield GaugeMetricFamily(
                "fedtune_agent_epsilon_cap",
                "Epsilon cap of the site config (a federation's default may be lower for a site without its own)",
                value=self.epsilon_cap,
            )
        last: list[float] = []
        ledger_ok = GaugeMetricFamily(
            "fedtune_agent_ledger_ok", "1 if the privacy ledger opens and passes its checks (0: rounds are refused)"
        )
        try:
            figures = read_ledger(ledger_path(self.state_dir))
        except (LedgerError, OSError):
            ledger_ok.add_metric([], 0)
            yield ledger_ok
        else:
            ledger_ok.add_metric([], 1)
            yield ledger_ok
            yield from _ledger_families(figures)
            last += [figures.last] if figures.last is not None else []
        egress_ok = GaugeMetricFamily("fedtune_agent_egress_log_ok", "1 if the egress audit log reads")
        try:
            sent = read_egress(self.state_dir)
        except (OSError, ValueError, TypeError):  # JSONDecodeError is a ValueError: a damaged or altered line
            egress_ok.add_metric([], 0)
            yield egress_ok
        else:
            egress_ok.add_metric([], 1)
            yield egress_ok
            sent_bytes = CounterMetricFamily(
                "fedtune_agent_egress_bytes", "Bytes that left the site, by egress kind", labels=["kind"]
            )
            for kind, n in sorted(sent.bytes_by_kind.items()):
                sent_bytes.add_metric([kind], n)
            yield sent_bytes
            last += [sent.last] if sent.last is not None else []
        if last:
            yield GaugeMetricFamily(
                "fedtune_agent_last_activity_timestamp_seconds",
                "Unix time of the newest spend, decline or message that left the site",
                value=max(last),
            )


def _ledger_families(figures: LedgerFigures) -> Iterator[Metric]:
    eps = GaugeMetricFamily(
        "fedtune_agent_epsilon_spent", "Epsilon spent per dataset budget, as the ledger says", labels=["dataset"]
    )
    trained = CounterMetricFamily(
        "fedtune_agent_rounds_trained", "Rounds trained: spends in the privacy ledger", labels=["dataset"]
    )
    for budget in sorted(figures.epsilon):
        eps.add_metric([budget], figures.epsilon[budget])
        trained.add_metric([budget], figures.spends[budget])
    yield eps
    yield trained
    yield CounterMetricFamily("fedtune_agent_rounds_declined", "Rounds the site declined", value=figures.declines)


def site_health(state_dir: Path, processes: Processes) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body): 200 when every child runs and the ledger opens with its checks, else 503."""
    alive = dict(processes())
    problems = [f"{name} is not running" for name, up in sorted(alive.items()) if not up]
    if not alive:
        problems.append("the agent's processes have not started")
    try:
        read_ledger(ledger_path(state_dir))
        ledger = "ok"
    except (LedgerError, OSError) as exc:
        ledger = "refused"
        problems.append(str(exc))
    body: dict[str, Any] = {"status": "unavailable" if problems else "ok", "processes": alive, "ledger": ledger}
    if problems:
        body["problems"] = problems
    return (503 if problems else 200), body


def site_registry(state_dir: Path, *, epsilon_cap: float | None, processes: Processes | None) -> CollectorRegistry:
    """A registry of the site's collector only (not the process-wide default with Python's own metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SiteCollector(state_dir, epsilon_cap=epsilon_cap, processes=processes))
    return registry
