"""The merging-benchmark study: its experiments on the miniature zoo (Wei et al., "Unifying MLLM
Capabilities and Modalities via Model Merging", OptMerge), as tidy DataFrames.

- :func:`capability_merging` - Tables 2 (full fine-tuning) and 3 (LoRA): the capability experts'
  LLMs merged by every algorithm, λ searched on a **validation** split, reported on a held-out
  **test** split, beside the base VLM, every individual expert on every task ("Indiv." rows) and
  the mixture-training model where the zoo has one;
- :func:`modality_merging` - Table 5: the modality experts' LLMs merged by every algorithm and
  composed with every expert's tower, beside NaiveMC and DAMC, on MCUB-mini and each modality's
  own tasks;
- :func:`optmerge_ablation` - Table 4 (WUDI -> +SGD -> +initialisation -> +low-rank),
  :func:`rank_ratio_sweep` - Table 8 (OptMerge's ``k_ratio``), :func:`solver_comparison` -
  iterative vs exact solve of WUDI / OptMerge (accuracy, merge seconds, objective value);
- their tables (the Table-2-shaped wide table, the comparison with the paper's, paired tests) are
  in :mod:`workbench.studies.tables`.

How a merged model is made (the benchmark's protocol, methods.md section 4; the code is in
:mod:`workbench.studies.protocol`):

* only the LLM's linear weights are merged, by :func:`workbench.engine.merge` with its default
  keep list (embeddings, ``lm_head``, norms, biases, towers and projectors stay the base's);
* θ0 of the capability family is the zoo's *instruct* base VLM's LLM (``capability/base/llm``, the
  experts' ``base`` in ``expert.json``), as InternVL2.5-Instruct / Qwen2-VL-Instruct are the papers' bases;
* the merged VLM is the merged LLM + the **base** VLM's tower (capability encoder + the base's
  projector). The zoo's capability experts do not train their projector, so their projectors *are*
  the base's; an expert that did (``train_projector`` in its ``expert.json``) is named in
  ``df.attrs["notes"]``: the merged model still uses the base's (the benchmark keeps the base's vision side);
* every method returns ``θ = θ0 + λ τ_m`` with ``τ_m`` independent of λ. The engine merges once
  with ``scale = 1`` into a temporary folder; the model for λ is ``θ0 + λ (θ_1 − θ0)`` on the
  merged tensors (``rescale="interpolate"``, the default: float32 rounding of order 1e-7 relative
  to the engine's own ``scale=λ``; ``rescale="remerge"`` runs the engine once per λ instead).
  Weight Average ignores λ and runs once (``lambda = 1``, ``searched = False``);
* temporary merged models live in a temporary folder that is deleted after evaluation; only the
  per-item predictions are kept, in a cache keyed by a hash of the inputs (the zoo's model hashes,
  method, parameters, λ, seed, records, scoring) and of the code that produced them
  (:func:`workbench.evaluate.code_digest`) under ``data/results/<preset>/cache/experiments/``
  (:mod:`workbench.studies.cache`);
* each method x seed is one *cell* (:mod:`workbench.studies.sweep`): run in this process or as a Ray
  task (``executor="ray"``), its rows stored under ``cache/experiments/cells/`` as it finishes, so a
  re-run computes only the missing cells.

Selection is honest: for each method and seed the λ with the highest *mean over tasks* of the
validation accuracies is chosen (ties: the smaller λ), and only that λ is evaluated on the test
split. The capability tasks have one record file each; :func:`~workbench.studies.protocol.split_records`
splits it into validation (:data:`CAP_VAL_FRACTION`) and test by a seeded permutation (disjoint, deterministic). A method that fails
(an exception in the merge or evaluation) gets rows with ``status="failed"``, NaN accuracy and the
error message - never silently dropped.

Row schema of every experiment (one row per model x task x split x seed)::

    method (display name), method_id (registry name or label), kind (merge | base | indiv |
    oracle | composition), task, split (val | test), lambda, searched, selected, seed, n,
    n_correct, accuracy (%), ci_low, ci_high (95% Wilson, %), status, error, params (JSON),
    pred_file (the cached per-item predictions; empty without a cache;
               :func:`workbench.studies.tables.paired_tests`)
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from ..paths import repo_relative
from ..io.writer import atomic_write
from ..world import Zoo
from ..world.scheduler import library_versions
from .protocol import Evaluator, quiet_loading, reference_rows, split_records

#: The merge methods of the benchmark tables, in the paper's row order (Iso-CTS is extra).
CAP_METHODS: tuple[str, ...] = ("weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv",
                                "iso_c", "iso_cts", "wudi", "optmerge")
#: Table 5's merge methods (the paper's columns; Iso-CTS and the DARE variants are extra, opt-in).
MODALITY_METHODS: tuple[str, ...] = ("weight_average", "task_arithmetic", "ties", "tsv", "iso_c", "wudi",
                                     "optmerge")
LAMBDAS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)
#: share of each capability task's items held out for the λ search (the default preset's 600 items per task:
#: 100 validation items per task, 500 over the five tasks for a search; 500 test items per task)
CAP_VAL_FRACTION = 1 / 6
#: capability tasks scored otherwise than the study's ``scoring`` (log-likelihood over the options): OCR by greedy
#: decoding, exact string - as OCRVQA is in the paper (exact match). Among four strings that differ by one
#: digit the instruct base already picks the right one 98.7% of the time (no room for an expert); producing
#: the string itself it gets 82.8% (the default zoo of 2026-12-05).
CAP_TASK_SCORING: dict[str, str] = {"ocr": "generate"}
#: MCUB-mini validation items of the modality family's λ search (an evenly strided subset of ``mcub/val.json``,
#: whose records cycle through the modality combinations: 40 per combination of the default preset's 11)
MODALITY_VAL_ITEMS = 440
#: Methods whose result does not depend on λ (run once).
NO_LAMBDA: frozenset = frozenset({"weight_average"})
TASK_LABELS: dict[str, str] = {"vqa": "VQA", "geometry": "Geometry", "chart": "Chart", "ocr": "OCR",
                               "grounding": "Grounding"}
#: OptMerge's preset for each setting.
OPTMERGE_PRESET_OF: dict[str, str] = {"full": "full_ft", "lora": "lora", "modality": "modality"}
#: Ours, not the paper's: the iterative WUDI / OptMerge solver's relative step per optimiser
#: (``lr_scale="relative"``, :func:`workbench.merging.wudi`): Adam 0.1 x the task vectors' RMS,
#: SGD 1.0 / lambda_max of the system (stable below 1.9 with momentum 0.9). The paper's absolute
#: steps (Adam 1e-5, SGD 1e-4) were set for 7B weights and hardly move the mini zoo's merge
#: (docs/METHODS.md); on synthetic low-rank task vectors these values close >= 99% of the gap
#: between the initial and the minimal objective in the paper's 300 steps.
SCALE_AWARE_LR: dict[str, float] = {"adam": 0.1, "sgd": 1.0}
#: Bumped when a method's results change for the same parameters; part of the evaluation cache
#: key (other methods' cached predictions stay valid). wudi / optmerge 2: presets as the authors'
#: code, the init-anchored exact solve (docs/METHODS.md).
METHOD_REVISION: dict[str, int] = {"wudi": 2, "optmerge": 2}


def scale_aware_params(method: str, preset: str | None = None) -> dict:
    """The registry parameters of our scale-aware iterative solve for ``method`` (``wudi`` or
    ``optmerge`` with ``preset``): ``lr_scale="relative"`` and :data:`SCALE_AWARE_LR` of the
    optimiser the paper's settings use; ``{}`` for other methods."""
    from ..merging import OPTMERGE_PRESETS

    if method == "wudi":
        return {"lr_scale": "relative", "lr": SCALE_AWARE_LR["adam"]}
    if method == "optmerge":
        return {"lr_scale": "relative", "lr": SCALE_AWARE_LR[OPTMERGE_PRESETS[preset or "full_ft"]["optimizer"]]}
    return {}
