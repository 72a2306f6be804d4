"""Tests of workbench.studies.merging_benchmark on the tiny zoo (built with the world's API if missing)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

torch.set_num_threads(1)

from workbench.studies import merging_benchmark as E  # noqa: E402
from workbench.studies import protocol as P  # noqa: E402
from workbench.studies import tables as T  # noqa: E402

METHODS = ["weight_average", "task_arithmetic"]
LAMBDAS = (0.0, 1.0)


@pytest.fixture(scope="session")
def tiny_zoo():
    """The tiny zoo: reused when its manifest lists the capability experts, else built."""
    from workbench.world import Zoo, build_zoo, zoo_root

    root = zoo_root("tiny")
    try:
        z = Zoo(root)
        if z.experts(family="capability", kind="full"):
            return z
    except FileNotFoundError:
        pass
    return build_zoo("tiny", jobs=1, progress=False)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("exp_cache")


@pytest.fixture(scope="session")
def cap_run(tiny_zoo, cache_dir):
    return E.capability_merging(tiny_zoo, "full", METHODS, LAMBDAS, device="cpu", cache=cache_dir, progress=False)


def _tasks(z):
    return list(z.manifest["config"]["capability"]["tasks"])


# ------------------------------------------------------------------------------------------ pure helpers
def test_split_records_disjoint_covering_order_free():
    recs = [{"id": f"r{i:03d}", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "A"}]}
            for i in range(41)]
    val, test = P.split_records(recs, 0.5, seed=0)
    ids_v, ids_t = {r["id"] for r in val}, {r["id"] for r in test}
    assert not ids_v & ids_t
    assert ids_v | ids_t == {r["id"] for r in recs}
    assert len(val) == round(0.5 * 41)
    val2, _ = P.split_records(list(reversed(recs)), 0.5, seed=0)
    assert [r["id"] for r in val2] == [r["id"] for r in val]
    val3, _ = P.split_records(recs, 0.5, seed=1)
    assert [r["id"] for r in val3] != [r["id"] for r in val]


def test_choose_lambda_mean_over_tasks_ties_smaller():
    rows = pd.DataFrame({"lambda": [0.1, 0.1, 0.5, 0.5, 1.0, 1.0],
                         "task": ["a", "b"] * 3,
                         # per-task best differs (a: 1.0, b: 0.1), mean best: 0.5 and 1.0 tie at 60
                         "accuracy": [40.0, 70.0, 50.0, 70.0, 80.0, 40.0]})
    assert P.choose_lambda(rows) == 0.5
    with pytest.raises(ValueError):
        P.choose_lambda(pd.DataFrame({"lambda": [0.1], "task": ["a"], "accuracy": [math.nan]}))


def test_ablation_entries_are_valid_registry_params():
    from workbench.merging import OPTMERGE_PRESETS, get_method

    for fam in ("full", "lora", "modality"):
        entries = E.ablation_entries(fam)
        assert [e.label for e in entries] == ["WUDI", "+SGD", "+Initialization", "+Low-rank"]
        for e in entries:
            get_method(e.method).check_params(e.params)
    last = E.ablation_entries("lora")[-1]
    p = OPTMERGE_PRESETS["lora"]
    assert (last.params["optimizer"], last.params["lr"], last.params["momentum"], last.params["init"]) == \
        (p["optimizer"], p["lr"], p["momentum"], p["init"])
    assert E.ablation_entries("lora")[1].params["init"] == "sum"
    assert E.ablation_entries("lora")[2].params["init"] == "mean"


def test_default_entries_use_the_scale_aware_step_unless_told():
    """05/06 run WUDI / OptMerge with our relative step (Adam: 0.1 x RMS; SGD: 1 / lambda_max);
    ``method_params`` restores the paper's absolute one."""
    e = {x.method: x.params for x in E.default_entries(["wudi", "optmerge", "ties"], "lora")}
    assert e["wudi"] == {"lr_scale": "relative", "lr": E.SCALE_AWARE_LR["adam"]}
    assert e["optmerge"] == {"preset": "lora", "lr_scale": "relative", "lr": E.SCALE_AWARE_LR["sgd"]}
    assert e["ties"] == {}
    full = {x.method: x.params for x in E.default_entries(["optmerge"], "full")}
    assert full["optmerge"]["lr"] == E.SCALE_AWARE_LR["adam"]
    paper = E.default_entries(["wudi"], "full", {"wudi": {"lr_scale": "absolute", "lr": 1e-5}})[0].params
    assert paper == {"lr_scale": "absolute", "lr": 1e-5}


