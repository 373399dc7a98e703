"""Reading a site's private training rows.

The people who run into problems here are site administrators, not fedtune developers: a bank's data team
exports a CSV, points the site config at it and starts the agent. Every problem with the file is therefore
reported as a `DataFileError` that names the file, the line (or Parquet row) and the column, in the terms an
editor or spreadsheet shows, so the file can be fixed without reading code or a traceback.

Nothing here ever logs or sends row contents anywhere; values only appear in error messages shown locally.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ClassificationData",
    "DataFileError",
    "InstructionData",
    "dataset_fingerprint",
    "load_classification",
    "load_instructions",
    "read_rows",
    "split_holdout",
]

Unit = Literal["line", "row"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")

# Values quoted back in messages are cut short: a message must stay readable even if the offending
# cell is a whole paragraph, and it should not echo more private text to the console than needed.
_MAX_QUOTED = 40
# How many expected label names to list before summarising the rest.
_MAX_LISTED = 10
_INT_RE = re.compile(r"[+-]?\d+")
_CHUNK = 1 << 20


class DataFileError(ValueError):
    """A data file cannot be used; the message says where and why, in a form a site administrator can act on.

    Attributes:
        path: the file.
        row: 1-based position as an editor shows it (CSV/TSV/JSONL: the line; Parquet: the row), or None
            when the problem concerns the whole file.
        column: the column (or JSON key) concerned, or None.
        unit: "line" for text formats, "row" for Parquet.
        problem: the message without the location prefix.
    """

    def __init__(
        self,
        path: Path | str,
        problem: str,
        *,
        row: int | None = None,
        column: str | None = None,
        unit: Unit = "line",
    ) -> None:
        self.path = Path(path)
        self.row = row
        self.column = column
        self.unit = unit
        self.problem = problem
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [str(self.path)]
        if self.row is not None:
            parts.append(f"{self.unit} {self.row}")
        if self.column is not None:
            parts.append(f"column {self.column!r}")
        return f"{', '.join(parts)}: {self.problem}"


@dataclass
class _Table:
    """Rows plus where each came from, so that later checks (labels) can still point at the right line."""

    path: Path
    rows: list[dict[str, str]]
    positions: list[int]
    unit: Unit

    def error(self, index: int, column: str | None, problem: str) -> DataFileError:
        return DataFileError(self.path, problem, row=self.positions[index], column=column, unit=self.unit)


# ----------------------------------------------------------------------------------------------------
# Small helpers


def _quote(value: str) -> str:
    text = value if len(value) <= _MAX_QUOTED else value[: _MAX_QUOTED - 3] + "..."
    return repr(text)


def _list_names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", ... ({len(names)} in all)"
    return shown


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataFileError(path, "file not found (check data.train / data.eval in the site config)") from None
    except IsADirectoryError:
        raise DataFileError(path, "is a directory, expected a data file") from None
    except PermissionError:
        raise DataFileError(path, "permission denied: the site agent cannot read this file") from None


def _check_readable(path: Path) -> None:
    # Parquet is read by pyarrow, whose messages for a missing file are not meant for administrators.
    if not path.exists():
        raise DataFileError(path, "file not found (check data.train / data.eval in the site config)")
    if path.is_dir():
        raise DataFileError(path, "is a directory, expected a data file")


def _not_utf8(byte: bytes) -> str:
    return (
        f"byte 0x{byte.hex()} is not valid UTF-8; re-save the file as UTF-8 "
        "(it may have been exported as Latin-1 or Windows-1252)"
    )


def _decode(path: Path, data: bytes) -> str:
    """Decode UTF-8 (an Excel BOM is tolerated) and, when that fails, name the line with the bad byte."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataFileError(path, _not_utf8(data[exc.start : exc.start + 1]), row=line) from None


def _check_value(path: Path, value: str, *, row: int, column: str, unit: Unit) -> None:
    if not value.strip():
        raise DataFileError(path, "empty value in a required column", row=row, column=column, unit=unit)


def _require_columns(path: Path, present: Sequence[str], columns: Sequence[str], *, row: int | None) -> None:
    missing = [c for c in columns if c not in present]
    if missing:
        have = ", ".join(repr(c) for c in present) or "(none)"
        raise DataFileError(
            path,
            f"missing column(s) {', '.join(repr(c) for c in missing)}; the file has: {have}",
            row=row,
        )


def _no_rows(path: Path, table: _Table) -> _Table:
    if not table.rows:
        raise DataFileError(path, "the file has no data rows")
    return table


# ----------------------------------------------------------------------------------------------------
# CSV / TSV


