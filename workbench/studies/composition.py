"""The composition study: every composition x benchmark x seed of a zoo, as tidy CSV tables (what the
notebooks read).

:func:`run_results` evaluates, for every seed of the zoo,

- ``expert`` (each modality's own expert, kind ``expert_kind``), ``damc_expert`` (each DAMC expert
  alone) - own tasks only (they have one tower);
- ``frozen`` (base LLM + the projector-stage experts' towers), ``naive_mc``, ``damc`` (λ searched on
  the MCUB-mini validation split when ``search``), ``mmer`` (λ, α searched likewise), ``oracle``
  (the jointly trained model, where the zoo has one) - on MCUB-mini 2/3/4 (one composition per
  modality combination: the experts of exactly the record's modalities) and on every expert's own
  tasks (one composition over all the zoo's modalities);

with both scorings (option log-likelihood, greedy first letter). Compositions whose experts are
missing from the zoo (no DAMC experts, no oracle) are skipped and listed in ``run.json``.

Tables written to ``out`` (default ``data/results/<preset>/``):

- ``predictions.csv`` - one row per item x method x seed x scoring (``benchmark``, ``combo``);
- ``summary.csv`` - accuracy per method x benchmark x scoring: mean over seeds with a Student-t
  interval, and the Wilson interval of the pooled counts (:func:`workbench.statistics.accuracy_intervals`);
- ``retention.csv`` - each composition's own-task accuracy as a percentage of the expert's
  (``damc`` against ``damc_expert``, the others against ``expert``), per modality and seed;
- ``paired.csv`` - exact McNemar tests between compositions on the same items (pooled over seeds);
- ``storage.csv`` - MMER's τ* + packed masks on disk vs the N experts' LLMs;
- ``search/*.csv`` - the DAMC λ grid and the MMER (λ, α) grid of every composition;
- ``run.json`` - settings, what was skipped, seconds, the libraries' versions.

Predictions are cached under ``out/cache/`` (:mod:`workbench.studies.cache`) by a hash of their inputs
(the zoo's model hashes, the composition settings, the records, the scoring) and of the code that
computes them (:func:`workbench.evaluate.code_digest`), so a re-run only evaluates what changed. The
λ searches' grid points are sweep cells (:mod:`workbench.studies.search`), run by ``executor``
(``"local"`` or ``"ray"``) and kept under ``out/cache/search/``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch

from ..evaluate import CachedInputs, predict, predict_scorings, scorer_key, shared_prefix_enabled
from ..paths import repo_relative, results_dir
from ..statistics import accuracy_intervals, mcnemar_exact
from ..world.scheduler import library_versions
from . import search as S
from ..io.writer import atomic_write
from .cache import CACHE_VERSION, cached, entry_path, records_digest
from .sweep import CellStore
COMPOSITIONS = ("expert", "damc_expert", "frozen", "naive_mc", "damc", "mmer", "oracle")
OWN_ONLY = ("expert", "damc_expert")
BENCHMARKS = ("mcub-2", "mcub-3", "mcub-4")
SCORINGS = ("loglik", "generate")
DEFAULT_PAIRS = (("mmer", "naive_mc"), ("damc", "naive_mc"), ("mmer", "damc"), ("naive_mc", "frozen"),
                 ("oracle", "mmer"), ("oracle", "damc"))
_ORDER = ("image", "audio", "video", "point")
_SHORT = {"image": "I", "audio": "A", "video": "V", "point": "P"}
_KEY_TO_MOD = {"vision": "image", "image": "image", "audio": "audio", "video": "video", "point": "point"}


def default_out(preset: str) -> Path:
    """The results folder of ``preset`` (:func:`workbench.paths.results_dir`)."""
    return results_dir(preset)


def record_modalities(rec: Mapping) -> tuple[str, ...]:
    """The modalities of a record's inputs, in the world's prompt order."""
    mods = {_KEY_TO_MOD[k] for k in rec.get("modal_inputs", {})}
    return tuple(m for m in _ORDER if m in mods) + tuple(sorted(m for m in mods if m not in _ORDER))


def combo_tag(mods: Iterable[str]) -> str:
    return "+".join(_SHORT.get(m, m) for m in mods)


# ============================================================================================ tables
def summary_table(pred: pd.DataFrame, by: Sequence[str] = ("method", "benchmark", "scoring"),
                  conf: float = 0.95) -> pd.DataFrame:
    """Accuracy per group: mean over seeds with a t-interval, Wilson interval of pooled counts."""
    if len(pred) == 0:
        return pd.DataFrame(columns=list(by) + ["n_seeds", "n_items", "acc", "t_low", "t_high", "wilson_low",
                                                "wilson_high"])
    return accuracy_intervals(pred, by=by, conf=conf).sort_values(list(by)).reset_index(drop=True)


def retention_table(pred: pd.DataFrame, reference: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Own-task retention: per method x modality x seed x scoring, the composed accuracy as a
    percentage of the reference's (``reference[method]``, default ``damc -> damc_expert``, every
    other method -> ``expert``) on the same records. Rows without a reference are dropped."""
    cols = ["method", "reference", "modality", "seed", "scoring", "n_items", "acc", "reference_acc", "retention"]
    own = pred[pred["benchmark"].astype(str).str.startswith("own:")]
    if len(own) == 0:
        return pd.DataFrame(columns=cols)
    ref_of = dict(reference or {})
    acc = (own.groupby(["method", "benchmark", "seed", "scoring"], dropna=False)["correct"]
           .agg(["mean", "size"]).reset_index())
    rows = []
    for _, r in acc.iterrows():
        if r["method"] in OWN_ONLY:
            continue
        ref = ref_of.get(r["method"], "damc_expert" if r["method"] == "damc" else "expert")
        hit = acc[(acc["method"] == ref) & (acc["benchmark"] == r["benchmark"]) & (acc["seed"] == r["seed"])
                  & (acc["scoring"] == r["scoring"])]
        if len(hit) == 0:
            continue
        ra = 100 * float(hit["mean"].iloc[0])
        a = 100 * float(r["mean"])
        rows.append({"method": r["method"], "reference": ref, "modality": r["benchmark"].split(":", 1)[1],
                     "seed": r["seed"], "scoring": r["scoring"], "n_items": int(r["size"]), "acc": a,
                     "reference_acc": ra, "retention": 100 * a / ra if ra > 0 else float("nan")})
    return pd.DataFrame(rows, columns=cols)


