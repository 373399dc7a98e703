"""What the console shows, computed from the store once, in Python, not in the page's script.

The page only draws these numbers, so the browser test, `fedtune runs show`
and the JSON API all agree on them by construction.
"""

from __future__ import annotations

import time
from typing import Any

from fedtune.server.console.axes import Axis, fitted_axis
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


def _values(series: Series) -> list[float]:
    return [point[1] for points in series.values() for point in points]


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


def site_round_status(row: dict[str, Any]) -> str:
    """One word for what a site did in a round; a failure outranks a decline, which outranks training."""
    if row["failed"]:
        return "failed"
    if row["declined"]:
        return "declined"
    return "trained" if row["trained"] else "eval-only"


def privacy_rounds(site_rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round and site, the privacy figures the store holds, as the site reported them after that round.

    `epsilon` is the site's ledger total for the dataset (so round 0 shows what earlier runs had spent), `sigma`
    the noise multiplier of its DP-SGD steps that round (plaintext and local noise only: under distributed noise
    a site does not report one, and the sum's sigma follows from the recipe), `epsilon_worst` its own-share epsilon
    under distributed noise. None where the store has no figure: nothing is filled in.
    """
    return [
        {
            "round": s["round"],
            "site": s["site"],
            "status": site_round_status(s),
            "epsilon": s["epsilon"],
            "epsilon_worst": s["epsilon_worst"],
            "cap": s["epsilon_cap"],
            "sigma": s["noise_multiplier"],
        }
        for s in site_rounds
    ]


def epsilon_axis(privacy: list[dict[str, Any]], site_rounds: list[dict[str, Any]]) -> Axis:
    """From 0 (spent budget only grows) to past the highest cap or spend, so each site's headroom shows."""
    values = [p["cap"] for p in privacy] + [s[k] for s in site_rounds for k in ("epsilon", "epsilon_worst")]
    return fitted_axis([0.0, *values], "epsilon spent", floor=0.0, min_span=1.0)


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
    accuracy = {"weighted": _weighted(rounds, "weighted_accuracy"), **_series(site_rounds, "eval_accuracy")}
    loss = {"weighted": _weighted(rounds, "weighted_loss"), **_series(site_rounds, "eval_loss")}
    privacy = privacy_table(site_rounds)
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
            "accuracy": accuracy,
            "loss": loss,
            "epsilon": _series(site_rounds, "epsilon"),
            "epsilon_worst": _series(site_rounds, "epsilon_worst"),
        },
        "axes": {
            # held-out accuracy within 0-1, fitted so that 0.88 -> 0.92 is a visible climb, not a flat line
            "accuracy": fitted_axis(_values(accuracy), "held-out accuracy", floor=0.0, ceil=1.0, min_span=0.02),
            "loss": fitted_axis(_values(loss), "held-out loss", floor=0.0, min_span=0.02),
            "epsilon": epsilon_axis(privacy, site_rounds),
        },
        "bytes": [by_round[k] for k in sorted(by_round)],
        "privacy": privacy,
        "privacy_rounds": privacy_rounds(site_rounds),
        "health": site_health(snap["sites"], site_rounds),
        "checkpoints": [
            {"round": c["round"], "sha256": c["sha256"], "created": c["created"]} for c in snap["checkpoints"]
        ],
        "site_rounds": site_rounds,
    }
