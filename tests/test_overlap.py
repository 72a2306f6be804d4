"""Mask overlap: IoU, coverage and membership patterns against direct Python-set computations."""
from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from workbench.analysis.overlap import (analyze_masks, compute_masks, coverage_counts,
                                        expert_count_sweep, lambda_sweep, load_mmer_masks, method_masks,
                                        pairwise_iou, pattern_counts, sweep_table)
from workbench.errors import CheckpointError, ConfigError

torch.set_num_threads(1)
EXPERTS = ["vision", "audio", "video", "point"]


def _random_masks(seed: int, shape=(4, 300), p=0.35):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


def _sets(masks: torch.Tensor, support: torch.Tensor | None = None) -> list[set[int]]:
    out = []
    for row in masks.reshape(masks.shape[0], -1).tolist():
        out.append({i for i, b in enumerate(row) if b and (support is None or bool(support.reshape(-1)[i]))})
    return out


def test_iou_matches_python_sets():
    m = _random_masks(0)
    sup = _random_masks(1, (300,), 0.7)
    for support in (None, sup):
        res = pairwise_iou(m, support, chunk_size=37)
        sets = _sets(m, support)
        for i, j in itertools.combinations(range(4), 2):
            assert res["inter"][i, j] == len(sets[i] & sets[j])
        assert res["sizes"].tolist() == [len(s) for s in sets]


def test_pattern_counts_match_direct_count():
    m = _random_masks(2)
    sup = _random_masks(3, (300,), 0.6)
    pc = pattern_counts(m, sup)
    direct = Counter()
    for j in range(300):
        if sup[j]:
            direct[sum(int(m[i, j]) << i for i in range(4))] += 1
    assert {k: int(v) for k, v in enumerate(pc) if v} == dict(direct)
    assert pc.sum() == int(sup.sum())


def test_coverage_none_one_all():
    m = torch.tensor([[1, 0, 1, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 1, 0]], dtype=torch.bool)
    # column sums: 3, 0, 1, 1, 2
    assert coverage_counts(m).tolist() == [1, 2, 1, 1]
    sup = torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool)
    assert coverage_counts(m, sup).tolist() == [1, 1, 1, 1]


def test_analyze_masks_frames_and_exact_grouping():
    g = torch.Generator().manual_seed(5)
    data = {}
    for l in range(2):
        for mod in ("q_proj", "v_proj"):
            name = f"model.layers.{l}.self_attn.{mod}.weight"
            data[name] = (torch.rand(4, 6, 5, generator=g) < 0.4, torch.rand(6, 5, generator=g) < 0.8)
    ov = analyze_masks(data, EXPERTS)
    # iou per module, exact: summed intersections over summed unions of the two layers
    s = ov.summary("iou", by=("module",))
    r = s[(s.module == "q") & (s.expert_a == "vision") & (s.expert_b == "video")].iloc[0]
    inter = union = 0
    for name, (m, sup) in data.items():
        if "q_proj" in name:
            sets = _sets(m.reshape(4, -1), sup)
            inter += len(sets[0] & sets[2])
            union += len(sets[0] | sets[2])
    assert r["iou"] == pytest.approx(inter / union)
    # density inside the support and overall
    d = ov.summary("density_support", by=())
    kept = sum(len(_sets(m.reshape(4, -1), sup)[1]) for m, sup in data.values())
    n_sup = sum(int(sup.sum()) for _, sup in data.values())
    assert d.set_index("expert").loc["audio", "density_support"] == pytest.approx(kept / n_sup)
    dens = ov.summary("density", by=()).set_index("expert").loc["audio", "density"]
    assert dens == pytest.approx(sum(int(m[1].sum()) for m, _ in data.values()) / (4 * 30))
    # shares: none + one + ... = 1
    c = ov.coverage
    k_cols = [f"used_by_{k}" for k in range(5)]
    assert (c[k_cols].sum(1) == c["n_support"]).all()
    # pattern table: summed over tensors = direct count
    pt = ov.pattern_table()
    direct = Counter()
    for m, sup in data.values():
        mm = m.reshape(4, -1)
        for j in range(30):
            if sup.reshape(-1)[j]:
                direct["".join("1" if mm[i, j] else "0" for i in range(4))] += 1
    assert dict(zip(pt.pattern, pt["count"])) == dict(direct)
    assert pt["count"].is_monotonic_decreasing
    assert list(pt.columns[:4]) == EXPERTS
    # pattern table restricted to one layer
    pt0 = ov.pattern_table(layer=0)
    assert pt0["count"].sum() == sum(int(sup.sum()) for n, (_, sup) in data.items() if ".0." in n)
    mat = ov.pair_matrix("iou")
    assert mat.shape == (4, 4) and np.allclose(mat.values, mat.values.T) and np.allclose(np.diag(mat.values), 1)


