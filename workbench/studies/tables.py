"""The merging benchmark's tables, from the rows of :mod:`workbench.studies.merging_benchmark`.

- :func:`summary_long` - one row per method x benchmark (each task and ``Avg``) with its interval;
  :func:`merge_table` - the Table-2-shaped wide table (methods x tasks + Avg, with intervals);
  :func:`gain_retention` - the share of the experts' gains over the base VLM each merge keeps;
- :func:`item_predictions`, :func:`paired_tests` - the cached per-item predictions of a method and
  exact McNemar tests between two methods on the same items;
- :func:`compare_published` - our table beside the paper's, with verdicts for its claims
  (:func:`paper_claims`, :func:`claim_rows`); :func:`write_tables` writes them.

Intervals: per task, the Wilson interval of the item counts; for the average over tasks, with one
seed the normal approximation ``Avg ± 1.96 sqrt(Σ_t p_t(1−p_t)/n_t)/T`` (tasks independent), with
two or more seeds a Student-t interval over the seeds' averages.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..paths import resolve_repo_path
from ..io.writer import atomic_write
from .cache import read_predictions
from .merging_benchmark import BASE_LABEL, CAP_METHODS, INDIV_MEAN, INDIV_OWN, TASK_LABELS, indiv_label, method_label
from .protocol import wilson


# ============================================================================================ tables
def _wilson_p(p: float, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson interval (percent) of a proportion ``p`` observed on ``n`` items (``p n`` need not be whole)."""
    from scipy import stats

    zz = float(stats.norm.ppf(0.5 + conf / 2))
    den = 1 + zz * zz / n
    centre = (p + zz * zz / (2 * n)) / den
    half = zz * math.sqrt(p * (1 - p) / n + zz * zz / (4 * n * n)) / den
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def _avg_interval(accs: Sequence[float], ns: Sequence[int], z: float = 1.959963984540054) -> tuple[float, float, float]:
    a = np.asarray(accs, float) / 100.0
    n = np.asarray(ns, float)
    if len(a) == 0 or np.any(n <= 0) or np.any(np.isnan(a)):
        return math.nan, math.nan, math.nan
    if len(a) == 1:  # one task: its own Wilson interval
        lo, hi = _wilson_p(float(a[0]), int(n[0]))
        return 100 * float(a[0]), lo, hi
    mean = float(a.mean())
    half = z * math.sqrt(float(np.sum(a * (1 - a) / n))) / len(a)
    return 100 * mean, 100 * max(0.0, mean - half), 100 * min(1.0, mean + half)