def test_cache_key_carries_the_method_revision():
    """Cached predictions of WUDI / OptMerge made before their fix are not reused; others' are."""
    assert E.MergeEntry("OptMerge", "optmerge", {"preset": "lora"}).key["revision"] == E.METHOD_REVISION["optmerge"]
    assert E.MergeEntry("TIES", "ties", {}).key == {"method": "ties", "params": {}}


def test_full_rank_optmerge_objective_is_wudi():
    """The +SGD/+Initialization steps use optmerge with k_ratio=1 as 'the WUDI objective': check
    that its exact minimiser equals WUDI's on random tensors."""
    from workbench.merging import optmerge, wudi

    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 8, generator=g)
    experts = [base + 0.1 * torch.randn(12, 8, generator=g) for _ in range(3)]
    a = wudi(base, experts, solver="exact")
    b = optmerge(base, experts, solver="exact", k_ratio=1.0)
    assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------------ capability merging
def test_rows_shape(cap_run, tiny_zoo):
    df = cap_run
    tasks = _tasks(tiny_zoo)
    assert list(df.columns) == E.ROW_COLUMNS
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"]["error"].unique()
    merge = df[df["kind"] == "merge"]
    # weight average: once; task arithmetic: every lambda on val, one on test
    wa = merge[merge["method_id"] == "weight_average"]
    assert len(wa[wa["split"] == "val"]) == len(tasks) and len(wa[wa["split"] == "test"]) == len(tasks)
    ta = merge[merge["method_id"] == "task_arithmetic"]
    assert len(ta[ta["split"] == "val"]) == len(tasks) * len(LAMBDAS)
    assert len(ta[ta["split"] == "test"]) == len(tasks)
    assert ta.loc[ta["split"] == "test", "lambda"].nunique() == 1
    labels = set(df["method"])
    assert {"Base", "Weight Average", "Task Arithmetic"} <= labels
    assert {f"Indiv. {E.TASK_LABELS[t]}" for t in tasks} <= labels
    ok = df[df["n"] > 0]
    assert np.allclose(ok["accuracy"], 100 * ok["n_correct"] / ok["n"])
    assert (ok["ci_low"] <= ok["accuracy"]).all() and (ok["accuracy"] <= ok["ci_high"]).all()
    # validation and test items are disjoint splits of each task's file
    for t in tasks:
        n_all = len(tiny_zoo.capability_eval(t))
        b = df[(df["method"] == "Base") & (df["task"] == t)]
        assert b["n"].sum() == n_all


def test_lambda_chosen_on_validation_only(cap_run):
    ta = cap_run[cap_run["method_id"] == "task_arithmetic"]
    val = ta[ta["split"] == "val"]
    means = {}
    for lam in sorted(set(val["lambda"])):
        accs = [100.0 * r.n_correct / r.n for r in val[val["lambda"] == lam].itertuples()]
        means[lam] = sum(accs) / len(accs)
    best = max(means.values())
    expected = min(lam for lam, v in means.items() if v == best)
    chosen = ta.loc[ta["split"] == "test", "lambda"].unique()
    assert list(chosen) == [expected]
    assert set(val.loc[val["selected"], "lambda"]) == {expected}
    # no test row exists for a lambda that was not chosen
    assert set(ta.loc[ta["split"] == "test", "lambda"]) == {expected}


def test_task_arithmetic_lambda0_reproduces_base(cap_run):
    df = cap_run
    ta0 = df[(df["method_id"] == "task_arithmetic") & (df["lambda"] == 0.0) & (df["split"] == "val")]
    base = df[(df["method"] == "Base") & (df["split"] == "val")]
    a = ta0.set_index("task")["n_correct"].sort_index()
    b = base.set_index("task")["n_correct"].sort_index()
    assert a.to_dict() == b.to_dict()


def test_lambda0_weights_equal_base_exactly(tiny_zoo, tmp_path):
    setting = E.capability_setting(tiny_zoo, "full")
    seed = next(iter(setting.experts))
    mm = P.MergedLLM(setting, E.MergeEntry("TA", "task_arithmetic", {}), seed, torch.device("cpu"), tmp_path,
                      "interpolate", True, False)
    base = setting.load_base_llm().state_dict()  # theta_0 of the capability family: the instruct base VLM's LLM
    assert setting.base_llm_path == tiny_zoo.path / "capability" / "base" / "llm"
    m0 = mm.llm(0.0).state_dict()
    assert all(torch.equal(m0[k], base[k]) for k in base)
    m1 = mm.llm(1.0).state_dict()
    assert any(not torch.equal(m1[k], base[k]) for k in base)
    # the interpolated lambda = 0.5 matches the engine run with scale = 0.5
    mr = P.MergedLLM(setting, E.MergeEntry("TA", "task_arithmetic", {}), seed, torch.device("cpu"), tmp_path,
                      "remerge", True, False)
    half_i, half_r = mm.llm(0.5).state_dict(), mr.llm(0.5).state_dict()
    assert max(float((half_i[k] - half_r[k]).abs().max()) for k in base) < 1e-6
    assert not list(tmp_path.iterdir())  # temporary merges deleted


