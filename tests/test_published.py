"""Published tables (with their source) and the side-by-side claim verdicts."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from workbench import published as pub
from workbench.published import (INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, PAPER_CLAIMS, REPRODUCED, Claim,
                                 judge, list_tables, load_table, read_published_csv, side_by_side, summarise)

NAMES = ["damc_mmer_thirdparty", "optmerge_table2", "optmerge_table3", "optmerge_table4", "optmerge_table5",
         "optmerge_table7", "optmerge_table8"]


# ------------------------------------------------------------------------------------ tables
def test_list_tables():
    assert list_tables() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_table_names_its_source(name):
    for long in (False, True):
        df = load_table(name, long=long)
        assert len(df) > 0
        assert df.attrs["name"] == name
        assert len(df.attrs["source"]) > 20 and df.attrs["table"]
        if name.startswith("optmerge"):
            assert "Wei et al." in df.attrs["source"] and "ICLR 2026" in df.attrs["source"]
            assert df.attrs["verified"] is True
        if long:
            value = df.attrs["value_column"]
            assert value in df.columns and df[value].notna().all()
            assert pd.api.types.is_numeric_dtype(df[value])


def test_third_party_figures_are_marked_unverified():
    df = load_table("damc_mmer_thirdparty")
    assert df.attrs["verified"] is False and "UNVERIFIED" in df.attrs["source"]
    assert set(df.method) >= {"DAMC", "MMER"}


def test_aliases_and_unknown_names():
    assert load_table("table3").attrs["name"] == "optmerge_table3"
    with pytest.raises(KeyError, match="table6"):
        load_table("table6")


def test_known_numbers_as_printed():
    t2 = load_table("table2")
    assert t2.shape == (16, 12) and list(t2.columns[:3]) == ["method", "VizWiz", "GQA"]
    row = t2.set_index("method")
    assert row.loc["OptMerge", "Avg"] == 57.44 and row.loc["Task Arithmetic", "Avg"] == 56.18
    assert math.isnan(row.loc["Indiv. VQA", "RefCOCO"])  # not reported in the paper
    long2 = load_table("table2", long=True)
    assert list(long2.columns) == ["method", "benchmark", "score"]
    assert len(long2) == t2.iloc[:, 1:].notna().sum().sum()  # unreported cells dropped
    assert not ((long2.method == "Indiv. VQA") & (long2.benchmark == "RefCOCO")).any()
    t5 = load_table("table5", long=True)
    assert list(t5.columns) == ["benchmark", "method", "score"]
    cell = t5[(t5.method == "DAMC") & (t5.benchmark == "AVQA")].score
    assert cell.tolist() == [80.78]
    t7 = load_table("table7", long=True)
    assert list(t7.columns) == ["setting", "method", "quantity", "value"] and set(t7.quantity) == {"hours",
                                                                                                  "memory_gb"}
    assert load_table("table8").k_ratio.tolist() == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_read_published_csv_header_rules(tmp_path):
    ok = tmp_path / "ok.csv"
    ok.write_text("# source: Someone et al. 2030\n# Units: %\nmethod,x\nA #1,2\n")
    df, meta = read_published_csv(ok)
    assert meta == {"source": "Someone et al. 2030", "units": "%"}
    assert df.method.tolist() == ["A #1"] and df.x.tolist() == [2]  # a '#' inside the data is data
    nosource = tmp_path / "nosource.csv"
    nosource.write_text("# table: 1\nmethod,x\nA,2\n")
    with pytest.raises(ValueError, match="source"):
        read_published_csv(nosource)
    bad = tmp_path / "bad.csv"
    bad.write_text("# just a remark\nmethod,x\n")
    with pytest.raises(ValueError, match="key: value"):
        read_published_csv(bad)


def test_load_table_from_another_folder(tmp_path):
    (tmp_path / "optmerge_table8_rank_ratio.csv").write_text("# source: test copy\nk_ratio,InternVL_avg\n0.5,1\n")
    df = load_table("table8", data_dir=tmp_path)
    assert df.attrs["source"] == "test copy" and df.InternVL_avg.tolist() == [1]
    with pytest.raises(FileNotFoundError):
        load_table("table2", data_dir=tmp_path)


# ------------------------------------------------------------------------------------ verdict rule
@pytest.mark.parametrize("lhs, rhs, relation, margin, expected", [
    ((0.60, 0.70), (0.40, 0.50), ">", 0.0, REPRODUCED),
    ((0.40, 0.50), (0.60, 0.70), ">", 0.0, NOT_REPRODUCED),
    ((0.45, 0.65), (0.40, 0.50), ">", 0.0, INCONCLUSIVE),   # overlap
    ((0.50, 0.60), (0.40, 0.50), ">", 0.0, INCONCLUSIVE),   # touching is not apart
    ((0.60, 0.70), (0.40, 0.50), ">", 0.15, INCONCLUSIVE),  # apart by 0.10 < margin
    ((0.60, 0.70), (0.40, 0.50), ">", 0.05, REPRODUCED),
    ((0.40, 0.50), (0.60, 0.70), "<", 0.0, REPRODUCED),
    ((0.60, 0.70), (0.40, 0.50), "<", 0.0, NOT_REPRODUCED),
    ((math.nan, math.nan), (0.40, 0.50), ">", 0.0, INCONCLUSIVE),
])
def test_judge(lhs, rhs, relation, margin, expected):
    assert judge(lhs, rhs, relation, margin) == expected


def test_judge_rejects_unknown_relation():
    with pytest.raises(ValueError):
        judge((0, 1), (0, 1), ">=")
    with pytest.raises(ValueError):
        Claim("x", {}, {}, "=")


def test_claim_parse():
    c = Claim.parse("OptMerge > Task Arithmetic")
    assert c.lhs == {"method": "OptMerge", "benchmark": "Avg"} and c.rhs["method"] == "Task Arithmetic"
    c = Claim.parse("TIES w/ DARE < WUDI on MathVista")
    assert c.relation == "<" and c.lhs == {"method": "TIES w/ DARE", "benchmark": "MathVista"}
    with pytest.raises(ValueError):
        Claim.parse("OptMerge is best")


# ------------------------------------------------------------------------------------ side by side
def _ours(rows):
    return pd.DataFrame(rows, columns=["method", "benchmark", "mean", "ci_low", "ci_high"])


def test_side_by_side_verdicts():
    t2 = load_table("table2", long=True)
    ours = _ours([
        ("OptMerge", "Avg", 0.62, 0.60, 0.64),
        ("Task Arithmetic", "Avg", 0.55, 0.52, 0.58),   # OptMerge clearly above: reproduced
        ("WUDI", "Avg", 0.70, 0.68, 0.72),              # clearly above OptMerge: not reproduced
        ("TIES", "Avg", 0.61, 0.57, 0.65),              # overlaps: inconclusive
    ])
    claims = ["OptMerge > Task Arithmetic", "OptMerge > WUDI", "OptMerge > TIES", "OptMerge > Iso-C",
              Claim("needs a 7B model", {"method": "OptMerge", "benchmark": "Avg"},
                    {"method": "Task Arithmetic", "benchmark": "Avg"}, testable=False, reason="7B only")]
    out = side_by_side(t2, ours, claim_rules=claims)
    assert out.verdict.tolist() == [REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTABLE, NOT_TESTABLE]
    assert "Iso-C" in out.reason[3] and out.reason[4] == "7B only"
    assert out.published_lhs.tolist()[:2] == [57.44, 57.44] and out.published_rhs.tolist()[:2] == [56.18, 57.00]
    assert out.published_holds.tolist()[:4] == [True, True, True, True]
    assert out.ours_rhs_ci_low[0] == 0.52 and out.ours_lhs_mean[0] == 0.62
    assert out.attrs["source"] == t2.attrs["source"]


def test_side_by_side_reports_when_the_paper_itself_does_not_show_the_claim():
    t5 = load_table("table5", long=True)  # Avg: NaiveMC 66.88 > DAMC 66.79
    ours = _ours([("DAMC", "Avg", 0.8, 0.75, 0.85), ("NaiveMC", "Avg", 0.5, 0.45, 0.55)])
    out = side_by_side(t5, ours, claim_rules=["DAMC > NaiveMC"])
    assert out.published_holds[0] is not None and not out.published_holds[0]
    assert out.verdict[0] == REPRODUCED


def test_side_by_side_single_seed_is_inconclusive():
    ours = _ours([("OptMerge", "Avg", 0.9, math.nan, math.nan), ("TIES", "Avg", 0.1, math.nan, math.nan)])
    out = side_by_side(load_table("table2", long=True), ours, claim_rules=["OptMerge > TIES"])
    assert out.verdict[0] == INCONCLUSIVE and "interval" in out.reason[0]


def test_side_by_side_needs_one_row_per_key():
    ours = _ours([("OptMerge", "Avg", 0.6, 0.5, 0.7), ("OptMerge", "Avg", 0.6, 0.5, 0.7)])
    with pytest.raises(ValueError, match="one row per key"):
        side_by_side(load_table("table2", long=True), ours, claim_rules=["OptMerge > TIES"])
    with pytest.raises(ValueError, match="one row per key"):
        side_by_side(load_table("table2", long=True), ours)


def test_side_by_side_without_claims_joins_cells():
    t2 = load_table("table2", long=True)
    ours = _ours([("OptMerge", "Avg", 0.6, 0.5, 0.7), ("OptMerge", "MCUB-mini", 0.4, 0.3, 0.5)])
    out = side_by_side(t2, ours)
    assert list(out.columns) == ["method", "benchmark", "published", "ours_mean", "ours_ci_low", "ours_ci_high"]
    assert len(out) == len(t2) + 1  # outer join: our benchmark the paper does not have is kept
    a = out[(out.method == "OptMerge") & (out.benchmark == "Avg")].iloc[0]
    assert a.published == 57.44 and a.ours_mean == 0.6
    b = out[out.benchmark == "MCUB-mini"].iloc[0]
    assert math.isnan(b.published) and b.ours_ci_high == 0.5


def test_paper_claims_point_at_existing_published_cells():
    for c in PAPER_CLAIMS:
        table = load_table(c.source, long=True)
        out = side_by_side(table, _ours([]), on=list(c.lhs), claim_rules=[c])
        assert not math.isnan(out.published_lhs[0]) and not math.isnan(out.published_rhs[0]), c.text
        assert out.verdict[0] == NOT_TESTABLE  # nothing of ours given
    t2_claims = [c for c in PAPER_CLAIMS if c.source == "optmerge_table2"]
    out = side_by_side(load_table("table2", long=True), _ours([]), claim_rules=t2_claims)
    assert out.published_holds.all()


# ------------------------------------------------------------------------------------ summarise
def test_summarise_t_interval():
    from scipy import stats

    df = pd.DataFrame({"method": ["A"] * 3 + ["B"], "benchmark": "Avg", "accuracy": [0.5, 0.6, 0.7, 0.4]})
    s = summarise(df, by=["method", "benchmark"])
    a = s.set_index("method").loc["A"]
    half = stats.t.ppf(0.975, 2) * np.std([0.5, 0.6, 0.7], ddof=1) / np.sqrt(3)
    assert a["mean"] == pytest.approx(0.6) and a["n"] == 3
    assert a.ci_low == pytest.approx(0.6 - half) and a.ci_high == pytest.approx(0.6 + half)
    b = s.set_index("method").loc["B"]
    assert b["n"] == 1 and math.isnan(b.ci_low)
    # summarise output feeds side_by_side directly
    out = side_by_side(load_table("table2", long=True), s.replace({"A": "OptMerge", "B": "TIES"}),
                       claim_rules=["OptMerge > TIES"])
    assert out.verdict[0] == INCONCLUSIVE


def test_verdict_constants():
    assert pub.VERDICTS == (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTABLE)
    assert NOT_TESTABLE == "not testable here"  # the issue-14 wording, defined in workbench.statistics
