"""The merging benchmark's experiments on the miniature zoo (Wei et al., "Unifying MLLM
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
- :func:`summarise` - the Table-2-shaped wide table (methods x tasks + Avg, with intervals);
  :func:`compare_published` - our table beside the paper's, with verdicts for its claims.

How a merged model is made (the benchmark's protocol, methods.md section 4):

* only the LLM's linear weights are merged, by :func:`workbench.engine.merge` with its default
  keep list (embeddings, ``lm_head``, norms, biases, towers and projectors stay the base's);
* the merged VLM is the merged LLM + the **base** VLM's tower (capability encoder + the base's
  projector). In the zoo's presets the capability experts do not train their projector
  (``train_projector: False``), so their projectors *are* the base's; where a preset trains them,
  the merged model still uses the base's (as the benchmark keeps the base's vision side) and
  ``df.attrs["notes"]`` says so;
* every method returns ``θ = θ0 + λ τ_m`` with ``τ_m`` independent of λ. The engine merges once
  with ``scale = 1`` into a temporary folder; the model for λ is ``θ0 + λ (θ_1 − θ0)`` on the
  merged tensors (``rescale="interpolate"``, the default: float32 rounding of order 1e-7 relative
  to the engine's own ``scale=λ``; ``rescale="remerge"`` runs the engine once per λ instead).
  Weight Average ignores λ and runs once (``lambda = 1``, ``searched = False``);
* temporary merged models live in a temporary folder that is deleted after evaluation; only the
  per-item predictions are kept, in a cache keyed by a hash of the inputs (the zoo's model hashes,
  method, parameters, λ, seed, records, scoring) and of the code that produced them
  (:func:`workbench.evaluate.code_digest`) under ``data/results/<preset>/cache/experiments/``;
* each method x seed is one *cell* (:mod:`workbench.sweep`): run in this process or as a Ray task
  (``executor="ray"``), its rows stored under ``cache/experiments/cells/`` as it finishes, so a
  re-run computes only the missing cells.

Selection is honest: for each method and seed the λ with the highest *mean over tasks* of the
validation accuracies is chosen (ties: the smaller λ), and only that λ is evaluated on the test
split. The capability tasks have one record file each; :func:`split_records` splits it into
validation and test halves by a seeded permutation (disjoint, deterministic). A method that fails
(an exception in the merge or evaluation) gets rows with ``status="failed"``, NaN accuracy and the
error message - never silently dropped.

Row schema of every experiment (one row per model x task x split x seed)::

    method (display name), method_id (registry name or label), kind (merge | base | indiv |
    oracle | composition), task, split (val | test), lambda, searched, selected, seed, n,
    n_correct, accuracy (%), ci_low, ci_high (95% Wilson, %), status, error, params (JSON),
    pred_file (the cached per-item predictions; empty without a cache; :func:`paired_tests`)

Intervals: per task, the Wilson interval of the item counts; for the average over tasks
(:func:`summarise`), with one seed the normal approximation ``Avg ± 1.96 sqrt(Σ_t p_t(1−p_t)/n_t)/T``
(tasks independent), with two or more seeds a Student-t interval over the seeds' averages.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .paths import repo_relative, resolve_repo_path

EXPERIMENTS_VERSION = "1"

#: The merge methods of the benchmark tables, in the paper's row order (Iso-CTS is extra).
CAP_METHODS: tuple[str, ...] = ("weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv",
                                "iso_c", "iso_cts", "wudi", "optmerge")
#: Table 5's merge methods (the paper's columns; Iso-CTS and the DARE variants are extra, opt-in).
MODALITY_METHODS: tuple[str, ...] = ("weight_average", "task_arithmetic", "ties", "tsv", "iso_c", "wudi",
                                     "optmerge")
LAMBDAS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)
#: Methods whose result does not depend on λ (run once).
NO_LAMBDA: frozenset = frozenset({"weight_average"})
#: Registry name -> the paper's row label.
DISPLAY: dict[str, str] = {
    "weight_average": "Weight Average", "task_arithmetic": "Task Arithmetic", "ties": "TIES",
    "dare_linear": "TA w/ DARE", "dare_ties": "TIES w/ DARE", "tsv": "TSV", "iso_c": "Iso-C", "iso_cts": "Iso-CTS",
    "wudi": "WUDI", "optmerge": "OptMerge", "naive_mc": "NaiveMC", "damc": "DAMC",
}
TASK_LABELS: dict[str, str] = {"vqa": "VQA", "geometry": "Geometry", "chart": "Chart", "ocr": "OCR",
                               "grounding": "Grounding"}
#: OptMerge's preset for each setting.
OPTMERGE_PRESET_OF: dict[str, str] = {"full": "full_ft", "lora": "lora", "modality": "modality"}
#: Ours, not the paper's: the iterative WUDI / OptMerge solver's relative step per optimiser
#: (``lr_scale="relative"``, :func:`workbench.methods.wudi`): Adam 0.1 x the task vectors' RMS,
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
    from .methods import OPTMERGE_PRESETS

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
def _zoo(zoo):
    from .world import Zoo

    return Zoo.coerce(zoo)


def _preset(z) -> str:
    return str(z.manifest.get("preset", z.path.name))


def default_out(z) -> Path:
    """The results folder of the zoo's preset (:func:`workbench.paths.results_dir`:
    ``data/results/<preset>/`` unless ``WORKBENCH_RESULTS_DIR`` says otherwise)."""
    from .paths import results_dir

    return results_dir(_preset(z))


def method_label(method_id: str) -> str:
    return DISPLAY.get(method_id, method_id)


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _hash(obj: Any) -> str:
    return hashlib.sha256(_json({"v": EXPERIMENTS_VERSION, **obj}).encode()).hexdigest()[:20]


def records_digest(records: Sequence[Mapping]) -> str:
    """sha256 over the records' ids and gold answers (what a cached evaluation depends on)."""
    return hashlib.sha256(json.dumps([(r["id"], r["conversations"][1]["value"]) for r in records])
                          .encode()).hexdigest()[:16]


