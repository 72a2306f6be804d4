"""workbench.studies.report: formatting and reshaping for the notebooks (small hand-made frames)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from workbench import statistics
from workbench.studies import report
from workbench.studies.published import side_by_side


def _summary():
    return pd.DataFrame([
        # method, benchmark, scoring, n_seeds, n_items, acc, t_low, t_high, wilson_low, wilson_high
        ("naive_mc", "mcub-2", "loglik", 3, 60, 50.0, 45.0, 55.0, 40.0, 60.0),
        ("damc", "mcub-2", "loglik", 3, 60, 70.0, 65.0, 75.0, 60.0, 80.0),
        ("damc", "mcub-2", "generate", 3, 60, 20.0, 15.0, 25.0, 10.0, 30.0),
        ("frozen", "mcub-2", "loglik", 1, 20, 30.0, np.nan, np.nan, 15.0, 50.0),
    ], columns=["method", "benchmark", "scoring", "n_seeds", "n_items", "acc", "t_low", "t_high", "wilson_low",
                "wilson_high"])


def test_fmt_interval():
    assert report.fmt_interval(52.345, 48.1, 56.5) == "52.3 [48.1, 56.5]"
    assert report.fmt_interval(52.0, float("nan"), 1.0) == "52.0"
    assert report.fmt_interval(float("nan"), 1.0, 2.0) == "-"


def test_pick_interval_auto_t_or_wilson():
    s = report.pick_interval(_summary())
    assert s.loc[0, ["ci_low", "ci_high"]].tolist() == [45.0, 55.0]
    assert s.loc[3, ["ci_low", "ci_high"]].tolist() == [15.0, 50.0]  # one seed -> Wilson
    assert s.loc[3, "interval"].startswith("Wilson")
    w = report.pick_interval(_summary(), "wilson")
    assert w.loc[0, "ci_low"] == 40.0
    with pytest.raises(ValueError):
        report.pick_interval(_summary(), "bogus")


def test_ours_table_renames_selects_and_feeds_side_by_side():
    ours = report.ours_table(_summary(), methods={"naive_mc": "NaiveMC", "damc": "DAMC"})
    assert set(ours["method"]) == {"NaiveMC", "DAMC"} and len(ours) == 2  # loglik only, frozen dropped
    pub = pd.DataFrame({"benchmark": ["mcub-2", "mcub-2"], "method": ["NaiveMC", "DAMC"], "score": [66.88, 66.79]})
    pub.attrs["name"] = "optmerge_table5"
    cells = side_by_side(pub, ours).set_index("method")
    assert cells.loc["DAMC", "published"] == 66.79 and cells.loc["DAMC", "ours_mean"] == 70.0
    assert cells.loc["NaiveMC", ["ours_ci_low", "ours_ci_high"]].tolist() == [45.0, 55.0]
    assert "verdict" not in cells.columns  # verdicts come from workbench.statistics only


def test_verdict_counts_and_sentence_read_the_statistics_table():
    ids = [f"q{i}" for i in range(100)]
    a = pd.DataFrame({"seed": 0, "id": ids, "correct": [i < 80 for i in range(100)]})
    b = pd.DataFrame({"seed": 0, "id": ids, "correct": [i < 40 for i in range(100)]})  # A right on 40 more
    v = statistics.verdict_table([statistics.compare(a, b, "A > B"), statistics.compare(a, a.copy(), "A > A'")], "t")
    assert v["verdict"].tolist() == [statistics.REPRODUCED, statistics.NOT_TESTABLE]  # identical: inert
    counts = report.verdict_counts(v)
    assert counts["reproduced"] == 1 and counts["not testable here"] == 1 and sum(counts.values()) == 2
    assert report.verdict_sentence(v, preset="tiny").startswith("Of 2 claim(s) (preset tiny): 1 reproduced")


def test_interval_table_wide_strings():
    t = report.interval_table(_summary(), row_order=["damc", "naive_mc", "frozen", "absent"])
    assert list(t.index) == ["damc", "naive_mc", "frozen"]
    assert t.loc["damc", "mcub-2"] == "70.0 [65.0, 75.0]"
    assert t.loc["frozen", "mcub-2"] == "30.0 [15.0, 50.0]"


def _pred():
    rows = []
    for seed in (0, 1):
        for i in range(10):
            rows.append({"id": str(i), "seed": seed, "scoring": "loglik", "benchmark": "mcub-2", "method": "a",
                         "correct": i < 8})
            rows.append({"id": str(i), "seed": seed, "scoring": "loglik", "benchmark": "mcub-2", "method": "b",
                         "correct": i < 5 + seed})
    return pd.DataFrame(rows)


def test_paired_difference_two_seeds_and_one_seed():
    d = report.paired_difference(_pred(), "a", "b", label="gap")
    assert d.loc[0, "method"] == "gap" and d.loc[0, "n_seeds"] == 2 and d.loc[0, "n_items"] == 20
    assert d.loc[0, "mean"] == pytest.approx(25.0)  # 30 and 20 points
    assert d.loc[0, "ci_low"] < 25.0 < d.loc[0, "ci_high"]
    one = report.paired_difference(_pred()[lambda x: x.seed == 0], "a", "b")
    assert one.loc[0, "mean"] == pytest.approx(30.0) and one.loc[0, "n_seeds"] == 1
    assert not math.isnan(one.loc[0, "ci_low"])


def test_paired_view_reading():
    p = pd.DataFrame([{"benchmark": "mcub-2", "scoring": "loglik", "method_a": "damc", "method_b": "naive_mc",
                       "n": 50, "b": 12, "c": 2, "acc_a": 60.0, "acc_b": 40.0, "pvalue": 0.01},
                      {"benchmark": "mcub-3", "scoring": "loglik", "method_a": "damc", "method_b": "naive_mc",
                       "n": 50, "b": 3, "c": 2, "acc_a": 60.0, "acc_b": 58.0, "pvalue": 1.0}])
    v = report.paired_view(p)
    assert v["reading"].tolist() == ["DAMC better", "no significant difference"]
    assert v.loc[0, "a_only"] == 12 and v.loc[0, "b_only"] == 2


def _manifest():
    return {"build_wall_seconds": 30.0,
            "jobs": {"base": {"kind": "base", "seconds": 10.0}, "e1": {"kind": "expert", "seconds": 5.0},
                     "e2": {"kind": "expert", "seconds": 7.0}},
            "models": {
                "image-projector-s0": {"modality": "image", "kind": "projector", "seed": 0,
                                       "own_task": {"loglik": 40.0, "generate": 30.0}},
                "image-full-s0": {"modality": "image", "kind": "full", "seed": 0,
                                  "own_task": {"loglik": 60.0, "generate": 50.0}},
                "image-full-s1": {"modality": "image", "kind": "full", "seed": 1,
                                  "own_task": {"loglik": 70.0, "generate": 50.0}},
                "cap": {"family": "capability", "kind": "full", "task": "vqa"}}}


def test_manifest_views():
    m = _manifest()
    t = report.zoo_models_table(m)
    assert len(t) == 3 and "cap" not in set(t["name"])
    assert len(report.zoo_models_table(m, family="capability")) == 1
    g = report.expert_gap_table(m)
    row = g.set_index("modality").loc["image"]
    assert row["full expert"] == 65.0 and row["base LLM + projector"] == 40.0 and row["gap"] == 25.0
    assert row["n_seeds"] == 2
    b = report.build_times_table(m)
    assert b.iloc[0]["kind"] == "expert" and b.iloc[0]["seconds"] == 12.0 and b.iloc[0]["jobs"] == 2
    assert b.iloc[-1]["seconds"] == 30.0


def test_llm_tuning_gap_table_pairs_each_expert_with_its_own_projector():
    """Gap per seed = expert - base LLM with that expert's projector; mean and t-interval over seeds (closed form:
    two seeds, half-width t(0.975, 1) x sd / sqrt(2)); models without a base-LLM score or of another kind are left out."""
    models = {"image-full-s0": {"modality": "image", "kind": "full", "own_task": {"loglik": 60.0},
                                "own_task_base_llm": {"loglik": 45.0}},
              "image-full-s1": {"modality": "image", "kind": "full", "own_task": {"loglik": 70.0},
                                "own_task_base_llm": {"loglik": 40.0}},
              "image-projector-s0": {"modality": "image", "kind": "projector", "own_task": {"loglik": 10.0}},
              "image-lora-s0": {"modality": "image", "kind": "lora", "own_task": {"loglik": 99.0},
                                "own_task_base_llm": {"loglik": 1.0}},
              "audio-full-s0": {"modality": "audio", "kind": "full", "own_task": {"loglik": 80.0}},
              "capability-vqa-full-s0": {"family": "capability", "kind": "full", "task": "vqa",
                                         "own_task": {"loglik": 50.0}, "own_task_base_llm": {"loglik": 40.0}}}
    g = report.llm_tuning_gap_table({"models": models}).set_index("modality")
    assert list(g.index) == ["image"]
    half = 12.706204736174698 * (15.0 * 2 ** 0.5 / 2) / 2 ** 0.5  # gaps 15 and 30: sd 10.607
    row = g.loc["image"]
    assert row["gap"] == pytest.approx(22.5) and row["n_seeds"] == 2
    assert row["gap low"] == pytest.approx(22.5 - half) and row["gap high"] == pytest.approx(22.5 + half)
    assert row["full expert"].startswith("65.0 [") and row["base LLM + its projector"].startswith("42.5 [")
    lora = report.llm_tuning_gap_table({"models": models}, tuned="lora").set_index("modality")
    assert lora.loc["image", "gap"] == 98.0 and lora.loc["image", "lora expert"] == "99.0"


def test_density_table():
    t = report.density_table({"I+A-s0": [0.5, 0.022]})
    assert t.loc["I+A-s0", "audio"] == pytest.approx(2.2)
    g = report.density_table(pd.DataFrame({"lam": [1.0], "density_image": [0.1]}))
    assert g.loc[0, "image"] == pytest.approx(10.0)


def test_figures():
    t = pd.DataFrame({"method": ["a", "a", "b"], "benchmark": ["x", "y", "x"], "mean": [1.0, 2.0, 3.0],
                      "ci_low": [0.5, np.nan, 2.0], "ci_high": [1.5, np.nan, 4.0]})
    fig = report.accuracy_figure(t, chance=25.0, title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ex = {"image": np.random.rand(3, 8, 8), "audio": np.random.rand(64), "video": np.random.rand(6, 3, 4, 4),
          "point": np.random.rand(16, 6)}
    fig2 = report.modality_examples_figure(ex)
    assert len(fig2.axes) == 4
    with pytest.raises(ValueError):
        report.modality_examples_figure({"bad": np.zeros((2, 2))})


# ---- workbench.llava.make_tiny_llava_family (used by notebook 10; lives in llava.py, tested here)
def test_make_tiny_llava_family(tmp_path):
    import torch

    from workbench import compose
    from workbench.families import FamilyCheckpoint
    from workbench.llava import make_tiny_llava_family

    fam = make_tiny_llava_family(tmp_path, n_experts=2, seed=0)
    assert fam["placeholders"] == ["<image>", "<video>"] and len(fam["experts"]) == 2
    tok = FamilyCheckpoint(fam["base"]).tokenizer()
    assert FamilyCheckpoint(fam["experts"][1]).placeholder(tok) == "<video>"
    assert FamilyCheckpoint(fam["experts"][1]).placeholder() == "<image>"  # without a tokenizer: the family's
    a = FamilyCheckpoint(fam["experts"][0]).lm_tensor("model.layers.0.self_attn.q_proj.weight")
    b = FamilyCheckpoint(fam["base"]).lm_tensor("model.layers.0.self_attn.q_proj.weight")
    assert 0 < float((a - b).abs().max()) < 0.2  # perturbed, not identical
    ex = [compose.family_expert(p, modality=m, placeholder=ph, template="{prompt}")
          for p, m, ph in zip(fam["experts"], ["image", "video"], fam["placeholders"])]
    model = compose.compose_naive_mc(fam["base"], ex, tok)
    out = model.generate("<image> <video> w20", {"image": [torch.rand(3, 16, 16)], "video": [torch.rand(3, 16, 16)]},
                         max_new_tokens=3)
    assert isinstance(out, str)
    with pytest.raises(ValueError):
        make_tiny_llava_family(tmp_path / "x", n_experts=9)


# --- merging-benchmark notebooks ---
def test_published_vs_ours_formats_cells():
    cells = pd.DataFrame({"method": ["OptMerge", "Base"], "benchmark": ["Avg", "Avg"], "published": [57.44, np.nan],
                          "ours_mean": [40.0, 22.5], "ours_ci_low": [30.0, np.nan], "ours_ci_high": [50.0, np.nan]})
    t = report.published_vs_ours(cells)
    assert t["published"].tolist() == ["57.4", "-"]
    assert t["ours"].tolist() == ["40.0 [30.0, 50.0]", "22.5"]
    assert report.published_vs_ours(cells, order=["Base"])["method"].tolist() == ["Base", "OptMerge"]
    assert list(report.published_vs_ours(cells.iloc[:0]).columns) == ["method", "benchmark", "published", "ours"]


def test_numeric_wide_drops_lambda_and_failed():
    wide = pd.DataFrame({"VQA": [30.0, "failed"], "Avg": [30.0, "failed"], "lambda": [0.5, np.nan]},
                        index=["TIES", "Iso-C"])
    n = report.numeric_wide(wide)
    assert list(n.columns) == ["VQA", "Avg"] and n.loc["TIES", "VQA"] == 30.0 and math.isnan(n.loc["Iso-C", "Avg"])


def test_published_long_and_stepwise_claims():
    pub = report.published_long("optmerge_table4", method="step", column="model", value="Qwen2-VL")
    assert pub["method"].tolist() == ["WUDI", "+SGD", "+Initialization", "+Low-rank"]
    assert pub.attrs["value_column"] == "score" and set(pub["benchmark"]) == {"Avg"}
    claims = report.stepwise_claims(pub, ["WUDI", "+SGD", "+Initialization", "+Low-rank"])
    assert [c.text for c in claims] == ["+SGD < WUDI on Avg", "+Initialization > +SGD on Avg",
                                        "+Low-rank > +Initialization on Avg", "+Low-rank > WUDI on Avg"]
    assert [c.relation for c in claims] == ["<", ">", ">", ">"] and {c.source for c in claims} == {"optmerge_table4"}
    assert report.stepwise_claims(pub.iloc[:1], ["WUDI", "+SGD"]) == []


def test_readme_claims_come_from_the_verdict_files():
    """The README's composition claims are the sentence report.readme_claims builds from the committed verdict files."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = report.readme_claims(root / "data" / "results" / "default")
    assert "NaiveMC > Frozen LLM on mcub-2" in text
    assert " ".join(text.split()) in " ".join((root / "README.md").read_text().split())
    tally = report.readme_verdict_counts(root / "data" / "results" / "default")
    assert tally.startswith("Of ") and " ".join(tally.split()) in " ".join((root / "README.md").read_text().split())


