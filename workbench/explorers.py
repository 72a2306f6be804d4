"""ipywidgets explorers for the notebooks: thin controls over pure data + figure functions.

Each explorer holds an :class:`ipywidgets.Image` (CSS class ``wb-explorer-image``) whose value
is the PNG of the current figure, and one control per choice (CSS class
``wb-control-<name>``: ``metric``, ``view``, ``pair``, ``expert``, ``layer``, ``module``,
``method``, ``threshold``). Changing a control re-renders the image in place. The figures come
from :func:`interference_figure` and :func:`mask_figure`, pure functions that can be called
(and tested) without widgets.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd
from matplotlib.figure import Figure

from . import plots
from .errors import ConfigError

__all__ = ["InterferenceExplorer", "MaskExplorer", "interference_figure", "mask_figure", "select_overlap"]

ALL = "all"
MEAN = "(mean)"
VIEWS = ("heatmap", "matrix")
MASK_VIEWS = ("heatmap", "matrix", "upset")


def _pair_label(a: str, b: str) -> str:
    return f"{a} vs {b}"


def _pairs(experts: Sequence[str]) -> list[tuple[str, str]]:
    return [(a, b) for i, a in enumerate(experts) for b in experts[i + 1:]]


def _layers_modules(df: pd.DataFrame) -> tuple[list[Any], list[str]]:
    layers = sorted({int(v) for v in df["layer"].dropna()}) if "layer" in df.columns and len(df) else []
    mods = [m for m in plots.MODULE_ORDER if len(df) and m in set(df["module"])]
    return layers, mods


# ----------------------------------------------------------------------------------- pure figure functions
def _figure_for(obj: Any, metric: str, view: str, *, pair: tuple[str, str] | None, expert: str | None,
                layer: int | None, module: str | None, exact: bool) -> Figure:
    info = plots.metric_info(metric)
    if view == "heatmap":
        return plots.metric_heatmap(obj, metric, pair=pair if info["entity"] == "pair" else None,
                                    expert=expert if info["entity"] == "expert" else None, exact=exact)
    if view == "matrix":
        where = ", ".join(x for x in (f"layer {layer}" if layer is not None else "", module or "") if x) or "all tensors"
        if info["entity"] == "pair":
            mat = plots.pair_matrix_data(obj, metric, layer=layer, module=module, exact=exact)
            return plots.pair_matrix_figure(mat, metric, title=plots._title(info, where))
        if info["entity"] == "expert":
            return plots.expert_bars(obj, metric, layer=layer, module=module)
        # a whole-set metric has no pair / expert axis: its layer x module table is the matrix
        return plots.metric_heatmap(obj, metric, exact=exact, title=plots._title(info, "whole set"))
    raise ConfigError(f"unknown view {view!r}")


def interference_figure(profile: Any, metric: str = "cosine", view: str = "heatmap", *,
                        pair: tuple[str, str] | None = None, expert: str | None = None, layer: int | None = None,
                        module: str | None = None, exact: bool = True) -> Figure:
    """The figure an :class:`InterferenceExplorer` shows for these choices.

    ``view="heatmap"``: layers x module types of ``metric`` for ``pair`` / ``expert`` (mean when
    ``None``). ``view="matrix"``: experts x experts matrix of a pair metric, or one bar per expert
    for a per-expert metric, over all tensors or one ``layer`` and/or ``module``.
    """
    if view not in VIEWS:
        raise ConfigError(f"view must be one of {VIEWS}, got {view!r}")
    return _figure_for(profile, metric, view, pair=pair, expert=expert, layer=layer, module=module, exact=exact)


def select_overlap(results: Mapping[tuple, Any] | Any, method: str | None = None, lam: float | None = None) -> Any:
    """Pick the :class:`MaskOverlap` of ``(method, lam)`` over the most experts from a sweep result dict."""
    if not isinstance(results, Mapping):
        return results
    keys = [k for k in results if (method is None or k[0] == method) and (lam is None or float(k[1]) == float(lam))]
    if not keys:
        raise ConfigError(f"no mask set for method={method!r}, lam={lam!r}; have {sorted(results)}")
    return results[max(keys, key=lambda k: len(k[2]))]


def mask_figure(overlap: Any, metric: str = "iou", view: str = "heatmap", *, pair: tuple[str, str] | None = None,
                expert: str | None = None, layer: int | None = None, module: str | None = None,
                exact: bool = True, max_patterns: int = 20) -> Figure:
    """The figure a :class:`MaskExplorer` shows: a heatmap / pair matrix of an overlap metric, or the UpSet bars."""
    if view not in MASK_VIEWS:
        raise ConfigError(f"view must be one of {MASK_VIEWS}, got {view!r}")
    if view == "upset":
        where = ", ".join(x for x in (f"layer {layer}" if layer is not None else "", module or "") if x) or "all tensors"
        return plots.upset_figure(overlap.pattern_table(layer=layer, module=module), overlap.experts,
                                  max_patterns=max_patterns, title=plots.overlap_title(overlap, where))
    return _figure_for(overlap, metric, view, pair=pair, expert=expert, layer=layer, module=module, exact=exact)


# ----------------------------------------------------------------------------------- widgets
class _Explorer:
    """Common machinery: controls dict, image widget, re-render on change."""

    dpi = plots.INLINE_DPI

    def __init__(self) -> None:
        import ipywidgets as W

        self._W = W
        self.image = W.Image(format="png", layout=W.Layout(width="auto", max_width="100%"))  # natural size
        self.image.add_class("wb-explorer-image")
        self.status = W.HTML()
        self.status.add_class("wb-explorer-status")
        self.controls: dict[str, Any] = {}
        self.figure: Figure | None = None

    def _add(self, name: str, widget: Any) -> Any:
        widget.add_class(f"wb-control-{name}")
        self.controls[name] = widget
        widget.observe(lambda change: self.update(), names="value")
        return widget

    def _figure(self) -> Figure:  # pragma: no cover - overridden
        raise NotImplementedError

    def update(self) -> bytes:
        """Re-render the figure for the current control values; returns the PNG bytes."""
        try:
            fig = self._figure()
            self.status.value = ""
        except ConfigError as e:  # a choice that has no data: say so, keep the last image
            self.status.value = f"<span style='color:#a33'>{e}</span>"
            return self.image.value
        self.figure = fig
        png = plots.fig_to_png(fig, dpi=self.dpi)
        self.image.value = png
        return png

    @property
    def widget(self) -> Any:
        """The explorer's ``VBox`` (controls, status line, image)."""
        W = self._W
        box = W.VBox([W.HBox(list(self.controls.values()), layout=W.Layout(flex_flow="row wrap")), self.status,
                      self.image])
        box.add_class("wb-explorer")
        return box

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _opt(value: Any, none_label: str) -> Any:
    return None if value == none_label else value


