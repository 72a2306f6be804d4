"""Explorers: the pure figure functions, and that changing a control changes the image bytes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TOY_SHAPES

pytest.importorskip("ipywidgets")

from workbench.analysis import analyze_masks, lambda_sweep, profile_interference
from workbench.explorers import InterferenceExplorer, MaskExplorer, interference_figure, mask_figure, select_overlap
from workbench.errors import ConfigError
from workbench.plots import fig_to_png

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(toy_base_and_experts):
    base, paths = toy_base_and_experts
    prof = profile_interference(base, paths, device="cpu", progress=False)
    sweep = {**lambda_sweep(base, paths, lams=(0.5, 1.0, 2.0), device="cpu", progress=False),
             **lambda_sweep(base, paths, lams=(1.0, 1.5), method="tall", device="cpu", progress=False)}
    return prof, sweep


def test_pure_figures_differ_by_choice(world):
    prof, sweep = world
    a = fig_to_png(interference_figure(prof, "cosine", pair=("a", "b")))
    b = fig_to_png(interference_figure(prof, "cosine", pair=("a", "c")))
    c = fig_to_png(interference_figure(prof, "cosine", view="matrix"))
    d = fig_to_png(interference_figure(prof, "rel_norm", view="matrix", module="q"))
    assert len({a, b, c, d}) == 4
    ov = select_overlap(sweep, "mmer", 1.0)
    assert ov.meta["lam"] == 1.0 and ov.meta["method"] == "mmer"
    u = fig_to_png(mask_figure(ov, view="upset"))
    u0 = fig_to_png(mask_figure(ov, view="upset", layer=0))
    assert u != u0
    with pytest.raises(ConfigError):
        interference_figure(prof, "cosine", view="upset")
    with pytest.raises(ConfigError):
        select_overlap(sweep, "mmer", 3.0)


def test_interference_explorer_controls_change_image(world):
    prof, _ = world
    ex = InterferenceExplorer(prof)
    assert "wb-explorer-image" in ex.image._dom_classes
    for name, w in ex.controls.items():
        assert f"wb-control-{name}" in w._dom_classes
    first = ex.image.value
    assert first[:4] == b"\x89PNG"
    seen = {first}
    ex.controls["metric"].value = "conflict"
    seen.add(ex.image.value)
    ex.controls["pair"].value = "a vs c"
    seen.add(ex.image.value)
    ex.controls["view"].value = "matrix"
    seen.add(ex.image.value)
    ex.controls["layer"].value = 1
    seen.add(ex.image.value)
    ex.controls["metric"].value = "ties_survival"
    seen.add(ex.image.value)
    ex.controls["module"].value = "up"
    seen.add(ex.image.value)
    assert len(seen) == 7  # every change produced a different picture
    assert ex.choices()["layer"] == 1 and ex.choices()["module"] == "up"
    # the image equals the pure function's output for the same choices
    assert ex.image.value == fig_to_png(interference_figure(prof, **ex.choices()), dpi=ex.dpi)


def test_mask_explorer_method_and_threshold(world):
    _, sweep = world
    ex = MaskExplorer(sweep)
    assert "wb-explorer-image" in ex.image._dom_classes
    assert {"wb-control-method", "wb-control-threshold"} <= set(ex.controls["method"]._dom_classes) | set(
        ex.controls["threshold"]._dom_classes)
    v0 = ex.image.value
    ex.controls["threshold"].value = 2.0
    v1 = ex.image.value
    assert v1 != v0
    ex.controls["view"].value = "upset"
    v2 = ex.image.value
    assert v2 != v1
    ex.controls["method"].value = "tall"
    assert list(ex.controls["threshold"].options) == [1.0, 1.5]
    v3 = ex.image.value
    assert v3 != v2 and ex.status.value == ""
    ex.controls["view"].value = "heatmap"
    ex.controls["metric"].value = "share_one"
    assert ex.image.value != v3


def test_widget_box_has_all_parts(world):
    prof, _ = world
    ex = InterferenceExplorer(prof)
    box = ex.widget
    assert ex.image in box.children
    assert "wb-explorer" in box._dom_classes


def test_mask_explorer_on_single_overlap():
    g = torch.Generator().manual_seed(3)
    data = {n: torch.rand(3, int(np.prod(s)), generator=g) < 0.4 for n, s in TOY_SHAPES.items()}
    ov = analyze_masks(data, ["a", "b", "c"])
    ex = MaskExplorer(ov)
    v0 = ex.image.value
    ex.controls["pair"].value = "a vs b"
    assert ex.image.value != v0