def summary_long(df: pd.DataFrame, split: str = "test", add_indiv: bool = True,
                 tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per method x benchmark (each task and ``"Avg"``) on ``split``, at the selected λ:
    ``method, kind, benchmark, mean, ci_low, ci_high, n_seeds, lambda, status``.

    Per task: one seed -> the Wilson interval; several -> a Student-t interval over seeds. ``Avg``
    (mean over tasks): one seed -> normal approximation of the per-task binomial variances;
    several -> Student-t over the seeds' averages. ``add_indiv`` adds ``"Indiv. (mean)"`` (per
    task, the mean over the Indiv. rows) and ``"Indiv. (own task)"`` (per task, that task's own
    expert; capability rows only) with intervals formed the same way from their counts.
    ``tasks`` restricts the benchmarks (and so the ``Avg``), e.g. Table 5's multi-modality ones.
    """
    from .published import mean_intervals

    d = df[(df["split"] == split) & (df["selected"].astype(bool))].copy()
    all_tasks = list(dict.fromkeys(df.loc[df["split"] == split, "task"]))
    tasks = all_tasks if tasks is None else [t for t in all_tasks if t in set(tasks)]
    d = d[d["task"].isin(tasks)]
    out = []
    for (method, kind), g in d.groupby(["method", "kind"], sort=False):
        failed = (g["status"] != "ok").any()
        seeds = sorted(g["seed"].unique())
        lam = g["lambda"].dropna().unique()
        lam_s = ",".join(f"{x:g}" for x in sorted(lam)) if len(lam) else ""
        for t in tasks:
            gt = g[g["task"] == t]
            if gt.empty:
                continue
            if len(seeds) >= 2:
                s = mean_intervals(gt, ["task"], value="accuracy").iloc[0]
                mean, lo, hi = s["mean"], s["ci_low"], s["ci_high"]
            else:
                k, n = int(gt["n_correct"].sum()), int(gt["n"].sum())
                mean = 100.0 * k / n if n and not failed else math.nan
                lo, hi = wilson(k, n) if n and not failed else (math.nan, math.nan)
            out.append({"method": method, "kind": kind, "benchmark": t, "mean": mean, "ci_low": lo, "ci_high": hi,
                        "n_seeds": len(seeds), "lambda": lam_s, "status": "failed" if failed else "ok"})
        per_seed = []
        for s, gs in g.groupby("seed"):
            gs = gs.set_index("task").reindex(tasks)
            per_seed.append(_avg_interval(gs["accuracy"].tolist(), gs["n"].fillna(0).astype(int).tolist()))
        if len(per_seed) >= 2:
            vals = pd.DataFrame({"accuracy": [p[0] for p in per_seed], "k": 0})
            s = mean_intervals(vals, ["k"], value="accuracy").iloc[0]
            avg = (s["mean"], s["ci_low"], s["ci_high"])
        else:
            avg = per_seed[0] if per_seed else (math.nan,) * 3
        out.append({"method": method, "kind": kind, "benchmark": "Avg", "mean": avg[0], "ci_low": avg[1],
                    "ci_high": avg[2], "n_seeds": len(seeds), "lambda": lam_s, "status": "failed" if failed else "ok"})
    res = pd.DataFrame(out, columns=["method", "kind", "benchmark", "mean", "ci_low", "ci_high", "n_seeds", "lambda",
                                     "status"])
    if add_indiv:
        res = pd.concat([res, _indiv_rows(d, tasks)], ignore_index=True)
    return res


def _indiv_rows(d: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    ind = d[(d["kind"] == "indiv") & (d["status"] == "ok")]
    if ind.empty:
        return pd.DataFrame()
    rows = []
    own_label = {indiv_label(t): t for t in tasks}
    for label, pick in ((INDIV_MEAN, None), (INDIV_OWN, "own")):
        accs, ns = [], []
        for t in tasks:
            gt = ind[ind["task"] == t]
            if pick == "own":
                gt = gt[gt["method"].map(own_label) == t]
                if gt.empty:
                    break
            k, n = int(gt["n_correct"].sum()), int(gt["n"].sum())
            if n == 0:
                continue
            p = k / n
            # mean over experts of the same items: its variance is bounded by that of one expert's
            n_eff = int(gt["n"].iloc[0]) * gt["seed"].nunique()
            lo, hi = _wilson_p(p, n_eff)
            rows.append({"method": label, "kind": "indiv", "benchmark": t, "mean": 100 * p, "ci_low": lo,
                         "ci_high": hi, "n_seeds": gt["seed"].nunique(), "lambda": "", "status": "ok"})
            accs.append(100 * p)
            ns.append(n_eff)
        else:
            if accs:
                m, lo, hi = _avg_interval(accs, ns)
                rows.append({"method": label, "kind": "indiv", "benchmark": "Avg", "mean": m, "ci_low": lo,
                             "ci_high": hi, "n_seeds": int(ind["seed"].nunique()), "lambda": "", "status": "ok"})
            continue
        rows = [r for r in rows if r["method"] != label]  # own-task row incomplete: drop it
    return pd.DataFrame(rows)


def gain_retention(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """How much of the experts' gains each model keeps (capability rows), per model on ``split`` at the
    selected λ: ``kept_gain`` = the model's mean gain over the base VLM across tasks / the own experts'
    mean own-task gain over it, in % (the share of the experts' mean own-task gain the one model keeps; a
    ratio of means, so a task whose expert gains next to nothing does not blow it up), ``normalized`` =
    mean over tasks of model / own expert in %
    (the benchmark's normalised accuracy), and ``avg_minus_base`` = the model's Avg − the base VLM's
    (points). Per seed, then the mean over seeds with a 95% t-interval (``*_low``/``*_high``; NaN for
    one seed). Rows: every merge, the mixture-training model and the base VLM."""
    from ..statistics import t_interval

    d = df[(df["split"] == split) & (df["selected"].astype(bool)) & (df["status"] == "ok")]
    tasks = list(dict.fromkeys(d["task"]))
    own_label = {indiv_label(t): t for t in tasks}
    per_seed: dict[tuple[str, str], list[dict]] = {}
    for seed, g in d.groupby("seed"):
        base = g[g["kind"] == "base"].set_index("task")["accuracy"]
        ind = g[g["kind"] == "indiv"]
        own = {own_label[m]: a for m, t, a in zip(ind["method"], ind["task"], ind["accuracy"]) if own_label.get(m) == t}
        if base.empty or set(own) != set(tasks):
            continue
        expert_gain = float(np.mean([own[t] - base[t] for t in tasks]))
        models = g[g["kind"].isin(["merge", "oracle", "base"])]
        for (method, kind), gm in models.groupby(["method", "kind"], sort=False):
            acc = gm.set_index("task")["accuracy"]
            if set(acc.index) != set(tasks):
                continue
            per_seed.setdefault((method, kind), []).append({
                "kept_gain": 100 * float(np.mean([acc[t] - base[t] for t in tasks])) / expert_gain
                if expert_gain > 0 else math.nan,
                "normalized": 100 * float(np.mean([acc[t] / own[t] for t in tasks if own[t] > 0])),
                "avg_minus_base": float(np.mean([acc[t] - base[t] for t in tasks]))})
    rows = []
    for (method, kind), vals in per_seed.items():
        row = {"method": method, "kind": kind, "n_seeds": len(vals)}
        for key in ("kept_gain", "normalized", "avg_minus_base"):
            m, lo, hi = t_interval([v[key] for v in vals])
            row.update({key: m, f"{key}_low": lo, f"{key}_high": hi})
        rows.append(row)
    cols = ["method", "kind", "n_seeds"] + [f"{k}{s}" for k in ("kept_gain", "normalized", "avg_minus_base")
                                            for s in ("", "_low", "_high")]
    return pd.DataFrame(rows, columns=cols).sort_values("kept_gain", ascending=False, ignore_index=True)


def merge_table(df: pd.DataFrame, split: str = "test", fmt: bool = False, digits: int = 1,
                tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """The Table-2-shaped wide table: one row per model (references first, then merge methods in
    the order run), one column per task and ``Avg`` (mean accuracy, %), plus ``lambda`` (the
    selected λ). ``fmt=True`` gives strings ``"57.4 [52.1, 62.3]"`` (95% intervals, see
    :func:`summary_long`); a failed method shows ``"failed"``. ``tasks``: the benchmarks to show
    and average (default all)."""
    long = summary_long(df, split, tasks=tasks)
    if long.empty:
        return pd.DataFrame()
    order = list(dict.fromkeys(long["method"]))
    kinds = dict(zip(long["method"], long["kind"]))
    rank = {"base": 0, "indiv": 1, "oracle": 2, "composition": 3, "merge": 4}
    order.sort(key=lambda m: rank.get(kinds[m], 5))
    bench = [b for b in dict.fromkeys(long["benchmark"]) if b != "Avg"] + ["Avg"]

    def cell(r):
        if r["status"] != "ok":
            return "failed"
        if not fmt:
            return r["mean"]
        if pd.isna(r["mean"]):
            return ""
        if pd.isna(r["ci_low"]):
            return f"{r['mean']:.{digits}f}"
        return f"{r['mean']:.{digits}f} [{r['ci_low']:.{digits}f}, {r['ci_high']:.{digits}f}]"

    long = long.assign(cell=long.apply(cell, axis=1))
    wide = long.pivot(index="method", columns="benchmark", values="cell").reindex(index=order, columns=bench)
    lam = long.drop_duplicates("method").set_index("method")["lambda"].reindex(order)
    wide["lambda"] = lam
    wide.columns = [TASK_LABELS.get(c, c) for c in wide.columns]
    wide.index.name = "method"
    return wide


# ============================================================================================ paired tests
def item_predictions(df: pd.DataFrame, method: str, split: str = "test") -> pd.DataFrame:
    """Per-item predictions of ``method``'s reported rows (``selected``) on ``split``, read from the
    rows' ``pred_file`` (columns of :func:`workbench.evaluate.predict` plus ``task_set``, ``seed``)."""
    d = df[(df["method"] == method) & (df["split"] == split) & df["selected"].astype(bool) & (df["status"] == "ok")]
    frames = []
    for r in d.itertuples():
        pred_file = resolve_repo_path(r.pred_file) if r.pred_file else None
        if pred_file is None or not pred_file.is_file():
            raise FileNotFoundError(f"no cached predictions for {method} / {r.task} / seed {r.seed} "
                                    f"(run with a cache): {r.pred_file!r}")
        p = read_predictions(pred_file)
        p["correct"] = p["correct"].astype(str).str.lower().isin(["true", "1"])
        p["task_set"], p["seed"] = r.task, r.seed
        frames.append(p)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def paired_tests(df: pd.DataFrame, pairs: Sequence[tuple[str, str]], split: str = "test") -> pd.DataFrame:
    """Exact McNemar tests between two methods on the same items, per task and pooled over all
    tasks (``task = "All"``) and seeds: ``method_a, method_b, task, n, b (a right, b wrong), c,
    acc_a, acc_b, pvalue`` (two-sided). More sensitive than comparing two intervals, because the
    items are shared."""
    from ..statistics import mcnemar_exact

    rows = []
    for a, b in pairs:
        pa, pb = item_predictions(df, a, split), item_predictions(df, b, split)
        if pa.empty or pb.empty:
            continue
        j = pa.merge(pb, on=["id", "seed", "task_set"], suffixes=("_a", "_b"))
        for task, g in list(j.groupby("task_set", sort=False)) + [("All", j)]:
            t = mcnemar_exact(g["correct_a"].tolist(), g["correct_b"].tolist())
            rows.append({"method_a": a, "method_b": b, "task": task, "n": t["n"], "b": t["b"], "c": t["c"],
                         "acc_a": 100 * float(g["correct_a"].mean()), "acc_b": 100 * float(g["correct_b"].mean()),
                         "pvalue": t["pvalue"]})
    return pd.DataFrame(rows, columns=["method_a", "method_b", "task", "n", "b", "c", "acc_a", "acc_b", "pvalue"])


# ============================================================================================ published
#: The paper's base-model row name per published table.
PUBLISHED_BASE = {"optmerge_table2": "InternVL2.5-Instruct", "optmerge_table3": "Qwen2-VL-Base"}
MERGE_LABELS = tuple(method_label(m) for m in CAP_METHODS)


def paper_claims(table: str = "optmerge_table2"):
    """Claims checked by :func:`compare_published` (``published.Claim`` objects): for Tables 2/3
    the headline claims of ``published.PAPER_CLAIMS`` (OptMerge > TA / WUDI / TIES, TIES and TA >
    Weight Average), merging beats the individual experts' mean and the base; for Table 5 DAMC >
    NaiveMC and OptMerge > NaiveMC / Weight Average."""
    from dataclasses import replace

    from .published import PAPER_CLAIMS, Claim

    if table in ("optmerge_table5", "table5"):
        claims = [replace(c, source="optmerge_table5") for c in PAPER_CLAIMS if c.source == "optmerge_table5"]
        claims += [Claim.better_than("OptMerge", "NaiveMC", source="optmerge_table5"),
                   Claim.better_than("OptMerge", "Weight Average", source="optmerge_table5")]
        return claims
    claims = [c for c in PAPER_CLAIMS if c.source == "optmerge_table2"]
    claims = [replace(c, source=table) for c in claims]
    claims.append(Claim("merging (OptMerge) beats the individual experts' average", {"method": "OptMerge",
                        "benchmark": "Avg"}, {"method": INDIV_MEAN, "benchmark": "Avg"}, ">", source=table))
    claims.append(Claim.better_than("OptMerge", BASE_LABEL, text="OptMerge beats the base model", source=table))
    return claims


#: The benchmarks a published table's ``Avg`` runs over, in the miniature world: Table 5 averages its two
#: multi-modality benchmarks (MUSIC-AVQA, AVQA), whose analogue here is MCUB-mini; Tables 2/3 average all tasks.
def table_tasks(df: pd.DataFrame, table: str) -> list[str] | None:
    """The tasks our ``Avg`` is taken over for ``table`` (``None``: every task): the MCUB-mini
    benchmarks for Table 5 (the paper's Avg is over its two multi-modality benchmarks), all otherwise."""
    if table in ("optmerge_table5", "table5"):
        return [t for t in dict.fromkeys(df["task"]) if str(t).startswith("mcub")]
    return None


def _count_items(df: pd.DataFrame, method: str, split: str, tasks: Sequence[str] | None) -> pd.DataFrame:
    """0/1 items rebuilt from a method's counts (``n``, ``n_correct`` per task and seed), for the unpaired
    comparison when the per-item predictions are not cached (``"Indiv. (mean)"``: the experts' mean count)."""
    ok = (df["split"] == split) & df["selected"].astype(bool) & (df["status"] == "ok")
    if method == INDIV_MEAN:  # the mean expert: per seed and task, the experts' mean count on one expert's items
        ind = df[ok & (df["kind"] == "indiv") & ~df["method"].isin([INDIV_MEAN, INDIV_OWN])]
        d = (ind.groupby(["seed", "task"], as_index=False).agg(n=("n", "first"), n_correct=("n_correct", "mean"))
             .assign(n_correct=lambda x: x["n_correct"].round().astype(int)))
    else:
        d = df[ok & (df["method"] == method)]
    if tasks is not None:
        d = d[d["task"].isin(list(tasks))]
    parts = [pd.DataFrame({"seed": r.seed, "stratum": r.task, "id": [f"{r.task}-{i}" for i in range(int(r.n))],
                           "correct": np.arange(int(r.n)) < int(r.n_correct)}) for r in d.itertuples()]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["seed", "stratum", "id", "correct"])