def wilson(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson interval of ``k / n`` in percent (NaN, NaN for ``n = 0``)."""
    from .evaluate import wilson_interval

    if n <= 0:
        return math.nan, math.nan
    lo, hi = wilson_interval(int(k), int(n), conf)
    return 100.0 * lo, 100.0 * hi


def _wilson_p(p: float, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson interval (percent) of a proportion ``p`` observed on ``n`` items (``p n`` need not be whole)."""
    from scipy import stats

    zz = float(stats.norm.ppf(0.5 + conf / 2))
    den = 1 + zz * zz / n
    centre = (p + zz * zz / (2 * n)) / den
    half = zz * math.sqrt(p * (1 - p) / n + zz * zz / (4 * n * n)) / den
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


@contextlib.contextmanager
def _quiet_loading():
    """Silence transformers' per-load progress bars for the many small loads (restored after)."""
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def split_records(records: Sequence[Mapping], val_fraction: float = 0.5, seed: int = 0
                  ) -> tuple[list[dict], list[dict]]:
    """Split one task's records into ``(val, test)``: a permutation seeded by ``seed`` of the
    records sorted by id; the first ``round(val_fraction * n)`` are validation. Disjoint, covering,
    independent of the input order."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    recs = sorted((dict(r) for r in records), key=lambda r: r["id"])
    perm = np.random.default_rng([int(seed), 4242]).permutation(len(recs))
    n_val = int(round(val_fraction * len(recs)))
    val = [recs[i] for i in sorted(perm[:n_val])]
    test = [recs[i] for i in sorted(perm[n_val:])]
    return val, test


def choose_lambda(val_rows: pd.DataFrame) -> float:
    """The λ with the highest mean validation accuracy over tasks (ties: the smallest λ).

    ``val_rows``: rows of one method and seed on the validation split (``lambda``, ``task``,
    ``accuracy``). Raises ``ValueError`` if no λ has a finite mean.
    """
    means = val_rows.groupby("lambda")["accuracy"].mean().dropna()
    if means.empty:
        raise ValueError("no validation accuracy to choose lambda from")
    best = means.max()
    return float(min(l for l, v in means.items() if v == best))


# ============================================================================================ evaluation
class _Evaluator:
    """Evaluates models on record sets, with a prediction cache and an in-memory input cache."""

    def __init__(self, z, cache_dir: Path | None, scoring: str, device: torch.device, batch_size: int = 32,
                 progress: bool = False) -> None:
        self.z, self.cache_dir, self.scoring, self.device = z, cache_dir, scoring, device
        self.batch_size = batch_size
        self.search_cache: Path | None = None  # where ZooComposer keeps searches (set by _context)
        self._inputs: dict[str, dict] = {}
        self.hits = 0
        self.misses = 0

    def load(self, rec: Mapping) -> dict:
        rid = rec["id"]
        if rid not in self._inputs:
            self._inputs[rid] = self.z.load_inputs(rec)
        return self._inputs[rid]

    def _file(self, model_key: str, records: Sequence[Mapping]) -> Path | None:
        if self.cache_dir is None:
            return None
        from .evaluate import code_digest, scorer_key

        # the log-likelihood scorer also picks DAMC's λ (loglik search), whatever the scoring here; the
        # code digest (compose, methods, engine, evaluate, the model's scorer) retires predictions of old code
        key = _hash({"model": model_key, "records": records_digest(records), "scoring": self.scoring,
                     "code": code_digest(), **scorer_key()})
        return self.cache_dir / f"{key}.csv"

    def cached(self, model_key: str, records: Sequence[Mapping]) -> pd.DataFrame | None:
        f = self._file(model_key, records)
        if f is not None and f.is_file():
            df = pd.read_csv(f, dtype={"id": str, "gold": str, "pred": str}, keep_default_na=False, na_values=[])
            df["correct"] = df["correct"].astype(str).str.lower().isin(["true", "1"])
            return df
        return None

    def evaluate(self, model_key: str, records: Sequence[Mapping], model_fn: Callable[[], Any]) -> pd.DataFrame:
        """Per-item predictions of the model ``model_fn()`` (called only on a cache miss)."""
        from .evaluate import predict

        hit = self.cached(model_key, records)
        if hit is not None:
            self.hits += 1
            hit.attrs["file"] = str(self._file(model_key, records))
            return hit
        self.misses += 1
        model = model_fn()
        with torch.no_grad():
            df = predict(model, list(records), self.load, scoring=self.scoring, batch_size=self.batch_size)
        f = self._file(model_key, records)
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".tmp{id(df)}")
            df.to_csv(tmp, index=False)
            tmp.replace(f)
            df.attrs["file"] = str(f)
        return df


def _row(method: str, method_id: str, kind: str, task: str, split: str, lam: float, seed: int,
         pred: pd.DataFrame | None, *, searched: bool = False, selected: bool = False, status: str = "ok",
         error: str = "", params: Mapping | None = None) -> dict:
    if pred is not None and len(pred):
        n, k = len(pred), int(pred["correct"].sum())
        acc = 100.0 * k / n
        lo, hi = wilson(k, n)
    else:
        n, k, acc, lo, hi = 0, 0, math.nan, math.nan, math.nan
    return {"method": method, "method_id": method_id, "kind": kind, "task": task, "split": split,
            "lambda": float(lam) if lam is not None else math.nan, "searched": bool(searched),
            "selected": bool(selected), "seed": int(seed), "n": n, "n_correct": k, "accuracy": acc,
            "ci_low": lo, "ci_high": hi, "status": status, "error": error, "params": _json(dict(params or {})),
            "pred_file": (repo_relative(pred.attrs["file"]) if pred is not None and pred.attrs.get("file") else "")}


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

    def expert_hashes(self, seed: int) -> dict:
        models = self.z.manifest["models"]
        return {n: models[n].get("hash") for n in self.experts[seed]}


def _base_hash(z) -> str | None:
    return z.manifest.get("jobs", {}).get("base", {}).get("hash")


def capability_setting(zoo, variant: str = "full", seeds: Sequence[int] | None = None,
                       tasks: Sequence[str] | None = None, val_fraction: float = 0.5, split_seed: int = 0
                       ) -> _Setting:
    """The capability family of ``zoo`` as a merge setting (experts ``capability-<task>-<variant>-s<seed>``)."""
    from .compose import CachedTokenizer, CachedTower
    from .mllm import MultimodalLM
    from .world import PLACEHOLDERS

    z = _zoo(zoo)
    if variant not in ("full", "lora"):
        raise ValueError(f"variant must be 'full' or 'lora', got {variant!r}")
    cap = z.manifest["config"].get("capability", {})
    all_tasks = list(cap.get("tasks", []))
    tasks = list(tasks) if tasks is not None else all_tasks
    unknown = [t for t in tasks if t not in all_tasks]
    if unknown:
        raise ValueError(f"tasks {unknown} are not capability tasks of this zoo ({all_tasks})")
    seeds = list(seeds) if seeds is not None else list(cap.get("seeds", [0]))
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

    bh = {"base": _base_hash(z), "capability-base": z.info("capability-base").get("hash"),
          "split": [val_fraction, split_seed]}
    setting = _Setting(z, f"capability-{variant}", experts, paths, val, test, build, bh, notes)
    setting.recipe = ("capability_setting", {"zoo": str(z.path), "variant": variant, "seeds": seeds, "tasks": tasks,
                                             "val_fraction": val_fraction, "split_seed": split_seed})
    return setting


def modality_setting(zoo, seeds: Sequence[int] | None = None, modalities: Sequence[str] | None = None,
                     kind: str = "full", benchmarks: Sequence[str] = ("mcub-2", "mcub-3", "mcub-4"),
                     own_tasks: bool = True, max_items: int | None = None) -> _Setting:
    """The modality family as a merge setting: experts ``<m>-<kind>-s<seed>``; every merged LLM gets
    every expert's tower. Validation: ``mcub/val.json``; test: MCUB-mini 2/3/4 and ``own:<m>``."""
    from . import compose as C

    z = _zoo(zoo)
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
        val = {"mcub-val": head(z.mcub("val"))}
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
                       {"base": _base_hash(z), "mods": mods, "max_items": max_items},
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
    from .methods import get_method

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


class _MergedLLM:
    """A merge of one entry and seed, made lazily (only when an evaluation misses the cache)."""

    def __init__(self, setting: _Setting, entry: MergeEntry, seed: int, device: torch.device, workdir: Path,
                 rescale: str, keep_defaults: bool, progress: bool, keep_merged: bool = False) -> None:
        self.setting, self.entry, self.seed, self.device = setting, entry, seed, device
        self.workdir, self.rescale, self.keep_defaults, self.progress = workdir, rescale, keep_defaults, progress
        self.keep_merged = keep_merged  # leave the merged checkpoints in workdir (else removed once loaded)
        self._theta1: dict[str, torch.Tensor] | None = None
        self._merged_names: list[str] = []
        self.seconds: float | None = None
        self.folder: Path | None = None

    def _merge(self, scale: float) -> Path:
        from .engine import merge_with_report

        z = self.setting.z
        out = self.workdir / f"merge-{_hash({'e': self.entry.key, 's': self.seed, 'scale': scale})}"
        shutil.rmtree(out, ignore_errors=True)
        params = {**self.entry.params, "scale": float(scale)}
        cfg = {"method": self.entry.method, "base": z.base_path, "experts": self.setting.expert_paths[self.seed],
               "output": out, "params": params, "device": str(self.device), "seed": int(self.seed),
               "keep_defaults": self.keep_defaults, "copy_tokenizer": False}
        t0 = time.perf_counter()
        rep = merge_with_report(cfg, progress=self.progress)
        self.seconds = time.perf_counter() - t0
        self._merged_names = list(rep.merged)
        return out

    def llm(self, lam: float):
        """The merged LLM at λ (a fresh module). λ = 1 (and every λ of an unsearched method) is the
        engine's output itself, bit for bit; other λ interpolate (``rescale="interpolate"``) or
        re-run the engine with ``scale = λ`` (``"remerge"``)."""
        from .compose import load_causal_lm

        lam = float(lam) if self.entry.searched else 1.0
        if self.rescale == "remerge" and lam != 1.0:
            folder = self._merge(lam)
            try:
                return load_causal_lm(folder)
            finally:
                if not self.keep_merged:
                    shutil.rmtree(folder, ignore_errors=True)
        if self._theta1 is None:
            folder = self._merge(1.0)
            try:
                llm1 = load_causal_lm(folder)
            finally:
                if not self.keep_merged:
                    shutil.rmtree(folder, ignore_errors=True)
            sd = llm1.state_dict()
            missing = [n for n in self._merged_names if n not in sd]
            if missing:
                raise KeyError(f"merged tensors {missing[:3]} are not parameters of the loaded LLM")
            self._theta1 = {n: sd[n].detach().clone() for n in self._merged_names}
        llm = _base_llm_copy(self.setting)
        with torch.no_grad():
            sd = llm.state_dict()
            for n, t1 in self._theta1.items():
                target = sd[n]
                if lam == 1.0:
                    target.copy_(t1)
                else:
                    t0 = target.detach().float()
                    target.copy_((t0 + lam * (t1.float() - t0)).to(target.dtype))
        return llm


def _base_llm_copy(setting: _Setting):
    """A fresh copy of the base LLM (read from disk once per setting, then deep-copied: the same
    weights as ``z.load_base_llm()``, without re-reading the checkpoint for every λ)."""
    import copy

    base = setting.__dict__.get("_base_llm")
    if base is None:
        base = setting.__dict__["_base_llm"] = setting.z.load_base_llm()
    return copy.deepcopy(base)


def _model_key(setting: _Setting, seed: int, what: Mapping) -> str:
    return _hash({"setting": setting.name, "base": setting.base_hash, "experts": setting.expert_hashes(seed),
                  "seed": seed, **what})


def _eval_sets(ev: _Evaluator, setting: _Setting, key: str, sets: Mapping[str, list], model_fn
               ) -> dict[str, pd.DataFrame]:
    holder: dict = {}

    def get():
        if "m" not in holder:
            holder["m"] = model_fn().to(ev.device).eval()
        return holder["m"]

    return {t: ev.evaluate(key, recs, get) for t, recs in sets.items()}


def _run_entry(ev: _Evaluator, setting: _Setting, entry: MergeEntry, seed: int, lambdas: Sequence[float],
               workdir: Path, rescale: str, keep_defaults: bool, progress: bool, timings: list,
               keep_merged: bool = False) -> list[dict]:
    """Validation over λ, choice, test at the chosen λ; rows (failed rows on an exception)."""
    rows: list[dict] = []
    lams = list(lambdas) if entry.searched else [1.0]
    mm = _MergedLLM(setting, entry, seed, ev.device, workdir, rescale, keep_defaults, progress, keep_merged)
    merge_key = {"entry": entry.key, "keep_defaults": keep_defaults, "rescale": rescale}
    try:
        val_rows = []
        for lam in lams:
            key = _model_key(setting, seed, {**merge_key, "lambda": float(lam)})
            preds = _eval_sets(ev, setting, key, setting.val_sets,
                               lambda lam=lam: setting.build(mm.llm(lam), seed))
            for t, p in preds.items():
                val_rows.append(_row(entry.label, entry.method, "merge", t, "val", lam, seed, p,
                                     searched=entry.searched, params=entry.params))
        chosen = choose_lambda(pd.DataFrame(val_rows))
        for r in val_rows:
            r["selected"] = r["lambda"] == chosen
        rows.extend(val_rows)
        key = _model_key(setting, seed, {**merge_key, "lambda": float(chosen)})
        preds = _eval_sets(ev, setting, key, setting.test_sets, lambda: setting.build(mm.llm(chosen), seed))
        for t, p in preds.items():
            rows.append(_row(entry.label, entry.method, "merge", t, "test", chosen, seed, p,
                             searched=entry.searched, selected=True, params=entry.params))
        if mm.seconds is not None:
            timings.append({"method": entry.label, "seed": seed, "merge_seconds": mm.seconds})
    except Exception as err:  # a failing method is reported, not hidden
        msg = f"{type(err).__name__}: {err}"
        done = {(r["task"], r["split"]) for r in rows}
        for split, sets in (("val", setting.val_sets), ("test", setting.test_sets)):
            for t in sets:
                if (t, split) not in done:
                    rows.append(_row(entry.label, entry.method, "merge", t, split, math.nan, seed, None,
                                     searched=entry.searched, selected=split == "test", status="failed",
                                     error=msg[:500], params=entry.params))
        for r in rows:
            r["status"], r["error"] = "failed", msg[:500]
    return rows


def _reference_rows(ev: _Evaluator, setting: _Setting, label: str, method_id: str, kind: str, seed: int,
                    key_parts: Mapping, model_fn) -> list[dict]:
    """Rows of a fixed model (no λ) on validation and test."""
    rows = []
    key = _hash({"setting": setting.name, "ref": dict(key_parts)})
    for split, sets in (("val", setting.val_sets), ("test", setting.test_sets)):
        try:
            preds = _eval_sets(ev, setting, key, sets, model_fn)
            rows += [_row(label, method_id, kind, t, split, math.nan, seed, p, selected=True)
                     for t, p in preds.items()]
        except Exception as err:
            msg = f"{type(err).__name__}: {err}"[:500]
            rows += [_row(label, method_id, kind, t, split, math.nan, seed, None, selected=True, status="failed",
                          error=msg)
                     for t in sets]
    return rows


def _quiet(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with _quiet_loading():
            return fn(*a, **kw)
    return wrapper


def _finish(rows: list[dict], attrs: Mapping, out: Path | None, filename: str) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=ROW_COLUMNS)
    df.attrs.update(attrs)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (filename + ".tmp")
        df.to_csv(tmp, index=False)
        tmp.replace(out / filename)
        (out / (Path(filename).stem + ".json")).write_text(json.dumps(dict(attrs), indent=2, default=str))
    return df


def _context(z, device: str, cache: bool | str | Path, out, write: bool, scoring: str, progress: bool):
    from .device import resolve_device

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
    ev = _Evaluator(z, cache_dir, scoring, dev, progress=progress)
    ev.search_cache = search_cache
    ev.device_request = device  # what a Ray worker resolves for itself (workbench.sweep)
    return ev, (base_out if write else None)


def _merge_grid(setting: _Setting, entries: Sequence[MergeEntry], lambdas: Sequence[float], ev: _Evaluator,
                rescale: str, keep_defaults: bool, progress: bool, desc: str, executor: str = "local",
                ray_address: str | None = None, keep_merged: str | Path | None = None
                ) -> tuple[list[dict], list[dict], dict]:
    """Every entry x seed of ``setting`` as one cell each (:func:`workbench.sweep.merge_grid`:
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
                       references: bool = True, scoring: str = "loglik", val_fraction: float = 0.5,
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
    and the mixture-training model if the zoo has one (``capability-oracle-s<seed>``; the presets
    have none - ``attrs["skipped"]`` says so). ``tasks`` restricts both the merged experts and the
    tasks. Returns the tidy rows (module docstring); ``write=True`` also writes
    ``<out>/capability_<variant>.csv`` (``out`` default ``data/results/<preset>/``). ``attrs``:
    ``cache_hits``, ``cache_misses``, ``timings`` (merge seconds), ``notes``, ``skipped``, ``cells``
    (the merge cells: total, computed, stored).

    ``executor``: ``"local"`` (in this process) or ``"ray"`` (one Ray task per method x seed, on the
    cluster at ``ray_address``; :mod:`workbench.sweep`); finished cells are stored in the cache and
    a re-run computes only the missing ones. ``keep_merged``: a folder to keep the merged
    checkpoints in (default: removed after evaluation).
    """
    z = _zoo(zoo)
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
             "lambdas": list(lambdas), "scoring": scoring, "rescale": rescale, "keep_defaults": keep_defaults,
             "cache_hits": ev.hits, "cache_misses": ev.misses, "timings": timings, "notes": setting.notes,
             "skipped": skipped, "seconds": round(time.time() - t0, 1), "cells": cells,
             "selection": "lambda = argmax over lambdas of the mean validation accuracy over tasks (ties: smaller)"}
    return _finish(rows, attrs, out_dir, f"capability_{variant}.csv")


