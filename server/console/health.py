"""The console's liveness answer for a load balancer or an uptime check: can it read the run store?

Open to anyone who reaches the port (probes rarely send headers), so it says only what a probe needs: whether
the store reads, how many runs it holds, and when a round last completed. A failure names what is wrong
with the store, but by its file name: the full path on the operator's disk is not the caller's business.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from fedtune.server.store import RunStore, StoreError


def store_health(store_path: Path) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body): 200 when the store opens read-only and answers a query, else 503 with a reason."""
    store_path = Path(store_path)
    try:
        with RunStore(store_path, readonly=True) as store:
            runs = store.runs()
            ends = [
                r["finished"]
                for run in runs
                for r in store.rounds(run["id"])
                if r["status"] == "completed" and r["finished"] is not None
            ]
    except (StoreError, sqlite3.DatabaseError) as exc:
        reason = str(exc).replace(str(store_path), store_path.name)
        return 503, {"status": "unavailable", "store": "unreadable", "reason": reason}
    return 200, {
        "status": "ok",
        "store": "readable",
        "runs": len(runs),
        "last_round_completed": max(ends) if ends else None,
    }
