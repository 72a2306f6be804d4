"""The statistics of every verdict: intervals, paired effects, tests, multiplicity, power, inertness.

One module, one rule (:data:`VERDICT_RULE`, printed under every verdict table of notebooks 02-07).

- **Per-group accuracy** (:func:`accuracy_intervals`): mean over seeds with a Student-t interval, and the
  Wilson interval of the pooled counts (:func:`wilson_interval`, :func:`t_interval`).
- **Effects** (:func:`compare`): a claim "A > B" (or "<") is judged on the *difference* A - B in
  points. Paired (both sides scored on the same items of the same seeds): the per-seed mean paired
  difference, its interval from a hierarchical bootstrap (:func:`hierarchical_bootstrap`: seeds,
  then items within seed, >= 2,000 resamples, seeded), and the exact McNemar test (pooled over
  seeds, and per seed). Unpaired (different item sets, e.g. MCUB-3 vs MCUB-2): the same bootstrap
  on each side independently and Welch's t-test on the items - labelled ``unpaired``. Against a
  stated level ("retains >= 99%"): :func:`compare_level`, a one-sample t-test over the units.
- **Multiplicity** (:func:`holm`): Holm-Bonferroni over a notebook's family of claims; the verdict
  uses the adjusted p (Holm 1979, "A simple sequentially rejective multiple test procedure").
- **Power**: for an inconclusive claim, the sample that would decide it at 80% power, at the family's
  Bonferroni level, for the *published* effect (ours where the paper gives none): the items
  (:func:`items_for_power`, at the seeds run) and the training seeds (:func:`seeds_for_power`, at the items
  per seed run, from the spread of the per-seed effects) - more items cannot settle seeds that disagree.
- **Inertness**: identical predictions (no discordant item), an optimiser that did not move its
  objective (:func:`optimiser_inert`), a parameter whose values change nothing
  (:func:`sweep_inert`) - the claim is then *not testable here*, with the reason.
- **Presupposition** (:func:`presupposing`): a claim that speaks of an effect another claim of its
  family establishes ("DAMC's gain grows with modalities" speaks of DAMC's gain) names that claim in
  a ``requires`` entry and takes the weaker of the two verdicts.

The paired bootstrap and McNemar follow the standard analysis of paired classifier comparisons
(Dietterich 1998; McNemar 1947); resampling seeds first keeps the training-seed variance in the
interval (the seeds are the experimental units, the items are nested in them).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05

# presets whose samples are too small for any verdict: the note every table and figure of theirs carries
SMALL_PRESETS = {"tiny": "tiny preset: a smoke-test zoo, ~20 items per benchmark - these numbers decide nothing"}


def small_preset_note(preset: str | None) -> str:
    """What a result of ``preset`` can decide, said plainly (``""`` for a full-size preset)."""
    return SMALL_PRESETS.get(preset or "", "")
#: Bootstrap resamples and the seed of their generator (every interval is reproducible).
N_BOOT = 2000
BOOT_SEED = 0
POWER = 0.80
#: An iterative solver must reach at least this share of the exact solve's objective reduction.
SOLVER_SHARE = 0.5

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
NOT_TESTABLE = "not testable here"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTABLE)

#: The one verdict rule of every notebook (printed under every verdict table).
VERDICT_RULE = (
    "Verdict rule (workbench.statistics; one rule for notebooks 02-07). Effect = ours(A) - ours(B) in points, "
    "95% interval from a hierarchical bootstrap (seeds, then items within seed; 2,000 resamples, seed 0). "
    "p: two-sided exact McNemar on the items pooled over seeds (paired: same items), Welch t on the items "
    "(unpaired: different item sets), one-sample t over units (a stated level); p_holm: Holm-Bonferroni over "
    "the family named in the table. "
    "NOT TESTABLE HERE: a side is missing, or the methods are inert (identical predictions; an optimiser that "
    "reduced its objective by < 50% of the exact solve's reduction; a parameter whose values give identical "
    "predictions). REPRODUCED: p_holm < 0.05, effect in the claimed direction and its interval excludes 0. "
    "NOT REPRODUCED: p_holm < 0.05 in the opposite direction (interval excludes 0), or the interval excludes "
    "the published effect ('smaller than published'). INCONCLUSIVE: neither; items_80 = items (pairs, pooled "
    "over seeds) and seeds_80 = training seeds (of the items per seed run; one-sample t on the per-seed effects, "
    "whose spread is measured) that would each resolve the published effect (ours where the paper gives none) "
    "with 80% power at the family's Bonferroni level. "
    "A claim that presupposes another of its family (a gain that grows presupposes the gain) takes the weaker "
    "verdict of the two: not testable, not reproduced, inconclusive, reproduced.")

#: From the weakest to the strongest verdict: a presupposing claim takes the weaker of its own and its requirement's.
_STRENGTH = (NOT_TESTABLE, NOT_REPRODUCED, INCONCLUSIVE, REPRODUCED)

ITEM_COLUMNS = ("seed", "id", "correct")
TABLE_COLUMNS = ["family", "claim", "relation", "comparison", "published_lhs", "published_rhs", "published_effect",
                 "ours_lhs", "ours_rhs", "effect", "ci_low", "ci_high", "n_seeds", "n_items", "b", "c", "p_per_seed",
                 "seed_sd", "p", "p_holm", "power_model", "discordance", "items_80", "seeds_80", "inert", "verdict",
                 "reason", "source"]


# ============================================================================================ intervals
def wilson_interval(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (as fractions in [0, 1])."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    z = stats.norm.ppf(0.5 + conf / 2)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def t_interval(values: Sequence[float], conf: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over seeds. One value -> (v, nan, nan)."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("t_interval of no values")
    m = float(v.mean())
    if v.size < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + conf / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return m, m - half, m + half


def accuracy_intervals(df: pd.DataFrame, by: Iterable[str] = ("method", "subset", "scoring"), conf: float = 0.95,
              value: str = "correct") -> pd.DataFrame:
    """Per group: the mean of ``value`` per seed (x100 for the 0/1 ``correct``), then the mean with a
    t-interval over seeds, plus (for ``correct``) the Wilson interval of the pooled counts. Columns:
    *by, n_seeds, n_items, acc, t_low, t_high, wilson_low, wilson_high (percent)."""
    by = list(by)
    scale = 100.0 if value == "correct" else 1.0
    rows = []
    for key, g in df.groupby(by, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        seeds = g["seed"] if "seed" in g.columns else pd.Series(0, index=g.index)
        per_seed = g[value].astype(float).groupby(seeds, dropna=False).mean() * scale
        m, lo, hi = t_interval(per_seed.tolist(), conf)
        wl = wh = math.nan
        if value == "correct":
            wl, wh = (100 * x for x in wilson_interval(int(g["correct"].sum()), len(g), conf))
        rows.append(dict(zip(by, key), n_seeds=len(per_seed), n_items=len(g), acc=m, t_low=lo, t_high=hi,
                         wilson_low=wl, wilson_high=wh))
    return pd.DataFrame(rows)


def hierarchical_bootstrap(units: Sequence[Sequence[np.ndarray]], n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                           conf: float = 0.95) -> tuple[float, float, float, np.ndarray]:
    """Percentile bootstrap of ``mean over units (mean over strata (mean over items))``.

    ``units[u][s]`` are the item values of unit ``u`` (a training seed) in stratum ``s`` (a task;
    one stratum when there is none). Each resample draws the units with replacement, then the items
    within each unit and stratum with replacement. Items are resampled exactly through the
    multinomial counts of their distinct values (vectorised; the same distribution as drawing
    indices). Returns ``(estimate, low, high, resampled statistics)``; deterministic for a ``seed``.
    """
    if n_boot < 1 or not units or any(len(u) == 0 for u in units):
        raise ValueError("hierarchical_bootstrap needs >= 1 resample and >= 1 stratum in every unit")
    rng = np.random.default_rng(seed)
    per_unit = np.empty((len(units), n_boot))
    est = []
    for u, strata in enumerate(units):
        acc, point = np.zeros(n_boot), 0.0
        for x in strata:
            x = np.asarray(x, dtype=float)
            if x.size == 0:
                raise ValueError(f"hierarchical_bootstrap: unit {u} has an empty stratum")
            vals, counts = np.unique(x, return_counts=True)
            acc += rng.multinomial(x.size, counts / x.size, size=n_boot) @ vals / x.size
            point += float(x.mean())
        per_unit[u] = acc / len(strata)
        est.append(point / len(strata))
    pick = rng.integers(0, len(units), size=(n_boot, len(units)))
    boot = per_unit[pick, np.arange(n_boot)[:, None]].mean(axis=1)
    lo, hi = np.quantile(boot, [(1 - conf) / 2, (1 + conf) / 2])
    return float(np.mean(est)), float(lo), float(hi), boot


# ============================================================================================ tests
def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test on paired outcomes of the same items.

    ``b`` = items A got right and B wrong, ``c`` = the reverse; p-value of a two-sided binomial
    test of ``b`` successes in ``b + c`` trials with p = 0.5 (1.0 when b + c = 0). Binomial(n, 1/2)
    is symmetric, so the two-sided p (``scipy.stats.binomtest``'s) is twice the smaller tail, capped at 1.
    """
    a = np.asarray(correct_a, dtype=bool)
    bb = np.asarray(correct_b, dtype=bool)
    if a.shape != bb.shape:
        raise ValueError(f"paired outcomes differ in length: {a.shape} vs {bb.shape}")
    b = int((a & ~bb).sum())
    c = int((~a & bb).sum())
    p = 1.0 if b + c == 0 else min(1.0, 2.0 * float(stats.binom.cdf(min(b, c), b + c, 0.5)))
    return {"b": b, "c": c, "n": int(a.size), "pvalue": p}


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count in the family).

    Sorted ascending, p_(i) -> max_{j <= i} min(1, (m - j + 1) p_(j)) (Holm 1979)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out


