"""Read raw records (dicts) from files or Python objects, one at a time.

Every record comes with a location string ("data.jsonl:17", "data.parquet row 4", "example 3")
so that later errors can point at it. Large JSONL files are streamed line by line.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from unsloth_jax.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class Record:
    location: str
    data: dict[str, Any]


# Called with (reason, location, detail) when a bad record is skipped rather than raised.
SkipFn = Callable[[str, str, str], None]


def iter_records(source, *, skip_malformed: bool = False, on_skip: SkipFn | None = None) -> Iterator[Record]:
    """Yield a Record for each example of `source`: a file path (.jsonl, .json, .parquet, .csv,
    optionally .gz), a `datasets.Dataset`, a pandas DataFrame, or an iterable of dicts."""
    on_skip = on_skip or (lambda reason, location, detail: None)
    if isinstance(source, (str, os.PathLike)):
        yield from _iter_file(os.fspath(source), skip_malformed, on_skip)
    else:
        yield from _iter_python(source, skip_malformed, on_skip)


def describe_source(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return type(source).__name__


def _suffix(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return suffix
    raise DataError(f"{path}: unknown file type. Fix: use one of {', '.join(SUFFIXES)} "
                    "(optionally .gz), or load the file yourself and pass a list of dicts.")


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _iter_file(path: str, skip_malformed: bool, on_skip: SkipFn) -> Iterator[Record]:
    if not os.path.exists(path):
        raise DataError(f"{path}: dataset file not found. Fix: check the path (relative paths are "
                        f"resolved from {os.getcwd()}).")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory. Fix: pass one data file ({', '.join(SUFFIXES)}).")
    readers = {".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet, ".csv": _iter_csv}
    yield from readers[_suffix(path)](path, skip_malformed, on_skip)


def _iter_jsonl(path: str, skip_malformed: bool, on_skip: SkipFn) -> Iterator[Record]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (often a trailing newline) are not examples
            location = f"{path}:{lineno}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                _malformed(location, f"malformed JSON ({e.msg} at column {e.colno})", "Fix the line, or pass "
                           "skip_malformed=True to skip (and count) bad lines.", "malformed JSON", skip_malformed, on_skip)
                continue
            if not isinstance(data, dict):
                _malformed(location, f"expected a JSON object per line, got {type(data).__name__}",
                           "Fix: write one {...} object per line, or pass skip_malformed=True.", "malformed JSON",
                           skip_malformed, on_skip)
                continue
            yield Record(location, data)


def _iter_json(path: str, skip_malformed: bool, on_skip: SkipFn) -> Iterator[Record]:
    # A .json file is one document, so it is parsed whole; use JSONL for large data.
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}). "
                            "Fix the file (a .json file must be one valid JSON list of objects; "
                            "skip_malformed cannot skip inside one document).") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]} wrappers
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}. "
                        "Fix: write [{...}, {...}] or use JSONL (one object per line).")
    yield from _dict_records(data, lambda i: f"{path}[{i}]", "an object", "Fix the item, or pass skip_malformed=True.",
                             "malformed JSON", skip_malformed, on_skip)


def _iter_parquet(path: str, skip_malformed: bool, on_skip: SkipFn) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow. Fix: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read Parquet file ({e}). Fix: check the file.") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):  # bounded memory for big files
        for data in batch.to_pylist():
            yield Record(f"{path} row {row}", data)
            row += 1


def _iter_csv(path: str, skip_malformed: bool, on_skip: SkipFn) -> Iterator[Record]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        for data in reader:
            location = f"{path}:{reader.line_num}"
            if None in data:  # DictReader puts surplus fields under the key None
                _malformed(location, f"{len(data[None])} more fields than the header has",
                           "Fix: quote fields containing commas, or pass skip_malformed=True.", "malformed CSV",
                           skip_malformed, on_skip)
                continue
            yield Record(location, data)


def _iter_python(source, skip_malformed: bool, on_skip: SkipFn) -> Iterator[Record]:
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # pandas DataFrame
        source = source.to_dict("records")
    elif isinstance(source, dict):
        splits = ", ".join(repr(k) for k in list(source)[:5])
        raise DataError(f"got a dict (keys {splits}) instead of a dataset. Fix: pass one split, "
                        "e.g. dataset['train'], or a list of example dicts.")
    try:
        items = iter(source)
    except TypeError:
        raise DataError(f"cannot read a dataset from {type(source).__name__}. Fix: pass a file "
                        "path, a datasets.Dataset, or a list of dicts.") from None
    yield from _dict_records(items, lambda i: f"example {i}", "a dict",
                             "Fix: pass a list of dicts, or skip_malformed=True.", "malformed example",
                             skip_malformed, on_skip)


def _dict_records(items, location_of, expected: str, fix: str, reason: str, skip_malformed: bool,
                  on_skip: SkipFn) -> Iterator[Record]:
    """Each dict of `items` as a Record; anything else is malformed: an error, or skipped and counted."""
    for i, item in enumerate(items):
        location = location_of(i)
        if isinstance(item, dict):
            yield Record(location, item)
            continue
        _malformed(location, f"expected {expected}, got {type(item).__name__}", fix, reason, skip_malformed, on_skip)


def _malformed(location: str, detail: str, fix: str, reason: str, skip_malformed: bool, on_skip: SkipFn) -> None:
    """A bad line or example: a DataError naming where and how to fix it, or (skip_malformed) counted."""
    if not skip_malformed:
        raise DataError(f"{location}: {detail}. {fix}")
    on_skip(reason, location, detail)
