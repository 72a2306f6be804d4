"""The compiled CPU merges (workbench.merging.kernels, .thresholds) against the torch methods (the reference):
bit-identical outputs and TIES thresholds on random shapes, dtypes, zeros and ties at the threshold;
the global trim against merging.global_trim_thresholds (torch.kthvalue); the engine's compiled output
folder against its torch output folder; non-finite inputs named."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import state_dict_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from workbench.cpu_kernels import dare_keys
from workbench.engine import merge_with_report, tensor_generator, tensor_seed
from workbench.errors import CheckpointError
from workbench.merging import dare_keep, get_method, kth_largest
from workbench.merging import global_trim_thresholds as torch_global_thresholds
from workbench.merging import kernels as MK
from workbench.merging import thresholds as TH

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CASES = [("weight_average", {}), ("weight_average", {"scale": 0.7, "weights": [0.5, 0.3, 0.9, 0.1, 0.2]}),
         ("task_arithmetic", {}), ("task_arithmetic", {"scale": 0.4}), ("ties", {"density": 0.2}),
         ("ties", {"density": 0.55, "scale": 1.3}), ("dare_linear", {"drop_rate": 0.3}),
         ("dare_ties", {"drop_rate": 0.2, "density": 0.3}), ("dare_ties", {"drop_rate": 0.5, "density": 1.0})]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _inputs(seed: int, shape: tuple, n: int, dtype: torch.dtype, zeros: float, grid: bool):
    """Base and ``n`` experts in ``dtype``; a ``zeros`` fraction of each task vector exactly 0 (the
    expert equals the base there); with ``grid`` the task vectors take few distinct magnitudes, so
    many entries tie at the TIES threshold."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    experts = []
    for _ in range(n):
        tau = torch.randn(shape, generator=g) * 0.05
        if grid:
            tau = torch.round(tau * 40) / 40
        tau[torch.rand(shape, generator=g) < zeros] = 0.0
        experts.append(torch.where(tau == 0, base, (base.float() + tau).to(dtype)))
    return base, experts


def _torch_merge(method, params, base, experts, dtype, name="t"):
    spec = get_method(method)
    p = spec.check_params(params)
    return spec.fn(base.float(), [e.float() for e in experts], name=name, generator=tensor_generator(0, name),
                   **p).to(dtype)


def _compiled_merge(method, params, base, experts, dtype, name="t", pool=None, workers=1):
    spec = get_method(method)
    s = MK.merge_settings(method, spec.check_params(params), len(experts), None)
    parts = []
    ok = MK.merge_tensor(s, base, experts, dtype, tensor_seed(0, name), lambda x: parts.append(x.clone()),
                         pool=pool, workers=workers)
    assert all(p.numel() <= MK.CHUNK_ENTRIES for p in parts)
    return ok, torch.cat(parts).reshape(base.shape) if parts else torch.empty(base.shape, dtype=dtype)


def _case_params(params: dict, n: int) -> dict:
    if "weights" in params:
        return {**params, "weights": params["weights"][:n]}
    return params


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), dtype=st.sampled_from(DTYPES), n=st.integers(1, 3),
       shape=st.sampled_from([(1,), (7,), (3, 5), (17, 13), (64, 31), (5, 2, 9)]),
       zeros=st.sampled_from([0.0, 0.3, 1.0]), grid=st.booleans(), seed=st.integers(0, 10 ** 6))
def test_compiled_equals_torch_bit_for_bit(case, dtype, n, shape, zeros, grid, seed, monkeypatch):
    """Every method, bfloat16 / float16 / float32, odd sizes, exact zeros, repeated magnitudes at
    the threshold, small row chunks: the compiled output is the torch output, bit for bit (up to
    three experts here: torch's sum over up to four experts is sequential, as the kernel's)."""
    monkeypatch.setattr(MK, "CHUNK_ENTRIES", 64)  # several chunks per tensor (the same value for every example)
    method, params = case
    params = _case_params(params, n)
    base, experts = _inputs(seed, shape, n, dtype, zeros, grid)
    ok, got = _compiled_merge(method, params, base, experts, dtype)
    assert ok
    assert torch.equal(_bits(got), _bits(_torch_merge(method, params, base, experts, dtype)))


