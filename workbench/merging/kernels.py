"""Compiled CPU merges: weight average, task arithmetic, DARE linear, TIES and DARE-TIES as one
fused pass per row chunk, reading the stored tensors straight from their memory maps.

The torch methods (:mod:`workbench.merging`) are the reference and the GPU path; on a CPU each of
their steps (bf16 -> fp32 copies of whole stacked tensors, ``|tau|``, the masks, the elected sign,
the mean) is a separate pass over ``[N, numel]`` float32 temporaries. Here, as in the interference
profile's kernels (:mod:`workbench.cpu_kernels`, whose machinery this reuses: the generated
source per number of experts cached on disk, ``ld`` reading bfloat16 as its uint16 bits, the exact
top-k threshold from two 16-bit histograms, the counter-based DARE draw, threads over column
ranges), every output entry is computed in one loop iteration with ``N`` unrolled, and written
straight into the output dtype (bfloat16 rounded to nearest even, as torch; float32 as is; other
dtypes through a float32 chunk and torch's cast).

**The same values as the torch path, bit for bit**: every float32 operation is the torch path's, in
its order (``tau_i = theta_i - theta_0``; the global trim's ``theta_0 + where(|tau| >= t, tau, 0)``
round trip; DARE's ``tau * keep / (1 - p)``; the trim ``tau * (|tau| >= t)``; the elected sign of
the sequential sum; the disjoint mean ``(sum_i max(tau_i gamma, 0)) gamma / count``; the weighted
sum; ``scale * tau_m + theta_0``), compiled without fast-math (no reassociation, no fused
multiply-add). The TIES thresholds (per tensor and global) are the exact order statistics of
:mod:`workbench.merging.thresholds`. A non-finite input makes its output entry NaN and a
non-finite stored entry is found after the chunk (a bfloat16 output also when a finite float32
result rounds to Inf; :func:`_kernel_source`); no torch operation runs per chunk. One kernel per
number of experts and combination of flags (method, global trim, DARE), so the loop is branch-free
and vectorised.
``tests/test_merge_kernels.py`` checks all of it against the torch methods. One exception: from
five experts on, torch sums over the experts in an order of its own (not sequential), so the float32
sums, and then the outputs, may differ in the last bit (tested: within one unit in the last place of
the output dtype); up to four experts the two paths are bit-identical.

**Memory**: inputs are read through the memory maps (page cache, not anonymous memory); the work
goes in row chunks of :data:`CHUNK_ENTRIES` entries, so the anonymous memory a tensor needs is two
output chunks (``CHUNK_ENTRIES`` x 4 bytes = 4 MiB each at most: one is written to the output file,
:meth:`workbench.io.writer.CheckpointWriter.add_parts`, on a pool thread while the next is
computed; plus a float32 staging chunk per input that is neither bfloat16 nor float32) and the
threshold passes' histograms and candidates (:mod:`workbench.merging.thresholds`: about 30 MiB for 3
experts and 2 threads), whatever the tensor's size. (Checkpoints stored in float16 or float64 are the
exception for TIES: its threshold passes read a float32 copy of the tensor's rows.)

**DARE**: the keep draw is :mod:`workbench.cpu_kernels`' counter-based draw (seed = the
tensor's :func:`workbench.engine.tensor_seed`, position = the flat index), identical on every device;
the torch methods draw the same (:func:`workbench.merging.dare_drop`).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import cpu_kernels as K
from ..errors import ConfigError
from .common import check_density, check_drop_rate, expert_weights
from .ties_dare import check_trim

__all__ = ["COMPILED_METHODS", "CHUNK_ENTRIES", "compiled_merge_available", "MergeSettings", "merge_settings",
           "merge_tensor", "task_vector_sq", "kernel_view"]

#: methods with a compiled CPU path
COMPILED_METHODS = ("weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties")
#: entries per row chunk (whole rows where a row is shorter): 4 MiB of float32 output
CHUNK_ENTRIES = 1 << 20
#: ``WORKBENCH_COMPILED_MERGE=0`` turns the compiled path off (the torch methods run instead)
ENV_SWITCH = "WORKBENCH_COMPILED_MERGE"


def compiled_merge_available(method: str, params: dict, device: torch.device, n_experts: int,
                             all_full: bool) -> bool:
    """Whether :func:`merge_tensor` can run this merge: a CPU device, a method of
    :data:`COMPILED_METHODS` with full-checkpoint experts (no LoRA adapter), at most
    :data:`kernels.MAX_KERNEL_EXPERTS` experts, numba importable, not switched off by
    ``WORKBENCH_COMPILED_MERGE=0``."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or device.type != "cpu" or method not in COMPILED_METHODS:
        return False
    if not all_full or not 1 <= n_experts <= K.MAX_KERNEL_EXPERTS:
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------- settings
class MergeSettings:
    """One method's parameters as the kernel takes them (built once per merge)."""

    def __init__(self, combine: str, n: int, *, scale: float = 1.0, coef: Sequence[float] | None = None,
                 density: float = 1.0, drop_rate: float = 0.0, dare: bool = False,
                 global_thresholds: Sequence[float] | None = None):
        self.combine = combine  # "mean" | "sum" | "ties"
        self.n = n
        self.scale = np.float32(scale)
        self.coef = np.asarray([1.0] * n if coef is None else coef, np.float32)
        self.density = float(density)
        self.dare = bool(dare)
        self.p_int = K.dare_keep_threshold(drop_rate) if dare else 0
        self.keep = np.float32(1.0 - float(drop_rate))  # torch's div_(1 - p) of a float32 tensor
        self.gthr = None if global_thresholds is None else np.asarray(global_thresholds, np.float32)