def test_mask_count_mismatch_raises():
    with pytest.raises(CheckpointError, match="q_proj"):
        analyze_masks({"model.layers.0.self_attn.q_proj.weight": torch.ones(3, 4, dtype=torch.bool)}, EXPERTS)


# ----------------------------------------------------------------------------------- mask definitions
def test_mmer_mask_definition_by_hand():
    # tau1 = [2, -1, 0.1], tau2 = [2, 1, -3]; density 1 (no trim)
    taus = torch.tensor([[2.0, -1.0, 0.1], [2.0, 1.0, -3.0]])
    masks, support = compute_masks(taus, "mmer", lam=1.0, density=1.0)
    # gamma = sign([4, 0, -2.9]) = [+, 0, -]; tau* = [2, 0, -3]
    assert support.tolist() == [True, False, True]
    # m_i = |tau_i| > |tau_i - tau*|: e1: [2>0, 1>1, 0.1>3.1] ; e2: [2>0, 1>1, 3>0]
    assert masks.tolist() == [[True, False, False], [True, False, True]]


def test_tall_mask_definition_by_hand():
    taus = torch.tensor([[3.0, 1.0, 0.0], [1.0, -2.0, 2.0]])
    masks, support = compute_masks(taus, "tall", lam=1.0)
    # tau_MT = [4, -1, 2]; |tau_1| >= |tau_MT - tau_1| = [1, 2, 2] -> [T, F, F(zero)]
    # |tau_2| >= |tau_MT - tau_2| = [3, 1, 0] -> [F, T, T]
    assert masks.tolist() == [[True, False, False], [False, True, True]]
    assert support.tolist() == [True, True, True]


def test_ties_keep_masks_elected_sign():
    taus = torch.tensor([[3.0, 1.0, 1.0], [-1.0, 1.0, -1.0], [-1.0, -5.0, 0.0]])
    masks, support = compute_masks(taus, "ties", density=1.0)
    # gamma = sign([1, -3, 0]) -> the last entry has no elected sign, nobody kept there
    assert masks.tolist() == [[True, False, False], [False, False, False], [False, True, False]]
    assert support.tolist() == [True, True, False]


def test_ties_masks_agree_with_interference_kernel():
    # two independent implementations: workbench.merging.masks (via compute_masks) and the profile kernel
    from workbench.analysis.interference import tensor_stats

    g = torch.Generator().manual_seed(9)
    taus = torch.randn(3, 400, generator=g)
    taus[:, ::5] = 0
    masks, support = compute_masks(taus, "ties", density=0.3)
    st = tensor_stats(taus, topk=0.3, dare_p=None, chunk_size=64)
    assert masks.sum(1).tolist() == st["ties_survived"].tolist()
    assert int(support.sum()) == int((masks.any(0)).sum())


def test_mmer_masks_entrywise_reference():
    g = torch.Generator().manual_seed(10)
    taus = torch.randn(3, 60, generator=g)
    masks, support = compute_masks(taus, "mmer", lam=0.8, density=0.5)
    # reference: TIES by hand (python), then the mask inequality entry by entry
    n = 60
    k = round(0.5 * n)
    thr = [sorted(taus[i].abs().tolist(), reverse=True)[k - 1] for i in range(3)]
    for j in range(n):
        kept = [float(taus[i, j]) if abs(float(taus[i, j])) >= thr[i] else 0.0 for i in range(3)]
        s = sum(kept)
        gsign = (s > 0) - (s < 0)
        members = [v for v in kept if v != 0 and ((v > 0) - (v < 0)) == gsign and gsign != 0]
        star = sum(members) / len(members) if members else 0.0
        assert bool(support[j]) == (star != 0)
        for i in range(3):
            t = float(taus[i, j])
            assert bool(masks[i, j]) == (abs(t) > 0.8 * abs(t - star) + 0.0), (i, j)