def items_for_power(effect: float, *, discordance: float | None = None, p_a: float | None = None,
                    p_b: float | None = None, alpha: float = ALPHA, power: float = POWER) -> float:
    """Items needed to detect ``effect`` (points) with a two-sided test at ``alpha`` and ``power``.

    Paired (``discordance`` = observed share of discordant pairs ψ = (b + c) / n), McNemar's sample
    size (Connor 1987): ``n = (z_{1-α/2} sqrt(ψ) + z_{power} sqrt(ψ - δ²))² / δ²`` with δ = effect/100
    and ψ raised to |δ| if smaller (a difference needs at least that many discordant pairs).
    Unpaired (``p_a``, ``p_b``: the two accuracies in points), items per side:
    ``n = (z_{1-α/2} + z_{power})² (p_a q_a + p_b q_b) / δ²``. NaN without an effect."""
    if effect is None or not np.isfinite(effect) or effect == 0:
        return math.nan
    d = abs(effect) / 100.0
    za, zb = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    if discordance is not None:
        psi = max(float(discordance), d)
        return float(math.ceil((za * math.sqrt(psi) + zb * math.sqrt(max(psi - d * d, 0.0))) ** 2 / d ** 2))
    if p_a is None or p_b is None:
        raise ValueError("items_for_power: give the discordance (paired) or both accuracies (unpaired)")
    qa, qb = p_a / 100.0, p_b / 100.0
    var = qa * (1 - qa) + qb * (1 - qb)
    return float(math.ceil((za + zb) ** 2 * max(var, 1e-12) / d ** 2))


