"""The studies' prediction cache: keys, and per-item prediction tables read and written as CSV.

Both studies (:mod:`workbench.studies.composition`, :mod:`workbench.studies.merging_benchmark`) keep what they
evaluate under ``data/results/<preset>/cache/`` (the composition study in ``cache/``, the merging
benchmark in ``cache/experiments/``), one CSV per evaluation, named by a hash of its inputs:

- :func:`records_digest` - what an evaluation depends on in its records (ids and gold answers);
- :func:`digest` - a short sha256 of a JSON mapping, with :data:`CACHE_VERSION`;
- :func:`result_key` - :func:`digest` of the inputs and of the code that computes the numbers
  (:func:`workbench.evaluate.code_digest`), so a fixed method never reuses predictions of old code;
- :func:`entry_path` - the file of an entry, named by :func:`result_key`;
- :func:`read_predictions`, :func:`write_frame` - a cached table read back with the columns as
  written (ids, gold answers and predictions as strings), and written through a temporary name;
- :func:`cached` - ``compute()`` unless its table is cached.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from ..evaluate import code_digest
from ..io.writer import atomic_write

#: Part of every key: bumped when a cached table's meaning changes (retires every cached table).
CACHE_VERSION = "1"


def records_digest(records: Sequence[Mapping]) -> str:
    """sha256 over the records' ids and gold answers (what a cached evaluation depends on)."""
    return hashlib.sha256(json.dumps([(r["id"], r["conversations"][1]["value"]) for r in records])
                          .encode()).hexdigest()[:16]


def digest(parts: Mapping) -> str:
    """A short sha256 (20 hex digits) of a JSON-serialisable mapping (sorted keys) and :data:`CACHE_VERSION`."""
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str)
                          .encode()).hexdigest()[:20]


def result_key(parts: Mapping) -> str:
    """:func:`digest` of ``parts`` and of the code that produces the numbers
    (:func:`workbench.evaluate.code_digest`: compose, methods, engine, evaluate, the model's scorer)."""
    return digest({"code": code_digest(), **parts})


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A cached table as written: ``id``, ``gold`` and ``pred`` as strings, no value read as NaN."""
    return pd.read_csv(path, dtype={"id": str, "gold": str, "pred": str}, keep_default_na=False, na_values=[])


def write_frame(df: pd.DataFrame, path: Path) -> None:
    """``df`` to ``path`` (CSV, no index) through a temporary name in the same folder (never a
    half-written table, even with several writers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: df.to_csv(p, index=False))


def entry_path(cache_dir: str | Path, parts: Mapping, suffix: str = ".csv") -> Path:
    """Where the cache keeps what it stores for ``parts``: ``cache_dir/<result_key(parts)><suffix>``."""
    return Path(cache_dir) / f"{result_key(parts)}{suffix}"


def cached(cache_dir: Path | None, parts: Mapping, compute: Callable[[], pd.DataFrame]) -> tuple[pd.DataFrame, bool]:
    """``compute()`` unless :func:`entry_path` of ``parts`` exists; returns (frame, was_cached)."""
    if cache_dir is None:
        return compute(), False
    f = entry_path(cache_dir, parts)
    if f.is_file():
        return read_predictions(f), True
    df = compute()
    write_frame(df, f)
    return df, False


__all__ = ["CACHE_VERSION", "cached", "digest", "entry_path", "read_predictions", "records_digest", "result_key", "write_frame"]
