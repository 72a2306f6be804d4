"""Merge methods against peft's merge_utils, closed forms, autograd and properties.

Where the identity "identical experts -> that expert" holds (and is tested): weight_average,
ties / mmer with density 1, wudi and optmerge with the exact solver (and optmerge at full rank),
tsv with one expert. It does NOT hold for task_arithmetic (N * tau), DARE (random drop), iso_c /
iso_cts (isotropic spectrum), nor for the iterative wudi / optmerge (300 small steps from
sum / mean init).
"""
from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.errors import ConfigError
from workbench.io.packing import unpack_mask
from workbench.merging import (METHODS, MergeOutput, OPTMERGE_PRESETS, Targets, dare_drop, dare_keep, get_method,
                               global_trim_thresholds,
                               iso_c_merge_tau, iso_cts_merge_tau, optmerge, optmerge_batched, quadratic_merge_loss,
                               mmer_masks, ties, ties_merge_tau, trim_topk, tsv_merge_tau, wudi,
                               wudi_batched)

torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def setup(seed=0, n=3, shape=(6, 10), std=0.1):
    g = gen(seed)
    base = torch.randn(*shape, generator=g)
    experts = [base + std * torch.randn(*shape, generator=g) for _ in range(n)]
    return base, experts


def merged_of(out):
    return out.merged if isinstance(out, MergeOutput) else out


def run(name, base, experts, seed=0, **params):
    spec = get_method(name)
    return merged_of(spec.fn(base, experts, name="t", generator=gen(seed), **spec.check_params(params)))


# ----------------------------------------------------------------------------------------- registry
def test_registry_names_and_unknown_method():
    want = {"weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv", "iso_c", "iso_cts",
            "wudi", "optmerge", "mmer"}
    assert want <= set(METHODS)
    with pytest.raises(ConfigError, match="known: .*ties"):
        get_method("nope")


def test_registry_order_display_names_and_citations():
    """Every family file registers its methods with a display name and a citation; the order is the
    families' (linear, TIES/DARE, SVD, quadratic, MMER), and the tables' row labels are the display names."""
    from workbench.studies.merging_benchmark import CAP_METHODS, MODALITY_METHODS, method_label
    from workbench.merging import merge_method

    assert list(METHODS) == ["weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv", "iso_c",
                             "iso_cts", "wudi", "optmerge", "mmer"]
    for name, spec in METHODS.items():
        assert spec.name == name and spec.pretty_name.strip() and spec.doc.strip(), name
        assert "arXiv:" in spec.reference and " et al., " in spec.reference, name
    for name in ("wudi", "optmerge"):  # the official code the implementation follows (docs/METHODS.md)
        assert "github.com/WalkerWorldPeace/MLLMerging" in METHODS[name].reference
    for name in (*CAP_METHODS, *MODALITY_METHODS):
        assert method_label(name) == METHODS[name].pretty_name
    assert [method_label(c) for c in ("naive_mc", "damc")] == ["NaiveMC", "DAMC"]
    with pytest.raises(ConfigError, match="registered twice"):
        merge_method("ties", "TIES again", "-", doc="-")(lambda base, experts: base)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_check_params_unknown_and_defaults(name):
    spec = METHODS[name]
    assert spec.check_params({}) == spec.defaults
    assert "scale" in spec.defaults
    with pytest.raises(ConfigError, match=r"'bogus'.*valid: .*scale"):
        spec.check_params({"bogus": 1})


