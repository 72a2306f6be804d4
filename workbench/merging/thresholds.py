"""TIES thresholds of the compiled CPU merge (:mod:`workbench.merging.kernels`): the generated
histogram pass over every expert's ``|tau_i|`` and the exact order statistics read from it.

- per tensor (:func:`tensor_thresholds`): expert i's exact ``k``-th largest ``|tau_i|`` (after DARE's
  drop), ``k = round(density * numel)``, as :func:`workbench.merging.ties_dare._trim_`. On a tensor of
  :data:`WINDOW_MIN_ENTRIES` or more, one pass where a sample (1/16 of the entries) predicts a window of
  at most :data:`WINDOW_BINS` bins (high 16 bits) around each threshold: that pass counts the entries
  above the window (vectorised) and the low 16 bits of those inside it (a rarely taken branch), which
  gives the ``k``-th largest's bit pattern whenever the window holds it; elsewhere (and on smaller
  tensors) two passes: the high 16 bits of every ``|tau_i|``, then the low 16 bits of the entries in
  the threshold's bin (:func:`workbench.cpu_kernels.kth_from_hist`). Either way the same value: the
  ``k``-th largest bit pattern, counted exactly;
- global (:func:`global_trim_thresholds`): per expert the exact ``ceil(density * total)``-th largest
  non-zero ``|tau_i|`` over all merged tensors (as :func:`workbench.engine.global_trim_thresholds`),
  by the two passes over every tensor.

Each pass reads all experts together, threads over column ranges. Memory: the histograms
(``[N, 2**16]`` int64 and the window's ``[N, WINDOW_BINS * 2**16]`` int32, 7.5 MiB for 3 experts)
are kept per calling thread and reused from tensor to tensor.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Any, Callable

import numpy as np

from .. import cpu_kernels as K
from ..errors import ConfigError
from .kernels import MergeSettings, _chunk, _dare_drop_source, _helpers, kernel_view

__all__ = ["WINDOW_MIN_ENTRIES", "WINDOW_BINS", "SAMPLE_SLICES", "tensor_thresholds", "global_trim_thresholds"]


def _hist_source(N: int, helpers: str) -> str:
    """Source of ``hists(m_0 .. m_{N-1}, base, pos0, dare, keys, p_int, keep, skip_zeros, low, hbins, hist,
    window) -> bool``: the histograms of every expert's ``|x_i|`` in one pass over the inputs, ``x_i = m_i - base``
    (DARE-dropped, ``x_i * keep_draw_i / keep``, when ``dare``; ``pos0`` the position of entry 0):
    ``hist[i, bits >> 16] += 1``, or when ``low``, ``hist[i, bits & 0xFFFF] += 1`` for the entries
    with ``bits >> 16 == hbins[i]`` (none when ``hbins[i] < 0``); exact zeros left out when
    ``skip_zeros``. With ``window`` (``[N, W << 16]`` int32, ``W > 0``, not with ``low`` nor
    ``skip_zeros``) instead: the low 16 bits of the entries whose high bits ``h`` lie in ``hbins[i] <= h
    < hbins[i] + W``, ``window[i, (h - hbins[i]) << 16 | bits & 0xFFFF] += 1`` (an index monotone in
    the value), and the number of entries above them in ``hist[i, 0]``. Returns whether every ``x_i`` is finite (when
    not, the histograms are incomplete). Block by block: the vectorised ``|x_i|`` bits into a small
    buffer, then the scatter."""
    r = range(N)
    L: list[str] = []
    A = L.append
    A("import numpy as np")
    A("from numba import njit")
    A(f"from {helpers} import ld, f32_to_bits")
    A("")
    A("@njit(cache=True, nogil=True, boundscheck=False, error_model='numpy')")
    A("def hists(" + ", ".join(f"m{i}" for i in r) + ", base, pos0, dare, keys, p_int, keep, skip_zeros, low, "
      "hbins, hist, window):")
    A("    width = window.shape[1] >> 16")
    A("    uwidth = np.uint64(width)")
    A(f"    buf = np.empty(({N}, 4096), np.int32)")
    A("    n = base.shape[0]")
    A("    pu = np.uint32(p_int)")
    A("    top = np.int32(0)  # int32 throughout: an int64 max would not vectorise")
    L.extend(K.dare_keys_source(N))
    A("    for s in range(0, n, 4096):")
    A("        e = min(n, s + 4096)")
    # slices indexed from 0, not s + j: numba cannot prove s + j >= 0 and would not vectorise
    A("        bb = base[s:e]")
    for i in r:
        A(f"        y{i} = m{i}[s:e]; r{i} = buf[{i}]")
    A("        for j in range(e - s):")
    A("            bv = ld(bb, j)")
    for i in r:
        A(f"            x{i} = ld(y{i}, j) - bv")
    A("            if dare:")
    A("                pp = np.uint32(pos0 + s + j)")
    L.extend(_dare_drop_source(N, " " * 16))
    for i in r:
        A(f"            a{i} = f32_to_bits(x{i}) & 0x7FFFFFFF")
        A(f"            r{i}[j] = a{i}")
    top = "a0"
    for i in range(1, N):
        top = f"max({top}, a{i})"
    A(f"            top = max(top, {top})")
    A("        if top >= 0x7F800000:")
    A("            return False")
    A(f"        for i in range({N}):")
    A("            hb = hbins[i]")
    A("            ri = buf[i, :e - s]")
    A("            hi = hist[i]")
    A("            if low:")
    A("                for j in range(ri.shape[0]):")
    A("                    a = ri[j]")
    A("                    if (a >> 16) == hb and (a != 0 or not skip_zeros):")
    A("                        hi[a & 0xFFFF] += 1")
    A("            elif width > 0:  # no high histogram: the count above the window, the window's low bits")
    A("                upper = np.int32(min(hb + width, 0x7F80) << 16)  # the Inf pattern: every finite bits below")
    A("                above = 0")
    A("                for j in range(ri.shape[0]):  # vectorised")
    A("                    above += ri[j] >= upper")
    A("                hi[0] += above")
    A("                wi = window[i]")
    A("                for j in range(ri.shape[0]):")
    A("                    a = ri[j]")
    A("                    d = np.uint64((a >> 16) - hb)")
    A("                    if d < uwidth:  # one compare, rarely true: no mispredicted branch")
    A("                        wi[(d << 16) | np.uint64(a & 0xFFFF)] += 1")
    A("            elif skip_zeros:")
    A("                for j in range(ri.shape[0]):")
    A("                    if ri[j] != 0:")
    A("                        hi[ri[j] >> 16] += 1")
    A("            else:")
    A("                for j in range(ri.shape[0]):")
    A("                    hi[ri[j] >> 16] += 1")
    A("    return True")
    return "\n".join(L) + "\n"


@functools.lru_cache(maxsize=None)
def _hist_kernel(N: int):
    if not 1 <= N <= K.MAX_KERNEL_EXPERTS:
        raise ValueError(f"the compiled merge handles 1..{K.MAX_KERNEL_EXPERTS} experts, got {N}")
    return K._load_module(f"merge_hist_n{N}", _hist_source(N, _helpers().__name__)).hists


_HIST_BUFFERS = threading.local()
#: tensors of at least this many entries get their per-tensor TIES thresholds in one pass where a
#: sample predicts the threshold's bin (:func:`tensor_thresholds`); smaller ones take the two passes
WINDOW_MIN_ENTRIES = 1 << 18
#: at most this many bins around the sample's prediction have their low 16 bits counted in the
#: first pass (``[N, WINDOW_BINS << 16]`` int32 per thread)
WINDOW_BINS = 8
#: the sample: this many slices of 1/64 of the tensor each (1/16 of its entries)
SAMPLE_SLICES = 4


def _hist_buffers(count: int, N: int, bins: int, dtype=np.int64) -> list[np.ndarray]:
    """``count`` zeroed ``[N, bins]`` histograms, kept per thread and reused from tensor to
    tensor (fresh ones cost a page fault per 4 KiB on every tensor); valid until the next call
    with the same ``(N, bins, dtype)``."""
    cache = _HIST_BUFFERS.__dict__.setdefault("by_shape", {})
    bufs = cache.setdefault((N, bins, np.dtype(dtype).str), [])
    while len(bufs) < count:
        bufs.append(np.zeros((N, bins), dtype))
    for h in bufs[:count]:
        h.fill(0)
    return bufs[:count]


def _hist_pass(b, mains: list, dare: bool, keys: np.ndarray, p_int: int, keep, skip_zeros: bool,
               hbins: np.ndarray | None, pool, workers: int, window: int = 0):
    """Every expert's histogram of ``|tau_i|`` in one pass over a tensor (the generated ``hists``:
    high 16 bits, ``[N, 2**15]``, or with ``hbins`` the low 16 bits of bin ``hbins[i]``'s entries,
    ``[N, 2**16]``), threads over column ranges; ``None`` when a ``tau_i`` is not finite. With
    ``window`` (a width ``W``; ``hbins`` its first bins): ``(above, lows)``, ``above [N]`` the
    number of entries above bin ``hbins[i] + W - 1`` and ``lows [N, W << 16]`` the low 16 bits of
    those in bins ``hbins[i] .. hbins[i] + W - 1``, int32 (a range of fewer than ``2**31``
    entries: every tensor the caller passes)."""
    N = len(mains)
    low = hbins is not None and not window
    bins = np.asarray(hbins, np.int64) if hbins is not None else np.zeros(N, np.int64)
    ranges = K.column_ranges(int(b.shape[0]), pool, workers)
    hs = _hist_buffers(len(ranges), N, 1 if window else 1 << (16 if low else 15))
    ws = _hist_buffers(len(ranges), N, window << 16, np.int32)
    hist = _hist_kernel(N)
    ok = K.run_ranges(pool, lambda j, lo, ln: hist(
        *[m[lo:lo + ln] for m in mains], b[lo:lo + ln], lo, dare, keys, p_int, keep, skip_zeros, low, bins, hs[j],
        ws[j]), ranges)
    if not all(ok):
        return None
    for h, w in zip(hs[1:], ws[1:]):
        hs[0] += h
        ws[0] += w
    return (hs[0][:, 0], ws[0]) if window else hs[0]


def _predicted_window(b, mains: list, args: tuple, k: int, pool) -> tuple[np.ndarray, int] | None:
    """``(first, width)``: bins ``first[i] .. first[i] + width - 1`` (high 16 bits) that should hold
    expert i's ``k``-th largest ``|tau_i|``: from a sample of :data:`SAMPLE_SLICES` slices spread
    over the tensor (1/16 of its entries), the bins of the ranks ``k`` scaled to the sample, plus
    and minus four standard deviations of a sampled rank; ``width`` a power of two, at most
    :data:`WINDOW_BINS` (around the scaled rank's bin where more would be needed). ``None``
    when a sampled ``tau_i`` is not finite."""
    n = int(b.shape[0])
    N = len(mains)
    size = n // (16 * SAMPLE_SLICES)
    slices = [(j * n // SAMPLE_SLICES, size) for j in range(SAMPLE_SLICES)]
    hs = _hist_buffers(len(slices), N, 1 << 15)
    no_window = np.zeros((N, 0), np.int32)
    hist = _hist_kernel(N)
    ok = K.run_ranges(pool, lambda j, lo, ln: hist(
        *[m[lo:lo + ln] for m in mains], b[lo:lo + ln], lo, *args, False, np.zeros(N, np.int64), hs[j], no_window),
        slices)
    if not all(ok):
        return None
    for h in hs[1:]:
        hs[0] += h
    m = size * SAMPLE_SLICES
    rank = k * m / n
    spread = 4 * math.sqrt(m * (k / n) * (1 - k / n)) + 1
    lo_rank, hi_rank = max(1, math.floor(rank - spread)), min(m, math.ceil(rank + spread))
    top = np.array([K.kth_bin(h, lo_rank) for h in hs[0]], np.int64)  # bins of larger values: higher
    bottom = np.array([K.kth_bin(h, hi_rank) for h in hs[0]], np.int64)
    width = 1 << max(0, int(np.max(top - bottom))).bit_length()
    if width > WINDOW_BINS:
        width = WINDOW_BINS
        mid = np.array([K.kth_bin(h, max(1, round(rank))) for h in hs[0]], np.int64)
        return np.maximum(mid - width // 2, 0), width
    return bottom, width


def tensor_thresholds(s: MergeSettings, base, mains: list, keys: np.ndarray, pool, workers: int) -> np.ndarray:
    """Per-tensor TIES thresholds: expert i's exact ``k``-th largest ``|tau_i|`` (after DARE's drop),
    ``k = max(1, min(n, round(density * n)))``; 0 (keep all) when ``k = n`` or the value is 0. Two
    passes over the tensor for all experts together (high, then low 16 bits); on tensors of
    :data:`WINDOW_MIN_ENTRIES` or more, one pass where it can: a sample (1/16 of the entries)
    predicts a window of at most :data:`WINDOW_BINS` bins around each threshold, and one pass
    counts the entries above the window and the low 16 bits of those inside it, which holds the
    ``k``-th largest when fewer than ``k`` are above and at least ``k`` are above or inside (the
    same value, read from the same bit patterns); the two passes run where it does not."""
    n = int(base.shape[0])
    N = len(mains)
    thr = np.zeros(N, np.float32)
    k = max(1, min(n, int(round(s.density * n)))) if n else n
    if s.combine != "ties" or s.gthr is not None or k == n:
        return thr
    if not isinstance(base, np.ndarray) or any(not isinstance(m, np.ndarray) for m in mains):
        # a float32 copy of the rows (only for float16 / float64 checkpoints)
        base = _chunk(base, 0, n, np.empty(n, np.float32))
        mains = [_chunk(m, 0, n, np.empty(n, np.float32)) for m in mains]
    args = (s.dare, keys, s.p_int, s.keep, False)
    predicted = _predicted_window(base, mains, args, k, pool) \
        if max(WINDOW_MIN_ENTRIES, 64 * SAMPLE_SLICES) <= n < 2 ** 31 else None
    if predicted is not None:
        first, width = predicted
        above, window = _hist_pass(base, mains, *args, first, pool, workers, width) or (None, None)
        if above is None:
            raise FloatingPointError
        rank = k - above  # of the k-th largest among the window's entries, from the top
        # the window's index of each: -1 where the window holds fewer than rank entries (it is below)
        found = [K.kth_bin(window[i], int(rank[i])) if rank[i] >= 1 else -1 for i in range(N)]
        if min(found) >= 0:
            patterns = (first << 16) + np.array(found, np.int64)
            thr[:] = patterns.astype(np.int32).view(np.float32)
            return np.where(thr > 0, thr, np.float32(0.0))
    high = _hist_pass(base, mains, *args, None, pool, workers)
    if high is None:
        raise FloatingPointError
    lows = _hist_pass(base, mains, *args, np.array([K.kth_bin(h, k) for h in high]), pool, workers)
    for i in range(N):
        t = K.kth_from_hist(high[i], k, lambda b, i=i: lows[i])
        thr[i] = t if t > 0 else 0.0
    return thr


def global_trim_thresholds(tensors: Callable[[], Any], n_experts: int, density: float, *, pool=None,
                           workers: int = 1, progress: bool = True) -> list[float] | None:
    """TIES' global trim thresholds (:func:`workbench.engine.global_trim_thresholds`' definition:
    per expert the exact ``ceil(density * total)``-th largest non-zero ``|tau_i|`` over all merged
    tensors, 0.0 when fewer are non-zero), by two histogram passes. ``tensors()`` yields
    ``(base, [experts])`` torch tensors (memory-mapped) once per call. Returns ``None`` when a
    task vector is not finite (the caller finds it and raises)."""
    from tqdm.auto import tqdm

    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")

    def each(desc: str):
        for base, experts in tqdm(tensors(), desc=desc, disable=not progress, leave=False):
            b = kernel_view(base)
            ms = [kernel_view(e) for e in experts]
            n = base.numel()
            if not isinstance(b, np.ndarray) or any(not isinstance(m, np.ndarray) for m in ms):
                b = _chunk(b, 0, n, np.empty(n, np.float32)).copy()
                ms = [_chunk(m, 0, n, np.empty(n, np.float32)).copy() for m in ms]
            yield n, b, ms

    no_keys = np.zeros(((n_experts + 1) // 2, 2), np.uint32)

    def pass_(desc: str, low: bool, bins: list[int]) -> tuple[np.ndarray, int] | None:
        hists = np.zeros((n_experts, 1 << (16 if low else 15)), np.int64)
        total = 0
        for n, b, ms in each(desc):
            total += n
            h = _hist_pass(b, ms, False, no_keys, 0, np.float32(1.0), True, bins if low else None, pool, workers)
            if h is None:
                return None
            hists += h
        return hists, total

    first = pass_("global trim 1/2", False, [])
    if first is None:
        return None
    hists, total = first
    k = max(1, math.ceil(density * total))
    targets = []
    for hist in hists:
        if int(hist.sum()) < k:
            targets.append(None)
            continue
        targets.append(K.kth_bin(hist, k))
    lows: list[np.ndarray] = [np.zeros(0)] * n_experts
    if any(t is not None for t in targets):
        second = pass_("global trim 2/2", True, [-1 if t is None else t for t in targets])
        if second is None:
            return None
        lows = second[0]
    return [0.0 if t is None else K.kth_from_hist(hists[i], k, lambda b, i=i: lows[i])
            for i, t in enumerate(targets)]