BASE_LABEL = "Base"
INDIV_MEAN = "Indiv. (mean)"
INDIV_OWN = "Indiv. (own task)"
ORACLE_LABEL = "Mixture Training"
ROW_COLUMNS = ["method", "method_id", "kind", "task", "split", "lambda", "searched", "selected", "seed", "n",
               "n_correct", "accuracy", "ci_low", "ci_high", "status", "error", "params", "pred_file"]


# ============================================================================================ small helpers
def _preset(z) -> str:
    return str(z.manifest.get("preset", z.path.name))


def default_out(z) -> Path:
    """The results folder of the zoo's preset (:func:`workbench.paths.results_dir`:
    ``data/results/<preset>/`` unless ``WORKBENCH_RESULTS_DIR`` says otherwise)."""
    from ..paths import results_dir

    return results_dir(_preset(z))


def indiv_label(task: str) -> str:
    """The row label of the individual expert of capability ``task`` (``"Indiv. VQA"``): what the tables
    match to find each task's own expert."""
    return f"Indiv. {TASK_LABELS.get(task, task)}"


def method_label(method_id: str) -> str:
    """The row label of ``method_id``: a merge method's registry ``pretty_name``, a composition's
    paper name (:data:`workbench.studies.report.PAPER_NAMES`: NaiveMC, DAMC), else the id itself."""
    from ..merging import METHODS
    from .report import PAPER_NAMES

    return METHODS[method_id].pretty_name if method_id in METHODS else PAPER_NAMES.get(method_id, method_id)


# ============================================================================================ settings
@dataclass
class _Setting:
    """One family of experts to merge: what is merged, how the VLM is built, on what it is scored."""

    z: Any
    name: str                              # "capability-full" | "capability-lora" | "modality"
    experts: dict[int, list[str]]          # seed -> zoo model names (merge order)
    expert_paths: dict[int, list[Path]]    # seed -> engine inputs (llm folder or adapter folder)
    val_sets: dict[str, list[dict]]        # task -> validation records
    test_sets: dict[str, list[dict]]       # task -> test records
    build: Callable[[Any, int], Any]       # (llm module, seed) -> MultimodalLM
    base_hash: dict                        # hashes of everything beside the experts
    notes: dict = field(default_factory=dict)
    base_path: Path | None = None          # the experts' theta_0 (an HF Llama folder); None: the zoo's base/
    task_scoring: dict = field(default_factory=dict)  # task -> scoring where not the evaluator's (CAP_TASK_SCORING)

    @property
    def base_llm_path(self) -> Path:
        return self.base_path if self.base_path is not None else self.z.base_path

    def load_base_llm(self):
        from ..world.zoo import _load_llm
        return _load_llm(self.base_llm_path)

    def expert_hashes(self, seed: int) -> dict:
        models = self.z.manifest["models"]
        return {n: models[n].get("hash") for n in self.experts[seed]}


