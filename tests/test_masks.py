"""Mask packing, MMER / TALL / TIES / DARE masks, each against a direct computation or peft."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.io.packing import pack_mask, unpack_mask
from workbench.merging.masks import (dare_keep_mask, mask_density, mmer_masks, tall_masks, ties_keep_masks,
                             topk_keep_mask)

SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=3)


@settings(max_examples=60, deadline=None)
@given(shape=SHAPES, seed=st.integers(0, 2**31 - 1), p=st.floats(0.0, 1.0))
def test_pack_unpack_roundtrip_and_numpy_layout(shape, seed, p):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(tuple(shape), generator=g) < p
    packed = pack_mask(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (m.numel() + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(m.reshape(-1).numpy()))
    back = unpack_mask(packed, m.shape)
    assert back.dtype == torch.bool and back.shape == m.shape
    assert torch.equal(back, m)


def test_unpack_checks_size():
    with pytest.raises(ValueError, match="bytes"):
        unpack_mask(torch.zeros(2, dtype=torch.uint8), (3, 7))


def test_mask_density():
    assert mask_density(torch.tensor([True, False, False, True])) == 0.5
    assert mask_density(torch.zeros(0, dtype=torch.bool)) == 0.0


def _taus(seed, n=3, shape=(7, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_mmer_masks_match_elementwise(lam):
    taus = _taus(1)
    taus[0, 0, :3] = 0.0
    star = _taus(2, n=1)[0]
    masks = mmer_masks(taus, star, lam)
    for i, m in enumerate(masks):
        for idx in np.ndindex(*taus.shape[1:]):
            t, s = float(taus[i][idx]), float(star[idx])
            assert bool(m[idx]) == (abs(t) > lam * abs(t - s))
    if lam == 0.0:
        for i, m in enumerate(masks):
            assert torch.equal(m, taus[i] != 0)


def test_tall_masks_match_elementwise():
    taus = _taus(3)
    mt = taus.sum(0)
    for lam in (0.3, 1.0):
        for i, m in enumerate(tall_masks(taus, mt, lam)):
            assert torch.equal(m, torch.tensor([[abs(float(taus[i, a, b])) >= lam * abs(float(mt[a, b] - taus[i, a, b]))
                                                 for b in range(taus.shape[2])] for a in range(taus.shape[1])]))
    z = torch.zeros(2, 3)
    assert tall_masks([z, z], z, 1.0)[0].all()  # 0 >= 0, as written
    assert not tall_masks([z, z], z, 1.0, nonzero_only=True)[0].any()


def test_topk_keep_mask_count_and_values():
    tau = _taus(4, n=1, shape=(10, 10))[0]
    m = topk_keep_mask(tau, 0.2)
    assert int(m.sum()) == 20
    assert tau.abs()[m].min() > tau.abs()[~m].max()


def test_ties_keep_masks_direct():
    taus = _taus(5)
    keeps = ties_keep_masks(taus, 0.5)
    trimmed = torch.stack([torch.where(topk_keep_mask(t, 0.5), t, torch.zeros(())) for t in taus])
    gamma = torch.sign(trimmed.sum(0))
    for i, k in enumerate(keeps):
        want = (trimmed[i] != 0) & (torch.sign(trimmed[i]) == gamma)
        assert torch.equal(k, want)


def test_dare_keep_mask_seeded_and_statistics():
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (7, 7, 8))
    a, b, c = (dare_keep_mask((200, 300), 0.3, g) for g in (g1, g2, g3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    n = a.numel()
    # binomial(n, 0.7): 6 standard deviations
    assert abs(int(a.sum()) - 0.7 * n) < 6 * (n * 0.7 * 0.3) ** 0.5
    assert dare_keep_mask((5, 5), 0.0, torch.Generator().manual_seed(0)).all()
    with pytest.raises(ValueError):
        dare_keep_mask((2,), 1.0)


def test_dare_keep_mask_is_peft_random_pruning_mask():
    """peft's ``random_pruning`` draws ``torch.bernoulli(full_like(t, density))`` from the global RNG;
    our mask with a generator seeded alike is the same draw (density = 1 - p)."""
    from peft.utils.merge_utils import random_pruning

    torch.manual_seed(11)
    ref = random_pruning(torch.ones(40, 50), density=0.75, rescale=False) != 0
    got = dare_keep_mask((40, 50), 0.25, torch.Generator().manual_seed(11))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.2, 0.25, 0.5, 0.9, 1 / 3])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (300, 257)])
def test_dare_keep_mask_cpu_is_the_bernoulli_draw(shape, p):
    """The CPU fast path (``rand < 1 - p``) is bit-identical to ``torch.bernoulli(full(shape, 1 - p))``
    and leaves the generator in the same state (guards a torch upgrade)."""
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    want = torch.bernoulli(torch.full(shape, 1.0 - p), generator=g1).to(torch.bool)
    assert torch.equal(dare_keep_mask(shape, p, g2), want)
    assert torch.equal(torch.rand(9, generator=g1), torch.rand(9, generator=g2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.999])
def test_topk_keep_mask_equals_kthvalue_definition(dtype, density):
    g = torch.Generator().manual_seed(3)
    tau = torch.randn(37, 53, generator=g).to(dtype)
    tau[tau.abs() < 0.3] = 0  # zeros and repeated magnitudes
    tau[:3] = tau[3:6].round(decimals=1)
    flat = tau.reshape(-1).abs()
    n = flat.numel()
    k = max(1, min(n, int(round(density * n))))
    t = torch.kthvalue(flat, n - k + 1).values if k < n else torch.zeros((), dtype=dtype)
    assert torch.equal(topk_keep_mask(tau, density), (tau.abs() >= t) & (tau != 0))
    from workbench.merging.masks import kth_largest
    for kk in (1, 2, k, n):
        assert kth_largest(flat, kk) == float(torch.kthvalue(flat, n - kk + 1).values)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pack_roundtrip_cuda():
    m = torch.rand(33, 17, device="cuda") > 0.5
    assert torch.equal(unpack_mask(pack_mask(m), m.shape), m)
    assert torch.equal(pack_mask(m).cpu(), pack_mask(m.cpu()))


def test_kth_largest_radix_path_equals_numpy_partition():
    """``kth_largest`` on a large non-negative float32 tensor (the TIES trim's |tau|) takes the radix
    select and returns numpy.partition's value; signed values, -0.0 and float64 take numpy.partition."""
    import numpy as np
    from workbench.merging.masks import RADIX_MIN, kth_largest

    g = torch.Generator().manual_seed(5)
    n = RADIX_MIN * 3 + 17
    x = (torch.randn(n, generator=g) * 3).round() / 3  # many ties
    cases = {"abs": x.abs(), "signed": x, "neg_zero": torch.where(x == 0, torch.tensor(-0.0), x.abs()),
             "f64": x.abs().double(), "zeros": torch.zeros(n)}
    for name, t in cases.items():
        before = t.clone()
        a = t.numpy()
        for k in (1, 2, n // 5, n // 2, n - 1, n):
            want = float(np.partition(a, n - k)[n - k])
            assert kth_largest(t, k) == want, (name, k)
        assert torch.equal(t, before)  # never modified