def merge_settings(method: str, params: dict, n: int, global_thresholds: Sequence[float] | None) -> MergeSettings:
    """:class:`MergeSettings` of a method of :data:`COMPILED_METHODS` with checked ``params``
    (the same checks and defaults as the torch methods)."""

    scale = float(params.get("scale", 1.0))
    if method in ("weight_average", "task_arithmetic"):
        weights = params.get("weights")
        if method == "weight_average" and weights is None and scale == 1.0:
            return MergeSettings("mean", n)
        default = 1.0 / n if method == "weight_average" else 1.0
        coef = expert_weights(weights, n, default, "cpu").numpy()
        return MergeSettings("sum", n, scale=scale, coef=coef)
    if method == "dare_linear":
        return MergeSettings("sum", n, scale=scale, drop_rate=check_drop_rate(params.get("drop_rate", 0.2)), dare=True)
    # ties / dare_ties: the engine passes global thresholds with density 1 (global trim)
    check_trim(str(params.get("trim", "per_tensor")), global_thresholds if params.get("trim") == "global" else None)
    density = check_density(params.get("density", 0.2))
    dare = method == "dare_ties"
    drop = check_drop_rate(params.get("drop_rate", 0.2)) if dare else 0.0
    if global_thresholds is not None and len(global_thresholds) != n:
        raise ConfigError(f"{len(global_thresholds)} trim thresholds for {n} experts")
    return MergeSettings("ties", n, scale=scale, density=density, drop_rate=drop, dare=dare,
                         global_thresholds=global_thresholds)