class InterferenceExplorer(_Explorer):
    """Browse an :class:`~workbench.analysis.InterferenceProfile`: metric, view, pair/expert, layer, module."""

    def __init__(self, profile: Any, metric: str | None = None, view: str = "heatmap") -> None:
        super().__init__()
        W = self._W
        self.profile = profile
        metrics = profile.metrics()
        if not metrics:
            raise ConfigError("the profile holds no data")
        experts = list(profile.experts)
        layers, mods = _layers_modules(profile.per_expert if len(profile.per_expert) else profile.pairs)
        self._pairs = {_pair_label(a, b): (a, b) for a, b in _pairs(experts)}
        self._add("metric", W.Dropdown(options=metrics, value=metric or metrics[0], description="metric"))
        self._add("view", W.ToggleButtons(options=list(VIEWS), value=view, description="view"))
        self._add("pair", W.Dropdown(options=[MEAN, *self._pairs], value=MEAN, description="pair"))
        self._add("expert", W.Dropdown(options=[MEAN, *experts], value=MEAN, description="expert"))
        self._add("layer", W.Dropdown(options=[(ALL, ALL), *[(str(l), l) for l in layers]], value=ALL, description="layer"))
        self._add("module", W.Dropdown(options=[ALL, *mods], value=ALL, description="module"))
        self._add("exact", W.Checkbox(value=True, description="exact group aggregation"))
        self.update()

    def choices(self) -> dict[str, Any]:
        """Current control values as :func:`interference_figure` arguments."""
        c = self.controls
        return {"metric": c["metric"].value, "view": c["view"].value,
                "pair": self._pairs.get(c["pair"].value), "expert": _opt(c["expert"].value, MEAN),
                "layer": _opt(c["layer"].value, ALL), "module": _opt(c["module"].value, ALL),
                "exact": bool(c["exact"].value)}

    def _figure(self) -> Figure:
        return interference_figure(self.profile, **self.choices())


