"""Pictures of the analysis: the one style module of the workbench, rendered headless and saved as PNG + SVG.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (no global
figure state, no display needed). Importing this module inside IPython registers a PNG formatter
for ``Figure`` (:func:`register_inline`), so a figure left as a cell's value or passed to
``display`` is drawn inline - in JupyterLab and in papermill's executed copies alike - without
``%matplotlib`` or pyplot. Data in, figure out: the data functions (``layer_module_table``,
``pair_matrix_data``...) are pure and tested on their own.

Words, not column names: :data:`LABELS` maps the raw names (``n_mod``, ``lambda_1``, ``lam``) to
axis labels with units, and :func:`metric_info` gives each metric a readable ``label`` and its
``doc`` (shown as the figure's subtitle). ``save_figure(fig, name, preset=...)`` writes
``figures/<preset>/<name>.png`` and ``.svg`` atomically (temp name, then rename) with fixed
metadata, after stamping a caption that names the preset and its zoo (:func:`caption`).
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .errors import ConfigError
from .statistics import small_preset_note

__all__ = [
    "LABELS",
    "STYLE_RC",
    "caption",
    "expert_bars",
    "fig_to_png",
    "heatmap",
    "layer_module_table",
    "metric_heatmap",
    "metric_info",
    "pair_matrix_data",
    "pair_matrix_figure",
    "register_inline",
    "save_all_figures",
    "save_figure",
    "sweep_figure",
    "upset_figure",
]

#: rcParams every figure is drawn under (one look across the notebooks).
STYLE_RC: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "figure.dpi": 100,
    "savefig.bbox": "tight",
    "svg.fonttype": "none",
    "svg.hashsalt": "mllm-workbench",
}
DIVERGING = "vlag"       # signed metrics (cosine), centred at 0
SEQUENTIAL = "rocket_r"  # rates and shares in [0, 1]
MAGNITUDE = "mako_r"     # unbounded magnitudes (relative norms)
ACCENT = "#4C72B0"
MODULE_ORDER = ("embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "head", "vision", "projector", "other")
NO_LAYER = "-"           # row label of tensors outside the transformer layers (embed, head, final norm)
#: Resolution of inline and explorer PNGs (the saved files use :func:`save_figure`'s ``dpi``).
INLINE_DPI = 110
#: Axis labels, in words and with units, of the raw column names the tables use.
LABELS: dict[str, str] = {
    "lam": "mask threshold λ", "lambda": "scaling λ", "lambda_1": "DAMC λ₁ (weight of the modality parameters)",
    "n_mod": "modalities composed", "n_experts": "experts merged", "alpha": "MMER α",
    "layer": "layer", "module": "module type", "expert": "expert", "method": "merge method",
    "benchmark": "benchmark", "composition": "composition", "k_ratio": "rank ratio k",
}
#: Readable names of the interference and overlap metrics (their descriptions come from the registries).
METRIC_LABELS: dict[str, str] = {
    "cosine": "task-vector cosine", "conflict": "sign-conflict rate", "conflict_topk": "sign-conflict rate (top-k)",
    "rel_norm": "relative norm |τ| / |θ₀|", "topk_conflict": "top-k entries opposed",
    "elect_disagree": "top-k entries against the elected sign", "ties_survival": "entries TIES keeps",
    "ties_energy": "energy TIES keeps", "ties_share": "share of the TIES merge",
    "dare_kept": "entries DARE keeps", "dare_energy": "energy DARE keeps",
    "set_conflict": "entries with mixed signs", "set_elect_disagree": "entries against the elected sign",
    "ties_vs_ta": "|TIES merge| / |task arithmetic|", "damc_cosine": "DAMC text vs modality cosine",
    "damc_conflict": "DAMC text vs modality sign conflicts", "density": "mask density",
    "density_support": "mask density on the support", "iou": "mask IoU (Jaccard)",
    "overlap_min": "overlap / smaller mask", "share_none": "support used by no expert",
    "share_one": "support used by exactly one expert", "share_all": "support used by every expert",
}


def label(name: str) -> str:
    """The axis label of a column or metric name (the name itself when it has none)."""
    return LABELS.get(name) or METRIC_LABELS.get(name) or str(name)


# ----------------------------------------------------------------------------------- files
CAPTION_GID = "wb-caption"
#: What a caption adds for a preset whose benchmarks are too small to decide anything.


def caption(fig: Figure, preset: str, note: str = "") -> Figure:
    """Stamp (or replace) the grey caption under ``fig``: the preset, its zoo and ``note``.

    Drawn just below the axes, so ``bbox_inches="tight"`` takes it in and it never overlaps them.
    """
    from .paths import repo_relative

    try:
        from .world.presets import zoo_root

        zoo = repo_relative(zoo_root(preset))
    except Exception:  # noqa: BLE001 - a caption never stops a figure
        zoo = f"zoo/{preset}"
    parts = [f"preset {preset}, zoo {zoo}", small_preset_note(preset), note]
    for t in [t for t in fig.texts if t.get_gid() == CAPTION_GID]:
        t.remove()
    with matplotlib.rc_context(STYLE_RC):
        fig.text(0.0, 0.0, " · ".join(p for p in parts if p), gid=CAPTION_GID, ha="left", va="top",
                 fontsize=7, color="#666666")
    return fig


def save_figure(fig: Figure, name: str, dir: str | Path | None = None, *, preset: str | None = None,
                formats: Sequence[str] = ("png", "svg"), dpi: int = 150) -> list[Path]:
    """Write ``fig`` to ``<dir>/<name>.<fmt>`` for each format (default PNG and SVG); returns the paths.

    With ``preset`` the figure first gets its :func:`caption` (preset and zoo) and ``dir=None``
    is :func:`workbench.paths.figures_dir` of that preset (``figures/<preset>/``, or under
    ``WORKBENCH_FIGURES_DIR``), whatever the current directory. One of ``dir`` and ``preset``
    is required: an output always knows whose it is.

    Files are written under a temporary name and renamed, so a reader never sees a half file.
    Metadata that changes run to run (dates, software version) is dropped.
    """
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"figure name must be a plain file stem, got {name!r}")
    if dir is None and preset is None:
        raise ConfigError(f"save_figure({name!r}): give the preset (figures/<preset>/) or a dir")
    if preset is not None:
        caption(fig, preset)
    if dir is None:
        from .paths import figures_dir

        dir = figures_dir(preset)
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    meta = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}, "pdf": {"CreationDate": None}}
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        tmp = out / f".{name}.{fmt}.tmp-{os.getpid()}"
        try:
            with matplotlib.rc_context(STYLE_RC):
                fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta.get(fmt))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        paths.append(path)
    return paths


def fig_to_png(fig: Figure, dpi: int = INLINE_DPI) -> bytes:
    """PNG bytes of ``fig`` (inline display, ``ipywidgets.Image``)."""
    buf = io.BytesIO()
    with matplotlib.rc_context(STYLE_RC):
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def register_inline(shell: Any = None) -> bool:
    """Make IPython draw every :class:`Figure` as a PNG (cell value or ``display(fig)``).

    Without pyplot no backend registers a formatter, and a figure prints as
    ``<Figure size 770x224 with 2 Axes>``; this registers :func:`fig_to_png` for ``image/png``.
    ``shell`` defaults to the running IPython; returns ``False`` outside IPython. Called on import.
    """
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
    if shell is None:
        return False
    shell.display_formatter.formatters["image/png"].for_type(Figure, fig_to_png)
    return True


def _styled(fn):
    """Run a figure-building function entirely under :data:`STYLE_RC`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE_RC):
            return fn(*args, **kwargs)
    return wrapper


