"""Where the workbench reads and writes: one place for every default location.

| what | default | override |
|---|---|---|
| the zoo of a preset | ``zoo/<preset>/`` | ``WORKBENCH_ZOO`` (parent folder) |
| generated inputs | ``data/generated/<preset>/`` | - |
| result tables | ``data/results/<preset>/`` | ``WORKBENCH_RESULTS_DIR`` (parent folder) |
| figures | ``figures/`` | ``WORKBENCH_FIGURES_DIR`` |

The notebook tests point the overrides at temporary folders, so a ``tiny`` run never
overwrites the figures of a ``default`` run.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_root() -> Path:
    """The checkout this package was imported from."""
    return REPO_ROOT


def results_dir(preset: str) -> Path:
    """Folder of the result tables (CSV) of ``preset``."""
    parent = os.environ.get("WORKBENCH_RESULTS_DIR")
    return (Path(parent) if parent else REPO_ROOT / "data" / "results") / preset


def figures_dir() -> Path:
    """Folder the notebooks write their figures to."""
    env = os.environ.get("WORKBENCH_FIGURES_DIR")
    return Path(env) if env else REPO_ROOT / "figures"


def published_dir() -> Path:
    """Folder of the published tables copied from the papers."""
    return REPO_ROOT / "data" / "published"