def test_weight_average_of_one_expert_reproduces_it(tiny_zoo, cache_dir):
    task = _tasks(tiny_zoo)[0]
    df = E.capability_merging(tiny_zoo, "full", ["weight_average"], (1.0,), device="cpu", tasks=[task],
                              keep_defaults=False, cache=cache_dir, progress=False)
    wa = df[df["method_id"] == "weight_average"].set_index(["task", "split"])["n_correct"].sort_index()
    ind = df[df["method"] == f"Indiv. {E.TASK_LABELS[task]}"].set_index(["task", "split"])["n_correct"].sort_index()
    assert wa.to_dict() == ind.to_dict()
    assert len(wa) == 2


def test_cache_hit_on_second_call(cap_run, tiny_zoo, cache_dir):
    again = E.capability_merging(tiny_zoo, "full", METHODS, LAMBDAS, device="cpu", cache=cache_dir, progress=False)
    assert again.attrs["cache_misses"] == 0
    assert again.attrs["cache_hits"] > 0
    assert again.attrs["versions"]["numpy"] == np.__version__  # the evaluating libraries, also in the .json
    cols = ["method", "task", "split", "lambda", "n_correct", "selected"]
    pd.testing.assert_frame_equal(again[cols].reset_index(drop=True), cap_run[cols].reset_index(drop=True))


def test_failing_method_is_reported(tiny_zoo, tmp_path):
    df = E.capability_merging(tiny_zoo, "full", ["ties", "task_arithmetic"], (1.0,), device="cpu",
                              method_params={"ties": {"density": 2.0}}, references=False, cache=tmp_path,
                              progress=False)
    ties = df[df["method_id"] == "ties"]
    assert len(ties) > 0 and (ties["status"] == "failed").all()
    assert ties["error"].str.contains("density").all()
    assert (df.loc[df["method_id"] == "task_arithmetic", "status"] == "ok").all()
    table = T.merge_table(df)
    assert (table.loc["TIES"].drop("lambda") == "failed").all()


def test_summarise_and_published(cap_run, tiny_zoo):
    from workbench.statistics import VERDICTS

    wide = T.merge_table(cap_run)
    labels = [E.TASK_LABELS[t] for t in _tasks(tiny_zoo)]
    assert list(wide.columns) == labels + ["Avg", "lambda"]
    assert {"Base", "Weight Average", "Task Arithmetic", E.INDIV_MEAN, E.INDIV_OWN} <= set(wide.index)
    for m in ("Base", "Weight Average", "Task Arithmetic"):
        assert math.isclose(float(wide.loc[m, "Avg"]), float(np.mean([float(wide.loc[m, c]) for c in labels])))
    # own-task row = each task's expert on its own task
    test = cap_run[cap_run["split"] == "test"]
    for t in _tasks(tiny_zoo):
        own = test[(test["method"] == f"Indiv. {E.TASK_LABELS[t]}") & (test["task"] == t)]["accuracy"].iloc[0]
        assert math.isclose(float(wide.loc[E.INDIV_OWN, E.TASK_LABELS[t]]), own)
    assert isinstance(T.merge_table(cap_run, fmt=True).loc["Base", "Avg"], str)
    cells, verdicts = T.compare_published(cap_run, "optmerge_table2")
    assert set(verdicts["verdict"]) <= set(VERDICTS)
    row = verdicts[verdicts["claim"] == "Task Arithmetic > Weight Average on Avg"].iloc[0]
    # paired on the cached test items; the paper's effect beside ours, both in points
    assert row["comparison"] == "paired" and row["n_items"] > 0
    assert math.isclose(row["published_effect"], 56.18 - 49.12)
    long = T.summary_long(cap_run)
    avg = long[long["benchmark"] == "Avg"].set_index("method")
    assert math.isclose(row["ours_lhs"] - row["ours_rhs"], avg.loc["Task Arithmetic", "mean"]
                        - avg.loc["Weight Average", "mean"], abs_tol=1e-6)
    base = cells[cells["method"] == "Base"].iloc[0]
    assert math.isclose(base["published"], 53.66) and not math.isnan(base["ours_mean"])


