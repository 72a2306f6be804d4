"""Sweeps: a grid of cells, one function per cell, run in this process or on a Ray cluster.

A *cell* is one unit of the merging benchmark's grid: one setting (capability-full, capability-lora,
modality) x one method with its parameters x one seed, with the λ grid searched inside the cell
(validation for every λ, the choice, the test at the chosen λ: the benchmark's protocol, see
:mod:`workbench.studies.merging_benchmark`). :func:`run_sweep` maps a cell function over the cells with

- executor ``"local"``: today's loop, in this process (no Ray needed);
- executor ``"ray"``: one Ray core task per cell (https://docs.ray.io/en/latest/ray-core/tasks.html)
  with ``num_cpus`` per cell and one GPU per cell where the cluster has GPUs; a worker killed
  mid-cell is retried by Ray (``max_retries``, Ray's own fault tolerance for system failures);

and, whatever the executor, one progress bar over the cells, the results in the cells' order (so
the table does not depend on who finished first), and a :class:`CellStore`: each finished cell's
result is written (temp name, then rename) as soon as the driver receives it, and a re-run after the
driver died computes only the cells that are missing. Ray is used as the engine, not re-implemented:
scheduling, resources and retries are Ray's; this module only builds the cells and keeps the store.

:func:`merge_grid` is the merging benchmark's use of it (called by
:func:`workbench.studies.merging_benchmark.capability_merging` and the other table functions); ``python -m
workbench sweep SWEEP.yaml --executor ray --address auto`` runs one of those functions from a shell
(:func:`run_file`). docs/DISTRIBUTED.md says how to run it on a cluster.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..io.writer import atomic_write
from .cache import digest, records_digest

EXECUTORS = ("local", "ray")


# ============================================================================================ the store
class CellStore:
    """Finished cells' results (JSON) in ``folder``, one file ``<key>.json`` per cell.

    Written to a temporary name in the same folder and renamed, so a reader (or a driver killed
    mid-write) never sees half a file."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> Any | None:
        f = self.path(key)
        return json.loads(f.read_text()) if f.is_file() else None

    def put(self, key: str, result: Any) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result)  # no default=: a value JSON cannot hold is an error, not a silent string
        return atomic_write(self.path(key), lambda p: p.write_text(text))


# ============================================================================================ the sweep
@dataclass
class SweepResult:
    """Results in the cells' order; ``fresh``: the indices of the cells computed now (the others
    were read from the store)."""

    results: list
    fresh: list[int]

    @property
    def counts(self) -> dict:
        return {"total": len(self.results), "computed": len(self.fresh),
                "stored": len(self.results) - len(self.fresh)}


def _ray_call(cell_fn: Callable, cell: Any) -> Any:
    return cell_fn(cell)


