"""The papers' published tables, with their source, and side-by-side claim checks against ours.

The tables live in ``data/published/*.csv``: ordinary CSV files that start with ``# key: value``
comment lines (``source``, ``table``, ``units``, ``copied-from``). :func:`load_table` returns the
table as published (wide, as in the paper) or in long form (``long=True``), and keeps the
comment lines in ``df.attrs`` - ``df.attrs["source"]`` is always the citation.

>>> from workbench.published import list_tables, load_table
>>> list_tables()                                    # doctest: +ELLIPSIS
['damc_mmer_thirdparty', 'optmerge_table2', ...]
>>> t2 = load_table("optmerge_table2")               # or "table2"
>>> t2.attrs["source"]                               # doctest: +ELLIPSIS
'Wei et al., ...'

:func:`side_by_side` puts published numbers next to the workbench's own (a mean and a 95%
confidence interval per cell) and judges explicit :class:`Claim` s - see its docstring for the
exact rule. Published and measured numbers are never mixed: they sit in separate columns, and a
verdict is decided by *our* intervals only (the published values are shown, and
``published_holds`` says whether the paper's own numbers show the claimed direction).
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import pandas as pd

#: Folder of the published CSV files (``data/published`` of the repository).
DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "published"

#: The verdicts (one set, defined in :mod:`workbench.statistics`).
from .statistics import INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, VERDICTS  # noqa: E402


@dataclass(frozen=True)
class TableSpec:
    """How one published table is stored and how it turns into long form.

    ``id_vars`` are the row labels of the wide table; the other columns are melted into
    ``var_name`` / ``value_name``; ``rename`` renames columns first (e.g. Table 5's ``task`` is a
    benchmark). ``long_form`` tables are stored long already.
    """

    name: str
    file: str
    id_vars: tuple[str, ...] = ()
    var_name: str = "benchmark"
    value_name: str = "score"
    rename: Mapping[str, str] = field(default_factory=dict)
    long_form: bool = False
    verified: bool = True


_SPECS = [
    TableSpec("optmerge_table2", "optmerge_table2_internvl_fullft.csv", ("method",), "benchmark", "score"),
    TableSpec("optmerge_table3", "optmerge_table3_qwen2vl_lora.csv", ("method",), "benchmark", "score"),
    TableSpec("optmerge_table4", "optmerge_table4_ablation.csv", ("step",), "model", "score"),
    TableSpec("optmerge_table5", "optmerge_table5_modality_merging.csv", ("benchmark",), "method", "score",
              rename={"task": "benchmark"}),
    TableSpec("optmerge_table7", "optmerge_table7_cost.csv", ("setting", "method"), "quantity", "value"),
    TableSpec("optmerge_table8", "optmerge_table8_rank_ratio.csv", ("k_ratio",), "model", "score"),
    TableSpec("damc_mmer_thirdparty", "damc_mmer_thirdparty_unverified.csv", long_form=True, verified=False),
]
#: Every published table by name.
TABLES: dict[str, TableSpec] = {s.name: s for s in _SPECS}
#: Short names accepted by :func:`load_table` (``"table3"`` is ``"optmerge_table3"``).
ALIASES: dict[str, str] = {f"table{n}": f"optmerge_table{n}" for n in (2, 3, 4, 5, 7, 8)}
ALIASES["damc_mmer_thirdparty_unverified"] = "damc_mmer_thirdparty"


def list_tables() -> list[str]:
    """Names of the published tables (sorted); each loads with :func:`load_table`."""
    return sorted(TABLES)


def read_published_csv(path: Union[str, Path]) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read a CSV whose first lines are ``# key: value`` comments; returns ``(frame, metadata)``.

    Only the *leading* ``#`` lines are metadata (a ``#`` inside a value is data). A metadata line
    without ``key:`` raises ``ValueError``, as does a file without a ``source``.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    meta: dict[str, str] = {}
    n = 0
    for line in lines:
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].partition(":")
        if not sep or not key.strip():
            raise ValueError(f"{path}: header line {n + 1} is not '# key: value': {line.rstrip()!r}")
        meta[key.strip().lower()] = value.strip()
        n += 1
    if "source" not in meta:
        raise ValueError(f"{path}: no '# source: ...' line - every published table must name its source")
    frame = pd.read_csv(io.StringIO("".join(lines[n:])))
    return frame, meta


def _resolve(name: str) -> TableSpec:
    key = ALIASES.get(name, name)
    if key not in TABLES:
        raise KeyError(f"unknown published table {name!r}; known: {', '.join(list_tables())} "
                       f"(aliases: {', '.join(sorted(ALIASES))})")
    return TABLES[key]


def load_table(name: str, long: bool = False, data_dir: Union[str, Path, None] = None) -> pd.DataFrame:
    """One published table, as in the paper (``long=False``) or in long form (``long=True``).

    ``df.attrs`` holds ``source`` (the citation), ``table`` (which table of the paper), ``units``,
    ``copied_from``, ``name`` (the canonical name), ``file`` and ``verified`` (False for the
    third-party figures).

    Long form: one row per reported number, missing (not reported) cells dropped, with columns

    - ``optmerge_table2`` / ``optmerge_table3``: ``method, benchmark, score``
    - ``optmerge_table5``: ``benchmark, method, score`` (the paper's ``task`` column is the benchmark)
    - ``optmerge_table4``: ``step, model, score``; ``optmerge_table8``: ``k_ratio, model, score``
    - ``optmerge_table7``: ``setting, method, quantity, value`` (quantity: ``hours``, ``memory_gb``)
    - ``damc_mmer_thirdparty``: stored long: ``source, method, benchmark, score, note``

    A long table also has ``attrs["value_column"]`` (``score`` or ``value``), which
    :func:`side_by_side` uses by default.
    """
    spec = _resolve(name)
    folder = Path(data_dir) if data_dir is not None else DATA_DIR
    path = folder / spec.file
    if not path.exists():
        raise FileNotFoundError(f"published table {spec.name!r}: {path} is missing")
    df, meta = read_published_csv(path)
    if spec.rename:
        df = df.rename(columns=dict(spec.rename))
    if long and not spec.long_form:
        value_cols = [c for c in df.columns if c not in spec.id_vars]
        df = df.melt(id_vars=list(spec.id_vars), value_vars=value_cols, var_name=spec.var_name,
                     value_name=spec.value_name)
        df = df.dropna(subset=[spec.value_name]).reset_index(drop=True)
    df.attrs.update({k.replace("-", "_"): v for k, v in meta.items()})
    df.attrs.update(name=spec.name, file=str(path), verified=spec.verified)
    if long:
        df.attrs["value_column"] = spec.value_name
    return df


# ------------------------------------------------------------------------------------ ours
def summarise(results: pd.DataFrame, by: Sequence[str], value: str = "accuracy", level: float = 0.95) -> pd.DataFrame:
    """Per-group mean and a Student-t confidence interval of the mean over the rows (e.g. seeds).

    Returns ``[*by, mean, ci_low, ci_high, n]``. One row in a group gives ``n=1`` and NaN bounds
    (no interval from one seed).
    """
    from .statistics import t_interval

    rows = []
    for key, g in results.groupby(list(by), sort=True, dropna=False):
        x = g[value].astype(float).dropna().to_numpy()
        n = len(x)
        mean, lo, hi = t_interval(x, level) if n else (math.nan, math.nan, math.nan)
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), "mean": mean, "ci_low": lo, "ci_high": hi, "n": n})
    return pd.DataFrame(rows, columns=[*by, "mean", "ci_low", "ci_high", "n"])


# ------------------------------------------------------------------------------------ claims
@dataclass(frozen=True)
class Claim:
    """A directional claim of a paper: ``lhs`` *relation* ``rhs``.

    ``lhs`` and ``rhs`` select one row each by the join keys, e.g.
    ``{"method": "OptMerge", "benchmark": "Avg"}``. ``relation`` is ``">"`` (lhs higher) or
    ``"<"`` (lhs lower). ``testable=False`` (with ``reason``) marks a claim the miniature world
    cannot test (e.g. GPU hours at 7B scale). ``margin`` (in the units of ours) is how far apart
    the intervals must be; 0 by default. ``source`` names the table the claim comes from.
    """

    text: str
    lhs: Mapping[str, Any]
    rhs: Mapping[str, Any]
    relation: str = ">"
    testable: bool = True
    reason: str = ""
    margin: float = 0.0
    source: str = ""

    def __post_init__(self):
        if self.relation not in (">", "<"):
            raise ValueError(f"claim {self.text!r}: relation must be '>' or '<', got {self.relation!r}")
        if self.margin < 0:
            raise ValueError(f"claim {self.text!r}: margin must be >= 0")

    @classmethod
    def better_than(cls, a: str, b: str, benchmark: str = "Avg", **kw) -> "Claim":
        """``"a > b on benchmark"`` over the keys ``method`` and ``benchmark``."""
        text = kw.pop("text", None) or f"{a} > {b} on {benchmark}"
        return cls(text, {"method": a, "benchmark": benchmark}, {"method": b, "benchmark": benchmark}, ">", **kw)

    @classmethod
    def parse(cls, text: str, benchmark: str = "Avg", **kw) -> "Claim":
        """``"A > B"`` or ``"A < B on BENCH"`` (methods A, B; benchmark default ``benchmark``)."""
        m = re.fullmatch(r"\s*(.+?)\s*([<>])\s*(.+?)\s*(?:\bon\s+(.+?))?\s*", text)
        if not m:
            raise ValueError(f"cannot parse claim {text!r}: expected 'A > B' or 'A > B on BENCHMARK'")
        a, rel, b, bench = m.groups()
        bench = bench or benchmark
        return cls(text, {"method": a, "benchmark": bench}, {"method": b, "benchmark": bench}, rel, **kw)


#: Headline claims of the papers, with the table each comes from (``claim.source``; pick the claims
#: of one table for one :func:`side_by_side` call). The cost claim needs GPUs at 1B-7B scale and is
#: marked not testable here.
PAPER_CLAIMS: tuple[Claim, ...] = (
    Claim.better_than("OptMerge", "Task Arithmetic", source="optmerge_table2"),
    Claim.better_than("OptMerge", "WUDI", source="optmerge_table2"),
    Claim.better_than("OptMerge", "TIES", source="optmerge_table2"),
    Claim.better_than("TIES", "Weight Average", source="optmerge_table2"),
    Claim.better_than("Task Arithmetic", "Weight Average", source="optmerge_table2"),
    Claim.better_than("DAMC", "NaiveMC", source="optmerge_table5"),
    Claim("OptMerge takes fewer GPU hours than mixture training (Qwen2-VL-7B)",
          {"setting": "Qwen2-VL-7B", "method": "OptMerge", "quantity": "hours"},
          {"setting": "Qwen2-VL-7B", "method": "Mixture Training", "quantity": "hours"}, "<", testable=False, reason="GPU hours and memory of 1B-7B models; no mixture-training baseline at this scale",
          source="optmerge_table7"),
)


def _select(frame: pd.DataFrame, sel: Mapping[str, Any], what: str) -> Optional[pd.Series]:
    missing = [k for k in sel if k not in frame.columns]
    if missing:
        return None
    mask = pd.Series(True, index=frame.index)
    for k, v in sel.items():
        mask &= frame[k] == v
    hits = frame[mask]
    if len(hits) > 1:
        raise ValueError(f"{what}: {dict(sel)} matches {len(hits)} rows; give one row per key (see summarise())")
    return None if hits.empty else hits.iloc[0]


def _label(sel: Mapping[str, Any]) -> str:
    return " @ ".join(str(v) for v in sel.values())


def judge(lhs: tuple[float, float], rhs: tuple[float, float], relation: str = ">", margin: float = 0.0) -> str:
    """The verdict on ``lhs relation rhs`` from two confidence intervals ``(low, high)``.

    For ``">"``: :data:`REPRODUCED` if ``lhs.low > rhs.high + margin`` (the intervals are apart in
    the claimed direction), :data:`NOT_REPRODUCED` if ``rhs.low > lhs.high + margin`` (apart in the
    opposite direction), :data:`INCONCLUSIVE` otherwise (they overlap or touch, or a bound is NaN).
    ``"<"`` is the same with the sides swapped.
    """
    if relation == "<":
        lhs, rhs = rhs, lhs
    elif relation != ">":
        raise ValueError(f"relation must be '>' or '<', got {relation!r}")
    (l_lo, l_hi), (r_lo, r_hi) = lhs, rhs
    if any(math.isnan(float(x)) for x in (l_lo, l_hi, r_lo, r_hi)):
        return INCONCLUSIVE
    if l_lo > r_hi + margin:
        return REPRODUCED
    if r_lo > l_hi + margin:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def join_published(published: pd.DataFrame, ours: pd.DataFrame, on: Sequence[str] = ("method", "benchmark"),
                   value: Optional[str] = None, mean: str = "mean", low: str = "ci_low",
                   high: str = "ci_high") -> pd.DataFrame:
    """Cell by cell: ``[*on, published, ours_mean, ours_ci_low, ours_ci_high]`` (outer join).

    ``published`` is a long-form table (``load_table(name, long=True)``); ``ours`` has one row per
    key with ``mean`` and its interval. A cell missing on one side has NaN there. ``value`` is the
    published number's column (default: ``published.attrs["value_column"]``, else ``score``).
    """
    on = list(on)
    value = value or published.attrs.get("value_column", "score")
    pub = published[on + [value]].rename(columns={value: "published"})
    cols = {mean: "ours_mean", low: "ours_ci_low", high: "ours_ci_high"}
    mine = ours[on + [c for c in cols if c in ours.columns]].rename(columns=cols)
    if mine.duplicated(on).any():
        raise ValueError(f"ours has several rows for some keys {on}; give one row per key (see summarise())")
    out = pub.merge(mine, on=on, how="outer")
    for c in cols.values():
        if c not in out.columns:
            out[c] = math.nan
    out.attrs = dict(published.attrs)
    return out


def side_by_side(published: pd.DataFrame, ours: pd.DataFrame, on: Sequence[str] = ("method", "benchmark"),
                 claim_rules: Optional[Iterable[Union[Claim, str]]] = None, *, value: Optional[str] = None,
                 mean: str = "mean", low: str = "ci_low", high: str = "ci_high") -> pd.DataFrame:
    """Published numbers beside ours, and a verdict for every claim.

    Inputs
        ``published``: a long-form published table (``load_table(name, long=True)``), one row per
        key in ``on`` with the number in ``value`` (default ``published.attrs["value_column"]``). ``ours``: one row per key with ``mean`` and the
        bounds of its 95% confidence interval (``ci_low``, ``ci_high``; :func:`summarise` makes them
        from per-seed rows). The two may use different units (accuracy % vs fraction): numbers are
        shown side by side, never subtracted across the two.

    Without ``claim_rules``: the cell-by-cell join of :func:`join_published`.

    With ``claim_rules`` (:class:`Claim` objects, or strings ``"A > B [on BENCH]"`` parsed by
    :meth:`Claim.parse`): one row per claim with ``claim, lhs, rhs, relation, published_lhs,
    published_rhs, published_holds, ours_lhs_mean, ours_lhs_ci_low, ours_lhs_ci_high, ours_rhs_mean,
    ours_rhs_ci_low, ours_rhs_ci_high, verdict, reason, source``. The verdict of claim
    ``lhs > rhs`` (``<`` is symmetric) is decided on *ours* only:

    - ``"not testable here"``: the claim is marked ``testable=False``, or ours has no row
      for one of its sides (the method or benchmark does not exist in the miniature world);
    - ``"reproduced"``: ours' intervals do not overlap and lie in the claimed direction:
      ``lhs.ci_low > rhs.ci_high + margin``;
    - ``"not reproduced"``: they do not overlap and lie in the opposite direction:
      ``rhs.ci_low > lhs.ci_high + margin``;
    - ``"inconclusive"``: anything else - the intervals overlap or touch, or an interval is
      missing (a single seed).

    Two separate 95% intervals that do not overlap is a conservative test (for equal standard
    errors it corresponds to p of about 0.006 for the difference): "inconclusive" means "not
    shown at this sample size", not "false". ``published_holds`` tells whether the paper's own
    numbers show the claimed direction (None where the paper has no such cell) - a claim can be
    reproduced here that the table itself does not support; it is reported, not hidden.
    """
    on = list(on)
    if claim_rules is None:
        return join_published(published, ours, on, value=value, mean=mean, low=low, high=high)
    value = value or published.attrs.get("value_column", "score")
    claims = [c if isinstance(c, Claim) else Claim.parse(c) for c in claim_rules]
    if ours.duplicated([k for k in on if k in ours.columns]).any():
        raise ValueError(f"ours has several rows for some keys {on}; give one row per key (see summarise())")
    rows = []
    for c in claims:
        p_l, p_r = _select(published, c.lhs, "published"), _select(published, c.rhs, "published")
        o_l, o_r = _select(ours, c.lhs, "ours"), _select(ours, c.rhs, "ours")
        pub_l = float(p_l[value]) if p_l is not None else math.nan
        pub_r = float(p_r[value]) if p_r is not None else math.nan
        holds = None
        if not (math.isnan(pub_l) or math.isnan(pub_r)):
            holds = bool(pub_l > pub_r) if c.relation == ">" else bool(pub_l < pub_r)

        def num(row, col):
            return float(row[col]) if row is not None and col in row.index and pd.notna(row[col]) else math.nan

        ol = (num(o_l, mean), num(o_l, low), num(o_l, high))
        orr = (num(o_r, mean), num(o_r, low), num(o_r, high))
        if not c.testable:
            verdict, reason = NOT_TESTABLE, c.reason or "marked not testable at this scale"
        elif o_l is None or o_r is None:
            side = _label(c.lhs) if o_l is None else _label(c.rhs)
            verdict, reason = NOT_TESTABLE, f"no result of ours for {side}"
        else:
            verdict = judge(ol[1:], orr[1:], c.relation, c.margin)
            if verdict == INCONCLUSIVE and any(math.isnan(x) for x in (*ol[1:], *orr[1:])):
                reason = "no interval on one side (a single seed?)"
            else:
                reason = {REPRODUCED: "intervals apart in the claimed direction",
                          NOT_REPRODUCED: "intervals apart in the opposite direction",
                          INCONCLUSIVE: "intervals overlap"}[verdict]
        rows.append({"claim": c.text, "lhs": _label(c.lhs), "rhs": _label(c.rhs), "relation": c.relation,
                     "published_lhs": pub_l, "published_rhs": pub_r, "published_holds": holds,
                     "ours_lhs_mean": ol[0], "ours_lhs_ci_low": ol[1], "ours_lhs_ci_high": ol[2],
                     "ours_rhs_mean": orr[0], "ours_rhs_ci_low": orr[1], "ours_rhs_ci_high": orr[2],
                     "verdict": verdict, "reason": reason, "source": c.source or published.attrs.get("name", "")})
    out = pd.DataFrame(rows)
    out.attrs = dict(published.attrs)
    return out