@pytest.mark.parametrize("n", [5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_experts_equal_torch_within_rounding(n, dtype):
    """From five experts on, torch sums over the experts in an order of its own (not sequential):
    the float32 sums differ in the last bits, so the outputs agree to one unit in the last place of
    the output dtype (continuous task vectors: no elected sign sits on an exact cancellation)."""
    base, experts = _inputs(n, (33, 65), n, dtype, 0.2, False)
    eps = torch.finfo(dtype).eps
    for method, params in CASES:
        params = _case_params(params, n) if "weights" not in params else {**params, "weights": [0.3] * n}
        ok, got = _compiled_merge(method, params, base, experts, dtype)
        want = _torch_merge(method, params, base, experts, dtype)
        assert ok
        torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=eps * 1e-2)
        assert (got != want).float().mean() < 0.05


@pytest.mark.parametrize("method,params", [c for c in CASES if c[0] in ("ties", "dare_ties")])
def test_ties_thresholds_are_the_torch_kth_largest(method, params):
    """The per-tensor thresholds from the two 16-bit histograms are the exact k-th largest |tau_i|
    (after DARE's drop) of workbench.merging.kth_largest, with k = round(density * n), on a grid of
    repeated magnitudes and many zeros."""
    base, experts = _inputs(3, (40, 33), 4, torch.bfloat16, 0.4, True)
    s = MK.merge_settings(method, get_method(method).check_params(params), 4, None)
    seed = tensor_seed(0, "t")
    keys = dare_keys(seed, 4)
    thr = TH.tensor_thresholds(s, MK.kernel_view(base), [MK.kernel_view(e) for e in experts], keys, None, 1)
    taus = torch.stack([e.float() - base.float() for e in experts])
    if s.dare:
        p = params["drop_rate"]
        taus = taus * dare_keep(base.shape, 4, p, tensor_generator(0, "t")) / (1 - p)
    n = base.numel()
    k = max(1, min(n, round(params["density"] * n)))
    for i in range(4):
        want = 0.0 if k == n else kth_largest(taus[i].abs().reshape(-1), k)
        assert float(thr[i]) == want


@pytest.mark.parametrize("method,params", [c for c in CASES if c[0] in ("ties", "dare_ties") and c[1]["density"] < 1])
@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("window", ["sampled", "below", "above", "overflow"])
def test_one_pass_thresholds_equal_two_passes(method, params, grid, window, monkeypatch):
    """The one-pass per-tensor thresholds (a sample predicts a window of bins around each threshold;
    one pass counts the entries above it and collects the bit patterns of those inside) are the
    two-pass ones, with two threads, on continuous task vectors and on a grid of repeated
    magnitudes; where the window misses (below or above the threshold) or holds more entries than
    the room the sample's expectation gave the candidates (the sampled window, an expectation of 0),
    the two passes run and give them."""
    base, experts = _inputs(5, (1024, 1040), 3, torch.bfloat16 if grid else torch.float32, 0.2, grid)
    s = MK.merge_settings(method, get_method(method).check_params(params), 3, None)
    keys = dare_keys(tensor_seed(0, "t"), 3)
    views = MK.kernel_view(base), [MK.kernel_view(e) for e in experts]
    with ThreadPoolExecutor(3) as pool:
        monkeypatch.setattr(TH, "WINDOW_MIN_ENTRIES", 2 ** 40)
        want = TH.tensor_thresholds(s, *views, keys, pool, 2)  # the two passes
        monkeypatch.setattr(TH, "WINDOW_MIN_ENTRIES", 0)
        if window in ("below", "above"):
            first = np.full(3, 0 if window == "below" else 0x7F00, np.int64)
            monkeypatch.setattr(TH, "_predicted_window", lambda *a: (first, 2, 0))
        elif window == "overflow":
            sampled = TH._predicted_window
            monkeypatch.setattr(TH, "_predicted_window", lambda *a: (*sampled(*a)[:2], 0))
        two_passes = []
        hist_pass = TH._hist_pass
        monkeypatch.setattr(TH, "_hist_pass", lambda *a: two_passes.append(a[6] is not None) or hist_pass(*a))
        got = TH.tensor_thresholds(s, *views, keys, pool, 2)
    assert np.array_equal(got, want) and (want > 0).all()
    if window != "sampled" or not grid:  # continuous task vectors: the sampled window holds the threshold
        assert any(two_passes) == (window != "sampled")


@given(st.integers(1, 8), st.integers(1, 3000), st.integers(0, 2 ** 31 - 1), st.booleans())
@settings(max_examples=60, deadline=None)
def test_kth_candidate_equals_sorting(width, n, seed, few):
    """The one-pass thresholds' selection among the window's candidates is the rank-th largest by sorting,
    at every rank, with and without many equal patterns."""
    rng = np.random.default_rng(seed)
    lo = int(rng.integers(0, 0x7F00 - width)) << 16
    span = width << 16
    values = rng.integers(0, 5, n) * (span // 5) if few else rng.integers(0, span, n)
    c = (lo + values).astype(np.int32)
    ordered = np.sort(c)[::-1]
    for rank in sorted({1, n, *rng.integers(1, n + 1, 5).tolist()}):
        assert MK._helpers().kth_candidate(c, lo, width, rank) == ordered[rank - 1]


@pytest.mark.parametrize("n_experts", [1, 3])
def test_one_pass_thresholds_ignore_stale_buffers(n_experts, monkeypatch):
    """The one-pass thresholds do not depend on what earlier tensors left in the per-thread buffers
    (histograms, counts, candidates): every cached buffer filled with garbage first, the thresholds
    are still torch's k-th largest."""
    monkeypatch.setattr(TH, "WINDOW_MIN_ENTRIES", 0)
    base, experts = _inputs(7, (1024, 1040), n_experts, torch.float32, 0.2, False)
    s = MK.merge_settings("ties", get_method("ties").check_params({"density": 0.2}), n_experts, None)
    views = MK.kernel_view(base), [MK.kernel_view(e) for e in experts]
    keys = dare_keys(tensor_seed(0, "t"), n_experts)
    TH.tensor_thresholds(s, *views, keys, None, 1)  # creates the buffers of this size
    TH._hist_buffers("candidates", 1, 1, 1 << 16, np.int32, zero=False)[0].fill(3)
    for bufs in TH._HIST_BUFFERS.__dict__.get("by_purpose", {}).values():
        for b in bufs:
            b.fill(3)
    got = TH.tensor_thresholds(s, *views, keys, None, 1)
    n = base.numel()
    want = [kth_largest((e.float() - base.float()).abs().reshape(-1), round(0.2 * n)) for e in experts]
    assert got.tolist() == want


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_one_pass_thresholds_report_non_finite(method, bad, monkeypatch):
    """A non-finite task vector entry outside the sample's slices is found by the one-pass window count."""
    monkeypatch.setattr(TH, "WINDOW_MIN_ENTRIES", 0)
    base, experts = _inputs(5, (1024, 1040), 3, torch.float32, 0.2, False)
    experts[1].view(-1)[base.numel() // 8 + 5] = bad  # slice 0 of the sample ends at n / 64
    s = MK.merge_settings(method, get_method(method).check_params({"density": 0.2}), 3, None)
    views = MK.kernel_view(base), [MK.kernel_view(e) for e in experts]
    calls = []
    window_pass = TH._window_pass
    monkeypatch.setattr(TH, "_window_pass", lambda *a: calls.append(a) or window_pass(*a))
    with ThreadPoolExecutor(2) as pool, pytest.raises(FloatingPointError):
        TH.tensor_thresholds(s, *views, dare_keys(tensor_seed(0, "t"), 3), pool, 2)
    assert calls  # the sample missed it; the window pass reported it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 129), (64, 8, 3), (5, 1)])
def test_task_vector_sq_equals_torch(dtype, shape):
    """The compiled foreign-expert tally (squared norms of theta_0 and of each tau_i over every 8th row,
    float32 differences, float64 sums in any order) is torch's within 1e-9, with and without a pool."""
    base, experts = _inputs(3, shape, 3, dtype, 0.1, False)
    rows = lambda t: t.reshape(t.shape[0], -1)[::8].float()  # noqa: E731
    want_base = float((rows(base).double() ** 2).sum())
    want = [float(((rows(e) - rows(base)).double() ** 2).sum()) for e in experts]
    with ThreadPoolExecutor(2) as pool:
        for p in (None, pool):
            got_base, got = MK.task_vector_sq(base, experts, 8, pool=p)
            assert got_base == pytest.approx(want_base, rel=1e-9)
            assert got == pytest.approx(want, rel=1e-9)


def test_threads_and_long_rows_equal_torch(monkeypatch):
    """Two worker threads over column ranges and chunks of whole rows give the same bits."""
    monkeypatch.setattr(MK, "CHUNK_ENTRIES", 1 << 14)
    base, experts = _inputs(11, (301, 97), 3, torch.bfloat16, 0.1, False)
    with ThreadPoolExecutor(2) as pool:
        for method, params in CASES:
            params = _case_params(params, 3)
            ok, got = _compiled_merge(method, params, base, experts, torch.bfloat16, pool=pool, workers=2)
            assert ok and torch.equal(_bits(got), _bits(_torch_merge(method, params, base, experts, torch.bfloat16)))


def test_global_trim_thresholds_equal_torch_kthvalue():
    """The streaming compiled global thresholds equal merging.global_trim_thresholds (torch.kthvalue
    over the concatenated non-zero magnitudes), including an expert with fewer non-zeros than k."""
    tensors = [_inputs(s, shape, 3, torch.bfloat16, 0.3, s % 2 == 0) for s, shape in
               enumerate([(20, 30), (7,), (64, 9)])]
    tensors = [(b, [e if i != 2 else b for i, e in enumerate(ex)]) for b, ex in tensors]  # expert 2: tau = 0
    for density in (0.05, 0.2, 0.9):
        got = TH.global_trim_thresholds(lambda: iter(tensors), 3, density, progress=False)
        want = torch_global_thresholds([torch.stack([e.float() - b.float() for e in ex]) for b, ex in tensors], density)
        assert got == want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_input_is_reported(bad, dtype):
    """Every compiled method, any non-finite input: in an expert at an entry TIES trims away (a
    tiny task vector there, so the result alone could stay finite) and in the base."""
    for where in ("expert", "base"):
        base, experts = _inputs(1, (9, 9), 2, dtype, 0.0, False)
        if where == "expert":
            experts[1][2, 3] = bad
            experts[0][2, 3] = base[2, 3]
        else:
            base[4, 5] = bad
        for method in MK.COMPILED_METHODS:
            ok, _ = _compiled_merge(method, {"density": 0.1} if "ties" in method else {}, base, experts, dtype)
            assert not ok, (method, where, bad)
    base, experts = _inputs(1, (9, 9), 2, dtype, 0.0, False)
    for method in MK.COMPILED_METHODS:  # and finite inputs are not reported
        assert _compiled_merge(method, {"density": 0.1} if "ties" in method else {}, base, experts, dtype)[0], method


def test_bfloat16_overflow_after_rounding_is_reported():
    """A result finite in float32 but past the bfloat16 range (it rounds to Inf when stored) is
    counted by the kernel as it stores it; in a float32 output it is fine."""
    base = torch.tensor([3.4e38, 1.0, -2.0])
    for dtype, want in ((torch.bfloat16, False), (torch.float32, True)):
        ok, got = _compiled_merge("weight_average", {}, base, [base.clone()], dtype)
        assert ok is want and bool(torch.isfinite(got).all()) is want


# ---------------------------------------------------------------------------------------- engine
def _as_dtype(folder, out, dtype):
    out.mkdir()
    sd = load_file(str(folder / "model.safetensors"))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for f in folder.glob("*.json"):
        (out / f.name).write_text(f.read_text())
    return out


@pytest.fixture(scope="module")
def bf16_models(tiny_llama, tiny_llama_experts, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return _as_dtype(tiny_llama, root / "base", torch.bfloat16), [
        _as_dtype(e, root / f"e{i}", torch.bfloat16) for i, e in enumerate(tiny_llama_experts)]


@pytest.mark.parametrize("method,params", [
    ("weight_average", {}), ("task_arithmetic", {"scale": 0.6}), ("ties", {"density": 0.2}),
    ("ties", {"density": 0.2, "trim": "global"}), ("dare_linear", {"drop_rate": 0.3}),
    ("dare_ties", {"drop_rate": 0.2, "density": 0.3}), ("dare_ties", {"drop_rate": 0.2, "density": 0.3, "trim": "global"})])
@pytest.mark.parametrize("dtype", [None, "float16"])
def test_engine_compiled_folder_equals_torch_folder(bf16_models, tmp_path, monkeypatch, method, params, dtype):
    """The engine's compiled path (memory-mapped, chunked) writes the same tensors, bit for bit, as
    its torch path (WORKBENCH_COMPILED_MERGE=0); the report says which path ran. Small row chunks:
    several per tensor, written while the next is computed (with more than one thread)."""
    monkeypatch.setattr(MK, "CHUNK_ENTRIES", 1 << 10)
    base, experts = bf16_models
    cfg = {"method": method, "base": str(base), "experts": [str(e) for e in experts], "params": params,
           "device": "cpu", "seed": 3, "keep_defaults": False, "dtype": dtype}
    rep_c = merge_with_report({**cfg, "output": str(tmp_path / "c")}, progress=False)
    monkeypatch.setenv(MK.ENV_SWITCH, "0")
    rep_t = merge_with_report({**cfg, "output": str(tmp_path / "t")}, progress=False)
    assert (rep_c.path, rep_t.path) == ("compiled", "torch")
    assert json.loads((tmp_path / "c" / "workbench_merge.json").read_text())["path"] == "compiled"
    assert rep_c.thresholds == rep_t.thresholds
    a, b = state_dict_of(tmp_path / "c"), state_dict_of(tmp_path / "t")
    assert a.keys() == b.keys() and len(rep_c.merged) == len(a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])), k


def test_engine_compiled_names_the_non_finite_expert(bf16_models, tmp_path):
    base, experts = bf16_models
    sd = load_file(str(experts[1] / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    sd[name][1, 2] = float("nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    for f in experts[1].glob("*.json"):
        (bad / f.name).write_text(f.read_text())
    for params in ({}, {"trim": "global"}):
        with pytest.raises(CheckpointError) as info:
            merge_with_report({"method": "ties", "base": str(base), "experts": [str(experts[0]), str(bad)],
                               "output": str(tmp_path / "out"), "device": "cpu", "params": params}, progress=False)
        assert info.value.tensor == name and str(bad) in str(info.value.file)
        assert not (tmp_path / "out").exists()
