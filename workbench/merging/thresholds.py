"""TIES thresholds of the compiled CPU merge (:mod:`workbench.merging.kernels`): the generated
passes over every expert's ``|tau_i|`` and the exact order statistics read from them.

- per tensor (:func:`tensor_thresholds`): expert i's exact ``k``-th largest ``|tau_i|`` (after DARE's
  drop), ``k = round(density * numel)``, as :func:`workbench.merging.ties_dare._trim_`. On a tensor of
  :data:`WINDOW_MIN_ENTRIES` or more, one pass where a sample (1/16 of the entries) predicts a window of
  at most :data:`WINDOW_BINS` bins (high 16 bits) around each threshold: that pass counts the entries
  above the window and collects the bit patterns of those inside it (about one in a hundred), which
  gives the ``k``-th largest's bit pattern whenever the window holds it; elsewhere (and on smaller
  tensors) two passes: the high 16 bits of every ``|tau_i|``, then the low 16 bits of the entries in
  the threshold's bin (:func:`workbench.cpu_kernels.kth_from_hist`). Either way the same value: the
  ``k``-th largest bit pattern, counted exactly;
- global (:func:`global_trim_thresholds`): per expert the exact ``ceil(density * total)``-th largest
  non-zero ``|tau_i|`` over all merged tensors (as :func:`workbench.engine.global_trim_thresholds`),
  by the two passes over every tensor.

Each pass reads all experts together, threads over column ranges; DARE's drop is compiled in or out
(one kernel each). Memory, kept per calling thread and reused from tensor to tensor: the histograms
(``[N, 2**16]`` int64 per column range, 1.5 MiB for 3 experts; the sample's ``[N, 2**15]`` int32 per
slice, 1.5 MiB in all), the window pass's candidates (per column range and expert a power of two of
int32, from the sample's expectation, at most :data:`MAX_CANDIDATES`: 2 MiB; with every smaller size
kept too, at most 4 MiB per range and expert, 24 MiB for 3 experts and 2 threads): about 30 MiB.
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

__all__ = ["WINDOW_MIN_ENTRIES", "WINDOW_BINS", "SAMPLE_SLICES", "MAX_CANDIDATES", "tensor_thresholds",
           "global_trim_thresholds"]


def _abs_bits_source(N: int, dare: bool, indent: str) -> list[str]:
    """Generated-kernel source lines that set ``a<i>``, the int32 bits of ``|x_i|`` at entry ``j`` of the
    block (``bb``, ``y<i>``: the block's slices; ``pb``: the block's first position, for DARE)."""
    L = [f"{indent}bv = ld(bb, j)"]
    L += [f"{indent}x{i} = ld(y{i}, j) - bv" for i in range(N)]
    if dare:
        L.append(f"{indent}pp = pb + np.uint32(j)")
        L.extend(_dare_drop_source(N, indent, rescale=False))
    L += [f"{indent}a{i} = f32_to_bits(x{i}) & np.int32(0x7FFFFFFF)" for i in range(N)]
    return L


def _bits_loop_source(N: int, dare: bool) -> list[str]:
    """The block's first loop, vectorised (no reduction in it: one would keep LLVM off the loop): the
    bits of every ``|x_i|`` (:func:`_abs_bits_source`) into the buffer row ``r<i>``; the loop body's
    last line, so a caller may append more of it."""
    L = [f"        r{i} = buf[{i}]" for i in range(N)]
    L.append("        for j in range(e - s):")
    L += _abs_bits_source(N, dare, " " * 12)
    L += [f"            r{i}[j] = a{i}" for i in range(N)]
    return L


def _block_head_source(N: int, dare: bool, with_top: bool = True) -> list[str]:
    """The lines both generated passes start with: the DARE keys, the block loop and its slices."""
    L = ["    n = base.shape[0]",
         "    pu = np.int32(p_int)"]
    if with_top:
        L.append("    top = np.int32(0)")
    if dare:
        L.extend(K.dare_keys_source(N))
    L += ["    for s in range(0, n, 4096):",
          "        e = min(n, s + 4096)",
          "        pb = np.uint32(pos0 + s)",
          # slices indexed from 0, not s + j: numba cannot prove s + j >= 0 and would not vectorise
          "        bb = base[s:e]"]
    L += [f"        y{i} = m{i}[s:e]" for i in range(N)]
    return L


def _hist_source(N: int, dare: bool, helpers: str) -> str:
    """Source of ``hists(m_0 .. m_{N-1}, base, pos0, keys, p_int, skip_zeros, low, hbins, hist) -> bool``:
    the histograms of every expert's ``|x_i|`` in one pass over the inputs, ``x_i = m_i - base``
    (DARE-dropped, ``x_i * keep_draw_i`` without the rescale, when ``dare``: :func:`_rescaled`; ``pos0``
    the position of entry 0):
    ``hist[i, bits >> 16] += 1``, or when ``low``, ``hist[i, bits & 0xFFFF] += 1`` for the entries
    with ``bits >> 16 == hbins[i]`` (none when ``hbins[i] < 0``); exact zeros left out when
    ``skip_zeros``. Returns whether every ``x_i`` is finite (when not, the histograms are
    incomplete). Block by block: the vectorised ``|x_i|`` bits into a small buffer, then the scatter."""
    r = range(N)
    L: list[str] = ["import numpy as np", "from numba import njit", f"from {helpers} import ld, f32_to_bits", "",
                    "@njit(cache=True, nogil=True, boundscheck=False, error_model='numpy')",
                    "def hists(" + ", ".join(f"m{i}" for i in r) + ", base, pos0, keys, p_int, skip_zeros, low, "
                    "hbins, hist):",
                    f"    buf = np.empty(({N}, 4096), np.int32)"]
    A = L.append
    L.extend(_block_head_source(N, dare))
    L.extend(_bits_loop_source(N, dare))
    A(f"        for i in range({N}):  # the finite check: a max reduction of its own (vectorised)")
    A("            ri = buf[i, :e - s]")
    A("            for j in range(ri.shape[0]):")
    A("                top = max(top, ri[j])")
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
    A("            elif skip_zeros:")
    A("                for j in range(ri.shape[0]):")
    A("                    if ri[j] != 0:")
    A("                        hi[ri[j] >> 16] += 1")
    A("            else:")
    A("                for j in range(ri.shape[0]):")
    A("                    hi[ri[j] >> 16] += 1")
    A("    return True")
    return "\n".join(L) + "\n"


def _window_source(N: int, dare: bool, helpers: str) -> str:
    """Source of ``window_hists(m_0 .. m_{N-1}, base, pos0, keys, p_int, first, width, above, found,
    cands) -> bool``: the one-pass threshold count of :func:`tensor_thresholds`. For each expert, of the
    bits ``a`` of ``|x_i|`` (as :func:`_hist_source`), ``above[i] +=`` the number with ``a >= up_i``,
    and those with ``lo_i <= a < up_i`` are counted in ``found[i]`` and appended to ``cands[i]`` while
    it has room (``found[i] > cands.shape[1]`` afterwards: it overflowed), where ``lo_i = first[i] << 16``
    and ``up_i = min(first[i] + width, 0x7F80) << 16`` (bins ``first[i] .. first[i] + width - 1`` of
    the high 16 bits). Returns whether every ``x_i`` is finite.

    Block by block, three loops that LLVM vectorises (one that also kept the counts or the finite
    check as running reductions would not be): the bits of every ``|x_i|`` into a buffer and a
    flag byte (0 or 1) per entry, set where some expert's entry is in its window or not finite; then
    each expert's count above (an int32 reduction over its buffer row); then the non-zero words of
    eight flag bytes (one uint64) listed without a branch. Last, only the flagged entries of those
    words are looked at (the windows hold about one entry in a hundred): each word's lowest set bit
    in turn, its byte found by a multiply (``(bit * 0x0001020304050607) >> 56`` is the byte index
    of a bit ``1 << 8k``). Reading all eight entries of every non-zero word instead took twice
    the time of the whole pass (bfloat16, 3 experts, one core: 2.0 -> 0.9 ns per entry)."""
    r = range(N)
    L: list[str] = ["import numpy as np", "from numba import njit", f"from {helpers} import ld, f32_to_bits", "",
                    "@njit(cache=True, nogil=True, boundscheck=False, error_model='numpy')",
                    "def window_hists(" + ", ".join(f"m{i}" for i in r) + ", base, pos0, keys, p_int, first, "
                    "width, above, found, cands):",
                    f"    buf = np.empty(({N}, 4096), np.int32)",
                    "    flags = np.zeros(4096, np.uint8)",
                    "    words = flags.view(np.uint64)",
                    "    listed = np.empty(512, np.int64)  # a block's non-zero words",
                    "    inf = np.int32(0x7F800000)",
                    "    last = cands.shape[1] - 1  # past it, a candidate is counted, not kept"]
    A = L.append
    for i in r:
        A(f"    lo{i} = np.int32(first[{i}] << 16)")
        A(f"    up{i} = np.int32(min(first[{i}] + width, 0x7F80) << 16)  # at most the Inf pattern")
        A(f"    c{i} = cands[{i}]")
        A(f"    f{i} = found[{i}]")
    L.extend(_block_head_source(N, dare, with_top=False))
    L.extend(_bits_loop_source(N, dare))
    A("            flags[j] = np.uint8(" + " | ".join(f"((a{i} >= lo{i}) & (a{i} < up{i}))" for i in r) + " | ("
      + " | ".join(f"(a{i} >= inf)" for i in r) + "))")
    for i in r:
        A("        ab = np.int32(0)")
        A("        for j in range(e - s):")
        A(f"            ab = np.int32(ab + np.int32(r{i}[j] >= up{i}))")
        A(f"        above[{i}] += ab")
    A("        for j in range(e - s, 4096):  # the last block's tail")
    A("            flags[j] = 0")
    A("        nw = 0")
    A("        for w in range((e - s + 7) >> 3):")
    A("            listed[nw] = w")
    A("            nw += words[w] != 0")
    A("        bad = False")
    A("        for q in range(nw):")
    A("            w = listed[q]")
    A("            wd = words[w]")
    A("            while True:  # its flagged entries (wd != 0): append each expert's, advance past its window's")
    A("                bit = wd & (~wd + np.uint64(1))")
    A("                wd = wd ^ bit")
    A("                j = 8 * w + np.int64((bit * np.uint64(0x0001020304050607)) >> np.uint64(56))")
    for i in r:
        A(f"                a = r{i}[j]")
        A("                bad = bad | (a >= inf)")
        A(f"                c{i}[min(f{i}, last)] = a")
        A(f"                f{i} += (a >= lo{i}) & (a < up{i})")
    A("                if wd == 0:")
    A("                    break")
    A("        if bad:")
    A("            return False")
    for i in r:
        A(f"    found[{i}] = f{i}")
    A("    return True")
    return "\n".join(L) + "\n"


@functools.lru_cache(maxsize=None)
def _hist_kernel(N: int, dare: bool):
    if not 1 <= N <= K.MAX_KERNEL_EXPERTS:
        raise ValueError(f"the compiled merge handles 1..{K.MAX_KERNEL_EXPERTS} experts, got {N}")
    stem = f"merge_hist_n{N}" + ("_dare" if dare else "")
    return K._load_module(stem, _hist_source(N, dare, _helpers().__name__)).hists


@functools.lru_cache(maxsize=None)
def _window_kernel(N: int, dare: bool):
    if not 1 <= N <= K.MAX_KERNEL_EXPERTS:
        raise ValueError(f"the compiled merge handles 1..{K.MAX_KERNEL_EXPERTS} experts, got {N}")
    stem = f"merge_window_n{N}" + ("_dare" if dare else "")
    return K._load_module(stem, _window_source(N, dare, _helpers().__name__)).window_hists


_HIST_BUFFERS = threading.local()
#: tensors of at least this many entries get their per-tensor TIES thresholds in one pass where a
#: sample predicts the threshold's bin (:func:`tensor_thresholds`); smaller ones take the two passes
WINDOW_MIN_ENTRIES = 1 << 18
#: the window around the sample's prediction spans at most this many bins (of the high 16 bits)
WINDOW_BINS = 8
#: the sample: this many slices of 1/64 of the tensor each (1/16 of its entries)
SAMPLE_SLICES = 4
#: at most this many candidates (bit patterns of the entries in the window) per expert and thread,
#: int32: 2 MiB each; a tensor whose sample expects more (1.5 times a thread's share) takes the two passes
MAX_CANDIDATES = 1 << 19


def _hist_buffers(purpose: str, count: int, N: int, bins: int, dtype=np.int64, zero: bool = True
                  ) -> list[np.ndarray]:
    """``count`` zeroed (with ``zero``) ``[N, bins]`` arrays for one ``purpose`` (``"hist"``, ``"sample"``,
    ``"counts"``, ``"candidates"``), kept per thread and reused from tensor to tensor (fresh
    ones cost a page fault per 4 KiB on every tensor); valid until the next call with the same
    ``(purpose, N, bins, dtype)``. Keyed by purpose, not shape alone, so one pass never hands another's
    arrays around (a candidate buffer and the histograms can have one shape)."""
    cache = _HIST_BUFFERS.__dict__.setdefault("by_purpose", {})
    bufs = cache.setdefault((purpose, N, bins, np.dtype(dtype).str), [])
    while len(bufs) < count:
        bufs.append(np.zeros((N, bins), dtype))
    if zero:
        for h in bufs[:count]:
            h.fill(0)
    return bufs[:count]


def _hist_pass(b, mains: list, dare: bool, keys: np.ndarray, p_int: int, skip_zeros: bool,
               hbins: np.ndarray | None, pool, workers: int):
    """Every expert's histogram of ``|tau_i|`` in one pass over a tensor (the generated ``hists``:
    high 16 bits, ``[N, 2**15]``, or with ``hbins`` the low 16 bits of bin ``hbins[i]``'s entries,
    ``[N, 2**16]``), threads over column ranges; ``None`` when a ``tau_i`` is not finite."""
    N = len(mains)
    low = hbins is not None
    bins = np.asarray(hbins, np.int64) if low else np.zeros(N, np.int64)
    ranges = K.column_ranges(int(b.shape[0]), pool, workers)
    hs = _hist_buffers("hist", len(ranges), N, 1 << (16 if low else 15))
    hist = _hist_kernel(N, bool(dare))
    ok = K.run_ranges(pool, lambda j, lo, ln: hist(
        *[m[lo:lo + ln] for m in mains], b[lo:lo + ln], lo, keys, p_int, skip_zeros, low, bins, hs[j]), ranges)
    if not all(ok):
        return None
    for h in hs[1:]:
        hs[0] += h
    return hs[0]


def _window_pass(b, mains: list, dare: bool, keys: np.ndarray, p_int: int, first: np.ndarray, width: int,
                 room: int, pool, workers: int) -> tuple[np.ndarray, list[np.ndarray] | None] | None:
    """``(above, candidates)`` in one pass over a tensor (the generated ``window_hists``, threads over
    column ranges): ``above [N]`` the number of entries above bin ``first[i] + width - 1`` and
    ``candidates[i]`` the bit patterns (int32) of expert i's entries in bins ``first[i] .. first[i] +
    width - 1``, or ``None`` for all when a thread found more than ``room`` for an expert; ``None``
    when a ``tau_i`` is not finite."""
    N = len(mains)
    ranges = K.column_ranges(int(b.shape[0]), pool, workers)
    counts = _hist_buffers("counts", len(ranges), 2, N)  # [above, found] per thread
    cands = _hist_buffers("candidates", len(ranges), N, room, np.int32, zero=False)
    firsts = np.asarray(first, np.int64)
    count = _window_kernel(N, bool(dare))
    ok = K.run_ranges(pool, lambda j, lo, ln: count(
        *[m[lo:lo + ln] for m in mains], b[lo:lo + ln], lo, keys, p_int, firsts, width, counts[j][0],
        counts[j][1], cands[j]), ranges)
    if not all(ok):
        return None
    above = sum(c[0] for c in counts)
    if any((c[1] > room).any() for c in counts):
        return above, None
    return above, [np.concatenate([c[i, :n[1][i]] for c, n in zip(cands, counts)]) for i in range(N)]


def _predicted_window(b, mains: list, args: tuple, k: int, pool) -> tuple[np.ndarray, int, int] | None:
    """``(first, width, expected)``: bins ``first[i] .. first[i] + width - 1`` (high 16 bits) that
    should hold expert i's ``k``-th largest ``|tau_i|``, and the largest number of an expert's entries
    the sample puts in them, scaled to the tensor: from a sample of :data:`SAMPLE_SLICES` slices
    spread over the tensor (1/16 of its entries), the bins of the ranks ``k`` scaled to the sample,
    plus and minus four standard deviations of a sampled rank; ``width`` the bins between them (the
    same for every expert), at most :data:`WINDOW_BINS` (around the scaled rank's bin where more would
    be needed). ``None`` when a sampled ``tau_i`` is not finite."""
    n = int(b.shape[0])
    N = len(mains)
    size = n // (16 * SAMPLE_SLICES)
    slices = [(j * n // SAMPLE_SLICES, size) for j in range(SAMPLE_SLICES)]
    hs = _hist_buffers("sample", len(slices), N, 1 << 15, np.int32)
    dare, keys, p_int = args
    hist = _hist_kernel(N, bool(dare))
    ok = K.run_ranges(pool, lambda j, lo, ln: hist(
        *[m[lo:lo + ln] for m in mains], b[lo:lo + ln], lo, keys, p_int, False, False, np.zeros(N, np.int64),
        hs[j]), slices)
    if not all(ok):
        return None
    sample = hs[0]  # int32: a sample of fewer than 2**31 entries
    for h in hs[1:]:
        sample += h
    m = size * SAMPLE_SLICES
    rank = k * m / n
    spread = 4 * math.sqrt(m * (k / n) * (1 - k / n)) + 1
    lo_rank, hi_rank = max(1, math.floor(rank - spread)), min(m, math.ceil(rank + spread))
    top = np.array([K.kth_bin(h, lo_rank) for h in sample], np.int64)  # bins of larger values: higher
    first = np.array([K.kth_bin(h, hi_rank) for h in sample], np.int64)
    width = int(np.max(top - first)) + 1
    if width > WINDOW_BINS:
        width = WINDOW_BINS
        mid = np.array([K.kth_bin(h, max(1, round(rank))) for h in sample], np.int64)
        first = np.maximum(mid - width // 2, 0)
    inside = max(int(h[f:f + width].sum()) for h, f in zip(sample, first))
    return first, width, math.ceil(inside * n / m)


def tensor_thresholds(s: MergeSettings, base, mains: list, keys: np.ndarray, pool, workers: int) -> np.ndarray:
    """Per-tensor TIES thresholds: expert i's exact ``k``-th largest ``|tau_i|`` (after DARE's drop),
    ``k = max(1, min(n, round(density * n)))``; 0 (keep all) when ``k = n`` or the value is 0. Two
    passes over the tensor for all experts together (high, then low 16 bits); on tensors of
    :data:`WINDOW_MIN_ENTRIES` or more, one pass where it can: a sample (1/16 of the entries)
    predicts a window of at most :data:`WINDOW_BINS` bins around each threshold, and one pass
    counts the entries above the window and collects the bit patterns of those inside it (at most
    :data:`MAX_CANDIDATES` per expert and thread), which hold the ``k``-th largest when fewer than
    ``k`` are above and at least ``k`` are above or inside: the same bit pattern, selected from the
    candidates (:func:`kth_candidate` of the kernels' helpers); the two passes run where it does not."""
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
    args = (s.dare, keys, s.p_int)
    predicted = _predicted_window(base, mains, args, k, pool) \
        if max(WINDOW_MIN_ENTRIES, 64 * SAMPLE_SLICES) <= n < 2 ** 31 else None
    # room for the candidates: per thread 1.5 times its share of the expected number, a power of two
    share = 1.5 * predicted[2] / len(K.column_ranges(n, pool, workers)) + 4096 if predicted is not None else 0
    if predicted is not None and share <= MAX_CANDIDATES:
        first, width, _ = predicted
        room = 1 << (math.ceil(share) - 1).bit_length()
        above, cands = _window_pass(base, mains, *args, first, width, min(room, MAX_CANDIDATES), pool, workers) \
            or (None, None)
        if above is None:
            raise FloatingPointError
        rank = k - above  # of the k-th largest among the window's entries, from the top
        if cands is not None and all(1 <= rank[i] <= len(cands[i]) for i in range(N)):
            select = _helpers().kth_candidate
            thr[:] = np.array([select(cands[i], int(first[i]) << 16, width, int(rank[i])) for i in range(N)],
                              np.int32).view(np.float32)
            return _rescaled(s, np.where(thr > 0, thr, np.float32(0.0)))
    high = _hist_pass(base, mains, *args, False, None, pool, workers)
    if high is None:
        raise FloatingPointError
    lows = _hist_pass(base, mains, *args, False, np.array([K.kth_bin(h, k) for h in high]), pool, workers)
    for i in range(N):
        t = K.kth_from_hist(high[i], k, lambda b, i=i: lows[i])
        thr[i] = t if t > 0 else 0.0
    return _rescaled(s, thr)


def _rescaled(s: MergeSettings, thr: np.ndarray) -> np.ndarray:
    """DARE-TIES: the passes count ``|x_i * keep_mask|`` without the rescale (three divisions per entry
    saved); ``v -> v / keep`` rounded (float32, as the fused pass and torch divide) never decreases, so
    the ``k``-th largest of the rescaled magnitudes is the ``k``-th largest of these, divided."""
    if not s.dare:
        return thr
    with np.errstate(over="ignore"):  # an Inf threshold: the fused pass then reports the Inf entries
        return (thr / s.keep).astype(np.float32)


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
            h = _hist_pass(b, ms, False, no_keys, 0, True, bins if low else None, pool, workers)
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