def test_lambda_monotone_density():
    g = torch.Generator().manual_seed(4)
    taus = torch.randn(3, 500, generator=g)
    dens = [compute_masks(taus, "mmer", lam=l)[0].sum().item() for l in (0.25, 1.0, 4.0)]
    assert dens[0] >= dens[1] >= dens[2]


# ----------------------------------------------------------------------------------- streaming from checkpoints
@pytest.fixture()
def ckpts(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (6, 6), "model.layers.0.mlp.up_proj.weight": (8, 6),
              "model.layers.1.self_attn.q_proj.weight": (6, 6)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    paths, taus = {}, []
    for e in EXPERTS:
        t = {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}
        (tmp_path / e).mkdir()
        w = {k: base[k] + t[k] for k in shapes}
        save_file(w, str(tmp_path / e / "model.safetensors"))
        taus.append({k: w[k] - base[k] for k in shapes})
        paths[e] = tmp_path / e
    return tmp_path, paths, taus, shapes


def test_method_masks_stream_equals_in_memory(ckpts):
    tmp, paths, taus, shapes = ckpts
    ov = method_masks(tmp / "base", paths, "mmer", "cpu", lam=1.0, progress=False)
    mem = {}
    for n in shapes:
        T = torch.stack([t[n].reshape(-1) for t in taus])
        mem[n] = compute_masks(T, "mmer", lam=1.0)
    ref = analyze_masks(mem, EXPERTS)
    assert ov.totals() == pytest.approx(ref.totals())
    assert ov.summary("iou").equals(ref.summary("iou"))


def test_sweeps(ckpts):
    tmp, paths, _, _ = ckpts
    res = lambda_sweep(tmp / "base", paths, lams=(0.5, 1.0, 2.0), device="cpu", progress=False)
    tab = sweep_table(res)
    assert list(tab["lam"]) == [0.5, 1.0, 2.0]
    assert tab["density"].is_monotonic_decreasing
    res2 = expert_count_sweep(tmp / "base", paths, sizes=(2, 3, 4), device="cpu", progress=False)
    tab2 = sweep_table(res2)
    assert tab2.groupby("n_experts").size().to_dict() == {2: 6, 3: 4, 4: 1}
    with pytest.raises(ConfigError):
        expert_count_sweep(tmp / "base", paths, sizes=(5,), device="cpu", progress=False)


def test_dare_masks_seeded(ckpts):
    tmp, paths, _, _ = ckpts
    a = method_masks(tmp / "base", paths, "dare", "cpu", dare_p=0.5, seed=1, progress=False)
    b = method_masks(tmp / "base", paths, "dare", "cpu", dare_p=0.5, seed=1, progress=False)
    assert a.density.equals(b.density)
    assert 0.35 < a.totals()["density"] < 0.65


def _pack_msb(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(np.uint8)))


def test_load_mmer_masks_from_engine_layout(tmp_path):
    g = torch.Generator().manual_seed(8)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (5, 7), "model.layers.1.mlp.down_proj.weight": (3, 9)}
    masks = {n: torch.rand(3, *s, generator=g) < 0.5 for n, s in shapes.items()}
    (tmp_path / "mmer").mkdir()
    from workbench.io.packing import pack_mask

    # the engine's packing, and numpy's packbits (the documented layout) agree
    assert torch.equal(pack_mask(masks[next(iter(masks))][0]), _pack_msb(masks[next(iter(masks))][0]))
    sd = {f"{n}::mask_{i}": pack_mask(m[i]) for n, m in masks.items() for i in range(3)}
    save_file(sd, str(tmp_path / "mmer" / "masks.safetensors"))
    (tmp_path / "mmer" / "mmer.json").write_text(json.dumps({"experts": ["a", "b", "c"],
                                                             "shapes": {n: list(s) for n, s in shapes.items()}}))
    experts, source = load_mmer_masks(tmp_path)
    ov = analyze_masks(source, experts)
    ref = analyze_masks({n: m for n, m in masks.items()}, ["a", "b", "c"])
    assert experts == ["a", "b", "c"]
    assert ov.pattern_table().equals(ref.pattern_table())
    assert ov.summary("iou").equals(ref.summary("iou"))


