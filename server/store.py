"""The operator's run store: one SQLite file (WAL) that every view of a federation reads.

The federation loop writes it as rounds complete; the console, `fedtune runs`,
export and TensorBoard only read it. A round is *completed* exactly when its
row says so: the round's site metrics and its checkpoint row are committed in
the same transaction, so a server killed mid-round leaves either the whole
round or none of it, and a resumed run restarts from the last completed one.
WAL lets the console read while the server writes, from another process.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # federation.py writes the store, so the store only names its report types
    from fedtune.server.federation import RoundReport

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    federation TEXT NOT NULL,
    status TEXT NOT NULL,
    rounds_total INTEGER NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    updated REAL NOT NULL,
    base_fingerprint TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    out_dir TEXT NOT NULL,
    adapter_dir TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    run TEXT NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    wall_s REAL,
    train_s REAL,
    eval_s REAL,
    sampled INTEGER,
    error TEXT,
    weighted_accuracy REAL,
    weighted_loss REAL,
    PRIMARY KEY (run, round)
);
CREATE TABLE IF NOT EXISTS site_rounds (
    run TEXT NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    site TEXT NOT NULL,
    node_id TEXT,
    trained INTEGER NOT NULL DEFAULT 0,
    num_examples INTEGER,
    train_loss REAL,
    eval_examples INTEGER,
    eval_loss REAL,
    eval_accuracy REAL,
    epsilon REAL,
    epsilon_cap REAL,
    noise_multiplier REAL,
    bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0,
    declined TEXT,
    failed TEXT,
    epsilon_worst REAL,
    PRIMARY KEY (run, round, site)
);
CREATE TABLE IF NOT EXISTS sites (
    name TEXT PRIMARY KEY,
    node_id TEXT,
    last_seen REAL,
    status TEXT NOT NULL,
    detail TEXT,
    last_run TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run TEXT NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run, round)
);
"""

# Columns added after schema 1 shipped: (table, column, type). A writer adds any a store lacks (nullable, so the rows
# already there read as unknown); a reader of an older store sees them as NULL.
_ADDED_COLUMNS = (("site_rounds", "epsilon_worst", "REAL"),)

FINISHED = ("completed", "failed")  # round statuses after which the round is never re-run


class StoreError(RuntimeError):
    """The run store is missing, from another version, or does not hold what was asked for."""


class CheckpointError(StoreError):
    """A checkpoint file is missing or differs from the SHA-256 recorded when it was written."""


@dataclass(frozen=True)
class Checkpoint:
    run: str
    round: int
    path: Path
    sha256: str
    created: float


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _finite(value: float | None) -> float | None:
    """NaN/inf become NULL: SQLite and JSON both choke on them, and 'unknown' is the honest value."""
    return value if value is not None and math.isfinite(value) else None


