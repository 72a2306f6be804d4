"""The statistics module: bootstrap, McNemar, Holm, power, inertness and the one verdict rule."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from workbench import statistics as S


def _items(acc_by_seed, n, rng, ids=None, shared=None):
    """Per-item frame of one method: ``acc_by_seed[s]`` accuracy on ``n`` items of every seed."""
    rows = []
    for s, p in enumerate(acc_by_seed):
        correct = rng.random(n) < p if shared is None else shared[s]
        rows.append(pd.DataFrame({"seed": s, "id": [f"q{i}" for i in range(n)], "correct": correct}))
    return pd.concat(rows, ignore_index=True)


def _pair(rng, p_both, p_a_only, p_b_only, n=200, seeds=3):
    """Paired outcomes with planted discordance rates: A right/B wrong w.p. p_a_only, the reverse p_b_only."""
    a, b = [], []
    for s in range(seeds):
        u = rng.random(n)
        ca = (u < p_both) | ((u >= p_both) & (u < p_both + p_a_only))
        cb = (u < p_both) | ((u >= p_both + p_a_only) & (u < p_both + p_a_only + p_b_only))
        ids = [f"q{i}" for i in range(n)]
        a.append(pd.DataFrame({"seed": s, "id": ids, "correct": ca}))
        b.append(pd.DataFrame({"seed": s, "id": ids, "correct": cb}))
    return pd.concat(a, ignore_index=True), pd.concat(b, ignore_index=True)


def test_holm_matches_a_hand_computation():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone 0.06
    assert S.holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1, NaN left out of the family (m = 2 here)
    out = S.holm([0.6, math.nan, 0.02])
    assert out[0] == pytest.approx(0.6) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert S.holm([0.9, 0.3]).tolist() == pytest.approx([0.9, 0.6])  # 0.3 * 2, then max(0.6, 0.9 * 1)


def test_mcnemar_is_the_binomial_test_on_discordant_pairs():
    a = [1] * 10 + [0] * 3 + [1] * 20
    b = [0] * 10 + [1] * 3 + [1] * 20
    t = S.mcnemar_exact(a, b)
    assert (t["b"], t["c"], t["n"]) == (10, 3, 33)
    assert t["pvalue"] == pytest.approx(stats.binomtest(10, 13, 0.5).pvalue)
    for b, c in [(0, 1), (5, 5), (7, 2), (30, 41)]:
        x = S.mcnemar_exact([1] * b + [0] * c, [0] * b + [1] * c)["pvalue"]
        assert x == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)


def test_bootstrap_is_seeded_deterministic_and_covers_the_mean():
    rng = np.random.default_rng(1)
    units = [[rng.integers(0, 2, 150) * 100.0, rng.integers(0, 2, 90) * 100.0] for _ in range(3)]
    one = S.hierarchical_bootstrap(units, n_boot=2000, seed=7)
    two = S.hierarchical_bootstrap(units, n_boot=2000, seed=7)
    assert one[:3] == two[:3] and np.array_equal(one[3], two[3])
    assert S.hierarchical_bootstrap(units, n_boot=2000, seed=8)[1] != one[1]
    est = np.mean([np.mean([x.mean() for x in u]) for u in units])
    assert one[0] == pytest.approx(est) and one[1] < est < one[2]
    # one unit, one stratum: the item bootstrap's spread is the binomial standard error
    x = np.r_[np.ones(60), np.zeros(140)] * 100
    _, lo, hi, boot = S.hierarchical_bootstrap([[x]], n_boot=4000, seed=0)
    assert boot.std() == pytest.approx(100 * math.sqrt(0.3 * 0.7 / 200), rel=0.1)


def test_bootstrap_resamples_seeds():
    # every item identical within a seed: the only variance is between seeds
    units = [[np.full(50, v)] for v in (10.0, 20.0, 60.0)]
    _, lo, hi, boot = S.hierarchical_bootstrap(units, n_boot=2000, seed=0)
    assert set(np.round(np.unique(boot), 6)) <= {round(x, 6) for x in
                                                 [(i * 10 + j * 20 + k * 60) / 3 for i in range(4) for j in range(4)
                                                  for k in range(4) if i + j + k == 3]}
    assert lo < 30 < hi


def test_planted_effect_is_reproduced_and_the_opposite_is_not():
    rng = np.random.default_rng(0)
    a, b = _pair(rng, 0.4, 0.2, 0.05)
    rows = [S.compare(a, b, "A > B"), S.compare(b, a, "B > A")]
    v = S.verdict_table(rows, family="test")
    assert v["verdict"].tolist() == [S.REPRODUCED, S.NOT_REPRODUCED]
    assert v.loc[0, "effect"] > 10 and v.loc[0, "ci_low"] > 0 and v.loc[0, "comparison"] == "paired"
    assert v.loc[0, "p_holm"] == pytest.approx(min(1.0, 2 * v.loc[0, "p"]))
    assert v["family"].iloc[0] == "test (2 tested claims)"
    # a "<" claim flips the direction
    assert S.verdict_table([S.compare(b, a, "B < A", relation="<")], "t")["verdict"][0] == S.REPRODUCED


def test_a_presupposing_claim_takes_the_weaker_verdict():
    """"The gain grows" presupposes the gain: reproduced only where the gain is; a significant loss at the larger
    benchmark makes it not reproduced however the gap moves; an inconclusive gain leaves it inconclusive, with the
    gain's items_80."""
    rng = np.random.default_rng(3)
    win, lose, tie = _pair(rng, 0.4, 0.2, 0.05), _pair(rng, 0.4, 0.05, 0.2), _pair(rng, 0.4, 0.1, 0.1, n=60)

    def table(gain_pair):
        rows = [dict(S.compare(*gain_pair, "gain on big", published=(50.0, 45.0))),
                dict(S.compare(*win, "the gain grows"), requires="gain on big")]
        return S.verdict_table(rows, family="t").set_index("claim")

    alone = S.verdict_table([S.compare(*win, "the gain grows")], "t")
    assert alone["verdict"][0] == S.REPRODUCED  # the same test, without its presupposition
    assert table(win).loc["the gain grows", "verdict"] == S.REPRODUCED
    lost = table(lose)
    assert lost.loc["gain on big", "verdict"] == S.NOT_REPRODUCED
    assert lost.loc["the gain grows", "verdict"] == S.NOT_REPRODUCED
    assert "presupposes 'gain on big': not reproduced" in lost.loc["the gain grows", "reason"]
    open_ = table(tie)
    assert open_.loc["gain on big", "verdict"] == S.INCONCLUSIVE
    assert open_.loc["the gain grows", "verdict"] == S.INCONCLUSIVE
    assert open_.loc["the gain grows", "items_80"] == open_.loc["gain on big", "items_80"] > 0
    # the weaker of the two, whichever side it is on
    assert S.presupposing((S.INCONCLUSIVE, "a"), (S.REPRODUCED, "b"), "x") == (S.INCONCLUSIVE, "a; presupposes 'x': reproduced")
    assert S.presupposing((S.REPRODUCED, "a"), (S.NOT_TESTABLE, "b"), "x")[0] == S.NOT_TESTABLE
    with pytest.raises(ValueError, match="requires 'nowhere'"):
        S.verdict_table([dict(S.compare(*win, "c"), requires="nowhere")], "t")