# ---------------------------------------------------------------------------------------- sources
_HELPERS = '''import numpy as np
from numba import njit
from numba.core import types
from numba.extending import overload
from {helpers} import ld, f32_to_bits, kth_from_top


def st(a, j, v):
    """Store float32 ``v`` as entry ``j``: bfloat16 (uint16 bits) rounded to nearest even, as torch;
    float32 as is. (A stored non-finite value - also a finite float32 past the bfloat16 range, which
    rounds to Inf - is found after the chunk by :func:`stored_non_finite`.)"""


@overload(st, inline="always")
def _st(a, j, v):
    if a.dtype == types.uint16:
        def impl(a, j, v):
            u = np.uint32(f32_to_bits(v))
            a[j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return impl

    def impl32(a, j, v):
        a[j] = v
    return impl32


def stored_non_finite(a):
    """1 when an entry of ``a`` (bfloat16 bits or float32) is Inf or NaN, else 0: the largest
    exponent field, a max reduction that vectorises (a count per entry would not)."""


@overload(stored_non_finite, inline="always")
def _stored_non_finite(a):
    if a.dtype == types.uint16:
        def impl(a):
            top = np.uint16(0)
            for j in range(a.shape[0]):
                top = max(top, np.uint16(a[j] & np.uint16(0x7F80)))
            return np.int32(top == np.uint16(0x7F80))
        return impl

    def impl32(a):
        top = np.uint32(0)
        for j in range(a.shape[0]):
            top = max(top, np.uint32(f32_to_bits(a[j])) & np.uint32(0x7F800000))
        return np.int32(top == np.uint32(0x7F800000))
    return impl32


@njit(cache=True, nogil=True, boundscheck=False, fastmath={{'reassoc', 'contract'}})
def row_sq(m, b, row, every, with_base):
    """``(sum b^2, sum (m - b)^2)`` in float64 over every ``every``-th row (``row`` entries each;
    ``m - b`` in float32, as torch's) of the flat tensors ``m``, ``b``: the foreign-expert tally's
    sums (:class:`workbench.io.validate.TaskVectorNorms`); ``sum b^2`` is 0.0 unless ``with_base``
    (one expert's call is enough). Rows as slices indexed from 0 (no negative-index checks). The float64
    sums may be reassociated (vectorised: 4x faster; they feed a ratio checked against 0.5, and
    ``tests/test_merge_kernels.py`` holds them to 1e-9 of torch's)."""
    bs = 0.0
    ts = 0.0
    n = b.shape[0]
    for r0 in range(0, n, row * every):
        br = b[r0:r0 + row]
        mr = m[r0:r0 + row]
        for j in range(br.shape[0]):
            x = np.float64(ld(mr, j) - ld(br, j))
            ts += x * x
        if with_base:
            for j in range(br.shape[0]):
                bv = np.float64(ld(br, j))
                bs += bv * bv
    return bs, ts


@njit(cache=True, nogil=True, boundscheck=False)
def kth_candidate(c, lo, width, rank):
    """The ``rank``-th largest (1 = the largest) of the int32 bit patterns ``c``, all in ``[lo, lo +
    (width << 16))``: counted by ``(a - lo) >> 8`` (``width * 256`` bins, at most 8 KiB of counts
    for :data:`workbench.merging.thresholds.WINDOW_BINS`), then by the low 8 bits of the bin that holds
    it. Exact, linear in ``len(c)`` whatever the ties (a quickselect slows down on many equal patterns);
    both count arrays stay in the L1 cache (with ``2**16`` counts for the low 16 bits, 256 KiB, it was
    2.5-3.4x slower: 1.0 against 2.6-3.4 ns per candidate, one core)."""
    mid = np.zeros(width << 8, np.int32)
    for j in range(c.shape[0]):
        mid[(c[j] - lo) >> 8] += 1
    b, rank = kth_from_top(mid, rank)  # rank <= len(c): b >= 0
    start = lo + (b << 8)
    low = np.zeros(256, np.int32)
    for j in range(c.shape[0]):
        d = c[j] - start
        if d >= 0 and d < 256:
            low[d] += 1
    return start + kth_from_top(low, rank)[0]

'''