class RunStore:
    """Thread-safe access to one store file; cheap to open, so readers open their own."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise StoreError(
                f"{self.path}: no run store here; run `fedtune simulate --out DIR` (store at DIR/store.sqlite) "
                "or pass --store with the file the server wrote"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout=30000")
        if readonly:
            self._db.execute("PRAGMA query_only=ON")
            self._check_version()
            self._missing = self._missing_columns()
            return
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL+NORMAL: durable against process crashes
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self._check_version()
        self._migrate()
        self._missing = self._missing_columns()

    def _missing_columns(self) -> dict[str, list[str]]:
        """table -> the added columns it lacks (a read-only view of a store written before they were added)."""
        missing: dict[str, list[str]] = {}
        for table, column, _ in _ADDED_COLUMNS:
            have = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                missing.setdefault(table, []).append(column)
        return missing

    def _migrate(self) -> None:
        """Add the columns a store from an earlier fedtune lacks; one transaction, so two writers never race."""
        if not self._missing_columns():
            return
        with self._tx() as db:
            for table, columns in self._missing_columns().items():
                kinds = {c: kind for t, c, kind in _ADDED_COLUMNS if t == table}
                for column in columns:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kinds[column]}")

    def _check_version(self) -> None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a fedtune run store ({exc})") from None
        if row is None or int(row["value"]) != SCHEMA_VERSION:
            found = row["value"] if row else "none"
            raise StoreError(f"{self.path}: run store schema {found}, this fedtune reads {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, params).fetchall()]

    # -- writing: runs ---------------------------------------------------------------------------

    def create_run(
        self, run: str, *, name: str, federation_json: str, rounds_total: int, fingerprint: str, out_dir: Path
    ) -> None:
        now = time.time()
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO runs (id, name, federation, status, rounds_total, started, updated,"
                    " base_fingerprint, out_dir) VALUES (?,?,?,?,?,?,?,?,?)",
                    (run, name, federation_json, "running", rounds_total, now, now, fingerprint, str(out_dir)),
                )
        except sqlite3.IntegrityError:
            raise StoreError(f"run {run} already exists in {self.path}; resume it or pick another run id") from None

    def begin_attempt(self, run: str) -> int:
        """Mark a run as running again after a restart; returns the new attempt number (first run is 1)."""
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET attempts = attempts + 1, status='running', finished=NULL, error=NULL, updated=?"
                " WHERE id=?",
                (time.time(), run),
            )
            # Rounds that were in flight when the server died: visible as such until re-run.
            db.execute("UPDATE rounds SET status='interrupted' WHERE run=? AND status='running'", (run,))
            return int(db.execute("SELECT attempts FROM runs WHERE id=?", (run,)).fetchone()[0])

    def finish_run(self, run: str, status: str, *, adapter_dir: Path | None = None, error: str | None = None) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE rounds SET status='interrupted' WHERE run=? AND status='running'", (run,))
            db.execute(
                "UPDATE runs SET status=?, finished=?, updated=?, adapter_dir=COALESCE(?, adapter_dir), error=?"
                " WHERE id=?",
                (status, now, now, str(adapter_dir) if adapter_dir else None, error, run),
            )

    # -- writing: rounds -------------------------------------------------------------------------

    def round_started(self, run: str, round_: int, attempt: int) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO rounds (run, round, attempt, status, started) VALUES (?,?,?,'running',?)"
                " ON CONFLICT (run, round) DO UPDATE SET attempt=excluded.attempt, status='running',"
                " started=excluded.started, finished=NULL, error=NULL",
                (run, round_, attempt, now),
            )
            db.execute("UPDATE runs SET updated=? WHERE id=?", (now, run))

    def record_round(
        self,
        run: str,
        report: RoundReport,
        *,
        names: dict[int, str],
        attempt: int,
        checkpoint: Path | None = None,
        train_s: float | None = None,
        eval_s: float | None = None,
    ) -> None:
        """Commit one finished round: its summary, every site's numbers, the site registry, its checkpoint."""
        now = time.time()
        sha = sha256_file(checkpoint) if checkpoint is not None else None
        rows = _site_rows(report, names)
        status = "failed" if report.error else "completed"
        with self._tx() as db:
            db.execute(
                "INSERT INTO rounds (run, round, attempt, status, started, finished, wall_s, train_s, eval_s,"
                " sampled, error, weighted_accuracy, weighted_loss) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (run, round) DO UPDATE SET attempt=excluded.attempt, status=excluded.status,"
                " finished=excluded.finished, wall_s=excluded.wall_s, train_s=excluded.train_s,"
                " eval_s=excluded.eval_s, sampled=excluded.sampled, error=excluded.error,"
                " weighted_accuracy=excluded.weighted_accuracy, weighted_loss=excluded.weighted_loss",
                (
                    run,
                    report.round,
                    attempt,
                    status,
                    now - report.wall_s,
                    now,
                    report.wall_s,
                    train_s,
                    eval_s,
                    report.sampled,
                    report.error,
                    _finite(report.weighted_accuracy),
                    _finite(report.weighted_loss),
                ),
            )
            db.execute("DELETE FROM site_rounds WHERE run=? AND round=?", (run, report.round))
            for row in rows:
                db.execute(
                    f"INSERT INTO site_rounds ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    (run, *list(row.values())[1:]),
                )
                status_, detail = _site_status(row)
                db.execute(
                    "INSERT INTO sites (name, node_id, last_seen, status, detail, last_run) VALUES (?,?,?,?,?,?)"
                    " ON CONFLICT (name) DO UPDATE SET node_id=excluded.node_id, status=excluded.status,"
                    " detail=excluded.detail, last_run=excluded.last_run,"
                    " last_seen=COALESCE(excluded.last_seen, sites.last_seen)",
                    (row["site"], row["node_id"], None if row["failed"] else now, status_, detail, run),
                )
            if checkpoint is not None:
                db.execute(
                    "INSERT OR REPLACE INTO checkpoints (run, round, path, sha256, created) VALUES (?,?,?,?,?)",
                    (run, report.round, str(Path(checkpoint).resolve()), sha, now),
                )
            db.execute("UPDATE runs SET updated=? WHERE id=?", (now, run))

    def record_scores(
        self, run: str, report: RoundReport, *, names: dict[int, str], eval_s: float | None = None
    ) -> None:
        """Add a committed round's held-out scores, which arrive with the next round's messages.

        Nothing is written when nothing came back (for example a later sum that failed), so scores a round
        already has are never erased.
        """
        if report.pooled is None and not report.evals:
            return
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET weighted_accuracy=?, weighted_loss=?, eval_s=COALESCE(?, eval_s) "
                "WHERE run=? AND round=?",
                (_finite(report.weighted_accuracy), _finite(report.weighted_loss), eval_s, run, report.round),
            )
            for node, e in report.evals.items():
                site = names.get(node) or e.site
                db.execute(
                    "INSERT INTO site_rounds (run, round, site, node_id, eval_examples, eval_loss, eval_accuracy,"
                    " epsilon, bytes_down) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (run, round, site) DO UPDATE SET"
                    " eval_examples=excluded.eval_examples, eval_loss=excluded.eval_loss,"
                    " eval_accuracy=excluded.eval_accuracy, epsilon=COALESCE(site_rounds.epsilon, excluded.epsilon),"
                    " bytes_down=MAX(site_rounds.bytes_down, excluded.bytes_down)",
                    (
                        run,
                        report.round,
                        site,
                        str(node),
                        e.num_examples,
                        _finite(e.loss),
                        _finite(e.accuracy),
                        _finite(e.epsilon),
                        report.bytes_down.get(node, 0),
                    ),
                )
            db.execute("UPDATE runs SET updated=? WHERE id=?", (now, run))

    # -- reading ---------------------------------------------------------------------------------

    def runs(self) -> list[dict[str, Any]]:
        return self._all(
            "SELECT r.*, (SELECT COUNT(*) FROM rounds WHERE run=r.id AND round>0 AND status IN ('completed','failed'))"
            " AS rounds_done, (SELECT weighted_accuracy FROM rounds WHERE run=r.id AND status='completed'"
            " ORDER BY round DESC LIMIT 1) AS last_accuracy FROM runs r ORDER BY started DESC"
        )

    def run(self, run: str) -> dict[str, Any]:
        rows = self._all("SELECT * FROM runs WHERE id=?", (run,))
        if rows:
            return rows[0]
        matches = self._all("SELECT * FROM runs WHERE id LIKE ? ORDER BY started DESC", (run + "%",))
        if len(matches) == 1:
            return matches[0]
        if matches:
            ids = ", ".join(m["id"] for m in matches)
            raise StoreError(f"run id prefix {run!r} is ambiguous: {ids}")
        raise StoreError(f"no run {run!r} in {self.path}; `fedtune runs --store {self.path}` lists them")

    def has_run(self, run: str) -> bool:
        return bool(self._all("SELECT 1 FROM runs WHERE id=?", (run,)))

    def rounds(self, run: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM rounds WHERE run=? ORDER BY round", (run,))

    def site_rounds(self, run: str) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM site_rounds WHERE run=? ORDER BY round, site", (run,))
        absent = dict.fromkeys(self._missing.get("site_rounds", []))  # an older store, opened read-only
        return [absent | row for row in rows] if absent else rows

    def sites(self, run: str | None = None) -> list[dict[str, Any]]:
        if run is None:
            return self._all("SELECT * FROM sites ORDER BY name")
        return self._all(
            "SELECT * FROM sites WHERE name IN (SELECT DISTINCT site FROM site_rounds WHERE run=?) ORDER BY name",
            (run,),
        )

    def checkpoints(self, run: str) -> list[Checkpoint]:
        rows = self._all("SELECT * FROM checkpoints WHERE run=? ORDER BY round", (run,))
        return [Checkpoint(r["run"], r["round"], Path(r["path"]), r["sha256"], r["created"]) for r in rows]

    def last_completed_round(self, run: str) -> int | None:
        """Highest round N such that rounds 0..N all finished; None if not even the baseline did."""
        done = {r["round"] for r in self.rounds(run) if r["status"] in FINISHED}
        n = -1
        while n + 1 in done:
            n += 1
        return n if n >= 0 else None

    def checkpoint(self, run: str, round_: int | None = None) -> Checkpoint:
        """The checkpoint of `round_`, or the newest one; its file is verified against the recorded SHA-256."""
        points = self.checkpoints(run)
        if round_ is not None:
            points = [c for c in points if c.round == round_]
        if not points:
            have = ", ".join(str(c.round) for c in self.checkpoints(run)) or "none"
            which = f"round {round_}" if round_ is not None else "any round"
            raise StoreError(f"run {run} has no checkpoint for {which} (checkpointed rounds: {have})")
        point = points[-1]
        if not point.path.is_file():
            raise CheckpointError(f"checkpoint of run {run} round {point.round} is missing: {point.path}")
        actual = sha256_file(point.path)
        if actual != point.sha256:
            raise CheckpointError(
                f"{point.path}: SHA-256 {actual[:16]}... differs from {point.sha256[:16]}... recorded when round "
                f"{point.round} completed; the file was changed or corrupted, restore it from a backup"
            )
        return point

    def round_reports(self, run: str, node_of: dict[str, int] | None = None) -> list[RoundReport]:
        """Rebuild the finished rounds' reports (for a resumed run's result).

        Node ids change when a simulation restarts, so `node_of` maps site names to
        the current ids; sites not in it keep the id they had.
        """
        from fedtune.server.aggregation import RoundUpdate, SiteTrain
        from fedtune.server.federation import RoundReport
        from fedtune.server.scores import EvalTotals, SiteEval

        node_of = node_of or {}
        by_round: dict[int, list[dict[str, Any]]] = {}
        for row in self.site_rounds(run):
            by_round.setdefault(row["round"], []).append(row)
        reports = []
        for r in self.rounds(run):
            if r["status"] not in FINISHED:
                continue
            report = RoundReport(round=r["round"], sampled=r["sampled"] or 0, wall_s=r["wall_s"] or 0.0)
            report.error = r["error"]
            if r["weighted_loss"] is not None or r["weighted_accuracy"] is not None:
                loss = r["weighted_loss"] if r["weighted_loss"] is not None else math.nan
                report.totals = EvalTotals(0, loss, r["weighted_accuracy"], 0)
            if r["round"] > 0:
                report.update = RoundUpdate(mean_delta=None, error=r["error"])
            for s in by_round.get(r["round"], []):
                node = node_of.get(s["site"], int(s["node_id"] or 0))
                report.bytes_down[node] = s["bytes_down"]
                if s["eval_loss"] is not None or s["eval_accuracy"] is not None:
                    report.evals[node] = SiteEval(
                        site=s["site"],
                        num_examples=s["eval_examples"] or 0,
                        loss=s["eval_loss"] if s["eval_loss"] is not None else math.nan,
                        accuracy=s["eval_accuracy"],
                        epsilon=s["epsilon"] or 0.0,
                    )
                if report.update is not None and (s["trained"] or s["declined"]):
                    report.update.sites[node] = SiteTrain(
                        site=s["site"],
                        num_examples=s["num_examples"] or 0,
                        epsilon=s["epsilon"] or 0.0,
                        epsilon_cap=s["epsilon_cap"] or 0.0,
                        noise_multiplier=s["noise_multiplier"] or 0.0,
                        bytes_up=s["bytes_up"],
                        declined=s["declined"],
                        epsilon_worst=s["epsilon_worst"],
                    )
                if report.update is not None and s["failed"]:
                    report.update.failed[node] = s["failed"]
            reports.append(report)
        return reports

    def snapshot(self, run: str) -> dict[str, Any]:
        """Everything the console and `runs show` display for one run, as plain JSON-able data."""
        info = self.run(run)
        run_id = info["id"]
        info = {k: v for k, v in info.items() if k != "federation"} | {"federation": json.loads(info["federation"])}
        return {
            "run": info,
            "rounds": self.rounds(run_id),
            "site_rounds": self.site_rounds(run_id),
            "sites": self.sites(run_id),
            "checkpoints": [
                {"round": c.round, "sha256": c.sha256, "path": str(c.path), "created": c.created}
                for c in self.checkpoints(run_id)
            ],
        }


def _site_rows(report: RoundReport, names: dict[int, str]) -> list[dict[str, Any]]:
    """One row per site that was asked anything this round, merging train, eval and failures."""
    rows: dict[str, dict[str, Any]] = {}

    def row(node: int, site: str | None = None) -> dict[str, Any]:
        # The server's roster first: a row is never filed under a name a site wrote about itself.
        name = names.get(node) or site or f"node-{node}"
        return rows.setdefault(
            name,
            {
                "run": None,
                "round": report.round,
                "site": name,
                "node_id": str(node),  # Flower node ids are unsigned 64-bit: past SQLite's (and JS's) integers
                "trained": 0,
                "num_examples": None,
                "train_loss": None,
                "eval_examples": None,
                "eval_loss": None,
                "eval_accuracy": None,
                "epsilon": None,
                "epsilon_cap": None,
                "noise_multiplier": None,
                "bytes_up": 0,
                "bytes_down": 0,
                "declined": None,
                "failed": None,
                "epsilon_worst": None,
            },
        )

    update = report.update
    if update is not None:
        for node, t in update.sites.items():
            r = row(node, t.site)
            r["trained"] = 0 if t.declined else 1
            r["declined"] = t.declined
            r["num_examples"] = t.num_examples if not t.declined else None
            r["epsilon"] = _finite(t.epsilon)
            r["epsilon_cap"] = _finite(t.epsilon_cap) or None
            r["noise_multiplier"] = t.noise_multiplier or None
            r["bytes_up"] = t.bytes_up
            # distributed noise: the epsilon of the site's own noise share alone (None under local noise)
            r["epsilon_worst"] = _finite(t.epsilon_worst)
        for node, reason in update.failed.items():
            row(node)["failed"] = reason
    for node, e in report.evals.items():
        r = row(node, e.site)
        r["eval_examples"] = e.num_examples
        r["eval_loss"] = _finite(e.loss)
        r["eval_accuracy"] = _finite(e.accuracy)
        r["epsilon"] = _finite(e.epsilon)  # after the round's spend: the freshest figure the site reported
    for node, b in report.bytes_down.items():
        row(node)["bytes_down"] = b
    return list(rows.values())


def _site_status(row: dict[str, Any]) -> tuple[str, str | None]:
    if row["failed"]:
        return "unreachable", row["failed"]
    if row["declined"]:
        return "declined", row["declined"]
    return ("trained" if row["trained"] else "ok"), None
