"""Pictures: pure table functions against the summaries, figures rendered headless to PNG + SVG."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TOY_SHAPES

from workbench import plots
from workbench.analysis import analyze_masks, profile_interference
from workbench.errors import ConfigError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def profile(toy_base_and_experts):
    base, paths = toy_base_and_experts
    return profile_interference(base, paths, device="cpu", progress=False)


@pytest.fixture(scope="module")
def overlap():
    g = torch.Generator().manual_seed(1)
    data = {n: torch.rand(3, int(np.prod(s)), generator=g) < 0.4 for n, s in TOY_SHAPES.items()}
    return analyze_masks(data, ["a", "b", "c"])


def test_layer_module_table_matches_summary(profile):
    t = plots.layer_module_table(profile, "cosine", pair=("a", "c"))
    assert list(t.index) == ["-", "0", "1"]
    assert list(t.columns) == ["embed", "q", "up"]  # canonical module order
    s = profile.summary("cosine")
    want = s[(s.layer == 1) & (s.module == "up") & (s.expert_a == "a") & (s.expert_b == "c")]["cosine"].item()
    assert t.loc["1", "up"] == pytest.approx(want)
    assert np.isnan(t.loc["-", "q"]) and not np.isnan(t.loc["-", "embed"])
    # pair given in the other order selects the same pair
    t2 = plots.layer_module_table(profile, "cosine", pair=("c", "a"))
    pd.testing.assert_frame_equal(t, t2)
    # no pair: mean over pairs of the exact group values
    tm = plots.layer_module_table(profile, "cosine")
    vals = s[(s.layer == 0) & (s.module == "q")]["cosine"]
    assert tm.loc["0", "q"] == pytest.approx(vals.mean())
    with pytest.raises(ConfigError):
        plots.layer_module_table(profile, "cosine", pair=("a", "zzz"))


def test_pair_matrix_symmetric_and_matches(profile, overlap):
    m = plots.pair_matrix_data(profile, "cosine")
    assert m.shape == (3, 3) and np.allclose(m.values, m.values.T) and np.allclose(np.diag(m.values), 1)
    s = profile.summary("cosine", by=())
    assert m.loc["b", "a"] == pytest.approx(s[(s.expert_a == "a") & (s.expert_b == "b")]["cosine"].item())
    mo = plots.pair_matrix_data(overlap, "iou", module="q")
    so = overlap.summary("iou", by=("module",))
    assert mo.loc["a", "c"] == pytest.approx(so[(so.module == "q") & (so.expert_a == "a") & (so.expert_b == "c")]["iou"].item())
    with pytest.raises(ConfigError):
        plots.pair_matrix_data(profile, "rel_norm")


def _check_files(paths):
    png, svg = paths
    assert png.suffix == ".png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert svg.suffix == ".svg" and "<svg" in svg.read_text()[:2000]


def test_all_figures_render_headless(tmp_path, profile, overlap):
    figs = {
        "cos": plots.metric_heatmap(profile, "cosine", pair=("a", "b")),
        "surv": plots.metric_heatmap(profile, "ties_survival", expert="b"),
        "setc": plots.metric_heatmap(profile, "set_conflict"),
        "pm": plots.pair_matrix_figure(plots.pair_matrix_data(profile, "conflict"), "conflict"),
        "bars": plots.expert_bars(profile, "rel_norm"),
        "iou": plots.metric_heatmap(overlap, "iou"),
        "upset": plots.upset_figure(overlap.pattern_table(), overlap.experts),
    }
    for name, fig in figs.items():
        _check_files(plots.save_figure(fig, name, dir=tmp_path / "figures"))
    assert not list((tmp_path / "figures").glob(".*tmp*"))  # no temp files left


def test_save_figure_is_reproducible(tmp_path, profile):
    a = plots.save_figure(plots.metric_heatmap(profile, "cosine"), "x", dir=tmp_path / "1")
    b = plots.save_figure(plots.metric_heatmap(profile, "cosine"), "x", dir=tmp_path / "2")
    assert a[0].read_bytes() == b[0].read_bytes()
    assert a[1].read_bytes() == b[1].read_bytes()
    with pytest.raises(ConfigError):
        plots.save_figure(plots.metric_heatmap(profile, "cosine"), "../evil", dir=tmp_path)


def test_upset_bars_follow_counts(overlap):
    pt = overlap.pattern_table()
    fig = plots.upset_figure(pt, overlap.experts, max_patterns=4)
    ax_bar = fig.axes[0]
    heights = [p.get_height() for p in ax_bar.patches]
    assert heights == list(pt["count"].head(4))
    # dots: member cells are dark
    fig2 = plots.upset_figure(pt, overlap.experts, min_degree=1)
    assert len(fig2.axes[0].patches) == int((pt["degree"] >= 1).sum())


def test_heatmap_colour_range_and_empty():
    t = pd.DataFrame([[0.5, -0.5]], index=pd.Index(["0"], name="layer"), columns=pd.Index(["q", "k"], name="module"))
    fig = plots.heatmap(t, cmap=plots.DIVERGING, vmin=-1, vmax=1, center=0)
    mesh = fig.axes[0].collections[0]
    assert mesh.get_clim() == (-1, 1)
    fig = plots.heatmap(pd.DataFrame())
    assert any(t.get_text() == "no data" for t in fig.axes[0].texts)


def test_sweep_figure(tmp_path):
    tab = pd.DataFrame({"lam": [0.5, 1.0, 2.0], "iou": [0.5, 0.3, 0.1], "share_none": [0, 0.1, 0.2],
                        "share_one": [0.3, 0.5, 0.6], "share_all": [0.2, 0.1, 0.0]})
    fig = plots.sweep_figure(tab)
    ys = fig.axes[0].lines[0].get_ydata()
    assert list(ys) == [0.5, 0.3, 0.1]
    _check_files(plots.save_figure(fig, "sweep", dir=tmp_path))
    with pytest.raises(ConfigError):
        plots.sweep_figure(tab, x="n_experts")


def test_save_all_figures(tmp_path, profile, overlap):
    paths = plots.save_all_figures(profile, overlap, dir=tmp_path, prefix="t_", metrics=["cosine", "rel_norm", "set_conflict"])
    names = {p.name for p in paths}
    assert {"t_heatmap_cosine.png", "t_pairs_cosine.svg", "t_experts_rel_norm.png", "t_heatmap_set_conflict.svg",
            "t_mask_upset.png", "t_mask_pairs_iou.svg"} <= names
    assert all(p.is_file() for p in paths)


def test_save_figure_files_each_preset_apart_and_captions_it(tmp_path, monkeypatch, profile):
    monkeypatch.setenv("WORKBENCH_FIGURES_DIR", str(tmp_path / "envfigs"))
    fig = plots.expert_bars(profile, "rel_norm")
    tiny = plots.save_figure(fig, "bars", preset="tiny")
    assert [p.parent for p in tiny] == [tmp_path / "envfigs" / "tiny"] * 2
    captions = [t.get_text() for t in fig.texts if t.get_gid() == plots.CAPTION_GID]
    assert len(captions) == 1 and "preset tiny" in captions[0] and "decide nothing" in captions[0]
    # saved again under another preset: the caption is replaced, not stacked, and nothing else moves
    default = plots.save_figure(fig, "bars", preset="default")
    assert [p.parent for p in default] == [tmp_path / "envfigs" / "default"] * 2
    captions = [t.get_text() for t in fig.texts if t.get_gid() == plots.CAPTION_GID]
    assert len(captions) == 1 and "preset default" in captions[0] and "decide nothing" not in captions[0]
    assert "preset default" in default[1].read_text()  # the SVG carries the caption as text
    with pytest.raises(ConfigError, match="preset"):
        plots.save_figure(fig, "bars")  # an output always knows whose it is


def test_figures_render_inline_in_ipython(profile):
    """Without pyplot no backend registers a formatter: ``register_inline`` makes a Figure a PNG."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    fig = plots.expert_bars(profile, "rel_norm")
    assert plots.register_inline(shell)
    data, _ = shell.display_formatter.format(fig)
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_are_words_and_metric_descriptions_are_shown(profile, overlap):
    assert plots.label("n_mod") == "modalities composed" and "λ" in plots.label("lambda_1")
    assert plots.label("unknown_column") == "unknown_column"
    fig = plots.metric_heatmap(profile, "ties_vs_ta")
    title = fig.axes[0].get_title()
    assert "ties_vs_ta" not in title and plots.metric_info("ties_vs_ta")["doc"].split()[0] in title
    up = plots.upset_figure(overlap.pattern_table(), overlap.experts,
                            title=plots.overlap_title(type("O", (), {"meta": {"method": "mmer", "lam": 1.0}})()))
    assert up.axes[0].get_title().startswith("MMER masks (λ = 1)")
