"""Compiled CPU kernels of the interference profile, and the DARE draw that every device shares.

The profile's per-chunk work (:class:`workbench.analysis.interference._StatsAccumulator`) is a
dozen element-wise steps per entry: signs, the TIES trim, the elected sign, survival, the
disjoint mean, the DARE keep draw, a code histogram. As separate torch operations each step
reads and writes an ``[N, chunk]`` temporary, which on a CPU costs ~10 ns per entry and expert
(measured, 296.8M-parameter profile: 23x the warm I/O floor). Here the same step is one
numba loop over the chunk's columns, with ``N`` unrolled (the source is generated per ``N``),
so LLVM vectorises it and every temporary stays in registers: ~1.3 ns per entry and expert
(measured, DARE draws included).

The generated source goes to a file in a cache folder (``$WORKBENCH_KERNEL_CACHE``, default
``$XDG_CACHE_HOME/mllm-workbench/kernels`` or ``~/.cache/...``; a temporary folder when that
is not writable) and is compiled with ``cache=True``, so a later process loads the machine
code instead of compiling it again (~1 s per ``N``).

Results are the same sums as the torch path: every count is the same integer (same codes,
same histogram, decoded by the same tables); the float sums (Gram matrix, energies) are
accumulated in float64 from exact float32 x float32 products, so they differ from the torch
path's float32 chunk sums at the 1e-6 relative level only (the kernel's are the closer ones).

DARE draws (both devices): a counter-based draw that depends on the seed, the tensor name
(through the seed), the expert and the entry's position only, not on chunking, threads or
device, so the CPU kernel, the torch path and a GPU give the same DARE counts. Experts go in
pairs ``m = i // 2``; one 32-bit hash per pair and entry, ``h_m(pos) = fmix32(pos * a_m + b_m
mod 2**32)`` (``fmix32``: MurmurHash3's 32-bit finaliser, a bijection with full avalanche;
``a_m`` odd and ``b_m`` from the seed), gives expert ``2m`` its low 16 bits and expert ``2m + 1``
its high 16 bits as a uniform draw ``u`` on ``[0, 2**16)``; the entry is kept when
``u >= ceil(p * 2**16)``. The keep probability is therefore ``1 - ceil(p * 2**16) / 2**16``,
``1 - p`` up to ``1.6e-5`` (``p = 0.2``: 0.799988). Different odd multipliers make the experts'
draws unrelated (expert ``k`` at ``pos`` never simply repeats expert ``i`` at a shifted position,
as XOR- or add-keyed counters would); ``tests/test_kernels.py`` checks the keep rate, the
correlation between experts and between neighbouring entries. One hash per two experts is what
makes the draw cheap (~0.25 ns per entry and expert on the CPU).
Positions must be below ``2**32`` (a tensor of at most 4.29e9 entries).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["MAX_KERNEL_EXPERTS", "dare_keys", "dare_keep_threshold", "dare_keep_torch",
           "fmix32", "dare_draw", "check_positions", "chunk_kernel", "count_codes", "as_kernel_array", "tau_hist",
           "tau_kth_largest", "kth_bin", "kth_from_hist", "column_ranges", "run_ranges", "helpers_module"]

#: the generated kernel handles this many experts (the code histograms of the accumulator)
MAX_KERNEL_EXPERTS = 8
#: up to this many experts both sign codes go into one joint histogram
MAX_JOINT_EXPERTS = 4
_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


# ----------------------------------------------------------------------------------- DARE draw
def fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser of a Python int (``0 <= h < 2**32``): the reference form."""
    h &= _MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    h ^= h >> 16
    return h


def dare_keys(seed: int, n_experts: int) -> np.ndarray:
    """``[ceil(n_experts / 2), 2]`` uint32 keys ``(a_m, b_m)`` (``a_m`` odd) of a tensor's DARE
    draws, one row per pair of experts, from the tensor's seed."""
    s = (int(seed) ^ (int(seed) >> 32)) & _MASK32
    pairs = (n_experts + 1) // 2
    out = np.empty((pairs, 2), np.uint32)
    for m in range(pairs):
        out[m] = (fmix32((s + _GOLDEN * (2 * m + 1)) & _MASK32) | 1, fmix32((s + _GOLDEN * (2 * m + 2)) & _MASK32))
    return out


