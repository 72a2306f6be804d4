"""Results tables on a synthetic evaluation (known correctness), the cache, and - slow - a run on
the tiny zoo (NaiveMC / DAMC / MMER compose and score MCUB-2)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from workbench.studies.cache import cached
from workbench.studies.composition import (combo_tag, paired_table, record_modalities, retention_table, run_results,
                                           search_records, summary_table)

SEEDS = (0, 1, 2)
P = {"expert": 0.8, "naive_mc": 0.5, "mmer": 0.75, "damc_expert": 0.7, "damc": 0.6}


def synthetic() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for seed in SEEDS:
        for bench, n, methods in (("mcub-2", 40, ("naive_mc", "mmer", "damc")), ("own:image", 30, tuple(P))):
            for method in methods:
                for i in range(n):
                    rows.append({"id": f"{bench}-{i}", "subset": bench, "gold": "A", "pred": "A",
                                 "correct": bool(rng.uniform() < P[method]), "method": method, "seed": seed,
                                 "scoring": "loglik", "task": "", "benchmark": bench, "combo": "I+A"})
    return pd.DataFrame(rows)


def test_summary_shapes_and_intervals():
    df = synthetic()
    s = summary_table(df)
    assert len(s) == 3 + 5
    assert {"acc", "t_low", "t_high", "wilson_low", "wilson_high", "n_seeds", "n_items"} <= set(s.columns)
    for _, r in s.iterrows():
        g = df[(df["method"] == r["method"]) & (df["benchmark"] == r["benchmark"])]
        per_seed = [100 * g[g["seed"] == k]["correct"].mean() for k in SEEDS]
        assert r["acc"] == pytest.approx(np.mean(per_seed))
        lo, hi = stats.t.interval(0.95, 2, loc=np.mean(per_seed), scale=stats.sem(per_seed))
        assert (r["t_low"], r["t_high"]) == (pytest.approx(lo), pytest.approx(hi))
        assert r["t_low"] <= r["acc"] <= r["t_high"]
        assert r["wilson_low"] <= 100 * g["correct"].mean() <= r["wilson_high"]
        assert r["n_seeds"] == 3 and r["n_items"] == len(g)


def test_retention_is_ratio_to_the_right_reference():
    df = synthetic()
    r = retention_table(df)
    assert set(r["method"]) == {"naive_mc", "mmer", "damc"} and len(r) == 3 * len(SEEDS)
    assert set(r[r["method"] == "damc"]["reference"]) == {"damc_expert"}
    assert set(r[r["method"] == "mmer"]["reference"]) == {"expert"}
    for _, row in r.iterrows():
        own = df[(df["benchmark"] == "own:image") & (df["seed"] == row["seed"])]
        a = 100 * own[own["method"] == row["method"]]["correct"].mean()
        b = 100 * own[own["method"] == row["reference"]]["correct"].mean()
        assert row["retention"] == pytest.approx(100 * a / b)
        assert row["modality"] == "image"


def test_paired_mcnemar_counts():
    df = synthetic()
    p = paired_table(df, pairs=[("mmer", "naive_mc")])
    assert len(p) == 2  # mcub-2 and own:image
    row = p[p["benchmark"] == "mcub-2"].iloc[0]
    a = df[(df["method"] == "mmer") & (df["benchmark"] == "mcub-2")].set_index(["id", "seed"])["correct"]
    b = df[(df["method"] == "naive_mc") & (df["benchmark"] == "mcub-2")].set_index(["id", "seed"])["correct"]
    b = b.loc[a.index]
    nb, nc = int((a & ~b).sum()), int((~a & b).sum())
    assert (row["b"], row["c"], row["n"]) == (nb, nc, 120)
    assert row["pvalue"] == pytest.approx(stats.binomtest(nb, nb + nc, 0.5).pvalue)


def test_cache_by_inputs(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"id": ["1", "2"], "gold": ["A", "B"], "pred": ["A", ""], "correct": [True, False]})

    parts = {"zoo": {"x": "h1"}, "scoring": "loglik"}
    a, hit_a = cached(tmp_path, parts, compute)
    b, hit_b = cached(tmp_path, parts, compute)
    assert (hit_a, hit_b) == (False, True) and len(calls) == 1
    assert list(b["pred"]) == ["A", ""] and list(b["id"]) == ["1", "2"]
    _, hit_c = cached(tmp_path, {**parts, "zoo": {"x": "h2"}}, compute)
    assert not hit_c and len(calls) == 2


def test_record_modalities_and_tags():
    rec = {"modal_inputs": {"audio": ["a"], "vision": ["b"]}}
    assert record_modalities(rec) == ("image", "audio")
    assert combo_tag(("image", "audio", "point")) == "I+A+P"


# -------------------------------------------------------------------------------------------- tiny zoo


def test_search_records_cover_the_compositions_combinations_alike():
    """A composition's λ search takes the validation records of its own modalities only, at most ``limit``,
    the same number from each modality combination it covers (records in file order, as the world writes them:
    cycling through the combinations)."""
    keys = {"I": "vision", "A": "audio", "V": "video"}
    combos = ["I+A", "I+V", "A+V", "I+A+V"]
    val = [{"id": f"{c}-{i}", "subset": f"val:{c}", "modal_inputs": {keys[k]: "x" for k in c.split("+")}}
           for i in range(30) for c in combos]
    pair = search_records(val, ["image", "audio"], limit=20)
    assert len(pair) == 20 and {r["subset"] for r in pair} == {"val:I+A"}
    triple = search_records(val, ["image", "audio", "video"], limit=40)
    counts = {c: sum(r["subset"] == f"val:{c}" for r in triple) for c in combos}
    assert counts == {c: 10 for c in combos}
    assert search_records(val, ["image", "audio", "video"], limit=1000) == val  # all of them, in file order
    assert search_records(val, ["point"]) == []


@pytest.mark.slow
def test_tiny_zoo_compose_and_score_mcub2(tmp_path):
    """NaiveMC / MMER (and DAMC when the zoo has DAMC experts) compose on the tiny zoo and score MCUB-2;
    a second run is served from the cache."""
    from workbench.world import ensure_zoo

    ensure_zoo("tiny")
    def run():
        return run_results("tiny", out=tmp_path / "res", methods=("expert", "damc_expert", "frozen", "naive_mc",
                                                                    "damc", "mmer"),
                           benchmarks=("mcub-2",), max_items=8, scorings=("loglik", "generate"), search=True,
                           progress=False, mmer_lams=(1.0, 2.0), mmer_alphas=(1.0,), damc_grid=(0.5, 1.0))

    res = run()
    pred, summ = res["predictions"], res["summary"]
    assert {"naive_mc", "mmer", "frozen"} <= set(pred["method"])
    mc = summ[summ["benchmark"] == "mcub-2"]
    assert {"naive_mc", "mmer", "frozen"} <= set(mc["method"])
    assert ((mc["acc"] >= 0) & (mc["acc"] <= 100)).all()
    assert set(pred[pred["benchmark"] == "mcub-2"]["scoring"]) == {"loglik", "generate"}
    for f in ("predictions.csv", "summary.csv", "retention.csv", "paired.csv", "storage.csv", "run.json"):
        assert (tmp_path / "res" / f).is_file()
    versions = json.loads((tmp_path / "res" / "run.json").read_text())["versions"]
    assert versions["numpy"] == np.__version__ and "torch" in versions
    st = res["storage"]
    assert len(st) == 1 and st["ratio"].iloc[0] < 1.0
    ret = res["retention"]
    assert {"naive_mc", "mmer"} <= set(ret["method"])
    again = run()
    assert again["run"]["evaluated"] == 0 and again["run"]["cached"] > 0
    pd.testing.assert_frame_equal(again["summary"], res["summary"])
    # the searches' choices travel with the cached predictions: the cached rerun records the same λ / α
    assert res["run"]["notes"] and again["run"]["notes"] == res["run"]["notes"]
    # a generation entry that is gone is computed again alone (its log-likelihood twin stays cached),
    # the same predictions as when the two scorings were computed together
    from workbench.studies.cache import read_predictions

    gone = [f for f in sorted((tmp_path / "res" / "cache").glob("*.csv"))
            if set(read_predictions(f)["scoring"]) == {"generate"}][:3]
    for f in gone:
        f.unlink()
    third = run()
    assert len(gone) == 3 and third["run"]["evaluated"] == 3 and all(f.is_file() for f in gone)
    pd.testing.assert_frame_equal(third["summary"], res["summary"])


def test_search_notes_kept_with_cached_predictions(tmp_path):
    """sync_notes: a computed searched composition's note is written beside its cache entry and read back on a
    hit (another composer, the same key); a different key or an unsearched method reads nothing."""
    from types import SimpleNamespace

    from workbench.studies.composition import combo_tag, sync_notes

    mods = ("image", "audio")
    parts = {"method": "mmer", "mods": list(mods), "records": "r1"}
    note = {"lam": 2.0, "alpha": 0.5, "n_val": 200}
    first = SimpleNamespace(seed=1, notes={"mmer": {f"{combo_tag(mods)}-s1": note}})
    sync_notes(first, tmp_path, parts, "mmer", mods, hit=False)
    again = SimpleNamespace(seed=1, notes={})
    sync_notes(again, tmp_path, parts, "mmer", mods, hit=True)
    assert again.notes == first.notes
    other = SimpleNamespace(seed=1, notes={})
    sync_notes(other, tmp_path, dict(parts, records="r2"), "mmer", mods, hit=True)
    sync_notes(other, tmp_path, parts, "naive_mc", mods, hit=True)
    assert other.notes == {}
    sync_notes(first, None, parts, "mmer", mods, hit=False)  # no cache: nothing to keep, no error


@pytest.mark.slow
def test_tiny_zoo_composer_shares_experts_and_caches_damc_search(tmp_path, monkeypatch):
    """One ZooComposer loads each expert once (a cached tower); the DAMC λ search's cells are kept under
    ``search_cache`` and a second composer (notebook 06) gets the same λ and CSV without searching."""
    from workbench import compose as C
    from workbench.studies import search as S
    from workbench.studies.composition import ZooComposer
    from workbench.world import ensure_zoo

    z = ensure_zoo("tiny")
    mods = tuple(m for m in ("image", "audio") if m in z.modalities)
    comp = ZooComposer(z, 0, search_dir=tmp_path / "s1", search_cache=tmp_path / "cache", damc_grid=(0.5, 1.0))
    if comp.members("damc", mods) is None:
        pytest.skip("the tiny zoo has no DAMC experts")
    name = comp.members("mmer", mods)[0]
    assert comp.source(name) is comp.source(name) and isinstance(comp.source(name).tower, C.CachedTower)
    comp.build("damc", mods)
    files = list((tmp_path / "cache").glob("damc-*.json"))
    assert len(files) == 2  # one per grid point
    calls = []
    real = S.run_search_cell
    monkeypatch.setattr(S, "run_search_cell", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = ZooComposer(z, 0, search_dir=tmp_path / "s2", search_cache=tmp_path / "cache", damc_grid=(0.5, 1.0))
    model = again.build("damc", mods)
    assert calls == []
    assert again.notes["damc_lambda"] == comp.notes["damc_lambda"]
    tag = f"{combo_tag(mods)}-s0"
    csv = f"damc_lambda_{tag}.csv"
    assert (tmp_path / "s2" / csv).read_text() == (tmp_path / "s1" / csv).read_text()
    best = again.notes["damc_lambda"][tag]["lambda"]
    from workbench.routing import routed_modules

    coefs = {p.tag: p.coef for rl in routed_modules(model.llm).values() for p in rl.routes["0"].parts}
    assert [coefs[i] for i in range(len(mods))] == best
    comp.release()
    assert not comp._sources