def capability_setting(zoo, variant: str = "full", seeds: Sequence[int] | None = None,
                       tasks: Sequence[str] | None = None, val_fraction: float = CAP_VAL_FRACTION, split_seed: int = 0
                       ) -> _Setting:
    """The capability family of ``zoo`` as a merge setting (experts ``capability-<task>-<variant>-s<seed>``)."""
    from ..compose import CachedTokenizer, CachedTower
    from ..mllm import MultimodalLM
    from ..world import PLACEHOLDERS

    z = Zoo.coerce(zoo)
    if variant not in ("full", "lora"):
        raise ValueError(f"variant must be 'full' or 'lora', got {variant!r}")
    cap = z.manifest["config"].get("capability", {})
    all_tasks = list(cap.get("tasks", []))
    tasks = list(tasks) if tasks is not None else all_tasks
    unknown = [t for t in tasks if t not in all_tasks]
    if unknown:
        raise ValueError(f"tasks {unknown} are not capability tasks of this zoo ({all_tasks})")
    if seeds is None:  # every seed of the variant (the preset may train LoRA experts for fewer seeds)
        seeds = list(cap.get("lora_seeds", cap.get("seeds", [0])) if variant == "lora" else cap.get("seeds", [0]))
    seeds = list(seeds)
    experts, paths = {}, {}
    for s in seeds:
        names = [f"capability-{t}-{variant}-s{s}" for t in tasks]
        missing = [n for n in names if n not in z.manifest["models"]]
        if missing:
            raise FileNotFoundError(f"zoo {z.path} lacks {missing} (variant {variant!r}; LoRA experts need "
                                    f"capability.lora = true in the preset)")
        experts[s] = names
        paths[s] = [z.adapter_path(n) if variant == "lora" else z.llm_path(n) for n in names]
    val, test = {}, {}
    for t in tasks:
        val[t], test[t] = split_records(z.capability_eval(t), val_fraction, split_seed)
    tok = CachedTokenizer(z.tokenizer())
    notes = {}
    trained_proj = [n for s in seeds for n in experts[s] if z.info(n).get("train_projector")]
    notes["projector"] = ("base VLM's projector (the benchmark keeps the base's vision side)"
                          + (f"; experts {trained_proj} trained their own projector, not used by merges"
                             if trained_proj else "; the experts did not train theirs, so it equals theirs"))

    towers: dict = {}

    def build(llm, seed):
        # one frozen tower for every merged model, its outputs memoised (bit-identical to recomputing)
        if "image" not in towers:
            towers["image"] = CachedTower(z.load_tower("capability-base").eval().requires_grad_(False))
        return MultimodalLM(llm, tok, {"image": towers["image"]}, {"image": PLACEHOLDERS["image"]})

    # the text-pretrained LM the base VLM is built from, beside the base VLM's own key
    bh = {"base": z.job_hash("base"), "capability-base": z.info("capability-base").get("hash"),
          "split": [val_fraction, split_seed]}
    base_paths = {z.base_llm_path(n) for s in seeds for n in experts[s]}
    if len(base_paths) != 1:
        raise ValueError(f"the capability experts {experts} were not fine-tuned from one base LLM: {sorted(base_paths)}")
    setting = _Setting(z, f"capability-{variant}", experts, paths, val, test, build, bh, notes, base_paths.pop(),
                       {t: sc for t, sc in CAP_TASK_SCORING.items() if t in tasks})
    setting.recipe = ("capability_setting", {"zoo": str(z.path), "variant": variant, "seeds": seeds, "tasks": tasks,
                                             "val_fraction": val_fraction, "split_seed": split_seed})
    return setting