def _null_row(rng, n=80, seeds=2, n_boot=200):
    """The pieces of S.compare on simulated paired outcomes without an effect (numpy only, fast)."""
    ca, cb = rng.random((seeds, n)) < 0.45, rng.random((seeds, n)) < 0.45
    t = S.mcnemar_exact(ca.ravel(), cb.ravel())
    est, lo, hi, _ = S.hierarchical_bootstrap([[100.0 * (x.astype(float) - y)] for x, y in zip(ca, cb)], n_boot=n_boot,
                                              seed=int(rng.integers(1 << 30)))
    return {"claim": "null", "effect": est, "ci_low": lo, "ci_high": hi, "p": t["pvalue"],
            "published_effect": math.nan}


def test_null_effect_false_reproduced_rate_with_holm():
    rng = np.random.default_rng(123)
    # the fast rows are what compare() computes (same p, same interval for the same bootstrap seed)
    ca, cb = rng.random((2, 80)) < 0.45, rng.random((2, 80)) < 0.45
    frame = lambda c: pd.DataFrame({"seed": np.repeat([0, 1], 80), "id": np.tile(np.arange(80), 2),
                                    "correct": c.ravel()})
    full = S.compare(frame(ca), frame(cb), "x", n_boot=300, seed=5)
    est, lo, hi, _ = S.hierarchical_bootstrap([[100.0 * (x.astype(float) - y)] for x, y in zip(ca, cb)], n_boot=300, seed=5)
    assert (full["effect"], full["ci_low"], full["ci_high"]) == pytest.approx((est, lo, hi))
    assert full["p"] == S.mcnemar_exact(ca.ravel(), cb.ravel())["pvalue"]
    families, false_hits, raw = 200, 0, 0
    for _ in range(families):
        rows = [_null_row(rng) for _ in range(5)]
        false_hits += (S.verdict_table(rows, "null")["verdict"] == S.REPRODUCED).any()
        raw += any(r["p"] < 0.05 and r["ci_low"] > 0 for r in rows)  # the same claims without Holm
    assert false_hits / families <= 0.05
    assert raw > false_hits


