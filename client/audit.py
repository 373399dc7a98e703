"""The egress audit log: one JSON line per record that leaves the site.

A site's data protection officer must be able to verify, without trusting our
code's intentions, what went out: this log lists the kind, size and SHA-256 of
every payload. Each reply's entries are written before the reply is handed to Flower; where the site's
warm worker hands it over (deployment), a confirmation line follows once the SuperNode has taken it, so a
reply that never left (the site was killed first) reads as undelivered, not as sent.

It is also the privacy ledger's second witness: a reply that spent budget is marked (`spend`), and the ledger
refuses to open without every spend the log shows (`logged_spends`), so a rolled-back ledger cannot pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# What a site may ever send. Anything else found in the log is a finding.
ALLOWED_KINDS = frozenset(
    {
        "adapter-delta",
        "masked-vector",
        "public-keys",
        "encrypted-shares",
        "consistency-signature",
        "unmask-shares",
        "metrics",
        "decline",
        "error",  # an error reply: its public reason, or the fixed sentence that replaces a private one
    }
)


@dataclass(frozen=True)
class EgressEntry:
    time: float
    run: str
    round: int
    kind: str
    record: str
    bytes: int
    sha256: str
    detail: str
    reply: str = ""  # one id per outgoing reply, shared by its records
    delivered: bool | None = None  # None: logged before delivery was tracked
    spend: bool | None = None  # the reply reports a DP spend (trained); None: logged before this was recorded


# How a line logged before replies were marked (`spend`) shows a training reply that spent budget: it reported the
# site's cap ("epsilon-cap", and then also "noise-multiplier") or, in a plaintext round, sent the delta.
SPEND_METRICS = ("epsilon-cap", "noise-multiplier")


def egress_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "egress.jsonl"


def _canonical(record: ConfigRecord | MetricRecord) -> bytes:
    def enc(value: object) -> object:
        if isinstance(value, bytes):
            return value.hex()
        if isinstance(value, list):
            return [enc(v) for v in value]
        return value

    return json.dumps({k: enc(v) for k, v in sorted(record.items())}, sort_keys=True).encode()


def _payload(record: object) -> tuple[bytes, str]:
    """The bytes whose size and hash we log, and a human-readable shape summary."""
    if isinstance(record, ArrayRecord):
        digest_input = b"".join(record[name].data for name in record)
        shapes = ", ".join(f"{name}:{record[name].dtype}{list(record[name].shape)}" for name in list(record)[:4])
        more = f" (+{len(record) - 4} more)" if len(record) > 4 else ""
        return digest_input, f"{len(record)} arrays: {shapes}{more}"
    if isinstance(record, ConfigRecord | MetricRecord):
        return _canonical(record), "keys: " + ", ".join(sorted(record.keys()))
    raise TypeError(f"unexpected record type {type(record).__name__}")


class EgressLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(
        self,
        *,
        run: str,
        round_: int,
        kinds: dict[str, str],
        content: RecordDict,
        delivered: bool,
        spend: bool,
    ) -> list[EgressEntry]:
        """Log every record of an outgoing reply; `kinds` maps record name -> egress kind.

        `delivered=False` where the reply still has to reach the SuperNode: `confirm` marks it once it has.
        `spend`: whether the reply follows a committed DP spend (the ledger is checked against it).
        """
        entries, reply = [], uuid.uuid4().hex
        for name, record in content.items():
            kind = kinds.get(name)
            if kind not in ALLOWED_KINDS:
                raise ValueError(f"refusing to send record {name!r}: kind {kind!r} is not an allowed egress kind")
            data, detail = _payload(record)
            entries.append(
                EgressEntry(
                    time=time.time(),
                    run=run,
                    round=round_,
                    kind=kind,
                    record=name,
                    bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    detail=detail,
                    reply=reply,
                    delivered=delivered,
                    spend=spend,
                )
            )
        self._append([asdict(entry) for entry in entries])
        return entries

    def record_error(self, reason: str, *, run: str, round_: int, delivered: bool) -> list[EgressEntry]:
        """An error reply, as the text Flower sends (`type:<'message'>`)."""
        content = RecordDict({"error": ConfigRecord({"reason": reason})})
        return self.record(
            run=run, round_=round_, kinds={"error": "error"}, content=content, delivered=delivered, spend=False
        )

    def mark(self) -> int:
        """Where the log ends now: `confirm(since=mark)` confirms what is logged after it."""
        return self.path.stat().st_size if self.path.exists() else 0

    def confirm(self, *, since: int) -> list[str]:
        """Mark the replies logged after `since` delivered (the SuperNode has taken them); returns their ids."""
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as fh:
            fh.seek(since)
            pending = [json.loads(line) for line in fh if line.strip()]
        replies = sorted({e["reply"] for e in pending if e.get("delivered") is False})
        if replies:
            self._append([{"time": time.time(), "delivered": reply} for reply in replies])
        return replies

    def _append(self, lines: list[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            for line in lines:
                fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def entries(self) -> list[EgressEntry]:
        """Every logged record, with `delivered` True once its reply's confirmation line is in the log."""
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as fh:
            lines = [json.loads(line) for line in fh if line.strip()]
        confirmed = {line["delivered"] for line in lines if "kind" not in line}
        return [
            EgressEntry(**{**line, "delivered": True if line.get("reply") in confirmed else line.get("delivered")})
            for line in lines
            if "kind" in line
        ]


def _logged_spend(line: dict) -> bool:
    """Whether a logged record belongs to a reply that spent budget; inferred for lines logged before `spend`."""
    if "spend" in line:
        return line["spend"] is True
    keys = str(line.get("detail", "")).removeprefix("keys: ").split(", ")
    metrics = line.get("kind") == "metrics" and any(k in keys for k in SPEND_METRICS)
    return line.get("kind") == "adapter-delta" or metrics


def logged_spends(path: Path) -> dict[tuple[str, int], int]:
    """(run, round) -> how many replies that spent budget the log lists, whether delivered or not.

    A spend is committed to the ledger before its reply is logged, so the ledger must hold at least these. The
    log is read once, line by line, and only lines that can be a spend are parsed: the ledger asks on every
    open, and the log grows by a few lines every round. A line that does not parse (a crash mid-append) is
    skipped: its spend was committed before it was written.
    """
    replies: dict[tuple[str, int], set[str]] = {}
    try:
        with Path(path).open(encoding="utf-8", errors="replace") as fh:
            for raw in fh:
                if '"spend": false' in raw:  # what `record` writes for every other reply: no parse needed
                    continue
                if '"spend"' not in raw and '"adapter-delta"' not in raw and not any(k in raw for k in SPEND_METRICS):
                    continue
                try:
                    line = json.loads(raw)
                    if not isinstance(line, dict) or "kind" not in line or not _logged_spend(line):
                        continue
                    key = (str(line["run"]), int(line["round"]))
                except (ValueError, KeyError, TypeError):
                    continue
                replies.setdefault(key, set()).add(str(line.get("reply", "")))
    except FileNotFoundError:
        return {}
    return {key: len(ids) for key, ids in replies.items()}
