"""The composition study's λ searches (notebooks 03-04) as sweeps: DAMC's λ, its own-task fallback, MMER's (λ, α).

Each grid point of a search is a :class:`SearchCell` evaluated by :func:`workbench.studies.sweep.run_sweep`
(:func:`run_search_cell`: the composed model at that point, its accuracy on the search's records -> one
row of the search's table); the selection rule then reads the rows. Executors:

- ``"local"``: the live composed model of this process, re-weighted in place for every point
  (DAMC's coefficients, MMER's masks - recomputed once per λ - and α), as the searches always ran;
- ``"ray"``: each cell rebuilds the composed model on its worker from plain data (:class:`Recipe`:
  the zoo folder, the composition, the expert names; once per worker process) and returns its row.

Whatever the executor, the rows come back in the grid's order, so the chosen point, the model left
at it and the CSV written are the same. Finished cells are kept in a
:class:`workbench.studies.sweep.CellStore` (the composition study's ``cache/search/``, keyed by what the
row depends on: the models' hashes, the records, the point, the scoring, the code), so a re-run computes
only the missing cells.

- :func:`damc_lambda_search` - DAMC's adaptive parameter adjustment on a multi-modality validation split;
- :func:`damc_lambda_from_own_tasks` - the fallback without one (rule stated there);
- :func:`mmer_search` - MMER's mask threshold λ and α;
- :func:`lambda_grid` - candidate λ vectors.

The composed models themselves (``compose_damc``, ``set_damc_coefficients``, ``compose_mmer``,
``remask``, ``set_mmer_masks``, ``set_mmer_alpha``) are :mod:`workbench.compose`'s.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
from torch import nn

from .. import compose as C
from ..errors import ConfigError
from ..evaluate import scorer_key
from .cache import records_digest, result_key
from .sweep import CellStore, run_sweep


def lambda_grid(n: int, values: Sequence[float] = (0.25, 0.5, 0.75, 1.0), mode: str = "uniform") -> list[tuple]:
    """Candidate λ vectors: ``"uniform"`` (the same λ for every expert), ``"product"`` (every
    combination; len(values)^n candidates) or ``"simplex"`` (combinations summing to 1, from
    ``values``; falls back to uniform 1/N if none)."""
    if mode == "uniform":
        return [tuple([float(v)] * n) for v in values]
    if mode == "product":
        return [tuple(float(x) for x in c) for c in itertools.product(values, repeat=n)]
    if mode == "simplex":
        out = [tuple(float(x) for x in c) for c in itertools.product(values, repeat=n) if abs(sum(c) - 1) < 1e-9]
        return out or [tuple([1.0 / n] * n)]
    raise ConfigError(f"unknown lambda grid mode {mode!r} (uniform, product, simplex)")


# ============================================================================================ cells
@dataclass(frozen=True)
class Recipe:
    """Plain data a worker rebuilds a composed model from: the zoo folder, the composition
    (``"damc"`` or ``"mmer"``), the zoo expert names in route order, MMER's merge method."""

    zoo: str
    method: str
    experts: tuple
    mmer_merge: str = "ties"

    def build(self) -> "_Live":
        """The composed model as :class:`workbench.studies.composition.ZooComposer` builds it."""
        from ..evaluate import CachedInputs
        from ..world import Zoo

        z = Zoo.coerce(self.zoo)
        tok = C.CachedTokenizer(z.tokenizer())
        srcs = [C.cached_source(C.zoo_expert(z, n)) for n in self.experts]
        base = C.load_causal_lm(z.base_path)
        if self.method == "damc":
            model = C.compose_damc(base, srcs, tok)
        elif self.method == "mmer":
            model = C.compose_mmer(base, srcs, tok, merge_method=self.mmer_merge)
        else:
            raise ConfigError(f"a search recipe composes 'damc' or 'mmer', not {self.method!r}")
        return _Live(model, CachedInputs(z.load_inputs), base, srcs)


@dataclass
class _Live:
    """A composed model in this process with what its cells need: the inputs' loader, and for MMER
    the base and experts (masks recomputed per λ, kept in ``parts``; ``masked``: the λ set now)."""

    model: Any
    load: Callable
    base: Any = None
    experts: Sequence = ()
    parts: dict = field(default_factory=dict)
    masked: float | None = None

    def mmer_parts(self, lam: float):
        if lam not in self.parts:
            self.parts[lam] = C.remask(self.model.mmer_parts, self.base, self.experts, lam)  # the same τ*
        return self.parts[lam]


