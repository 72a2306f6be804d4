"""WUDI / OptMerge against small re-implementations written from the authors' code.

The references below were written here, independently, from reading the official merging code
of "Unifying MLLM Capabilities and Modalities via Model Merging" (github.com/WalkerWorldPeace/
MLLMerging): ``InternVL/internvl_chat/model_merging.py::wudi_merging2`` (full fine-tuning),
``LLaMA-Factory/model_merging.py::wudi_merging2`` (LoRA) and
``ModelCompose/scripts/model_composition/ties_merging.py::wudi_merging2`` (modality merging).
They keep the code's way of computing (autograd on the written-out loss, ``torch.optim``, the
``m x n`` zero-padded ``S v`` of a full SVD as ``P_i``) in float32, without its dtype casts.
The exact solve is checked by optimality (``X A = C``), by where it puts the part of the
initialisation outside the span of the ``P_i``, and against a long iterative run.
"""
from __future__ import annotations

import json

import pytest
import torch

from workbench.engine import merge_with_report
from workbench.io import CheckpointReader
from workbench.merging import CONVERGED_GRAD_RATIO, get_method, objective_report, optmerge, wudi


def _experts(seed: int, N: int, m: int, n: int, std: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=g)
    return base, [base + std * torch.randn(m, n, generator=g) for _ in range(N)]


def _trunc(t: torch.Tensor, k: int) -> torch.Tensor:
    u, s, v = torch.linalg.svd(t, full_matrices=False)
    return u[:, :k] @ torch.diag_embed(s[:k]) @ v[:k, :]


def _padded_sv(t: torch.Tensor, k: int) -> torch.Tensor:
    """The InternVL / LLaMA-Factory ``P_i``: ``S_matrix @ v`` of a full SVD with all but the top
    k singular values and rows of ``v`` masked to 0 (an ``m x n`` matrix)."""
    u, s, v = torch.linalg.svd(t, full_matrices=True)
    s = s * (torch.arange(s.shape[0]) < k)
    v = v * (torch.arange(v.shape[0]) < k)[:, None]
    S = torch.zeros(t.shape, dtype=t.dtype)
    q = min(t.shape)
    S[:q, :q] = torch.diag_embed(s)
    return S @ v