def _claim_items(df: pd.DataFrame, method: str, split: str, tasks: Sequence[str] | None) -> pd.DataFrame | None:
    """Per-item outcomes of ``method`` (``stratum`` = task) from the cached predictions; ``"Indiv. (mean)"``
    is, per item, the mean over the individual experts (a value in points). ``None`` when not cached."""
    methods = ([m for m in dict.fromkeys(df.loc[df["kind"] == "indiv", "method"]) if m not in (INDIV_MEAN, INDIV_OWN)]
               if method == INDIV_MEAN else [method])
    try:
        frames = [item_predictions(df, m, split) for m in methods]
    except FileNotFoundError:
        return None
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["seed", "stratum", "id", "correct"])
    p = pd.concat(frames, ignore_index=True).rename(columns={"task_set": "stratum"})
    if tasks is not None:
        p = p[p["stratum"].isin(list(tasks))]
    if method == INDIV_MEAN:
        return (p.assign(value=100.0 * p["correct"].astype(float)).groupby(["seed", "stratum", "id"], as_index=False)
                ["value"].mean())
    return p[["seed", "stratum", "id", "correct", "pred"]]


def claim_rows(df: pd.DataFrame, claims: Sequence, published: pd.DataFrame, split: str = "test",
               tasks: Sequence[str] | None = None, inert: Mapping[str, str] | None = None) -> list[dict]:
    """Rows of :func:`workbench.statistics.compare` for ``claims`` (``published.Claim`` on ``method`` and
    ``benchmark``; our side is always the average over ``tasks``): paired on the test items where both
    sides' predictions are cached (``pred_file``), else unpaired from the counts (labelled so).
    ``published``: long table with ``method, benchmark, score`` (the paper's numbers, in points).
    ``inert``: ``{method: reason}`` for methods found inert by the caller (e.g. an optimiser that did
    not move its objective, :func:`workbench.statistics.optimiser_inert`)."""
    from ..statistics import compare

    pub = {(m, b): float(v) for m, b, v in zip(published["method"], published["benchmark"],
                                               published[published.attrs.get("value_column", "score")])}
    inert = dict(inert or {})
    labels = set(df["method"]) | ({INDIV_MEAN} if (df["kind"] == "indiv").any() else set())
    rows = []
    for c in claims:
        a, b = c.lhs.get("method"), c.rhs.get("method")
        pl, pr = pub.get((a, c.lhs.get("benchmark")), math.nan), pub.get((b, c.rhs.get("benchmark")), math.nan)
        empty = pd.DataFrame(columns=["seed", "id", "correct"])
        if not c.testable or a not in labels or b not in labels:
            row = compare(empty, empty, c.text, relation=c.relation, published=(pl, pr), source=c.source)
            row["inert"] = c.reason if not c.testable else f"no result of ours for {a if a not in labels else b}"
            rows.append(row)
            continue
        ia, ib = _claim_items(df, a, split, tasks), _claim_items(df, b, split, tasks)
        paired = ia is not None and ib is not None and len(ia) and len(ib)
        if not paired:
            ia, ib = _count_items(df, a, split, tasks), _count_items(df, b, split, tasks)
        why = inert.get(a) or inert.get(b) or None
        rows.append(compare(ia, ib, c.text, relation=c.relation, paired=bool(paired), published=(pl, pr),
                            source=c.source, inert=why and f"{a if inert.get(a) else b}: {why}"))
    return rows