def test_identical_predictions_and_flat_objectives_are_not_testable():
    rng = np.random.default_rng(2)
    a = _items([0.5, 0.5], 100, rng).assign(pred="A")
    row = S.compare(a, a.copy(), "OptMerge > WUDI", published=(57.4, 57.0))
    v = S.verdict_table([row], "t")
    assert v["verdict"][0] == S.NOT_TESTABLE and "identical predictions" in v["reason"][0]
    assert math.isnan(v["p_holm"][0])
    # the iterative solver barely moved: 40 -> 32 while the exact solve reaches 4
    assert S.optimiser_inert(start=40.0, reached=32.0, exact=4.06)
    assert not S.optimiser_inert(start=40.0, reached=10.0, exact=4.06)
    b = a.copy()
    b["correct"] = ~b["correct"]
    inert = S.compare(b, a, "iterative > exact", inert="optimiser did not reduce its objective")
    assert S.verdict_table([inert], "t")["verdict"][0] == S.NOT_TESTABLE
    # a parameter sweep whose predictions do not change
    assert S.sweep_inert({0.2: a, 0.3: a.copy()})
    assert not S.sweep_inert({0.2: a, 0.3: a.assign(pred="B")})


def test_smaller_than_published_and_power():
    rng = np.random.default_rng(3)
    a, b = _pair(rng, 0.4, 0.1, 0.1, n=400)
    v = S.verdict_table([S.compare(a, b, "TIES > WA", published=(56.7, 49.1))], "t")
    assert v["verdict"][0] == S.NOT_REPRODUCED and "smaller than published" in v["reason"][0]
    # inconclusive: a published effect inside our interval -> items for 80% power (Connor 1987 by hand)
    v = S.verdict_table([S.compare(a, b, "TIES > WA", published=(50.5, 50.0))], "t")
    assert v["verdict"][0] == S.INCONCLUSIVE
    psi = (v["b"][0] + v["c"][0]) / v["n_items"][0]
    d = 0.005
    hand = (stats.norm.ppf(0.975) * math.sqrt(psi) + stats.norm.ppf(0.8) * math.sqrt(psi - d * d)) ** 2 / d ** 2
    assert v["items_80"][0] == math.ceil(hand)
    # unpaired: two-proportion formula per side
    assert S.items_for_power(10.0, p_a=50.0, p_b=40.0) == math.ceil(
        (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) ** 2 * (0.25 + 0.24) / 0.01)


def test_unpaired_and_level_claims():
    rng = np.random.default_rng(4)
    a = _items([0.7, 0.7, 0.7], 150, rng)
    b = _items([0.4, 0.4, 0.4], 120, rng)
    row = S.compare(a, b, "mcub-3 > mcub-2", paired=False)
    assert row["comparison"].startswith("unpaired") and row["effect"] > 20
    lv = S.compare_level(pd.DataFrame({"value": [0.5, 1.5, 1.0, 2.0]}), 0.0, "forgetting > 0")
    assert lv["p"] == pytest.approx(stats.ttest_1samp([0.5, 1.5, 1.0, 2.0], 0.0).pvalue)
    v = S.verdict_table([row, lv], "t")
    assert v["verdict"].tolist() == [S.REPRODUCED, S.REPRODUCED]
    assert "reproduced" in S.claims_sentence(v) and S.verdict_counts(v)[S.REPRODUCED] == 2
    assert list(S.verdict_view(v).columns)[:4] == ["claim", "comparison", "published", "ours"]