def paired_table(pred: pd.DataFrame, pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
                 by: Sequence[str] = ("benchmark", "scoring")) -> pd.DataFrame:
    """Exact McNemar between two methods on the same items (joined on id and seed), per group."""
    cols = list(by) + ["method_a", "method_b", "n", "b", "c", "acc_a", "acc_b", "pvalue"]
    rows = []
    for key, g in pred.groupby(list(by), dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        for a, b in pairs:
            da, db = g[g["method"] == a], g[g["method"] == b]
            if len(da) == 0 or len(db) == 0:
                continue
            j = da.merge(db, on=["id", "seed"], suffixes=("_a", "_b"))
            if len(j) == 0:
                continue
            t = mcnemar_exact(j["correct_a"].astype(bool).tolist(), j["correct_b"].astype(bool).tolist())
            rows.append({**dict(zip(by, key)), "method_a": a, "method_b": b, "n": t["n"], "b": t["b"], "c": t["c"],
                         "acc_a": 100 * float(j["correct_a"].mean()), "acc_b": 100 * float(j["correct_b"].mean()),
                         "pvalue": t["pvalue"]})
    return pd.DataFrame(rows, columns=cols)


# ============================================================================================ compositions
#: validation records of one composition's λ (and α) search: at most this many, shared evenly by the
#: modality combinations it covers (the default preset has 200 per combination: a pair's search sees its
#: 200, a triple's 50 of its own and of each of its three pairs', all four's 18-19 of each of 11)
SEARCH_ITEMS = 200


def search_records(val: Sequence[Mapping], modalities: Sequence[str], limit: int = SEARCH_ITEMS) -> list[Mapping]:
    """The validation records of a composition over ``modalities``: those whose inputs are all among them,
    at most ``limit``, the first records of each combination (``record["subset"]``) in turn, so every
    combination it covers is represented alike (deterministic: the same records for every method and seed)."""
    groups: dict[str, list[Mapping]] = {}
    for r in val:
        if set(record_modalities(r)) <= set(modalities):
            groups.setdefault(str(r.get("subset", "")), []).append(r)
    picked = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        picked += [g[i] for g in groups.values() if i < len(g)]
        if len(picked) >= limit:
            break
    return picked[:limit]


class ZooComposer:
    """Builds the compositions of one zoo and seed (see the module docstring)."""

    def __init__(self, zoo, seed: int, *, expert_kind: str = "full", search: bool = True,
                 search_dir: Path | None = None, val_records: Sequence[Mapping] | None = None,
                 damc_grid: Sequence[float] = (0.25, 0.5, 0.75, 1.0), mmer_lams: Sequence[float] = (0.5, 1.0, 2.0),
                 mmer_alphas: Sequence[float] = (0.5, 1.0, 1.5), mmer_merge: str = "ties",
                 progress: bool = False, load_inputs: Callable | None = None,
                 search_cache: Path | None = None, executor: str = "local", ray_address: str | None = None) -> None:
        from .. import compose as C
        from ..world import Zoo

        self.zoo = Zoo.coerce(zoo)
        self.seed, self.expert_kind, self.search = seed, expert_kind, search
        self.search_dir = search_dir
        self.search_cache = Path(search_cache) if search_cache is not None else None
        self.executor, self.ray_address = executor, ray_address
        self.val = list(val_records) if val_records is not None else self._val()
        self.damc_grid, self.mmer_lams, self.mmer_alphas = tuple(damc_grid), tuple(mmer_lams), tuple(mmer_alphas)
        self.mmer_merge = mmer_merge
        self.progress = progress
        # shared by every composition of this seed: the records' inputs (read once), the tokenised
        # prompts and options, and the experts' frozen towers with their outputs (encoded once)
        self.load = load_inputs if load_inputs is not None else CachedInputs(self.zoo.load_inputs)
        self.tok = C.CachedTokenizer(self.zoo.tokenizer())
        self._sources: dict = {}
        self._base = None
        self.mmer_parts0: dict = {}  # mods -> MMER parts before the search (λ = 1; for storage.csv)
        self.notes: dict = {}

    def source(self, name: str):
        """The zoo expert ``name`` (:func:`workbench.compose.zoo_expert`) with a cached tower, loaded once."""
        from .. import compose as C

        if name not in self._sources:
            self._sources[name] = C.cached_source(C.zoo_expert(self.zoo, name))
        return self._sources[name]

    def base_llm(self):
        """The base LLM θ0, read once (:func:`workbench.compose.load_causal_lm`, as the compositions
        would read it from ``zoo.base_path``)."""
        from .. import compose as C

        if self._base is None:
            self._base = C.load_causal_lm(self.zoo.base_path)
        return self._base

    def release(self) -> None:
        """Drop the loaded experts, their cached tower outputs and the base LLM (reloaded when needed)."""
        self._sources.clear()
        self.mmer_parts0.clear()
        self._base = None

    def _val(self) -> list[dict]:
        try:
            return self.zoo.mcub("val")
        except FileNotFoundError:
            return []

    # ---- names
    def expert_name(self, m: str, kind: str) -> str | None:
        n = f"{m}-{kind}-s{self.seed}"
        return n if n in self.zoo.manifest["models"] else None

    def model_hashes(self, method: str, mods: Sequence[str]) -> dict:
        names = self.members(method, mods) or []
        models = self.zoo.manifest["models"]
        return {"base": self.zoo.base_hash, **{n: models[n].get("hash") for n in names}}

    def members(self, method: str, mods: Sequence[str]) -> list[str] | None:
        """The zoo models a composition uses (``None`` if one is missing)."""
        kind = {"expert": self.expert_kind, "naive_mc": self.expert_kind, "mmer": self.expert_kind,
                "frozen": "projector", "damc": "damc", "damc_expert": "damc"}.get(method)
        if method == "oracle":
            n = f"oracle-s{self.seed}"
            return [n] if n in self.zoo.manifest["models"] else None
        if kind is None:
            raise ValueError(f"unknown composition {method!r}; choose from {COMPOSITIONS}")
        names = [self.expert_name(m, kind) for m in mods]
        return None if any(n is None for n in names) else names

    def settings(self, method: str) -> dict:
        s = {"method": method, "expert_kind": self.expert_kind, "seed": self.seed}
        if method == "damc":
            s.update(search=self.search, grid=self.damc_grid, val=records_digest(self.val) if self.val else None)
        if method == "mmer":
            s.update(search=self.search, lams=self.mmer_lams, alphas=self.mmer_alphas, merge=self.mmer_merge,
                     val=records_digest(self.val) if self.val else None)
        return s

    # ---- building
    def build(self, method: str, mods: Sequence[str]):
        """The composed :class:`MultimodalLM` over ``mods`` (``None`` if the zoo lacks a member).

        ``naive_mc`` is NaiveMC, one definition for every study: the composition of the experts a model
        is built from - here the ``expert_kind`` experts of ``mods`` - whose LLM is the mean of their
        LLMs, θ = θ0 + (1/N) Σ τi (the whole LLM, embeddings and norms too), with every one of their
        towers unchanged (:func:`workbench.compose.compose_naive_mc`; Chen et al., ACL 2024, NaiveMC,
        θ_merge = Σ λi θi with λi = 1/N; methods.md section 1). Which experts is the study's choice:
        :func:`run_results` (notebooks 02-04, the DAMC paper's MCUB protocol) passes each record's
        modalities; :func:`workbench.studies.merging_benchmark.modality_merging` (notebook 06, OptMerge Table 5) passes
        all of them, the experts every merged row is built from."""
        from .. import compose as C

        names = self.members(method, mods)
        if names is None:
            return None
        base = self.base_llm()  # the compositions deep-copy it (never modify it)
        if method == "oracle":
            model = self.zoo.load_expert(names[0])
            for m in list(model.towers):
                model.towers[m] = C.CachedTower(model.towers[m])
            model.tokenizer = self.tok
            return model
        srcs = [self.source(n) for n in names]
        if method in ("expert", "damc_expert"):
            return C.compose_expert(base, srcs[0], self.tok)
        if method == "frozen":
            return C.compose_frozen(base, srcs, self.tok)
        if method == "naive_mc":
            return C.compose_naive_mc(base, srcs, self.tok)
        tag = f"{combo_tag(mods)}-s{self.seed}"
        val = search_records(self.val, mods)
        load = self.load
        if method == "damc":
            model = C.compose_damc(base, srcs, self.tok)
            if self.search and len(srcs) > 1:
                sweep = self._search_sweep(method, mods, names, model)
                if val:
                    best, _ = S.damc_lambda_search(model, val, load, grid=S.lambda_grid(len(srcs), self.damc_grid),
                                                   csv=self._csv(f"damc_lambda_{tag}.csv"), progress=self.progress,
                                                   sweep=sweep)
                    rule = "val-grid"
                else:
                    own = {m: self.zoo.own_eval(m) for m in mods}
                    best, _ = S.damc_lambda_from_own_tasks(model, own, load, values=self.damc_grid,
                                                           csv=self._csv(f"damc_lambda_own_{tag}.csv"),
                                                           progress=self.progress, sweep=sweep)
                    rule = "own-task-fallback"
                self.notes.setdefault("damc_lambda", {})[tag] = {"lambda": list(best), "rule": rule,
                                                                  "n_val": len(val)}
            return model
        if method == "mmer":
            model = C.compose_mmer(base, srcs, self.tok, merge_method=self.mmer_merge)
            self.mmer_parts0[tuple(mods)] = model.mmer_parts
            if self.search and val:
                (lam, alpha), _ = S.mmer_search(model, base, srcs, val, load, lams=self.mmer_lams,
                                                alphas=self.mmer_alphas, csv=self._csv(f"mmer_lambda_alpha_{tag}.csv"),
                                                progress=self.progress,
                                                sweep=self._search_sweep(method, mods, names, model))
                self.notes.setdefault("mmer", {})[tag] = {"lam": lam, "alpha": alpha, "n_val": len(val),
                                                          "density": model.mmer_parts.density()}
            return model
        raise ValueError(f"unknown composition {method!r}")

    def _csv(self, name: str) -> Path | None:
        return None if self.search_dir is None else self.search_dir / name

    def _search_sweep(self, method: str, mods: Sequence[str], names: Sequence[str], model) -> "S.SearchSweep":
        """Where the λ search of ``method`` over ``mods`` runs (``executor``; a Ray worker rebuilds the
        composition from the zoo folder and the expert names) and where its cells are kept
        (``search_cache``, keyed by the members' hashes and order: notebook 06 composes the same model
        on the same split as 02-04 and reuses their cells)."""
        identity = {"composition": method, "zoo": self.model_hashes(method, mods), "mods": list(mods),
                    "route_order": list(model.route_order), **({"merge": self.mmer_merge} if method == "mmer" else {})}
        return S.SearchSweep(self.executor, self.ray_address,
                             S.Recipe(str(self.zoo.path.resolve()), method, tuple(names), self.mmer_merge),
                             CellStore(self.search_cache) if self.search_cache is not None else None, identity)


# ============================================================================================ the run
#: The :attr:`ZooComposer.notes` section in which a searched composition records its choice.
NOTE_SECTIONS = {"damc": "damc_lambda", "mmer": "mmer"}


def sync_notes(comp: ZooComposer, cache_dir: Path | None, parts: Mapping, method: str, mods: Sequence[str],
               hit: bool) -> None:
    """A searched composition's choice (DAMC's λ, MMER's λ and α) kept with its cached predictions: written beside
    the cached table (``cache/notes/<key>.json``) when computed, read back into ``comp.notes`` when the table is
    served from the cache - so a rerun from the cache still records which λ each composition used (``run.json``)."""
    section = NOTE_SECTIONS.get(method)
    if section is None or cache_dir is None:
        return
    f = entry_path(Path(cache_dir) / "notes", parts, ".json")
    tag = f"{combo_tag(mods)}-s{comp.seed}"
    if hit:
        if f.is_file() and tag not in comp.notes.get(section, {}):
            comp.notes.setdefault(section, {})[tag] = json.loads(f.read_text())
        return
    note = comp.notes.get(section, {}).get(tag)
    if note is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(f, lambda tmp: Path(tmp).write_text(json.dumps(note, default=str)))


def run_results(preset: str = "tiny", *, zoo=None, out: str | Path | None = None,
                methods: Sequence[str] = COMPOSITIONS, benchmarks: Sequence[str] = BENCHMARKS,
                own_tasks: bool = True, scorings: Sequence[str] = SCORINGS, seeds: Sequence[int] | None = None,
                expert_kind: str = "full", search: bool = True, max_items: int | None = None,
                storage: bool = True, use_cache: bool = True, progress: bool = True, executor: str = "local",
                ray_address: str | None = None, **composer_kw) -> dict:
    """Evaluate every composition and write the tables (see the module docstring). ``executor``
    (``"local"``, ``"ray"``) and ``ray_address``: where the λ searches' cells run
    (:mod:`workbench.studies.search`).

    Returns ``{"predictions", "summary", "retention", "paired", "storage": DataFrame, "run": dict}``.
    """
    from tqdm.auto import tqdm

    from ..world import Zoo

    t0 = time.time()
    torch.manual_seed(0)
    z = Zoo.coerce(zoo, preset)
    out = Path(out) if out is not None else default_out(preset)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / "cache" if use_cache else None
    seeds = list(seeds) if seeds is not None else list(z.manifest["config"]["seeds"])
    mods_all = [m for m in _ORDER if m in z.modalities]
    bench_recs: dict[str, list[dict]] = {}
    for b in benchmarks:
        try:
            recs = z.mcub(b)
        except FileNotFoundError:
            continue
        bench_recs[b] = recs
    own = {m: z.own_eval(m) for m in mods_all} if own_tasks else {}
    if max_items is not None:
        bench_recs = {b: _per_combo_head(r, max_items) for b, r in bench_recs.items()}
        own = {m: r[:max_items] for m, r in own.items()}
    frames, skipped, n_cached, n_eval = [], [], 0, 0
    storage_rows: list[dict] = []
    stored: set = set()
    notes: dict = {}
    jobs = []  # (seed, method, benchmark, mods, records)
    for seed in seeds:
        for method in methods:
            if method not in OWN_ONLY:
                for b, recs in bench_recs.items():
                    by_combo: dict[tuple, list] = {}
                    for r in recs:
                        by_combo.setdefault(record_modalities(r), []).append(r)
                    for mods, rs in by_combo.items():
                        jobs.append((seed, method, b, mods, rs))
            if method in OWN_ONLY:
                for m, rs in own.items():
                    jobs.append((seed, method, f"own:{m}", (m,), rs))
            elif own:
                for m, rs in own.items():
                    jobs.append((seed, method, f"own:{m}", tuple(mods_all), rs))
    composers: dict[int, ZooComposer] = {}
    models: dict[tuple, object] = {}
    load = CachedInputs(z.load_inputs)  # every record's inputs read once for the whole run
    bar = tqdm(jobs, desc=f"results {z.manifest.get('preset', preset)}", disable=not progress)
    for seed, method, bench, mods, recs in bar:
        comp = composers.get(seed)
        if comp is None:
            for other in composers.values():
                other.release()  # jobs run seed by seed: free the previous seed's experts
            comp = composers[seed] = ZooComposer(z, seed, expert_kind=expert_kind, search=search,
                                                 search_dir=out / "search", progress=False, load_inputs=load,
                                                 search_cache=None if cache_dir is None else cache_dir / "search",
                                                 executor=executor, ray_address=ray_address,
                                                 **composer_kw)
        if comp.members(method, mods) is None:
            skipped.append({"seed": seed, "method": method, "benchmark": bench, "combo": combo_tag(mods),
                            "why": "a member is missing from the zoo"})
            continue
        if method == "oracle" and not set(mods) <= set(z.info(f"oracle-s{seed}").get("modalities", [])):
            skipped.append({"seed": seed, "method": method, "benchmark": bench, "combo": combo_tag(mods),
                            "why": "the oracle lacks a modality"})
            continue
        common = {"zoo": comp.model_hashes(method, mods), "settings": comp.settings(method), "mods": list(mods),
                  "records": records_digest(recs), "benchmark": bench, **scorer_key()}
        parts_of = {scoring: {**common, "scoring": scoring} for scoring in scorings}
        # the scorings not cached yet are computed together (one run of each prompt for both)
        todo = [s for s in scorings if cache_dir is None or not entry_path(cache_dir, parts_of[s]).is_file()]
        fresh: dict[str, pd.DataFrame] = {}
        for scoring in scorings:
            def compute():
                if not fresh:
                    key = (seed, method, tuple(mods))
                    if key not in models:
                        models.clear()  # keep one composed model in memory at a time
                        models[key] = comp.build(method, mods)
                    need = todo if scoring in todo else [scoring]  # (an entry removed since todo was made)
                    fresh.update(predict_scorings(models[key], recs, load, need, method=method, seed=seed))
                df = fresh.pop(scoring)
                df["benchmark"], df["combo"] = bench, combo_tag(mods)
                return df

            bar.set_postfix_str(f"s{seed} {method} {bench} {combo_tag(mods)} {scoring}")
            df, hit = cached(cache_dir, parts_of[scoring], compute)
            sync_notes(comp, cache_dir, parts_of[scoring], method, mods, hit)
            n_cached += int(hit)
            n_eval += int(not hit)
            frames.append(df)
        if storage and method == "mmer" and len(mods) > 1 and (seed, tuple(mods)) not in stored:
            stored.add((seed, tuple(mods)))
            row = _storage_row(z, comp, mods, out, seed)
            if row:
                storage_rows.append(row)
        notes.update({f"s{s}": c.notes for s, c in composers.items() if c.notes})
    bar.close()
    pred = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["id", "subset", "gold", "pred", "correct", "method", "seed", "scoring", "task", "benchmark", "combo"])
    pred["correct"] = pred["correct"].astype(str).str.lower().isin(["true", "1"]) if len(pred) else pred["correct"]
    summary = summary_table(pred)
    retention = retention_table(pred)
    paired = paired_table(pred)
    storage_df = pd.DataFrame(storage_rows)
    pred.to_csv(out / "predictions.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    retention.to_csv(out / "retention.csv", index=False)
    paired.to_csv(out / "paired.csv", index=False)
    storage_df.to_csv(out / "storage.csv", index=False)
    run = {"preset": preset, "zoo": repo_relative(z.path), "seeds": seeds, "methods": list(methods),
           "benchmarks": list(bench_recs), "own_tasks": list(own), "scorings": list(scorings),
           "expert_kind": expert_kind, "search": search, "max_items": max_items, "evaluated": n_eval,
           "cached": n_cached, "skipped": skipped, "notes": notes, "seconds": round(time.time() - t0, 1),
           "shared_prefix": shared_prefix_enabled(),
           "results_version": CACHE_VERSION, "versions": library_versions()}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    return {"predictions": pred, "summary": summary, "retention": retention, "paired": paired,
            "storage": storage_df, "run": run}


def _per_combo_head(recs: Sequence[dict], n: int) -> list[dict]:
    out, seen = [], {}
    for r in recs:
        k = record_modalities(r)
        if seen.get(k, 0) < n:
            out.append(r)
            seen[k] = seen.get(k, 0) + 1
    return out


def _storage_row(z, comp: ZooComposer, mods: Sequence[str], out: Path, seed: int) -> dict | None:
    """Save MMER's parts for ``mods`` and compare their bytes with the experts' LLM folders."""
    from .. import compose as C
    from ..io.mmer_store import write_parts

    names = comp.members("mmer", mods)
    if names is None:
        return None
    srcs = [comp.source(n) for n in names]
    folder = out / "mmer_parts" / f"{combo_tag(mods)}-s{seed}"
    parts = comp.mmer_parts0.pop(tuple(mods), None)  # the same call compose_mmer made (λ = 1), if it ran
    if not (folder / "mmer.json").is_file():
        if parts is None:
            parts = C.mmer_parts(z.base_path, srcs, merge_method=comp.mmer_merge)
        write_parts(parts, folder)
    paths = [s.llm if s.kind == "full" else s.adapter for s in srcs]
    rep = C.storage_comparison([folder / "tau_star.safetensors", folder / "masks.safetensors"], paths)
    return {"seed": seed, "combo": combo_tag(mods), "tau_star_bytes": C.disk_bytes(folder / "tau_star.safetensors"),
            "mask_bytes": C.disk_bytes(folder / "masks.safetensors"), **rep}


def forgetting_experiment(zoo, expert: str, new_task: str | Sequence[str] = ("first", "last"), *,
                          old_tasks: Sequence[str] | None = None, steps: int = 120, batch_size: int = 32,
                          lr: float = 1e-3, n_eval: int = 96, lam: float = 1.0, alpha: float = 1.0,
                          merge_method: str | Callable = "ties", seed: int = 0, scoring: str = "loglik",
                          workdir: str | Path | None = None, progress: bool = False) -> dict:
    """Forgetting, then decoupling (MMER's retention claim on a new task; methods.md section 3).

    1. the zoo expert (full fine-tuning) is scored on its old tasks and on the new task(s);
    2. its LLM is fine-tuned on the new task(s) only (the world's :func:`workbench.world.training.train_mllm`, projector
       frozen) -> θ_new; old and new tasks are scored again (the drop on old tasks = forgetting);
    3. decoupled: τ_old = θ_old − θ0 and τ_new = θ_new − θ0 are merged into τ* with one mask each
       (:func:`workbench.compose.mmer_parts`); old-task inputs use the old route (their modality tokens on
       θ0 + α m_old ⊙ τ*), new-task inputs the new route; text tokens θ0 + τ* (as MMER).

    Returns a dict of accuracies (percent): ``before_old``, ``before_new``, ``after_old``,
    ``after_new``, ``decoupled_old``, ``decoupled_new`` and the settings.
    """
    import tempfile

    import numpy as np

    from .. import compose as C
    from ..errors import ConfigError
    from ..evaluate import accuracy
    from ..mllm import MultimodalLM
    from ..world import Zoo
    from ..world.tasks import batches, example_modal_inputs, modality_question, OWN_TASKS
    from ..world.training import seed_everything, train_mllm

    z = Zoo.coerce(zoo)
    src = C.zoo_expert(z, expert)
    if src.kind != "full":
        raise ConfigError(f"forgetting_experiment needs a full fine-tuned expert, {expert!r} is {src.kind}")
    m = src.modality
    new = [new_task] if isinstance(new_task, str) else list(new_task)
    old = list(old_tasks or [t for t in OWN_TASKS[m] if t not in new])
    tok = z.tokenizer()

    def examples(tasks, n, s):
        rng = np.random.default_rng(s)
        return [modality_question(m, tasks[i % len(tasks)], rng) for i in range(n)]

    def as_records(exs, tag):
        return [{"id": f"{tag}-{i}", "conversations": [{"from": "human", "value": e.prompt},
                                                       {"from": "gpt", "value": e.letter if e.choices else e.answer}],
                 "choices": list(e.choices) or None, "options": list(e.options) or None, "task": e.task,
                 "_inputs": example_modal_inputs(e)} for i, e in enumerate(exs)]

    old_recs = as_records(examples(old, n_eval, 90_000 + seed), "old")
    new_recs = as_records(examples(new, n_eval, 91_000 + seed), "new")
    load = lambda r: r["_inputs"]  # noqa: E731

    def score(model, recs):
        return accuracy(predict(model, recs, load, scoring=scoring))

    old_model = C._mllm(C.load_causal_lm(src.llm), tok, [src])
    res = {"expert": expert, "modality": m, "old_tasks": old, "new_tasks": new, "steps": steps, "lam": lam,
           "alpha": alpha, "scoring": scoring, "seed": seed,
           "before_old": score(old_model, old_recs), "before_new": score(old_model, new_recs)}
    # fine-tune on the new task(s) only
    seed_everything(7000 + seed)
    llm_new = C.load_causal_lm(src.llm)
    llm_new.requires_grad_(True)
    ft = MultimodalLM(llm_new, tok, {m: src.tower}, {m: src.placeholder})
    sampler = lambda r: modality_question(m, new[int(r.integers(len(new)))], r)  # noqa: E731
    log = train_mllm(ft, batches(sampler, batch_size, 7000 + seed), [{"params": list(llm_new.parameters()), "lr": lr}],
                     steps, desc=f"forgetting {expert}", progress=progress)
    llm_new.eval().requires_grad_(False)
    res["after_old"], res["after_new"] = score(ft, old_recs), score(ft, new_recs)
    res["finetune_seconds"] = round(log["seconds"], 1)
    # decouple with masks: save θ_new, then MMER over (θ_old, θ_new)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        new_dir = Path(tmp) / "new"
        llm_new.save_pretrained(str(new_dir))
        base_llm = z.load_base_llm()
        parts = C.mmer_parts(base_llm, [src.llm, new_dir], merge_method=merge_method, lam=lam)
        res["mask_density_old"], res["mask_density_new"] = parts.density()
        for label, route_i, recs in (("decoupled_old", 0, old_recs), ("decoupled_new", 1, new_recs)):
            sub = C.MMERParts(parts.tau_star, {n: [ms[route_i]] for n, ms in parts.masks.items()}, 1, parts.params)
            llm = C.mmer_llm(base_llm, sub, alpha=alpha)
            res[label] = score(C._mllm(llm, tok, [src]), recs)
    res["forgetting"] = res["before_old"] - res["after_old"]
    res["recovered"] = res["decoupled_old"] - res["after_old"]
    return res


def run_forgetting(preset: str = "tiny", *, zoo=None, out: str | Path | None = None,
                   experts: Sequence[str] | None = None, new_tasks: Sequence[str] = ("first", "last"),
                   steps: int = 120, n_eval: int = 96, lam: float = 1.0, alpha: float = 1.0,
                   scoring: str = "loglik", use_cache: bool = True, progress: bool = True) -> pd.DataFrame:
    """Forgetting and its repair by mask decoupling (:func:`forgetting_experiment`)
    for every full expert whose modality does not already train on ``new_tasks`` (the world's image
    and point experts for the default ``first``/``last``); one row per expert, cached by inputs,
    written to ``forgetting.csv``. Columns: accuracies before / after fine-tuning / decoupled on the
    old and the new tasks, ``forgetting`` (before_old - after_old) and ``recovered``
    (decoupled_old - after_old), in points."""
    from tqdm.auto import tqdm

    from ..world import Zoo
    from ..world.tasks import OWN_TASKS

    z = Zoo.coerce(zoo, preset)
    out = Path(out) if out is not None else default_out(preset)
    out.mkdir(parents=True, exist_ok=True)
    if experts is None:
        experts = [n for n in z.experts(kind="full")
                   if not set(new_tasks) & set(OWN_TASKS.get(z.info(n)["modality"], ()))]
    rows = []
    for name in tqdm(list(experts), desc="forgetting", disable=not progress):
        parts = {"expert": name, "hash": z.info(name).get("hash"), "new": list(new_tasks), "steps": steps,
                 "n_eval": n_eval, "lam": lam, "alpha": alpha, "scoring": scoring, "kind": "forgetting"}

        def compute(name=name):
            r = forgetting_experiment(z, name, tuple(new_tasks), steps=steps, n_eval=n_eval, lam=lam, alpha=alpha,
                                      scoring=scoring, seed=int(z.info(name).get("seed", 0)))
            return pd.DataFrame([{k: (",".join(v) if isinstance(v, list) else v) for k, v in r.items()}])

        df, _ = cached(out / "cache" if use_cache else None, parts, compute)
        rows.append(df)
    res = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    res.to_csv(out / "forgetting.csv", index=False)
    return res


def load_results(preset: str = "tiny", out: str | Path | None = None) -> dict:
    """Read the tables written by :func:`run_results` (for the notebooks)."""
    out = Path(out) if out is not None else default_out(preset)
    res = {}
    for name in ("predictions", "summary", "retention", "paired", "storage", "forgetting"):
        f = out / f"{name}.csv"
        res[name] = pd.read_csv(f) if f.is_file() and f.stat().st_size > 1 else pd.DataFrame()
    run = out / "run.json"
    res["run"] = json.loads(run.read_text()) if run.is_file() else {}
    return res


__all__ = ["BENCHMARKS", "COMPOSITIONS", "ZooComposer", "combo_tag", "default_out", "forgetting_experiment",
           "load_results", "paired_table", "record_modalities", "retention_table", "run_forgetting", "run_results",
           "summary_table"]