@dataclass(frozen=True)
class SearchCell:
    """One grid point of a search: ``search`` (``"damc"``, ``"damc_own"``, ``"mmer"``) at ``point``
    (the λ vector; ``(λ,)``; ``(λ, α)``) scored on ``records`` (a list; for ``"damc_own"`` one list
    per modality). ``recipe`` rebuilds the model on a Ray worker; ``context`` names the live model
    of the driver (local executor)."""

    search: str
    point: tuple
    records: Any
    scoring: str
    recipe: Recipe | None
    context: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.search} {self.point}"


#: Per process: context key -> _Live. The local executor registers the driver's model here; a Ray
#: worker fills it from the recipe on its first cell of a model (one rebuilt model at a time).
_LIVE: dict[str, _Live] = {}


def _live(cell: SearchCell) -> _Live:
    key = cell.context or json.dumps([cell.recipe.zoo, cell.recipe.method, list(cell.recipe.experts),
                                      cell.recipe.mmer_merge])
    if key not in _LIVE:
        for other in [k for k in _LIVE if not k.startswith("driver-")]:
            del _LIVE[other]  # the previous search's model: a worker keeps one composed model in memory
        _LIVE[key] = cell.recipe.build()
    return _LIVE[key]


def _accuracy(model, records: Sequence[Mapping], load_inputs: Callable, scoring: str) -> float:
    from ..evaluate import accuracy, predict

    return accuracy(predict(model, records, load_inputs, scoring=scoring))


def run_search_cell(cell: SearchCell) -> dict:
    """The composed model at ``cell.point``, scored: one row of the search's table."""
    live = _live(cell)
    model = live.model
    if cell.search == "damc":
        C.set_damc_coefficients(model, cell.point)
        return {**{f"lambda_{i + 1}": float(v) for i, v in enumerate(cell.point)},
                **{f"modality_{i + 1}": m for i, m in enumerate(model.route_order)},
                "accuracy": _accuracy(model, cell.records, live.load, cell.scoring), "n_items": len(cell.records),
                "scoring": cell.scoring}
    if cell.search == "damc_own":
        v = cell.point[0]
        C.set_damc_coefficients(model, [v] * len(model.route_order))
        return {"lambda": float(v), **{f"acc_{m}": _accuracy(model, cell.records[m], live.load, cell.scoring)
                                       for m in model.route_order}}
    if cell.search == "mmer":
        lam, alpha = cell.point
        parts = live.mmer_parts(lam)
        if live.masked != lam:
            C.set_mmer_masks(model, parts)
            live.masked = lam
        C.set_mmer_alpha(model, alpha)
        return {"lam": float(lam), "alpha": float(alpha),
                "accuracy": _accuracy(model, cell.records, live.load, cell.scoring), "n_items": len(cell.records),
                "scoring": cell.scoring, **{f"density_{m}": d for m, d in zip(model.route_order, parts.density())}}
    raise ValueError(f"unknown search {cell.search!r}")


# ============================================================================================ the sweep
@dataclass(frozen=True)
class SearchSweep:
    """Where a search's cells run and are kept: ``executor`` (``"local"``, ``"ray"``) at ``address``;
    ``recipe`` (needed by ``"ray"``); ``store`` with ``identity`` (what the composed model is - the
    zoo's hashes of its members, their order, ...: part of every cell's key)."""

    executor: str = "local"
    address: str | None = None
    recipe: Recipe | None = None
    store: CellStore | None = None
    identity: Mapping | None = None


def _run(search: str, live: _Live, points: Sequence[tuple], records, scoring: str, sweep: SearchSweep | None,
         progress: bool, desc: str) -> list[dict]:
    """The rows of ``search`` at every point, in the points' order."""
    sweep = sweep or SearchSweep()
    if sweep.executor == "ray" and sweep.recipe is None:
        raise ConfigError("executor 'ray' rebuilds the composed model on its workers: the search needs a Recipe")
    if sweep.store is not None and sweep.identity is None:
        raise ConfigError("a search's store needs the identity of the composed model (part of the cells' keys)")
    context = f"driver-{id(live)}" if sweep.executor == "local" else ""
    cells = [SearchCell(search, tuple(float(x) for x in p), records, scoring, sweep.recipe, context) for p in points]
    keys = None
    if sweep.store is not None:
        recs = ({m: records_digest(r) for m, r in records.items()} if isinstance(records, Mapping)
                else records_digest(records))
        keys = [f"{search}-" + result_key({"kind": "search-cell", "search": search, **sweep.identity, "records": recs,
                                           "point": list(c.point), "scoring": scoring, **scorer_key()})
                for c in cells]
    if context:
        _LIVE[context] = live
    try:
        res = run_sweep(cells, run_search_cell, keys=keys, store=sweep.store, executor=sweep.executor,
                        address=sweep.address, progress=progress, desc=desc)
    finally:
        _LIVE.pop(context, None)
    return res.results