def test_compare_rejects_bad_input():
    with pytest.raises(ValueError, match="relation"):
        S.compare(pd.DataFrame(), pd.DataFrame(), "x", relation="=")
    with pytest.raises(ValueError, match="seed"):
        S.compare(pd.DataFrame({"id": [1], "correct": [True]}), pd.DataFrame({"id": [1], "correct": [True]}), "x")
    assert S.compare(pd.DataFrame(), pd.DataFrame({"seed": [0]}), "x")["inert"].startswith("no result")


# ------------------------------------------------------------------ the merging benchmark's claims (no zoo needed)
def _experiment(tmp_path, cached=True):
    """Experiment rows (workbench.studies.merging_benchmark.ROW_COLUMNS) of a synthetic Table 2 with cached item predictions:
    OptMerge 20 points above the others, WUDI's predictions identical to OptMerge's."""
    from workbench.studies import merging_benchmark as E

    rng = np.random.default_rng(0)
    n, rows = 60, []
    truth = {(s, t): rng.random(n) for s in (0, 1) for t in ("vqa", "chart")}
    acc = {"Base": 0.3, "Weight Average": 0.4, "Task Arithmetic": 0.42, "TIES": 0.41, "WUDI": 0.6, "OptMerge": 0.6,
           "Indiv. VQA": 0.45, "Indiv. Chart": 0.45}
    kind = {"Base": "base", "Indiv. VQA": "indiv", "Indiv. Chart": "indiv"}
    for m, p in acc.items():
        for (s, t), u in truth.items():
            correct = u < p
            f = tmp_path / f"{m}-{s}-{t}.csv".replace(" ", "_")
            pd.DataFrame({"id": [f"{t}{i}" for i in range(n)], "correct": correct, "pred": np.where(correct, "A", "B"),
                          "gold": "A"}).to_csv(f, index=False)
            k = int(correct.sum())
            rows.append({"method": m, "method_id": m, "kind": kind.get(m, "merge"), "task": t, "split": "test",
                         "lambda": 1.0, "searched": False, "selected": True, "seed": s, "n": n, "n_correct": k,
                         "accuracy": 100 * k / n, "ci_low": math.nan, "ci_high": math.nan, "status": "ok", "error": "",
                         "params": "{}", "pred_file": str(f) if cached else ""})
    return pd.DataFrame(rows, columns=E.ROW_COLUMNS)


def test_compare_published_paired_and_inert(tmp_path):
    from workbench.studies import tables as T

    df = _experiment(tmp_path)
    cells, v = T.compare_published(df, "optmerge_table2")
    v = v.set_index("claim")
    assert v.loc["OptMerge > Task Arithmetic on Avg", "verdict"] == S.REPRODUCED
    assert v.loc["OptMerge > Task Arithmetic on Avg", "comparison"] == "paired"
    assert v.loc["OptMerge > Task Arithmetic on Avg", "published_effect"] == pytest.approx(57.44 - 56.18)
    wudi = v.loc["OptMerge > WUDI on Avg"]
    assert wudi["verdict"] == S.NOT_TESTABLE and "identical predictions" in wudi["reason"]
    assert v.loc["merging (OptMerge) beats the individual experts' average", "verdict"] == S.REPRODUCED
    assert v["family"].iloc[0].startswith("optmerge_table2")
    # the optimiser check found by the caller makes its claims not testable
    _, v2 = T.compare_published(df, "optmerge_table2", inert={"TIES": "objective barely moved"})
    assert v2.set_index("claim").loc["OptMerge > TIES on Avg", "verdict"] == S.NOT_TESTABLE
    # without cached predictions: the unpaired comparison, labelled so
    _, v3 = T.compare_published(_experiment(tmp_path, cached=False), "optmerge_table2")
    row = v3.set_index("claim").loc["OptMerge > Task Arithmetic on Avg"]
    assert row["comparison"].startswith("unpaired") and row["verdict"] == S.REPRODUCED
    indiv = v3.set_index("claim").loc["merging (OptMerge) beats the individual experts' average"]
    assert indiv["verdict"] == S.REPRODUCED and indiv["ours_rhs"] == pytest.approx(
        v.loc["merging (OptMerge) beats the individual experts' average", "ours_rhs"], abs=1.0)
    # the notebook's path: one family over two tables, written through write_tables
    fam = S.verdict_table(pd.concat([v.reset_index(), v3], ignore_index=True), "05")
    assert fam["family"].iloc[0] == f"05 ({int(fam['p_holm'].notna().sum())} tested claims)"
    paths = T.write_tables(df, "05_capability_full", tmp_path / "out", "optmerge_table2", verdicts=fam)
    assert len(pd.read_csv(paths["verdicts"])) == len(fam)