#: :func:`seeds_for_power` stops here (an effect that needs more seeds than this is reported as inf).
MAX_SEEDS = 10_000


def seeds_for_power(effect: float, sd: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """Training seeds needed to detect ``effect`` (points) with a two-sided one-sample t-test at ``alpha``
    and ``power`` on per-seed effects whose standard deviation over seeds is ``sd`` (points): the smallest
    ``n >= 2`` with ``P(|T| > t_{1-α/2, n-1}) >= power``, ``T`` noncentral t with ``n - 1`` degrees of
    freedom and noncentrality ``effect sqrt(n) / sd`` (the exact power of the t-test). NaN without an
    effect or a spread; ``inf`` beyond :data:`MAX_SEEDS`."""
    if not all(np.isfinite([effect, sd])) or effect == 0 or sd <= 0:
        return math.nan
    d = abs(effect) / sd

    def reached(n: int) -> bool:
        t = stats.t.ppf(1 - alpha / 2, n - 1)
        nc = d * math.sqrt(n)
        # scipy's nct.cdf of the far tail is NaN for a large noncentrality (where it is ~0): count it as 0
        return float(np.nansum([stats.nct.sf(t, n - 1, nc), stats.nct.cdf(-t, n - 1, nc)])) >= power

    if not reached(MAX_SEEDS):
        return math.inf
    lo, hi = 1, 2                      # reached(hi) once hi is found; power grows with n
    while not reached(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reached(mid) else (mid, hi)
    return float(hi)


# ============================================================================================ inertness
def optimiser_inert(start: float, reached: float, exact: float, share: float = SOLVER_SHARE) -> bool:
    """True when an iterative solve reduced its objective from ``start`` by less than ``share`` of the
    reduction the exact solve reaches (``start - exact``)."""
    if not all(np.isfinite([start, reached, exact])):
        raise ValueError(f"optimiser_inert needs finite objectives, got {start}, {reached}, {exact}")
    full = start - exact
    return bool(full > 0 and (start - reached) < share * full)


def sweep_inert(predictions: Mapping[object, pd.DataFrame], on: Sequence[str] = ("seed", "id"),
                column: str = "pred") -> bool:
    """True when every value of a swept parameter gives identical predictions on the same items
    (``predictions[value]``: per-item frames with ``on`` and ``column``)."""
    frames = list(predictions.values())
    if len(frames) < 2:
        return False
    key = list(on)
    ref = frames[0].set_index(key)[column].sort_index()
    for f in frames[1:]:
        other = f.set_index(key)[column].sort_index()
        if not ref.index.equals(other.index) or not (ref.astype(str) == other.astype(str)).all():
            return False
    return True


# ============================================================================================ claims
def _units(items: pd.DataFrame, value: str) -> list[list[np.ndarray]]:
    strat = "stratum" if "stratum" in items.columns else None
    out = []
    for _, g in items.groupby("seed", sort=True):
        out.append([s[value].to_numpy(float) for _, s in g.groupby(strat, sort=True)] if strat else
                   [g[value].to_numpy(float)])
    return out


def _value(items: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("seed",) if c not in items.columns]
    if missing or not ({"value", "correct"} & set(items.columns)):
        raise ValueError(f"item frame needs 'seed' and 'correct' (or 'value') columns, has {list(items.columns)}")
    if "value" in items.columns:
        return items
    return items.assign(value=100.0 * items["correct"].astype(str).str.lower().isin(["true", "1", "1.0"]))


def paired_items(a: pd.DataFrame, b: pd.DataFrame, on: Sequence[str] = ("seed", "id")) -> pd.DataFrame:
    """A and B joined on the shared items (``on``, plus ``stratum`` when both have it), with
    ``value`` = A's value - B's value (points; 0/1 correctness x 100)."""
    on = list(on) + (["stratum"] if "stratum" in a.columns and "stratum" in b.columns else [])
    j = _value(a).merge(_value(b), on=on, suffixes=("_a", "_b"))
    return j.assign(value=j["value_a"] - j["value_b"])


def _boot(items, n_boot, seed):
    return hierarchical_bootstrap(_units(items, "value"), n_boot, seed)


def _per_seed(items: pd.DataFrame, value: str = "value") -> pd.Series:
    """Per seed: the mean over strata of the items' ``value`` (indexed by seed, sorted)."""
    seeds = sorted(items["seed"].unique())
    return pd.Series([np.mean([x.mean() for x in u]) for u in _units(items, value)], index=seeds, dtype=float)


def _estimate(items: pd.DataFrame, value: str = "value") -> float:
    """Mean over seeds of the mean over strata of the items' ``value`` (the bootstrap's statistic)."""
    return float(_per_seed(items, value).mean())


def _spread(per_seed_effects: pd.Series | np.ndarray) -> float:
    """Standard deviation over seeds (ddof 1) of per-seed effects; NaN with fewer than two."""
    x = np.asarray(per_seed_effects, dtype=float)
    return float(x.std(ddof=1)) if x.size >= 2 else math.nan


def compare(a: pd.DataFrame, b: pd.DataFrame, claim: str, *, relation: str = ">", paired: bool = True,
            published: tuple[float, float] = (math.nan, math.nan), source: str = "", inert: str | None = None,
            n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """One claim ``A relation B`` on per-item frames ``a``, ``b`` (columns ``seed``, ``id``,
    ``correct`` or a numeric ``value``; optional ``stratum``, e.g. the task, averaged with equal weight
    per stratum). Returns a row of :data:`TABLE_COLUMNS` without the Holm / verdict columns (see
    :func:`verdict_table`). ``paired``: join on the items (exact McNemar for 0/1 outcomes); else the
    unpaired comparison (Welch t on the items). ``published``: the paper's (A, B) numbers, in points.
    ``inert``: a reason the comparison is not testable, found by the caller (e.g.
    :func:`optimiser_inert`); identical predictions are detected here."""
    if relation not in (">", "<"):
        raise ValueError(f"claim {claim!r}: relation must be '>' or '<', got {relation!r}")
    row = {c: math.nan for c in TABLE_COLUMNS}
    pub_l, pub_r = (float(x) if x is not None else math.nan for x in published)
    row.update(claim=claim, source=source, published_lhs=pub_l, published_rhs=pub_r, published_effect=pub_l - pub_r,
               relation=relation, p_per_seed="", inert=inert or "", comparison="paired" if paired else "unpaired",
               power_model="")
    if len(a) == 0 or len(b) == 0:
        row["inert"] = f"no result of ours for {'A' if len(a) == 0 else 'B'}"
        return row
    a, b = _value(a), _value(b)
    if paired:
        j = paired_items(a, b)
        if len(j) == 0:
            raise ValueError(f"claim {claim!r}: no shared items between the two sides (use paired=False)")
        est, lo, hi, _ = _boot(j, n_boot, seed)
        row.update(ours_lhs=_estimate(j, "value_a"), ours_rhs=_estimate(j, "value_b"), n_items=len(j),
                   n_seeds=j["seed"].nunique(), seed_sd=_spread(_per_seed(j)))
        binary = set(np.unique(j[["value_a", "value_b"]].to_numpy())) <= {0.0, 100.0}
        if binary:
            t = mcnemar_exact(j["value_a"] > 0, j["value_b"] > 0)
            row.update(b=t["b"], c=t["c"], p=t["pvalue"])
            row["p_per_seed"] = ", ".join(f"{mcnemar_exact(g['value_a'] > 0, g['value_b'] > 0)['pvalue']:.2g}"
                                          for _, g in j.groupby("seed", sort=True))
            same = ("pred_a" in j.columns and (j["pred_a"].astype(str) == j["pred_b"].astype(str)).all())
            if t["b"] + t["c"] == 0 and not row["inert"]:
                row["inert"] = ("identical predictions" if same else "no discordant item") + f" on {len(j)} items"
            row.update(power_model="paired", discordance=(t["b"] + t["c"]) / len(j))
        else:
            d = j["value"].to_numpy(float)
            row["p"] = float(stats.ttest_1samp(d, 0.0).pvalue) if d.std() > 0 else (1.0 if d.mean() == 0 else 0.0)
            if not (d != 0).any() and not row["inert"]:
                row["inert"] = f"identical values on {len(j)} items"
        row.update(effect=est, ci_low=lo, ci_high=hi)
    else:
        ea, la, ha, ba = _boot(a, n_boot, seed)
        eb, lb, hb, bb = _boot(b, n_boot, seed + 1)
        diff = ba - bb
        lo, hi = np.quantile(diff, [0.025, 0.975])
        xa, xb = a["value"].to_numpy(float), b["value"].to_numpy(float)
        p = float(stats.ttest_ind(xa, xb, equal_var=False).pvalue) if (xa.std() + xb.std()) > 0 else \
            (1.0 if xa.mean() == xb.mean() else 0.0)
        row.update(ours_lhs=ea, ours_rhs=eb, effect=ea - eb, ci_low=float(lo), ci_high=float(hi), p=p,
                   n_items=len(a) + len(b), n_seeds=min(a["seed"].nunique(), b["seed"].nunique()),
                   comparison="unpaired (different items)",
                   seed_sd=_spread((_per_seed(a) - _per_seed(b)).dropna()))  # seeds run on both sides
        binary = set(np.unique(np.r_[xa, xb])) <= {0.0, 100.0}
        row["power_model"] = "unpaired" if binary else ""
    return row


def compare_level(values: pd.DataFrame, level: float, claim: str, *, relation: str = ">", value: str = "value",
                  source: str = "") -> dict:
    """A claim "ours ``relation`` ``level``" over units (``values[value]``, one row per seed or expert):
    one-sample t-test (two-sided) and Student-t interval of the mean minus the level."""
    row = {c: math.nan for c in TABLE_COLUMNS}
    row.update(claim=claim, source=source, relation=relation, p_per_seed="", inert="", power_model="",
               comparison=f"level {level:g} (one-sample t over units)", published_lhs=math.nan,
               published_rhs=float(level))
    x = values[value].astype(float).dropna().to_numpy()
    if x.size == 0:
        row["inert"] = "no result of ours"
        return row
    m, lo, hi = t_interval(x - level)
    p = float(stats.ttest_1samp(x, level).pvalue) if x.size >= 2 and x.std() > 0 else math.nan
    row.update(ours_lhs=float(x.mean()), ours_rhs=float(level), effect=m, ci_low=lo, ci_high=hi, p=p,
               n_items=int(x.size), n_seeds=int(x.size), seed_sd=_spread(x))
    return row


def verdict(effect: float, ci_low: float, ci_high: float, p_holm: float, relation: str = ">",
            published_effect: float = math.nan, inert: str = "", alpha: float = ALPHA) -> tuple[str, str]:
    """The rule of :data:`VERDICT_RULE` for one claim: ``(verdict, reason)``. ``effect`` and its
    interval are A - B (points); ``relation`` the claimed sign; ``published_effect`` the paper's A - B."""
    if inert:
        return NOT_TESTABLE, inert
    sign = 1.0 if relation == ">" else -1.0
    e, lo, hi = sign * effect, *sorted((sign * ci_low, sign * ci_high))
    pub = sign * published_effect
    if any(map(lambda v: v is None or not np.isfinite(v), (e, lo, hi, p_holm))):
        return INCONCLUSIVE, "no test (a single unit, or no interval)"
    if p_holm < alpha and e > 0 and lo > 0:
        extra = f"; smaller than published ({sign * pub:+.1f})" if np.isfinite(pub) and hi < pub else ""
        return REPRODUCED, f"p_holm {p_holm:.2g}, effect in the claimed direction{extra}"
    if p_holm < alpha and e < 0 and hi < 0:
        return NOT_REPRODUCED, f"p_holm {p_holm:.2g}, significant in the opposite direction"
    if np.isfinite(pub) and pub > 0 and hi < pub:
        return NOT_REPRODUCED, f"smaller than published: interval excludes the published {sign * pub:+.1f}"
    if p_holm < alpha:
        return INCONCLUSIVE, f"p_holm {p_holm:.2g} but the bootstrap interval contains 0 (seeds disagree)"
    return INCONCLUSIVE, f"p_holm {p_holm:.2g}"


def presupposing(own: tuple[str, str], required: tuple[str, str], requires: str) -> tuple[str, str]:
    """``(verdict, reason)`` of a claim whose own test gave ``own`` and which presupposes the claim
    ``requires`` (verdict ``required``): the weaker of the two (:data:`_STRENGTH`), the reason naming both.
    E.g. "DAMC's gain on MCUB-3 exceeds its gain on MCUB-2" is reproduced only where DAMC > NaiveMC on
    MCUB-3 is: a loss that shrinks is not a gain that grows."""
    (v_own, why_own), (v_req, why_req) = own, required
    if _STRENGTH.index(v_req) < _STRENGTH.index(v_own):
        return v_req, f"{v_own} on its own ({why_own}), but it presupposes '{requires}': {v_req} ({why_req})"
    return v_own, f"{why_own}; presupposes '{requires}': {v_req}"


def verdict_table(rows: Sequence[Mapping] | pd.DataFrame, family: str, alpha: float = ALPHA, *,
                  preset: str | None = None) -> pd.DataFrame:
    """Holm over the ``family`` of claim rows (:func:`compare` / :func:`compare_level`), then the
    verdict of each; :data:`TABLE_COLUMNS`. Inert claims are not tested and do not count in the family.
    A row with a ``requires`` entry (the name of another claim of the family) gets the weaker verdict
    of the two (:func:`presupposing`); one inconclusive through its requirement takes the requirement's
    ``items_80`` and ``seeds_80``, one inconclusive on its own too the larger of its and the requirement's.
    ``items_80`` and ``seeds_80`` are kept for inconclusive claims only (the items, the training seeds, each
    at the family's Bonferroni level, for the published effect or ours where the paper gives none). For a
    small ``preset`` (:data:`SMALL_PRESETS`) a ``caution`` column says on every row that its items decide
    nothing."""
    df = pd.DataFrame(list(rows) if not isinstance(rows, pd.DataFrame) else rows).copy()
    if len(df) == 0:
        return _with_caution(pd.DataFrame(columns=TABLE_COLUMNS), preset)
    df = df.reindex(columns=list(dict.fromkeys([*df.columns, *TABLE_COLUMNS])))
    text = {"inert": "", "relation": ">", "p_per_seed": "", "source": "", "comparison": "", "power_model": ""}
    df = df.fillna({c: v for c, v in text.items()}).astype({c: str for c in text})
    tested = df["inert"] == ""
    df["p_holm"] = holm(np.where(tested, df["p"].astype(float), np.nan))
    m = int((tested & df["p"].notna()).sum())
    records = df.to_dict("records")
    out = [verdict(r["effect"], r["ci_low"], r["ci_high"], r["p_holm"], r["relation"], r["published_effect"],
                   r["inert"], alpha) for r in records]
    items_80 = [_items_80(r, alpha / max(m, 1)) for r in records]
    seeds_80 = [seeds_for_power(_power_effect(r), r["seed_sd"], alpha=alpha / max(m, 1)) for r in records]
    requires = [r.get("requires") if isinstance(r.get("requires"), str) else "" for r in records]
    index = {r["claim"]: i for i, r in enumerate(records)}
    for i, req in enumerate(requires):
        if not req:
            continue
        if req not in index:
            raise ValueError(f"claim {records[i]['claim']!r} requires {req!r}, which is not a claim of family "
                             f"{family!r}")
        j = index[req]
        if requires[j]:
            raise ValueError(f"claim {records[i]['claim']!r} requires {req!r}, which itself requires another claim")
        own = out[i][0]
        out[i] = presupposing(out[i], out[j], req)
        if own != INCONCLUSIVE:            # inconclusive through its requirement: deciding that decides it
            items_80[i], seeds_80[i] = items_80[j], seeds_80[j]
        elif out[j][0] == INCONCLUSIVE:    # both open: the larger sample decides both
            items_80[i], seeds_80[i] = (np.fmax(x[i], x[j]) for x in (items_80, seeds_80))
    df["verdict"], df["reason"] = [v for v, _ in out], [why for _, why in out]
    df["family"] = f"{family} ({m} tested claims)"
    df["items_80"] = [n if v == INCONCLUSIVE else math.nan for n, (v, _) in zip(items_80, out)]
    df["seeds_80"] = [n if v == INCONCLUSIVE else math.nan for n, (v, _) in zip(seeds_80, out)]
    return _with_caution(df[TABLE_COLUMNS].reset_index(drop=True), preset)


def _with_caution(table: pd.DataFrame, preset: str | None) -> pd.DataFrame:
    note = small_preset_note(preset)
    if note:
        table.insert(table.columns.get_loc("verdict") + 1, "caution", note)
    return table


def _power_effect(r: Mapping) -> float:
    """The effect a claim's sample sizes are computed for: the published one, ours where the paper gives none."""
    pub = r["published_effect"]
    return float(pub) if pub is not None and np.isfinite(pub) else float(r["effect"])


def _items_80(r: Mapping, alpha: float) -> float:
    if r["power_model"] == "paired":
        return items_for_power(_power_effect(r), discordance=r["discordance"], alpha=alpha)
    if r["power_model"] == "unpaired":
        return items_for_power(_power_effect(r), p_a=r["ours_lhs"], p_b=r["ours_rhs"], alpha=alpha)
    return math.nan


def _count(x: float) -> str:
    return "" if np.isnan(x) else f"> {MAX_SEEDS:,}" if np.isinf(x) else f"{x:,.0f}"


def verdict_view(table: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """The reading view of :func:`verdict_table`: claim, published effect, ours (effect [interval]),
    p, p_holm, verdict, reason, items_80, seeds_80."""
    def f(x, d=digits):
        return "-" if x is None or not np.isfinite(x) else f"{x:+.{d}f}"

    ours = [("-" if not np.isfinite(r["effect"]) else
             f"{r['effect']:+.{digits}f} [{r['ci_low']:+.{digits}f}, {r['ci_high']:+.{digits}f}]")
            for _, r in table.iterrows()]
    return pd.DataFrame({"claim": table["claim"], "comparison": table["comparison"],
                         "published": [f(x) for x in table["published_effect"]], "ours": ours,
                         "p": table["p"].map(lambda x: f"{x:.2g}" if np.isfinite(x) else "-"),
                         "p_holm": table["p_holm"].map(lambda x: f"{x:.2g}" if np.isfinite(x) else "-"),
                         "verdict": table["verdict"], "reason": table["reason"],
                         "items_80": table["items_80"].map(_count),
                         "seeds_80": table["seeds_80"].map(_count),
                         **({"caution": table["caution"]} if "caution" in table else {})})


def verdict_counts(*tables: pd.DataFrame) -> dict[str, int]:
    """``{verdict: count}`` over verdict tables (every verdict listed, zeros included)."""
    out = {v: 0 for v in VERDICTS}
    for t in tables:
        for v in (t["verdict"] if len(t) else []):
            out[v] = out.get(v, 0) + 1
    return out


def claims_sentence(table: pd.DataFrame, claims: Sequence[str] | None = None, digits: int = 1) -> str:
    """A sentence built from a verdict table (or the rows of ``claims``): ``"<claim>: <verdict>
    (<effect> [low, high], p_holm p)"`` joined by ``"; "`` - for a README that states only what a table shows."""
    t = table if claims is None else table[table["claim"].isin(list(claims))]
    parts = []
    for _, r in t.iterrows():
        eff = ("" if not np.isfinite(r["effect"]) else
               f" ({r['effect']:+.{digits}f} [{r['ci_low']:+.{digits}f}, {r['ci_high']:+.{digits}f}]"
               + (f", p_holm {r['p_holm']:.2g})" if np.isfinite(r["p_holm"]) else ")"))
        parts.append(f"{r['claim']}: {r['verdict']}{eff}")
    return "; ".join(parts) + ("." if parts else "")


__all__ = ["ALPHA", "BOOT_SEED", "INCONCLUSIVE", "ITEM_COLUMNS", "NOT_REPRODUCED", "NOT_TESTABLE", "N_BOOT", "POWER",
           "REPRODUCED", "SOLVER_SHARE", "TABLE_COLUMNS", "VERDICTS", "VERDICT_RULE", "accuracy_intervals",
           "claims_sentence", "compare", "compare_level", "hierarchical_bootstrap", "holm", "items_for_power",
           "mcnemar_exact", "optimiser_inert", "paired_items", "presupposing", "sweep_inert", "t_interval", "verdict",
           "verdict_counts", "verdict_table", "verdict_view", "wilson_interval"]