def _capability_references(ev: _Evaluator, setting: _Setting, variant: str, skipped: list) -> list[dict]:
    z = setting.z
    rows = []
    for seed in setting.experts:
        rows += _reference_rows(ev, setting, BASE_LABEL, "base", "base", seed,
                                {"model": "capability-base", "hash": setting.base_hash},
                                lambda seed=seed: setting.build(z.load_base_llm(), seed))
        for name in setting.experts[seed]:
            task = z.info(name).get("task", name)
            rows += _reference_rows(ev, setting, f"Indiv. {TASK_LABELS.get(task, task)}", name, "indiv", seed,
                                    {"model": name, "hash": z.info(name).get("hash"), "base": setting.base_hash},
                                    lambda name=name: z.load_expert(name))
        oracle = f"capability-oracle-s{seed}"
        if oracle in z.manifest["models"]:
            rows += _reference_rows(ev, setting, ORACLE_LABEL, oracle, "oracle", seed,
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

    Beside them (``compositions``): NaiveMC (defined in :meth:`workbench.results.ZooComposer.build`),
    composed here from *all* the modality experts - the experts every merged row is built from, as
    Table 5 compares one model per method - and DAMC (λ searched by
    :class:`workbench.results.ZooComposer` on the same validation split), skipped with a note where
    the zoo lacks DAMC experts. ``references``: the frozen base LLM with every tower (``"Base"``),
    each expert's LLM with every tower (``"Indiv. <modality>"``: the paper's Vision/Audio/Video
    columns) and the jointly trained oracle (``"Mixture Training"``) where the zoo has one.
    ``executor``, ``ray_address``, ``keep_merged``: the merge cells' executor, as in
    :func:`capability_merging` (the compositions and references run here).
    """
    from .results import ZooComposer

    z = _zoo(zoo)
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
                           load_inputs=ev.load, search_cache=ev.search_cache)
        for c in compositions:
            if comp.members(c, mods) is None:
                skipped.append({"seed": seed, "row": method_label(c), "why": "a member is missing from the zoo"})
                continue
            rows += _reference_rows(ev, setting, method_label(c), c, "composition", seed,
                                    {"composition": comp.settings(c), "hashes": comp.model_hashes(c, mods),
                                     "mods": mods, "max_items": max_items},
                                    lambda c=c, comp=comp: comp.build(c, mods))
        if references:
            rows += _reference_rows(ev, setting, BASE_LABEL, "frozen", "base", seed,
                                    {"model": "frozen", "hash": setting.base_hash,
                                     "experts": setting.expert_hashes(seed)},
                                    lambda seed=seed: setting.build(z.load_base_llm(), seed))
            for name, m in zip(setting.experts[seed], mods):
                rows += _reference_rows(ev, setting, f"Indiv. {m}", name, "indiv", seed,
                                        {"model": name, "towers": setting.expert_hashes(seed),
                                         "base": setting.base_hash},
                                        lambda name=name, seed=seed: setting.build(z.load_llm(name), seed))
            oracle = f"oracle-s{seed}"
            if oracle in z.manifest["models"] and set(mods) <= set(z.info(oracle).get("modalities", [])):
                rows += _reference_rows(ev, setting, ORACLE_LABEL, oracle, "oracle", seed,
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
    from .methods import OPTMERGE_PRESETS

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
    z = _zoo(zoo)
    t0 = time.time()
    setting, _ = _family(z, family, seeds, tasks, max_items)
    ev, out_dir = _context(z, device, cache, out, write, scoring, progress)
    rows, timings, cells = _merge_grid(setting, entries, lambdas, ev, rescale, True, progress, experiment, executor,
                                       ray_address)
    attrs = {"experiment": experiment, "family": family, "preset": _preset(z), "lambdas": list(lambdas),
             "scoring": scoring, "cache_hits": ev.hits, "cache_misses": ev.misses, "timings": timings, "cells": cells,
             "entries": [e.__dict__ for e in entries], "seconds": round(time.time() - t0, 1), **(extra_attrs or {})}
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
    from .statistics import SOLVER_SHARE, optimiser_inert

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
    merge's report (:func:`workbench.methods.objective_report`, summed over the 2-D tensors),
    ``objective_start``, ``objective`` (at the end) and ``converged`` (the fraction of tensors
    whose gradient fell to ``CONVERGED_GRAD_RATIO`` of its start)."""
    from .engine import merge_with_report

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
    z = _zoo(zoo)
    setting, _ = _family(z, family, seeds, tasks, max_items)
    costs = []
    with tempfile.TemporaryDirectory(prefix="wb-solver-") as tmp:
        for seed in setting.experts:
            for e in entries:
                solver = e.label[e.label.rindex("(") + 1:-1]
                outp = Path(tmp) / f"{e.method}-{solver.replace(', ', '-')}-s{seed}"
                cfg = {"method": e.method, "base": z.base_path, "experts": setting.expert_paths[seed],
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


# ============================================================================================ tables
def _avg_interval(accs: Sequence[float], ns: Sequence[int], z: float = 1.959963984540054) -> tuple[float, float, float]:
    a = np.asarray(accs, float) / 100.0
    n = np.asarray(ns, float)
    if len(a) == 0 or np.any(n <= 0) or np.any(np.isnan(a)):
        return math.nan, math.nan, math.nan
    if len(a) == 1:  # one task: its own Wilson interval
        lo, hi = _wilson_p(float(a[0]), int(n[0]))
        return 100 * float(a[0]), lo, hi
    mean = float(a.mean())
    half = z * math.sqrt(float(np.sum(a * (1 - a) / n))) / len(a)
    return 100 * mean, 100 * max(0.0, mean - half), 100 * min(1.0, mean + half)


def summary_long(df: pd.DataFrame, split: str = "test", add_indiv: bool = True,
                 tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per method x benchmark (each task and ``"Avg"``) on ``split``, at the selected λ:
    ``method, kind, benchmark, mean, ci_low, ci_high, n_seeds, lambda, status``.

    Per task: one seed -> the Wilson interval; several -> a Student-t interval over seeds. ``Avg``
    (mean over tasks): one seed -> normal approximation of the per-task binomial variances;
    several -> Student-t over the seeds' averages. ``add_indiv`` adds ``"Indiv. (mean)"`` (per
    task, the mean over the Indiv. rows) and ``"Indiv. (own task)"`` (per task, that task's own
    expert; capability rows only) with intervals formed the same way from their counts.
    ``tasks`` restricts the benchmarks (and so the ``Avg``), e.g. Table 5's multi-modality ones.
    """
    from .published import summarise as t_summary

    d = df[(df["split"] == split) & (df["selected"].astype(bool))].copy()
    all_tasks = list(dict.fromkeys(df.loc[df["split"] == split, "task"]))
    tasks = all_tasks if tasks is None else [t for t in all_tasks if t in set(tasks)]
    d = d[d["task"].isin(tasks)]
    out = []
    for (method, kind), g in d.groupby(["method", "kind"], sort=False):
        failed = (g["status"] != "ok").any()
        seeds = sorted(g["seed"].unique())
        lam = g["lambda"].dropna().unique()
        lam_s = ",".join(f"{x:g}" for x in sorted(lam)) if len(lam) else ""
        for t in tasks:
            gt = g[g["task"] == t]
            if gt.empty:
                continue
            if len(seeds) >= 2:
                s = t_summary(gt, ["task"], value="accuracy").iloc[0]
                mean, lo, hi = s["mean"], s["ci_low"], s["ci_high"]
            else:
                k, n = int(gt["n_correct"].sum()), int(gt["n"].sum())
                mean = 100.0 * k / n if n and not failed else math.nan
                lo, hi = wilson(k, n) if n and not failed else (math.nan, math.nan)
            out.append({"method": method, "kind": kind, "benchmark": t, "mean": mean, "ci_low": lo, "ci_high": hi,
                        "n_seeds": len(seeds), "lambda": lam_s, "status": "failed" if failed else "ok"})
        per_seed = []
        for s, gs in g.groupby("seed"):
            gs = gs.set_index("task").reindex(tasks)
            per_seed.append(_avg_interval(gs["accuracy"].tolist(), gs["n"].fillna(0).astype(int).tolist()))
        if len(per_seed) >= 2:
            vals = pd.DataFrame({"accuracy": [p[0] for p in per_seed], "k": 0})
            s = t_summary(vals, ["k"], value="accuracy").iloc[0]
            avg = (s["mean"], s["ci_low"], s["ci_high"])
        else:
            avg = per_seed[0] if per_seed else (math.nan,) * 3
        out.append({"method": method, "kind": kind, "benchmark": "Avg", "mean": avg[0], "ci_low": avg[1],
                    "ci_high": avg[2], "n_seeds": len(seeds), "lambda": lam_s, "status": "failed" if failed else "ok"})
    res = pd.DataFrame(out, columns=["method", "kind", "benchmark", "mean", "ci_low", "ci_high", "n_seeds", "lambda",
                                     "status"])
    if add_indiv:
        res = pd.concat([res, _indiv_rows(d, tasks)], ignore_index=True)
    return res


def _indiv_rows(d: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    ind = d[(d["kind"] == "indiv") & (d["status"] == "ok")]
    if ind.empty:
        return pd.DataFrame()
    rows = []
    own_label = {f"Indiv. {TASK_LABELS.get(t, t)}": t for t in tasks}
    for label, pick in ((INDIV_MEAN, None), (INDIV_OWN, "own")):
        accs, ns = [], []
        for t in tasks:
            gt = ind[ind["task"] == t]
            if pick == "own":
                gt = gt[gt["method"].map(own_label) == t]
                if gt.empty:
                    break
            k, n = int(gt["n_correct"].sum()), int(gt["n"].sum())
            if n == 0:
                continue
            p = k / n
            # mean over experts of the same items: its variance is bounded by that of one expert's
            n_eff = int(gt["n"].iloc[0]) * gt["seed"].nunique()
            lo, hi = _wilson_p(p, n_eff)
            rows.append({"method": label, "kind": "indiv", "benchmark": t, "mean": 100 * p, "ci_low": lo,
                         "ci_high": hi, "n_seeds": gt["seed"].nunique(), "lambda": "", "status": "ok"})
            accs.append(100 * p)
            ns.append(n_eff)
        else:
            if accs:
                m, lo, hi = _avg_interval(accs, ns)
                rows.append({"method": label, "kind": "indiv", "benchmark": "Avg", "mean": m, "ci_low": lo,
                             "ci_high": hi, "n_seeds": int(ind["seed"].nunique()), "lambda": "", "status": "ok"})
            continue
        rows = [r for r in rows if r["method"] != label]  # own-task row incomplete: drop it
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame, split: str = "test", fmt: bool = False, digits: int = 1,
              tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """The Table-2-shaped wide table: one row per model (references first, then merge methods in
    the order run), one column per task and ``Avg`` (mean accuracy, %), plus ``lambda`` (the
    selected λ). ``fmt=True`` gives strings ``"57.4 [52.1, 62.3]"`` (95% intervals, see
    :func:`summary_long`); a failed method shows ``"failed"``. ``tasks``: the benchmarks to show
    and average (default all)."""
    long = summary_long(df, split, tasks=tasks)
    if long.empty:
        return pd.DataFrame()
    order = list(dict.fromkeys(long["method"]))
    kinds = dict(zip(long["method"], long["kind"]))
    rank = {"base": 0, "indiv": 1, "oracle": 2, "composition": 3, "merge": 4}
    order.sort(key=lambda m: rank.get(kinds[m], 5))
    bench = [b for b in dict.fromkeys(long["benchmark"]) if b != "Avg"] + ["Avg"]

    def cell(r):
        if r["status"] != "ok":
            return "failed"
        if not fmt:
            return r["mean"]
        if pd.isna(r["mean"]):
            return ""
        if pd.isna(r["ci_low"]):
            return f"{r['mean']:.{digits}f}"
        return f"{r['mean']:.{digits}f} [{r['ci_low']:.{digits}f}, {r['ci_high']:.{digits}f}]"

    long = long.assign(cell=long.apply(cell, axis=1))
    wide = long.pivot(index="method", columns="benchmark", values="cell").reindex(index=order, columns=bench)
    lam = long.drop_duplicates("method").set_index("method")["lambda"].reindex(order)
    wide["lambda"] = lam
    wide.columns = [TASK_LABELS.get(c, c) for c in wide.columns]
    wide.index.name = "method"
    return wide


# ============================================================================================ paired tests
def item_predictions(df: pd.DataFrame, method: str, split: str = "test") -> pd.DataFrame:
    """Per-item predictions of ``method``'s reported rows (``selected``) on ``split``, read from the
    rows' ``pred_file`` (columns of :func:`workbench.evaluate.predict` plus ``task_set``, ``seed``)."""
    d = df[(df["method"] == method) & (df["split"] == split) & df["selected"].astype(bool) & (df["status"] == "ok")]
    frames = []
    for r in d.itertuples():
        pred_file = resolve_repo_path(r.pred_file) if r.pred_file else None
        if pred_file is None or not pred_file.is_file():
            raise FileNotFoundError(f"no cached predictions for {method} / {r.task} / seed {r.seed} "
                                    f"(run with a cache): {r.pred_file!r}")
        p = pd.read_csv(pred_file, dtype={"id": str, "gold": str, "pred": str}, keep_default_na=False, na_values=[])
        p["correct"] = p["correct"].astype(str).str.lower().isin(["true", "1"])
        p["task_set"], p["seed"] = r.task, r.seed
        frames.append(p)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def paired_tests(df: pd.DataFrame, pairs: Sequence[tuple[str, str]], split: str = "test") -> pd.DataFrame:
    """Exact McNemar tests between two methods on the same items, per task and pooled over all
    tasks (``task = "All"``) and seeds: ``method_a, method_b, task, n, b (a right, b wrong), c,
    acc_a, acc_b, pvalue`` (two-sided). More sensitive than comparing two intervals, because the
    items are shared."""
    from .evaluate import mcnemar_exact

    rows = []
    for a, b in pairs:
        pa, pb = item_predictions(df, a, split), item_predictions(df, b, split)
        if pa.empty or pb.empty:
            continue
        j = pa.merge(pb, on=["id", "seed", "task_set"], suffixes=("_a", "_b"))
        for task, g in list(j.groupby("task_set", sort=False)) + [("All", j)]:
            t = mcnemar_exact(g["correct_a"].tolist(), g["correct_b"].tolist())
            rows.append({"method_a": a, "method_b": b, "task": task, "n": t["n"], "b": t["b"], "c": t["c"],
                         "acc_a": 100 * float(g["correct_a"].mean()), "acc_b": 100 * float(g["correct_b"].mean()),
                         "pvalue": t["pvalue"]})
    return pd.DataFrame(rows, columns=["method_a", "method_b", "task", "n", "b", "c", "acc_a", "acc_b", "pvalue"])


# ============================================================================================ published
#: The paper's base-model row name per published table.
PUBLISHED_BASE = {"optmerge_table2": "InternVL2.5-Instruct", "optmerge_table3": "Qwen2-VL-Base"}
MERGE_LABELS = tuple(DISPLAY[m] for m in CAP_METHODS)


def paper_claims(table: str = "optmerge_table2"):
    """Claims checked by :func:`compare_published` (``published.Claim`` objects): for Tables 2/3
    the headline claims of ``published.PAPER_CLAIMS`` (OptMerge > TA / WUDI / TIES, TIES and TA >
    Weight Average), merging beats the individual experts' mean and the base; for Table 5 DAMC >
    NaiveMC and OptMerge > NaiveMC / Weight Average."""
    from dataclasses import replace

    from .published import PAPER_CLAIMS, Claim

    if table in ("optmerge_table5", "table5"):
        claims = [replace(c, source="optmerge_table5") for c in PAPER_CLAIMS if c.source == "optmerge_table5"]
        claims += [Claim.better_than("OptMerge", "NaiveMC", source="optmerge_table5"),
                   Claim.better_than("OptMerge", "Weight Average", source="optmerge_table5")]
        return claims
    claims = [c for c in PAPER_CLAIMS if c.source == "optmerge_table2"]
    claims = [replace(c, source=table) for c in claims]
    claims.append(Claim("merging (OptMerge) beats the individual experts' average", {"method": "OptMerge",
                        "benchmark": "Avg"}, {"method": INDIV_MEAN, "benchmark": "Avg"}, ">", source=table))
    claims.append(Claim.better_than("OptMerge", BASE_LABEL, text="OptMerge beats the base model", source=table))
    return claims


#: The benchmarks a published table's ``Avg`` runs over, in the miniature world: Table 5 averages its two
#: multi-modality benchmarks (MUSIC-AVQA, AVQA), whose analogue here is MCUB-mini; Tables 2/3 average all tasks.
def table_tasks(df: pd.DataFrame, table: str) -> list[str] | None:
    """The tasks our ``Avg`` is taken over for ``table`` (``None``: every task): the MCUB-mini
    benchmarks for Table 5 (the paper's Avg is over its two multi-modality benchmarks), all otherwise."""
    if table in ("optmerge_table5", "table5"):
        return [t for t in dict.fromkeys(df["task"]) if str(t).startswith("mcub")]
    return None


def _count_items(df: pd.DataFrame, method: str, split: str, tasks: Sequence[str] | None) -> pd.DataFrame:
    """0/1 items rebuilt from a method's counts (``n``, ``n_correct`` per task and seed), for the unpaired
    comparison when the per-item predictions are not cached (``"Indiv. (mean)"``: the experts' mean count)."""
    ok = (df["split"] == split) & df["selected"].astype(bool) & (df["status"] == "ok")
    if method == INDIV_MEAN:  # the mean expert: per seed and task, the experts' mean count on one expert's items
        ind = df[ok & (df["kind"] == "indiv") & ~df["method"].isin([INDIV_MEAN, INDIV_OWN])]
        d = (ind.groupby(["seed", "task"], as_index=False).agg(n=("n", "first"), n_correct=("n_correct", "mean"))
             .assign(n_correct=lambda x: x["n_correct"].round().astype(int)))
    else:
        d = df[ok & (df["method"] == method)]
    if tasks is not None:
        d = d[d["task"].isin(list(tasks))]
    parts = [pd.DataFrame({"seed": r.seed, "stratum": r.task, "id": [f"{r.task}-{i}" for i in range(int(r.n))],
                           "correct": np.arange(int(r.n)) < int(r.n_correct)}) for r in d.itertuples()]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["seed", "stratum", "id", "correct"])