def modality_setting(zoo, seeds: Sequence[int] | None = None, modalities: Sequence[str] | None = None,
                     kind: str = "full", benchmarks: Sequence[str] = ("mcub-2", "mcub-3", "mcub-4"),
                     own_tasks: bool = True, max_items: int | None = None) -> _Setting:
    """The modality family as a merge setting: experts ``<m>-<kind>-s<seed>``; every merged LLM gets
    every expert's tower. Validation: :data:`MODALITY_VAL_ITEMS` records of ``mcub/val.json``; test: MCUB-mini
    2/3/4 and ``own:<m>``."""
    from .. import compose as C

    z = Zoo.coerce(zoo)
    mods = list(modalities) if modalities is not None else list(z.modalities)
    seeds = list(seeds) if seeds is not None else list(z.manifest["config"]["seeds"])
    experts, paths = {}, {}
    for s in seeds:
        names = [f"{m}-{kind}-s{s}" for m in mods]
        missing = [n for n in names if n not in z.manifest["models"]]
        if missing:
            raise FileNotFoundError(f"zoo {z.path} lacks {missing}")
        experts[s] = names
        paths[s] = [z.adapter_path(n) if kind == "lora" else z.llm_path(n) for n in names]
    head = (lambda rs: rs[:max_items]) if max_items else (lambda rs: rs)
    try:
        val_all = z.mcub("val")
        stride = max(1, len(val_all) // MODALITY_VAL_ITEMS)  # every combination alike: records cycle through them
        val = {"mcub-val": head(val_all[::stride][:MODALITY_VAL_ITEMS])}
    except FileNotFoundError:
        val = {}
    test = {}
    for b in benchmarks:
        try:
            recs = z.mcub(b)
        except FileNotFoundError:
            continue
        recs = [r for r in recs if set(_record_mods(r)) <= set(mods)]
        if recs:
            test[b] = head(recs)
    if own_tasks:
        for m in mods:
            test[f"own:{m}"] = head(z.own_eval(m))
    val = {k: [r for r in v if set(_record_mods(r)) <= set(mods)] for k, v in val.items()}
    if not val or not any(val.values()):
        raise FileNotFoundError(f"zoo {z.path}: no MCUB-mini validation split (mcub/val.json) to choose lambda on")
    tok = C.CachedTokenizer(z.tokenizer())
    srcs_cache: dict[int, list] = {}

    def sources(seed):
        # the towers are frozen and shared by every merged model of the seed: outputs memoised
        if seed not in srcs_cache:
            srcs_cache[seed] = [C.cached_source(C.zoo_expert(z, n)) for n in experts[seed]]
        return srcs_cache[seed]

    def build(llm, seed):
        # compose_frozen without its defensive deep copy: every caller passes a fresh LLM module
        return C._mllm(llm, tok, sources(seed))

    setting = _Setting(z, "modality", experts, paths, val, test, build,
                       {"base": z.base_hash, "mods": mods, "max_items": max_items},
                       {"towers": "every modality expert's own tower (encoder + its projector)"})
    setting.sources = sources  # type: ignore[attr-defined]
    setting.recipe = ("modality_setting", {"zoo": str(z.path), "seeds": seeds, "modalities": mods, "kind": kind,
                                           "benchmarks": list(benchmarks), "own_tasks": own_tasks,
                                           "max_items": max_items})
    return setting


def _record_mods(rec: Mapping) -> list[str]:
    key = {"vision": "image"}
    return [key.get(k, k) for k in rec.get("modal_inputs", {})]


# ============================================================================================ merging
@dataclass
class MergeEntry:
    """One merged model family to evaluate: ``label`` (row name), registry ``method``, ``params``
    (λ is added as ``scale``), and whether λ is searched."""

    label: str
    method: str
    params: dict = field(default_factory=dict)
    searched: bool = True

    @property
    def key(self) -> dict:
        rev = METHOD_REVISION.get(self.method)
        return {"method": self.method, "params": self.params, **({"revision": rev} if rev else {})}


def default_entries(methods: Sequence[str], setting: str, method_params: Mapping[str, Mapping] | None = None
                    ) -> list[MergeEntry]:
    """:class:`MergeEntry` per registry method: OptMerge gets the preset of ``setting``
    (``full``/``lora``/``modality``), WUDI and OptMerge our scale-aware step
    (:func:`scale_aware_params`; ``method_params`` overrides it, e.g. ``{"lr_scale": "absolute",
    "lr": 1e-5}`` for the paper's), Weight Average is not searched."""
    from ..merging import get_method

    out = []
    for m in methods:
        spec = get_method(m)
        params = dict((method_params or {}).get(m, {}))
        if m == "optmerge":
            params.setdefault("preset", OPTMERGE_PRESET_OF[setting])
        if "lr_scale" not in params:
            params = {**scale_aware_params(m, params.get("preset")), **params}
        spec.check_params(params)
        out.append(MergeEntry(method_label(m), m, params, searched=m not in NO_LAMBDA))
    return out


def _quiet(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with quiet_loading():
            return fn(*a, **kw)
    return wrapper


def _finish(rows: list[dict], attrs: Mapping, out: Path | None, filename: str) -> pd.DataFrame:
    """The rows as a frame whose ``attrs`` are ``attrs`` plus the evaluating libraries' ``versions``
    (:func:`workbench.world.scheduler.library_versions`; the zoo's own are in its ``zoo.json``),
    written to ``out / filename`` and its ``.json`` beside it."""
    attrs = {**attrs, "versions": library_versions()}
    df = pd.DataFrame(rows, columns=ROW_COLUMNS)
    df.attrs.update(attrs)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / filename, lambda p: df.to_csv(p, index=False))
        atomic_write(out / (Path(filename).stem + ".json"),
                     lambda p: p.write_text(json.dumps(dict(attrs), indent=2, default=str)))
    return df


def _context(z, device: str, cache: bool | str | Path, out, write: bool, scoring: str, progress: bool):
    from ..device import resolve_device

    dev = resolve_device(device)
    base_out = Path(out) if out is not None else default_out(z)
    if cache is True:
        cache_dir = base_out / "cache" / "experiments"
        search_cache = base_out / "cache" / "search"  # run_results' (out/cache/search): shared searches
    elif cache:
        cache_dir = Path(cache)
        search_cache = cache_dir / "search"
    else:
        cache_dir = search_cache = None
    ev = Evaluator(z, cache_dir, scoring, dev, progress=progress)
    ev.search_cache = search_cache
    ev.device_request = device  # what a Ray worker resolves for itself (workbench.studies.sweep)
    return ev, (base_out if write else None)


def _merge_grid(setting: _Setting, entries: Sequence[MergeEntry], lambdas: Sequence[float], ev: Evaluator,
                rescale: str, keep_defaults: bool, progress: bool, desc: str, executor: str = "local",
                ray_address: str | None = None, keep_merged: str | Path | None = None
                ) -> tuple[list[dict], list[dict], dict]:
    """Every entry x seed of ``setting`` as one cell each (:func:`workbench.studies.sweep.merge_grid`:
    executor ``local`` or ``ray``, finished cells stored in the cache and not recomputed).
    Returns ``(rows, timings, cell counts)``."""
    from .sweep import merge_grid

    if rescale not in ("interpolate", "remerge"):
        raise ValueError(f"rescale must be 'interpolate' or 'remerge', got {rescale!r}")
    return merge_grid(setting, entries, lambdas, ev, rescale=rescale, keep_defaults=keep_defaults, progress=progress,
                      desc=desc, executor=executor, address=ray_address, keep_merged=keep_merged)


# ============================================================================================ Tables 2 and 3
@_quiet
def capability_merging(zoo, variant: str = "full", methods: Sequence[str] = CAP_METHODS,
                       lambdas: Sequence[float] = LAMBDAS, seeds: Sequence[int] | None = None, device: str = "auto",
                       *, tasks: Sequence[str] | None = None, method_params: Mapping[str, Mapping] | None = None,
                       references: bool = True, scoring: str = "loglik", val_fraction: float = CAP_VAL_FRACTION,
                       split_seed: int = 0, rescale: str = "interpolate", keep_defaults: bool = True,
                       cache: bool | str | Path = True, out: str | Path | None = None, write: bool = False,
                       progress: bool = True, executor: str = "local", ray_address: str | None = None,
                       keep_merged: str | Path | None = None) -> pd.DataFrame:
    """Tables 2 (``variant="full"``) and 3 (``"lora"``) on the zoo's capability family.

    For each seed and method: the experts ``capability-<task>-<variant>-s<seed>`` merged by the
    engine (LLM linear weights only; ``keep_defaults=False`` merges every tensor), the merged LLM
    with the base VLM's tower, accuracy on each task's validation split for every λ in
    ``lambdas``, the λ with the best validation mean over tasks, and that λ on the test split.
    ``references`` adds the base VLM (``"Base"``), every expert on every task (``"Indiv. <Task>"``)
    and the mixture-training model (``capability-oracle-s<seed>``, the zoo's mixture training on every
    task; where a zoo lacks it ``attrs["skipped"]`` says so). ``tasks`` restricts both the merged experts and the
    tasks. Returns the tidy rows (module docstring); ``write=True`` also writes
    ``<out>/capability_<variant>.csv`` (``out`` default ``data/results/<preset>/``). ``attrs``:
    ``cache_hits``, ``cache_misses``, ``timings`` (merge seconds), ``notes``, ``skipped``, ``cells``
    (the merge cells: total, computed, stored).

    ``executor``: ``"local"`` (in this process) or ``"ray"`` (one Ray task per method x seed, on the
    cluster at ``ray_address``; :mod:`workbench.studies.sweep`); finished cells are stored in the cache and
    a re-run computes only the missing ones. ``keep_merged``: a folder to keep the merged
    checkpoints in (default: removed after evaluation).
    """
    z = Zoo.coerce(zoo)
    t0 = time.time()
    setting = capability_setting(z, variant, seeds, tasks, val_fraction, split_seed)
    ev, out_dir = _context(z, device, cache, out, write, scoring, progress)
    entries = default_entries(methods, variant, method_params)
    rows, timings, cells = _merge_grid(setting, entries, lambdas, ev, rescale, keep_defaults, progress,
                                       f"capability merging ({variant})", executor, ray_address, keep_merged)
    skipped = []
    if references:
        rows += _capability_references(ev, setting, variant, skipped)
    attrs = {"experiment": "capability_merging", "variant": variant, "preset": _preset(z), "zoo": repo_relative(z.path),
             "lambdas": list(lambdas), "scoring": scoring, "task_scoring": setting.task_scoring, "rescale": rescale,
             "keep_defaults": keep_defaults, "cache_hits": ev.hits, "cache_misses": ev.misses, "timings": timings,
             "notes": setting.notes,
             "skipped": skipped, "seconds": round(time.time() - t0, 1), "cells": cells,
             "selection": "lambda = argmax over lambdas of the mean validation accuracy over tasks (ties: smaller)"}
    return _finish(rows, attrs, out_dir, f"capability_{variant}.csv")


def _capability_references(ev: Evaluator, setting: _Setting, variant: str, skipped: list) -> list[dict]:
    z = setting.z
    rows = []
    for seed in setting.experts:
        rows += reference_rows(ev, setting, BASE_LABEL, "base", "base", seed,
                               {"model": "capability-base", "hash": setting.base_hash},
                               lambda seed=seed: setting.build(setting.load_base_llm(), seed))
        for name in setting.experts[seed]:
            task = z.info(name).get("task", name)
            rows += reference_rows(ev, setting, indiv_label(task), name, "indiv", seed,
                                   {"model": name, "hash": z.info(name).get("hash"), "base": setting.base_hash},
                                   lambda name=name: z.load_expert(name))
        oracle = f"capability-oracle-s{seed}"
        if oracle in z.manifest["models"]:
            rows += reference_rows(ev, setting, ORACLE_LABEL, oracle, "oracle", seed,
                                   {"model": oracle, "hash": z.info(oracle).get("hash")},
                                   lambda oracle=oracle: z.load_expert(oracle))
        else:
            skipped.append({"seed": seed, "row": ORACLE_LABEL,
                            "why": f"the zoo has no capability mixture-training model ({oracle})"})
    return rows


# ============================================================================================ Table 5
@_quiet
def modality_merging(zoo, methods: Sequence[str] = MODALITY_METHODS, lambdas: Sequence[float] = LAMBDAS,
                     seeds: Sequence[int] | None = None, device: str = "auto", *,
                     compositions: Sequence[str] = ("naive_mc", "damc"),
                     method_params: Mapping[str, Mapping] | None = None,
                     modalities: Sequence[str] | None = None, references: bool = True, scoring: str = "loglik",
                     max_items: int | None = None, rescale: str = "interpolate", keep_defaults: bool = True,
                     cache: bool | str | Path = True, out: str | Path | None = None, write: bool = False,
                     progress: bool = True, executor: str = "local", ray_address: str | None = None,
                     keep_merged: str | Path | None = None) -> pd.DataFrame:
    """Table 5 on the modality family: the full-FT modality experts' LLMs merged by every method
    (OptMerge preset ``modality``), each merged LLM composed with every expert's tower; λ chosen on
    MCUB-mini's validation split; tested on MCUB-mini 2/3/4 and each modality's own tasks.

    Beside them (``compositions``): NaiveMC (defined in :meth:`workbench.studies.composition.ZooComposer.build`),
    composed here from *all* the modality experts - the experts every merged row is built from, as
    Table 5 compares one model per method - and DAMC (λ searched by
    :class:`workbench.studies.composition.ZooComposer` on the same validation split), skipped with a note where
    the zoo lacks DAMC experts. ``references``: the frozen base LLM with every tower (``"Base"``),
    each expert's LLM with every tower (``"Indiv. <modality>"``: the paper's Vision/Audio/Video
    columns) and the jointly trained oracle (``"Mixture Training"``) where the zoo has one.
    ``executor``, ``ray_address``, ``keep_merged``: the merge cells' executor, as in
    :func:`capability_merging`, and the DAMC λ search's (the compositions and references run here).
    """
    from .composition import ZooComposer

    z = Zoo.coerce(zoo)
    t0 = time.time()
    setting = modality_setting(z, seeds, modalities, "full", max_items=max_items)
    ev, out_dir = _context(z, device, cache, out, write, scoring, progress)
    entries = default_entries(methods, "modality", method_params)
    rows, timings, cells = _merge_grid(setting, entries, lambdas, ev, rescale, keep_defaults, progress,
                                       "modality merging", executor, ray_address, keep_merged)
    skipped = []
    mods = setting.base_hash["mods"]
    for seed in setting.experts:
        # DAMC's λ search is cached beside run_results' (out/cache/search): the same composition on
        # the same validation split as notebooks 02-04, searched once
        comp = ZooComposer(z, seed, expert_kind="full", search=True, val_records=setting.val_sets["mcub-val"],
                           load_inputs=ev.load, search_cache=ev.search_cache, executor=executor,
                           ray_address=ray_address)
        for c in compositions:
            if comp.members(c, mods) is None:
                skipped.append({"seed": seed, "row": method_label(c), "why": "a member is missing from the zoo"})
                continue
            rows += reference_rows(ev, setting, method_label(c), c, "composition", seed,
                                   {"composition": comp.settings(c), "hashes": comp.model_hashes(c, mods),
                                    "mods": mods, "max_items": max_items},
                                   lambda c=c, comp=comp: comp.build(c, mods))
        if references:
            rows += reference_rows(ev, setting, BASE_LABEL, "frozen", "base", seed,
                                   {"model": "frozen", "hash": setting.base_hash,
                                    "experts": setting.expert_hashes(seed)},
                                   lambda seed=seed: setting.build(setting.load_base_llm(), seed))
            for name, m in zip(setting.experts[seed], mods):
                rows += reference_rows(ev, setting, f"Indiv. {m}", name, "indiv", seed,
                                       {"model": name, "towers": setting.expert_hashes(seed),
                                        "base": setting.base_hash},
                                       lambda name=name, seed=seed: setting.build(z.load_llm(name), seed))
            oracle = f"oracle-s{seed}"
            if oracle in z.manifest["models"] and set(mods) <= set(z.info(oracle).get("modalities", [])):
                rows += reference_rows(ev, setting, ORACLE_LABEL, oracle, "oracle", seed,
                                       {"model": oracle, "hash": z.info(oracle).get("hash"), "mods": mods,
                                        "max_items": max_items},
                                       lambda oracle=oracle: z.load_expert(oracle))
            else:
                skipped.append({"seed": seed, "row": ORACLE_LABEL, "why": f"no oracle {oracle} with {mods}"})
    attrs = {"experiment": "modality_merging", "preset": _preset(z), "zoo": repo_relative(z.path), "lambdas": list(lambdas),
             "scoring": scoring, "rescale": rescale, "keep_defaults": keep_defaults, "cache_hits": ev.hits,
             "cache_misses": ev.misses, "timings": timings, "notes": setting.notes, "skipped": skipped,
             "seconds": round(time.time() - t0, 1), "modalities": mods, "cells": cells,
             "selection": "lambda = argmax of MCUB-mini validation accuracy (ties: smaller)"}
    return _finish(rows, attrs, out_dir, "modality_merging.csv")


# ============================================================================================ Tables 4 and 8, solvers
def ablation_entries(setting: str = "lora") -> list[MergeEntry]:
    """Table 4's steps as registry parameters, for the OptMerge preset of ``setting``
    (``full`` -> ``full_ft``, ``lora``, ``modality``); P = that preset's SGD settings.

    1. ``WUDI``: ``wudi`` (Adam, lr 1e-5, 300 steps, init Σ τi);
    2. ``+SGD``: the WUDI objective (``optmerge`` with ``k_ratio = 1``: full rank, which is exactly
       WUDI's objective) with SGD (P's lr and momentum; for ``full``, whose preset uses Adam, the
       ``lora`` preset's SGD lr 1e-4, momentum 0.9), init Σ τi;
    3. ``+Initialization``: the same with init = mean of τi;
    4. ``+Low-rank``: OptMerge's rank-k truncation (P's k; k = floor(min(m,n)/N) unless P sets
       ``k_ratio``) - for ``lora``/``modality`` this is exactly the OptMerge preset.
    """
    from ..merging import OPTMERGE_PRESETS

    preset = OPTMERGE_PRESET_OF[setting]
    P = OPTMERGE_PRESETS[preset]
    sgd = P if P["optimizer"] == "sgd" else OPTMERGE_PRESETS["lora"]
    common = {"preset": preset, "steps": int(P["steps"])}
    sgd_params = {**common, "optimizer": "sgd", "lr": float(sgd["lr"]), "momentum": float(sgd["momentum"])}
    low_rank = {**sgd_params, "init": "mean"}
    if P["k_ratio"] is not None:
        low_rank["k_ratio"] = float(P["k_ratio"])
    return [
        MergeEntry("WUDI", "wudi", {"init": "sum", "lr": 1e-5, "steps": int(P["steps"])}),
        MergeEntry("+SGD", "optmerge", {**sgd_params, "k_ratio": 1.0, "init": "sum"}),
        MergeEntry("+Initialization", "optmerge", {**sgd_params, "k_ratio": 1.0, "init": "mean"}),
        MergeEntry("+Low-rank", "optmerge", low_rank),
    ]


def _family(zoo, family: str, seeds, tasks, max_items):
    if family in ("full", "lora"):
        return capability_setting(zoo, family, seeds, tasks), family
    if family == "modality":
        return modality_setting(zoo, seeds, max_items=max_items), "modality"
    raise ValueError(f"family must be 'full', 'lora' or 'modality', got {family!r}")


def _run_entries(zoo, family, entries, lambdas, seeds, device, tasks, max_items, scoring, rescale, cache, out,
                 write, progress, experiment, filename, extra_attrs=None, executor="local", ray_address=None
                 ) -> pd.DataFrame:
    z = Zoo.coerce(zoo)
    t0 = time.time()
    setting, _ = _family(z, family, seeds, tasks, max_items)
    ev, out_dir = _context(z, device, cache, out, write, scoring, progress)
    rows, timings, cells = _merge_grid(setting, entries, lambdas, ev, rescale, True, progress, experiment, executor,
                                       ray_address)
    attrs = {"experiment": experiment, "family": family, "preset": _preset(z), "lambdas": list(lambdas),
             "scoring": scoring, "task_scoring": setting.task_scoring, "cache_hits": ev.hits, "cache_misses": ev.misses,
             "timings": timings, "cells": cells, "entries": [e.__dict__ for e in entries],
             "seconds": round(time.time() - t0, 1), **(extra_attrs or {})}
    return _finish(rows, attrs, out_dir, filename)


@_quiet
def optmerge_ablation(zoo, family: str = "lora", lambdas: Sequence[float] = LAMBDAS,
                      seeds: Sequence[int] | None = None, device: str = "auto", *, tasks: Sequence[str] | None = None,
                      max_items: int | None = None, scoring: str = "loglik", rescale: str = "interpolate",
                      cache: bool | str | Path = True, out: str | Path | None = None, write: bool = False,
                      progress: bool = True, executor: str = "local", ray_address: str | None = None) -> pd.DataFrame:
    """Table 4: WUDI -> +SGD -> +Initialization -> +Low-rank (:func:`ablation_entries`) on the
    capability experts (``family="full"`` or ``"lora"``; the paper's column is Qwen2-VL LoRA) or
    the modality experts (``"modality"``; the paper's Vicuna-7B column). Same protocol and rows as
    :func:`capability_merging` (``method`` = the step)."""
    return _run_entries(zoo, family, ablation_entries(family), lambdas, seeds, device, tasks, max_items, scoring,
                        rescale, cache, out, write, progress, "optmerge_ablation", f"optmerge_ablation_{family}.csv",
                        executor=executor, ray_address=ray_address)


@_quiet
def rank_ratio_sweep(zoo, family: str = "full", k_ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
                     lambdas: Sequence[float] = LAMBDAS, seeds: Sequence[int] | None = None, device: str = "auto", *,
                     tasks: Sequence[str] | None = None, max_items: int | None = None, scoring: str = "loglik",
                     rescale: str = "interpolate", cache: bool | str | Path = True, out: str | Path | None = None,
                     write: bool = False, progress: bool = True, executor: str = "local",
                     ray_address: str | None = None) -> pd.DataFrame:
    """Table 8: OptMerge (preset of ``family``, our scale-aware step: :func:`scale_aware_params`)
    with ``k = floor(k_ratio * min(m, n))``; rows' ``method`` is ``"k=<ratio>"``."""
    preset = OPTMERGE_PRESET_OF[family]
    entries = [MergeEntry(f"k={r:g}", "optmerge", {"preset": preset, "k_ratio": float(r),
                                                   **scale_aware_params("optmerge", preset)}) for r in k_ratios]
    return _run_entries(zoo, family, entries, lambdas, seeds, device, tasks, max_items, scoring, rescale, cache, out,
                        write, progress, "rank_ratio_sweep", f"rank_ratio_{family}.csv", executor=executor,
                        ray_address=ray_address)


def solver_inert(costs: pd.DataFrame, solver: str = "iterative") -> dict[str, str]:
    """``{method label: reason}`` for the iterative solves (``solver``: ``"iterative"``, the paper's
    settings, or ``"iterative, scale-aware"``) of ``costs`` (:func:`solver_comparison`) that
    reduced their objective by less than half of what the exact solve reaches, from the same start
    (:func:`workbench.statistics.optimiser_inert`), in any seed. Labels are the plain method names
    (``"OptMerge"``), as in the capability / modality tables that use the iterative solver."""
    from ..statistics import SOLVER_SHARE, optimiser_inert

    out: dict[str, str] = {}
    if "objective_start" not in costs.columns:
        return out
    ok = costs[costs["status"] == "ok"]
    for (mid, seed), g in ok.groupby(["method_id", "seed"]):
        by = g.set_index("solver")
        if not {solver, "exact"} <= set(by.index):
            continue
        it, ex = by.loc[solver], by.loc["exact"]
        if optimiser_inert(float(it["objective_start"]), float(it["objective"]), float(ex["objective"])):
            out[method_label(mid)] = (f"the {solver} solver reduced its objective {it['objective_start']:.3g} -> "
                                      f"{it['objective']:.3g}, < {SOLVER_SHARE:.0%} of the exact solve's reduction "
                                      f"(to {ex['objective']:.3g}; seed {seed})")
    return out


@_quiet
def solver_comparison(zoo, family: str = "full", methods: Sequence[str] = ("wudi", "optmerge"),
                      lambdas: Sequence[float] = LAMBDAS, seeds: Sequence[int] | None = None, device: str = "auto", *,
                      tasks: Sequence[str] | None = None, max_items: int | None = None, scoring: str = "loglik",
                      cache: bool | str | Path = True, out: str | Path | None = None, write: bool = False,
                      progress: bool = True, executor: str = "local", ray_address: str | None = None
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Iterative (the paper's settings), iterative (our scale-aware step, :func:`scale_aware_params`)
    and exact (the init-anchored closed-form minimiser) solve of WUDI / OptMerge.

    Returns ``(rows, costs)``: the usual rows (``method`` = ``"<Label> (<solver>)"``, solver
    ``iterative``, ``iterative, scale-aware`` or ``exact``) and one row per method x solver x seed
    with ``merge_seconds`` (an engine merge at scale 1, timed here, not cached) and, from that
    merge's report (:func:`workbench.merging.objective_report`, summed over the 2-D tensors),
    ``objective_start``, ``objective`` (at the end) and ``converged`` (the fraction of tensors
    whose gradient fell to ``CONVERGED_GRAD_RATIO`` of its start)."""
    from ..engine import merge_with_report

    preset = OPTMERGE_PRESET_OF[family]
    entries = []
    for m in methods:
        base_params = {"preset": preset} if m == "optmerge" else {}
        for solver, extra in (("iterative", {}), ("iterative, scale-aware", scale_aware_params(m, preset)),
                              ("exact", {})):
            p = {**base_params, "solver": solver.split(",")[0], **extra}
            entries.append(MergeEntry(f"{method_label(m)} ({solver})", m, p))
    rows = _run_entries(zoo, family, entries, lambdas, seeds, device, tasks, max_items, scoring, "interpolate",
                        cache, out, write, progress, "solver_comparison", f"solver_comparison_{family}.csv",
                        executor=executor, ray_address=ray_address)
    z = Zoo.coerce(zoo)
    setting, _ = _family(z, family, seeds, tasks, max_items)
    costs = []
    with tempfile.TemporaryDirectory(prefix="wb-solver-") as tmp:
        for seed in setting.experts:
            for e in entries:
                solver = e.label[e.label.rindex("(") + 1:-1]
                outp = Path(tmp) / f"{e.method}-{solver.replace(', ', '-')}-s{seed}"
                cfg = {"method": e.method, "base": setting.base_llm_path, "experts": setting.expert_paths[seed],
                       "output": outp, "params": {**e.params, "scale": 1.0}, "device": device, "seed": seed,
                       "copy_tokenizer": False}
                try:
                    t0 = time.perf_counter()
                    rep = merge_with_report(cfg, progress=False)
                    secs = time.perf_counter() - t0
                    facts = list(rep.objectives.values())
                    costs.append({"method": e.label, "method_id": e.method, "solver": solver, "seed": seed,
                                  "merge_seconds": secs,
                                  "objective_start": sum(f["objective_start"] for f in facts),
                                  "objective": sum(f["objective_end"] for f in facts),
                                  "converged": sum(f["converged"] for f in facts) / max(len(facts), 1),
                                  "status": "ok", "error": ""})
                except Exception as err:
                    costs.append({"method": e.label, "method_id": e.method, "solver": solver, "seed": seed,
                                  "merge_seconds": math.nan, "objective_start": math.nan, "objective": math.nan,
                                  "converged": math.nan, "status": "failed",
                                  "error": f"{type(err).__name__}: {err}"[:500]})
                finally:
                    shutil.rmtree(outp, ignore_errors=True)
    costs_df = pd.DataFrame(costs)
    if write:
        d = Path(out) if out is not None else default_out(z)
        costs_df.to_csv(d / f"solver_costs_{family}.csv", index=False)
    return rows, costs_df


__all__ = ["CAP_METHODS", "MODALITY_METHODS", "LAMBDAS", "MergeEntry", "ablation_entries",
           "capability_merging", "capability_setting", "default_entries", "modality_merging",
           "modality_setting", "optmerge_ablation", "rank_ratio_sweep", "scale_aware_params", "SCALE_AWARE_LR",
           "solver_comparison", "solver_inert"]
