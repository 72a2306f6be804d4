"""The merging benchmark's evaluation protocol: how one merged model is made, scored and chosen.

- :func:`split_records` - one task's records into disjoint validation and test halves (seeded);
- :func:`choose_lambda` - the λ with the highest mean validation accuracy over tasks;
- :class:`Evaluator` - per-item predictions of a model on record sets, kept in the prediction cache
  (:mod:`workbench.studies.cache`) and recomputed only on a miss;
- :class:`MergedLLM` - one entry x seed merged once by the engine (scale 1), the LLM at λ
  interpolated from it (``rescale="interpolate"``) or re-merged (``"remerge"``);
- :func:`run_entry` - one cell: validation over λ, the choice, the test at the chosen λ, as rows
  (:func:`result_row`; failed rows on an exception); :func:`reference_rows` - a fixed model's rows.

The settings, entries and table functions that use them are in :mod:`workbench.studies.merging_benchmark`;
:mod:`workbench.studies.sweep` runs :func:`run_entry` per cell, locally or on Ray.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..evaluate import EVAL_BATCH
from ..paths import repo_relative
from .cache import digest, entry_path, read_predictions, records_digest, write_frame

if TYPE_CHECKING:
    from .merging_benchmark import MergeEntry, _Setting


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def wilson(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson interval of ``k / n`` in percent (NaN, NaN for ``n = 0``)."""
    from ..statistics import wilson_interval

    if n <= 0:
        return math.nan, math.nan
    lo, hi = wilson_interval(int(k), int(n), conf)
    return 100.0 * lo, 100.0 * hi