def official(taus: torch.Tensor, preset: str, lr: float | None = None, steps: int = 300) -> torch.Tensor:
    """OptMerge's merged task vector as the authors' ``wudi_merging2`` computes it (float32)."""
    N, m, n = taus.shape
    mean = taus.mean(0)
    if preset == "full_ft":  # InternVL: demeaned SVD targets, uncentred S_k V_k^T, init sum, Adam 1e-5
        k = int(min(m, n) / N)
        P = torch.stack([_padded_sv(t, k) for t in taus])
        T = torch.stack([_trunc(t - mean, k) + mean for t in taus])
        X = torch.nn.Parameter(taus.sum(0).clone())
        opt = torch.optim.Adam([X], lr=1e-5 if lr is None else lr)
    elif preset == "lora":  # LLaMA-Factory: plain truncation, init mean, SGD 1e-4 momentum 0.9
        k = int(min(m, n) / N)
        P = torch.stack([_padded_sv(t, k) for t in taus])
        T = torch.stack([_trunc(t, k) for t in taus])
        X = torch.nn.Parameter(mean.clone())
        opt = torch.optim.SGD([X], lr=1e-4 if lr is None else lr, momentum=0.9)
    else:  # ModelCompose: rank min(m,n)/5 targets, the full task vectors as P, SGD 5e-2 momentum 0.9
        k = int(min(m, n) / 5)
        P = taus
        T = torch.stack([_trunc(t, k) for t in taus])
        X = torch.nn.Parameter(mean.clone())
        opt = torch.optim.SGD([X], lr=5e-2 if lr is None else lr, momentum=0.9)
    norms = torch.square(torch.norm(taus.reshape(N, -1), p=2, dim=-1))
    for _ in range(steps):
        inner = torch.matmul(X.unsqueeze(0) - T, P.transpose(1, 2))
        loss = torch.sum(torch.square(inner) / norms[:, None, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return X.detach()


def _wudi_loop(taus: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """WUDI as the authors' ``wudi_merging``: init sum, Adam, the loss on the task vectors themselves."""
    N = taus.shape[0]
    X = torch.nn.Parameter(taus.sum(0).clone())
    opt = torch.optim.Adam([X], lr=lr)
    norms = torch.square(torch.norm(taus.reshape(N, -1), p=2, dim=-1))
    for _ in range(steps):
        loss = torch.sum(torch.square(torch.matmul(X.unsqueeze(0) - taus, taus.transpose(1, 2)))
                         / norms[:, None, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return X.detach()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# (N, m, n): m < n, m > n (down-projection-like), square
SHAPES = [(3, 12, 20), (2, 20, 12), (4, 16, 16)]


@pytest.mark.parametrize("N, m, n", SHAPES)
@pytest.mark.parametrize("preset, lr, steps", [
    ("full_ft", None, 300), ("lora", None, 300), ("modality", None, 300),
    ("full_ft", 1e-2, 100), ("lora", 5e-2, 100),  # raised lr: the iterate moves, so the targets matter
])
def test_presets_match_the_official_code(preset, lr, steps, N, m, n):
    base, experts = _experts(7, N, m, n)
    taus = torch.stack([e - base for e in experts])
    want = official(taus, preset, lr=lr, steps=steps)
    got = optmerge(base, experts, preset=preset, lr=lr, steps=steps) - base
    assert _rel(got, want) < 1e-4, _rel(got, want)


@pytest.mark.parametrize("N, m, n", SHAPES)
def test_wudi_matches_the_official_code(N, m, n):
    base, experts = _experts(8, N, m, n)
    taus = torch.stack([e - base for e in experts])
    for lr, steps in ((1e-5, 300), (1e-2, 100)):
        got = wudi(base, experts, lr=lr, steps=steps) - base
        assert _rel(got, _wudi_loop(taus, lr, steps)) < 1e-4


@pytest.mark.parametrize("preset, override", [("full_ft", {"target": "truncated"}),
                                              ("modality", {"projection": "rank_k"})])
def test_the_official_choices_matter(preset, override):
    """The centring (full_ft) and the full P_i (modality) change the result well beyond the
    tolerance above: the comparison can fail."""
    base, experts = _experts(9, 3, 12, 20)
    taus = torch.stack([e - base for e in experts])
    lr = 1e-2 if preset == "full_ft" else None
    want = official(taus, preset, lr=lr, steps=100)
    other = optmerge(base, experts, preset=preset, lr=lr, steps=100, **override) - base
    assert _rel(other, want) > 1e-2


# ------------------------------------------------------------------------------------ the exact solve
def _gram(taus: torch.Tensor, preset: str | None):
    """``A = sum_i w_i P_i^T P_i`` and ``C = sum_i w_i T_i P_i^T P_i`` (float64) from the
    reference's targets (``preset=None``: WUDI)."""
    taus = taus.double()
    N, m, n = taus.shape
    mean = taus.mean(0)
    A, C = torch.zeros(n, n, dtype=torch.float64), torch.zeros(m, n, dtype=torch.float64)
    for t in taus:
        w = 1.0 / t.pow(2).sum()
        if preset is None:
            T, P = t, t
        elif preset == "modality":
            T, P = _trunc(t, int(min(m, n) / 5)), t
        else:
            k = int(min(m, n) / N)
            P = _padded_sv(t, k)
            T = _trunc(t - mean, k) + mean if preset == "full_ft" else _trunc(t, k)
        A += w * P.T @ P
        C += w * T @ P.T @ P
    return A, C


@pytest.mark.parametrize("method, preset, N, m, n", [
    ("wudi", None, 2, 4, 12),             # N m < n: A singular
    ("optmerge", "full_ft", 3, 6, 18),    # N k = 6 < 18
    ("optmerge", "lora", 2, 20, 12),      # m > n, N k = 12 = n: A regular
    ("optmerge", "modality", 3, 5, 15),   # N m = 15 = n, rank k = 1 targets
])
def test_exact_solve_is_the_init_anchored_minimiser(method, preset, N, m, n):
    base, experts = _experts(10, N, m, n)
    taus = torch.stack([e - base for e in experts])
    params = {"solver": "exact"} if method == "wudi" else {"solver": "exact", "preset": preset}
    fn = get_method(method).fn
    X = (fn(base, experts, **params) - base).double()
    A, C = _gram(taus, preset)
    # optimality: X A = C
    assert float((X @ A - C).norm() / C.norm()) < 1e-5
    # outside span(P_i) X keeps the initialisation: X (I - A A^+) = X0 (I - A A^+)
    X0 = (taus.sum(0) if method == "wudi" or preset == "full_ft" else taus.mean(0)).double()
    proj_out = torch.eye(n, dtype=torch.float64) - A @ torch.linalg.pinv(A, hermitian=True)
    torch.testing.assert_close(X @ proj_out, X0 @ proj_out, rtol=0, atol=1e-5)
    # against the minimum-norm solution C A^+ (what a ridge gives): WUDI's and the modality
    # preset's P_i are the tau_i, whose rows span the initialisation's, so both coincide; the
    # rank-k P_i of full_ft span less than the rows of init = sum tau_i, and they differ
    min_norm = C @ torch.linalg.pinv(A, hermitian=True)
    if preset in ("full_ft", "lora") and N * (min(m, n) // N) < n:
        assert float((X0 @ proj_out).norm() / X0.norm()) > 0.1
        assert _rel(X, min_norm) > 0.1
    else:
        assert _rel(X, min_norm) < 1e-5


@pytest.mark.parametrize("method, preset", [("wudi", None), ("optmerge", "full_ft"), ("optmerge", "modality")])
def test_exact_solve_agrees_with_a_long_iterative_run(method, preset):
    """Gradient descent with momentum from the initialisation (torch.optim.SGD on the written-out
    loss, step 1/lambda_max, 3000 steps) converges to the exact solve, singular A included."""
    N, m, n = 3, 6, 18
    base, experts = _experts(11, N, m, n)
    taus = torch.stack([e - base for e in experts])
    A, C = _gram(taus, preset)
    X = torch.nn.Parameter(taus.sum(0).double() if method == "wudi" or preset == "full_ft"
                           else taus.mean(0).double())
    opt = torch.optim.SGD([X], lr=0.5 / float(torch.linalg.eigvalsh(A)[-1]), momentum=0.9)
    for _ in range(3000):
        loss = ((X @ A) * X).sum() - 2 * (X * C).sum()  # the objective up to a constant
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = {"solver": "exact"} if method == "wudi" else {"solver": "exact", "preset": preset}
    exact = get_method(method).fn(base, experts, **params) - base
    assert _rel(exact.double(), X.detach()) < 1e-4
    if method == "optmerge":  # the library's own iterative solver (scale-aware SGD), run long, lands there too
        long = optmerge(base, experts, preset=preset, optimizer="sgd", momentum=0.9, lr=0.5, lr_scale="relative",
                        steps=3000) - base
        assert _rel(long, exact) < 1e-3


def test_scale_aware_lr_moves_where_the_paper_setting_does_not():
    """Task vectors of RMS 0.1 (small-model scale): Adam at the paper's absolute lr 1e-5 moves each
    entry by at most 3e-3 in 300 steps and barely leaves the start; the relative lr reaches the
    exact objective. The report says which converged."""
    base, experts = _experts(12, 3, 16, 24, std=0.1)
    rep = {}
    for label, params in [("paper", {}), ("relative", {"lr_scale": "relative", "lr": 0.05}),
                          ("exact", {"solver": "exact"})]:
        merged = wudi(base, experts, **params)
        rep[label] = objective_report("wudi", base, experts, merged, params)
    assert rep["paper"]["objective_end"] > 0.5 * rep["paper"]["objective_start"]
    assert not rep["paper"]["converged"]
    assert rep["relative"]["objective_end"] < 1.01 * rep["exact"]["objective_end"]
    assert rep["exact"]["converged"] and rep["exact"]["grad_ratio"] < 1e-6


@pytest.mark.parametrize("method, params", [("wudi", {}), ("optmerge", {"preset": "full_ft"}),
                                            ("optmerge", {"preset": "modality"})])
def test_relative_lr_is_per_tensor_in_a_batch(method, params):
    """The batched solver scales each tensor's step by its own task vectors: a batch of two
    tensors of very different scale gives what each gives alone."""
    spec = get_method(method)
    tensors = [_experts(13, 3, 10, 14, std=0.1), _experts(14, 3, 10, 14, std=1e-3)]
    base = torch.stack([b for b, _ in tensors])
    experts = torch.stack([torch.stack([ex[i] for _, ex in tensors]) for i in range(3)])
    batched = spec.batched_fn(base, experts, lr_scale="relative", lr=0.5 if params.get("preset") == "modality"
                              else 0.1, steps=50, **params)
    for j, (b, ex) in enumerate(tensors):
        alone = spec.fn(b, ex, lr_scale="relative", lr=0.5 if params.get("preset") == "modality" else 0.1,
                        steps=50, **params)
        torch.testing.assert_close(batched[j], alone, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ the merge report
@pytest.mark.parametrize("params", [{"steps": 20}, {"solver": "exact", "preset": "lora"}])
def test_merge_report_has_per_tensor_objectives(params, tiny_llama, tiny_llama_experts, tmp_path):
    """workbench_merge.json carries, per 2-D tensor, the solver's objective start / end (computed
    on the solver's own system) - equal to objective_report's rebuild from the checkpoints."""
    out = tmp_path / "merged"
    rep = merge_with_report({"method": "optmerge", "base": str(tiny_llama),
                             "experts": [str(e) for e in tiny_llama_experts], "output": str(out),
                             "device": "cpu", "params": params}, progress=False)
    saved = json.loads((out / "workbench_merge.json").read_text())
    objectives = saved["objectives"]
    merged, base = CheckpointReader(out), CheckpointReader(tiny_llama)
    experts = [CheckpointReader(e) for e in tiny_llama_experts]
    two_d = [n for n in rep.merged if len(merged.info(n).shape) == 2]
    assert sorted(objectives) == sorted(two_d) and two_d
    for name, f in objectives.items():
        assert f["objective_end"] <= f["objective_start"] and f["solver"] == params.get("solver", "iterative")
        assert f["converged"] == (f["grad_ratio"] <= CONVERGED_GRAD_RATIO)
        b = base.get(name).float()
        again = objective_report("optmerge", b, [e.get(name).float() for e in experts], merged.get(name).float(),
                                 params)
        assert f["objective_start"] == pytest.approx(again["objective_start"], rel=1e-6)
        assert f["objective_end"] == pytest.approx(again["objective_end"], rel=1e-3, abs=1e-9 * f["objective_start"])
        if params.get("solver") == "exact":
            assert f["converged"] and again["converged"]
    s = saved["objective_summary"]
    assert s["n_tensors"] == len(objectives)
    assert s["objective_end_total"] == pytest.approx(sum(f["objective_end"] for f in objectives.values()))
    assert rep.objectives == objectives


def test_merge_report_same_on_the_batched_path(tiny_llama, tiny_llama_experts, tmp_path, monkeypatch):
    """The GPU path (same-shape tensors solved as one batch) reports each tensor's own facts."""
    from workbench import engine

    def run(out, batched):
        monkeypatch.setattr(engine, "use_batched", lambda spec, device: batched)
        return merge_with_report({"method": "wudi", "base": str(tiny_llama), "device": "cpu",
                                  "experts": [str(e) for e in tiny_llama_experts], "output": str(out),
                                  "params": {"steps": 20, "lr": 1e-3}, "batch_size": 3}, progress=False).objectives

    per_tensor, batched = run(tmp_path / "a", False), run(tmp_path / "b", True)
    assert sorted(per_tensor) == sorted(batched) and per_tensor
    for name, f in per_tensor.items():
        for key in ("objective_start", "objective_end", "grad_ratio"):
            assert batched[name][key] == pytest.approx(f[key], rel=1e-4), (name, key)