def test_check_params_choices():
    with pytest.raises(ConfigError, match="solver"):
        METHODS["wudi"].check_params({"solver": "magic"})
    with pytest.raises(ConfigError, match="preset"):
        METHODS["optmerge"].check_params({"preset": "x"})
    assert METHODS["ties"].check_params({"trim": "global"})["trim"] == "global"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_scale_zero_gives_base_and_inputs_untouched(name):
    base, experts = setup(1)
    copies = [base.clone(), *[e.clone() for e in experts]]
    out = run(name, base, experts, scale=0.0)
    assert out.dtype == torch.float32 and out.shape == base.shape
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    for a, b in zip(copies, [base, *experts]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_non_2d_tensors_finite_and_shaped(name):
    base, experts = setup(2, shape=(12,))
    out = run(name, base, experts)
    assert out.shape == base.shape and torch.isfinite(out).all()
    if name in ("tsv", "iso_c", "iso_cts", "wudi", "optmerge"):  # averaged, as the papers
        torch.testing.assert_close(out, base + torch.stack([e - base for e in experts]).mean(0))


# ----------------------------------------------------------------------------------------- peft
def test_task_arithmetic_matches_peft():
    """peft's ``task_arithmetic(taus, weights)`` = sum w_i tau_i; ours adds theta_0 and ``scale``."""
    from peft.utils.merge_utils import task_arithmetic as peft_ta

    base, experts = setup(3)
    taus = [e - base for e in experts]
    w = [0.5, 1.0, 2.0]
    want = base + peft_ta(taus, torch.tensor(w))
    torch.testing.assert_close(run("task_arithmetic", base, experts, weights=w), want)


def test_magnitude_prune_matches_peft():
    """peft's ``prune(..., "magnitude")`` keeps ``int(density * numel)`` entries by ``topk``; ours
    ``round(density * numel)`` with ties at the threshold kept: the same for 60 * 0.25 = 15 and
    distinct magnitudes."""
    from peft.utils.merge_utils import prune

    tau = torch.randn(6, 10, generator=gen(4))
    torch.testing.assert_close(trim_topk(tau, 0.25), prune(tau, 0.25, "magnitude"), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_peft(density):
    """Same semantics once aligned: weights = 1 (ours has no per-expert weights, only ``scale``
    outside the disjoint mean), ``majority_sign_method="total"`` (ours: sign of the sum of the
    trimmed vectors). Differences, not exercised here: peft elects +1 where the sum is exactly 0
    (ours elects 0 and keeps nothing there) and peft's trim keeps ``int(density*numel)`` by topk.
    peft warns and skips pruning at density 1, as ours keeps every non-zero entry."""
    from peft.utils.merge_utils import ties as peft_ties

    base, experts = setup(5, n=4, shape=(5, 8))
    taus = [e - base for e in experts]
    want = peft_ties(taus, torch.ones(4), density, majority_sign_method="total")
    got = run("ties", base, experts, density=density, scale=1.0)
    torch.testing.assert_close(got - base, want, rtol=1e-6, atol=1e-7)
    # and the scale multiplies the disjoint mean (peft's weights would act inside the mean)
    torch.testing.assert_close(run("ties", base, experts, density=density, scale=0.5) - base, 0.5 * want,
                               rtol=1e-6, atol=1e-7)


def _peft_with_our_masks(monkeypatch, shape, n, p, seed):
    """peft draws its DARE masks with ``torch.bernoulli`` per task vector, in order; ours are the
    counter-based draw (:func:`dare_keep`). Hand peft our masks, in expert order, so that its own
    arithmetic (``tau * mask / density``, the sum or the sign election) can be compared bit for bit."""
    masks = iter(dare_keep(shape, n, p, gen(seed)).unbind(0))
    def ours(probs, *a, **k):
        m = next(masks)
        assert tuple(m.shape) == tuple(probs.shape) and torch.all(probs == 1 - p)
        return m.to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", ours)


def test_dare_linear_matches_peft_same_mask(monkeypatch):
    """Same mask (ours, handed to peft): peft's ``dare_linear`` (``tau * mask / (1-p)``, summed,
    peft >= 0.19) equals ours bit for bit."""
    from peft.utils.merge_utils import dare_linear as peft_dare

    base, experts = setup(6, shape=(20, 30))
    taus = [e - base for e in experts]
    _peft_with_our_masks(monkeypatch, (20, 30), 3, 0.3, 123)
    want = peft_dare(taus, torch.ones(3), density=0.7)
    got = run("dare_linear", base, experts, seed=123, drop_rate=0.3)
    torch.testing.assert_close(got - base, want, rtol=1e-6, atol=1e-7)


def test_dare_ties_matches_peft_without_trim(monkeypatch):
    """peft's ``dare_ties`` = DARE drop + rescale, then sign election and disjoint mean with no
    magnitude trim: ours with ``density = 1`` (our default 0.2 also trims, as methods.md reads TIES);
    the same masks handed to peft."""
    from peft.utils.merge_utils import dare_ties as peft_dare_ties

    base, experts = setup(7, shape=(20, 30))
    taus = [e - base for e in experts]
    _peft_with_our_masks(monkeypatch, (20, 30), 3, 0.2, 5)
    want = peft_dare_ties(taus, torch.ones(3), density=0.8, majority_sign_method="total")
    got = run("dare_ties", base, experts, seed=5, drop_rate=0.2, density=1.0)
    torch.testing.assert_close(got - base, want, rtol=1e-6, atol=1e-7)


def test_dare_keep_is_distributed_as_peft_draw():
    """The counter-based keep mask against peft's ``bernoulli(1 - p)`` draw, distributionally: keep
    rates within 6 sigma of ``1 - p`` for both, experts and neighbouring entries uncorrelated
    (|r| < 6 / sqrt(n)); a different seed gives a different mask."""
    n, p = 200_000, 0.3
    ours = dare_keep((n,), 3, p, gen(0))
    peft = torch.bernoulli(torch.full((3, n), 1 - p), generator=gen(0))
    sigma = math.sqrt(p * (1 - p) / n)
    for m in (ours, peft):
        assert (m.mean(1) - (1 - p)).abs().max() < 6 * sigma
    r = torch.corrcoef(ours)
    assert (r - torch.eye(3)).abs().max() < 6 / math.sqrt(n)
    lag = torch.corrcoef(torch.stack([ours[0, :-1], ours[0, 1:]]))[0, 1]
    assert abs(float(lag)) < 6 / math.sqrt(n)
    assert not torch.equal(ours, dare_keep((n,), 3, p, gen(1)))


def test_dare_statistics():
    """Deterministic part and statistics of the drop: kept entries are exactly tau / (1-p); the
    kept fraction is 1 - p within 6 sigma; the mean over many seeds approaches tau."""
    tau = torch.randn(100, 100, generator=gen(8))
    d = dare_drop(tau, 0.4, gen(1))
    kept = d != 0
    torch.testing.assert_close(d[kept], tau[kept] / 0.6)
    n = tau.numel()
    assert abs(int(kept.sum()) - 0.6 * n) < 6 * (n * 0.24) ** 0.5
    mean = torch.stack([dare_drop(tau, 0.4, gen(s)) for s in range(200)]).mean(0)
    # per-entry std of the mean: |tau| sqrt(p/(1-p)/200) ~ 0.058 |tau|; check the average error
    assert ((mean - tau).abs().mean() / tau.abs().mean()) < 0.1


# ----------------------------------------------------------------------------------------- closed forms
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), m=st.integers(1, 6), k=st.integers(1, 6))
def test_identical_experts_give_that_expert(seed, n, m, k):
    base, experts = setup(seed, n=1, shape=(m, k))
    same = [experts[0].clone() for _ in range(n)]
    for name, params in [("weight_average", {}), ("ties", {"density": 1.0}), ("mmer", {"density": 1.0})]:
        torch.testing.assert_close(run(name, base, same, **params), experts[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 5), (4, 10)])