def dare_keep_threshold(p: float) -> int:
    """``ceil(p * 2**16)``: a 16-bit draw ``u`` is kept when ``u >= `` this (keep probability
    ``1 - ceil(p * 2**16) / 2**16``)."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dare_p must be in [0, 1), got {p}")
    return int(np.ceil(float(p) * 2.0 ** 16))


def dare_draw(pos: int, i: int, keys: np.ndarray) -> int:
    """Expert ``i``'s 16-bit draw at position ``pos`` (plain Python integers: the reference form)."""
    a, b = (int(k) for k in keys[i // 2])
    return (fmix32((pos * a + b) & _MASK32) >> (16 * (i % 2))) & 0xFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, without int64 overflow
    (the constant is split in 16-bit halves: every partial product is below ``2**48``)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _fmix32_torch(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def check_positions(end: int) -> None:
    """The DARE draws address entries below ``2**32``: refuse a tensor that reaches ``end`` beyond it."""
    if end > 2 ** 32:
        raise ConfigError(f"DARE draws address entries below 2**32; this tensor has {end}")


def dare_keep_torch(pos0: int, width: int, keys: np.ndarray, p_int: int, device: torch.device,
                    dtype: torch.dtype = torch.float32, n_experts: int | None = None) -> torch.Tensor:
    """``[N, width]`` 0/1 keep mask of entries ``pos0 .. pos0 + width - 1`` (any device, int64 math);
    ``N = n_experts``, by default ``2 * len(keys)``."""
    check_positions(pos0 + width)
    N = 2 * len(keys) if n_experts is None else n_experts
    pos = torch.arange(pos0, pos0 + width, dtype=torch.int64, device=device)
    rows = []
    for m, (a, b) in enumerate(keys.tolist()):
        h = _fmix32_torch((_mul32(pos, int(a)) + int(b)) & _MASK32)
        for half in range(2):
            if 2 * m + half < N:
                rows.append(((h >> (16 * half)) & 0xFFFF) >= int(p_int))
    return torch.stack(rows).to(dtype)


# ----------------------------------------------------------------------------------- generated kernel

def dare_keys_source(N: int, indent: str = "    ") -> list[str]:
    """Generated-kernel source lines that load the DARE keys of ``N`` experts (``keys [ceil(N / 2), 2]``,
    :func:`dare_keys`) into ``ka<m>``, ``kb<m>``, one pair of experts each (read by :func:`dare_hash_source`)."""
    return [f"{indent}ka{m} = np.uint32(keys[{m}, 0]); kb{m} = np.uint32(keys[{m}, 1])" for m in range((N + 1) // 2)]


def dare_hash_source(m: int, indent: str) -> list[str]:
    """Generated-kernel source lines that set ``h``, the 32-bit hash of the position ``pp`` for the
    expert pair ``m`` (keys ``ka<m>``, ``kb<m>``: :func:`dare_keys`; the MurmurHash3 finaliser): its low and
    high 16 bits are the two experts' DARE draws. One definition for every kernel that draws DARE."""
    return [f"{indent}h = np.uint32(np.uint32(pp * ka{m}) + kb{m})",
            f"{indent}h = np.uint32(h ^ (h >> np.uint32(16)))",
            f"{indent}h = np.uint32(h * np.uint32(0x85EBCA6B))",
            f"{indent}h = np.uint32(h ^ (h >> np.uint32(13)))",
            f"{indent}h = np.uint32(h * np.uint32(0xC2B2AE35))",
            f"{indent}h = np.uint32(h ^ (h >> np.uint32(16)))"]

def _kernel_source(N: int, helpers: str) -> str:
    """Source of ``kernel(m_0, .., m_{N-1}, w, base, lo, c, pos0, thr, keys, p_int, dare, sums, codes_u,
    codes_t)`` for ``N`` experts.

    The chunk's task vectors are built on the fly, ``tau_i = m_i[lo + col] - w_i * base[lo + col]``
    for ``col < c`` (float32, as torch computes them; ``m_i``/``base`` 1-D float32 arrays, or the
    uint16 bits of bfloat16 ones; ``w [N]`` 1.0 for a stored weight, 0.0 for a stored delta);
    ``pos0`` is the tensor position of column 0 (DARE); ``thr [N]`` float32 trim thresholds (> 0);
    ``keys [ceil(N / 2), 2]`` uint32; ``sums`` float64, added to: ``[0, N*N)`` the Gram matrix (lower
    triangle, row-major), then ``ta_sq``, ``ties_merged_sq``, then per expert (``N`` each)
    ``ties_survived_sq, ties_share_sq, dare_kept_n, dare_kept_sq``, then ``|base chunk|^2``.
    ``codes_u``/``codes_t`` int32
    ``[c]`` receive the per-column codes (for ``N <= 4`` ``codes_u`` gets the joint code
    ``code_u * 3**(N+1) + code_t`` and ``codes_t`` is not written), with
    ``code_u = sum_i 3**i (s_i + 1)``, ``code_t = sum_i 3**i (st_i + 1) + 3**N (gamma + 1)``: the
    codes of :class:`_StatsAccumulator` plus its offsets.
    """
    r = range(N)
    pairs = [(i, j) for i in r for j in range(i + 1)]
    L: list[str] = []
    A = L.append
    A("import numpy as np")
    A("from numba import njit")
    A(f"from {helpers} import ld")
    A("")
    A("@njit(cache=True, nogil=True, boundscheck=False, error_model='numpy', fastmath={'reassoc', 'contract', 'nsz'})")
    A("def kernel(" + ", ".join(f"m{i}" for i in r) + ", w, base, lo, c, pos0, thr, keys, p_int, dare, sums, "
      "codes_u, codes_t):")
    A("    bs = 0.0")
    A("    base = base[lo:lo + c]")  # slices, not lo + col: numba cannot prove lo + col >= 0 and would not vectorise
    for i in r:
        A(f"    m{i} = m{i}[lo:lo + c]")
    for i in r:
        A(f"    w{i} = np.float32(w[{i}])")
        A(f"    th{i} = thr[{i}]")
        A(f"    ss{i} = 0.0; sh{i} = 0.0; dn{i} = 0.0; dq{i} = 0.0")
    L.extend(dare_keys_source(N))
    for i, j in pairs:
        A(f"    g{i}_{j} = 0.0")
    A("    ta = 0.0; tm = 0.0")
    A("    pu = np.uint32(p_int)")
    A("    for col in range(c):")
    A("        bv = ld(base, col)")
    A("        bs += np.float64(bv) * np.float64(bv)")
    for i in r:
        A(f"        x{i} = ld(m{i}, col) - w{i} * bv")
        A(f"        y{i} = np.float64(x{i})")
        A(f"        k{i} = np.int32(abs(x{i}) >= th{i})")
        A(f"        s{i} = np.int32(x{i} > 0) - np.int32(x{i} < 0)")
        A(f"        q{i} = s{i} * k{i}")
    for i, j in pairs:
        A(f"        g{i}_{j} += y{i} * y{j}")
    A("        cs = " + " + ".join(f"y{i}" for i in r))
    A("        ta += cs * cs")
    A("        tsum = " + " + ".join(f"y{i} * k{i}" for i in r))
    A("        g = np.int32(tsum > 0) - np.int32(tsum < 0)")
    A("        cu = " + " + ".join(f"{3 ** i} * (s{i} + 1)" for i in r))
    A("        ct = " + " + ".join(f"{3 ** i} * (q{i} + 1)" for i in r) + f" + {3 ** N} * (g + 1)")
    if N <= MAX_JOINT_EXPERTS:
        A(f"        codes_u[col] = cu * {3 ** (N + 1)} + ct")
    else:
        A("        codes_u[col] = cu")
        A("        codes_t[col] = ct")
    for i in r:
        A(f"        v{i} = y{i} * np.float64(q{i} * g > 0)")
    A("        cnt = " + " + ".join(f"np.int32(q{i} * g > 0)" for i in r))
    A("        inv = 1.0 / max(cnt, 1)")
    A("        m = (" + " + ".join(f"v{i}" for i in r) + ") * inv")
    A("        tm += m * m")
    A("        inv2 = inv * inv")
    for i in r:
        A(f"        ss{i} += v{i} * v{i}")
        A(f"        sh{i} += v{i} * v{i} * inv2")
    A("        if dare:")
    A("            pp = np.uint32(pos0 + col)")
    for m in range((N + 1) // 2):
        L.extend(dare_hash_source(m, " " * 12))
        for i in (2 * m, 2 * m + 1):
            if i >= N:
                continue
            A(f"            e{i} = np.float64(((h >> np.uint32({16 * (i % 2)})) & np.uint32(0xFFFF)) >= pu)")
    for i in r:
        A(f"            dn{i} += e{i} * np.float64(x{i} != 0)")
        A(f"            dq{i} += e{i} * y{i} * y{i}")
    for i, j in pairs:
        A(f"    sums[{i * N + j}] += g{i}_{j}")
    A(f"    sums[{N * N}] += ta")
    A(f"    sums[{N * N + 1}] += tm")
    A(f"    sums[{N * N + 2 + 4 * N}] += bs")
    for i in r:
        base = N * N + 2
        A(f"    sums[{base + i}] += ss{i}; sums[{base + N + i}] += sh{i}; "
          f"sums[{base + 2 * N + i}] += dn{i}; sums[{base + 3 * N + i}] += dq{i}")
    return "\n".join(L) + "\n"


_HELPERS_SOURCE = '''import numpy as np
from numba import njit
from numba.core import types
from numba.extending import intrinsic, overload


@intrinsic
def bits_to_f32(typingctx, x):
    """Reinterpret a uint32 as a float32 (an LLVM bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.uint32), codegen


@intrinsic
def f32_to_bits(typingctx, x):
    """Reinterpret a float32 as an int32 (an LLVM bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int32))
    return types.int32(types.float32), codegen


def ld(a, j):
    """Entry ``j`` of a stored tensor as float32: bfloat16 arrives as its uint16 bits."""


@overload(ld, inline="always")
def _ld(a, j):
    if a.dtype == types.uint16:
        return lambda a, j: bits_to_f32(np.uint32(np.uint32(a[j]) << np.uint32(16)))
    return lambda a, j: np.float32(a[j])


@njit(cache=True, boundscheck=False, inline="always")
def tau_bits(m, b, w, buf):
    """``buf[j] = bits(|m[j] - w * b[j]|)`` (float32 arithmetic, as torch's ``main - base``) for
    ``j < len(m)``; returns the largest, so ``>= 0x7F800000`` means some entry is not finite."""
    top = 0
    for j in range(m.shape[0]):
        a = f32_to_bits(ld(m, j) - w * ld(b, j)) & 0x7FFFFFFF
        buf[j] = a
        top = max(top, a)
    return top


@njit(cache=True, nogil=True, boundscheck=False)
def tau_hist(main, base, w, lo, n, hist, do_hist):
    """Over ``tau = main[lo:lo+n] - w * base[lo:lo+n]``: ``hist[bits(|tau|) >> 16] += 1`` (when
    ``do_hist``); returns whether every entry is finite. Block by block: a vectorised pass into a
    small buffer, then the scatter."""
    buf = np.empty(4096, np.int32)
    top = 0
    for s in range(lo, lo + n, 4096):
        e = min(lo + n, s + 4096)
        t = tau_bits(main[s:e], base[s:e], w, buf)
        top = max(top, t)
        if do_hist and top < 0x7F800000:
            for j in range(e - s):
                hist[buf[j] >> 16] += 1
    return top < 0x7F800000


@njit(cache=True, nogil=True, boundscheck=False)
def tau_low_hist(main, base, w, lo, n, b, h2):
    """Over ``tau = main[lo:lo+n] - w * base[lo:lo+n]``: ``h2[bits(|tau|) & 0xFFFF] += 1`` for the
    entries whose high 16 bits are ``b``."""
    buf = np.empty(4096, np.int32)
    for s in range(lo, lo + n, 4096):
        e = min(lo + n, s + 4096)
        tau_bits(main[s:e], base[s:e], w, buf)
        for j in range(e - s):
            a = buf[j]
            if (a >> 16) == b:
                h2[a & 0xFFFF] += 1


@njit(cache=True, nogil=True, boundscheck=False)
def kth_from_top(hist, k):
    """``(bin, rank)``: the bin of ``hist`` holding the ``k``-th largest entry (read from the top bin
    down) and that entry's rank inside it (1 = the bin's largest); ``(-1, k)`` when ``hist`` counts
    fewer than ``k``."""
    seen = 0
    for b in range(hist.shape[0] - 1, -1, -1):
        if seen + hist[b] >= k:
            return b, k - seen
        seen += hist[b]
    return -1, k


@njit(cache=True, nogil=True, boundscheck=False)
def count_codes(codes, hist):
    for j in range(codes.shape[0]):
        hist[codes[j]] += 1
'''


def _cache_dir() -> Path:
    env = os.environ.get("WORKBENCH_KERNEL_CACHE")
    if env:
        return Path(env)
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "mllm-workbench" / "kernels"


_LOAD_LOCK = threading.RLock()  # worker threads may ask for the same module at once


def _load_module(stem: str, source: str):
    """Import ``source`` from ``<cache>/<stem>_<hash>.py`` (written atomically once), so that numba's
    ``cache=True`` can keep the machine code beside it. Thread-safe: a module is published in
    ``sys.modules`` only once it has been executed."""
    with _LOAD_LOCK:
        return _load_module_locked(stem, source)


def _load_module_locked(stem: str, source: str):
    import numba  # noqa: F401  (a clear ImportError here, not inside the generated module)

    digest = hashlib.sha256((source + numba.__version__).encode()).hexdigest()[:16]
    name = f"wb_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "mllm-workbench-kernels"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.py"
            if not path.exists() or path.read_text() != source:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(source)
                os.replace(tmp, path)
            break
        except OSError:
            continue
    else:  # pragma: no cover - no writable folder at all
        raise OSError("no writable folder for the compiled kernels; set WORKBENCH_KERNEL_CACHE")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


@functools.lru_cache(maxsize=None)
def chunk_kernel(N: int):
    """The compiled per-chunk statistics kernel for ``N`` experts (``1 <= N <= MAX_KERNEL_EXPERTS``)."""
    if not 1 <= N <= MAX_KERNEL_EXPERTS:
        raise ValueError(f"the compiled kernel handles 1..{MAX_KERNEL_EXPERTS} experts, got {N}")
    return _load_module(f"stats_n{N}", _kernel_source(N, _helpers().__name__)).kernel


@functools.lru_cache(maxsize=None)
def _helpers():
    return _load_module("helpers", _HELPERS_SOURCE)


def helpers_module():
    """The compiled helpers module (``ld``: a stored entry as float32, ``f32_to_bits``, the
    histogram passes), for other generated kernels to import (:mod:`workbench.merging.kernels`)."""
    return _helpers()


def count_codes(codes: np.ndarray, hist: np.ndarray) -> None:
    """``hist[codes[j]] += 1`` for every ``j`` (int32 codes, int64 histogram)."""
    _helpers().count_codes(codes, hist)


def as_kernel_array(t: torch.Tensor) -> np.ndarray | None:
    """A stored CPU tensor as the kernels read it: flat float32, or the uint16 bits of bfloat16;
    ``None`` for other dtypes (the caller converts those to float32 first)."""
    flat = t.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    if flat.dtype == torch.float32:
        return flat.numpy()
    return None


def column_ranges(n: int, pool, workers: int) -> list[tuple[int, int]]:
    """``(lo, length)`` column ranges: one, or ``workers`` of them (multiples of 4096 entries) with a pool."""
    if pool is None or workers <= 1 or n < 2 * 4096:
        return [(0, n)]
    step = -(-n // (workers * 4096)) * 4096
    return [(lo, min(n, lo + step) - lo) for lo in range(0, n, step)]


def run_ranges(pool, fn, ranges: list[tuple[int, int]]) -> list:
    """``fn(j, lo, length)`` for every range ``j``: the first on the calling thread, the others on
    the pool meanwhile (when there are several); one after the other without a pool."""
    calls = [(j, lo, ln) for j, (lo, ln) in enumerate(ranges)]
    if pool is None:
        return [fn(*c) for c in calls]
    futures = [pool.submit(fn, *c) for c in calls[1:]]
    try:
        first = fn(*calls[0])
    finally:
        rest = [f.result() for f in futures]  # all done before anything is returned or raised
    return [first, *rest]


def tau_hist(main: np.ndarray, base: np.ndarray, is_weight: bool, hist: np.ndarray, do_hist: bool = True,
             *, pool=None, workers: int = 1) -> bool:
    """Over ``tau = main - base`` (``main`` alone when ``not is_weight``; float32 arithmetic, the
    values torch gives): add the high 16 bits of every ``|tau|`` to ``hist`` (``2**15`` int64
    bins) when ``do_hist``; returns whether every entry of ``tau`` is finite (when it is not, the
    histogram is incomplete). ``main``/``base`` from :func:`as_kernel_array`. With a thread
    ``pool``, ``workers`` column ranges are histogrammed side by side and added."""
    w = np.float32(1.0 if is_weight else 0.0)
    ranges = column_ranges(main.shape[0], pool, workers)
    hists = [hist] + [np.zeros_like(hist) for _ in ranges[1:]]
    ok = run_ranges(pool, lambda j, lo, ln: _helpers().tau_hist(main, base, w, lo, ln, hists[j], bool(do_hist)), ranges)
    for h in hists[1:]:
        hist += h
    return all(bool(x) for x in ok)


def tau_kth_largest(main: np.ndarray, base: np.ndarray, is_weight: bool, k: int, hist: np.ndarray,
                    *, pool=None, workers: int = 1) -> float:
    """The ``k``-th largest ``|tau|`` (``1 <= k <= n``) of a finite ``tau = main - base``, exactly
    ``numpy.partition(|tau|, n - k)[n - k]``, given ``hist`` (:func:`tau_hist` of the same
    ``tau``): the high 16 bits from ``hist``, the low 16 bits from one more pass (a histogram of
    the low bits of the entries in that bin, read from the top; no partition, no float32 row is
    ever stored). Non-negative float32 values order like their bit patterns as integers."""
    n = main.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    w = np.float32(1.0 if is_weight else 0.0)
    ranges = column_ranges(n, pool, workers)

    def low_hist(b: int) -> np.ndarray:
        h2s = [np.zeros(1 << 16, np.int64) for _ in ranges]
        run_ranges(pool, lambda j, lo, ln: _helpers().tau_low_hist(main, base, w, lo, ln, b, h2s[j]), ranges)
        return np.sum(h2s, axis=0)

    return kth_from_hist(hist, k, low_hist)


def _kth_from_top(hist: np.ndarray, k: int) -> tuple[int, int]:
    """``(bin, rank)``: the bin of ``hist`` holding the ``k``-th largest entry and that entry's rank
    inside it (1 = the bin's largest); ``(-1, k)`` when ``hist`` counts fewer than ``k``."""
    if hist.dtype not in (np.int32, np.int64) or not hist.flags.c_contiguous:
        hist = np.ascontiguousarray(hist, np.int64)  # int32 windows as they are: a copy per call cost more than the scan
    from_top = _helpers().kth_from_top
    n = hist.shape[0]
    if n >= 1 << 16 and n % _KTH_BLOCK == 0:  # two levels: the block that holds it (vectorised sums), then its bin
        blk, rest = from_top(hist.reshape(-1, _KTH_BLOCK).sum(axis=1, dtype=np.int64), int(k))
        if blk < 0:
            return -1, int(k)
        b, rest = from_top(hist[blk * _KTH_BLOCK:(blk + 1) * _KTH_BLOCK], int(rest))
        return int(blk * _KTH_BLOCK + b), int(rest)
    b, rest = from_top(hist, int(k))
    return int(b), int(rest)


#: bins per block of :func:`_kth_from_top`'s first level (histograms of ``2**16`` bins or more)
_KTH_BLOCK = 1024


def kth_bin(hist: np.ndarray, k: int) -> int:
    """The bin of ``hist`` (counts of the values' high 16 bits) holding the ``k``-th largest value
    (-1 when it counts fewer than ``k``)."""
    return _kth_from_top(hist, k)[0]


def kth_from_hist(hist: np.ndarray, k: int, low_hist) -> float:
    """The ``k``-th largest of non-negative float32 values (``1 <= k <=`` their count) from ``hist``
    (``2**15`` int64 bins of their high 16 bits) and ``low_hist(b)`` (``2**16`` bins of the low 16
    bits of the values whose high bits are ``b``: one more pass): the value whose bit pattern is
    ``(b << 16) | low``. Non-negative float32 values order like their bit patterns as integers."""
    b, rest = _kth_from_top(hist, k)  # rest: its rank inside bin b (1 = largest)
    low = _kth_from_top(low_hist(b), rest)[0] if b >= 0 else -1
    if low < 0:
        raise ValueError("hist does not describe tau (a stale histogram?)")
    return float(np.array([(b << 16) | low], np.int32).view(np.float32)[0])
