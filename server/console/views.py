"""What the console shows, computed from the store once, in Python, not in the page's script.

The page only draws these numbers, so the browser test, `fedtune runs show`
and the JSON API all agree on them by construction.
"""

from __future__ import annotations

import time
from typing import Any

from fedtune.server.store import FINISHED, RunStore

Series = dict[str, list[list[float]]]  # name -> [[round, value], ...]


def runs_overview(store: RunStore) -> list[dict[str, Any]]:
    return [
        {
            "id": r["id"],
            "name": r["name"],
            "status": r["status"],
            "rounds_done": r["rounds_done"],
            "rounds_total": r["rounds_total"],
            "attempts": r["attempts"],
            "started": r["started"],
            "finished": r["finished"],
            "updated": r["updated"],
            "accuracy": r["last_accuracy"],
            "error": r["error"],
        }
        for r in store.runs()
    ]


def _series(rows: list[dict[str, Any]], key: str) -> Series:
    out: Series = {}
    for s in rows:
        if s[key] is not None:
            out.setdefault(s["site"], []).append([s["round"], s[key]])
    return out


def _weighted(rounds: list[dict[str, Any]], key: str) -> list[list[float]]:
    return [[r["round"], r[key]] for r in rounds if r["status"] in FINISHED and r[key] is not None]


def privacy_table(site_rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per site: epsilon spent so far (the latest figure it reported) against its cap.

    Under distributed noise `epsilon` is what the site charged under its honest-site assumption and
    `epsilon_worst` the figure of its own noise share alone (the server colluding with every other site); None
    where the site never reported one (local noise).
    """
    table: dict[str, dict[str, Any]] = {}
    for s in site_rounds:  # ordered by round, so later rounds overwrite
        row = table.setdefault(
            s["site"],
            {"site": s["site"], "epsilon": None, "epsilon_worst": None, "cap": None, "trained": 0, "declined": 0},
        )
        if s["epsilon"] is not None:
            row["epsilon"] = s["epsilon"]
        if s["epsilon_worst"] is not None:
            row["epsilon_worst"] = s["epsilon_worst"]
        if s["epsilon_cap"] is not None:
            row["cap"] = s["epsilon_cap"]
        row["trained"] += int(bool(s["trained"]))
        row["declined"] += int(bool(s["declined"]))
    for row in table.values():
        eps, cap = row["epsilon"], row["cap"]
        row["fraction"] = eps / cap if eps is not None and cap else None
    return sorted(table.values(), key=lambda r: r["site"])


def site_health(sites: list[dict[str, Any]], site_rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    problems: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for s in site_rounds:
        entry = problems.setdefault(s["site"], {"declined": [], "failed": []})
        if s["declined"]:
            entry["declined"].append({"round": s["round"], "reason": s["declined"]})
        if s["failed"]:
            entry["failed"].append({"round": s["round"], "reason": s["failed"]})
    return [
        {
            "site": s["name"],
            "node_id": s["node_id"],
            "status": s["status"],
            "last_seen": s["last_seen"],
            "detail": s["detail"],
            **problems.get(s["name"], {"declined": [], "failed": []}),
        }
        for s in sites
    ]


def run_view(store: RunStore, run: str) -> dict[str, Any]:
    snap = store.snapshot(run)
    rounds, site_rounds = snap["rounds"], snap["site_rounds"]
    by_round: dict[int, dict[str, Any]] = {}
    for s in site_rounds:
        b = by_round.setdefault(s["round"], {"round": s["round"], "up": 0, "down": 0})
        b["up"] += s["bytes_up"]
        b["down"] += s["bytes_down"]
    accuracy = _series(site_rounds, "eval_accuracy")
    loss = _series(site_rounds, "eval_loss")
    info = snap["run"]
    return {
        "now": time.time(),
        "run": {k: info[k] for k in info if k != "federation"},
        "federation": info["federation"],
        "timeline": [
            {k: r[k] for k in ("round", "status", "attempt", "wall_s", "train_s", "eval_s", "sampled", "error")}
            | {"accuracy": r["weighted_accuracy"], "loss": r["weighted_loss"]}
            for r in rounds
        ],
        "charts": {
            "accuracy": {"weighted": _weighted(rounds, "weighted_accuracy"), **accuracy},
            "loss": {"weighted": _weighted(rounds, "weighted_loss"), **loss},
        },
        "bytes": [by_round[k] for k in sorted(by_round)],
        "privacy": privacy_table(site_rounds),
        "health": site_health(snap["sites"], site_rounds),
        "checkpoints": [
            {"round": c["round"], "sha256": c["sha256"], "created": c["created"]} for c in snap["checkpoints"]
        ],
        "site_rounds": site_rounds,
    }
