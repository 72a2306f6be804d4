"""Run the notebooks in order, headless: what ``make reproduce`` does.

``python -m workbench reproduce --preset default [--only 02,03]`` (registered lazily in
:data:`workbench.cli.LAZY_COMMANDS`) builds the zoo of the preset if needed, then executes every
``notebooks/NN_*.ipynb`` in order with papermill (kernel ``python3``, working directory
``notebooks/`` so relative paths work), injecting ``preset`` (and any ``-p KEY=VALUE``) into the
cell tagged ``parameters``. Every output is filed under the preset (:mod:`workbench.paths`):
executed copies go to ``figures/<preset>/executed/`` and their HTML views (nbconvert) to
:func:`workbench.paths.html_dir` - ``docs/notebooks/`` for the ``default`` preset, so a reader
of the repository page sees the results while the stored notebooks stay without outputs. It
prints one line per notebook and a summary (what ran, how long, which files under
``figures/<preset>/`` and ``data/results/<preset>/`` are new or updated). A failing notebook
does not stop the others; the exit status is 1 if any notebook (or the zoo build) failed. The
repository's ``notebooks/`` are found from any working directory.

Notebooks run side by side, one per CPU core (``--jobs``; ``--jobs 1``: one after the other, in
order), each kernel with ``OMP_NUM_THREADS`` = cores / jobs. A notebook that reads what another
computed starts after it (:data:`NEEDS`); among the notebooks ready to start, the first of the start order
whose simulated wall time is shortest (:func:`planned_order`), timed by the recorded seconds
(``figures/<preset>/notebook_seconds.csv``, rewritten by every run; a run from a warm results cache never
replaces the seconds of one that computed everything, :data:`SECONDS_FILE`).

From Python::

    from workbench.reproduce import run_notebooks
    df = run_notebooks(preset="tiny", only=["02", "03"])   # one row per notebook

The kernel also gets the environment variable ``WORKBENCH_PRESET`` set to the preset.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import pandas as pd

HELP = "run the notebooks in order (papermill), after building the zoo if needed"

#: ``NN_name.ipynb``: two digits, an underscore, a name.
NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[^/]+\.ipynb$")
#: Default per-cell timeout (seconds) for papermill.
CELL_TIMEOUT_S = 3 * 3600

PathLike = Union[str, Path]


def discover_notebooks(notebooks_dir: PathLike = "notebooks") -> list[Path]:
    """``notebooks_dir/NN_*.ipynb``, sorted by name (so by number)."""
    folder = Path(notebooks_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and NOTEBOOK_PATTERN.match(p.name))


def select_notebooks(paths: Sequence[Path], only: Union[None, str, Iterable[str]]) -> list[Path]:
    """The notebooks named by ``only``: numbers (``"02"``, ``"2"``), stems or file names.

    ``only`` may be a comma-separated string or an iterable; ``None`` keeps all. An entry that
    matches no notebook raises ``ValueError`` (a typo should not silently run nothing).
    """
    if only is None:
        return list(paths)
    wanted = [w.strip() for w in (only.split(",") if isinstance(only, str) else only) if str(w).strip()]
    chosen: list[Path] = []
    for w in wanted:
        hits = [p for p in paths
                if (w.isdigit() and int(p.name[:2]) == int(w)) or p.stem == w or p.name == w]
        if not hits:
            raise ValueError(f"--only {w!r}: no notebook matches (have: {', '.join(p.name for p in paths)})")
        chosen.extend(h for h in hits if h not in chosen)
    return sorted(chosen)


def _snapshot(folders: Iterable[Path], exclude: Optional[Path]) -> dict[Path, tuple[int, int]]:
    """``path -> (mtime_ns, size)`` of every file under ``folders`` (``exclude`` left out)."""
    out = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.rglob("*"):
            if not p.is_file() or ".ipynb_checkpoints" in p.parts:
                continue
            if exclude is not None and exclude in p.resolve().parents:
                continue
            st = p.stat()
            out[p] = (st.st_mtime_ns, st.st_size)
    return out


@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ensure_zoo(preset: str, log: Callable[[str], None] = print) -> tuple[bool, str]:
    """Build the zoo of ``preset`` with ``workbench.world.build_zoo`` (which skips what is built).

    Returns ``(ok, message)``. If ``workbench.world.build_zoo`` does not exist (yet), says so and
    returns ``ok=True``: the notebooks that need the zoo will then fail on their own, clearly.
    """
    t0 = time.perf_counter()
    try:
        from workbench.world import build_zoo  # imported lazily: heavy, and written by another module
    except ImportError as e:
        msg = (f"zoo: workbench.world.build_zoo is not available ({e}); not building a zoo - "
               f"notebooks that need zoo/{preset} will fail")
        log(msg)
        return True, msg
    log(f"zoo: building (or checking) the '{preset}' zoo ...")
    try:
        result = build_zoo(preset)
    except Exception as e:  # noqa: BLE001 - reported, then the notebooks still run
        msg = f"zoo: build_zoo({preset!r}) failed after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e}"
        log(msg)
        log("".join(traceback.format_exception(type(e), e, e.__traceback__)[-3:]).rstrip())
        return False, msg
    where = getattr(result, "path", result)
    where = f" -> {where}" if isinstance(where, (str, Path)) else ""
    msg = f"zoo: ready in {time.perf_counter() - t0:.1f} s{where}"
    log(msg)
    return True, msg


def portable_text(text: str) -> str:
    """``text`` with this machine's folders made portable: paths in the repository relative to it
    (:data:`workbench.paths.REPO_ROOT`), paths in the temporary folder under ``$TMPDIR``."""
    import tempfile

    from .paths import REPO_ROOT

    for folder, name in ((str(REPO_ROOT), "."), (tempfile.gettempdir(), "$TMPDIR")):
        text = text.replace(folder + os.sep, "" if name == "." else name + "/")
        text = re.sub(re.escape(folder) + r"(?![\w.-])", lambda _: name, text)  # the folder itself, not a longer name
    return text


def export_html(notebook: PathLike, html_dir: PathLike) -> Path:
    """Write ``html_dir/<stem>.html``, nbconvert's static HTML view of an executed ``notebook``
    (figures embedded as PNG, widgets as their last state); temp name, then rename. The views are
    published, so the paths the outputs print are made portable (:func:`portable_text`): text
    outputs, tracebacks and text/plain or text/html results."""
    import nbformat
    from nbconvert import HTMLExporter

    from .io.writer import atomic_write

    notebook, html_dir = Path(notebook), Path(html_dir)
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = portable_text(output["text"])
            if "traceback" in output:
                output["traceback"] = [portable_text(line) for line in output["traceback"]]
            for mime in ("text/plain", "text/html"):
                if mime in output.get("data", {}):
                    output["data"][mime] = portable_text(output["data"][mime])
    body, _ = HTMLExporter().from_notebook_node(nb)
    html_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write(html_dir / f"{notebook.stem}.html", lambda p: p.write_text(body, encoding="utf-8"))


def _ipc_kernel_manager():
    """nbclient's kernel manager on local IPC sockets instead of TCP: nothing listens on a port,
    and the kernel has no reason to warn "running over TCP without encryption". Each kernel's
    sockets get a prefix of their own in the temporary folder (jupyter_client's default,
    ``kernel-ipc-<n>`` in the working directory, numbered by the first free ``n``, lets two kernels
    started in the same moment - two notebooks of ``--jobs``, two runs - take the same sockets; and a
    killed kernel left them in ``notebooks/``).

    Its shutdown sends no interrupt: jupyter_client's ``shutdown_kernel`` interrupts (SIGINT) the kernel
    before it asks it to shut down, and when a finished notebook's kernel is still in a message handler
    (a widget's comm message, measured: 6 of 60 runs of a notebook with a tqdm bar, a figure and a
    slider, on a loaded box) ipykernel logs ``[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel.``
    to the console, an error line for a notebook that ran well. The shutdown request alone stops it
    (ipykernel answers it on its control thread, busy shell or not), and a kernel that does not exit is
    killed after jupyter_client's wait, as before; a cell timeout is still interrupted by nbclient."""
    import tempfile
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum, default

    class IPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

        @default("ip")
        def _private_ip(self) -> str:
            if self.transport != "ipc":
                return super()._ip_default()
            return os.path.join(tempfile.gettempdir(), f"workbench-kernel-{uuid.uuid4().hex[:12]}")

        async def _async_interrupt_kernel(self) -> None:
            if self.shutting_down:  # set by shutdown_kernel just before its interrupt
                return
            await super()._async_interrupt_kernel()

        interrupt_kernel = _async_interrupt_kernel  # (AsyncKernelManager's public name for it)

    return IPCKernelManager


def execute_notebook(path: PathLike, output: PathLike, parameters: Optional[Mapping[str, Any]] = None,
                     cwd: Optional[PathLike] = None, timeout: Optional[float] = CELL_TIMEOUT_S,
                     kernel_name: str = "python3") -> dict:
    """Execute one notebook with papermill; never raises for a failing notebook.

    Returns ``{"notebook", "status" ("ok" | "failed"), "seconds", "output", "error"}``; ``error``
    is ``"ExcName: message (cell N)"`` for a cell that raised, or the exception papermill raised
    (timeout, dead kernel). ``cwd`` defaults to the notebook's folder. It is the kernel's working
    directory, given to the kernel alone (nbclient's ``resources["metadata"]["path"]``): papermill's
    own ``cwd`` changes the working directory of the whole process for the run and restores it after,
    so with notebooks side by side in threads one that ended early moved another's kernel out of
    ``notebooks/`` while it started (seen once in CI: the toy ``01`` beside a failing ``02``).
    """
    import papermill as pm

    path, output = Path(path), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    error = ""
    try:
        pm.execute_notebook(str(path), str(output), parameters=dict(parameters or {}), kernel_name=kernel_name,
                            execution_timeout=timeout, progress_bar=False, log_output=False, report_mode=False,
                            kernel_manager_class=_ipc_kernel_manager(),
                            resources={"metadata": {"path": str(cwd if cwd is not None else path.parent)}})
    except pm.PapermillExecutionError as e:
        error = f"{e.ename}: {e.evalue} (cell {e.exec_count})"
    except Exception as e:  # noqa: BLE001 - timeouts, dead kernels, bad notebooks: reported per notebook
        error = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    return {"notebook": path.name, "status": "failed" if error else "ok", "seconds": round(seconds, 2),
            "output": str(output), "error": error}


#: A notebook starts after the notebooks it reads from (their study caches): 03 and 04 read the composition study
#: that 02 computes. 07 reads nothing 05 or 06 compute: its ablation, rank-ratio and solver cells are other entries
#: than theirs (in the fresh-clone runs of 4468144 and 8d109d7 every 07 study had 0 cache hits and 0 stored cells
#: though it started after both), so it no longer waits for them - the 06 -> 07 chain (1,742 s with four seeds)
#: was the notebooks' floor. Every requirement has a lower number, so the notebook order is always a valid order.
#: A failed notebook does not stop the ones that wait for it.
NEEDS: dict[str, tuple[str, ...]] = {"03": ("02",), "04": ("02",)}
#: Where each run records its notebooks' seconds (beside the executed copies' folder), read by the next run: one row
#: per notebook and results-cache state at the run's start (``cache``: ``"empty"``, the results computed, as on a fresh
#: clone; ``"present"``, some may have been read from it). A rerun from the cache never replaces the seconds of a run
#: that computed everything, which plan the next fresh run (:func:`recorded_seconds`).
SECONDS_FILE = "notebook_seconds.csv"
#: Expected seconds of a notebook without a recorded time.
UNKNOWN_SECONDS = 60.0


def critical_path(notebooks: Sequence[Path], seconds: Mapping[str, float],
                  needs: Mapping[str, Sequence[str]] = NEEDS) -> dict[str, float]:
    """``{notebook name: expected seconds of it and of the longest chain of selected notebooks waiting for it}``
    (``seconds`` by notebook name; :data:`UNKNOWN_SECONDS` where missing)."""
    by_number = {nb.name[:2]: nb.name for nb in notebooks}
    waiting = {n: [m for m, req in needs.items() if n in req and m in by_number] for n in by_number}
    memo: dict[str, float] = {}

    def chain(n: str) -> float:
        if n not in memo:
            memo[n] = float(seconds.get(by_number[n], UNKNOWN_SECONDS)) + max((chain(m) for m in waiting[n]),
                                                                               default=0.0)
        return memo[n]

    return {name: chain(n) for n, name in by_number.items()}


def _ready(name: str, selected: set[str], finished: set[str], needs: Mapping[str, Sequence[str]]) -> bool:
    """Every selected notebook that ``name`` needs has finished (needs by number, names ``NN_*.ipynb``)."""
    return all(r not in selected or r in finished for r in needs.get(name[:2], ()))


def simulated_wall(order: Sequence[str], seconds: Mapping[str, float], jobs: int,
                   needs: Mapping[str, Sequence[str]] = NEEDS) -> float:
    """Expected wall seconds of running the notebooks named in ``order`` on ``jobs`` workers the way
    :func:`_run_side_by_side` does: a free worker takes the first ready notebook of ``order`` (``seconds`` by name,
    :data:`UNKNOWN_SECONDS` where missing)."""
    selected = {n[:2] for n in order}
    pending, running, finished, now = list(order), [], set(), 0.0  # running: (end, name)
    while pending or running:
        while len(running) < jobs:
            nb = next((n for n in pending if _ready(n, selected, finished, needs)), None)
            if nb is None:
                break
            pending.remove(nb)
            running.append((now + float(seconds.get(nb, UNKNOWN_SECONDS)), nb))
        if not running:  # only a requirement cycle leaves work that can never start
            raise ValueError(f"notebooks {pending} wait on each other ({dict(needs)})")
        running.sort()
        now, nb = running.pop(0)
        finished.add(nb[:2])
    return now


#: :func:`planned_order` tries every order of this many of the longest notebooks (7! = 5,040 simulations, ~0.1 s).
PLAN_SEARCH = 7


def planned_order(notebooks: Sequence[Path], seconds: Mapping[str, float], jobs: int,
                  needs: Mapping[str, Sequence[str]] = NEEDS) -> list[str]:
    """The start order of the notebooks with the shortest :func:`simulated_wall`, from ``seconds`` (those
    :func:`recorded_seconds` reads): every order of the :data:`PLAN_SEARCH` longest ones, the others after them;
    the longest-chain-first order (:func:`critical_path`, then the lower number) is tried first and kept on ties.

    Longest chain first alone is not enough when a notebook needs two others (07 reads 05 and 06): it starts the
    longest chain (06 -> 07) beside 02 and leaves 05, which 07 also waits for, until 06 has ended."""
    from itertools import permutations

    chain = critical_path(notebooks, seconds, needs)
    by_chain = sorted(chain, key=lambda n: (-chain[n], n))
    if jobs <= 1:
        return by_chain
    longest = sorted(by_chain, key=lambda n: -float(seconds.get(n, UNKNOWN_SECONDS)))[:PLAN_SEARCH]
    rest = [n for n in by_chain if n not in longest]
    head = [n for n in by_chain if n in longest]
    best, best_wall = by_chain, simulated_wall(by_chain, seconds, jobs, needs)
    for perm in permutations(head):
        order = list(perm) + rest
        wall = simulated_wall(order, seconds, jobs, needs)
        if wall < best_wall - 1e-9:
            best, best_wall = order, wall
    return best


_SECONDS_COLUMNS = ["notebook", "seconds", "status", "jobs", "cache"]


def _seconds_table(path: Path) -> pd.DataFrame:
    """The table previous runs recorded in ``path`` (empty if there is none or it cannot be read; a file written
    before the ``cache`` column counts as ``"empty"``)."""
    try:
        df = pd.read_csv(path)
        df["seconds"] = df["seconds"].astype(float)
        if "cache" not in df.columns:
            df["cache"] = "empty"
        return df[_SECONDS_COLUMNS]
    except (OSError, ValueError, KeyError, pd.errors.EmptyDataError):
        return pd.DataFrame(columns=_SECONDS_COLUMNS)


def recorded_seconds(path: Path) -> dict[str, float]:
    """Each notebook's seconds as previous runs recorded them in ``path``: from a run that started with an empty
    results cache where there is one, else from one that started with a cache (empty dict if none)."""
    df = _seconds_table(path)
    df = df.assign(_warm=df["cache"] != "empty").sort_values("_warm", kind="stable").drop_duplicates("notebook")
    return {str(n): float(x) for n, x in zip(df["notebook"], df["seconds"])}


def _record_seconds(path: Path, rows: Sequence[Mapping], jobs: int, cache: str) -> None:
    """Update ``path`` with this run's notebooks under ``cache`` (``"empty"`` or ``"present"``): their rows for that
    cache state are replaced, every other row kept."""
    from .io.writer import atomic_write

    old = _seconds_table(path)
    new = pd.DataFrame([{"notebook": r["notebook"], "seconds": r["seconds"], "status": r["status"], "jobs": jobs,
                         "cache": cache} for r in rows], columns=_SECONDS_COLUMNS)
    keep = old[~(old["notebook"].isin(new["notebook"]) & (old["cache"] == cache))]
    df = pd.concat([keep, new], ignore_index=True).sort_values(["notebook", "cache"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: df.to_csv(p, index=False))


def results_cache_state(preset: str) -> str:
    """``"present"`` if the preset's results cache (``data/results/<preset>/cache``, every study's) holds anything,
    else ``"empty"``."""
    from . import paths

    folder = paths.results_dir(preset) / "cache"
    return "present" if folder.is_dir() and any(folder.iterdir()) else "empty"


def default_jobs(n_notebooks: int) -> int:
    """Notebooks run side by side by default: one per CPU core, at most one per notebook."""
    return max(1, min(n_notebooks, os.cpu_count() or 1))


def _run_side_by_side(notebooks: Sequence[Path], jobs: int, order: Sequence[str],
                      run_one: Callable[[Path], None], needs: Mapping[str, Sequence[str]] = NEEDS) -> None:
    """``run_one`` on every notebook with ``jobs`` threads: a notebook starts when the selected notebooks it needs
    have finished; of those ready, the first in ``order`` (notebook names; :func:`planned_order`)."""
    selected = {nb.name[:2] for nb in notebooks}
    rank = {name: i for i, name in enumerate(order)}
    pending = sorted(notebooks, key=lambda p: (rank.get(p.name, len(rank)), p.name))
    finished: set[str] = set()
    cond = threading.Condition()

    def worker() -> None:
        while True:
            with cond:
                while pending and not any(_ready(nb.name, selected, finished, needs) for nb in pending):
                    cond.wait()
                if not pending:
                    return
                nb = next(nb for nb in pending if _ready(nb.name, selected, finished, needs))
                pending.remove(nb)
            try:
                run_one(nb)
            finally:
                with cond:
                    finished.add(nb.name[:2])
                    cond.notify_all()

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="workbench-notebook") as pool:
        for f in [pool.submit(worker) for _ in range(jobs)]:
            f.result()


def run_notebooks(preset: str = "default", notebooks_dir: Optional[PathLike] = None,
                  out_dir: Optional[PathLike] = None, only: Union[None, str, Iterable[str]] = None,
                  parameters: Optional[Mapping[str, Any]] = None, timeout: Optional[float] = CELL_TIMEOUT_S,
                  build_zoo: bool = True, kernel_name: str = "python3",
                  watch: Optional[Sequence[PathLike]] = None, html_dir: Union[None, bool, PathLike] = None,
                  jobs: Optional[int] = 1, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Execute ``notebooks_dir/NN_*.ipynb`` in order; one row per notebook (in notebook order).

    ``jobs``: how many notebooks run side by side (1: one after the other, in order; None: :func:`default_jobs`).
    With more than one, a notebook waits for those it needs (:data:`NEEDS`), the ready notebooks start in the order
    with the shortest simulated wall time (:func:`planned_order`, from :func:`recorded_seconds`; logged
    beside the longest-chain-first order's), and each kernel
    gets ``OMP_NUM_THREADS`` = cores / jobs (unless the variable is set already), so the notebooks share the
    cores instead of fighting for them. Every run records its seconds in ``<out_dir>/../notebook_seconds.csv``
    (under the results cache's state at its start, :data:`SECONDS_FILE`).

    Columns: ``notebook, status ("ok" | "failed"), seconds, output, error``. ``parameters`` are
    injected after ``preset`` (so they may override it). ``timeout`` is papermill's per-cell limit
    in seconds (None: no limit). ``build_zoo`` first calls :func:`ensure_zoo`. ``watch`` are the
    folders whose new or updated files are listed in the summary.

    Defaults come from :mod:`workbench.paths`: the repository's ``notebooks/``, executed copies in
    ``figures/<preset>/executed/``, watched ``figures/<preset>/`` and ``data/results/<preset>/``,
    HTML views in :func:`~workbench.paths.html_dir` (``html_dir=False``: none).

    ``df.attrs``: ``preset``, ``seconds`` (total), ``zoo`` (message), ``zoo_ok``, ``new_files``,
    ``updated_files`` (lists of paths), ``failed`` (notebook names), ``out_dir``, ``html`` (paths).
    Raises ``FileNotFoundError`` if there is no notebook to run.
    """
    from . import paths

    t_start = time.perf_counter()
    nb_dir = Path(notebooks_dir if notebooks_dir is not None else paths.notebooks_dir()).resolve()
    out = Path(out_dir if out_dir is not None else paths.executed_dir(preset)).resolve()
    if watch is None:
        watch = (paths.figures_dir(preset), paths.results_dir(preset))
    if html_dir is None or html_dir is True:
        html_dir = paths.html_dir(preset)
    notebooks = select_notebooks(discover_notebooks(nb_dir), only)
    if not notebooks:
        raise FileNotFoundError(f"no notebooks NN_*.ipynb in {nb_dir}")
    params = {"preset": preset, **dict(parameters or {})}
    watched = [Path(w).resolve() for w in watch]
    before = _snapshot(watched, exclude=out)

    zoo_ok, zoo_msg = (ensure_zoo(preset, log) if build_zoo else (True, "zoo: not built (build_zoo=False)"))
    cache = results_cache_state(preset)

    jobs = default_jobs(len(notebooks)) if jobs is None else max(1, min(int(jobs), len(notebooks)))
    seconds_file = out.parent / SECONDS_FILE
    width = max(len(p.name) for p in notebooks)
    done: dict[str, dict] = {}  # notebook name -> its row, as they finish
    lock = threading.Lock()
    how = f", {jobs} side by side" if jobs > 1 else ""
    log(f"running {len(notebooks)} notebook(s) from {nb_dir} with preset={preset!r}{how} -> {out}")

    def run_one(nb: Path) -> None:
        with lock:
            log(f"-> {nb.name} ...")
        row = execute_notebook(nb, out / nb.name, params, cwd=nb_dir, timeout=timeout, kernel_name=kernel_name)
        line = f"{nb.name:<{width}}  {row['seconds']:8.1f} s  {row['status']}"
        if row["error"]:
            line += f"  ({row['error'][:300]})"
        with lock:
            done[nb.name] = row
            log(f"[{len(done)}/{len(notebooks)}] {line}")

    threads = {} if jobs == 1 or "OMP_NUM_THREADS" in os.environ else {
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    with _env(WORKBENCH_PRESET=str(params["preset"]), **threads):
        if jobs == 1:
            for nb in notebooks:
                run_one(nb)
        else:
            last = recorded_seconds(seconds_file)
            order = planned_order(notebooks, last, jobs)
            by_chain = planned_order(notebooks, last, 1)
            log(f"start order {', '.join(n[:2] for n in order)}: {simulated_wall(order, last, jobs):.0f} s expected "
                f"from the recorded seconds (longest chain first: {simulated_wall(by_chain, last, jobs):.0f} s)")
            _run_side_by_side(notebooks, jobs, order, run_one)
    rows = [done[nb.name] for nb in notebooks]

    html = []
    if html_dir is not False:
        for row in rows:
            if Path(row["output"]).is_file():
                html.append(str(export_html(row["output"], html_dir)))
        if html:
            log(f"html: {len(html)} view(s) in {_rel(Path(html_dir))}/")
    after = _snapshot(watched, exclude=out)
    new = sorted(p for p in after if p not in before)
    updated = sorted(p for p in after if p in before and after[p] != before[p])
    df = pd.DataFrame(rows, columns=["notebook", "status", "seconds", "output", "error"])
    _record_seconds(seconds_file, rows, jobs, cache)
    total = time.perf_counter() - t_start
    failed = df.loc[df.status != "ok", "notebook"].tolist()
    df.attrs.update(preset=preset, seconds=round(total, 2), zoo=zoo_msg, zoo_ok=zoo_ok,
                    new_files=[str(p) for p in new], updated_files=[str(p) for p in updated],
                    failed=failed, out_dir=str(out), html=html, watched=[str(w) for w in watched])
    _summary(df, new, updated, log)
    return df


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _summary(df: pd.DataFrame, new: list[Path], updated: list[Path], log: Callable[[str], None],
             max_files: int = 40) -> None:
    a = df.attrs
    n_ok = int((df.status == "ok").sum())
    log("")
    log(f"summary: {n_ok}/{len(df)} notebook(s) ok with preset={a['preset']!r} in {a['seconds']:.1f} s "
        f"(notebooks {df.seconds.sum():.1f} s)")
    log(f"  {a['zoo']}")
    if a["failed"]:
        log(f"  failed: {', '.join(a['failed'])}")
    log(f"  executed notebooks: {_rel(Path(a['out_dir']))}/")
    for label, files in (("new", new), ("updated", updated)):
        if not files:
            continue
        log(f"  {label} files ({len(files)}):")
        for p in files[:max_files]:
            log(f"    {_rel(p)}")
        if len(files) > max_files:
            log(f"    ... and {len(files) - max_files} more")
    if not new and not updated:
        log(f"  no file under {', '.join(_rel(Path(w)) + '/' for w in a['watched'])} was created or changed")


# ------------------------------------------------------------------------------------ CLI
def _parse_parameter(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m workbench reproduce``."""
    parser.add_argument("--preset", default="default",
                        help="zoo/notebook preset injected as `preset` (default: default; e.g. tiny)")
    parser.add_argument("--only", help="comma-separated notebook numbers or names, e.g. 02,03")
    parser.add_argument("--notebooks-dir", default=None,
                        help="folder of NN_*.ipynb (default: the repository's notebooks/, from any folder)")
    parser.add_argument("--out-dir", default=None, help="where executed copies go (default: figures/<preset>/executed)")
    parser.add_argument("--no-html", action="store_true",
                        help="no HTML views (default: docs/notebooks/ for the default preset, else next to the copies)")
    parser.add_argument("-p", "--parameter", action="append", default=[], type=_parse_parameter,
                        metavar="KEY=VALUE", help="extra notebook parameter (YAML value); repeatable")
    parser.add_argument("--timeout", type=float, default=CELL_TIMEOUT_S, help="per-cell timeout in seconds")
    parser.add_argument("--no-zoo", action="store_true", help="do not build the zoo first")
    parser.add_argument("--jobs", type=int, default=None,
                        help="notebooks run side by side (default: one per CPU core; 1: one after the other)")


def run(args: argparse.Namespace) -> int:
    """Run the notebooks; exit status 1 if any notebook or the zoo build failed, 2 if none found."""
    try:
        df = run_notebooks(preset=args.preset, notebooks_dir=args.notebooks_dir, out_dir=args.out_dir,
                           only=args.only, parameters=dict(args.parameter), timeout=args.timeout,
                           build_zoo=not args.no_zoo, html_dir=False if args.no_html else None, jobs=args.jobs)
    except (FileNotFoundError, ValueError) as e:
        print(f"workbench reproduce: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    return 0 if (df.status == "ok").all() and df.attrs["zoo_ok"] else 1


if __name__ == "__main__":  # python -m workbench.reproduce
    _p = argparse.ArgumentParser(prog="workbench reproduce", description=HELP)
    add_arguments(_p)
    sys.exit(run(_p.parse_args()))
