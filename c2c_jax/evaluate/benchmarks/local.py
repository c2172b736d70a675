"""Benchmarks from a local ``.jsonl`` / ``.jsonl.gz`` / ``.json`` / ``.parquet`` / ``.csv`` file."""

from __future__ import annotations

import csv
import gzip
import json
import pathlib
from typing import Iterator, Mapping

from c2c_jax.evaluate.benchmarks.items import _Collector, _MissingField, _row_to_item

def _read_local_rows(path: pathlib.Path) -> Iterator[dict]:
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".jsonl.gz") else path.suffix.lower()
    if suffix in (".jsonl", ".jsonl.gz"):
        opener = gzip.open if suffix == ".jsonl.gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}: line {lineno} is not valid JSON: {exc}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {lineno} is not a JSON object")
                yield row
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, Mapping):
            for key in ("data", "items", "rows", "examples", "questions"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {i} is not a JSON object")
            yield row
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield from csv.DictReader(f)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .csv")


def _load_local(name: str, path: pathlib.Path, collector: _Collector) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (source must be 'offline', 'hub' or a path to a data file)")
    for i, row in enumerate(_read_local_rows(path)):
        if collector.full:
            break
        try:
            item, skipped = _row_to_item(row, f"{path.stem}/{i}")
        except _MissingField as exc:
            raise ValueError(
                f"{path}: row {i} (0-based) has no field {exc.field!r}"
                + (" (nor columns A, B, ...)" if exc.field == "choices" else "")
                + f"; fields present: {sorted(row)}. Required: question, choices (list) or A..D columns, "
                "answer (letter or 0-based index); optional: id, subject."
            ) from None
        except ValueError as exc:
            raise ValueError(f"{path}: row {i} (0-based): {exc}") from None
        collector.add(item, skipped)