def test_solver_inert_reads_the_costs_table():
    from workbench.studies import merging_benchmark as E

    costs = pd.DataFrame([
        {"method_id": "wudi", "solver": "iterative", "seed": 0, "objective": 32.0, "objective_start": 40.0, "status": "ok"},
        {"method_id": "wudi", "solver": "exact", "seed": 0, "objective": 4.06, "objective_start": 40.0, "status": "ok"},
        {"method_id": "optmerge", "solver": "iterative", "seed": 0, "objective": 5.0, "objective_start": 40.0,
         "status": "ok"},
        {"method_id": "optmerge", "solver": "exact", "seed": 0, "objective": 0.0, "objective_start": 40.0, "status": "ok"}])
    out = E.solver_inert(costs)
    assert list(out) == ["WUDI"] and "32" in out["WUDI"]
    assert E.solver_inert(costs.drop(columns="objective_start")) == {}


def test_composition_claims_from_predictions():
    """Notebooks 02/03's claim builders on a synthetic predictions.csv: planted NaiveMC > frozen, DAMC < NaiveMC."""
    from workbench.studies import report

    rng = np.random.default_rng(5)
    acc = {"naive_mc": 0.6, "frozen": 0.3, "damc": 0.45, "expert": 0.7}
    rows = []
    for seed in (0, 1, 2):
        for bench, n in (("mcub-2", 120), ("mcub-3", 100), ("own:image", 100)):
            u = rng.random(n)
            for m, p in acc.items():
                if bench.startswith("own:") and m in ("frozen", "damc"):
                    continue
                rows.append(pd.DataFrame({"id": [f"{bench}-{i}" for i in range(n)], "benchmark": bench, "seed": seed,
                                          "method": m, "scoring": "generate", "correct": u < p, "pred": "x"}))
    pred = pd.concat(rows, ignore_index=True)
    v = S.verdict_table(report.naivemc_claims(pred, "generate"), "02").set_index("claim")
    assert v.loc["NaiveMC > Frozen LLM on mcub-2", "verdict"] == S.REPRODUCED
    assert v.loc["Single expert > NaiveMC on own:image", "verdict"] == S.REPRODUCED
    assert v.loc["NaiveMC: mcub-3 > mcub-2 (more modalities)", "comparison"].startswith("unpaired")
    d = S.verdict_table(report.damc_claims(pred, "generate", published=(66.79, 66.88)), "03").set_index("claim")
    assert d.loc["DAMC > NaiveMC on mcub-2", "verdict"] == S.NOT_REPRODUCED
    assert d.loc["DAMC > NaiveMC on mcub-2", "published_effect"] == pytest.approx(-0.09)
    # DAMC loses on mcub-3 too: its "gap grows" claim presupposes a gain there, so it cannot be reproduced
    assert d.loc["DAMC > NaiveMC on mcub-3", "verdict"] == S.NOT_REPRODUCED
    assert d.loc["gap grows: mcub-3 > mcub-2", "verdict"] == S.NOT_REPRODUCED
    gap = report.paired_difference(pred[pred["benchmark"] == "mcub-2"], "damc", "naive_mc", scoring="generate")
    assert gap.loc[0, "mean"] == pytest.approx(d.loc["DAMC > NaiveMC on mcub-2", "effect"])