def test_save(tmp_path):
    ov = analyze_masks({"model.layers.0.self_attn.q_proj.weight": _random_masks(0, (4, 20))}, EXPERTS)
    ov.save(tmp_path / "ov")
    for f in ("density.csv", "pairs.parquet", "coverage.csv", "patterns.parquet", "meta.json"):
        assert (tmp_path / "ov" / f).is_file()


def test_load_masks_written_by_engine_layout(tmp_path):
    """The engine's own layout: shapes in the safetensors metadata, no expert names in mmer.json."""
    g = torch.Generator().manual_seed(11)
    shapes = {"model.layers.0.mlp.up_proj.weight": (4, 6), "model.layers.2.self_attn.o_proj.weight": (5, 5)}
    masks = {n: torch.rand(2, *s, generator=g) < 0.3 for n, s in shapes.items()}
    from workbench.io.packing import pack_mask

    (tmp_path / "mmer").mkdir()
    sd, meta = {}, {}
    for n, m in masks.items():
        for i in range(2):
            sd[f"{n}::mask_{i}"] = pack_mask(m[i])
            meta[f"{n}::mask_{i}"] = json.dumps({"shape": list(shapes[n]), "dtype": "bool", "packed": True})
    save_file(sd, str(tmp_path / "mmer" / "masks.safetensors"), metadata=meta)
    (tmp_path / "mmer" / "mmer.json").write_text(json.dumps({"method": "mmer", "params": {}}))
    experts, source = load_mmer_masks(tmp_path, ["image", "audio"])
    ov = analyze_masks(source, experts)
    ref = analyze_masks(dict(masks), ["image", "audio"])
    assert ov.summary("iou").equals(ref.summary("iou"))
    with pytest.raises(CheckpointError):
        load_mmer_masks(tmp_path, ["only-one"])
    names, _ = load_mmer_masks(tmp_path)
    assert names == ["expert_0", "expert_1"]


def test_engine_mmer_masks_equal_recomputed(tmp_path):
    """Masks written by the merge engine == masks recomputed here from the task vectors (tiny zoo)."""
    from workbench import engine
    from workbench.world import ensure_zoo

    ZOO = ensure_zoo("tiny").path
    experts = {"image": ZOO / "experts" / "image-full-s0", "audio": ZOO / "experts" / "audio-full-s0"}
    out = engine.merge({"method": "mmer", "base": ZOO / "base", "experts": [p / "llm" for p in experts.values()],
                        "output": tmp_path / "merged", "device": "cpu"}, progress=False)
    names, src = load_mmer_masks(out, list(experts), base=ZOO / "base")
    disk = analyze_masks(src, names)
    tensors = set(disk.density.tensor)
    here = method_masks(ZOO / "base", experts, "mmer", "cpu", progress=False, names=lambda n: n in tensors)
    assert disk.pattern_table().equals(here.pattern_table())
    assert disk.totals() == pytest.approx(here.totals())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; none visible on this machine")
def test_cuda_overlap_matches_cpu():
    g = torch.Generator().manual_seed(12)
    taus = torch.randn(3, 5000, generator=g)
    for method in ("mmer", "tall", "ties"):
        mc, sc = compute_masks(taus, method, lam=0.7)
        mg, sg = compute_masks(taus.cuda(), method, lam=0.7)
        assert torch.equal(mc, mg.cpu()) and torch.equal(sc, sg.cpu())
        assert (pairwise_iou(mc, sc)["inter"] == pairwise_iou(mg, sg)["inter"]).all()
        assert (pattern_counts(mc, sc) == pattern_counts(mg, sg)).all()