def _best(df: pd.DataFrame, column: str) -> int:
    """The selection rule of every search: the first row with the highest ``column``."""
    return int(df[column].to_numpy().argmax())


def _write(df: pd.DataFrame, csv: str | Path | None) -> None:
    if csv is not None:
        Path(csv).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(csv, index=False)


# ============================================================================================ the searches
def damc_lambda_search(model, records: Sequence[Mapping], load_inputs: Callable, *,
                       grid: Sequence[Sequence[float]] | None = None, scoring: str = "loglik",
                       csv: str | Path | None = None, progress: bool = True, sweep: SearchSweep | None = None):
    """DAMC's adaptive parameter adjustment: evaluate every λ vector of ``grid`` (default
    :func:`lambda_grid` uniform 0.25..1) on ``records`` (a validation split of multi-modality
    questions), keep the best (ties: the first). Writes the grid with accuracies to ``csv``.
    Returns ``(best λ tuple, DataFrame)``; the model is left at the best λ."""
    n = len(model.route_order)
    grid = list(grid) if grid is not None else lambda_grid(n)
    for lam in grid:
        if len(lam) != n:
            raise ConfigError(f"lambda {lam} has {len(lam)} values for {n} experts")
    df = pd.DataFrame(_run("damc", _Live(model, load_inputs), grid, records, scoring, sweep, progress,
                           "DAMC lambda search"))
    best = tuple(grid[_best(df, "accuracy")])
    C.set_damc_coefficients(model, best)
    _write(df, csv)
    return best, df


def damc_lambda_from_own_tasks(model, own_records: Mapping[str, Sequence[Mapping]], load_inputs: Callable, *,
                               values: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
                               expert_scores: Mapping[str, float] | None = None, scoring: str = "loglik",
                               csv: str | Path | None = None, progress: bool = True,
                               sweep: SearchSweep | None = None):
    """The fallback without a multi-modality validation set (rule chosen here; the paper's exact
    rule is **unverified**): for every uniform λ in ``values``, score the composed model on each
    modality's own-task records; the score of λ is the mean over modalities of the accuracy
    (divided by the expert's own accuracy when ``expert_scores`` is given, i.e. the mean
    retention); pick the best λ (ties: the smaller λ, listed first). Returns ``(λ tuple, DataFrame)``."""
    n = len(model.route_order)
    own = {m: own_records[m] for m in model.route_order}
    rows = _run("damc_own", _Live(model, load_inputs), [(v,) for v in sorted(values)], own, scoring, sweep, progress,
                "DAMC lambda (own tasks)")
    for row in rows:
        scores = [row[f"acc_{m}"] / expert_scores[m] * 100 if expert_scores else row[f"acc_{m}"]
                  for m in model.route_order]
        row["score"] = float(sum(scores) / len(scores))
    df = pd.DataFrame(rows)
    best = tuple([float(df["lambda"].iloc[_best(df, "score")])] * n)
    C.set_damc_coefficients(model, best)
    _write(df, csv)
    return best, df


def mmer_search(model, base, experts: Sequence, records: Sequence[Mapping], load_inputs: Callable, *,
                lams: Sequence[float] = (0.5, 1.0, 2.0), alphas: Sequence[float] = (0.5, 1.0, 1.5),
                scoring: str = "loglik", csv: str | Path | None = None, progress: bool = True,
                sweep: SearchSweep | None = None):
    """Choose MMER's λ (mask threshold) and α on validation ``records`` (a grid, λ-major; ties: first).
    Returns ``((λ, α), DataFrame)``; the model is left at the best pair (``model.mmer_parts``: its masks)."""
    base = base if isinstance(base, nn.Module) else C.load_causal_lm(base)  # read once for every λ
    live = _Live(model, load_inputs, base, experts)
    df = pd.DataFrame(_run("mmer", live, [(lam, a) for lam in lams for a in alphas], records, scoring, sweep,
                           progress, "MMER lambda/alpha"))
    i = _best(df, "accuracy")
    best = (float(df["lam"].iloc[i]), float(df["alpha"].iloc[i]))
    parts = live.mmer_parts(best[0])
    C.set_mmer_masks(model, parts)
    C.set_mmer_alpha(model, best[1])
    model.mmer_parts = parts  # type: ignore[attr-defined]
    _write(df, csv)
    return best, df


__all__ = ["Recipe", "SearchCell", "SearchSweep", "damc_lambda_from_own_tasks", "damc_lambda_search", "lambda_grid",
           "mmer_search", "run_search_cell"]
