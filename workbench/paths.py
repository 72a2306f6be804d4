"""Where the workbench reads and writes: one place for every default location.

Every output is filed under its preset, so a ``tiny`` run never touches the outputs of a
``default`` run (the committed figures, tables and executed notebooks).

| what | default | override |
|---|---|---|
| the zoo of a preset | ``zoo/<preset>/`` | ``WORKBENCH_ZOO`` (parent folder) |
| generated inputs | ``data/generated/<preset>/`` | - |
| result tables | ``data/results/<preset>/`` | ``WORKBENCH_RESULTS_DIR`` (parent folder) |
| figures | ``figures/<preset>/`` | ``WORKBENCH_FIGURES_DIR`` (parent folder) |
| executed notebooks | ``figures/<preset>/executed/`` | follows the figures |
| their HTML views | ``docs/notebooks/`` (``default``), else next to the executed copies | - |

Result files that name other files (``pred_file`` columns, ``meta.json``) store them relative
to the repository (:func:`repo_relative`), so committed results hold no machine paths.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The preset whose outputs are committed (figures in the README, published HTML views).
COMMITTED_PRESET = "default"


def repo_root() -> Path:
    """The checkout this package was imported from."""
    return REPO_ROOT


def results_dir(preset: str) -> Path:
    """Folder of the result tables (CSV) of ``preset``."""
    parent = os.environ.get("WORKBENCH_RESULTS_DIR")
    return (Path(parent) if parent else REPO_ROOT / "data" / "results") / preset


def figures_dir(preset: str) -> Path:
    """Folder the notebooks write the figures of ``preset`` to."""
    parent = os.environ.get("WORKBENCH_FIGURES_DIR")
    return (Path(parent) if parent else REPO_ROOT / "figures") / preset


def executed_dir(preset: str) -> Path:
    """Folder of the executed copies of the notebooks run with ``preset``."""
    return figures_dir(preset) / "executed"


def html_dir(preset: str) -> Path:
    """Folder of the HTML views of the executed notebooks: ``docs/notebooks/`` for the committed
    preset (so a reader of the repository page sees results), else next to the executed copies."""
    return REPO_ROOT / "docs" / "notebooks" if preset == COMMITTED_PRESET else executed_dir(preset)


def notebooks_dir() -> Path:
    """The repository's ``notebooks/`` (whatever the current directory)."""
    return REPO_ROOT / "notebooks"


def published_dir() -> Path:
    """Folder of the published tables copied from the papers."""
    return REPO_ROOT / "data" / "published"


def repo_relative(path: str | Path) -> str:
    """``path`` as a POSIX string relative to the repository when it lies inside it, else unchanged.

    Inside means by its absolute path as named (a zoo folder that is a symlink to another disk is still
    ``zoo/default``) or by its resolved one. What result files store for the files they name;
    :func:`resolve_repo_path` reads it back."""
    p = Path(path)
    for candidate in (Path(os.path.abspath(p)), p.resolve()):
        try:
            return candidate.relative_to(REPO_ROOT).as_posix()
        except ValueError:
            continue
    return str(path)


def resolve_repo_path(path: str | Path) -> Path:
    """The inverse of :func:`repo_relative`: a relative path is taken from the repository root."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p
