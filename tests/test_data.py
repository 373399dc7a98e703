"""Reading site data: every failure must name the file, the line (or Parquet row) and the column."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedtune.common.data import (
    ClassificationData,
    DataFileError,
    InstructionData,
    dataset_fingerprint,
    load_classification,
    load_instructions,
    read_rows,
    split_holdout,
)

LABELS = ("a", "b", "c")
ROWS = [
    {"text": "first message", "label": "a", "extra": "ignored"},
    {"text": 'with "quotes", commas\tand tabs', "label": "b", "extra": "x"},
    {"text": "ünïcödé ✓", "label": "c", "extra": "y"},
    {"text": "index label", "label": "1", "extra": "z"},
]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, str]], delimiter: str = ",") -> Path:
    import csv

    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_parquet(path: Path, rows: list[dict[str, object]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def raises(path: Path, columns: list[str] | None = None) -> DataFileError:
    with pytest.raises(DataFileError) as info:
        read_rows(path, columns or ["text", "label"])
    return info.value


# ----------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".ndjson", ".parquet"])
def test_formats_round_trip_same_content(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"bank{suffix}"
    if suffix == ".csv":
        write_csv(path, ROWS)
    elif suffix == ".tsv":
        write_csv(path, ROWS, delimiter="\t")
    elif suffix == ".parquet":
        write_parquet(path, ROWS)
    else:
        write_jsonl(path, ROWS)
    rows = read_rows(path, ["text", "label"])
    assert rows == [{"text": r["text"], "label": r["label"]} for r in ROWS]
    data = load_classification(path, "text", "label", LABELS)
    assert data.labels == [0, 1, 2, 1]
    assert data.texts[2] == "ünïcödé ✓"


def test_numbers_in_jsonl_and_parquet_become_text(tmp_path: Path) -> None:
    rows = [{"text": "x", "label": 2}, {"text": "y", "label": 0}]
    for path in (write_jsonl(tmp_path / "n.jsonl", rows), write_parquet(tmp_path / "n.parquet", rows)):
        assert load_classification(path, "text", "label", LABELS).labels == [2, 0]


def test_bom_and_blank_lines_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\r\nhello,a\r\n\r\nworld,b\r\n")
    assert read_rows(path, ["text", "label"]) == [
        {"text": "hello", "label": "a"},
        {"text": "world", "label": "b"},
    ]


def test_only_requested_columns_are_returned(tmp_path: Path) -> None:
    rows = read_rows(write_csv(tmp_path / "b.csv", ROWS), ["label"])
    assert rows[0] == {"label": "a"}


# ----------------------------------------------------------------------------------------------------
# File-level errors


def test_missing_file(tmp_path: Path) -> None:
    err = raises(tmp_path / "nope.csv")
    assert err.path == tmp_path / "nope.csv"
    assert err.row is None and err.column is None
    assert "nope.csv" in str(err) and "file not found" in str(err)


def test_missing_parquet_file(tmp_path: Path) -> None:
    assert "file not found" in str(raises(tmp_path / "nope.parquet"))


def test_unknown_suffix(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "bank.xlsx", "x"))
    assert "bank.xlsx" in str(err) and "unsupported file type '.xlsx'" in str(err) and ".jsonl" in str(err)
    assert ".jsonl" in str(raises(write(tmp_path / "bank.json", "{}")))


def test_missing_column_lists_existing(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "bank.csv", "text,lbl\nhi,a\n"))
    assert err.row == 1 and err.column is None
    assert str(err) == f"{tmp_path / 'bank.csv'}, line 1: missing column(s) 'label'; the file has: 'text', 'lbl'"


def test_missing_column_parquet(tmp_path: Path) -> None:
    err = raises(write_parquet(tmp_path / "b.parquet", [{"text": "x", "lbl": "a"}]))
    assert err.row is None
    assert "missing column(s) 'label'; the file has: 'text', 'lbl'" in str(err)


def test_missing_key_jsonl_names_line(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "b.jsonl", '{"text": "x", "label": "a"}\n{"text": "y"}\n'))
    assert err.row == 2 and "line 2" in str(err) and "missing column(s) 'label'" in str(err)


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    assert "empty" in str(raises(write(tmp_path / "e.csv", "")))
    err = raises(write(tmp_path / "h.csv", "text,label\n"))
    assert "no data rows" in str(err)
    assert "no data rows" in str(raises(write(tmp_path / "e.jsonl", "\n\n")))
    table = pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())})
    pq.write_table(table, tmp_path / "e.parquet")
    assert "no data rows" in str(raises(tmp_path / "e.parquet"))


def test_corrupt_parquet(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "bad.parquet", "this is not parquet"))
    assert "bad.parquet" in str(err) and "not a readable Parquet file" in str(err)


def test_duplicate_header(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "d.csv", "text,label,text\nx,a,y\n"))
    assert err.row == 1 and err.column == "text" and "twice" in str(err)


# ----------------------------------------------------------------------------------------------------
# Row-level errors


def test_blank_value_csv(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "bank.csv", "text,label\nhello,a\n   ,b\n"))
    assert (err.row, err.column, err.unit) == (3, "text", "line")
    assert str(err) == f"{tmp_path / 'bank.csv'}, line 3, column 'text': empty value in a required column"


def test_blank_and_null_values_jsonl(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "b.jsonl", '{"text": "x", "label": "a"}\n\n{"text": "", "label": "a"}\n'))
    assert (err.row, err.column) == (3, "text")
    err = raises(write(tmp_path / "n.jsonl", '{"text": "x", "label": null}\n'))
    assert (err.row, err.column) == (1, "label") and "null" in str(err)
    err = raises(write(tmp_path / "o.jsonl", '{"text": {"a": 1}, "label": "a"}\n'))
    assert (err.row, err.column) == (1, "text") and "got object" in str(err)


def test_null_value_parquet_names_row(tmp_path: Path) -> None:
    err = raises(write_parquet(tmp_path / "b.parquet", [{"text": "x", "label": "a"}, {"text": None, "label": "b"}]))
    assert (err.row, err.column, err.unit) == (2, "text", "row")
    assert "b.parquet, row 2, column 'text'" in str(err)


def test_malformed_json_line(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "b.jsonl", '{"text": "x", "label": "a"}\n{"text": "y", "label": \n'))
    assert err.row == 2 and "line 2" in str(err) and "not valid JSON" in str(err)


def test_non_object_json_line(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "b.jsonl", '{"text": "x", "label": "a"}\n["y", "a"]\n'))
    assert err.row == 2 and "expected one JSON object per line, got an array" in str(err)


def test_wrong_field_count(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "bank.csv", "text,label\nhello,a\nhello, world,b\n"))
    assert err.row == 3 and err.column is None
    assert "line 3" in str(err) and "expected 2 fields as in the header but found 3" in str(err)


def test_wrong_field_count_tsv_mentions_tab(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "bank.tsv", "text\tlabel\nhello\n"))
    assert err.row == 2 and "tab" in str(err)


def test_non_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nok,a\ncaf\u00e9,b\n".encode("latin-1"))
    err = raises(path)
    assert err.row == 3 and "line 3" in str(err) and "0xe9" in str(err) and "UTF-8" in str(err)
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "a"}\n')
    assert raises(path).row == 2


def test_bad_quoting_names_record_start(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "q.csv", 'text,label\nok,a\n"broken" quote,b\n'))
    assert err.row == 3 and "malformed CSV" in str(err)


def test_quoted_multiline_fields_keep_line_numbers(tmp_path: Path) -> None:
    text = 'text,label\n"line one\nline two\nline three",a\nplain,b\n"two\nlines",zzz\n'
    path = write(tmp_path / "multi.csv", text)
    rows = read_rows(path, ["text", "label"])
    assert rows[0]["text"] == "line one\nline two\nline three"
    with pytest.raises(DataFileError) as info:
        load_classification(path, "text", "label", LABELS)
    err = info.value
    # header=1, first record spans 2-4, "plain" is 5, the bad record starts on line 6
    assert (err.row, err.column) == (6, "label")
    assert str(err) == (f"{path}, line 6, column 'label': unknown label 'zzz' (expected one of: a, b, c)")


def test_wrong_field_count_after_multiline(tmp_path: Path) -> None:
    err = raises(write(tmp_path / "m.csv", 'text,label\n"a\nb\nc",a\nx,b,extra\n'))
    assert err.row == 5


# ----------------------------------------------------------------------------------------------------
# Labels


def test_unknown_label_message(tmp_path: Path) -> None:
    lines = ["text,label"] + [f"t{i},a" for i in range(15)] + ["bad,foo"]
    path = write(tmp_path / "bank.csv", "\n".join(lines) + "\n")
    names = [f"n{i}" for i in range(12)]
    with pytest.raises(DataFileError) as info:
        load_classification(path, "text", "label", ["a", *names])
    err = info.value
    assert (err.row, err.column) == (17, "label")
    assert str(err).startswith(f"{path}, line 17, column 'label': unknown label 'foo' (expected one of: a, n0,")
    assert "(13 in all)" in str(err)


def test_label_index_and_case_hint(tmp_path: Path) -> None:
    path = write(tmp_path / "b.csv", "text,label\nx,2\ny, b \nz,7\n")
    with pytest.raises(DataFileError) as info:
        load_classification(path, "text", "label", LABELS)
    assert info.value.row == 4 and "label index 7 is out of range (expected 0..2" in str(info.value)
    path = write(tmp_path / "c.csv", "text,label\nx,A\n")
    with pytest.raises(DataFileError, match="did you mean 'a'"):
        load_classification(path, "text", "label", LABELS)


def test_label_names_take_precedence_over_indices(tmp_path: Path) -> None:
    path = write(tmp_path / "b.csv", "text,label\nx,0\ny,1\n")
    assert load_classification(path, "text", "label", ["1", "0"]).labels == [1, 0]


def test_unknown_label_parquet_names_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "b.parquet", [{"text": "x", "label": "a"}, {"text": "y", "label": "q"}])
    with pytest.raises(DataFileError) as info:
        load_classification(path, "text", "label", LABELS)
    assert (info.value.row, info.value.unit) == (2, "row")
    assert "b.parquet, row 2, column 'label': unknown label 'q'" in str(info.value)


# ----------------------------------------------------------------------------------------------------
# Instructions, containers, holdout, fingerprint


def test_load_instructions(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "i.jsonl", [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}])
    data = load_instructions(path, "prompt", "response")
    assert data == InstructionData(["p1", "p2"], ["r1", "r2"])
    assert len(data) == 2 and data.subset([1]).prompts == ["p2"]
    bad = write(tmp_path / "i.csv", "prompt,response\np,\n")
    with pytest.raises(DataFileError) as info:
        load_instructions(bad, "prompt", "response")
    assert (info.value.row, info.value.column) == (2, "response")


def test_containers_check_lengths() -> None:
    with pytest.raises(ValueError):
        ClassificationData(["a"], [])
    with pytest.raises(ValueError):
        InstructionData(["a"], [])
    assert ClassificationData(["a", "b"], [0, 1]).subset([1]) == ClassificationData(["b"], [1])


def test_split_holdout() -> None:
    train, ev = split_holdout(100, 0.2, seed=3)
    assert len(ev) == 20 and sorted(train + ev) == list(range(100))
    assert (train, ev) == split_holdout(100, 0.2, seed=3)
    assert ev != split_holdout(100, 0.2, seed=4)[1]
    assert split_holdout(5, 0.01, 0)[1] != [] and len(split_holdout(5, 0.01, 0)[1]) == 1
    assert split_holdout(2, 0.9, 0)[0] != []
    assert split_holdout(10, 0.0, 0) == (list(range(10)), [])
    assert split_holdout(1, 0.5, 0) == ([0], [])
    assert split_holdout(0, 0.5, 0) == ([], [])
    with pytest.raises(ValueError):
        split_holdout(10, 1.0, 0)


def test_dataset_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    payload = b"text,label\n" + b"x" * (3 << 20) + b",a\n"
    path.write_bytes(payload)
    assert dataset_fingerprint(path) == hashlib.sha256(payload).hexdigest()
    path.write_bytes(payload + b"y,b\n")
    assert dataset_fingerprint(path) != hashlib.sha256(payload).hexdigest()
    with pytest.raises(DataFileError, match="file not found"):
        dataset_fingerprint(tmp_path / "missing.csv")
