"""Tests of workbench.studies.search: the composition study's λ searches as sweep cells - resumed from
their store, and the same choice and CSVs on the local executor and on a local Ray cluster (2 CPUs)."""
from __future__ import annotations

import pytest
import torch

from test_sweep import ray_cluster, tiny_zoo  # noqa: F401  (the fixtures: a local Ray cluster, the tiny zoo)
from workbench.routing import routed_modules
from workbench.studies import search as S
from workbench.studies.composition import ZooComposer

GRIDS = {"damc_grid": (0.5, 1.0), "mmer_lams": (0.5, 1.0), "mmer_alphas": (0.5, 1.0)}


def _mods(zoo):
    mods = tuple(m for m in ("image", "audio") if m in zoo.modalities)
    if ZooComposer(zoo, 0).members("damc", mods) is None:
        pytest.skip("the tiny zoo has no DAMC experts")
    return mods


def _search(zoo, tmp_path, name, **kw):
    """DAMC λ and MMER (λ, α) searched by a ZooComposer of seed 0: (notes, {csv name: text}, models)."""
    comp = ZooComposer(zoo, 0, search_dir=tmp_path / name, search_cache=tmp_path / "cells", **GRIDS, **kw)
    mods = _mods(zoo)
    models = {m: comp.build(m, mods) for m in ("damc", "mmer")}
    return comp.notes, {f.name: f.read_text() for f in sorted((tmp_path / name).glob("*.csv"))}, models


def _damc_coefficients(model) -> list:
    coefs = {p.tag: p.coef for rl in routed_modules(model.llm).values() for p in rl.routes["0"].parts}
    return [coefs[i] for i in range(len(model.route_order))]


def test_search_cells_are_stored_and_a_rerun_computes_only_the_missing(tiny_zoo, tmp_path, monkeypatch):  # noqa: F811
    calls = []
    real = S.run_search_cell
    monkeypatch.setattr(S, "run_search_cell", lambda cell: calls.append(cell.search) or real(cell))
    notes, csvs, _ = _search(tiny_zoo, tmp_path, "first")
    assert sorted(calls) == ["damc"] * 2 + ["mmer"] * 4
    assert len(csvs) == 2 and set(notes) == {"damc_lambda", "mmer"}
    stored = sorted((tmp_path / "cells").glob("mmer-*.json"))
    assert len(stored) == 4 and len(list((tmp_path / "cells").glob("damc-*.json"))) == 2
    stored[0].unlink()
    calls.clear()
    again, again_csvs, _ = _search(tiny_zoo, tmp_path, "again")
    assert calls == ["mmer"]  # only the missing cell
    assert again == notes and again_csvs == csvs


def test_ray_executor_chooses_and_writes_what_the_local_one_does(tiny_zoo, ray_cluster, tmp_path):  # noqa: F811
    local_notes, local_csvs, local_models = _search(tiny_zoo, tmp_path / "local", "csv")
    ray_notes, ray_csvs, ray_models = _search(tiny_zoo, tmp_path / "ray", "csv", executor="ray",
                                              ray_address=ray_cluster)
    assert ray_notes == local_notes
    assert ray_csvs == local_csvs  # the same bytes
    # the driver's models are left at the same point
    assert _damc_coefficients(ray_models["damc"]) == _damc_coefficients(local_models["damc"])
    lm, rm = local_models["mmer"].mmer_parts, ray_models["mmer"].mmer_parts
    assert lm.params == rm.params and all(torch.equal(a, b) for n in lm.masks for a, b in zip(lm.masks[n], rm.masks[n]))
    # the own-task fallback (no validation records)
    mods = _mods(tiny_zoo)
    own = {m: tiny_zoo.own_eval(m)[:12] for m in mods}
    results = []
    for executor in ("local", "ray"):
        comp = ZooComposer(tiny_zoo, 0, search=False)
        model = comp.build("damc", mods)
        best, df = S.damc_lambda_from_own_tasks(
            model, own, comp.load, values=(0.5, 1.0), progress=False,
            sweep=S.SearchSweep(executor, ray_cluster,
                                S.Recipe(str(tiny_zoo.path.resolve()), "damc", tuple(comp.members("damc", mods)))))
        results.append((best, df.to_csv(index=False), _damc_coefficients(model)))
    assert results[0] == results[1]