def _figure(w: float, h: float) -> Figure:
    with matplotlib.rc_context(STYLE_RC):
        return Figure(figsize=(w, h), layout="constrained")


# ----------------------------------------------------------------------------------- metric lookup
def metric_info(metric: str) -> dict[str, Any]:
    """Frame, description, colour map and colour range of an interference or overlap metric."""
    from .analysis.interference import METRICS
    from .analysis.overlap import OVERLAP_METRICS

    if metric in METRICS:
        spec = METRICS[metric]
        frame, doc, bounds = spec.frame, spec.doc, spec.bounds
    elif metric in OVERLAP_METRICS:
        spec2 = OVERLAP_METRICS[metric]
        frame, doc, bounds = spec2.frame, spec2.doc, (0.0, 1.0)
    else:
        raise ConfigError(f"unknown metric {metric!r}")
    if bounds is not None and bounds[0] < 0:
        cmap, center = DIVERGING, 0.0
    elif bounds is not None:
        cmap, center = SEQUENTIAL, None
    else:
        cmap, center = MAGNITUDE, None
    entity = {"pairs": "pair", "per_expert": "expert", "density": "expert", "damc": "expert"}.get(frame, "set")
    return {"frame": frame, "doc": doc, "label": label(metric), "bounds": bounds, "cmap": cmap, "center": center,
            "entity": entity}


