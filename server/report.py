"""Rendering a federation for people: live progress while it runs, one table when it ends."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedtune.server.federation import FederationResult, RoundReport


class RichReporter:
    """Progress bar over rounds plus one line per finished round."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(log_path=False)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} rounds"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self._task: int | None = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def round_started(self, round_: int, total: int) -> None:
        if self._task is None:
            self._task = self.progress.add_task("federation", total=total)
        label = "the base model" if round_ == 0 else f"round {round_}: score, train, aggregate"
        self.progress.update(self._task, description=label)

    def round_finished(self, report: RoundReport) -> None:
        acc = report.weighted_accuracy
        acc_text = f"accuracy {acc:.3f}" if acc is not None else ""
        if report.round == 0:
            sites = report.pooled.sites if report.pooled else 0
            self.console.log(f"base model: {acc_text} over {sites} site(s)")
            return
        if self._task is not None:
            self.progress.advance(self._task)
        upd = report.update
        trained = [s for s in upd.sites.values() if not s.declined] if upd else []
        declined = [s for s in upd.sites.values() if s.declined] if upd else []
        msg = f"round {report.round}: {len(trained)} site(s) trained, {acc_text}, {report.wall_s:.1f}s"
        if declined:
            msg += f", {len(declined)} declined"
        if report.error:
            msg += f" [red]- {report.error}[/red]"
        self.console.log(msg)
        for site, reason in sorted(report.missing.items()):
            self.console.log(f"  [yellow]{site} did not contribute:[/yellow] {escape(reason)}")


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def final_table(result: FederationResult) -> Table:
    """Per site: accuracy before/after, epsilon spent, bytes per round each way."""
    base, last = result.rounds[0], result.rounds[-1]
    worst: dict[str, float] = {}  # distributed noise: each site's epsilon of its own noise share alone, latest
    for r in result.rounds[1:]:
        for t in r.update.sites.values() if r.update else ():
            if t.epsilon_worst is not None:
                worst[t.site] = t.epsilon_worst
    table = Table(title=f"fedtune run {result.run}: global adapter vs base model")
    cols = ("site", "base acc", "final acc", "gain", "epsilon spent", *(("own share alone",) if worst else ()))
    for col in (*cols, "up KiB/round", "down KiB/round"):
        table.add_column(col, justify="left" if col == "site" else "right")
    by_site: dict[str, dict[str, object]] = {}
    for node, ev in base.evals.items():
        by_site.setdefault(ev.site, {})["base"] = ev.accuracy
        by_site[ev.site]["node"] = node
    for ev in last.evals.values():
        by_site.setdefault(ev.site, {})["final"] = ev.accuracy
        by_site[ev.site]["epsilon"] = ev.epsilon
    for name in sorted(by_site):
        row = by_site[name]
        node = row.get("node")
        ups = [r.update.sites[node].bytes_up for r in result.rounds[1:] if r.update and node in r.update.sites]
        downs = [r.bytes_down.get(node, 0) for r in result.rounds[1:]]
        b, f = row.get("base"), row.get("final")
        gain = f"{f - b:+.3f}" if isinstance(b, float) and isinstance(f, float) else "-"
        table.add_row(
            name,
            f"{b:.3f}" if isinstance(b, float) else "-",
            f"{f:.3f}" if isinstance(f, float) else "-",
            gain,
            f"{row.get('epsilon', 0.0):.2f}",
            *((f"{worst[name]:.2f}" if name in worst else "-",) if worst else ()),
            f"{_mean(ups) / 1024:.1f}",
            f"{_mean(downs) / 1024:.1f}",
        )
    return table


def worse_than_base(result: FederationResult) -> str | None:
    """A warning where the final model scores below the base model on the sites' held-out rows, with the usual
    causes: a privacy budget that leaves too much noise for the rows and rounds, or too few rows."""
    base, last = result.rounds[0].weighted_accuracy, result.rounds[-1].weighted_accuracy
    if base is None or last is None or last >= base:
        return None
    spent = max((e.epsilon for e in result.rounds[-1].evals.values()), default=None)
    rows = result.rounds[-1].pooled.num_examples if result.rounds[-1].pooled else None
    detail = ", ".join(
        part
        for part in (
            f"epsilon {spent:.2f} spent" if spent else "",
            f"{len(result.rounds) - 1} round(s)",
            f"{rows} held-out rows scored" if rows else "",
        )
        if part
    )
    return (
        f"the final model scores {last:.3f}, below the base model's {base:.3f} ({detail}): DP noise outweighed what "
        "the rows could teach; use more rows per site, a larger epsilon cap or fewer rounds, and keep the base model"
    )
