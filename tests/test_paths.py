"""Where outputs go: every preset apart, and result files that name files relative to the repository."""
from __future__ import annotations

import pandas as pd

from workbench import paths
from workbench.studies import protocol as P
from workbench.studies import tables as T


def test_each_preset_has_its_own_outputs(monkeypatch, tmp_path):
    from workbench.world.presets import data_root, zoo_root

    for var in ("WORKBENCH_FIGURES_DIR", "WORKBENCH_RESULTS_DIR", "WORKBENCH_ZOO"):
        monkeypatch.delenv(var, raising=False)
    root = paths.repo_root()
    assert zoo_root("tiny") == root / "zoo" / "tiny" and data_root("tiny") == root / "data" / "generated" / "tiny"
    assert paths.figures_dir("tiny") == root / "figures" / "tiny"
    assert paths.executed_dir("tiny") == root / "figures" / "tiny" / "executed"
    assert paths.html_dir("default") == root / "docs" / "notebooks"  # published: the repository page shows it
    assert paths.html_dir("tiny") == paths.executed_dir("tiny")       # never beside the published views
    assert paths.figures_dir("tiny") != paths.figures_dir("default")
    assert paths.results_dir("tiny") != paths.results_dir("default")
    monkeypatch.setenv("WORKBENCH_FIGURES_DIR", str(tmp_path))
    assert paths.figures_dir("tiny") == tmp_path / "tiny"


def test_repo_relative_round_trip(tmp_path, monkeypatch):
    root = paths.repo_root()
    inside = root / "data" / "results" / "default" / "cache" / "x.csv"
    assert paths.repo_relative(inside) == "data/results/default/cache/x.csv"
    assert paths.resolve_repo_path("data/results/default/cache/x.csv") == inside
    outside = tmp_path / "y.csv"
    assert paths.repo_relative(outside) == str(outside)  # outside the repository: unchanged
    assert paths.resolve_repo_path(str(outside)) == outside


def test_repo_relative_keeps_a_symlinked_folder_inside_the_repository(tmp_path, monkeypatch):
    """A zoo folder symlinked to another disk is named by its place in the repository, not the link's target."""
    root, elsewhere = tmp_path / "repo", tmp_path / "disk" / "default"
    (root / "zoo").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    (root / "zoo" / "default").symlink_to(elsewhere)
    monkeypatch.setattr(paths, "REPO_ROOT", root)
    assert paths.repo_relative(root / "zoo" / "default") == "zoo/default"
    assert paths.resolve_repo_path("zoo/default") == root / "zoo" / "default"


def test_result_rows_name_prediction_files_relative_to_the_repository(tmp_path, monkeypatch):
    """``pred_file`` is written relative to the repository and read back from it."""
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path)
    f = tmp_path / "data" / "results" / "default" / "cache" / "p.csv"
    f.parent.mkdir(parents=True)
    pred = pd.DataFrame({"id": ["1", "2"], "gold": ["A", "B"], "pred": ["A", "C"], "correct": [True, False]})
    pred.to_csv(f, index=False)
    pred.attrs["file"] = str(f)
    row = P.result_row("Task Arithmetic", "task_arithmetic", "merge", "vqa", "test", 1.0, 0, pred, selected=True)
    assert row["pred_file"] == "data/results/default/cache/p.csv"
    back = T.item_predictions(pd.DataFrame([row]), "Task Arithmetic")
    assert back["correct"].tolist() == [True, False] and back["task_set"].tolist() == ["vqa", "vqa"]