def _title(info: dict[str, Any], who: str) -> str:
    """Two-line title: the metric's name and for whom, then its description from the registry."""
    return f"{info['label']} - {who}\n{_wrap(info['doc'])}"


def _wrap(text: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) if text else ""


def _fit_title(title: str, width_in: float) -> str:
    """``title`` re-wrapped line by line to what fits ``width_in`` inches at the title font size,
    so a small figure's title never runs over its colour bar."""
    chars = max(24, int(width_in * 11))
    return "\n".join(_wrap(line, chars) or line for line in title.split("\n"))


def _filter(df: pd.DataFrame, *, pair: tuple[str, str] | None = None, expert: str | None = None) -> pd.DataFrame:
    if pair is not None and "expert_a" in df.columns:
        a, b = pair
        sel = ((df.expert_a == a) & (df.expert_b == b)) | ((df.expert_a == b) & (df.expert_b == a))
        if not sel.any():
            raise ConfigError(f"no pair {pair!r}; pairs are {sorted(set(zip(df.expert_a, df.expert_b)))}")
        df = df[sel]
    if expert is not None and "expert" in df.columns:
        if not (df.expert == expert).any():
            raise ConfigError(f"no expert {expert!r}; experts are {sorted(set(df.expert))}")
        df = df[df.expert == expert]
    return df


def _layer_label(v: Any) -> str:
    return NO_LAYER if v is None or pd.isna(v) else str(int(v))


def layer_module_table(obj: Any, metric: str, *, pair: tuple[str, str] | None = None, expert: str | None = None,
                       exact: bool = True) -> pd.DataFrame:
    """Layers x module types table of ``metric`` (pure data behind :func:`metric_heatmap`).

    ``obj`` is an :class:`~workbench.analysis.InterferenceProfile` or a
    :class:`~workbench.analysis.MaskOverlap`. For a pair metric give ``pair`` (else the mean
    over pairs of each group's exact value); for a per-expert metric give ``expert`` (else the
    mean over experts). Rows: ``"-"`` (tensors outside the layers) then layers in order;
    columns: module types in :data:`MODULE_ORDER`.
    """
    s = obj.summary(metric, by=("layer", "module"), exact=exact)
    s = _filter(s, pair=pair, expert=expert)
    if not len(s):
        return pd.DataFrame()
    g = s.groupby(["layer", "module"], dropna=False)[metric].mean().reset_index()
    g["row"] = g["layer"].map(_layer_label)
    t = g.pivot(index="row", columns="module", values=metric)
    cols = [m for m in MODULE_ORDER if m in t.columns] + sorted(c for c in t.columns if c not in MODULE_ORDER)
    layers = sorted({int(v) for v in g["layer"] if not pd.isna(v)})
    rows = ([NO_LAYER] if NO_LAYER in t.index else []) + [str(l) for l in layers]
    t = t.reindex(index=rows, columns=cols)
    t.index.name, t.columns.name = "layer", "module"
    return t


def _over_tensors(obj: Any, metric: str, info: dict[str, Any], *, layer: int | None, module: str | None,
                  exact: bool) -> pd.DataFrame:
    """``metric`` (``info`` = :func:`metric_info`) summarized over all tensors of ``obj``'s frame, or over
    one layer and/or module type: one row per pair or expert."""
    df = obj.frame(metric) if hasattr(obj, "frame") else getattr(obj, info["frame"])
    if layer is not None:
        df = df[df["layer"] == layer]
    if module is not None:
        df = df[df["module"] == module]
    from .analysis.interference import METRICS, metric_by_group
    from .analysis.overlap import _summarize

    return metric_by_group(df, metric, (), exact=exact) if metric in METRICS else _summarize(df, metric, (), exact)