def compare_published(df: pd.DataFrame, table: str = "optmerge_table2", split: str = "test",
                      tasks: Sequence[str] | None = None, inert: Mapping[str, str] | None = None,
                      family: str | None = None, preset: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Our Avg beside the paper's, and the verdict of each of its claims (:mod:`workbench.statistics`).

    Returns ``(cells, verdicts)``. ``cells``: method, published Avg, our mean and interval (our base
    row is matched to the paper's base row; tasks differ between the paper and the miniature world,
    so only ``Avg`` is joined). ``verdicts``: :func:`workbench.statistics.verdict_table` (Holm over
    ``family``, default the table's name) of the claims of :func:`paper_claims` plus "OptMerge has the
    best average among merging methods" (judged against the merging method with the best average of
    ours: beating the best one is necessary for beating all). Effects are paired on the test items
    (:func:`claim_rows`). The published ``"Indiv. (mean)"`` is the mean of the paper's Indiv. rows' Avg.
    ``tasks``: the benchmarks our Avg is over (default :func:`table_tasks`: MCUB-mini for Table 5).
    ``preset``: a small preset's verdicts carry the caution that they decide nothing.
    """
    from .published import Claim, load_table, side_by_side
    from ..statistics import verdict_table

    tasks = table_tasks(df, table) if tasks is None else list(tasks)
    pub = load_table(table, long=True)
    base_name = PUBLISHED_BASE.get(pub.attrs.get("name", table), BASE_LABEL)
    attrs = dict(pub.attrs)
    pub = pub.copy()
    pub["method"] = pub["method"].replace({base_name: BASE_LABEL})
    indiv = pub[(pub["method"].str.startswith("Indiv.")) & (pub["benchmark"] == "Avg")]
    if len(indiv):
        extra = pd.DataFrame([{"method": INDIV_MEAN, "benchmark": "Avg", "score": float(indiv["score"].mean())}])
        pub = pd.concat([pub, extra], ignore_index=True)
    pub.attrs = attrs
    ours = summary_long(df, split, tasks=tasks)
    ours_avg = ours[ours["benchmark"] == "Avg"][["method", "benchmark", "mean", "ci_low", "ci_high"]]
    cells = side_by_side(pub[pub["benchmark"] == "Avg"], ours_avg)
    claims = list(paper_claims(attrs.get("name", table)))
    avg = ours_avg.set_index("method")["mean"]
    others = [m for m in MERGE_LABELS if m != "OptMerge" and m in avg.index and pd.notna(avg[m])]
    if others:
        best = max(others, key=lambda m: avg[m])
        pavg = pub[pub["benchmark"] == "Avg"].set_index("method")["score"]
        pub_best = max((m for m in MERGE_LABELS if m != "OptMerge" and m in pavg.index), key=lambda m: pavg[m],
                       default=None)
        best_claim = Claim(f"OptMerge has the best average among merging methods (vs ours' best other: {best})",
                           {"method": "OptMerge", "benchmark": "Avg"}, {"method": best, "benchmark": "Avg"}, ">",
                           source=attrs.get("name", table))
        rows_best = claim_rows(df, [best_claim], pub, split, tasks, inert)
        if pub_best is not None:  # the paper's side: OptMerge vs the paper's best other merging method
            rows_best[0].update(published_rhs=float(pavg[pub_best]),
                                published_effect=float(pavg.get("OptMerge", math.nan)) - float(pavg[pub_best]))
    else:
        rows_best = []
    rows = rows_best + claim_rows(df, claims, pub, split, tasks, inert)
    return cells, verdict_table(rows, family or attrs.get("name", table), preset=preset)


def _write_csv(frame: pd.DataFrame, path: Path, index: bool = False) -> None:
    """``frame`` to ``path`` through a temporary name (never a half-written table)."""
    atomic_write(path, lambda p: frame.to_csv(p, index=index))


def write_tables(df: pd.DataFrame, name: str, out: str | Path, table: str | None = None,
                 verdicts: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write ``<name>_summary.csv`` (the wide table, formatted; Avg over :func:`table_tasks`) and, with
    ``table``, ``<name>_vs_published.csv`` and ``<name>_verdicts.csv`` into ``out``. ``verdicts``: the
    verdict table to write (e.g. Holm over a notebook's whole family) instead of ``compare_published``'s."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / f"{name}_summary.csv"}
    _write_csv(merge_table(df, fmt=True, tasks=table_tasks(df, table) if table else None), paths["summary"], index=True)
    if table is not None:
        cells, own = compare_published(df, table)
        paths["cells"] = out / f"{name}_vs_published.csv"
        paths["verdicts"] = out / f"{name}_verdicts.csv"
        _write_csv(cells, paths["cells"])
        _write_csv(own if verdicts is None else verdicts, paths["verdicts"])
    return paths


__all__ = ["claim_rows", "compare_published", "item_predictions", "merge_table", "paired_tests", "paper_claims",
           "summary_long", "table_tasks", "write_tables"]