def _dare_drop_source(N: int, indent: str, rescale: bool = True) -> list[str]:
    """Generated-kernel source lines that apply DARE to every ``x_i`` at the position ``pp`` (uint32): the keep draw
    of :func:`workbench.cpu_kernels.dare_hash_source` (its low / high 16 bits for the pair's two experts)
    against ``pu``, then torch's ``x * keep_mask / keep`` (:func:`workbench.merging.dare_drop`); without
    ``rescale`` only ``x * keep_mask`` (the TIES threshold passes: the division is monotone, so they divide
    the order statistic instead, :func:`workbench.merging.thresholds.tensor_thresholds`)."""
    lines: list[str] = []
    div = " / keep" if rescale else ""
    for m in range((N + 1) // 2):
        lines.extend(K.dare_hash_source(m, indent))
        for i in (2 * m, 2 * m + 1):
            if i < N:
                # the 16-bit draw against ``pu`` as int32 (the same order): an unsigned compare would not vectorise
                lines.append(f"{indent}x{i} = (x{i} * np.float32(np.int32((h >> np.uint32({16 * (i % 2)})) & "
                             f"np.uint32(0xFFFF)) >= pu)){div}")
    return lines


_MODES = ("mean", "sum", "ties")


def _kernel_source(N: int, mode: str, gtrim: bool, dare: bool, helpers: str) -> str:
    """Source of ``kernel(m_0 .. m_{N-1}, base, out, pos0, gthr, thr, keys, p_int, keep, coef, scale) -> int``
    for one chunk of ``N`` experts, one combination of ``mode`` (:data:`_MODES`), global trim
    (``gtrim``) and DARE drop (``dare``): every argument array is the chunk (``c`` entries; inputs
    float32 or bfloat16 bits; ``out`` float32 or bfloat16 bits), ``pos0`` the tensor position of the
    chunk's first entry (DARE). Returns 1 when an input or a stored output is not finite, else 0.

    One kernel per combination, the flags written into the source rather than passed: the loop then
    has no branch and no reduction, which is what lets LLVM vectorise it (one core, bfloat16, 3
    experts, on a box busy with other work, so roughly: mean 1.8 -> 0.5, sum 2.0 -> 0.9, TIES 3.7 -> 1.7
    ns per entry against the kernel with runtime flags and a per-entry finite count; whole merges:
    ``benchmarks/README.md``). The finite check: every output entry is
    stored as ``res - ((theta_0 - theta_0) + (theta_1 - theta_1) + ...)``: exactly ``res`` when every
    input is finite (``x - x`` is +0.0 and ``res - 0.0`` is ``res``, signed zeros included), NaN
    when one is not (a NaN input can be trimmed away in TIES, so the result alone would not show it);
    a second loop over the stored chunk then looks for an all-ones exponent (a vectorised max)."""
    if mode not in _MODES:
        raise ValueError(f"unknown kernel mode {mode!r}")
    r = range(N)
    L: list[str] = []
    A = L.append
    A("import numpy as np")
    A("from numba import njit")
    A(f"from {helpers} import ld, st, stored_non_finite")
    A("")
    A("@njit(cache=True, nogil=True, boundscheck=False, error_model='numpy')")
    A("def kernel(" + ", ".join(f"m{i}" for i in r) + ", base, out, pos0, gthr, thr, keys, p_int, keep, coef, scale):")
    A("    c = base.shape[0]")
    A("    z = np.float32(0.0)")
    for i in r:
        if gtrim:  # a global threshold <= 0 trims nothing: -1.0 keeps every |x| (x * 1 + 0 differs from x only
            # on -0.0, which the theta_0 round trip below turns into +0.0 either way)
            A(f"    gt{i} = gthr[{i}] if gthr[{i}] > z else np.float32(-1.0)")
        if mode != "mean":
            A(f"    th{i} = thr[{i}]" if mode == "ties" else f"    c{i} = coef[{i}]")
    if dare:
        A("    pu = np.int32(p_int)")
        A("    pb = np.uint32(pos0)")
        L.extend(K.dare_keys_source(N))
    A("    for col in range(c):")
    A("        bv = ld(base, col)")
    for i in r:
        A(f"        v{i} = ld(m{i}, col)")
    if mode == "mean":  # the mean of the theta_i
        A("        res = (" + " + ".join(f"v{i}" for i in r) + f") / np.float32({N})")
    else:
        for i in r:
            A(f"        x{i} = v{i} - bv")
        if gtrim:  # the engine's _trim_expert: theta_0 + where(|tau| >= t, tau, 0), minus theta_0
            for i in r:
                A(f"        x{i} = x{i} * np.float32(abs(x{i}) >= gt{i}) + z")
                A(f"        x{i} = (x{i} + bv) - bv")
        if dare:
            A("        pp = pb + np.uint32(col)  # a 32-bit position counter (64-bit lanes would halve the vectors)")
            L.extend(_dare_drop_source(N, " " * 8))
        if mode == "sum":  # weighted sum
            A("        acc = " + " + ".join(f"x{i} * c{i}" for i in r))
        else:  # ties: trim, elected sign of the sum, disjoint mean
            for i in r:
                A(f"        x{i} = x{i} * np.float32(abs(x{i}) >= th{i})")
            A("        ts = " + " + ".join(f"x{i}" for i in r))
            A("        g = np.float32(ts > z) - np.float32(ts < z)")
            for i in r:
                A(f"        y{i} = x{i} * g")
            # the count as a float32 sum of 0 / 1 (exact): an integer one is int64 in numba, and AVX2 has no
            # vectorised int64 -> float32 conversion (the whole loop ran scalar: 3x slower)
            A("        cnt = " + " + ".join(f"np.float32(y{i} > z)" for i in r))
            A("        tot = " + " + ".join(f"(y{i} if y{i} > z else z)" for i in r))
            A("        acc = (tot * g + z) / max(cnt, np.float32(1.0))")
        A("        res = acc * scale + bv  # x * 1.0 is x: no separate unscaled variant")
    A("        st(out, col, res - ((bv - bv) + " + " + ".join(f"(v{i} - v{i})" for i in r) + "))")
    A("    return stored_non_finite(out)")
    return "\n".join(L) + "\n"


@functools.lru_cache(maxsize=None)
def _helpers():
    return K._load_module("merge_helpers", _HELPERS.format(helpers=K.helpers_module().__name__))


@functools.lru_cache(maxsize=None)
def _kernel(N: int, mode: str, gtrim: bool, dare: bool):
    if not 1 <= N <= K.MAX_KERNEL_EXPERTS:
        raise ValueError(f"the compiled merge handles 1..{K.MAX_KERNEL_EXPERTS} experts, got {N}")
    stem = f"merge_n{N}_{mode}" + ("_gtrim" if gtrim else "") + ("_dare" if dare else "")
    return K._load_module(stem, _kernel_source(N, mode, gtrim, dare, _helpers().__name__)).kernel


# ---------------------------------------------------------------------------------------- tensors
def kernel_view(t: torch.Tensor) -> np.ndarray | torch.Tensor:
    """A stored CPU tensor as the kernels read it: flat float32 or bfloat16 bits (numpy, no copy);
    other dtypes as the flat torch tensor (staged chunk by chunk to float32)."""
    a = K.as_kernel_array(t)
    return a if a is not None else t.reshape(-1)


def _chunk(src, lo: int, hi: int, stage: np.ndarray | None) -> np.ndarray:
    if isinstance(src, np.ndarray):
        return src[lo:hi]
    out = torch.from_numpy(stage[:hi - lo])
    out.copy_(src[lo:hi])  # exact: every float16 (or float64 -> float32 as torch's .to) value
    return out.numpy()


def _out_view(t: torch.Tensor) -> np.ndarray:
    """The kernel's view of an output chunk: float32, or the uint16 bits of bfloat16."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def merge_tensor(s: MergeSettings, base: torch.Tensor, experts: Sequence[torch.Tensor], out_dtype: torch.dtype,
                 seed: int, write: Callable[[Any], None], *, pool=None, workers: int = 1) -> bool:
    """Merge one tensor: ``write(part)`` receives the output's flat parts in order (numpy arrays or
    torch tensors of ``out_dtype``, at most :data:`CHUNK_ENTRIES` entries each). ``seed``: the
    tensor's DARE seed (:func:`workbench.engine.tensor_seed`). Returns ``False`` (after writing
    garbage) when an input or the result is not finite (the result as written, after the cast to
    ``out_dtype``): the caller then finds the culprit and raises."""
    from .thresholds import tensor_thresholds  # (it imports this module)

    n = base.numel()
    N = len(experts)
    if s.dare:
        K.check_positions(n)
    b = kernel_view(base)
    mains = [kernel_view(e) for e in experts]
    keys = K.dare_keys(seed, N) if s.dare else np.zeros(((N + 1) // 2, 2), np.uint32)
    try:
        thr = tensor_thresholds(s, b, mains, keys, pool, workers)
    except FloatingPointError:
        return False
    gthr = s.gthr if s.gthr is not None else np.zeros(N, np.float32)
    kern = _kernel(N, s.combine, s.gthr is not None, s.dare)
    row = int(base.shape[-1]) if base.dim() > 1 and base.shape[-1] > 0 else 1
    step = max(row, CHUNK_ENTRIES // row * row)
    direct = out_dtype in (torch.bfloat16, torch.float32)
    # two output chunks: with a pool, chunk j is written (on a pool thread) while chunk j + 1 is computed
    outs = [torch.empty(min(step, n), dtype=out_dtype) for _ in range(2 if pool is not None and n > step else 1)]
    stage_out = None if direct else torch.empty(min(step, n), dtype=torch.float32)
    out_ks = [_out_view(o) for o in outs] if direct else [_out_view(stage_out)] * len(outs)
    stages = [None if isinstance(x, np.ndarray) else np.empty(min(step, n), np.float32) for x in [b, *mains]]
    bad = 0
    pending = None
    try:
        for c, lo in enumerate(range(0, n, step)):
            hi = min(n, lo + step)
            out, out_k = outs[c % len(outs)], out_ks[c % len(outs)]
            args = [_chunk(x, lo, hi, st) for x, st in zip([*mains, b], [*stages[1:], stages[0]])]
            ranges = K.column_ranges(hi - lo, pool, workers)
            counts = K.run_ranges(pool, lambda j, a, ln: kern(
                *[x[a:a + ln] for x in args], out_k[a:a + ln], lo + a, gthr, thr, keys, s.p_int, s.keep, s.coef,
                s.scale), ranges)
            bad += sum(counts)
            if not direct:  # the kernel counted the stored bfloat16 / float32 values; other dtypes after the cast
                out[:hi - lo].copy_(stage_out[:hi - lo])
                bad += int(not bool(torch.isfinite(out[:hi - lo]).all()))
            if pending is not None:
                pending.result()  # the previous chunk is written: its buffer is free again, the order kept
                pending = None
            if len(outs) > 1:
                pending = pool.submit(write, out[:hi - lo])
            else:
                write(out[:hi - lo])
    finally:
        if pending is not None:
            pending.result()
    return bad == 0


def task_vector_sq(base: torch.Tensor, experts: Sequence[torch.Tensor], every: int, *, pool=None
                   ) -> tuple[float, list[float]]:
    """``(||rows of theta_0||^2, [||rows of theta_i - theta_0||^2])`` over every ``every``-th row of a
    stored matrix (as ``[shape[0], -1]``; float32 differences, float64 sums): the sums of
    :meth:`workbench.io.validate.TaskVectorNorms.observe`, read straight from the memory maps; with a
    thread ``pool``, the experts side by side (each expert's sums as without)."""
    row = base.numel() // max(1, int(base.shape[0]))
    b = kernel_view(base)
    mains = [kernel_view(e) for e in experts]
    if not isinstance(b, np.ndarray) or any(not isinstance(m, np.ndarray) for m in mains):
        rows = lambda t: t.reshape(t.shape[0], -1)[::every].float().reshape(-1).numpy()  # noqa: E731
        b, mains, every = rows(base), [rows(e) for e in experts], 1
    if row == 0:
        return 0.0, [0.0] * len(experts)
    row_sq = _helpers().row_sq
    one_by_one = pool is None or b.shape[0] < (1 << 16) * every  # small: not worth a thread hand-off
    sums = K.run_ranges(None if one_by_one else pool, lambda j, _lo, _ln: row_sq(mains[j], b, row, every, j == 0),
                [(0, 0)] * len(mains))
    return (sums[0][0] if sums else 0.0), [t for _, t in sums]