def pair_matrix_data(obj: Any, metric: str, *, layer: int | None = None, module: str | None = None,
                     exact: bool = True) -> pd.DataFrame:
    """Symmetric experts x experts matrix of a pair metric over all tensors (or one layer and/or module).

    The diagonal is the metric of an expert with itself (1 for cosine and IoU, 0 for conflict rates).
    """
    info = metric_info(metric)
    if info["entity"] != "pair":
        raise ConfigError(f"{metric!r} is not a pair metric")
    s = _over_tensors(obj, metric, info, layer=layer, module=module, exact=exact)
    experts = list(obj.experts)
    diag = 0.0 if "conflict" in metric else 1.0
    arr = np.full((len(experts), len(experts)), np.nan)
    np.fill_diagonal(arr, diag)
    mat = pd.DataFrame(arr, index=experts, columns=experts)
    for r in s.itertuples(index=False):
        a, b, v = getattr(r, "expert_a"), getattr(r, "expert_b"), getattr(r, metric)
        mat.loc[a, b] = mat.loc[b, a] = v
    return mat


# ----------------------------------------------------------------------------------- figures
@_styled
def heatmap(table: pd.DataFrame, *, title: str = "", cbar_label: str = "", cmap: str = SEQUENTIAL,
            vmin: float | None = None, vmax: float | None = None, center: float | None = None,
            annot: bool | None = None, fmt: str = ".2f", square: bool = False) -> Figure:
    """A seaborn heatmap of ``table`` in the workbench style (NaN cells left blank)."""
    import seaborn as sns

    nr, nc = table.shape if table.size else (1, 1)
    w = min(2.2 + 0.55 * nc, 14)
    h = min(1.4 + 0.28 * nr, 16)
    if square:
        w = h = min(2.0 + 0.7 * max(nr, nc), 10)
    fig = _figure(w, h)
    ax = fig.add_subplot()
    with matplotlib.rc_context(STYLE_RC):
        if not table.size or table.isna().all().all():
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        else:
            if annot is None:
                annot = table.size <= 400
            with warnings.catch_warnings():  # seaborn's own use of Colormap.set_bad
                warnings.simplefilter("ignore", PendingDeprecationWarning)
                sns.heatmap(table.astype(float), ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, center=center,
                            annot=annot, fmt=fmt, annot_kws={"fontsize": 7}, linewidths=0.4, linecolor="white",
                            square=square, cbar_kws={"label": cbar_label, "shrink": 0.8})
            ax.set_xlabel(label(table.columns.name) if table.columns.name else "")
            ax.set_ylabel(label(table.index.name) if table.index.name else "")
            ax.tick_params(axis="y", rotation=0)
            if max((len(str(c)) for c in table.columns), default=0) > 6:  # long labels (expert names)
                ax.set_xticklabels(ax.get_xticklabels(), rotation=30, ha="right")
        ax.set_title(_fit_title(title, w - 1.0))  # less the colour bar
    return fig


def metric_heatmap(obj: Any, metric: str, *, pair: tuple[str, str] | None = None, expert: str | None = None,
                   exact: bool = True, title: str | None = None) -> Figure:
    """Layers x module types heatmap of one metric (see :func:`layer_module_table`)."""
    info = metric_info(metric)
    t = layer_module_table(obj, metric, pair=pair, expert=expert, exact=exact)
    who = f"{pair[0]} vs {pair[1]}" if pair else (expert if expert else
                                                   {"pair": "mean over pairs", "expert": "mean over experts"}.get(info["entity"], "all experts"))
    lo, hi = info["bounds"] if info["bounds"] else (None, None)
    return heatmap(t, title=title or _title(info, who), cbar_label=info["label"], cmap=info["cmap"],
                   vmin=lo, vmax=hi, center=info["center"])