def _csv_records(path: Path, text: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (first line of the record, fields); a quoted field may span lines, so track reader.line_num."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    previous_end = 0
    while True:
        start = previous_end + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataFileError(path, f"malformed CSV record ({exc}); check the quoting", row=start) from None
        previous_end = reader.line_num
        if fields:  # csv yields [] for a blank line; skip it like a spreadsheet would
            yield start, fields


def _read_delimited(path: Path, columns: Sequence[str], delimiter: str) -> _Table:
    text = _decode(path, _read_bytes(path))
    records = _csv_records(path, text, delimiter)
    first = next(records, None)
    if first is None:
        raise DataFileError(path, "the file is empty; expected a header line with the column names")
    header_line, raw_header = first
    header = [name.strip() for name in raw_header]
    _check_header(path, header, header_line)
    _require_columns(path, header, columns, row=header_line)
    where = {c: header.index(c) for c in columns}
    rows: list[dict[str, str]] = []
    positions: list[int] = []
    for line, fields in records:
        if len(fields) != len(header):
            raise DataFileError(
                path,
                f"expected {len(header)} fields as in the header but found {len(fields)} "
                f"(an unquoted {'tab' if delimiter == chr(9) else 'comma'} or a missing value?)",
                row=line,
            )
        row = {c: fields[i] for c, i in where.items()}
        for c, v in row.items():
            _check_value(path, v, row=line, column=c, unit="line")
        rows.append(row)
        positions.append(line)
    return _no_rows(path, _Table(path, rows, positions, "line"))


def _check_header(path: Path, header: Sequence[str], line: int) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataFileError(path, f"the header names column {name!r} twice", row=line, column=name)
        seen.add(name)


# ----------------------------------------------------------------------------------------------------
# JSON lines


def _json_value(path: Path, value: object, *, row: int, column: str) -> str:
    if isinstance(value, str):
        _check_value(path, value, row=row, column=column, unit="line")
        return value
    if value is None:
        raise DataFileError(path, "null value in a required column", row=row, column=column)
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = type(value).__name__.replace("dict", "object").replace("list", "array")
        raise DataFileError(path, f"expected text or a number, got {kind}", row=row, column=column)
    return str(value)


def _read_jsonl(path: Path, columns: Sequence[str]) -> _Table:
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    rows: list[dict[str, str]] = []
    positions: list[int] = []
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataFileError(
                path,
                _not_utf8(raw[exc.start : exc.start + 1]),
                row=line_no,
            ) from None
        if not line.strip():
            continue
        rows.append(_parse_json_line(path, line, line_no, columns))
        positions.append(line_no)
    return _no_rows(path, _Table(path, rows, positions, "line"))


def _parse_json_line(path: Path, line: str, line_no: int, columns: Sequence[str]) -> dict[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFileError(path, f"not valid JSON ({exc.msg} at character {exc.colno})", row=line_no) from None
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string"}.get(type(obj), "a " + type(obj).__name__)
        raise DataFileError(path, f"expected one JSON object per line, got {kind}", row=line_no)
    _require_columns(path, list(obj), columns, row=line_no)
    return {c: _json_value(path, obj[c], row=line_no, column=c) for c in columns}


# ----------------------------------------------------------------------------------------------------
# Parquet


def _read_parquet(path: Path, columns: Sequence[str]) -> _Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_readable(path)
    try:
        schema = pq.read_schema(path)
        _require_columns(path, schema.names, columns, row=None)
        table = pq.read_table(path, columns=list(columns))
    except (pa.ArrowException, OSError) as exc:
        raise DataFileError(path, f"not a readable Parquet file ({exc})") from None
    values = {c: table.column(c).to_pylist() for c in columns}
    rows = [
        {c: _parquet_value(path, values[c][i], row=i + 1, column=c) for c in columns} for i in range(table.num_rows)
    ]
    return _no_rows(path, _Table(path, rows, list(range(1, table.num_rows + 1)), "row"))


def _parquet_value(path: Path, value: object, *, row: int, column: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataFileError(path, "binary value is not UTF-8 text", row=row, column=column, unit="row") from None
    if isinstance(value, str):
        _check_value(path, value, row=row, column=column, unit="row")
        return value
    if value is None:
        raise DataFileError(path, "missing (null) value in a required column", row=row, column=column, unit="row")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataFileError(
            path, f"expected text or a number, got {type(value).__name__}", row=row, column=column, unit="row"
        )
    return str(value)


# ----------------------------------------------------------------------------------------------------
# Public API


def _read_table(path: Path, columns: Sequence[str]) -> _Table:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        hint = " (for JSON, write one object per line and name the file .jsonl)" if suffix == ".json" else ""
        raise DataFileError(
            path,
            f"unsupported file type {suffix or '(no suffix)'!r}; expected one of {', '.join(SUPPORTED_SUFFIXES)}{hint}",
        )
    if suffix == ".parquet":
        return _read_parquet(path, columns)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, columns)
    return _read_delimited(path, columns, "\t" if suffix == ".tsv" else ",")


def read_rows(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Read only the named columns of every row, refusing the file at the first problem.

    Failing on the first bad row (rather than skipping it) is deliberate: silently dropping rows would change
    the dataset the privacy ledger accounts for, and an administrator would never learn the export is broken.
    Only the requested columns are kept, so other (possibly sensitive) columns never reach the trainer.
    """
    return _read_table(path, columns).rows


@dataclass
class ClassificationData:
    """Texts with integer class indices into the federation's `task.labels`.

    `values` are the label cells exactly as the file stores them (a name, or an index such as "3"): the privacy
    ledger identifies records by them, since the indices depend on the label names the server sends.
    """

    texts: list[str]
    labels: list[int]
    values: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.values and len(self.values) != len(self.labels):
            raise ValueError(f"{len(self.values)} label values but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> ClassificationData:
        values = [self.values[i] for i in indices] if self.values else []
        return ClassificationData([self.texts[i] for i in indices], [self.labels[i] for i in indices], values)


@dataclass
class InstructionData:
    """Prompt/response pairs for causal-LM fine-tuning."""

    prompts: list[str]
    responses: list[str]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.responses):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.responses)} responses")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int]) -> InstructionData:
        return InstructionData([self.prompts[i] for i in indices], [self.responses[i] for i in indices])


def _label_index(value: str, label_names: Sequence[str], lookup: dict[str, int]) -> int | str:
    """Return the class index, or the problem as text: sites export labels either by name or by index."""
    key = value.strip()
    if key in lookup:
        return lookup[key]
    if _INT_RE.fullmatch(key):
        index = int(key)
        if 0 <= index < len(label_names):
            return index
        return f"label index {index} is out of range (expected 0..{len(label_names) - 1} or a label name)"
    problem = f"unknown label {_quote(key)} (expected one of: {_list_names(label_names)})"
    near = [n for n in label_names if n.casefold() == key.casefold()]
    if near:
        problem += f"; did you mean {near[0]!r}? Label names are case-sensitive"
    return problem


def load_classification(
    path: Path, text_column: str, label_column: str, label_names: Sequence[str]
) -> ClassificationData:
    """Load texts and labels; a label the federation does not know is an error at its line, not a new class.

    Every site must map labels to the same indices, so the federation's `task.labels` is the only source of
    truth; accepting the index form as well spares administrators a re-export of already encoded data.
    """
    if len(label_names) == 0:
        raise ValueError("label_names is empty; the federation config must list task.labels")
    table = _read_table(path, [text_column, label_column])
    lookup = {name: i for i, name in enumerate(label_names)}
    labels: list[int] = []
    for i, row in enumerate(table.rows):
        result = _label_index(row[label_column], label_names, lookup)
        if isinstance(result, str):
            raise table.error(i, label_column, result)
        labels.append(result)
    values = [row[label_column] for row in table.rows]
    return ClassificationData([row[text_column] for row in table.rows], labels, values)


def load_instructions(path: Path, prompt_column: str, response_column: str) -> InstructionData:
    """Load prompt/response pairs for the causal-LM task; both columns must be non-empty on every row."""
    rows = read_rows(path, [prompt_column, response_column])
    return InstructionData([r[prompt_column] for r in rows], [r[response_column] for r in rows])


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split range(n) into sorted (train, eval) indices, the same way on every run with the same seed.

    Determinism matters because the privacy ledger charges the training rows: a restarted site must train on
    exactly the same rows it already paid for. At least one eval row is kept when a fraction is asked for (so
    metrics exist) and at least one training row is always kept.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n_eval = round(n * fraction)
    if fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, max(n - 1, 0))
    order = np.random.default_rng(seed).permutation(n)
    eval_idx = sorted(int(i) for i in order[:n_eval])
    train_idx = sorted(int(i) for i in order[n_eval:])
    return train_idx, eval_idx


def dataset_fingerprint(path: Path) -> str:
    """SHA-256 of the file bytes: the privacy ledger's key, so any edit to the data starts a new budget line.

    Hashing bytes (not parsed rows) is intentional: it is cheap, format-independent and cannot be fooled by a
    parser that ignores part of the file. The file is streamed so large exports do not need to fit in memory.
    """
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise DataFileError(path, "file not found (check data.train / data.eval in the site config)") from None
    except IsADirectoryError:
        raise DataFileError(path, "is a directory, expected a data file") from None
    except PermissionError:
        raise DataFileError(path, "permission denied: the site agent cannot read this file") from None
    return digest.hexdigest()