def test_paired_tests_consistent_with_counts(cap_run):
    t = T.paired_tests(cap_run, [("Task Arithmetic", "Base"), ("Weight Average", "Weight Average")])
    assert set(t["task"]) >= {"All"}
    for r in t.itertuples():
        assert math.isclose(r.acc_a - r.acc_b, 100.0 * (r.b - r.c) / r.n, abs_tol=1e-9)
    same = t[t["method_a"] == t["method_b"]]
    assert (same["b"] == 0).all() and (same["c"] == 0).all() and (same["pvalue"] == 1.0).all()
    test = cap_run[(cap_run["split"] == "test") & (cap_run["method"] == "Base")]
    assert int(t[(t["method_a"] == "Task Arithmetic") & (t["task"] == "All")]["n"].iloc[0]) == int(test["n"].sum())
    _, verdicts = T.compare_published(cap_run)
    row = verdicts[verdicts["claim"] == "Task Arithmetic > Weight Average on Avg"].iloc[0]
    assert 0.0 <= row["p"] <= 1.0


def test_write_csv(tiny_zoo, cache_dir, tmp_path):
    df = E.capability_merging(tiny_zoo, "full", ["task_arithmetic"], (1.0,), device="cpu", cache=cache_dir,
                              references=False, out=tmp_path, write=True, progress=False)
    back = pd.read_csv(tmp_path / "capability_full.csv")
    assert len(back) == len(df) and list(back.columns) == E.ROW_COLUMNS
    paths = T.write_tables(df, "capability_full", tmp_path, table="optmerge_table2")
    assert all(p.is_file() for p in paths.values())


def test_modality_and_solver_smoke(tiny_zoo, cache_dir):
    df = E.modality_merging(tiny_zoo, ["task_arithmetic"], (1.0,), device="cpu", cache=cache_dir, progress=False)
    assert (df["status"] == "ok").all()
    assert {"Task Arithmetic", "NaiveMC", "Base"} <= set(df["method"])
    assert "Avg" in T.merge_table(df).columns and not T.merge_table(df)["Avg"].isna().any()
    rows, costs = E.solver_comparison(tiny_zoo, "full", lambdas=(1.0,), device="cpu", cache=cache_dir,
                                      progress=False)
    assert (costs["status"] == "ok").all()
    c = costs.set_index("method")
    obj = c["objective"]
    for m in ("WUDI", "OptMerge"):
        # the exact minimiser's objective is never above an iterate's, nor any end above its start
        assert obj[f"{m} (exact)"] <= min(obj[f"{m} (iterative)"], obj[f"{m} (iterative, scale-aware)"]) + 1e-9
        assert (c.loc[c["method_id"] == m.lower(), "objective"] <= c.loc[c["method_id"] == m.lower(),
                                                                        "objective_start"]).all()
        # the mini world's task vectors are far from 7B scale: the paper's step hardly moves, ours does
        assert obj[f"{m} (iterative, scale-aware)"] < obj[f"{m} (iterative)"]
        assert c.loc[f"{m} (exact)", "converged"] == 1.0


def test_ablation_and_rank_sweep_run(tiny_zoo, cache_dir):
    a = E.optmerge_ablation(tiny_zoo, "full", (1.0,), device="cpu", cache=cache_dir, progress=False)
    assert (a["status"] == "ok").all()
    assert list(dict.fromkeys(a["method"])) == ["WUDI", "+SGD", "+Initialization", "+Low-rank"]
    r = E.rank_ratio_sweep(tiny_zoo, "full", (0.1, 0.5), (1.0,), device="cpu", cache=cache_dir, progress=False)
    assert (r["status"] == "ok").all() and set(r["method"]) == {"k=0.1", "k=0.5"}
    assert list(T.merge_table(r).index) == ["k=0.1", "k=0.5"]


def test_base_llm_copy_is_fresh_and_equal(tiny_zoo):
    setting = E.modality_setting(tiny_zoo, seeds=[0], max_items=4)
    a, b = P._base_llm_copy(setting), P._base_llm_copy(setting)
    ref = tiny_zoo.load_base_llm().state_dict()
    assert a is not b
    for k, v in ref.items():
        assert torch.equal(a.state_dict()[k], v) and torch.equal(b.state_dict()[k], v)
    k0 = next(iter(ref))
    with torch.no_grad():
        a.state_dict()[k0].add_(1.0)  # a copy: the cached base and the other copies are untouched
    assert torch.equal(b.state_dict()[k0], ref[k0]) and torch.equal(P._base_llm_copy(setting).state_dict()[k0], ref[k0])
    # the merged models' towers are shared and cached
    from workbench.compose import CachedTower

    src = setting.sources(0)
    assert src is setting.sources(0) and all(isinstance(e.tower, CachedTower) for e in src)


