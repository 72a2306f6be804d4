"""The compiled CPU kernels of the interference profile, against independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench import cpu_kernels as K
from workbench.analysis.interference import _streamed_stats, tensor_stats


# ----------------------------------------------------------------------------------- DARE draws
def test_fmix32_is_murmur3_finaliser():
    # MurmurHash3's fmix32 of 0 is 0 and it is a bijection: distinct inputs, distinct outputs
    assert K.fmix32(0) == 0
    xs = list(range(1, 5000)) + [2 ** 32 - 1, 2 ** 31, 0xDEADBEEF]
    assert len({K.fmix32(x) for x in xs}) == len(xs)
    assert all(0 <= K.fmix32(x) < 2 ** 32 for x in xs)


def test_torch_draws_equal_the_python_formula():
    N = 3  # an odd count: the last pair has one expert
    keys = K.dare_keys(12345, N)
    assert keys.shape == (2, 2) and (keys[:, 0] % 2 == 1).all()  # odd multipliers
    p_int = K.dare_keep_threshold(0.3)
    pos0 = 2 ** 32 - 700  # the top of the position range: no int64 overflow in the torch form
    mask = K.dare_keep_torch(pos0, 700, keys, p_int, torch.device("cpu"), n_experts=N)
    assert mask.shape == (N, 700)
    for i in range(N):
        want = [K.dare_draw(pos0 + j, i, keys) >= p_int for j in range(700)]
        assert mask[i].bool().tolist() == want
    with pytest.raises(Exception, match="2\\*\\*32"):
        K.dare_keep_torch(pos0, 701, keys, p_int, torch.device("cpu"))


def test_draws_keep_one_minus_p_and_experts_are_uncorrelated():
    n, p = 1 << 20, 0.2
    keys = K.dare_keys(7, 4)
    mask = K.dare_keep_torch(0, n, keys, K.dare_keep_threshold(p), torch.device("cpu"), torch.float64)
    sd = math.sqrt(p * (1 - p) / n)
    keep = 1 - K.dare_keep_threshold(p) / 2 ** 16  # 1 - p up to 2**-16
    assert abs(keep - (1 - p)) < 2 ** -16
    assert ((mask.mean(1) - keep).abs() < 5 * sd).all()
    corr = torch.corrcoef(mask)
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(n)
    # neighbouring positions are not correlated either (lag-1 autocorrelation)
    lag = torch.corrcoef(torch.stack([mask[0, :-1], mask[0, 1:]]))[0, 1]
    assert abs(lag) < 5 / math.sqrt(n)
    # another seed gives other draws
    other = K.dare_keep_torch(0, n, K.dare_keys(8, 4), K.dare_keep_threshold(p), torch.device("cpu"), torch.float64)
    assert (other != mask).double().mean() > 0.2


def test_keep_threshold_edges():
    assert K.dare_keep_threshold(0.0) == 0  # keep everything
    assert K.dare_keep_threshold(0.5) == 2 ** 15
    assert K.dare_keep_threshold(0.2) == 13108
    with pytest.raises(Exception):
        K.dare_keep_threshold(1.0)


# ----------------------------------------------------------------------------------- radix select on stored tensors
def _stored(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    s = t.to(dtype).contiguous()
    return s, K.as_kernel_array(s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("is_weight", [True, False])
def test_tau_kth_largest_equals_numpy_partition(dtype, is_weight):
    g = torch.Generator().manual_seed(0)
    n = 50_000
    base_t, base = _stored(torch.randn(n, generator=g) * 0.02, dtype)
    main_t, main = _stored(base_t.float() + (torch.randn(n, generator=g) * 4).round() / 400, dtype)  # ties, zeros
    main_t.view(-1)[::7] = base_t.view(-1)[::7] if is_weight else 0  # exact zeros of tau
    tau = (main_t.float() - base_t.float()) if is_weight else main_t.float()
    a = tau.abs().numpy()
    hist = np.zeros(1 << 15, np.int64)
    assert K.tau_hist(main, base, is_weight, hist)
    assert hist.sum() == n
    for k in (1, 2, n // 10, n // 5, n // 2, n - 1, n):
        want = float(np.partition(a, n - k)[n - k])
        assert K.tau_kth_largest(main, base, is_weight, k, hist) == want, k


@pytest.mark.parametrize("n_bins", [1 << 15, 1 << 16, 8 << 16])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_kth_bin_two_level_scan_equals_a_plain_scan(n_bins, dtype):
    """The bin (and rank inside it) of the k-th largest entry, read from the top: the two-level scan
    of large histograms (block sums, then one block) against a plain Python scan, on sparse and
    dense random histograms, k from 1 to past the total."""
    def plain(h, k):
        seen = 0
        for b in range(len(h) - 1, -1, -1):
            if seen + h[b] >= k:
                return b, k - seen
            seen += int(h[b])
        return -1, k

    rng = np.random.default_rng(n_bins + np.dtype(dtype).itemsize)
    for fill in (3, 200, n_bins // 4):
        h = np.zeros(n_bins, dtype)
        np.add.at(h, rng.integers(0, n_bins, fill), 1)
        total = int(h.sum())
        for k in sorted({1, 2, total // 3 + 1, total - 1, total, total + 1} - {0}):
            assert K._kth_from_top(h, k) == plain(h, k), (fill, k)
    assert K.kth_bin(np.zeros(n_bins, dtype), 1) == -1


def test_tau_hist_reports_non_finite_values():
    base = np.zeros(10_000, np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        main = np.ones(10_000, np.float32)
        main[1234] = bad
        assert not K.tau_hist(main, base, True, np.zeros(1 << 15, np.int64))
    # an infinite base makes tau non-finite too
    base[5] = np.inf
    assert not K.tau_hist(np.ones(10_000, np.float32), base, True, np.zeros(1 << 15, np.int64))
    assert K.tau_hist(np.ones(10_000, np.float32), np.zeros(10_000, np.float32), True, np.zeros(1 << 15, np.int64))


# ----------------------------------------------------------------------------------- sums against float64
def test_kernel_float_sums_equal_float64_reference():
    """Gram matrix, |sum tau|^2 and |theta_0|^2 of the kernel against numpy float64 sums."""
    g = torch.Generator().manual_seed(2)
    N, n = 3, 40_000
    base = torch.randn(n, generator=g)
    mains = [base + 0.1 * torch.randn(n, generator=g) for _ in range(N)]
    taus = np.stack([(m - base).numpy() for m in mains]).astype(np.float64)  # float32 differences, widened
    kern = K.chunk_kernel(N)
    sums = np.zeros(N * N + 2 + 4 * N + 1)
    codes = np.empty((2, 1000), np.int32)
    thr = np.full(N, 1e30, np.float32)  # nothing trimmed in: the TIES sums stay 0
    for lo in range(0, n, 1000):
        kern(*[m.numpy() for m in mains], np.ones(N, np.float32), base.numpy(), lo, 1000, lo, thr,
             K.dare_keys(0, N), 0, False, sums, codes[0], codes[1])
    gram = sums[: N * N].reshape(N, N)
    want = taus @ taus.T
    for i in range(N):
        for j in range(i + 1):
            assert gram[i, j] == pytest.approx(want[i, j], rel=1e-12)
    assert sums[N * N] == pytest.approx(float((taus.sum(0) ** 2).sum()), rel=1e-12)
    assert sums[N * N + 1] == 0.0
    assert sums[-1] == pytest.approx(float((base.double() ** 2).sum()), rel=1e-12)


# ----------------------------------------------------------------------------------- streamed = materialised
@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_streamed_stats_from_stored_tensors_equal_tensor_stats(dtype, missing, monkeypatch):
    """The streamed CPU path reads the stored tensors (bf16 / f32 directly, f16 through torch rows)
    and gives the same sums as tensor_stats over the materialised float32 task vectors; one
    expert stores a delta and, with ``missing``, one lacks the tensor (tau = 0: the chunks are
    then built by torch)."""
    import workbench.analysis.interference as I

    used = []
    orig = I._StatsAccumulator._add_compiled  # the kernel on float32 chunks built by torch
    monkeypatch.setattr(I._StatsAccumulator, "_add_compiled",
                        lambda self, *a, **k: (used.append(1), orig(self, *a, **k))[1])
    g = torch.Generator().manual_seed(3)
    shape = (300, 257)  # above RADIX_MIN: the histogram select; not a multiple of the block
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    w1 = (base.float() + torch.randn(shape, generator=g) * 1e-3).to(dtype)
    w2 = (base.float() - torch.randn(shape, generator=g) * 1e-3).to(dtype)
    d3 = (torch.randn(shape, generator=g) * 1e-3).to(dtype)
    raws = [(w1, None, True), (w2, None, True), (d3, None, False), (None if missing else w1, None, True)]
    _, numel, st, base_sq, _, tau_row = _streamed_stats("t", base, raws, ["base.safetensors", "a", "b", "c", "d"], ["a", "b", "c", "d"],
                                                        topk=0.2, dare_p=0.2, dare_seed=5, chunk_size=1 << 19)
    built_by_torch = bool(used)
    taus = torch.stack([w1.float() - base.float(), w2.float() - base.float(), d3.float(),
                        torch.zeros(shape) if missing else w1.float() - base.float()]).reshape(4, -1)
    want = tensor_stats(taus, topk=0.2, dare_p=0.2, dare_seed=5, chunk_size=1 << 15)
    assert numel == base.numel()
    assert base_sq == pytest.approx(float((base.double() ** 2).sum()), rel=1e-9)
    for k in want:
        if k in {"gram", "ties_survived_sq", "ties_share_sq", "dare_kept_sq", "ties_merged_sq", "ta_sq"}:
            assert torch.allclose(st[k], want[k], rtol=1e-9, atol=0), k
        else:
            assert torch.equal(st[k], want[k]), k
    assert torch.equal(tau_row(1), taus[1])
    # the kernel read the stored tensors itself exactly when it could (bf16 / f32, nothing missing)
    assert built_by_torch == (dtype == torch.float16 or missing)


@pytest.mark.parametrize("workers", [2, 4])
def test_worker_threads_give_the_same_counts_and_sums(workers):
    """Worker threads (3 experts: with 2 workers the thresholds run one expert per worker, with 4
    each expert's columns are split; the sums always in column ranges) give the same counts as
    one thread and float sums equal to 1e-12."""
    from concurrent.futures import ThreadPoolExecutor

    import workbench.analysis.interference as I

    g = torch.Generator().manual_seed(4)
    n = I._PARALLEL_MIN + 12345  # large enough to be split; not a multiple of the chunk
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    raws = [((base.float() + torch.randn(n, generator=g) * 1e-3).bfloat16(), None, True) for _ in range(3)]
    kw = dict(topk=0.2, dare_p=0.2, dare_seed=9, chunk_size=1 << 19)
    one = _streamed_stats("t", base, raws, ["base", "a", "b", "c"], ["a", "b", "c"], **kw)
    with ThreadPoolExecutor(workers) as pool:
        two = _streamed_stats("t", base, raws, ["base", "a", "b", "c"], ["a", "b", "c"], pool=pool, workers=workers, **kw)
    assert one[3] == pytest.approx(two[3], rel=1e-12)  # |theta_0|^2
    for k, v in one[2].items():
        if k in {"gram", "ties_survived_sq", "ties_share_sq", "dare_kept_sq", "ties_merged_sq", "ta_sq"}:
            assert torch.allclose(v, two[2][k], rtol=1e-12, atol=0), k
        else:
            assert torch.equal(v, two[2][k]), k


def test_kernel_modules_load_once_and_whole_under_concurrent_first_use(tmp_path, monkeypatch):
    """Worker threads asking for a not-yet-loaded kernel module at the same time all get the
    complete module (it used to be visible half-executed), written into the cache folder."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("WORKBENCH_KERNEL_CACHE", str(tmp_path))
    source = "import time\ntime.sleep(0.2)\n\ndef f():\n    return 41 + 1\n# " + uuid.uuid4().hex + "\n"
    with ThreadPoolExecutor(8) as pool:
        mods = list(pool.map(lambda _: K._load_module("race", source), range(8)))
    assert all(m is mods[0] for m in mods) and mods[0].f() == 42
    assert [p.name for p in tmp_path.glob("wb_race_*.py")] == [mods[0].__name__ + ".py"]


@pytest.mark.parametrize("workers", [2, 3])
def test_threshold_split_in_column_ranges_is_exact(workers):
    """The radix select with its passes split across worker threads (ranges of 4096-multiples,
    histograms added) gives numpy.partition's k-th largest and the single-range histogram."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(6)
    n = 3 * 4096 * 7 + 123
    main = (torch.randn(n, generator=g) * 3).round().bfloat16() / 8  # many ties
    base = torch.zeros(n).bfloat16()
    mk, bk = K.as_kernel_array(main), K.as_kernel_array(base)
    a = main.float().abs().numpy()
    one = np.zeros(1 << 15, np.int64)
    assert K.tau_hist(mk, bk, True, one)
    with ThreadPoolExecutor(workers) as pool:
        split = np.zeros(1 << 15, np.int64)
        assert len(K.column_ranges(n, pool, workers)) == workers
        assert K.tau_hist(mk, bk, True, split, pool=pool, workers=workers)
        assert np.array_equal(one, split)
        for k in (1, n // 5, n // 2, n):
            want = float(np.partition(a, n - k)[n - k])
            assert K.tau_kth_largest(mk, bk, True, k, split, pool=pool, workers=workers) == want, k
        bad = main.clone()
        bad[n - 5] = float("nan")  # in the last range
        assert not K.tau_hist(K.as_kernel_array(bad), bk, True, np.zeros(1 << 15, np.int64), pool=pool,
                              workers=workers)


def test_compiled_path_refuses_positions_beyond_the_draws():
    """Entries at or past 2**32 have no DARE draw: both paths refuse them with a ConfigError."""
    import workbench.analysis.interference as I
    from workbench.errors import ConfigError

    acc = I._StatsAccumulator(2, torch.device("cpu"), 0.2, 0)
    rows = [np.zeros(20, np.float32)] * 2
    with pytest.raises(ConfigError, match="2\\*\\*32"):
        acc.add_stored(rows, np.zeros(2, np.float32), np.zeros(20, np.float32), 0, 20, 2 ** 32 - 10,
                       torch.ones(2))
    acc.add_stored(rows, np.zeros(2, np.float32), np.zeros(20, np.float32), 0, 20, 2 ** 32 - 20, torch.ones(2))
    no_dare = I._StatsAccumulator(2, torch.device("cpu"), None, 0)  # without DARE there is no limit
    no_dare.add_stored(rows, np.zeros(2, np.float32), np.zeros(20, np.float32), 0, 20, 2 ** 32, torch.ones(2))
