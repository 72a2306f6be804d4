"""The notebooks: stored clean and well named, and each one runs end to end with the tiny preset.

- ``test_notebook_runs_tiny[NN_name]`` (marked ``notebooks``): executes the notebook with
  papermill, ``preset="tiny"``, into a temporary folder. It runs from a mirror of the repository
  (``notebooks/`` copied, ``figures/`` an empty temporary folder, everything else symlinked), so
  ``../data`` and ``../zoo`` resolve as usual but the real figures are never overwritten by a
  tiny run. The tiny zoo is built first (``workbench.world.build_zoo("tiny")``, cached). The kernel
  gets ``WORKBENCH_PRESET=tiny`` and ``WORKBENCH_FIGURES_DIR=<mirror>/figures``.
  With no notebook at all the parametrisation is one failing case, not an empty pass.
- static checks: stored without outputs or execution counts, a cell tagged ``parameters`` that
  assigns ``preset``, names ``NN_name.ipynb`` with unique, consecutive numbers;
- :mod:`workbench.reproduce` itself on throw-away notebooks (parameter injection, order, a failing
  notebook does not stop the rest, exit status, the list of new files).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import threading
import time
import types
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from workbench import reproduce
from workbench.reproduce import discover_notebooks, execute_notebook, run_notebooks, select_notebooks

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO / "notebooks"
NOTEBOOKS = discover_notebooks(NOTEBOOKS_DIR)
#: Per-notebook limit for the tiny run (seconds).
NOTEBOOK_TIMEOUT_S = int(os.environ.get("WORKBENCH_NOTEBOOK_TIMEOUT", "900"))


def _params():
    if NOTEBOOKS:
        return [pytest.param(p, id=p.stem) for p in NOTEBOOKS]
    return [pytest.param(None, id="no-notebooks")]


def _parameters_cell(nb) -> tuple[int, str] | None:
    for i, cell in enumerate(nb.cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return i, cell.source
    return None


def _assigned_names(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name):
                    names.add(n.id)
    return names


# ------------------------------------------------------------------------------------ run each notebook
@pytest.fixture(scope="session")
def mirror(tmp_path_factory) -> Path:
    """A stand-in repository root: ``notebooks/`` copied, ``figures/`` empty, the rest symlinked.

    The notebooks run from ``<mirror>/notebooks``, so their relative paths work (``../data``,
    ``../zoo``) while the figures of a tiny-preset run never overwrite the real ``figures/``.
    """
    root = tmp_path_factory.mktemp("repo")
    for entry in REPO.iterdir():
        if entry.name not in {"notebooks", "figures", ".git", ".venv", "screenshots", ".pytest_cache"}:
            (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (root / "figures").mkdir()
    shutil.copytree(NOTEBOOKS_DIR, root / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return root


@pytest.fixture(scope="session")
def tiny_zoo():
    """Build (or reuse) the tiny zoo once, before the first notebook."""
    ok, msg = reproduce.ensure_zoo("tiny", log=lambda m: None)
    assert ok, msg
    return msg


@pytest.mark.notebooks
@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S + 600)
@pytest.mark.parametrize("notebook", _params())
def test_notebook_runs_tiny(notebook, tmp_path, monkeypatch, request):
    if notebook is None:
        pytest.fail(f"no notebooks NN_*.ipynb in {NOTEBOOKS_DIR}: nothing to execute")
    request.getfixturevalue("tiny_zoo")
    root = request.getfixturevalue("mirror")
    monkeypatch.setenv("WORKBENCH_PRESET", "tiny")
    monkeypatch.setenv("WORKBENCH_FIGURES_DIR", str(root / "figures"))
    out = tmp_path / notebook.name
    row = execute_notebook(root / "notebooks" / notebook.name, out, {"preset": "tiny"}, cwd=root / "notebooks",
                           timeout=NOTEBOOK_TIMEOUT_S)
    assert row["status"] == "ok", f"{notebook.name} failed after {row['seconds']:.0f} s: {row['error']}\n" \
                                  f"(executed copy: {out})"
    executed = nbformat.read(out, as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code if c.source.strip()), "a code cell did not run"
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells), \
        "papermill did not inject the parameters"


def _outputs_of_other_presets(preset: str) -> dict[Path, tuple[int, int]]:
    """``path -> (mtime_ns, size)`` of every file under ``figures/``, ``data/results/`` and ``docs/``
    that does not belong to ``preset``."""
    own = {REPO / "figures" / preset, REPO / "data" / "results" / preset}
    out = {}
    for top in (REPO / "figures", REPO / "data" / "results", REPO / "docs"):
        for p in top.rglob("*") if top.is_dir() else []:
            if p.is_file() and not any(o in p.parents for o in own):
                st = p.stat()
                out[p] = (st.st_mtime_ns, st.st_size)
    return out


@pytest.mark.notebooks
@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S + 600)
def test_tiny_run_leaves_default_outputs_alone_and_is_quiet(request, monkeypatch):
    """The tour on the tiny preset, with the real defaults (no overrides, unlike the runs above):
    it files everything under ``figures/tiny/`` and ``data/results/tiny/`` - no committed figure,
    table or HTML view changes -, draws its figure inline, prints at most a handful of warning
    lines and leaves no temporary folder behind."""
    import tempfile

    request.getfixturevalue("tiny_zoo")
    for var in ("WORKBENCH_FIGURES_DIR", "WORKBENCH_RESULTS_DIR"):
        monkeypatch.delenv(var, raising=False)
    before = _outputs_of_other_presets("tiny")
    scratch_before = set(Path(tempfile.gettempdir()).glob("workbench-00-*"))
    df = run_notebooks(preset="tiny", only="00", build_zoo=False, timeout=NOTEBOOK_TIMEOUT_S, log=lambda m: None)
    assert df.status.tolist() == ["ok"], df.error.tolist()
    assert _outputs_of_other_presets("tiny") == before, "a tiny run changed outputs of another preset"
    from workbench import paths

    executed = paths.executed_dir("tiny") / "00_tour.ipynb"
    assert Path(df.output[0]) == executed and (executed.parent / "00_tour.html").is_file()
    assert (paths.figures_dir("tiny") / "00_interference_cosine.png").is_file()
    nb = nbformat.read(executed, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the figure cell shows no image"
    assert not any("<Figure size" in o.get("data", {}).get("text/plain", "") and "image/png" not in o.get("data", {})
                   for o in outputs), "a figure printed as text"
    noise = [line for o in outputs if o.output_type == "stream" and o.name == "stderr"
             for line in o.text.splitlines() if line.strip()]
    noise += [line for o in outputs if o.output_type == "stream" and o.name == "stdout"
              for line in o.text.splitlines() if "Warning" in line]
    assert len(noise) <= 3, "warning lines in the executed tour:\n" + "\n".join(noise)
    assert set(Path(tempfile.gettempdir()).glob("workbench-00-*")) == scratch_before, "00 left its temp folder"


def test_kernel_shutdown_sends_no_interrupt(monkeypatch):
    """The notebooks' kernel manager interrupts a kernel when asked (nbclient does on a cell timeout) but
    not on its way to shut down: jupyter_client's interrupt before the shutdown request landed in a
    finished notebook's message handler and logged "KeyboardInterrupt caught in kernel." (measured
    with a widget notebook: 6 of 60 runs before, 0 of 60 after; ``reproduce._ipc_kernel_manager``)."""
    import asyncio

    from jupyter_client.manager import AsyncKernelManager

    sent = []

    async def interrupt(self):
        sent.append(self.shutting_down)

    monkeypatch.setattr(AsyncKernelManager, "_async_interrupt_kernel", interrupt)
    km = reproduce._ipc_kernel_manager()()
    asyncio.run(km.interrupt_kernel())
    km.shutting_down = True
    asyncio.run(km._async_interrupt_kernel())
    asyncio.run(km.interrupt_kernel())
    assert sent == [False]


# ------------------------------------------------------------------------------------ static checks
def test_notebook_names_ordered_and_unique():
    assert NOTEBOOKS, f"no notebooks NN_*.ipynb in {NOTEBOOKS_DIR}"
    stray = [p.name for p in NOTEBOOKS_DIR.glob("*.ipynb") if p not in NOTEBOOKS]
    assert not stray, f"notebooks not named NN_name.ipynb (not run by `make reproduce`): {stray}"
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert len(set(numbers)) == len(numbers), f"duplicate notebook numbers: {[p.name for p in NOTEBOOKS]}"
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) and numbers[0] in (0, 1), \
        f"notebook numbers must be consecutive from 00 or 01: {numbers}"


@pytest.mark.parametrize("notebook", _params())
def test_notebook_stored_clean_with_parameters(notebook):
    if notebook is None:
        pytest.fail(f"no notebooks NN_*.ipynb in {NOTEBOOKS_DIR}")
    stored = json.loads(notebook.read_text())
    no_id = [i for i, c in enumerate(stored["cells"]) if "id" not in c]
    assert not no_id, f"{notebook.name}: cells {no_id} have no id (nbformat 4.5; papermill warns once per run)"
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{notebook.name}: cells {dirty} are stored with outputs or execution counts " \
                      f"(clear them: jupyter nbconvert --clear-output --inplace {notebook.name})"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{notebook.name}: kernel must be python3"
    found = _parameters_cell(nb)
    assert found is not None, f"{notebook.name}: no cell tagged 'parameters'"
    index, source = found
    assert nb.cells[index].cell_type == "code"
    assert "preset" in _assigned_names(source), f"{notebook.name}: the parameters cell does not assign `preset`"


# ------------------------------------------------------------------------------------ the runner itself
def _write_nb(path: Path, *sources: str, params: str = 'preset = "default"\nlabel = "none"') -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]})]
    cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nb.cells = cells
    nbformat.write(nb, path)
    return path


@pytest.fixture()
def toy_project(tmp_path, monkeypatch):
    """A project folder with notebooks 01 (writes a figure and its parameters), 02 (fails), 03 (ok)."""
    nbd = tmp_path / "notebooks"
    nbd.mkdir()
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "old.png").write_bytes(b"old")
    _write_nb(nbd / "01_first.ipynb",
              "import json, os, pathlib\n"
              "pathlib.Path('../figures/first.txt').write_text(json.dumps("
              "{'preset': preset, 'label': label, 'env': os.environ.get('WORKBENCH_PRESET'), 'cwd': os.getcwd()}))")
    _write_nb(nbd / "02_broken.ipynb", "raise ValueError('deliberate failure in 02')")
    _write_nb(nbd / "03_last.ipynb",
              "import pathlib\npathlib.Path('../data/results').mkdir(parents=True, exist_ok=True)\n"
              "pathlib.Path('../data/results/last.csv').write_text('a\\n1\\n')\n"
              "pathlib.Path('../figures/old.png').write_bytes(b'new picture')")
    (nbd / "notes.ipynb").write_text("{}")  # not NN_*: never run
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_discover_and_select(toy_project):
    paths = discover_notebooks("notebooks")
    assert [p.name for p in paths] == ["01_first.ipynb", "02_broken.ipynb", "03_last.ipynb"]
    assert [p.name for p in select_notebooks(paths, "03,1")] == ["01_first.ipynb", "03_last.ipynb"]
    assert [p.name for p in select_notebooks(paths, ["02_broken"])] == ["02_broken.ipynb"]
    assert select_notebooks(paths, None) == paths
    with pytest.raises(ValueError, match="07"):
        select_notebooks(paths, "07")
    assert discover_notebooks(toy_project / "missing") == []


def test_run_notebooks_runs_all_in_order_and_reports(toy_project, capsys):
    lines: list[str] = []
    df = run_notebooks(preset="tiny", notebooks_dir="notebooks", out_dir="figures/executed", html_dir="html",
                       watch=("figures", "data/results"), parameters={"label": "x1"}, build_zoo=False, timeout=120,
                       log=lines.append)
    assert df.notebook.tolist() == ["01_first.ipynb", "02_broken.ipynb", "03_last.ipynb"]
    assert df.status.tolist() == ["ok", "failed", "ok"]  # 03 still ran after 02 failed
    assert "ValueError: deliberate failure in 02" in df.error[1]
    assert (df.seconds > 0).all()
    # parameters injected, kernel env set, working directory = notebooks/
    info = json.loads((toy_project / "figures" / "first.txt").read_text())
    assert info == {"preset": "tiny", "label": "x1", "env": "tiny", "cwd": str(toy_project / "notebooks")}
    # executed copies with outputs, under figures/executed/
    executed = toy_project / "figures" / "executed"
    assert sorted(p.name for p in executed.iterdir()) == df.notebook.tolist()
    nb = nbformat.read(executed / "01_first.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    # a static HTML view of each executed copy, with the outputs (02's error too)
    assert sorted(p.name for p in (toy_project / "html").iterdir()) == [n.replace(".ipynb", ".html") for n in
                                                                         df.notebook]
    assert "deliberate failure in 02" in (toy_project / "html" / "02_broken.html").read_text()
    assert df.attrs["html"] and all(Path(p).is_file() for p in df.attrs["html"])
    # one progress line per notebook, then the summary with the new and updated files
    progress = [l for l in lines if l.startswith("[")]
    assert len(progress) == 3 and progress[1].startswith("[2/3] 02_broken.ipynb") and "failed" in progress[1]
    assert sorted(Path(p).name for p in df.attrs["new_files"]) == ["first.txt", "last.csv"]
    assert [Path(p).name for p in df.attrs["updated_files"]] == ["old.png"]
    assert not any("executed" in p for p in df.attrs["new_files"])
    text = "\n".join(lines)
    assert "summary: 2/3 notebook(s) ok" in text and "failed: 02_broken.ipynb" in text
    assert "figures/first.txt" in text and "data/results/last.csv" in text and "figures/old.png" in text


#: The scheduler's tests' requirements: the project's (03 and 04 after 02) and a notebook that needs two (07 after 05
#: and 06, as reproduce.NEEDS had it until 2026-12-08), the case the planned order exists for.
NEEDS_TWO = {"03": ("02",), "04": ("02",), "07": ("05", "06")}


def test_critical_path_and_side_by_side_order():
    """The longest chain of work left, per notebook; with one worker the notebooks start in that order, with two in
    the planned order; a notebook never starts before the ones it needs have finished (here 07 needs 05 and 06,
    :data:`NEEDS_TWO`)."""
    nbs = [Path(f"{n}.ipynb") for n in ("00_a", "02_c", "03_d", "05_f", "06_g", "07_h")]
    secs = {"00_a.ipynb": 10, "02_c.ipynb": 600, "03_d.ipynb": 20, "05_f.ipynb": 500, "06_g.ipynb": 400,
            "07_h.ipynb": 550}
    prio = reproduce.critical_path(nbs, secs, NEEDS_TWO)
    assert prio == {"00_a.ipynb": 10, "02_c.ipynb": 620, "03_d.ipynb": 20, "05_f.ipynb": 1050, "06_g.ipynb": 950,
                    "07_h.ipynb": 550}
    assert reproduce.critical_path(nbs[:1], {})["00_a.ipynb"] == reproduce.UNKNOWN_SECONDS
    started, lock = [], threading.Lock()
    finished: set[str] = set()

    def run_one(nb):
        with lock:
            need = NEEDS_TWO.get(nb.name[:2], ())
            assert all(n in finished for n in need if n in {p.name[:2] for p in nbs}), nb.name
            started.append(nb.name[:2])
        time.sleep(0.05)
        with lock:
            finished.add(nb.name[:2])

    one = reproduce.planned_order(nbs, secs, 1, NEEDS_TWO)
    assert [n[:2] for n in one] == ["05", "06", "02", "07", "03", "00"]
    reproduce._run_side_by_side(nbs, 1, one, run_one, NEEDS_TWO)  # one worker: the order given, needs respected
    assert started == ["05", "06", "02", "07", "03", "00"]
    started.clear(), finished.clear()
    two = reproduce.planned_order(nbs, secs, 2, NEEDS_TWO)
    reproduce._run_side_by_side(nbs, 2, two, run_one, NEEDS_TWO)
    # the first two planned start together (in either order: two threads)
    assert sorted(started) == ["00", "02", "03", "05", "06", "07"]
    assert sorted(started[:2]) == sorted(n[:2] for n in two[:2])
    assert reproduce.default_jobs(1) == 1 and 1 <= reproduce.default_jobs(50) <= (os.cpu_count() or 1)


def test_recorded_seconds_from_a_warm_cache_never_replace_a_cold_run(tmp_path):
    """The next fresh run is planned from seconds of runs that computed everything: a rerun that started with a
    results cache records its (shorter) seconds beside them, used only for a notebook no cold run has timed; a
    file from before the cache column reads as cold."""
    path = tmp_path / reproduce.SECONDS_FILE
    path.write_text("notebook,seconds,status,jobs\n02_c.ipynb,1600.0,ok,2\n05_f.ipynb,780.0,ok,2\n")
    assert reproduce.recorded_seconds(path) == {"02_c.ipynb": 1600.0, "05_f.ipynb": 780.0}
    row = lambda n, sec: {"notebook": n, "seconds": sec, "status": "ok"}  # noqa: E731
    reproduce._record_seconds(path, [row("05_f.ipynb", 20.0), row("07_h.ipynb", 30.0)], 2, "present")
    assert reproduce.recorded_seconds(path) == {"02_c.ipynb": 1600.0, "05_f.ipynb": 780.0, "07_h.ipynb": 30.0}
    reproduce._record_seconds(path, [row("05_f.ipynb", 900.0), row("07_h.ipynb", 1100.0)], 2, "empty")
    assert reproduce.recorded_seconds(path) == {"02_c.ipynb": 1600.0, "05_f.ipynb": 900.0, "07_h.ipynb": 1100.0}
    df = pd.read_csv(path)
    assert len(df) == 5 and set(df["cache"]) == {"empty", "present"}
    assert reproduce.recorded_seconds(tmp_path / "missing.csv") == {}


def test_planned_order_beats_longest_chain_first_when_a_notebook_needs_two():
    """07 needs 05 and 06. Longest chain first starts 06 (06 -> 07) beside 02 and leaves 05 until 06 ends: 05 and
    07 then run alone at the end. The planned order starts 05 and 06 together. Walls by hand (2 workers)."""
    nbs = [Path(f"{n}.ipynb") for n in ("02_c", "04_e", "05_f", "06_g", "07_h")]
    secs = {"02_c.ipynb": 1600, "04_e.ipynb": 170, "05_f.ipynb": 780, "06_g.ipynb": 1460, "07_h.ipynb": 910}
    chain = reproduce.planned_order(nbs, secs, 1, NEEDS_TWO)
    assert [n[:2] for n in chain] == ["06", "02", "05", "07", "04"]
    # 06 | 02 from 0; 06 ends 1460 -> 05 to 2240; 02 ends 1600 -> 04 to 1770; 07 from 2240 to 3150
    assert reproduce.simulated_wall(chain, secs, 2, NEEDS_TWO) == 3150
    plan = reproduce.planned_order(nbs, secs, 2, NEEDS_TWO)
    # 05 ends 780 -> 02 to 2380; 06 ends 1460 -> 07 to 2370 -> 04 (02 not done: waits) from 2380 to 2550
    assert {n[:2] for n in plan[:2]} == {"05", "06"} and reproduce.simulated_wall(plan, secs, 2, NEEDS_TWO) == 2550
    assert reproduce.simulated_wall(plan, secs, 1, NEEDS_TWO) == sum(secs.values())
    # the simulation is the scheduler's: the same starts in the same order with sleeps in place of notebooks
    started, lock = [], threading.Lock()

    def run_one(nb):
        with lock:
            started.append(nb.name[:2])
        time.sleep(secs[nb.name] / 20000)

    reproduce._run_side_by_side(nbs, 2, plan, run_one, NEEDS_TWO)
    assert started == ["05", "06", "02", "07", "04"] or started == ["06", "05", "02", "07", "04"]
    with pytest.raises(ValueError, match="wait on each other"):
        reproduce.simulated_wall(["01_a.ipynb", "02_b.ipynb"], {}, 2, needs={"01": ("02",), "02": ("01",)})


def test_run_notebooks_side_by_side(toy_project, monkeypatch):
    """Two notebooks at once: every notebook runs once, the rows come back in notebook order, the kernels get
    OMP_NUM_THREADS = cores / jobs, and no kernel socket is left in notebooks/."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    _write_nb(toy_project / "notebooks" / "04_threads.ipynb",
              "import os, pathlib\npathlib.Path('../figures/threads.txt').write_text(os.environ['OMP_NUM_THREADS'])")
    # the threads share one process: none may move its working directory (papermill's cwd did, and a notebook that
    # ended early sent its neighbour's starting kernel out of notebooks/); each kernel is given its folder instead.
    # (papermill's file reads and writes chdir to the directory that is current already: no move.)
    moves: list = []
    real_chdir = os.chdir
    monkeypatch.setattr(os, "chdir", lambda p: (moves.append(p), real_chdir(p))[1])
    lines: list[str] = []
    df = run_notebooks(preset="tiny", notebooks_dir="notebooks", out_dir="figures/executed", html_dir=False,
                       parameters={"label": "x2"}, build_zoo=False, timeout=120, jobs=2, log=lines.append)
    assert {str(p) for p in moves} <= {str(toy_project)}
    assert df.notebook.tolist() == ["01_first.ipynb", "02_broken.ipynb", "03_last.ipynb", "04_threads.ipynb"]
    assert df.status.tolist() == ["ok", "failed", "ok", "ok"], df.error.tolist()
    assert json.loads((toy_project / "figures" / "first.txt").read_text())["cwd"] == str(toy_project / "notebooks")
    assert (toy_project / "figures" / "threads.txt").read_text() == "2"
    assert sum(l.startswith("-> ") for l in lines) == 4 and "2 side by side" in lines[0]
    assert not [p.name for p in (toy_project / "notebooks").iterdir() if "ipc" in p.name]
    assert "OMP_NUM_THREADS" not in os.environ
    # the seconds of this run, for the next run's order
    recorded = reproduce.recorded_seconds(toy_project / "figures" / reproduce.SECONDS_FILE)
    assert sorted(recorded) == df.notebook.tolist() and all(recorded[n] > 0 for n in recorded)


