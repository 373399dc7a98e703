"""The site's privacy ledger: every DP-SGD spend, charged to the budget of the records it trained on.

It is the single source of truth for how much of a dataset's budget is gone, across rounds, runs,
federations and restarts. Four properties make it hold:

* **One transaction.** Reading a dataset's history, deciding the round's spend and writing it happen in one
  exclusive SQLite transaction (`BEGIN IMMEDIATE`), committed with a full fsync *before* training starts:
  two runs committing at once on one ledger cannot both pass the cap, and a crash can only over-count.
* **Identity by content.** A dataset is its records, not its file: each row's normalised text fields are
  hashed and the hashes are stored with the budget they were charged to. Only what the site holds goes in (a
  label as the file stores it, never the server's name for it), normalised so that variants a tokenizer
  cannot tell apart (case, accents, whitespace, zero-width characters) hash equal; the hashes of the scheme
  before are matched too, so an upgrade keeps every budget. A file's history is the history of
  every budget that holds any of its records, composed (the conservative rule: a re-saved, reordered,
  re-encoded or extended file, or a file that shares a single row with an earlier one, pays for all of it).
  A site may also name the budget (`data.dataset_name`).
* **Fails closed.** After every commit a small high-water mark (`ledger.hwm`: the ledger's id, the number of
  spends and each budget's composed history) is written next to the ledger. A missing, empty, unreadable,
  replaced or rolled-back ledger, where the state dir shows that the site trained before, is refused with one
  line that says how to restore it (`fedtune client ledger restore`), never silently started afresh. The
  egress audit log is the second witness, checked on every open: a ledger that lacks a spend the log shows
  left the site is refused the same way, even where the high-water mark went back with it.
* **Backups are consistent.** `backup` uses SQLite's online backup API; `restore` refuses a backup older than
  the high-water mark or the egress log unless forced, and a forced restore re-adds the spends the backup
  lacks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.client.audit import egress_path, logged_spends
from fedtune.common.privacy import Accountant, Spend, compress, epsilon_spent

SCHEMA_VERSION = 2
RESTORE_HINT = "restore it with `fedtune client ledger restore SITE.toml BACKUP` (see `fedtune client ledger --help`)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
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
    worst_noise_multiplier REAL,
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
CREATE TABLE IF NOT EXISTS records (
    hash BLOB NOT NULL,
    budget TEXT NOT NULL,
    PRIMARY KEY (hash, budget)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sources (
    budget TEXT NOT NULL,
    file_sha256 TEXT NOT NULL,
    rows INTEGER NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (budget, file_sha256)
);
"""

# Each round whose held-out figures left the site (a site that opted in to `share_eval_metrics` or `secure_scores`):
# figures are exact, so each is a query on the held-out rows with an adapter the server chose, and their number is
# capped per dataset over every run (`SiteSpec.max_score_releases`). Created on every open: older ledgers gain it.
_RELEASES = """
CREATE TABLE IF NOT EXISTS releases (
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (dataset, run_id, round)
)
"""

_ENTRY_COLUMNS = (
    "run_id, round, noise_multiplier, sample_rate, steps, epsilon_after, created, dataset, delta, "
    "worst_noise_multiplier"
)


# -- errors ---------------------------------------------------------------------------------------------


class LedgerError(RuntimeError):
    """The ledger cannot be trusted or read; the message is one line that says what to do."""


class LedgerUnavailable(LedgerError):
    """Missing or empty although the site has trained before."""


class LedgerCorrupt(LedgerError):
    """SQLite cannot read it, or its integrity check fails."""


class LedgerRolledBack(LedgerError):
    """It holds less than the high-water mark recorded, or is another ledger altogether."""


class ReleaseRefused(RuntimeError):
    """The site's cap on released held-out figures for this dataset is reached (or this round's already left)."""


class DuplicateRound(RuntimeError):
    """The server asked for a round this dataset already paid for."""


# -- dataset identity -----------------------------------------------------------------------------------


def normalise(value: str) -> str:
    """The text of a field as a record's identity sees it, whatever the tokenizer.

    Variants a tokenizer maps to the same ids (case, accents, compatibility forms, doubled or exotic whitespace,
    zero-width and other format characters) must hash equal, or a re-typed copy of the rows starts a fresh budget:
    NFKC, format characters (category Cf, e.g. U+200B) dropped, casefolded, accents stripped (NFKD, combining
    marks, category Mn, dropped; after casefolding, which can itself decompose, e.g. U+0130), every whitespace
    run one space, no outer whitespace.
    """
    text = "".join(c for c in unicodedata.normalize("NFKC", value) if unicodedata.category(c) != "Cf")
    text = unicodedata.normalize("NFKD", text.casefold())
    return " ".join("".join(c for c in text if unicodedata.category(c) != "Mn").split())