class MaskExplorer(_Explorer):
    """Browse mask overlap: method, threshold lambda, metric, view (heatmap / matrix / UpSet), pair, expert, layer, module.

    ``results`` is a single :class:`~workbench.analysis.MaskOverlap` or a sweep result
    ``{(method, lam, subset): MaskOverlap}`` (e.g. several :func:`~workbench.analysis.lambda_sweep` runs merged).
    """

    METRICS = ("iou", "overlap_min", "density", "density_support", "share_none", "share_one", "share_all")

    def __init__(self, results: Mapping[tuple, Any] | Any, metric: str = "iou", view: str = "heatmap") -> None:
        super().__init__()
        W = self._W
        self.results = results
        if isinstance(results, Mapping):
            if not results:
                raise ConfigError("no mask sets to explore")
            methods = sorted({k[0] for k in results})
        else:
            methods = [results.meta.get("method", "masks")]
        self._lams_by_method = ({m: sorted({float(k[1]) for k in results if k[0] == m}) for m in methods}
                                if isinstance(results, Mapping) else {methods[0]: [float(results.meta.get("lam", 1.0))]})
        ov = select_overlap(results, methods[0])
        experts = list(ov.experts)
        layers, mods = _layers_modules(ov.density)
        self._pairs = {_pair_label(a, b): (a, b) for a, b in _pairs(experts)}
        lams = self._lams_by_method[methods[0]]
        self._add("method", W.Dropdown(options=methods, value=methods[0], description="method"))
        self._add("threshold", W.SelectionSlider(options=lams, value=1.0 if 1.0 in lams else lams[0],
                                                 description="lambda", continuous_update=False))
        self._add("metric", W.Dropdown(options=list(self.METRICS), value=metric, description="metric"))
        self._add("view", W.ToggleButtons(options=list(MASK_VIEWS), value=view, description="view"))
        self._add("pair", W.Dropdown(options=[MEAN, *self._pairs], value=MEAN, description="pair"))
        self._add("expert", W.Dropdown(options=[MEAN, *experts], value=MEAN, description="expert"))
        self._add("layer", W.Dropdown(options=[(ALL, ALL), *[(str(l), l) for l in layers]], value=ALL, description="layer"))
        self._add("module", W.Dropdown(options=[ALL, *mods], value=ALL, description="module"))
        self.controls["method"].observe(self._method_changed, names="value")
        self.update()

    def _method_changed(self, change: dict) -> None:
        lams = self._lams_by_method[change["new"]]
        sl = self.controls["threshold"]
        if list(sl.options) != lams:
            sl.options = lams
            sl.value = 1.0 if 1.0 in lams else lams[0]

    def choices(self) -> dict[str, Any]:
        """Current control values: ``method``, ``lam`` and the :func:`mask_figure` arguments."""
        c = self.controls
        return {"method": c["method"].value, "lam": c["threshold"].value, "metric": c["metric"].value,
                "view": c["view"].value, "pair": self._pairs.get(c["pair"].value),
                "expert": _opt(c["expert"].value, MEAN), "layer": _opt(c["layer"].value, ALL),
                "module": _opt(c["module"].value, ALL)}

    def _figure(self) -> Figure:
        ch = self.choices()
        if isinstance(self.results, Mapping):
            ov = select_overlap(self.results, ch.pop("method"), ch.pop("lam"))
        else:
            ov = self.results
            ch.pop("method"), ch.pop("lam")
        return mask_figure(ov, **ch)