def test_cache_keys_carry_the_code_digest(tmp_path, monkeypatch):
    from workbench import evaluate
    from workbench.studies import cache

    def write_code(folder, fixed=False):  # files as named; a folder entry (the merge methods) with two modules
        folder.mkdir(exist_ok=True)
        for name in evaluate.PREDICTION_CODE:
            if name.endswith(".py"):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)  # studies/search.py
                (folder / name).write_text(f"# {name}\n")
            else:
                (folder / name).mkdir()
                (folder / name / "linear.py").write_text("# linear\n")
                (folder / name / "ties_dare.py").write_text("# ties\n" + ("fixed = True\n" if fixed else ""))
                (folder / name / "notes.txt").write_text("not code")

    write_code(tmp_path)
    before = evaluate.code_digest(str(tmp_path))
    assert before == evaluate.code_digest(str(tmp_path)) and len(before) == 16
    (tmp_path / "merging" / "notes.txt").write_text("edited, still not code")
    evaluate.code_digest.cache_clear()
    assert evaluate.code_digest(str(tmp_path)) == before  # a folder entry hashes its *.py files only
    write_code(tmp_path / "sub", fixed=True)
    assert evaluate.code_digest(str(tmp_path / "sub")) != before  # one edited method -> another digest
    key = cache.result_key({"a": 1})
    monkeypatch.setattr(cache, "code_digest", lambda: "0" * 16)
    assert cache.result_key({"a": 1}) != key
    with pytest.raises(FileNotFoundError, match="missing"):
        evaluate.code_digest(str(tmp_path / "nowhere"))


def test_gain_retention_is_the_share_of_the_experts_mean_gain():
    """Two tasks, two seeds: base 50/60, own experts 80/70 (gains 30, 10: mean 20); a merge at 60/62 keeps
    (10 + 2) / 2 / 20 = 30%; mixture training at 70/68 keeps 70%; seed-wise values, then the mean over seeds."""
    from workbench.studies.tables import gain_retention

    rows = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        acc = {("Base", "base"): (50, 60), ("Indiv. VQA", "indiv"): (80, 40), ("Indiv. Chart", "indiv"): (30, 70),
               ("TIES", "merge"): (60 + shift, 62 + shift), ("Mixture Training", "oracle"): (70, 68)}
        for (method, kind), (a_vqa, a_chart) in acc.items():
            for task, a in (("vqa", a_vqa), ("chart", a_chart)):
                rows.append({"method": method, "kind": kind, "task": task, "split": "test", "selected": True,
                             "status": "ok", "seed": seed, "accuracy": float(a)})
    out = gain_retention(pd.DataFrame(rows)).set_index("method")
    assert out.loc["TIES", "kept_gain"] == pytest.approx((30.0 + 40.0) / 2)  # seed 0: 12/20, seed 1: 16/20
    assert out.loc["Mixture Training", "kept_gain"] == pytest.approx(70.0)
    assert out.loc["Base", "kept_gain"] == 0.0 and out.loc["TIES", "n_seeds"] == 2
    assert out.loc["TIES", "avg_minus_base"] == pytest.approx(7.0)
    assert out.loc["TIES", "normalized"] == pytest.approx(100 * np.mean([(60 / 80 + 62 / 70) / 2, (62 / 80 + 64 / 70) / 2]))
    assert out.loc["TIES", "kept_gain_low"] < 35.0 < out.loc["TIES", "kept_gain_high"]
    assert list(out.index[:2]) == ["Mixture Training", "TIES"]  # sorted by kept share