@contextlib.contextmanager
def quiet_loading():
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
class Evaluator:
    """Evaluates models on record sets, with a prediction cache and an in-memory input cache."""

    def __init__(self, z, cache_dir: Path | None, scoring: str, device: torch.device, batch_size: int = EVAL_BATCH,
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

    def _file(self, model_key: str, records: Sequence[Mapping], scoring: str) -> Path | None:
        if self.cache_dir is None:
            return None
        from ..evaluate import scorer_key

        # the log-likelihood scorer also picks DAMC's λ (loglik search), whatever the scoring here; the
        # code digest (compose, methods, engine, evaluate, the model's scorer) retires predictions of old code
        return entry_path(self.cache_dir, {"model": model_key, "records": records_digest(records), "scoring": scoring,
                                           **scorer_key()})

    def cached(self, model_key: str, records: Sequence[Mapping], scoring: str | None = None) -> pd.DataFrame | None:
        f = self._file(model_key, records, scoring or self.scoring)
        if f is not None and f.is_file():
            df = read_predictions(f)
            df["correct"] = df["correct"].astype(str).str.lower().isin(["true", "1"])
            df.attrs["file"] = str(f)
            return df
        return None

    def evaluate(self, model_key: str, records: Sequence[Mapping], model_fn: Callable[[], Any],
                 scoring: str | None = None) -> pd.DataFrame:
        """Per-item predictions of the model ``model_fn()`` (called only on a cache miss), scored by
        ``scoring`` (default: the evaluator's)."""
        from ..evaluate import predict

        scoring = scoring or self.scoring
        hit = self.cached(model_key, records, scoring)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        model = model_fn()
        with torch.no_grad():
            df = predict(model, list(records), self.load, scoring=scoring, batch_size=self.batch_size)
        f = self._file(model_key, records, scoring)
        if f is not None:
            write_frame(df, f)
            df.attrs["file"] = str(f)
        return df


def result_row(method: str, method_id: str, kind: str, task: str, split: str, lam: float, seed: int,
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


# ============================================================================================ one merged model
class MergedLLM:
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
        from ..engine import merge_with_report

        out = self.workdir / f"merge-{digest({'e': self.entry.key, 's': self.seed, 'scale': scale})}"
        shutil.rmtree(out, ignore_errors=True)
        params = {**self.entry.params, "scale": float(scale)}
        cfg = {"method": self.entry.method, "base": self.setting.base_llm_path,
               "experts": self.setting.expert_paths[self.seed],
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
        from ..compose import load_causal_lm

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
    weights as ``setting.load_base_llm()``, without re-reading the checkpoint for every λ)."""
    import copy

    base = setting.__dict__.get("_base_llm")
    if base is None:
        base = setting.__dict__["_base_llm"] = setting.load_base_llm()
    return copy.deepcopy(base)


def _model_key(setting: _Setting, seed: int, what: Mapping) -> str:
    return digest({"setting": setting.name, "base": setting.base_hash, "experts": setting.expert_hashes(seed),
                   "seed": seed, **what})


def _eval_sets(ev: Evaluator, setting: _Setting, key: str, sets: Mapping[str, list], model_fn
               ) -> dict[str, pd.DataFrame]:
    holder: dict = {}

    def get():
        if "m" not in holder:
            holder["m"] = model_fn().to(ev.device).eval()
        return holder["m"]

    return {t: ev.evaluate(key, recs, get, setting.task_scoring.get(t)) for t, recs in sets.items()}


def run_entry(ev: Evaluator, setting: _Setting, entry: MergeEntry, seed: int, lambdas: Sequence[float],
              workdir: Path, rescale: str, keep_defaults: bool, progress: bool, timings: list,
              keep_merged: bool = False) -> list[dict]:
    """Validation over λ, choice, test at the chosen λ; rows (failed rows on an exception)."""
    rows: list[dict] = []
    lams = list(lambdas) if entry.searched else [1.0]
    mm = MergedLLM(setting, entry, seed, ev.device, workdir, rescale, keep_defaults, progress, keep_merged)
    merge_key = {"entry": entry.key, "keep_defaults": keep_defaults, "rescale": rescale}
    try:
        val_rows = []
        for lam in lams:
            key = _model_key(setting, seed, {**merge_key, "lambda": float(lam)})
            preds = _eval_sets(ev, setting, key, setting.val_sets,
                               lambda lam=lam: setting.build(mm.llm(lam), seed))
            for t, p in preds.items():
                val_rows.append(result_row(entry.label, entry.method, "merge", t, "val", lam, seed, p,
                                           searched=entry.searched, params=entry.params))
        chosen = choose_lambda(pd.DataFrame(val_rows))
        for r in val_rows:
            r["selected"] = r["lambda"] == chosen
        rows.extend(val_rows)
        key = _model_key(setting, seed, {**merge_key, "lambda": float(chosen)})
        preds = _eval_sets(ev, setting, key, setting.test_sets, lambda: setting.build(mm.llm(chosen), seed))
        for t, p in preds.items():
            rows.append(result_row(entry.label, entry.method, "merge", t, "test", chosen, seed, p,
                                   searched=entry.searched, selected=True, params=entry.params))
        if mm.seconds is not None:
            timings.append({"method": entry.label, "seed": seed, "merge_seconds": mm.seconds})
    except Exception as err:  # a failing method is reported, not hidden
        msg = f"{type(err).__name__}: {err}"
        done = {(r["task"], r["split"]) for r in rows}
        for split, sets in (("val", setting.val_sets), ("test", setting.test_sets)):
            for t in sets:
                if (t, split) not in done:
                    rows.append(result_row(entry.label, entry.method, "merge", t, split, math.nan, seed, None,
                                           searched=entry.searched, selected=split == "test", status="failed",
                                           error=msg[:500], params=entry.params))
        for r in rows:
            r["status"], r["error"] = "failed", msg[:500]
    return rows


def reference_rows(ev: Evaluator, setting: _Setting, label: str, method_id: str, kind: str, seed: int,
                   key_parts: Mapping, model_fn) -> list[dict]:
    """Rows of a fixed model (no λ) on validation and test."""
    rows = []
    key = digest({"setting": setting.name, "ref": dict(key_parts)})
    for split, sets in (("val", setting.val_sets), ("test", setting.test_sets)):
        try:
            preds = _eval_sets(ev, setting, key, sets, model_fn)
            rows += [result_row(label, method_id, kind, t, split, math.nan, seed, p, selected=True)
                     for t, p in preds.items()]
        except Exception as err:
            msg = f"{type(err).__name__}: {err}"[:500]
            rows += [result_row(label, method_id, kind, t, split, math.nan, seed, None, selected=True,
                                status="failed", error=msg)
                     for t in sets]
    return rows


__all__ = ["Evaluator", "MergedLLM", "choose_lambda", "quiet_loading", "reference_rows", "result_row", "run_entry",
           "split_records", "wilson"]