def pair_matrix_figure(mat: pd.DataFrame, metric: str, *, title: str | None = None) -> Figure:
    """Experts x experts heatmap of a pair metric (from :func:`pair_matrix_data`)."""
    info = metric_info(metric)
    lo, hi = info["bounds"] if info["bounds"] else (None, None)
    m = mat.copy()
    m.index.name, m.columns.name = "expert", "expert"
    return heatmap(m, title=title or _title(info, "all pairs"), cbar_label=info["label"], cmap=info["cmap"], vmin=lo,
                   vmax=hi, center=info["center"], square=True, annot=True)


@_styled
def expert_bars(obj: Any, metric: str, *, layer: int | None = None, module: str | None = None,
                title: str | None = None) -> Figure:
    """One bar per expert for a per-expert metric over all tensors (or one layer and/or module)."""
    info = metric_info(metric)
    if info["entity"] != "expert":
        raise ConfigError(f"{metric!r} is not a per-expert metric")
    s = _over_tensors(obj, metric, info, layer=layer, module=module, exact=True)
    order = [e for e in obj.experts if e in set(s["expert"])]
    s = s.set_index("expert").reindex(order)
    fig = _figure(1.6 + 0.7 * max(len(order), 1), 2.8)
    ax = fig.add_subplot()
    with matplotlib.rc_context(STYLE_RC):
        ax.bar(range(len(order)), s[metric].values, color=ACCENT)
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set_ylabel(info["label"])
        if info["bounds"]:
            ax.set_ylim(*info["bounds"])
        where = ", ".join(x for x in (f"layer {layer}" if layer is not None else "", module or "") if x) or "all tensors"
        ax.set_title(_fit_title(title or _title(info, where), 1.6 + 0.7 * max(len(order), 1)))
    return fig


@_styled
def upset_figure(patterns: pd.DataFrame, experts: Sequence[str], *, max_patterns: int = 20,
                 title: str = "mask intersections", min_degree: int = 0) -> Figure:
    """UpSet-style chart: bars of the counts of each exact membership pattern over a dot matrix.

    ``patterns`` is :meth:`MaskOverlap.pattern_table` (one bool column per expert and ``count``).
    Patterns of degree below ``min_degree`` are left out (``min_degree=1`` hides "used by no one").
    """
    df = patterns[patterns["degree"] >= min_degree] if "degree" in patterns.columns else patterns
    df = df.sort_values("count", ascending=False, kind="stable").head(max_patterns).reset_index(drop=True)
    n, k = len(experts), len(df)
    fig = _figure(1.8 + 0.42 * max(k, 3), 1.9 + 0.3 * n + 2.0)
    gs = fig.add_gridspec(2, 1, height_ratios=[3.0, 0.35 * n + 0.3])
    ax_bar = fig.add_subplot(gs[0])
    ax_dot = fig.add_subplot(gs[1], sharex=ax_bar)
    with matplotlib.rc_context(STYLE_RC):
        x = np.arange(k)
        total = float(patterns["count"].sum()) or 1.0
        ax_bar.bar(x, df["count"].values, color=ACCENT, width=0.7)
        for xi, c in zip(x, df["count"].values):
            ax_bar.text(xi, c, f"{100 * c / total:.1f}%", ha="center", va="bottom", fontsize=6, rotation=90)
        if k:
            ax_bar.set_ylim(0, 1.18 * float(df["count"].max()))  # room for the percentage labels
        ax_bar.set_ylabel("entries (parameters)")
        ax_bar.set_title(title)
        ax_bar.tick_params(axis="x", bottom=False, labelbottom=False)
        for j, e in enumerate(experts):
            member = df[e].astype(bool).values if k else np.array([], dtype=bool)
            ax_dot.scatter(x, np.full(k, j), s=36, c=np.where(member, "#222222", "#dddddd"), zorder=2)
        for xi in range(k):
            ys = [j for j, e in enumerate(experts) if bool(df.loc[xi, e])]
            if len(ys) > 1:
                ax_dot.plot([xi, xi], [min(ys), max(ys)], color="#222222", lw=1.5, zorder=1)
        ax_dot.set_yticks(range(n), list(experts))
        ax_dot.set_ylim(-0.6, n - 0.4)
        ax_dot.invert_yaxis()
        ax_dot.set_xticks(x, [""] * k)
        ax_dot.tick_params(axis="x", bottom=False)
        for side in ("left", "bottom", "top", "right"):
            ax_dot.spines[side].set_visible(False)
        if k:
            ax_bar.set_xlim(-0.6, k - 0.4)
    return fig