def test_committed_composition_tables_agree_with_each_other():
    """Notebooks 02 and 03 both write DAMC vs NaiveMC on MCUB-mini (02's paired table, 03's verdicts) from one
    predictions.csv: a partial rerun that rewrites one and not the other leaves them disagreeing (02's table once
    kept the DAMC experts of an older zoo). Both must give the same accuracies and discordant counts."""
    from pathlib import Path

    out = Path(__file__).resolve().parents[1] / "data" / "results" / "default"
    paired = pd.read_csv(out / "02_naivemc_paired_generate.csv")
    verdicts = pd.read_csv(out / "03_damc_verdicts_generate.csv").set_index("claim")
    rows = paired[(paired["a"] == "DAMC") & (paired["b"] == "NaiveMC") & paired["benchmark"].str.startswith("mcub-")]
    assert len(rows) == 3
    for _, r in rows.iterrows():
        v = verdicts.loc[f"DAMC > NaiveMC on {r['benchmark']}"]
        assert (r["acc_a"], r["acc_b"]) == pytest.approx((v["ours_lhs"], v["ours_rhs"]), abs=1e-9)
        assert (r["a_only"], r["b_only"], r["n"]) == (v["b"], v["c"], v["n_items"])


def test_every_committed_inconclusive_verdict_states_the_sample_that_would_decide_it():
    """The README says every inconclusive row gives the items or seeds that would decide it: every committed verdict
    table of notebooks 02-07 has both columns, and each inconclusive row a count in at least one of them (inf in
    ``seeds_80``: more seeds than ``statistics.MAX_SEEDS``)."""
    from pathlib import Path

    out = Path(__file__).resolve().parents[1] / "data" / "results" / "default"
    files = sorted(out.glob("0[2-7]_*verdicts*.csv"))
    assert len(files) >= 6
    for f in files:
        t = pd.read_csv(f)
        assert {"items_80", "seeds_80"} <= set(t.columns), f.name
        open_ = t[t["verdict"] == "inconclusive"]
        stated = open_["items_80"].notna() | open_["seeds_80"].notna()
        assert stated.all(), (f.name, open_.loc[~stated, "claim"].tolist())
