"""The zoo's job scheduler: the job registry, each job's cache key, and :func:`build_zoo`, which runs
every planned job whose key changed in parallel worker processes (one thread each), under a lock,
and writes the manifest ``zoo.json``.

Job registry: :func:`register_job_kind` adds a kind (e.g. ``"damc"``) with its :class:`Recipe` and a
planner that returns the kind's jobs for a preset (the world's own kinds and planner are in
:mod:`workbench.world.recipes`).

Cache key (:func:`job_hash`): a job is rebuilt when its key changes. The key holds the job's
declared recipe - its kind, the recipe's ``version`` (an explicit number, bumped by hand when a
recipe changes meaning without its source changing), its configuration - the keys of the jobs it
depends on, and the digest of its *training path* (:func:`training_path_digest`): the source text
of the build function and of each function, class, method or constant the recipe declares as
what the job runs to produce its weights (``Recipe.training_path``, ``"module:qualname"``
entries, each hashed on its own with ``inspect.getsource``, less its import statements). Hence
moving a function to another file (and the imports that follow it), editing a module's
docstring, or editing code off the path (``MultimodalLM.generate``, the :class:`Zoo` reader,
evaluation) keeps every key, while an edit inside a training function rebuilds the jobs that run
it and those downstream. A declared entry that no longer exists is an
error, not a silent omission. When a recipe starts to use a new function, add it to the path.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import functools
import hashlib
import inspect
import json
import multiprocessing as mp
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .presets import data_root, get_preset, zoo_root

if TYPE_CHECKING:
    from .zoo import Zoo

WORLD_VERSION = "1"


# ----------------------------------------------------------------------------- job registry
@dataclass
class Job:
    name: str
    kind: str
    config: dict
    deps: list[str] = field(default_factory=list)
    out: str = ""  # folder relative to the zoo root


BuildFn = Callable[[Job, dict], dict]
PlanFn = Callable[[str, dict], list[Job]]


@dataclass(frozen=True)
class Recipe:
    """How a job kind makes its models: ``build`` (runs in a worker), ``version`` (bumped by hand when
    the recipe changes meaning without its training path's source changing, e.g. a new library
    release) and ``training_path``: the ``"module:qualname"`` of every function, class, method and
    constant the job runs to produce its weights (see :func:`training_path_digest`)."""
    build: BuildFn
    version: int
    training_path: tuple[str, ...]


RECIPES: dict[str, Recipe] = {}
PLANNERS: dict[str, PlanFn] = {}


def register_job_kind(kind: str, build_fn: BuildFn, plan_fn: PlanFn | None = None, *, version: int,
                      training_path: Sequence[str]) -> None:
    """Register a job kind. ``build_fn(job, ctx) -> result dict`` runs in a worker and writes into
    ``ctx["root"] / job.out``; ``ctx`` holds ``root`` (zoo dir), ``data`` (data dir), ``preset``,
    ``cfg`` (the preset config), ``results`` (finished jobs' results by name). ``plan_fn(preset, cfg)``
    returns the kind's jobs; their results with a ``"manifest"`` entry are listed in ``zoo.json``.
    ``version`` and ``training_path`` key the kind's jobs (:class:`Recipe`)."""
    RECIPES[kind] = Recipe(build_fn, int(version), tuple(training_path))
    if plan_fn is not None:
        PLANNERS[kind] = plan_fn


def resolve_path_entry(entry: str):
    """The object a training-path entry ``"package.module:Qual.name"`` names (a property: its getter).
    Raises if it does not exist, so a renamed function cannot silently leave the key."""
    import importlib
    module, _, qualname = entry.partition(":")
    if not qualname:
        raise ValueError(f"training path entry {entry!r} is not 'module:qualname'")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        obj = obj.fget
    return obj


def path_entry_source(entry: str) -> str:
    """The source text of a training-path entry: a function, class or method's own source
    (``inspect.getsource``, less import statements), or a module-level constant's assignment."""
    obj = resolve_path_entry(entry)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return _source_without_imports(obj)
    module, _, name = entry.partition(":")
    assignments = _module_assignments(module)
    if name not in assignments:
        raise TypeError(f"training path entry {entry!r} is neither a function, a class nor a module constant")
    return assignments[name]


def _source_without_imports(obj) -> str:
    """``inspect.getsource(obj)`` less its import statements: where a name is imported from says
    nothing of what the code does (the imported function is on the path itself), so a function
    whose callee moved to another module keeps its key."""
    import textwrap
    source = inspect.getsource(obj)
    drop = set()
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            drop.update(range(node.lineno, node.end_lineno + 1))
    return "".join(line for i, line in enumerate(source.splitlines(keepends=True), 1) if i not in drop)


@functools.lru_cache(maxsize=None)
def _module_assignments(module: str) -> dict[str, str]:
    """``{name: source of its assignment}`` of the module-level constants of ``module`` (as imported)."""
    import importlib
    text = inspect.getsource(importlib.import_module(module))
    out = {}
    for node in ast.parse(text).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name):
                out[t.id] = ast.get_source_segment(text, node)
    return out


