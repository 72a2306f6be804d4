"""Writing analysis results: tidy frames as CSV + Parquet and ``meta.json``, each file atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary sibling of ``path``, then rename it to ``path`` (a reader never sees a half file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_frames(out_dir: str | Path, frames: Mapping[str, pd.DataFrame]) -> Path:
    """Create ``out_dir`` and write each frame as ``<name>.csv`` and ``<name>.parquet`` (no index)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in frames.items():
        atomic_write(out / f"{name}.csv", lambda p, df=df: df.to_csv(p, index=False))
        atomic_write(out / f"{name}.parquet", lambda p, df=df: df.to_parquet(p, index=False))
    return out


def save_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON (anything else as ``str``)."""
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=str)))