def test_cli_run_exit_status(toy_project, capsys):
    parser = argparse.ArgumentParser()
    reproduce.add_arguments(parser)
    local = ["--notebooks-dir", "notebooks", "--out-dir", "figures/executed", "--no-html", "--no-zoo"]
    assert reproduce.run(parser.parse_args(["--preset", "tiny", "--only", "02", *local])) == 1
    out = capsys.readouterr().out
    assert "[1/1] 02_broken.ipynb" in out and "01_first" not in out
    assert reproduce.run(parser.parse_args(["--only", "09", *local])) == 2
    # from any folder (here the toy project) the default is the repository's notebooks/
    assert reproduce.run(parser.parse_args(["--only", "99", "--no-zoo"])) == 2
    err = capsys.readouterr().err
    assert NOTEBOOKS and all(p.name in err for p in NOTEBOOKS), err
    args = parser.parse_args(["-p", "label=3", "-p", "flag=true"])
    assert dict(args.parameter) == {"label": 3, "flag": True}


def test_cli_is_registered():
    from workbench import cli

    assert cli.LAZY_COMMANDS["reproduce"][0] == "workbench.reproduce"
    parser = cli.build_parser("reproduce")
    args = parser.parse_args(["reproduce", "--preset", "tiny", "--only", "02,03"])
    assert args.preset == "tiny" and args.only == "02,03" and args._run is reproduce.run