def _legacy_normalise(value: str) -> str:
    """`normalise` before record scheme 3 (NFC, '\\n' line ends, no outer whitespace): links older ledgers."""
    return unicodedata.normalize("NFC", value.replace("\r\n", "\n").replace("\r", "\n")).strip()


def _hash(prefix: bytes, norm: Callable[[str], str], fields: Sequence[str]) -> bytes:
    digest = hashlib.sha256(prefix)
    for f in fields:
        data = norm(f).encode()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.digest()[:16]


def record_hash(kind: str, *fields: str) -> bytes:
    """128 bits of SHA-256 over a row's normalised task fields (a collision can only merge budgets)."""
    return _hash(f"fedtune-record-3:{kind}".encode(), normalise, fields)


def legacy_record_hash(kind: str, *fields: str) -> bytes:
    """The record hash ledgers stored before scheme 3: still matched, so an upgraded site keeps its budgets."""
    return _hash(kind.encode(), _legacy_normalise, fields)


@dataclass(frozen=True)
class DatasetIdentity:
    """What a budget is charged for: the set of record hashes, an optional declared name, the file's bytes.

    `legacy` holds the same rows' hashes under the scheme before 3: a budget holding either kind is this
    dataset's, so neither an upgrade nor a change the legacy scheme was blind to starts a fresh budget.
    """

    records: frozenset[bytes] = frozenset()
    name: str | None = None
    source: str | None = None  # SHA-256 of the file bytes: shown by `client status`, links pre-v2 ledgers
    rows: int = 0
    legacy: frozenset[bytes] = frozenset()

    @property
    def key(self) -> str:
        """The budget a dataset with no overlap to anything in the ledger starts."""
        if self.name is not None:
            return f"name:{self.name}"
        digest = hashlib.sha256()
        for h in sorted(self.records):
            digest.update(h)
        return f"records:{digest.hexdigest()[:32]}"

    @property
    def hashes(self) -> frozenset[bytes]:
        """Every hash that ties a budget to these rows: matched on resolve, stored on commit."""
        return self.records | self.legacy


def classification_identity(
    texts: Sequence[str],
    labels: Sequence[int | str],
    label_names: Sequence[str] = (),
    *,
    values: Sequence[str] | None = None,
    name: str | None = None,
    source: str | None = None,
) -> DatasetIdentity:
    """Records = (text, label value as the file stores it): nothing the server sends can change them.

    `values` are the label cells exactly as read (an index file's "3" stays "3"): the federation's label names
    are the server's to choose, and hashing them let a server rename the labels and reset every budget. Without
    `values` (tools that hold indices only) the label is its name. The legacy hashes are (text, label name), as
    ledgers stored them before: still matched, and stored too, so a file re-exported from indices to names
    under the same labels keeps its budget.
    """

    def label(value: int | str) -> str:
        if isinstance(value, int) and 0 <= value < len(label_names):
            return label_names[value]
        return str(value)

    named = [label(y) for y in labels]
    raw = named if values is None else [str(v) for v in values]
    records = frozenset(record_hash("classification", t, y) for t, y in zip(texts, raw, strict=True))
    legacy = frozenset(legacy_record_hash("classification", t, y) for t, y in zip(texts, named, strict=True))
    return DatasetIdentity(records, name, source, len(texts), legacy)


def instruction_identity(
    prompts: Sequence[str], responses: Sequence[str], *, name: str | None = None, source: str | None = None
) -> DatasetIdentity:
    pairs = list(zip(prompts, responses, strict=True))
    records = frozenset(record_hash("causal-lm", p, r) for p, r in pairs)
    legacy = frozenset(legacy_record_hash("causal-lm", p, r) for p, r in pairs)
    return DatasetIdentity(records, name, source, len(prompts), legacy)


def as_identity(dataset: str | DatasetIdentity) -> DatasetIdentity:
    """A bare string names a budget directly (tools and tests); it carries no records."""
    return DatasetIdentity(name=None, source=dataset) if isinstance(dataset, str) else dataset


# -- the high-water mark --------------------------------------------------------------------------------


