"""The papers' published tables, with their source, shown side by side with ours; the papers' claims.

The tables live in ``data/published/*.csv``: ordinary CSV files that start with ``# key: value``
comment lines (``source``, ``table``, ``units``, ``copied-from``). :func:`load_table` returns the
table as published (wide, as in the paper) or in long form (``long=True``), and keeps the
comment lines in ``df.attrs`` - ``df.attrs["source"]`` is always the citation.

>>> from workbench.studies.published import list_tables, load_table
>>> list_tables()                                    # doctest: +ELLIPSIS
['damc_mmer_thirdparty', 'optmerge_table2', ...]
>>> t2 = load_table("optmerge_table2")               # or "table2"
>>> t2.attrs["source"]                               # doctest: +ELLIPSIS
'Wei et al., ...'

:func:`side_by_side` puts published numbers next to the workbench's own (a mean and a 95%
confidence interval per cell), cell by cell; the two are never mixed (separate columns, never
subtracted across). :class:`Claim` *describes* a paper's claim (which two cells, which direction);
claims are judged by the one rule of :mod:`workbench.statistics` (paired effects, Holm,
``VERDICT_RULE``), not here.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import pandas as pd

from ..paths import published_dir


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
    :func:`side_by_side` and :func:`workbench.studies.tables.claim_rows` use by default.
    """
    spec = _resolve(name)
    folder = Path(data_dir) if data_dir is not None else published_dir()
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
def mean_intervals(results: pd.DataFrame, by: Sequence[str], value: str = "accuracy", level: float = 0.95) -> pd.DataFrame:
    """Per-group mean and a Student-t confidence interval of the mean over the rows (e.g. seeds).

    Returns ``[*by, mean, ci_low, ci_high, n]``. One row in a group gives ``n=1`` and NaN bounds
    (no interval from one seed).
    """
    from ..statistics import t_interval

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
    """A directional claim of a paper: ``lhs`` *relation* ``rhs`` - a description, not a verdict.

    ``lhs`` and ``rhs`` select one cell each, e.g. ``{"method": "OptMerge", "benchmark": "Avg"}``.
    ``relation`` is ``">"`` (lhs higher) or ``"<"`` (lhs lower). ``testable=False`` (with ``reason``)
    marks a claim the miniature world cannot test (e.g. GPU hours at 7B scale). ``source`` names the
    table the claim comes from. Claims are judged by :mod:`workbench.statistics` (the one verdict
    rule; :func:`workbench.studies.tables.claim_rows` turns claims into its rows).
    """

    text: str
    lhs: Mapping[str, Any]
    rhs: Mapping[str, Any]
    relation: str = ">"
    testable: bool = True
    reason: str = ""
    source: str = ""

    def __post_init__(self):
        if self.relation not in (">", "<"):
            raise ValueError(f"claim {self.text!r}: relation must be '>' or '<', got {self.relation!r}")

    @classmethod
    def better_than(cls, a: str, b: str, benchmark: str = "Avg", **kw) -> "Claim":
        """``"a > b on benchmark"`` over the keys ``method`` and ``benchmark``."""
        text = kw.pop("text", None) or f"{a} > {b} on {benchmark}"
        return cls(text, {"method": a, "benchmark": benchmark}, {"method": b, "benchmark": benchmark}, ">", **kw)


#: Headline claims of the papers, with the table each comes from (``claim.source``). The cost claim
#: needs GPUs at 1B-7B scale and is marked not testable here.
PAPER_CLAIMS: tuple[Claim, ...] = (
    Claim.better_than("OptMerge", "Task Arithmetic", source="optmerge_table2"),
    Claim.better_than("OptMerge", "WUDI", source="optmerge_table2"),
    Claim.better_than("OptMerge", "TIES", source="optmerge_table2"),
    Claim.better_than("TIES", "Weight Average", source="optmerge_table2"),
    Claim.better_than("Task Arithmetic", "Weight Average", source="optmerge_table2"),
    Claim.better_than("DAMC", "NaiveMC", source="optmerge_table5"),
    Claim("OptMerge takes fewer GPU hours than mixture training (Qwen2-VL-7B)",
          {"setting": "Qwen2-VL-7B", "method": "OptMerge", "quantity": "hours"},
          {"setting": "Qwen2-VL-7B", "method": "Mixture Training", "quantity": "hours"}, "<", testable=False,
          reason="GPU hours and memory of 1B-7B models; no mixture-training baseline at this scale",
          source="optmerge_table7"),
)


def side_by_side(published: pd.DataFrame, ours: pd.DataFrame, on: Sequence[str] = ("method", "benchmark"), *,
                 value: Optional[str] = None, mean: str = "mean", low: str = "ci_low",
                 high: str = "ci_high") -> pd.DataFrame:
    """Published numbers beside ours, cell by cell: ``[*on, published, ours_mean, ours_ci_low,
    ours_ci_high]`` (outer join; a cell missing on one side has NaN there).

    ``published`` is a long-form table (``load_table(name, long=True)``) with the number in ``value``
    (default ``published.attrs["value_column"]``, else ``score``); ``ours`` has one row per key in
    ``on`` with ``mean`` and the bounds of its 95% interval (:func:`mean_intervals` makes them from per-seed
    rows). The two may use different units and scales: they are shown side by side, never subtracted
    here, and no verdict is made (that is :mod:`workbench.statistics`). ``attrs`` (the citation) are
    kept.
    """
    on = list(on)
    value = value or published.attrs.get("value_column", "score")
    pub = published[on + [value]].rename(columns={value: "published"})
    cols = {mean: "ours_mean", low: "ours_ci_low", high: "ours_ci_high"}
    mine = ours[on + [c for c in cols if c in ours.columns]].rename(columns=cols)
    if mine.duplicated(on).any():
        raise ValueError(f"ours has several rows for some keys {on}; give one row per key (see mean_intervals())")
    out = pub.merge(mine, on=on, how="outer")
    for c in cols.values():
        if c not in out.columns:
            out[c] = math.nan
    out.attrs = dict(published.attrs)
    return out