def training_path_digest(kind: str) -> str:
    """Hash of the source text of the build function of ``kind`` and of every entry of its training
    path, in no particular order: independent of the files they live in and of everything else in
    those files."""
    recipe = RECIPES[kind]
    sources = sorted([_source_without_imports(recipe.build)] + [path_entry_source(e) for e in recipe.training_path])
    h = hashlib.sha256()
    for src in sources:
        h.update(hashlib.sha256(src.encode()).digest())
    return h.hexdigest()[:16]


def job_hash(job: Job, dep_hashes: Mapping[str, str], digest: str | None = None) -> str:
    """The cache key of ``job``: the world version, its kind's recipe version and training-path
    digest (``digest``, computed when not given), its configuration and its dependencies' keys."""
    digest = training_path_digest(job.kind) if digest is None else digest
    blob = json.dumps({"v": WORLD_VERSION, "kind": job.kind, "recipe": RECIPES[job.kind].version, "code": digest,
                       "config": job.config, "deps": {d: dep_hashes[d] for d in sorted(job.deps)}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def job_keys(plan: Sequence[Job]) -> dict[str, str]:
    """The cache key (:func:`job_hash`) of every job of ``plan``, dependencies first; each kind's
    training path is hashed once."""
    by_name = {j.name: j for j in plan}
    for j in plan:
        for d in j.deps:
            if d not in by_name:
                raise ValueError(f"job {j.name!r} depends on unknown job {d!r}")
        if j.kind not in RECIPES:
            raise ValueError(f"job {j.name!r}: unknown kind {j.kind!r}")
    digests = {kind: training_path_digest(kind) for kind in {j.kind for j in plan}}
    hashes: dict[str, str] = {}
    pending = list(plan)
    while pending:  # topological hash computation
        progressed = False
        for j in list(pending):
            if all(d in hashes for d in j.deps):
                hashes[j.name] = job_hash(j, hashes, digests[j.kind])
                pending.remove(j)
                progressed = True
        if not progressed:
            raise ValueError(f"dependency cycle among {[j.name for j in pending]}")
    return hashes


def _threads() -> None:
    torch.set_num_threads(1)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def _run_job(kind: str, job: Job, ctx: dict) -> tuple[dict, float]:
    _threads()
    t0 = time.time()
    res = RECIPES[kind].build(job, ctx)
    return res, time.time() - t0


def build_zoo(preset: str = "default", out: str | Path | None = None, jobs: int = 2, progress: bool = True,
              only: Sequence[str] | None = None, cfg: dict | None = None) -> "Zoo":
    """Build (or update) the zoo of ``preset``: runs each job whose key (:func:`job_hash`) changed, in up
    to ``jobs`` worker processes; writes ``zoo.json``; returns the :class:`Zoo`."""
    cfg = copy.deepcopy(cfg or get_preset(preset))
    # import everything the jobs use before forking workers: jobs then run the code that was hashed
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from .. import evaluate, mllm  # noqa: F401
    from . import encoders, recipes, tokenizer, training  # noqa: F401
    root = zoo_root(preset, out)
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        return _build_locked(preset, out, jobs, progress, only, cfg, root)


#: Seconds a build waits for the zoo's lock before it says so: two notebooks opening a built zoo at once each hold
#: the lock for the second or two of a cache check, a wait not worth a line in their outputs; a real build is.
QUIET_LOCK_WAIT_S = 15.0


@contextlib.contextmanager
def _build_lock(root: Path):
    """Hold an exclusive lock on ``root/.build.lock`` for one build: a second build of the same zoo
    (another notebook, a second ``make zoo``) waits for the first, then finds its jobs cached. It says
    that it waits only once the wait passes :data:`QUIET_LOCK_WAIT_S`."""
    import fcntl

    with open(root / ".build.lock", "w") as fh:
        deadline = time.monotonic() + QUIET_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                print(f"zoo {root}: another build is running; waiting for it to finish", flush=True)
                fcntl.flock(fh, fcntl.LOCK_EX)
                break
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_locked(preset: str, out, jobs: int, progress: bool, only, cfg: dict, root: Path) -> "Zoo":
    from .recipes import plan_jobs
    from .zoo import Zoo

    droot = data_root(preset) if out is None else Path(out) / "data"
    plan = plan_jobs(preset, cfg)
    if only:
        keep = set(only)
        changed = True
        while changed:
            before = len(keep)
            for j in plan:
                if j.name in keep:
                    keep.update(j.deps)
            changed = len(keep) != before
        plan = [j for j in plan if j.name in keep]
    hashes = job_keys(plan)
    state_dir = root / ".jobs"
    state_dir.mkdir(exist_ok=True)
    results: dict[str, dict] = {}
    todo = []
    for j in plan:
        st = state_dir / f"{j.name}.json"
        if st.exists():
            s = json.loads(st.read_text())
            files = s.get("result", {}).get("files", {})  # a data job's sets must still be there
            if s.get("hash") == hashes[j.name] and all((droot / f).exists() for f in files):
                results[j.name] = s
                continue
        todo.append(j)
    n_trained = len(todo)
    n_dep = _n_dependents(plan)
    # critical path first; among jobs nothing waits on, the longest first (less idle time at the end)
    todo.sort(key=lambda j: (-n_dep[j.name], -_RELATIVE_COST.get(j.kind, 1)))  # stable: plan order among equals
    ctx = {"root": str(root), "data": str(droot), "preset": preset, "cfg": cfg, "progress": False}
    t_start = time.time()
    bar = tqdm(total=len(todo), desc=f"zoo {preset}", disable=not progress)
    done = set(results)
    running: dict = {}
    mpctx = mp.get_context("fork")
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=mpctx) as ex:
        while todo or running:
            for j in list(todo):
                if len(running) >= max(1, jobs):
                    break
                if all(d in done for d in j.deps):
                    running[ex.submit(_run_job, j.kind, j, dict(ctx, results=dict(results)))] = j
                    todo.remove(j)
            if not running:
                raise RuntimeError(f"zoo {preset}: jobs {[j.name for j in todo]} wait on jobs that failed")
            fin, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in fin:
                j = running.pop(f)
                try:
                    res, secs = f.result()
                except Exception as err:  # re-raise naming the job
                    raise RuntimeError(f"zoo {preset}: job {j.name!r} failed: {err!r}") from err
                s = {"hash": hashes[j.name], "kind": j.kind, "seconds": round(secs, 1), "result": res,
                     "out": j.out, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
                (state_dir / f"{j.name}.json").write_text(json.dumps(s, indent=2))
                results[j.name] = s
                done.add(j.name)
                # keep zoo.json current (an interrupted build still lists what is finished)
                _write_manifest(root, droot, preset, cfg, [p for p in plan if p.name in results], results,
                                time.time() - t_start, complete=False)
                bar.update(1)
                bar.set_postfix_str(f"{j.name} {secs:.0f}s")
    bar.close()
    _write_manifest(root, droot, preset, cfg, plan, results, time.time() - t_start, complete=not only,
                    n_trained=n_trained)
    return Zoo(root)


#: rough relative training cost of a job kind (scheduling only: longer jobs start first; capability mixture
#: training runs twice an expert's steps - last in the queue, it ran alone at the end of the build)
_RELATIVE_COST = {"cap_mixture": 6, "damc": 3, "oracle": 3, "cap_full": 3, "cap_lora": 3, "full": 2, "lora": 2}


def _n_dependents(plan: Sequence[Job]) -> dict[str, int]:
    """Per job, how many jobs (transitively) wait on it: the scheduler starts ready jobs with the most
    dependents first (the base LLM before the encoders), so the two workers are not left idle behind
    the critical path."""
    direct: dict[str, set[str]] = {j.name: set() for j in plan}
    for j in plan:
        for d in j.deps:
            direct.setdefault(d, set()).add(j.name)

    @functools.lru_cache(maxsize=None)
    def below(name: str) -> frozenset:
        out = set(direct.get(name, ()))
        for c in direct.get(name, ()):
            out |= below(c)
        return frozenset(out)
    return {j.name: len(below(j.name)) for j in plan}


#: the libraries whose versions change what the world's training computes (recorded in ``zoo.json``)
TRAINING_LIBRARIES = ("torch", "transformers", "numpy", "peft", "safetensors", "tokenizers", "accelerate", "numba")


def library_versions() -> dict[str, str]:
    """Python, the platform and the installed versions of :data:`TRAINING_LIBRARIES`: the zoo's models
    are not bit-stable across them (the same code and data built a different zoo with newer libraries,
    2026-12-06), so ``zoo.json`` says what built it (``constraints.txt`` pins what ``make venv`` installs)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine()}
    for name in TRAINING_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _write_manifest(root: Path, droot: Path, preset: str, cfg: dict, plan: list[Job], results: dict,
                    wall: float, complete: bool = True, n_trained: int = 1) -> None:
    """Write ``zoo.json``. ``n_trained``: jobs this build ran; with none, the manifest keeps the
    ``built`` time, ``build_wall_seconds``, ``jobs_trained`` and ``versions`` (:func:`library_versions`) of
    the build that made the models (a cache check is not a build). ``build_wall_seconds`` is the wall time
    of that last build, which trained ``jobs_trained`` of the ``len(jobs)`` jobs (all of them: a build from
    nothing)."""
    models, jobs = {}, {}
    for j in plan:
        r = results[j.name]
        jobs[j.name] = {"kind": j.kind, "hash": r["hash"], "seconds": r["seconds"], "out": j.out,
                        "finished": r.get("finished")}
        res = r["result"]
        if "manifest" in res:
            models[j.name] = dict(res["manifest"], path=j.out, hash=r["hash"], job_seconds=r["seconds"])
        elif j.kind in ("encoder", "base", "instruct", "tokenizer", "data", "mcub_data"):
            jobs[j.name]["result"] = res
    built, wall, versions = time.strftime("%Y-%m-%dT%H:%M:%S"), round(wall, 1), library_versions()
    prev = root / "zoo.json"
    if not n_trained and prev.exists():  # nothing was trained: keep the record of the build that made these models
        try:
            old = json.loads(prev.read_text())
            built, wall = old.get("built", built), old.get("build_wall_seconds", wall)
            n_trained = old.get("jobs_trained", n_trained)
            versions = old.get("versions", "not recorded (built before zoo.json recorded them)")
        except (OSError, ValueError):
            pass
    manifest = {"preset": preset, "world_version": WORLD_VERSION, "data_dir": str(droot), "complete": complete,
                "built": built, "build_wall_seconds": wall, "jobs_trained": n_trained, "versions": versions,
                "total_job_seconds": round(sum(results[j.name]["seconds"] for j in plan), 1),
                "config": cfg, "jobs": jobs, "models": models}
    tmp = root / "zoo.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(root / "zoo.json")
