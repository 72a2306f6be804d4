"""Published tables (with their source), the papers' claims, and published numbers beside ours."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from workbench.studies.published import (PAPER_CLAIMS, Claim, list_tables, load_table, mean_intervals,
                                         read_published_csv, side_by_side)

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


# ------------------------------------------------------------------------------------ claims
def test_claim_rejects_unknown_relation():
    with pytest.raises(ValueError, match="relation"):
        Claim("x", {}, {}, "=")
    c = Claim.better_than("OptMerge", "TIES", benchmark="MathVista")
    assert c.relation == ">" and c.lhs == {"method": "OptMerge", "benchmark": "MathVista"}
    assert c.text == "OptMerge > TIES on MathVista" and c.rhs["method"] == "TIES"


def test_paper_claims_point_at_existing_published_cells():
    """Every headline claim names two cells its source table has; Table 2's claims hold in the paper's own numbers."""
    for c in PAPER_CLAIMS:
        table = load_table(c.source, long=True)
        value = table.attrs["value_column"]
        cells = []
        for side in (c.lhs, c.rhs):
            hit = table
            for k, v in side.items():
                hit = hit[hit[k] == v]
            assert len(hit) == 1, (c.text, side)
            cells.append(float(hit[value].iloc[0]))
        if c.source == "optmerge_table2":
            assert (cells[0] > cells[1]) == (c.relation == ">"), c.text
        assert c.testable or c.reason  # an untestable claim says why


# ------------------------------------------------------------------------------------ side by side
def _ours(rows):
    return pd.DataFrame(rows, columns=["method", "benchmark", "mean", "ci_low", "ci_high"])


def test_side_by_side_needs_one_row_per_key():
    ours = _ours([("OptMerge", "Avg", 0.6, 0.5, 0.7), ("OptMerge", "Avg", 0.6, 0.5, 0.7)])
    with pytest.raises(ValueError, match="one row per key"):
        side_by_side(load_table("table2", long=True), ours)


def test_side_by_side_joins_cells_and_judges_nothing():
    t2 = load_table("table2", long=True)
    ours = _ours([("OptMerge", "Avg", 0.6, 0.5, 0.7), ("OptMerge", "MCUB-mini", 0.4, 0.3, 0.5)])
    out = side_by_side(t2, ours)
    assert list(out.columns) == ["method", "benchmark", "published", "ours_mean", "ours_ci_low", "ours_ci_high"]
    assert len(out) == len(t2) + 1  # outer join: our benchmark the paper does not have is kept
    a = out[(out.method == "OptMerge") & (out.benchmark == "Avg")].iloc[0]
    assert a.published == 57.44 and a.ours_mean == 0.6
    b = out[out.benchmark == "MCUB-mini"].iloc[0]
    assert math.isnan(b.published) and b.ours_ci_high == 0.5


# ------------------------------------------------------------------------------------ mean_intervals
def test_summarise_t_interval():
    from scipy import stats

    df = pd.DataFrame({"method": ["A"] * 3 + ["B"], "benchmark": "Avg", "accuracy": [0.5, 0.6, 0.7, 0.4]})
    s = mean_intervals(df, by=["method", "benchmark"])
    a = s.set_index("method").loc["A"]
    half = stats.t.ppf(0.975, 2) * np.std([0.5, 0.6, 0.7], ddof=1) / np.sqrt(3)
    assert a["mean"] == pytest.approx(0.6) and a["n"] == 3
    assert a.ci_low == pytest.approx(0.6 - half) and a.ci_high == pytest.approx(0.6 + half)
    b = s.set_index("method").loc["B"]
    assert b["n"] == 1 and math.isnan(b.ci_low)
    # mean_intervals output feeds side_by_side directly
    out = side_by_side(load_table("table2", long=True), s.replace({"A": "OptMerge", "B": "TIES"}))
    row = out[(out.method == "OptMerge") & (out.benchmark == "Avg")].iloc[0]
    assert row.published == 57.44 and row.ours_mean == pytest.approx(0.6) and row.ours_ci_low == pytest.approx(a.ci_low)