@dataclass
class HighWater:
    """What the ledger held at its last commit, kept apart from it: a lower bound the ledger must meet."""

    ledger_id: str
    spends: int
    budgets: dict[str, dict] = field(default_factory=dict)  # budget -> {epsilon, delta, spends, history}

    def to_json(self) -> str:
        return json.dumps({"ledger_id": self.ledger_id, "spends": self.spends, "budgets": self.budgets}, indent=1)

    @classmethod
    def read(cls, path: Path) -> HighWater | None:
        try:
            data = json.loads(path.read_text())
            return cls(str(data["ledger_id"]), int(data["spends"]), dict(data.get("budgets", {})))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"{path}: unreadable high-water mark ({exc}); it guards the ledger against loss, "
                "check the state dir's disk and permissions"
            ) from None

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(self.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def hwm_path(ledger_path: Path) -> Path:
    return Path(ledger_path).with_suffix(".hwm")


def shortfall(have: Iterable[Spend], need: Iterable[Spend]) -> list[Spend]:
    """The spends in `need` (compressed) that `have` does not cover: steps per (sigma, q) still missing."""
    got = {(s, q): n for s, q, n in compress(have)}
    return [(s, q, n - got.get((s, q), 0)) for s, q, n in compress(need) if n > got.get((s, q), 0)]


def _activity(path: Path) -> str | None:
    """Evidence in the state dir that this site has spent budget before, or None."""
    hw = HighWater.read(hwm_path(path))
    if hw is not None and hw.spends > 0:
        return f"its high-water mark ({hwm_path(path).name}) records {hw.spends} spend(s)"
    egress = path.parent / "egress.jsonl"
    with contextlib.suppress(OSError):
        if egress.stat().st_size > 0:
            return f"its egress audit log ({egress.name}) lists messages that left the site"
    return None


# -- the ledger -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    created: float
    dataset: str = ""  # the budget it was charged to
    delta: float = 0.0  # the delta epsilon_after is at
    # distributed noise: the multiplier of the site's own share alone (the charged one assumes h honest sites)
    worst_noise_multiplier: float | None = None

    @property
    def worst_spend(self) -> Spend:
        return (self.worst_noise_multiplier or self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Commit:
    budget: str  # the budget the spend was charged to
    budgets: tuple[str, ...]  # every budget whose history it was composed with
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float


Decide = Callable[[list[LedgerEntry]], Spend]


class PrivacyLedger:
    """`PrivacyLedger(path)` opens (or, on a site that never trained, creates) a ledger, refusing one it can't trust.

    `checked=False` skips the high-water-mark comparison (for `verify` and `restore`, which report it).
    """

    def __init__(self, path: Path, *, checked: bool = True, timeout: float = 300.0) -> None:
        self.path = Path(path)
        self.hwm = hwm_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if checked:
            _refuse_if_lost(self.path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=timeout)
        except sqlite3.Error as exc:
            raise LedgerCorrupt(f"{self.path}: cannot open the privacy ledger ({exc}); {RESTORE_HINT}") from None
        try:
            with self._guard():
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")  # WAL + FULL fsyncs on every commit
                if self._db.execute("SELECT 1 FROM sqlite_master WHERE name='records'").fetchone() is None:
                    self._db.executescript(_SCHEMA)
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(spends)")}
                if "worst_noise_multiplier" not in columns:  # a ledger from before distributed noise
                    self._db.execute("ALTER TABLE spends ADD COLUMN worst_noise_multiplier REAL")
                self._db.execute(_RELEASES)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('ledger_id', ?)", (uuid.uuid4().hex,))
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                self.ledger_id = self._db.execute("SELECT value FROM meta WHERE key='ledger_id'").fetchone()[0]
            if checked:
                self._check_against_hwm()
        except BaseException:
            self._db.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """sqlite3's corruption errors become one line that names the file and the fix."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise LedgerError(f"{self.path}: the ledger stayed locked by another process ({exc})") from None
            raise LedgerCorrupt(f"{self.path}: the privacy ledger is unreadable ({exc}); {RESTORE_HINT}") from None
        except sqlite3.DatabaseError as exc:
            raise LedgerCorrupt(f"{self.path}: the privacy ledger is corrupt ({exc}); {RESTORE_HINT}") from None

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that excludes every other writer from its first read to its commit."""
        with self._guard():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._guard():
            return self._db.execute(sql, params).fetchall()

    # -- reading ----------------------------------------------------------------------------------

    def history(self, dataset: str | DatasetIdentity) -> list[Spend]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries(dataset)]

    def entries(self, dataset: str | DatasetIdentity | None = None) -> list[LedgerEntry]:
        """Spends in commit order: all, one budget's (a string), or every budget a dataset identity composes."""
        if dataset is None:
            rows = self._query(f"SELECT {_ENTRY_COLUMNS} FROM spends ORDER BY id")
        else:
            budgets = [dataset] if isinstance(dataset, str) else list(self.resolve(dataset)[1])
            marks = ",".join("?" * len(budgets))
            rows = self._query(f"SELECT {_ENTRY_COLUMNS} FROM spends WHERE dataset IN ({marks}) ORDER BY id", budgets)
        return [LedgerEntry(*row) for row in rows]

    def datasets(self) -> list[str]:
        """Budgets with at least one spend."""
        return [r[0] for r in self._query("SELECT DISTINCT dataset FROM spends ORDER BY dataset")]

    def sources(self, budget: str) -> list[str]:
        """SHA-256 of every file charged to `budget`."""
        return [r[0] for r in self._query("SELECT file_sha256 FROM sources WHERE budget=?", (budget,))]

    def epsilon(self, dataset: str | DatasetIdentity, delta: float, accountant: Accountant = "prv") -> float:
        return epsilon_spent(self.history(dataset), delta, accountant)

    def worst_epsilon(self, dataset: str | DatasetIdentity, delta: float, accountant: Accountant = "prv") -> float:
        """Epsilon if every distributed-noise spend had carried only this site's own share (the server colluding
        with every other site of those sums); equal to `epsilon` for a ledger of local-noise spends."""
        return epsilon_spent([e.worst_spend for e in self.entries(dataset)], delta, accountant)

    def composed(self, budget: str) -> tuple[str, ...]:
        """`budget` and every budget with spends that a spend on its rows composes: those sharing a record with it,
        and a pre-v2 budget keyed by the SHA-256 of one of its files (a superset of what `commit` composed)."""
        rows = self._query(
            "SELECT DISTINCT b.budget FROM records a JOIN records b ON a.hash = b.hash WHERE a.budget = ?", (budget,)
        )
        known = set(self.datasets())
        return tuple(sorted(({r[0] for r in rows} | set(self.sources(budget))) & known | {budget}))

    def find(self, dataset: str, run_id: str, round_: int) -> LedgerEntry | None:
        rows = self._query(
            f"SELECT {_ENTRY_COLUMNS} FROM spends WHERE dataset=? AND run_id=? AND round=?", (dataset, run_id, round_)
        )
        return LedgerEntry(*rows[0]) if rows else None

    def declines(self) -> list[tuple[str, int, str, float]]:
        return [tuple(r) for r in self._query("SELECT run_id, round, reason, created FROM declines ORDER BY id")]

    def resolve(self, dataset: str | DatasetIdentity) -> tuple[str, tuple[str, ...]]:
        """(the budget a spend on `dataset` is charged to, every budget whose history it composes).

        Composed: each budget holding any of its records (by new or legacy hash), its declared name's budget, and a
        pre-v2 budget keyed by the file's SHA-256. Charged: the declared name's budget; else the budget sharing most
        records (the oldest on a tie); else a pre-v2 budget of the same file; else a new budget `records:...`.
        """
        ident = as_identity(dataset)
        with self._guard():
            overlap = self._overlap(ident.hashes)
            known = {r[0] for r in self._db.execute("SELECT DISTINCT dataset FROM spends")}
        budgets = set(overlap)
        if ident.source is not None and ident.source in known:
            budgets.add(ident.source)
        if ident.name is not None:
            charge = ident.key
        elif overlap:
            charge = max(overlap, key=lambda b: (overlap[b][0], -overlap[b][1]))
        elif ident.source is not None and (ident.source in known or not ident.records):
            charge = ident.source
        else:
            charge = ident.key
        return charge, tuple(sorted(budgets | {charge}))

    def _overlap(self, records: frozenset[bytes]) -> dict[str, tuple[int, int]]:
        """budget -> (records shared with `records`, first spend id), for every budget holding any of them."""
        if not records:
            return {}
        db = self._db
        db.execute("CREATE TEMP TABLE IF NOT EXISTS probe (hash BLOB PRIMARY KEY) WITHOUT ROWID")
        db.execute("DELETE FROM probe")
        db.executemany("INSERT OR IGNORE INTO probe VALUES (?)", ((h,) for h in records))
        rows = db.execute(
            "SELECT r.budget, COUNT(*), (SELECT COALESCE(MIN(id), 0) FROM spends s WHERE s.dataset = r.budget) "
            "FROM records r JOIN probe p ON r.hash = p.hash GROUP BY r.budget"
        ).fetchall()
        db.execute("DELETE FROM probe")
        return {b: (int(n), int(first)) for b, n, first in rows}

    # -- writing ----------------------------------------------------------------------------------

    def commit(
        self,
        dataset: str | DatasetIdentity,
        *,
        run_id: str,
        round_: int,
        decide: Decide,
        delta: float,
        accountant: Accountant = "prv",
        worst_noise_multiplier: float | None = None,
    ) -> Commit:
        """Read the dataset's history, let `decide` choose the spend from it, and commit it: one exclusive transaction.

        `decide(entries)` gets every spend the dataset composes (in commit order) and returns (sigma, q, steps),
        or raises (e.g. `BudgetExhausted`) to write nothing. No other writer can commit between the read and the
        write, so concurrent runs on one ledger never pass the cap together. A (run, round) pair is paid for at
        most once: a re-sent round would be a fresh noisy draw on the same data, i.e. a second spend the operator
        did not plan, so the duplicate is refused rather than silently paid. `worst_noise_multiplier` (distributed
        noise) is the sigma of the site's own noise share alone, recorded beside the charged one.
        """
        ident = as_identity(dataset)
        with self._exclusive() as db:
            charge, budgets = self.resolve(ident)
            marks = ",".join("?" * len(budgets))
            paid = db.execute(
                f"SELECT 1 FROM spends WHERE dataset IN ({marks}) AND run_id=? AND round=?",
                (*budgets, run_id, round_),
            ).fetchone()
            if paid:
                raise DuplicateRound(
                    f"round {round_} of run {run_id} was already trained on this dataset; "
                    "a second update for the same round would need a second spend, so the site declines"
                )
            rows = db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM spends WHERE dataset IN ({marks}) ORDER BY id", budgets
            ).fetchall()
            entries = [LedgerEntry(*row) for row in rows]
            sigma, q, steps = decide(entries)
            history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
            eps_after = epsilon_spent([*history, (sigma, q, steps)], delta, accountant)
            # never below what a composed budget already recorded at this delta: an accountant's estimate need not
            # grow with its history (PRV's discretisation; review round 4), and a reported epsilon must not fall
            eps_after = max([eps_after, *(e.epsilon_after for e in entries if e.delta == delta)])
            now = time.time()
            db.execute(
                "INSERT INTO spends (dataset, run_id, round, noise_multiplier, sample_rate, steps, delta,"
                " epsilon_after, created, worst_noise_multiplier) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (charge, run_id, round_, sigma, q, steps, delta, eps_after, now, worst_noise_multiplier),
            )
            db.executemany("INSERT OR IGNORE INTO records VALUES (?, ?)", ((h, charge) for h in ident.hashes))
            if ident.source is not None and ident.records:
                db.execute("INSERT OR IGNORE INTO sources VALUES (?,?,?,?)", (charge, ident.source, ident.rows, now))
        self.write_high_water()
        return Commit(charge, budgets, sigma, q, steps, eps_after)

    def record_spend(
        self,
        dataset: str | DatasetIdentity,
        *,
        run_id: str,
        round_: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: Accountant = "prv",
    ) -> float:
        """Commit a spend fixed in advance and return the dataset's epsilon including it (see `commit`)."""
        spend = (noise_multiplier, sample_rate, steps)
        return self.commit(
            dataset, run_id=run_id, round_=round_, decide=lambda _: spend, delta=delta, accountant=accountant
        ).epsilon_after

    def release(self, dataset: str | DatasetIdentity, *, run_id: str, round_: int, cap: int) -> int:
        """Count one release of held-out figures (the adapter of `round_` of `run_id`) and return how many this
        dataset has had, this one included; refused past `cap` over every budget the rows compose, and for a round
        already released. Counted before the figures leave: a reply lost afterwards over-counts, never under."""
        ident = as_identity(dataset)
        with self._exclusive() as db:
            charge, budgets = self.resolve(ident)
            marks = ",".join("?" * len(budgets))
            if db.execute(
                f"SELECT 1 FROM releases WHERE dataset IN ({marks}) AND run_id=? AND round=?",
                (*budgets, run_id, round_),
            ).fetchone():
                raise ReleaseRefused(f"the held-out figures of round {round_} of run {run_id} already left this site")
            (count,) = db.execute(f"SELECT COUNT(*) FROM releases WHERE dataset IN ({marks})", budgets).fetchone()
            if count >= cap:
                raise ReleaseRefused(
                    f"{count} rounds' held-out figures have left this site for this dataset, its max_score_releases "
                    f"= {cap}; the figures stay here. Each is an exact query on the held-out rows, so raising the "
                    "cap (site config) is a policy decision; fresh held-out rows start a new count"
                )
            db.execute("INSERT INTO releases VALUES (?,?,?,?)", (charge, run_id, round_, time.time()))
        return count + 1

    def record_decline(self, dataset: str | DatasetIdentity, *, run_id: str, round_: int, reason: str) -> None:
        key = dataset if isinstance(dataset, str) else self.resolve(dataset)[0]
        with self._guard():
            self._db.execute(
                "INSERT INTO declines (dataset, run_id, round, reason, created) VALUES (?,?,?,?,?)",
                (key, run_id, round_, reason, time.time()),
            )

    # -- the high-water mark ----------------------------------------------------------------------

    def state(self) -> HighWater:
        """What the ledger holds now, in the high-water mark's terms."""
        budgets: dict[str, dict] = {}
        for budget in self.datasets():
            rows = self._query(
                "SELECT noise_multiplier, sample_rate, steps, epsilon_after, delta FROM spends WHERE dataset=? "
                "ORDER BY id",
                (budget,),
            )
            history = compress((float(s), float(q), int(n)) for s, q, n, _, _ in rows)
            budgets[budget] = {
                "epsilon": max(float(r[3]) for r in rows),
                "delta": float(rows[-1][4]),
                "spends": len(rows),
                "history": [list(h) for h in history],
            }
        (count,) = self._query("SELECT COUNT(*) FROM spends")[0]
        return HighWater(self.ledger_id, int(count), budgets)

    def write_high_water(self) -> None:
        """Under the write lock, so that a slower writer never replaces a newer mark with an older one."""
        with self._exclusive():
            self.state().write(self.hwm)

    def compare(self, mark: HighWater | None) -> list[str]:
        """Every way this ledger falls short of the high-water mark (empty: it holds at least as much)."""
        if mark is None:
            return []
        if mark.ledger_id != self.ledger_id:
            return [f"this is ledger {self.ledger_id[:8]}, but the high-water mark is of ledger {mark.ledger_id[:8]}"]
        now = self.state()
        problems = []
        if now.spends < mark.spends:
            problems.append(f"it holds {now.spends} spend(s), the high-water mark recorded {mark.spends}")
        for budget, was in mark.budgets.items():
            have = now.budgets.get(budget)
            if have is None:
                problems.append(f"budget {budget[:24]} (epsilon {was['epsilon']:.3f}) is missing")
                continue
            missing = shortfall([tuple(h) for h in have["history"]], [tuple(h) for h in was["history"]])
            if missing or have["epsilon"] < was["epsilon"] - 1e-9:
                problems.append(
                    f"budget {budget[:24]} is at epsilon {have['epsilon']:.3f}, the high-water mark recorded "
                    f"{was['epsilon']:.3f}"
                )
        return problems

    def _check_against_hwm(self) -> None:
        """Against both witnesses: the high-water mark, and the egress log (which a lost mark does not take along).

        The egress log is checked before a missing mark is started afresh, so that a rolled-back ledger is never
        written into a new mark that would bless it.
        """
        mark = HighWater.read(self.hwm)
        problems = self.compare(mark)
        if problems:
            raise LedgerRolledBack(
                f"{self.path}: the privacy ledger was rolled back or replaced ({'; '.join(problems)}); "
                f"training on it could overspend. {RESTORE_HINT[0].upper()}{RESTORE_HINT[1:]}"
            )
        if missing := self.egress_shortfall():
            raise LedgerRolledBack(
                f"{self.path}: the privacy ledger was rolled back or replaced: {_describe(missing, self.egress)}; "
                f"training on it could overspend. {RESTORE_HINT[0].upper()}{RESTORE_HINT[1:]}"
            )
        if mark is None:
            self.write_high_water()  # first open (or a ledger from before high-water marks): start one

    # -- the egress log ---------------------------------------------------------------------------

    @property
    def egress(self) -> Path:
        """The site's egress audit log, beside the ledger in the state dir."""
        return egress_path(self.path.parent)

    def egress_shortfall(self) -> list[tuple[str, int, int]]:
        """(run, round, spends missing) for every round the egress log shows spent and the ledger lacks.

        A spend is committed before its reply is logged, so the ledger holds at least one spend per logged
        spending reply of each (run, round); rounds a forced `restore` waived are not asked for again. One pass
        over the log, one grouped query.
        """
        try:
            logged = logged_spends(self.egress)
        except OSError as exc:
            raise LedgerError(
                f"{self.egress}: cannot read the egress audit log ({exc}), which the privacy ledger is checked "
                "against; check the state dir's permissions"
            ) from None
        if not logged:
            return []
        rows = self._query("SELECT run_id, round, COUNT(*) FROM spends GROUP BY run_id, round")
        held = {(str(run), int(round_)): int(n) for run, round_, n in rows}
        for (run, round_), n in self._waived().items():
            held[(run, round_)] = held.get((run, round_), 0) + n
        return [
            (run, round_, n - held.get((run, round_), 0))
            for (run, round_), n in sorted(logged.items())
            if n > held.get((run, round_), 0)
        ]

    def _waived(self) -> dict[tuple[str, int], int]:
        row = self._query("SELECT value FROM meta WHERE key='egress_waived'")
        return {(str(run), int(round_)): int(n) for run, round_, n in json.loads(row[0][0])} if row else {}

    def waive(self, missing: Sequence[tuple[str, int, int]]) -> None:
        """Accept that these logged spends are not in the ledger (a forced restore, the administrator's call)."""
        waived = self._waived()
        for run, round_, n in missing:
            waived[(run, round_)] = waived.get((run, round_), 0) + n
        value = json.dumps([[run, round_, n] for (run, round_), n in sorted(waived.items())])
        with self._exclusive() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('egress_waived', ?)", (value,))

    def integrity(self) -> str:
        rows = self._query("PRAGMA integrity_check")
        return "; ".join(str(r[0]) for r in rows)

    # -- backup and restore -----------------------------------------------------------------------

    def backup(self, dest: Path) -> HighWater:
        """A consistent copy (SQLite's online backup API) as one self-contained file; returns what it holds."""
        dest = Path(dest)
        if dest.exists():
            raise LedgerError(f"{dest}: already exists; choose a new backup file name")
        dest.parent.mkdir(parents=True, exist_ok=True)
        target = sqlite3.connect(dest, isolation_level=None)
        try:
            with self._guard():
                self._db.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal beside it
        finally:
            target.close()
        with open(dest, "rb") as fh:
            os.fsync(fh.fileno())
        return self.state()


