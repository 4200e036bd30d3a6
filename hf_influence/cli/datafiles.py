"""Checks on the data files the command line reads, made before tokenizing: the column flags name columns the
data has, and a file ``datasets`` cannot read is searched for the line that fails to parse."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

from .._utils.errors import InvalidInputError
from .arguments import DataArguments

COLUMN_FLAGS = ("text_column", "text_pair_column", "target_column", "label_column")


def check_column_flags(columns: list[str], args: DataArguments, source: str) -> None:
    """Refuse a column flag (or YAML key) naming no column of ``source``, with the columns it has.

    A flag is checked where it is used: ``--label_column`` always, the text flags only when the data needs
    tokenizing (no ``input_ids``). A default left unchanged is refused only where it is needed (``--text_column
    text`` on raw data); the default ``--label_column label`` may be absent (language modelling has no label).
    """
    tokenizing = "input_ids" not in columns
    defaults = {f.name: f.default for f in dataclasses.fields(DataArguments)}
    for flag in COLUMN_FLAGS:
        value = getattr(args, flag)
        if value is None or value in columns:
            continue
        used = flag == "label_column" or tokenizing
        needed = flag == "text_column" and tokenizing
        if needed or (used and value != defaults[flag]):
            raise InvalidInputError(
                f"{source}: --{flag} {value!r} names no column of this data; its columns are {', '.join(columns)}. "
                f"Pass --{flag} (YAML key {flag}) with one of them."
            )


def locate_parse_error(path: Path) -> str | None:
    """Where a csv / tsv / json / jsonl file stops parsing (``"line 3 ..."``), or ``None`` if every line parses."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        return f"line {line} is not UTF-8 text (byte {err.start} of the file)"
    if path.suffix in (".json", ".jsonl"):
        return _json_error(text)
    if path.suffix in (".csv", ".tsv"):
        return _csv_error(text, path.suffix[1:])
    return None


def _json_error(text: str) -> str | None:
    """One JSON document (``[...]``) or one JSON object per line."""
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except ValueError as err:
            return f"line {getattr(err, 'lineno', '?')} does not parse as JSON ({getattr(err, 'msg', err)})"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            return f"line {number} does not parse as JSON ({getattr(err, 'msg', err)}; a cut or unfinished line?)"
        if not isinstance(row, dict):
            return f"line {number} holds a JSON {type(row).__name__}, not an object with one field per column"
    return None


def _csv_error(text: str, kind: str) -> str | None:
    """A row with more fields than the header, or a quote left open (``kind``: ``"csv"`` or ``"tsv"``)."""
    reader = csv.reader(io.StringIO(text), delimiter="\t" if kind == "tsv" else ",", strict=True)
    try:
        header = next(reader, [])
        for row in reader:
            if len(row) > len(header):
                return f"line {reader.line_num} has {len(row)} fields, the header has {len(header)}"
    except csv.Error as err:
        return f"line {reader.line_num} does not parse as {kind} ({err})"
    return None