def test_identical_experts_exact_solvers(shape):
    base, experts = setup(9, n=1, shape=shape)
    same = [experts[0].clone() for _ in range(3)]
    torch.testing.assert_close(run("wudi", base, same, solver="exact"), experts[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run("optmerge", base, same, solver="exact", k_ratio=1.0), experts[0],
                               rtol=1e-4, atol=1e-5)


def test_ties_density_one_without_conflicts_is_mean():
    g = gen(10)
    base = torch.randn(7, 9, generator=g)
    sign = torch.sign(torch.randn(7, 9, generator=g))
    taus = [sign * torch.rand(7, 9, generator=g) for _ in range(3)]
    out = run("ties", base, [base + t for t in taus], density=1.0)
    torch.testing.assert_close(out - base, torch.stack(taus).mean(0), rtol=1e-5, atol=1e-6)


def test_dare_drop_zero_is_task_arithmetic():
    base, experts = setup(11)
    ta = run("task_arithmetic", base, experts)
    assert torch.equal(run("dare_linear", base, experts, drop_rate=0.0), ta)
    torch.testing.assert_close(run("dare_ties", base, experts, drop_rate=0.0, density=0.3),
                               run("ties", base, experts, density=0.3))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_seeding(name):
    base, experts = setup(12, shape=(16, 16))
    a, b, c = (run(name, base, experts, seed=s) for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert METHODS[name].needs_generator


def test_iso_c_singular_values_equal():
    base, experts = setup(13, shape=(9, 14))
    taus = torch.stack([e - base for e in experts])
    s = torch.linalg.svdvals(run("iso_c", base, experts) - base)
    s_sum = torch.linalg.svdvals(taus.sum(0))
    torch.testing.assert_close(s, torch.full_like(s, float(s_sum.mean())), rtol=1e-4, atol=1e-6)


def test_iso_cts_isotropic_and_reduces_to_iso_c():
    base, experts = setup(14, n=3, shape=(12, 20))
    taus = torch.stack([e - base for e in experts])
    out = iso_cts_merge_tau(taus, 0.8)
    s = torch.linalg.svdvals(out)
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), rtol=1e-4, atol=1e-6)
    # all of the budget common -> Iso-C
    torch.testing.assert_close(iso_cts_merge_tau(taus, 1.0), iso_c_merge_tau(taus), rtol=1e-4, atol=1e-5)
    # the task-specific part adds directions outside the common subspace: differs from Iso-C
    assert not torch.allclose(out, iso_c_merge_tau(taus), atol=1e-3)


def test_tsv_one_expert_full_rank_is_tau():
    base, experts = setup(15, n=1, shape=(7, 11))
    torch.testing.assert_close(run("tsv", base, experts), experts[0], rtol=1e-4, atol=1e-5)


def test_tsv_orthogonal_tasks_sum():
    """Task vectors on disjoint row and column blocks: U_cat and V_cat are already orthonormal,
    so TSV-M is the plain sum (each tau_i of rank <= r = 8 / 2)."""
    g = gen(16)
    t1, t2 = torch.zeros(8, 8), torch.zeros(8, 8)
    t1[:4, :4] = torch.randn(4, 4, generator=g)
    t2[4:, 4:] = torch.randn(4, 4, generator=g)
    torch.testing.assert_close(tsv_merge_tau(torch.stack([t1, t2])), t1 + t2, rtol=1e-4, atol=1e-5)


def test_tsv_spectrum_is_concatenated_singular_values():
    """U_perp and V_perp have orthonormal columns, so the singular values of TSV-M's tau_m are exactly
    the concatenated top-r singular values of the tasks (N r <= min(m, n)); without the whitening
    they would not be."""
    base, experts = setup(29, n=3, shape=(9, 13))
    taus = torch.stack([e - base for e in experts])
    r = 9 // 3
    want = torch.cat([torch.linalg.svdvals(t)[:r] for t in taus]).sort(descending=True).values
    got = torch.linalg.svdvals(run("tsv", base, experts) - base)[: 3 * r]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _iso_cts_numpy(taus, frac):
    """Iso-CTS written out step by step in numpy (the paper's Algorithm: common subspace of the sum,
    task-specific directions of each tau_t projected out of it, orthogonalise, isotropic)."""
    import numpy as np

    T = [t.double().numpy() for t in taus]
    N, (m, n) = len(T), T[0].shape
    q = min(m, n)
    k = int(q * frac)
    k = q - N * int(round((q - k) / N))
    s = (q - k) // N
    U, S, Vt = np.linalg.svd(sum(T), full_matrices=False)
    Uc, Sc, Vc = U[:, :k], S[:k], Vt[:k].T
    cols_u, vals, cols_v = [Uc], [Sc], [Vc]
    for t in T:
        resid = (np.eye(m) - Uc @ Uc.T) @ t
        u, sv, vt = np.linalg.svd(resid, full_matrices=False)
        cols_u.append(u[:, :s]); vals.append(sv[:s]); cols_v.append(vt[:s].T)

    def polar(M):
        p, _, qt = np.linalg.svd(M, full_matrices=False)
        return p @ qt

    return torch.from_numpy(polar(np.hstack(cols_u)) * np.concatenate(vals).mean() @ polar(np.hstack(cols_v)).T)


