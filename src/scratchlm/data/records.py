"""Records (one dict per example) from the files fine-tuning and alignment data come in:
JSON Lines, a JSON array, Parquet, CSV and TSV (with a header row, or named columns).

Every problem is one line naming the file, the line or row, and the fix.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from scratchlm.errors import ScratchError


def read_records(path: str | os.PathLike, required: list[str] = (),
                 columns: list[str] | None = None,
                 headerless: list[str] | None = None) -> list[dict]:
    """The rows of `path` as dicts, each checked to hold the `required` fields.

    The format follows the suffix (.jsonl, .json, .parquet, .csv, .tsv); a file without one
    is read as TSV when its first line holds a tab, else as JSON Lines. A CSV/TSV file's first
    row names the columns, unless `columns` does; when the first row does not name the
    required fields and has as many cells as `headerless`, the file is read as headerless with
    those names (e.g. the SMS Spam Collection's `label<TAB>text`)."""
    path = Path(path)
    if not path.is_file():
        raise ScratchError(f"{path}: no such file; check the path")
    kind = _kind(path)
    if kind == "parquet":
        rows = _parquet(path)
    elif kind in ("csv", "tsv"):
        rows = _delimited(path, "\t" if kind == "tsv" else ",", required, columns, headerless)
    else:
        rows = _json(path, kind)
    if not rows:
        raise ScratchError(f"{path}: no records; the file is empty")
    for i, row in enumerate(rows):
        missing = [f for f in required if f not in row]
        if missing:
            where = f"line {i + 1}" if kind == "jsonl" else f"record {i + 1}"
            raise ScratchError(f"{path}: {where} has no field {missing[0]!r} (it has "
                               f"{', '.join(map(repr, row)) or 'none'}); name the right field "
                               "in the config")
    return rows


def _kind(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("jsonl", "json", "parquet", "csv", "tsv"):
        return suffix
    with path.open("rb") as f:
        first = f.readline()
    return "tsv" if b"\t" in first else "jsonl"


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ScratchError(f"{path}: not valid UTF-8 at byte offset {e.start}; convert it to "
                           "UTF-8") from None


def _json(path: Path, kind: str) -> list[dict]:
    text = _text(path)
    if kind == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScratchError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} and similar single-key wrappers
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ScratchError(f"{path}: expected a JSON array of objects")
        return data
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ScratchError(f"{path}: line {n} is not valid JSON ({e.msg}); JSON Lines "
                               "holds one object per line") from None
        if not isinstance(row, dict):
            raise ScratchError(f"{path}: line {n} is not a JSON object")
        rows.append(row)
    return rows


def _delimited(path: Path, delimiter: str, required: list[str], columns: list[str] | None,
               headerless: list[str] | None) -> list[dict]:
    csv.field_size_limit(sys.maxsize)
    # A TSV is split at tabs only: quotes are text (SMS messages hold many).
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows = list(csv.reader(_text(path).splitlines(), delimiter=delimiter, quoting=quoting))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        return []
    names = columns
    if names is None:
        if all(f in rows[0] for f in required):
            names, rows = rows[0], rows[1:]
        elif headerless and len(rows[0]) == len(headerless):
            names = headerless
        else:
            raise ScratchError(f"{path}: the first row does not name the columns "
                               f"{', '.join(map(repr, required))}; add a header row or name the "
                               "columns in the config")
    out = []
    for n, row in enumerate(rows, 1):
        if len(row) != len(names):
            raise ScratchError(f"{path}: row {n} has {len(row)} cells, expected {len(names)} "
                               f"({', '.join(names)})")
        out.append(dict(zip(names, row)))
    return out


def _parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ScratchError(f"{path}: not a readable Parquet file ({e})") from None