def test_seeds_for_power_is_the_t_tests_exact_power():
    """Against Cohen's (1988) one-sample table (two-sided, alpha 0.05, power 0.8: d = 0.5 -> 34, 0.8 -> 15,
    1.0 -> 10 units) and against a simulation of the t-test at the size it returns and one seed fewer."""
    assert [S.seeds_for_power(d, 1.0) for d in (0.5, 0.8, 1.0)] == [34, 15, 10]
    assert S.seeds_for_power(-2.0, 4.0) == S.seeds_for_power(2.0, 4.0) == 34  # scale-free, either sign
    rng = np.random.default_rng(0)
    effect, sd, alpha = 2.5, 2.0, 0.01    # 11 seeds: power 0.81 there, 0.74 at 10
    n = int(S.seeds_for_power(effect, sd, alpha=alpha))

    def rejected(k, reps=40_000):
        x = rng.normal(effect, sd, (reps, k))
        t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(k))
        return float((np.abs(t) > stats.t.ppf(1 - alpha / 2, k - 1)).mean())

    assert n == 11 and rejected(n) > 0.795 and rejected(n - 1) < 0.76
    # a large standardised effect at a Bonferroni level (scipy's far lower tail is NaN there): 9 seeds, 0.88 / 0.78
    effect, sd, alpha = 2.26, 1.24, 0.05 / 12
    n = int(S.seeds_for_power(effect, sd, alpha=alpha))
    assert n == 9 and rejected(n) > 0.86 and rejected(n - 1) < 0.79
    assert math.isnan(S.seeds_for_power(1.0, 0.0)) and math.isnan(S.seeds_for_power(0.0, 1.0))
    assert S.seeds_for_power(1e-3, 10.0) == math.inf


def test_every_inconclusive_claim_states_the_sample_that_would_decide_it():
    """Seeds that disagree (one seed with a large gain, two without: pooled McNemar significant, the seed-level
    interval not): seeds_80 from the spread of the per-seed effects; a level claim over three seeds and an unpaired
    claim with no published number get theirs too (from our effect); a decided claim gets none."""
    rng = np.random.default_rng(5)
    a1, b1 = _pair(rng, 0.4, 0.25, 0.02, n=400, seeds=1)
    a2, b2 = _pair(rng, 0.4, 0.08, 0.08, n=400, seeds=2)
    a = pd.concat([a1, a2.assign(seed=a2["seed"] + 1)], ignore_index=True)
    b = pd.concat([b1, b2.assign(seed=b2["seed"] + 1)], ignore_index=True)
    row = S.compare(a, b, "A > B (seeds disagree)", published=(60.0, 57.0))
    per_seed = [100 * (g_a["correct"].mean() - g_b["correct"].mean()) for (_, g_a), (_, g_b)
                in zip(a.groupby("seed"), b.groupby("seed"))]
    assert row["seed_sd"] == pytest.approx(np.std(per_seed, ddof=1))
    level = S.compare_level(pd.DataFrame({"value": [96.0, 91.0, 98.5]}), 99.0, "retains >= 99%")
    far, near = _items([0.6] * 3, 300, rng), _items([0.57] * 3, 300, rng)
    unpaired = S.compare(far, near, "mcub-4 > mcub-2", paired=False)
    decided = S.compare(*_pair(rng, 0.4, 0.2, 0.02), "A > B (clear)")
    v = S.verdict_table([row, level, unpaired, decided], "t").set_index("claim")
    assert v.loc["A > B (seeds disagree)", "verdict"] == S.INCONCLUSIVE
    assert "seeds disagree" in v.loc["A > B (seeds disagree)", "reason"]
    m = 4  # Bonferroni over the family's tested claims
    assert v.loc["A > B (seeds disagree)", "seeds_80"] == S.seeds_for_power(3.0, row["seed_sd"], alpha=0.05 / m) > 3
    assert v.loc["retains >= 99%", "verdict"] == S.INCONCLUSIVE
    assert v.loc["retains >= 99%", "seeds_80"] == S.seeds_for_power(level["effect"], np.std([96, 91, 98.5], ddof=1),
                                                                     alpha=0.05 / m)
    assert math.isnan(v.loc["retains >= 99%", "items_80"])  # the units are seeds: no item model
    assert v.loc["mcub-4 > mcub-2", "verdict"] == S.INCONCLUSIVE
    assert v.loc["mcub-4 > mcub-2", "items_80"] == S.items_for_power(
        unpaired["effect"], p_a=unpaired["ours_lhs"], p_b=unpaired["ours_rhs"], alpha=0.05 / m)
    assert np.isfinite(v.loc["mcub-4 > mcub-2", "seeds_80"])
    assert v.loc["A > B (clear)", "verdict"] == S.REPRODUCED
    assert math.isnan(v.loc["A > B (clear)", "items_80"]) and math.isnan(v.loc["A > B (clear)", "seeds_80"])
    view = S.verdict_view(v.reset_index())
    assert (view.loc[view["verdict"] == S.INCONCLUSIVE, "seeds_80"] != "").all()