def test_modality_damc_search_shared_with_run_results(tiny_zoo, tmp_path, monkeypatch):
    """modality_merging's DAMC row reuses the λ search run_results stored under out/cache/search
    (the same composition on the same validation split): the same λ, no second search."""
    from workbench.studies import search as S
    from workbench.studies.composition import ZooComposer, run_results

    mods = list(tiny_zoo.modalities)
    if ZooComposer(tiny_zoo, 0).members("damc", mods) is None:
        pytest.skip("the tiny zoo has no DAMC experts")
    out = tmp_path / "res"
    run_results("tiny", zoo=tiny_zoo, out=out, methods=("damc",), benchmarks=(), own_tasks=True, max_items=2,
                scorings=("loglik",), damc_grid=(0.5, 1.0), progress=False)
    stored = list((out / "cache" / "search").glob("damc-*.json"))
    assert stored
    calls = []
    real = S.run_search_cell
    monkeypatch.setattr(S, "run_search_cell", lambda *a, **k: calls.append(1) or real(*a, **k))
    ev, _ = E._context(tiny_zoo, "cpu", True, out, False, "loglik", False)
    assert ev.search_cache == out / "cache" / "search"
    comp = ZooComposer(tiny_zoo, 0, search_cache=ev.search_cache, damc_grid=(0.5, 1.0))
    comp.build("damc", mods)
    assert calls == []
    run = __import__("json").loads((out / "run.json").read_text())
    assert comp.notes["damc_lambda"] == run["notes"]["s0"]["damc_lambda"]


def test_naive_mc_one_definition_for_notebooks_02_and_06(tiny_zoo):
    """NaiveMC is built by one function (ZooComposer.build): notebook 06 composes the experts every merged row
    is built from (all modalities), notebook 02 each record's modalities; in both, the LLM equals θ0 + the mean
    of the experts' task vectors computed here from their LLM files, with every one of their towers."""
    from workbench.studies.composition import ZooComposer

    seed = tiny_zoo.manifest["config"]["seeds"][0]
    setting = E.modality_setting(tiny_zoo, [seed], max_items=2)
    mods = list(setting.base_hash["mods"])
    comp = ZooComposer(tiny_zoo, seed, expert_kind="full", search=False, val_records=[])
    assert comp.members("naive_mc", mods) == setting.experts[seed]  # 06: the merged rows' experts
    base = tiny_zoo.load_base_llm().state_dict()
    for subset in (mods, mods[:1]):  # all of them (06; an MCUB record of every modality in 02), one alone
        names = comp.members("naive_mc", subset)
        llms = [tiny_zoo.load_llm(n).state_dict() for n in names]
        model = comp.build("naive_mc", subset)
        got = model.llm.state_dict()
        assert set(got) == set(base)
        for k, b in base.items():
            want = b.float() + sum(sd[k].float() - b.float() for sd in llms) / len(llms)
            torch.testing.assert_close(got[k].float(), want, rtol=1e-5, atol=1e-6, msg=f"{subset}: {k}")
        assert set(model.towers) == set(subset)
    assert any(not torch.equal(got[k], base[k]) for k in base)  # the experts moved the LLM: the check bites


def test_each_task_is_scored_as_cap_task_scoring_says(tiny_zoo, tmp_path, monkeypatch):
    """A task named in CAP_TASK_SCORING (OCR in the default world) is scored by that scoring, every
    other task by the study's; the predictions of each are cached apart."""
    from workbench.paths import repo_root

    tasks = _tasks(tiny_zoo)
    monkeypatch.setattr(E, "CAP_TASK_SCORING", {tasks[1]: "generate"})
    df = E.capability_merging(tiny_zoo, "full", ["weight_average"], (1.0,), device="cpu", cache=tmp_path / "c",
                              progress=False)
    assert df.attrs["task_scoring"] == {tasks[1]: "generate"} and df.attrs["scoring"] == "loglik"
    for row in df[df["n"] > 0].itertuples():
        f = Path(row.pred_file)
        pred = pd.read_csv(f if f.is_absolute() else repo_root() / f)
        assert set(pred["scoring"]) == {"generate" if row.task == tasks[1] else "loglik"}, (row.method, row.task)