def _claim_items(df: pd.DataFrame, method: str, split: str, tasks: Sequence[str] | None) -> pd.DataFrame | None:
    """Per-item outcomes of ``method`` (``stratum`` = task) from the cached predictions; ``"Indiv. (mean)"``
    is, per item, the mean over the individual experts (a value in points). ``None`` when not cached."""
    methods = ([m for m in dict.fromkeys(df.loc[df["kind"] == "indiv", "method"]) if m not in (INDIV_MEAN, INDIV_OWN)]
               if method == INDIV_MEAN else [method])
    try:
        frames = [item_predictions(df, m, split) for m in methods]
    except FileNotFoundError:
        return None
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["seed", "stratum", "id", "correct"])
    p = pd.concat(frames, ignore_index=True).rename(columns={"task_set": "stratum"})
    if tasks is not None:
        p = p[p["stratum"].isin(list(tasks))]
    if method == INDIV_MEAN:
        return (p.assign(value=100.0 * p["correct"].astype(float)).groupby(["seed", "stratum", "id"], as_index=False)
                ["value"].mean())
    return p[["seed", "stratum", "id", "correct", "pred"]]


def claim_rows(df: pd.DataFrame, claims: Sequence, published: pd.DataFrame, split: str = "test",
               tasks: Sequence[str] | None = None, inert: Mapping[str, str] | None = None) -> list[dict]:
    """Rows of :func:`workbench.statistics.compare` for ``claims`` (``published.Claim`` on ``method`` and
    ``benchmark``; our side is always the average over ``tasks``): paired on the test items where both
    sides' predictions are cached (``pred_file``), else unpaired from the counts (labelled so).
    ``published``: long table with ``method, benchmark, score`` (the paper's numbers, in points).
    ``inert``: ``{method: reason}`` for methods found inert by the caller (e.g. an optimiser that did
    not move its objective, :func:`workbench.statistics.optimiser_inert`)."""
    from .statistics import compare

    pub = {(m, b): float(v) for m, b, v in zip(published["method"], published["benchmark"],
                                               published[published.attrs.get("value_column", "score")])}
    inert = dict(inert or {})
    labels = set(df["method"]) | ({INDIV_MEAN} if (df["kind"] == "indiv").any() else set())
    rows = []
    for c in claims:
        a, b = c.lhs.get("method"), c.rhs.get("method")
        pl, pr = pub.get((a, c.lhs.get("benchmark")), math.nan), pub.get((b, c.rhs.get("benchmark")), math.nan)
        empty = pd.DataFrame(columns=["seed", "id", "correct"])
        if not c.testable or a not in labels or b not in labels:
            row = compare(empty, empty, c.text, relation=c.relation, published=(pl, pr), source=c.source)
            row["inert"] = c.reason if not c.testable else f"no result of ours for {a if a not in labels else b}"
            rows.append(row)
            continue
        ia, ib = _claim_items(df, a, split, tasks), _claim_items(df, b, split, tasks)
        paired = ia is not None and ib is not None and len(ia) and len(ib)
        if not paired:
            ia, ib = _count_items(df, a, split, tasks), _count_items(df, b, split, tasks)
        why = inert.get(a) or inert.get(b) or None
        rows.append(compare(ia, ib, c.text, relation=c.relation, paired=bool(paired), published=(pl, pr),
                            source=c.source, inert=why and f"{a if inert.get(a) else b}: {why}"))
    return rows


