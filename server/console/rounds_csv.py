"""A run's per-round, per-site figures as CSV: what an operator takes into a spreadsheet or a risk report.

One row per (round, site) the store holds, in round then site order, with the store's own numbers (epsilon as the
site reported it, bytes as the server counted them); an empty cell where the store has no figure, never a zero.

Decline and failure reasons are text a site wrote, and site names come from the roster: a spreadsheet would run
a cell that starts with `=`, `+`, `-`, `@` (CSV injection), so such text cells get a leading apostrophe, the
usual defence. Numeric columns are written as numbers and left alone.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from fedtune.server.console.views import site_round_status
from fedtune.server.store import RunStore

COLUMNS = (
    "run",
    "round",
    "round_status",
    "site",
    "site_status",
    "accuracy",
    "loss",
    "eval_examples",
    "train_examples",
    "epsilon",
    "epsilon_worst",
    "epsilon_cap",
    "noise_multiplier",
    "bytes_up",
    "bytes_down",
    "declined",
    "failed",
)
_TEXT = ("site", "declined", "failed")  # written by, or named after, a site: defused for spreadsheets
_RISKY = ("=", "+", "-", "@", "\t", "\r")


def _defused(text: str | None) -> str:
    if not text:
        return ""
    return "'" + text if text.startswith(_RISKY) else text


def _cell(value: Any) -> Any:
    return "" if value is None else value


def csv_rows(store: RunStore, run: str) -> list[dict[str, Any]]:
    """The CSV's rows as dicts keyed by `COLUMNS` (before defusing), for callers that want the data itself."""
    info = store.run(run)
    run_id = info["id"]
    round_status = {r["round"]: r["status"] for r in store.rounds(run_id)}
    return [
        {
            "run": run_id,
            "round": s["round"],
            "round_status": round_status.get(s["round"], ""),
            "site": s["site"],
            "site_status": site_round_status(s),
            "accuracy": s["eval_accuracy"],
            "loss": s["eval_loss"],
            "eval_examples": s["eval_examples"],
            "train_examples": s["num_examples"],
            "epsilon": s["epsilon"],
            "epsilon_worst": s["epsilon_worst"],
            "epsilon_cap": s["epsilon_cap"],
            "noise_multiplier": s["noise_multiplier"],
            "bytes_up": s["bytes_up"],
            "bytes_down": s["bytes_down"],
            "declined": s["declined"],
            "failed": s["failed"],
        }
        for s in store.site_rounds(run_id)
    ]


def rounds_csv(store: RunStore, run: str) -> str:
    """The whole CSV text, header first; `\\r\\n` line ends as RFC 4180 and spreadsheets expect."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for row in csv_rows(store, run):
        writer.writerow({k: _defused(v) if k in _TEXT else _cell(v) for k, v in row.items()})
    return out.getvalue()