@pytest.mark.parametrize("shape", [(10, 24), (24, 10)])
def test_iso_cts_matches_step_by_step_reference(shape):
    base, experts = setup(30, n=3, shape=shape)
    taus = torch.stack([e - base for e in experts])
    want = _iso_cts_numpy(taus, 0.8)
    torch.testing.assert_close(run("iso_cts", base, experts) - base, want.float(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- WUDI / OptMerge
def ref_loss(tau_m: torch.Tensor, taus: torch.Tensor, k=None) -> torch.Tensor:
    """The objective written out term by term (independent of the library's block form). ``k``:
    None (WUDI), an int (truncated targets, rank-k P) or a :class:`workbench.merging.Targets`."""
    if isinstance(k, Targets):
        k, target, projection = k.k, k.target, k.projection
    else:
        target, projection = "truncated", "rank_k"
    total = tau_m.new_zeros(())
    mean = taus.mean(0)
    for t in taus:
        w = 1.0 / t.pow(2).sum()
        if k is None:
            T, P = t, t
        else:
            U, S, Vh = torch.linalg.svd(t, full_matrices=False)
            P = torch.diag(S[:k]) @ Vh[:k] if projection == "rank_k" else t
            if target == "truncated":
                T = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
            else:
                Uc, Sc, Vhc = torch.linalg.svd(t - mean, full_matrices=False)
                T = Uc[:, :k] @ torch.diag(Sc[:k]) @ Vhc[:k] + mean
        total = total + w * ((tau_m - T) @ P.T).pow(2).sum()
    return total


def grad_at(tau_m, taus, k=None):
    x = tau_m.detach().clone().double().requires_grad_(True)
    ref_loss(x, taus.double(), k).backward()
    return x.grad


@pytest.mark.parametrize("shape, n", [((6, 10), 3), ((10, 6), 2), ((2, 10), 3)])  # last: singular -> ridge
def test_wudi_exact_gradient_zero(shape, n):
    base, experts = setup(17, n=n, shape=shape)
    taus = torch.stack([e - base for e in experts])
    tau_m = run("wudi", base, experts, solver="exact") - base
    g_sol, g_init = grad_at(tau_m, taus), grad_at(taus.sum(0), taus)
    assert g_sol.norm() < 1e-4 * g_init.norm()


def test_optmerge_exact_gradient_zero():
    base, experts = setup(18, n=3, shape=(9, 12))
    taus = torch.stack([e - base for e in experts])
    k = 9 // 3
    tau_m = run("optmerge", base, experts, solver="exact", target="truncated") - base
    g_sol, g_init = grad_at(tau_m, taus, k), grad_at(taus.sum(0), taus, k)
    assert g_sol.norm() < 1e-4 * g_init.norm()
    torch.testing.assert_close(quadratic_merge_loss(tau_m, taus, k).double(), ref_loss(tau_m, taus, k).double(),
                               rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name", ["wudi", "optmerge"])
@pytest.mark.parametrize("solver", ["iterative", "exact"])
def test_zero_task_vector_gets_zero_weight(name, solver):
    """An expert equal to the base has ||tau|| = 0: weight 0 (not inf); all-zero -> the base."""
    base, experts = setup(31, n=2, shape=(6, 9))
    # truncated targets: centred ones depend on the mean over all experts, the zero one included
    kw = {"target": "truncated"} if name == "optmerge" else {}
    out = run(name, base, [base.clone(), *experts], solver=solver, **kw)
    assert torch.isfinite(out).all()
    if solver == "exact":  # the zero expert drops out of the objective entirely (same init: the sum)
        torch.testing.assert_close(out, run(name, base, experts, solver="exact", **(
            {"k_ratio": 6 // 3 / 6, **kw} if name == "optmerge" else {})), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(name, base, [base.clone(), base.clone()], solver=solver), base)


def test_optmerge_full_rank_exact_equals_wudi_exact():
    base, experts = setup(19, n=3, shape=(8, 12))
    a = run("optmerge", base, experts, solver="exact", k_ratio=1.0)
    b = run("wudi", base, experts, solver="exact")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_iterative_loss_decreases_from_init():
    base, experts = setup(20, n=3, shape=(16, 24), std=0.01)
    taus = torch.stack([e - base for e in experts])
    tau_w = run("wudi", base, experts) - base
    assert ref_loss(tau_w, taus) < 0.99 * ref_loss(taus.sum(0), taus)
    k = 16 // 3
    tau_o = run("optmerge", base, experts) - base
    assert ref_loss(tau_o, taus, k) < 0.99 * ref_loss(taus.sum(0), taus, k)
    tau_l = run("optmerge", base, experts, preset="lora") - base
    assert ref_loss(tau_l, taus, k) < ref_loss(taus.mean(0), taus, k)


def test_wudi_adam_matches_torch_optim():
    """Our closed-form-gradient Adam against torch.optim.Adam on the autograd loss (lr raised so the
    steps matter)."""
    base, experts = setup(21, n=3, shape=(5, 7))
    taus = torch.stack([e - base for e in experts])
    x = taus.sum(0).clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        ref_loss(x, taus).backward()
        opt.step()
    got = run("wudi", base, experts, lr=1e-2, steps=40) - base
    torch.testing.assert_close(got, x.detach(), rtol=1e-4, atol=1e-5)


def test_optmerge_sgd_matches_torch_optim():
    base, experts = setup(22, n=2, shape=(6, 8))
    taus = torch.stack([e - base for e in experts])
    k = 3
    x = taus.mean(0).clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=1e-2, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        ref_loss(x, taus, k).backward()
        opt.step()
    got = run("optmerge", base, experts, preset="lora", lr=1e-2, steps=30) - base
    torch.testing.assert_close(got, x.detach(), rtol=1e-4, atol=1e-5)


def test_optmerge_presets():
    assert OPTMERGE_PRESETS["full_ft"]["optimizer"] == "adam" and OPTMERGE_PRESETS["full_ft"]["init"] == "sum"
    assert OPTMERGE_PRESETS["modality"]["k_ratio"] == 0.2 and OPTMERGE_PRESETS["modality"]["lr"] == 5e-2
    base, experts = setup(23)
    a = run("optmerge", base, experts, preset="lora")
    b = run("optmerge", base, experts, preset="full_ft", init="mean", optimizer="sgd", lr=1e-4, momentum=0.9,
            target="truncated")
    assert torch.equal(a, b)
    assert not torch.equal(a, run("optmerge", base, experts, preset="full_ft", init="mean", optimizer="sgd",
                                  lr=1e-4, momentum=0.9))  # full_ft's centred targets differ


@pytest.mark.parametrize("fn, bfn, params", [
    (wudi, wudi_batched, {}), (wudi, wudi_batched, {"solver": "exact"}),
    (optmerge, optmerge_batched, {}), (optmerge, optmerge_batched, {"solver": "exact"}),
    (optmerge, optmerge_batched, {"preset": "modality", "steps": 50}),
    (wudi, wudi_batched, {"lr": 1e-3, "steps": 50}),
])
@pytest.mark.parametrize("shape", [(6, 10), (12, 40)])  # Gram form / factored form of the gradient
def test_batched_equals_per_tensor(fn, bfn, params, shape):
    B, N = 3, 3
    g = gen(24)
    base = torch.randn(B, *shape, generator=g)
    experts = base[None] + 0.05 * torch.randn(N, B, *shape, generator=g)
    batched = bfn(base, experts, names=["a", "b", "c"], generators=None, **params)
    as_list = bfn(base, list(experts.unbind(0)), **params)
    assert torch.equal(batched, as_list)
    for b in range(B):
        single = fn(base[b], list(experts[:, b].unbind(0)), **params)
        torch.testing.assert_close(batched[b], single, rtol=1e-5, atol=1e-6)


def test_per_tensor_optimisation_speed():
    base, experts = setup(25, n=3, shape=(128, 384), std=0.01)
    wudi(base, experts, steps=5)  # warm-up
    t0 = time.perf_counter()
    wudi(base, experts)
    t_wudi = time.perf_counter() - t0
    t0 = time.perf_counter()
    optmerge(base, experts)
    t_opt = time.perf_counter() - t0
    assert t_wudi < 1.5 and t_opt < 1.5, (t_wudi, t_opt)


# ----------------------------------------------------------------------------------------- global trim, MMER
def test_global_trim_equals_ties_over_concatenation():
    """Global trim over two tensors = per-tensor TIES on their concatenation (k = 0.25 * 120 = 30,
    integral, so ceil and round agree)."""
    g = gen(26)
    t_a = torch.randn(3, 6, 10, generator=g)
    t_b = torch.randn(3, 4, 15, generator=g) * 0.5
    thr = global_trim_thresholds([t_a, list(t_b.unbind(0))], 0.25)
    flat = torch.cat([t_a.reshape(3, -1), t_b.reshape(3, -1)], 1)
    want = ties_merge_tau(flat, 0.25)
    base_a, base_b = torch.zeros(6, 10), torch.zeros(4, 15)
    got_a = ties(base_a, list(t_a.unbind(0)), trim="global", thresholds=thr)
    got_b = ties(base_b, list(t_b.unbind(0)), trim="global", thresholds=thr)
    torch.testing.assert_close(torch.cat([got_a.reshape(-1), got_b.reshape(-1)]), want)
    with pytest.raises(ConfigError, match="global"):
        ties(base_a, list(t_a.unbind(0)), trim="global")


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_mmer_output(lam):
    base, experts = setup(27, shape=(8, 9))
    taus = torch.stack([e - base for e in experts])
    out = METHODS["mmer"].fn(base, experts, density=0.3, lam=lam)
    assert isinstance(out, MergeOutput)
    star = ties_merge_tau(taus, 0.3)
    torch.testing.assert_close(out.merged, base + star)
    assert sorted(out.extras) == ["mask_0", "mask_1", "mask_2"]
    for i in range(3):
        m = out.extras[f"mask_{i}"]
        assert m.dtype == torch.bool
        assert torch.equal(m, taus[i].abs() > lam * (taus[i] - star).abs())
        if lam == 0.0:
            assert torch.equal(m, taus[i] != 0)
    packed = METHODS["mmer"].fn(base, experts, density=0.3, lam=lam, pack_masks=True)
    for i, m in enumerate(mmer_masks(taus, star, lam)):
        assert torch.equal(unpack_mask(packed.extras[f"mask_{i}"], m.shape), m)


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bfn", [wudi_batched, optmerge_batched])
@pytest.mark.parametrize("solver", ["iterative", "exact"])
def test_batched_cuda_matches_cpu(bfn, solver):
    g = gen(28)
    base = torch.randn(4, 64, 96, generator=g)
    experts = base[None] + 0.02 * torch.randn(3, 4, 64, 96, generator=g)
    cpu = bfn(base, experts, solver=solver)
    gpu = bfn(base.cuda(), experts.cuda(), solver=solver)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- fast paths = reference formulas
def _ties_reference(taus, density, thresholds=None):
    """The straightforward TIES (where-masks, kthvalue), as the methods were first written."""
    from workbench.merging import threshold_keep_mask, topk_keep_mask

    if thresholds is not None:
        keep = torch.stack([threshold_keep_mask(taus[i], thresholds[i]) for i in range(taus.shape[0])])
    else:
        keep = []
        for t in taus:
            flat = t.reshape(-1).abs()
            n = flat.numel()
            k = max(1, min(n, int(round(density * n))))
            keep.append(t != 0 if k == n else (t.abs() >= torch.kthvalue(flat, n - k + 1).values) & (t != 0))
        keep = torch.stack(keep)
    trimmed = torch.where(keep, taus, torch.zeros(()))
    gamma = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == gamma) & (trimmed != 0) & (gamma != 0)
    total = torch.where(agree, trimmed, torch.zeros(())).sum(0)
    return total / agree.sum(0).clamp_min(1).to(taus.dtype)


def _bits(x):
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
def test_ties_fast_path_is_bit_identical_to_reference(case, density):
    """Trim by selection + in-place elect/mean: the same bits (zeros' signs included) as the
    where-mask formulation, with repeated magnitudes, exact zeros, cancelling experts and -0.0."""
    from workbench.merging import ties_merge_tau

    g = torch.Generator().manual_seed(case)
    shape = [(37, 53), (1000,), (4, 5, 6), (64, 64)][case]
    N = 2 + case
    taus = torch.randn((N, *shape), generator=g)
    if case == 1:
        taus = (taus * 2).round() / 2  # many ties and zeros
    if case == 2:
        taus[1] = -taus[0]  # exact cancellations: gamma = 0
    taus[taus.abs() < 0.1] = -0.0
    base = torch.randn(shape, generator=g)
    base[0] = -0.0
    experts = [base + t for t in taus]
    want = _ties_reference(taus, density)
    got = ties_merge_tau(taus, density)
    assert torch.equal(_bits(got), _bits(want))
    stack = torch.stack([e - base for e in experts])
    want_full = base + 0.7 * _ties_reference(stack, density)
    assert torch.equal(_bits(run("ties", base, experts, density=density, scale=0.7)), _bits(want_full))
    thr = global_trim_thresholds([stack], density)
    want_g = base + _ties_reference(stack, density, thresholds=thr)
    assert torch.equal(_bits(run("ties", base, experts, trim="global", thresholds=thr)), _bits(want_g))


def test_dare_fast_paths_are_the_reference_draws():
    from workbench.merging import dare_linear, dare_ties

    g = torch.Generator().manual_seed(4)
    base = torch.randn(30, 40, generator=g)
    experts = [base + torch.randn(30, 40, generator=g) for _ in range(3)]
    taus = torch.stack([e - base for e in experts])
    from workbench.cpu_kernels import dare_draw, dare_keep_threshold, dare_keys

    keys = dare_keys(torch.Generator().manual_seed(9).initial_seed(), 3)
    for p in (0.0, 0.2, 0.5):
        # the reference draw: plain-integer hashes of (seed, expert, position), kernels.dare_draw
        p_int = dare_keep_threshold(p)
        keep = torch.tensor([[float(dare_draw(j, i, keys) >= p_int) for j in range(30 * 40)] for i in range(3)])
        dropped = torch.stack([t * keep[i].reshape(30, 40) / (1 - p) for i, t in enumerate(taus)])
        got = dare_ties(base, experts, drop_rate=p, density=0.3, generator=torch.Generator().manual_seed(9))
        assert torch.equal(_bits(got), _bits(base + _ties_reference(dropped, 0.3)))
        got = dare_linear(base, experts, drop_rate=p, generator=torch.Generator().manual_seed(9))
        assert torch.equal(_bits(got), _bits(base + dropped.sum(0)))


# ----------------------------------------------------------------------------------------- WUDI / OptMerge precision
# ``precision``: "fp32" (default) must be today's float32 solver bit for bit; "bf16" (bfloat16 per-step
# matmuls) must stay within the tolerance below of fp32. Measured on the CPU (50 steps; N = 2..4;
# shapes 32x48, 64x96, 48x160, 128x64, 96x24, 40x40; WUDI lr 1e-5 / 1e-3, OptMerge full_ft / lora /
# modality): tau_m relative Frobenius error <= 2.8e-3 (paper defaults <= 2.7e-4), objective
# difference <= 4.8e-5 of the objective at the initialisation (<= 3.0e-3 of fp32's own objective).
# The objective difference is taken relative to the objective at the initialisation because fp32's
# objective can reach ~0 (modality preset, K = N k < n: an exactly solvable system), where a ratio
# to it is meaningless. fp32 vs a float64 run of the same solver: ~1e-6.
BF16_TAU_RTOL = 1e-2
BF16_OBJ_RTOL = 1e-3

_PRECISION_CASES = [  # (method, params, N, m, n); forms: 96x24 modality and 48x160 full_ft are factored
    ("wudi", {}, 2, 32, 48),
    ("wudi", {"lr": 1e-3}, 3, 64, 96),
    ("wudi", {"lr": 1e-3}, 4, 40, 40),
    ("optmerge", {}, 3, 64, 96),
    ("optmerge", {}, 4, 48, 160),
    ("optmerge", {"preset": "lora"}, 3, 128, 64),
    ("optmerge", {"preset": "modality"}, 2, 96, 24),
    ("optmerge", {"preset": "modality"}, 4, 40, 40),
]


def _precision_inputs(N, m, n, seed=0, std=0.02, device="cpu"):
    g = gen(seed + 1000 * N + m + n)
    base = torch.randn(m, n, generator=g)
    experts = [base + std * torch.randn(m, n, generator=g) for _ in range(N)]
    return base.to(device), [e.to(device) for e in experts]


def _objective_rank(method, params, N, m, n):
    """The objective's :class:`Targets` (None for WUDI): k as the paper's rule, target and
    projection as the preset."""
    if method == "wudi":
        return None
    P = {**OPTMERGE_PRESETS[params.get("preset", "full_ft")], **params}
    r = P["k_ratio"]
    q = min(m, n)
    return Targets(max(1, q // N) if r is None else max(1, int(r * q + 1e-9)), P["target"], P["projection"])


def precision_gap(method, base, experts, *, precision="bf16", steps=50, **params) -> dict:
    """``precision`` against fp32 on the same inputs (any device): relative Frobenius error of the
    merged ``tau_m``, objective difference relative to the objective at the initialisation
    (``obj_rel_init``) and to fp32's objective (``obj_rel``); objectives in float64 on the CPU."""
    fn = get_method(method).fn
    N, (m, n) = len(experts), base.shape
    t32 = fn(base, experts, steps=steps, precision="fp32", **params) - base
    tlo = fn(base, experts, steps=steps, precision=precision, **params) - base
    taus = torch.stack([e - base for e in experts]).cpu().double()
    k = _objective_rank(method, params, N, m, n)
    init_sum = method == "wudi" or OPTMERGE_PRESETS[params.get("preset", "full_ft")]["init"] == "sum"
    L0 = ref_loss(taus.sum(0) if init_sum else taus.mean(0), taus, k)
    L32, Llo = ref_loss(t32.cpu().double(), taus, k), ref_loss(tlo.cpu().double(), taus, k)
    return {"tau_rel": float((tlo - t32).norm() / t32.norm()), "obj_rel_init": float((Llo - L32).abs() / L0),
            "obj_rel": float((Llo - L32).abs() / L32)}


def _fp32_reference(base, experts, k, init, optimizer, lr, steps, momentum=0.0):
    """The float32 iterative solver as it was before ``precision`` existed (its loop copied)."""
    from workbench.merging.quadratic import _init, _system

    taus = torch.stack([e - base for e in experts])[:, None]
    s = _system(taus, k)
    X = _init(taus, init).clone()
    if s.A is not None:
        def grad(X):
            return 2.0 * (torch.bmm(X, s.A) - s.C)
    else:
        Pt = s.Pp.transpose(-1, -2).contiguous()

        def grad(X):
            return 2.0 * torch.bmm(torch.bmm(X, Pt) - s.Rp, s.Pp)
    if optimizer == "adam":
        b1, b2 = 0.9, 0.999
        m1, v = torch.zeros_like(X), torch.zeros_like(X)
        for t in range(1, steps + 1):
            g = grad(X)
            m1.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            denom = (v.sqrt() / math.sqrt(bc2)).add_(1e-8)
            X.addcdiv_(m1, denom, value=-lr / bc1)
    else:
        buf = None
        for _ in range(steps):
            g = grad(X)
            if momentum:
                buf = g.clone() if buf is None else buf.mul_(momentum).add_(g)
                g = buf
            X.add_(g, alpha=-lr)
    return base + X[0]


@pytest.mark.parametrize("method, params, N, m, n", _PRECISION_CASES)
def test_precision_fp32_is_the_float32_solver_bit_for_bit(method, params, N, m, n):
    base, experts = _precision_inputs(N, m, n)
    k = _objective_rank(method, params, N, m, n)
    p = {"init": "sum", "optimizer": "adam", "lr": 1e-5, "momentum": 0.0} if method == "wudi" else \
        dict(OPTMERGE_PRESETS[params.get("preset", "full_ft")])
    p.update({kk: v for kk, v in params.items() if kk != "preset"})
    want = _fp32_reference(base, experts, k, p["init"], p["optimizer"], p["lr"], 30, p["momentum"])
    fn = get_method(method).fn
    assert torch.equal(fn(base, experts, steps=30, **params), want)
    assert torch.equal(fn(base, experts, steps=30, precision="fp32", **params), want)
    assert torch.equal(fn(base, experts, steps=30, precision="tf32", **params), want)  # no TF32 on the CPU


@pytest.mark.parametrize("method, params, N, m, n", _PRECISION_CASES)
def test_precision_bf16_within_tolerance_of_fp32(method, params, N, m, n):
    base, experts = _precision_inputs(N, m, n)
    gap = precision_gap(method, base, experts, **params)
    print(f"{method} {params} N={N} {m}x{n}: " + ", ".join(f"{key} {v:.1e}" for key, v in gap.items()))
    assert 0.0 < gap["tau_rel"] <= BF16_TAU_RTOL, gap  # > 0: bf16 really ran
    assert gap["obj_rel_init"] <= BF16_OBJ_RTOL, gap


@pytest.mark.parametrize("bfn, params", [(wudi_batched, {"lr": 1e-3}), (optmerge_batched, {}),
                                         (optmerge_batched, {"preset": "modality"})])
@pytest.mark.parametrize("shape", [(6, 10), (12, 40)])
def test_precision_bf16_batched_equals_per_tensor(bfn, params, shape):
    g = gen(41)
    base = torch.randn(2, *shape, generator=g)
    experts = base[None] + 0.05 * torch.randn(3, 2, *shape, generator=g)
    batched = bfn(base, experts, steps=40, precision="bf16", **params)
    fn = wudi if bfn is wudi_batched else optmerge
    for b in range(2):
        single = fn(base[b], list(experts[:, b].unbind(0)), steps=40, precision="bf16", **params)
        torch.testing.assert_close(batched[b], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["wudi", "optmerge"])
def test_precision_parameter_checked_and_exact_solver_ignores_it(name):
    spec = get_method(name)
    assert spec.defaults["precision"] == "fp32" and spec.choices["precision"] == ("fp32", "bf16", "tf32")
    with pytest.raises(ConfigError, match="precision"):
        spec.check_params({"precision": "fp16"})
    base, experts = setup(42, n=3, shape=(8, 12))
    with pytest.raises(ConfigError, match="precision"):
        spec.fn(base, experts, precision="fp16")
    with pytest.raises(ConfigError, match="precision"):
        spec.batched_fn(base[None], torch.stack(experts)[:, None], precision="half")
    exact = spec.fn(base, experts, solver="exact")
    for p in ("bf16", "tf32"):  # float64 build and solve whatever the precision
        assert torch.equal(spec.fn(base, experts, solver="exact", precision=p), exact)


def test_cuda_matmul_flags_restored():
    """The context manager sets the global CUDA matmul flags and restores them, also on an error
    (the flags can be set without a GPU); off CUDA it touches nothing."""
    from workbench.merging.quadratic import _cuda_matmul_flags

    m = torch.backends.cuda.matmul
    key = "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32"
    before, before_bf = getattr(m, key), m.allow_bf16_reduced_precision_reduction
    with _cuda_matmul_flags("tf32", torch.device("cuda")):
        assert getattr(m, key) in ("tf32", True)
    assert getattr(m, key) == before
    with pytest.raises(RuntimeError, match="boom"):
        with _cuda_matmul_flags("bf16", torch.device("cuda")):
            assert m.allow_bf16_reduced_precision_reduction is False
            raise RuntimeError("boom")
    assert m.allow_bf16_reduced_precision_reduction == before_bf
    for p in ("fp32", "bf16", "tf32"):
        with _cuda_matmul_flags(p, torch.device("cpu")):
            assert getattr(m, key) == before and m.allow_bf16_reduced_precision_reduction == before_bf
        with _cuda_matmul_flags("fp32", torch.device("cuda")):
            assert getattr(m, key) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("method, params, N, m, n", _PRECISION_CASES)
def test_precision_within_tolerance_of_fp32_on_cuda(method, params, N, m, n, precision):
    """The CPU tolerance on the GPU (cuBLAS bf16 / TF32 kernels); fp32 on CUDA vs the CPU as well."""
    base, experts = _precision_inputs(N, m, n, device="cuda")
    gap = precision_gap(method, base, experts, precision=precision, **params)
    print(f"cuda {precision} {method} {params} N={N} {m}x{n}: " + ", ".join(f"{key} {v:.1e}" for key, v in gap.items()))
    assert gap["tau_rel"] <= BF16_TAU_RTOL and gap["obj_rel_init"] <= BF16_OBJ_RTOL, gap
    cpu_base, cpu_experts = _precision_inputs(N, m, n)
    fn = get_method(method).fn
    torch.testing.assert_close(fn(base, experts, steps=50, **params).cpu(), fn(cpu_base, cpu_experts, steps=50, **params),
                               rtol=1e-4, atol=1e-5)