def compare_published(df: pd.DataFrame, table: str = "optmerge_table2", split: str = "test",
                      tasks: Sequence[str] | None = None, inert: Mapping[str, str] | None = None,
                      family: str | None = None, preset: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Our Avg beside the paper's, and the verdict of each of its claims (:mod:`workbench.statistics`).

    Returns ``(cells, verdicts)``. ``cells``: method, published Avg, our mean and interval (our base
    row is matched to the paper's base row; tasks differ between the paper and the miniature world,
    so only ``Avg`` is joined). ``verdicts``: :func:`workbench.statistics.verdict_table` (Holm over
    ``family``, default the table's name) of the claims of :func:`paper_claims` plus "OptMerge has the
    best average among merging methods" (judged against the merging method with the best average of
    ours: beating the best one is necessary for beating all). Effects are paired on the test items
    (:func:`claim_rows`). The published ``"Indiv. (mean)"`` is the mean of the paper's Indiv. rows' Avg.
    ``tasks``: the benchmarks our Avg is over (default :func:`table_tasks`: MCUB-mini for Table 5).
    ``preset``: a small preset's verdicts carry the caution that they decide nothing.
    """
    from .published import Claim, load_table, side_by_side
    from .statistics import verdict_table

    tasks = table_tasks(df, table) if tasks is None else list(tasks)
    pub = load_table(table, long=True)
    base_name = PUBLISHED_BASE.get(pub.attrs.get("name", table), BASE_LABEL)
    attrs = dict(pub.attrs)
    pub = pub.copy()
    pub["method"] = pub["method"].replace({base_name: BASE_LABEL})
    indiv = pub[(pub["method"].str.startswith("Indiv.")) & (pub["benchmark"] == "Avg")]
    if len(indiv):
        extra = pd.DataFrame([{"method": INDIV_MEAN, "benchmark": "Avg", "score": float(indiv["score"].mean())}])
        pub = pd.concat([pub, extra], ignore_index=True)
    pub.attrs = attrs
    ours = summary_long(df, split, tasks=tasks)
    ours_avg = ours[ours["benchmark"] == "Avg"][["method", "benchmark", "mean", "ci_low", "ci_high"]]
    cells = side_by_side(pub[pub["benchmark"] == "Avg"], ours_avg)
    claims = list(paper_claims(attrs.get("name", table)))
    avg = ours_avg.set_index("method")["mean"]
    others = [m for m in MERGE_LABELS if m != "OptMerge" and m in avg.index and pd.notna(avg[m])]
    if others:
        best = max(others, key=lambda m: avg[m])
        pavg = pub[pub["benchmark"] == "Avg"].set_index("method")["score"]
        pub_best = max((m for m in MERGE_LABELS if m != "OptMerge" and m in pavg.index), key=lambda m: pavg[m],
                       default=None)
        best_claim = Claim(f"OptMerge has the best average among merging methods (vs ours' best other: {best})",
                           {"method": "OptMerge", "benchmark": "Avg"}, {"method": best, "benchmark": "Avg"}, ">",
                           source=attrs.get("name", table))
        rows_best = claim_rows(df, [best_claim], pub, split, tasks, inert)
        if pub_best is not None:  # the paper's side: OptMerge vs the paper's best other merging method
            rows_best[0].update(published_rhs=float(pavg[pub_best]),
                                published_effect=float(pavg.get("OptMerge", math.nan)) - float(pavg[pub_best]))
    else:
        rows_best = []
    rows = rows_best + claim_rows(df, claims, pub, split, tasks, inert)
    return cells, verdict_table(rows, family or attrs.get("name", table), preset=preset)


def _write_csv(frame: pd.DataFrame, path: Path, index: bool = False) -> None:
    """``frame`` to ``path`` through a temporary name (never a half-written table)."""
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=index)
    tmp.replace(path)


def write_tables(df: pd.DataFrame, name: str, out: str | Path, table: str | None = None,
                 verdicts: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write ``<name>_summary.csv`` (the wide table, formatted; Avg over :func:`table_tasks`) and, with
    ``table``, ``<name>_vs_published.csv`` and ``<name>_verdicts.csv`` into ``out``. ``verdicts``: the
    verdict table to write (e.g. Holm over a notebook's whole family) instead of ``compare_published``'s."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / f"{name}_summary.csv"}
    _write_csv(summarise(df, fmt=True, tasks=table_tasks(df, table) if table else None), paths["summary"], index=True)
    if table is not None:
        cells, own = compare_published(df, table)
        paths["cells"] = out / f"{name}_vs_published.csv"
        paths["verdicts"] = out / f"{name}_verdicts.csv"
        _write_csv(cells, paths["cells"])
        _write_csv(own if verdicts is None else verdicts, paths["verdicts"])
    return paths


__all__ = ["CAP_METHODS", "MODALITY_METHODS", "LAMBDAS", "DISPLAY", "MergeEntry", "ablation_entries",
           "capability_merging", "capability_setting", "choose_lambda", "compare_published", "default_entries",
           "claim_rows", "item_predictions", "modality_merging", "modality_setting", "optmerge_ablation",
           "paired_tests", "paper_claims", "rank_ratio_sweep", "scale_aware_params", "SCALE_AWARE_LR",
           "solver_comparison", "solver_inert", "split_records", "summarise",
           "summary_long", "table_tasks", "wilson", "write_tables"]
