"""Writing analysis results: tidy frames as CSV + Parquet and ``meta.json``, each file atomically."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ..io.writer import atomic_write


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
