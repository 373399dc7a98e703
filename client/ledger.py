"""The site's privacy ledger: every DP-SGD spend, keyed by dataset fingerprint.

It is the single source of truth for how much of a dataset's budget is gone,
across rounds, runs, federations and restarts. A spend is committed with a full
fsync *before* training starts, so a crash can only over-count, never lose a
spend whose update might already have left the site.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.privacy import Accountant, Spend, epsilon_spent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    delta REAL NOT NULL,
    epsilon_after REAL NOT NULL,
    created REAL NOT NULL,
    UNIQUE (dataset, run_id, round)
);
CREATE TABLE IF NOT EXISTS declines (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    reason TEXT NOT NULL,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class LedgerEntry:
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    created: float


class PrivacyLedger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # WAL + FULL fsyncs on every commit
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def history(self, dataset: str) -> list[Spend]:
        rows = self._db.execute(
            "SELECT noise_multiplier, sample_rate, steps FROM spends WHERE dataset=? ORDER BY id",
            (dataset,),
        ).fetchall()
        return [(float(s), float(q), int(n)) for s, q, n in rows]

    def entries(self, dataset: str | None = None) -> list[LedgerEntry]:
        query = "SELECT run_id, round, noise_multiplier, sample_rate, steps, epsilon_after, created FROM spends"
        params: tuple = ()
        if dataset is not None:
            query += " WHERE dataset=?"
            params = (dataset,)
        return [LedgerEntry(*row) for row in self._db.execute(query + " ORDER BY id", params)]

    def datasets(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT dataset FROM spends ORDER BY dataset")]

    def epsilon(self, dataset: str, delta: float, accountant: Accountant = "prv") -> float:
        return epsilon_spent(self.history(dataset), delta, accountant)

    def find(self, dataset: str, run_id: str, round_: int) -> LedgerEntry | None:
        row = self._db.execute(
            "SELECT run_id, round, noise_multiplier, sample_rate, steps, epsilon_after, created "
            "FROM spends WHERE dataset=? AND run_id=? AND round=?",
            (dataset, run_id, round_),
        ).fetchone()
        return LedgerEntry(*row) if row else None

    def record_spend(
        self,
        dataset: str,
        *,
        run_id: str,
        round_: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: Accountant = "prv",
    ) -> float:
        """Commit a spend durably and return the dataset's epsilon including it.

        A (run, round) pair is paid for at most once: a re-sent round would be a
        fresh noisy draw on the same data, i.e. a second spend the operator did
        not plan, so the duplicate is refused rather than silently paid.
        """
        history = [*self.history(dataset), (noise_multiplier, sample_rate, steps)]
        eps_after = epsilon_spent(history, delta, accountant)
        try:
            self._db.execute(
                "INSERT INTO spends (dataset, run_id, round, noise_multiplier, sample_rate, steps, delta,"
                " epsilon_after, created) VALUES (?,?,?,?,?,?,?,?,?)",
                (dataset, run_id, round_, noise_multiplier, sample_rate, steps, delta, eps_after, time.time()),
            )
        except sqlite3.IntegrityError:
            raise DuplicateRound(
                f"round {round_} of run {run_id} was already trained on this dataset; "
                "a second update for the same round would need a second spend, so the site declines"
            ) from None
        return eps_after

    def record_decline(self, dataset: str, *, run_id: str, round_: int, reason: str) -> None:
        self._db.execute(
            "INSERT INTO declines (dataset, run_id, round, reason, created) VALUES (?,?,?,?,?)",
            (dataset, run_id, round_, reason, time.time()),
        )

    def declines(self) -> list[tuple[str, int, str, float]]:
        return list(self._db.execute("SELECT run_id, round, reason, created FROM declines ORDER BY id"))


class DuplicateRound(RuntimeError):
    """The server asked for a round this dataset already paid for."""