def ray_init(address: str | None = None):
    """The ``ray`` module, connected: the running Ray session if there is one, else ``ray.init``
    at ``address`` (``"auto"``: the cluster started by ``ray start`` on this node; ``None``: a
    new local cluster on this machine's CPUs/GPUs). Worker logs stay in Ray's session folder."""
    try:
        import ray
    except ModuleNotFoundError as e:  # pragma: no cover - the extra is part of the test dependencies
        raise ModuleNotFoundError("executor 'ray' needs Ray: pip install -e '.[distributed]'") from e
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def run_sweep(cells: Sequence[Any], cell_fn: Callable[[Any], Any], *, keys: Sequence[str] | None = None,
              store: CellStore | None = None, executor: str = "local", address: str | None = None,
              num_cpus: float = 1, num_gpus: float | None = None, max_retries: int = 3, progress: bool = True,
              desc: str = "sweep", label: Callable[[Any], str] = str,
              storable: Callable[[Any], bool] = lambda result: True) -> SweepResult:
    """``[cell_fn(c) for c in cells]``, on ``executor``, skipping the cells already in ``store``.

    ``keys``: one store key per cell (needed with ``store``; results must be JSON values);
    ``storable(result)``: whether a result is stored (a failed cell is not, so a re-run retries it).
    ``executor="ray"``: each cell is a Ray task with ``num_cpus`` and ``num_gpus`` (``None``: 1 if
    the cluster has a GPU, else 0), retried up to ``max_retries`` times if its worker dies (an
    exception raised by ``cell_fn`` is not retried: it is raised here). ``cell_fn`` and the cells
    travel to the workers by (cloud)pickle: a module-level function and plain data.
    """
    from tqdm.auto import tqdm

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if store is not None and (keys is None or len(keys) != len(cells)):
        raise ValueError("a store needs one key per cell")
    results: list = [None] * len(cells)
    todo = []
    for i in range(len(cells)):
        hit = store.get(keys[i]) if store is not None else None
        if hit is None:
            todo.append(i)
        else:
            results[i] = hit
    stored = len(cells) - len(todo)

    def finish(i: int, result: Any) -> None:
        results[i] = result
        if store is not None and storable(result):
            store.put(keys[i], result)
        bar.update(1)

    with tqdm(total=len(cells), initial=stored, desc=desc, disable=not progress) as bar:
        if stored:
            bar.set_postfix_str(f"{stored} from the store")
        if executor == "local":
            for i in todo:
                bar.set_postfix_str(label(cells[i]))
                finish(i, cell_fn(cells[i]))
        elif todo:
            ray = ray_init(address)
            gpus = num_gpus if num_gpus is not None else (1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0)
            task = ray.remote(_ray_call).options(num_cpus=num_cpus, num_gpus=gpus, max_retries=max_retries,
                                                 retry_exceptions=False)
            pending = {task.remote(cell_fn, cells[i]): i for i in todo}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                bar.set_postfix_str(label(cells[i]))
                finish(i, ray.get(done[0]))
    return SweepResult(results, todo)


# ============================================================================================ merge cells
@dataclass(frozen=True)
class MergeCell:
    """One cell of the merging benchmark: ``entry`` (label, method, params) x ``seed`` of the
    setting made by ``recipe`` (``(constructor name in workbench.studies.merging_benchmark, kwargs)``), with its
    λ grid and how it is evaluated. Plain data: it travels to a Ray worker, which rebuilds the
    setting from the recipe (once per worker process)."""

    recipe: tuple
    entry: Any                      # workbench.studies.merging_benchmark.MergeEntry
    seed: int
    lambdas: tuple
    rescale: str
    keep_defaults: bool
    scoring: str
    device: str
    cache_dir: str | None
    keep_merged: str | None = None  # a folder for the merged checkpoints (default: per-cell temp, removed)
    context: str = field(default="", compare=False)  # key of the process's live setting/evaluator

    def __str__(self) -> str:
        return f"s{self.seed} {self.entry.label}"


#: Per process: context key -> (setting, evaluator). The local executor registers the driver's
#: own objects here; a Ray worker fills it from the recipe on its first cell of a setting.
_LIVE: dict[str, tuple] = {}


def _context_key(recipe: tuple, cache_dir: str | None, scoring: str, device: str) -> str:
    return json.dumps([recipe, cache_dir, scoring, device], sort_keys=True, default=str)


def _live(cell: MergeCell) -> tuple:
    from ..device import resolve_device
    from . import merging_benchmark as E
    from . import protocol as P

    key = cell.context or _context_key(cell.recipe, cell.cache_dir, cell.scoring, cell.device)
    if key not in _LIVE:
        constructor, kwargs = cell.recipe
        setting = getattr(E, constructor)(**kwargs)
        ev = P.Evaluator(setting.z, Path(cell.cache_dir) if cell.cache_dir else None, cell.scoring,
                         resolve_device(cell.device))
        _LIVE[key] = (setting, ev)
    return _LIVE[key]