def _refuse_if_lost(path: Path) -> None:
    """A ledger that is gone or empty is a fresh start only for a site that never spent anything."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = None
    except OSError as exc:
        raise LedgerUnavailable(f"{path}: cannot read the privacy ledger ({exc}); check its permissions") from None
    if size:
        return
    evidence = _activity(path)
    if evidence is None:
        return
    what = "is missing" if size is None else "is empty (0 bytes)"
    raise LedgerUnavailable(
        f"{path}: the privacy ledger {what} but this site has trained before ({evidence}); "
        f"training is refused until it is back: {RESTORE_HINT}"
    )


def _describe(missing: Sequence[tuple[str, int, int]], log: Path, subject: str = "it lacks") -> str:
    """One line: which spends the egress log shows and the ledger lacks."""
    shown = ", ".join(f"run {run} round {round_}" for run, round_, _ in missing[:3])
    more = f" and {len(missing) - 3} more round(s)" if len(missing) > 3 else ""
    total = sum(n for *_, n in missing)
    return f"{subject} {total} spend(s) that the egress audit log ({log.name}) shows replies for ({shown}{more})"


@dataclass(frozen=True)
class Verification:
    ok: bool
    lines: list[str]


def verify(path: Path) -> Verification:
    """integrity_check plus the comparison with the high-water mark, as lines a site administrator reads."""
    path = Path(path)
    lines: list[str] = []
    try:
        _refuse_if_lost(path)
        if not path.exists():
            return Verification(True, [f"{path}: no ledger yet (this site has not trained); it is created on use"])
        with PrivacyLedger(path, checked=False) as ledger:
            integrity = ledger.integrity()
            ok = integrity == "ok"
            lines.append(f"integrity_check: {integrity}")
            mark = HighWater.read(ledger.hwm)
            now = ledger.state()
            lines.append(f"ledger {ledger.ledger_id[:8]}: {now.spends} spend(s) in {len(now.budgets)} budget(s)")
            if mark is None:
                lines.append(f"no high-water mark ({ledger.hwm.name}) yet: nothing to compare against")
            else:
                problems = ledger.compare(mark)
                ok = ok and not problems
                lines += [f"behind the high-water mark: {p}" for p in problems] or [
                    f"high-water mark: {mark.spends} spend(s); the ledger holds at least as much"
                ]
            missing = ledger.egress_shortfall()
            ok = ok and not missing
            lines.append(
                f"behind the egress log: {_describe(missing, ledger.egress)}"
                if missing
                else "egress log: the ledger holds every spend it shows"
            )
    except LedgerError as exc:
        return Verification(False, [*lines, str(exc)])
    return Verification(ok, lines)


def restore(path: Path, backup: Path, *, force: bool = False) -> list[str]:
    """Replace the ledger at `path` with `backup`; refuse a backup older than the high-water mark unless `force`.

    A forced restore of an older backup re-adds what the high-water mark knows the backup lacks (as spends of
    run `restored-from-high-water-mark`), so the composed epsilon never drops; the records of a budget the
    backup lacks altogether are not known, which the returned lines say. The replaced files are kept aside.
    """
    path, backup = Path(path), Path(backup)
    if not backup.is_file() or backup.stat().st_size == 0:
        raise LedgerError(f"{backup}: not a ledger backup (missing or empty)")
    try:
        src = sqlite3.connect(f"file:{backup}?mode=ro", uri=True, isolation_level=None)
        check = src.execute("PRAGMA integrity_check").fetchone()[0]
        backup_id = src.execute("SELECT value FROM meta WHERE key='ledger_id'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise LedgerCorrupt(f"{backup}: not a readable ledger backup ({exc})") from None
    if check != "ok" or backup_id is None:
        src.close()
        raise LedgerCorrupt(f"{backup}: not a usable ledger backup (integrity_check: {check})")
    mark = HighWater.read(hwm_path(path))
    tmp = path.with_name(path.name + ".restoring")
    tmp.unlink(missing_ok=True)
    dst = sqlite3.connect(tmp, isolation_level=None)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    lines: list[str] = []
    with PrivacyLedger(tmp, checked=False) as restored:
        problems = restored.compare(mark)
        missing = restored.egress_shortfall()
        if problems and force and mark is not None:
            lines += _re_add(restored, mark)
        if missing and force:
            restored.waive(missing)
            lines.append(
                f"{_describe(missing, restored.egress, 'the backup lacked')}: waived; their cost is back only as far "
                "as the high-water mark knew it"
            )
    if problems and not force:
        tmp.unlink()
        raise LedgerRolledBack(
            f"{backup}: older than the high-water mark ({'; '.join(problems)}); restoring it would forget "
            "spends. Use a newer backup, or pass --force to restore it and re-add the missing spends from the "
            "high-water mark"
        )
    if missing and not force:
        tmp.unlink()
        raise LedgerRolledBack(
            f"{backup}: older than the egress log: {_describe(missing, egress_path(path.parent))}; restoring it "
            "would forget spends. Use a newer backup, or pass --force to restore it anyway (spends the high-water "
            "mark knows are re-added; the rest are waived and their cost is lost)"
        )
    for suffix in ("", "-wal", "-shm"):
        old = Path(f"{path}{suffix}")
        if old.exists():
            aside = Path(f"{path}.replaced-{int(time.time())}{suffix}")
            os.replace(old, aside)
            if not suffix:
                lines.append(f"kept the replaced ledger as {aside}")
    os.replace(tmp, path)
    with PrivacyLedger(path, checked=False) as ledger:
        ledger.write_high_water()
        state = ledger.state()
    lines.append(f"restored {backup} -> {path}: {state.spends} spend(s) in {len(state.budgets)} budget(s)")
    return lines


def _re_add(ledger: PrivacyLedger, mark: HighWater) -> list[str]:
    """Spends the high-water mark has and `ledger` lacks, written into it (forced restores)."""
    lines = []
    now = ledger.state()
    same_id = mark.ledger_id == ledger.ledger_id
    for budget, was in mark.budgets.items():
        have = now.budgets.get(budget, {"history": []})
        missing = shortfall([tuple(h) for h in have["history"]], [tuple(h) for h in was["history"]])
        for i, (sigma, q, steps) in enumerate(missing, 1):
            with ledger._exclusive() as db:
                db.execute(
                    "INSERT INTO spends (dataset, run_id, round, noise_multiplier, sample_rate, steps, delta,"
                    " epsilon_after, created) VALUES (?,?,?,?,?,?,?,?,?)",
                    (budget, "restored-from-high-water-mark", -i, sigma, q, steps, was["delta"], was["epsilon"],
                     time.time()),
                )  # fmt: skip
        if missing:
            lines.append(f"re-added {len(missing)} spend(s) of budget {budget[:24]} from the high-water mark")
        if budget not in now.budgets:
            lines.append(
                f"budget {budget[:24]} was not in the backup: its spends are re-added but its records are not "
                "known, so a file of those rows is matched only by data.dataset_name or by identical file bytes"
            )
    if not same_id:
        lines.append("the backup is of another ledger; its own spends are kept alongside")
    return lines