def test_no_notebooks_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no notebooks"):
        run_notebooks(notebooks_dir=tmp_path, build_zoo=False, log=lambda m: None)


def test_ensure_zoo_tolerates_absence_and_reports_failure(monkeypatch):
    fake = types.ModuleType("workbench.world")  # a world package without build_zoo
    monkeypatch.setitem(sys.modules, "workbench.world", fake)
    msgs: list[str] = []
    ok, msg = reproduce.ensure_zoo("tiny", log=msgs.append)
    assert ok and "not available" in msg and msgs

    def broken(preset):
        raise RuntimeError(f"cannot build {preset}")

    fake.build_zoo = broken
    ok, msg = reproduce.ensure_zoo("tiny", log=lambda m: None)
    assert not ok and "cannot build tiny" in msg

    calls = []
    fake.build_zoo = lambda preset: calls.append(preset) or types.SimpleNamespace(path=Path("/z") / preset)
    ok, msg = reproduce.ensure_zoo("small", log=lambda m: None)
    assert ok and calls == ["small"] and "/z/small" in msg


def test_html_views_print_portable_paths(tmp_path):
    """The published HTML views name repository paths relative to it and temporary ones under $TMPDIR;
    a longer folder name that merely starts like the repository's is left alone."""
    import tempfile

    from workbench.paths import REPO_ROOT

    scratch = Path(tempfile.gettempdir()) / "workbench-10-abc" / "merged-ties"
    printed = f"{REPO_ROOT / 'zoo' / 'default'}\nbase: {scratch}\n{REPO_ROOT}\n{REPO_ROOT}-other/x\n"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(...)", outputs=[
        nbformat.v4.new_output("stream", name="stdout", text=printed),
        nbformat.v4.new_output("error", ename="E", evalue="e", traceback=[f"File {REPO_ROOT / 'workbench' / 'x.py'}:1"])])])
    src = tmp_path / "00_probe.ipynb"
    nbformat.write(nb, src)
    html = reproduce.export_html(src, tmp_path / "html").read_text()
    assert "zoo/default" in html and "$TMPDIR/workbench-10-abc/merged-ties" in html and "File workbench/x.py:1" in html
    # a sibling folder is not a path inside the repository (wherever the checkout sits, even under $TMPDIR)
    assert f"{REPO_ROOT.name}-other/x" in html and ".-other" not in html and "\n-other/x" not in html
    assert f"{REPO_ROOT}/" not in html and str(scratch) not in html