def run_merge_cell(cell: MergeCell) -> dict:
    """Merge, evaluate over the λ grid, choose, test (:func:`workbench.studies.protocol.run_entry`):
    ``{"rows", "timings", "hits", "misses"}`` (the prediction cache's hits and misses of this cell).
    The merged checkpoints live in a per-cell temporary folder, removed after evaluation, unless
    ``cell.keep_merged`` names a folder to keep them in."""
    import torch

    from . import protocol as P

    setting, ev = _live(cell)
    hits, misses = ev.hits, ev.misses
    timings: list = []
    torch.manual_seed(cell.seed)
    with P.quiet_loading():
        if cell.keep_merged:
            workdir = Path(cell.keep_merged) / f"{cell.entry.method}-{digest({'e': cell.entry.key})[:8]}-s{cell.seed}"
            workdir.mkdir(parents=True, exist_ok=True)
            rows = P.run_entry(ev, setting, cell.entry, cell.seed, cell.lambdas, workdir, cell.rescale,
                               cell.keep_defaults, False, timings, keep_merged=True)
        else:
            with tempfile.TemporaryDirectory(prefix="wb-cell-") as tmp:
                rows = P.run_entry(ev, setting, cell.entry, cell.seed, cell.lambdas, Path(tmp), cell.rescale,
                                   cell.keep_defaults, False, timings)
    return {"rows": rows, "timings": timings, "hits": ev.hits - hits, "misses": ev.misses - misses}


def merge_cell_key(setting, cell: MergeCell) -> str:
    """The store key of a cell: a hash of everything its rows depend on (the zoo's model hashes,
    the records, method, parameters, λ grid, seed, scoring, the scorer's code version and the digest of
    the code that produces the numbers, :func:`workbench.evaluate.code_digest`)."""
    from ..evaluate import code_digest, scorer_key

    sets = {split: {t: records_digest(r) for t, r in s.items()}
            for split, s in (("val", setting.val_sets), ("test", setting.test_sets))}
    return "cell-" + digest({"setting": setting.name, "base": setting.base_hash,
                            "experts": setting.expert_hashes(cell.seed), "seed": cell.seed,
                            "entry": cell.entry.key, "label": cell.entry.label, "searched": cell.entry.searched,
                            "lambdas": [float(x) for x in cell.lambdas], "rescale": cell.rescale,
                            "keep_defaults": cell.keep_defaults, "scoring": cell.scoring, "records": sets,
                            "code": code_digest(), **scorer_key()})


def merge_grid(setting, entries: Sequence, lambdas: Sequence[float], ev, *, rescale: str, keep_defaults: bool,
               progress: bool, desc: str, executor: str = "local", address: str | None = None,
               keep_merged: str | Path | None = None, cell_fn: Callable[[MergeCell], dict] = run_merge_cell,
               num_cpus: float = 1, num_gpus: float | None = None, max_retries: int = 3
               ) -> tuple[list[dict], list[dict], dict]:
    """Every seed x entry of ``setting`` as a :class:`MergeCell`, run by :func:`run_sweep`, stored
    under ``<prediction cache>/cells/`` (no store without a cache; a cell with a failed row is not
    stored: a re-run tries it again). Returns ``(rows, timings, counts)``. The local executor uses
    ``setting`` and ``ev`` themselves (their in-memory caches, today's loop); the Ray executor
    rebuilds them on each worker from ``setting.recipe``."""
    cache_dir = str(ev.cache_dir) if ev.cache_dir is not None else None
    device = str(ev.device)
    context = ""
    if executor == "local":
        context = f"driver-{id(setting)}-{id(ev)}"
        _LIVE[context] = (setting, ev)
    elif ev.cache_dir is not None and not Path(ev.cache_dir).is_absolute():
        cache_dir = str(Path(ev.cache_dir).resolve())
    if executor == "ray":  # the device asked for, resolved on each worker (a GPU worker: "auto" is its GPU)
        device = str(getattr(ev, "device_request", device))
    cells = [MergeCell(setting.recipe, e, int(s), tuple(float(x) for x in lambdas), rescale, keep_defaults,
                       ev.scoring, device, cache_dir, str(Path(keep_merged).resolve()) if keep_merged else None,
                       context)
             for s in setting.experts for e in entries]
    store = CellStore(Path(cache_dir) / "cells") if cache_dir else None
    keys = [merge_cell_key(setting, c) for c in cells]
    try:
        res = run_sweep(cells, cell_fn, keys=keys if store else None, store=store, executor=executor, address=address,
                        num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, progress=progress, desc=desc,
                        storable=lambda r: all(row["status"] == "ok" for row in r["rows"]))
    finally:
        _LIVE.pop(context, None)
    rows, timings = [], []
    for r in res.results:
        rows += r["rows"]
        timings += r["timings"]
    if executor == "ray":  # the workers' prediction-cache counts (the local executor counted on ev itself)
        ev.hits += sum(res.results[i]["hits"] for i in res.fresh)
        ev.misses += sum(res.results[i]["misses"] for i in res.fresh)
    return rows, timings, res.counts