@_styled
def sweep_figure(table: pd.DataFrame, x: str = "lam", metrics: Sequence[str] = ("iou", "share_none", "share_one", "share_all"),
                 *, title: str | None = None, logx: bool | None = None) -> Figure:
    """Overlap statistics against the threshold ``lam`` or the number of merged experts.

    ``table`` is :func:`~workbench.analysis.overlap.sweep_table`; rows with the same ``x`` (several
    subsets of one size) are averaged and drawn with their min-max range.
    """
    missing = [m for m in (x, *metrics) if m not in table.columns]
    if missing:
        raise ConfigError(f"sweep table lacks columns {missing}")
    g = table.groupby(x)[list(metrics)]
    mean, lo, hi = g.mean(), g.min(), g.max()
    fig = _figure(4.2, 3.0)
    ax = fig.add_subplot()
    import seaborn as sns

    colors = sns.color_palette("deep", len(metrics))
    with matplotlib.rc_context(STYLE_RC):
        for c, m in zip(colors, metrics):
            ax.plot(mean.index, mean[m], marker="o", color=c, label=label(m))
            if (hi[m] - lo[m]).abs().max() > 0:
                ax.fill_between(mean.index, lo[m], hi[m], color=c, alpha=0.15, lw=0)
        if logx if logx is not None else (x == "lam" and len(mean) > 2 and mean.index.min() > 0
                                          and mean.index.max() / mean.index.min() > 5):
            ax.set_xscale("log", base=2)
        if x == "n_experts":
            ax.set_xticks(list(mean.index))
        ax.set_xlabel(label(x))
        ax.set_ylabel("share of the entries")
        ax.set_ylim(0, 1)
        ax.legend(frameon=False, fontsize=7)
        ax.set_title(title or f"mask overlap vs {label(x)}")
    return fig


def overlap_title(overlap: Any, where: str = "all tensors") -> str:
    """``"MMER masks (λ = 1) - all tensors"``: the method and threshold of a mask set, from its meta."""
    method, lam = overlap.meta.get("method", ""), overlap.meta.get("lam", "")
    if not method:
        return f"mask intersections - {where}"
    return f"{str(method).upper()} masks (λ = {lam:g}) - {where}" if isinstance(lam, (int, float)) else \
        f"{str(method).upper()} masks - {where}"


def save_all_figures(profile: Any = None, overlap: Any = None, dir: str | Path | None = None, *, prefix: str = "",
                     metrics: Sequence[str] | None = None, preset: str | None = None) -> list[Path]:
    """Every standard picture of a profile and/or a mask overlap, saved as PNG + SVG under ``dir``.

    For a profile: a layers x modules heatmap per metric (mean over pairs / experts), the pair
    matrix of each pair metric, one bar chart per per-expert metric. For an overlap: heatmaps of
    density / IoU / shares, the IoU matrix and the UpSet bars. Names: ``<prefix><kind>_<metric>``.
    ``dir`` and ``preset`` as in :func:`save_figure`.
    """
    import functools

    save = functools.partial(save_figure, dir=dir, preset=preset)
    paths: list[Path] = []
    if profile is not None:
        for m in (metrics or profile.metrics()):
            info = metric_info(m)
            paths += save(metric_heatmap(profile, m), f"{prefix}heatmap_{m}")
            if info["entity"] == "pair":
                paths += save(pair_matrix_figure(pair_matrix_data(profile, m), m), f"{prefix}pairs_{m}")
            elif info["entity"] == "expert":
                paths += save(expert_bars(profile, m), f"{prefix}experts_{m}")
    if overlap is not None:
        for m in ("density_support", "iou", "share_none", "share_one", "share_all"):
            paths += save(metric_heatmap(overlap, m), f"{prefix}mask_heatmap_{m}")
        paths += save(pair_matrix_figure(pair_matrix_data(overlap, "iou"), "iou"), f"{prefix}mask_pairs_iou")
        paths += save(upset_figure(overlap.pattern_table(), overlap.experts, title=overlap_title(overlap)),
                      f"{prefix}mask_upset")
    return paths


register_inline()