# ============================================================================================ SWEEP.yaml
#: The table functions of :mod:`workbench.studies.merging_benchmark` a SWEEP.yaml may name.
EXPERIMENTS = ("capability_merging", "modality_merging", "optmerge_ablation", "rank_ratio_sweep", "solver_comparison")


def run_file(path: str | Path, executor: str = "local", address: str | None = None, out: str | Path | None = None,
             progress: bool = True):
    """Run the sweep described by the YAML file ``path``::

        experiment: capability_merging   # one of EXPERIMENTS
        zoo: tiny                        # a preset name or a zoo folder
        args:                            # keyword arguments of that function (optional)
          variant: full
          methods: [weight_average, task_arithmetic]
          lambdas: [0.5, 1.0]
        out: data/results/tiny           # optional (default: the preset's results folder)

    with ``write=True`` (the function's CSV lands in ``out``). Returns what the function returns."""
    import yaml

    from . import merging_benchmark as E
    from ..errors import ConfigError

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"sweep file {path}: cannot read it ({e})") from e
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path}: expected a mapping with 'experiment' and 'zoo'")
    unknown = set(spec) - {"experiment", "zoo", "args", "out"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {sorted(unknown)} (experiment, zoo, args, out)")
    experiment, zoo, args = spec.get("experiment"), spec.get("zoo"), spec.get("args") or {}
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"sweep file {path}: experiment must be one of {EXPERIMENTS}, got {experiment!r}")
    if not zoo:
        raise ConfigError(f"sweep file {path}: 'zoo' (a preset name or a zoo folder) is missing")
    if not isinstance(args, dict):
        raise ConfigError(f"sweep file {path}: 'args' must be a mapping of keyword arguments")
    reserved = {"executor", "ray_address", "write", "out", "progress"} & set(args)
    if reserved:
        raise ConfigError(f"sweep file {path}: args {sorted(reserved)} are set by the command line, not the file")
    out = out if out is not None else spec.get("out")
    return getattr(E, experiment)(str(zoo), **args, executor=executor, ray_address=address, write=True, out=out,
                                  progress=progress)


HELP = "run a merging-benchmark sweep from a YAML file, in this process or on a Ray cluster"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="SWEEP.yaml (experiment, zoo, args, out: see workbench.studies.sweep.run_file)")
    p.add_argument("--executor", choices=EXECUTORS, default="local", help="where the cells run (default: local)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address ('auto': the cluster of `ray start` on this node; default: a new "
                        "local one)")
    p.add_argument("--out", default=None, help="results folder (overrides the file's 'out')")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .tables import merge_table

    res = run_file(args.file, args.executor, args.address, args.out, progress=not args.quiet)
    df = res[0] if isinstance(res, tuple) else res
    print(merge_table(df, fmt=True).to_string())
    cells = df.attrs.get("cells", {})
    print(f"cells: {cells.get('total', 0)} ({cells.get('computed', 0)} computed, {cells.get('stored', 0)} from the "
          f"store); executor {args.executor}")
    return 0
