"""Binary masks over task-vector entries: bit packing, MMER masks, TIES / DARE keep-masks, TALL masks.

Every function works on any device and never writes its inputs. ``taus`` is either a sequence of
same-shape task vectors or a tensor stacked on dim 0 (``[N, *shape]``); masks come back as a list
of boolean tensors of the task vectors' shape, one per expert, in expert order.

Masks are stored bit-packed by :mod:`workbench.io.packing` (the one layout of the workbench).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = [
    "mask_density", "topk_keep_mask", "kth_largest", "kth_largest_nonneg", "threshold_keep_mask",
    "ties_keep_masks", "dare_keep_mask", "mmer_masks", "tall_masks",
]

def _stack(taus: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(taus, torch.Tensor):
        return taus
    if len(taus) == 0:
        raise ValueError("need at least one task vector")
    return torch.stack([t.to(taus[0].device) for t in taus])


def mask_density(mask: torch.Tensor) -> float:
    """Fraction of ``True`` entries (0.0 for an empty mask)."""
    n = mask.numel()
    return float(mask.sum().item()) / n if n else 0.0


# ------------------------------------------------------------------------------------------ TIES / DARE
def topk_keep_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Entries of ``tau`` among its top ``density`` fraction by magnitude (one tensor).

    ``k = max(1, round(density * numel))``; an entry is kept when ``|tau| >= t`` with ``t`` the
    k-th largest magnitude (ties at ``t`` are all kept, so a few more than ``k`` may survive when
    magnitudes repeat) and ``tau != 0``. The same definition as
    :func:`workbench.analysis.interference.topk_threshold`. peft's ``magnitude_based_pruning``
    uses ``k = int(density * numel)`` and breaks ties arbitrarily: identical when
    ``density * numel`` is an integer and magnitudes are distinct.

    Raises:
        ValueError: ``density`` outside ``(0, 1]``.
    """
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    flat = tau.reshape(-1).abs()
    n = flat.numel()
    if n == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    k = max(1, min(n, int(round(float(density) * n))))
    if k == n:
        return tau != 0
    t = kth_largest(flat, k)
    if t > 0:  # |tau| >= t > 0 already implies tau != 0
        return (flat >= t).reshape(tau.shape)
    return tau != 0


#: rows shorter than this go straight to ``numpy.partition`` (the 2**15-bin histogram costs more)
RADIX_MIN = 1 << 14
HI_BINS = 1 << 15  # bins of the high 16 bits of a non-negative float32 (the sign bit is 0)
RADIX_PIECE = 1 << 18


def hist_hi16(x: torch.Tensor, hist: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """``hist += bincount(bits(x) >> 16)`` for a non-negative contiguous float32 CPU ``x`` (in pieces)."""
    bits = x.view(torch.int32)
    n = bits.numel()
    if scratch is None:
        scratch = torch.empty(min(n, RADIX_PIECE), dtype=torch.int32)
    for lo in range(0, n, scratch.numel()):
        p = bits[lo:lo + scratch.numel()]
        hist += torch.bincount(torch.bitwise_right_shift(p, 16, out=scratch[:p.numel()]), minlength=HI_BINS)


def kth_largest_nonneg(a: np.ndarray, k: int, hist: torch.Tensor | None = None) -> float:
    """The ``k``-th largest entry (``1 <= k <= n``) of a 1-D non-negative float32 array, exactly
    ``numpy.partition(a, n - k)[n - k]``, by a radix select.

    Non-negative float32 values order like their bit patterns as integers, so a histogram of the
    high 16 bits (``hist``, from :func:`hist_hi16`; computed here when ``None``) gives the bin
    that holds the k-th largest; only that bin's entries are partitioned (typically well under 1%
    of the row). About 1.5 ns per entry against about 5-7 ns for ``numpy.partition`` of the row.
    ``a`` must not contain ``-0.0`` or other negative values (pass ``|x|``); NaN sorts last, as in
    ``numpy.partition``.
    """
    n = a.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if a.dtype != np.float32 or n < RADIX_MIN:
        return float(np.partition(a, n - k)[n - k])
    if hist is None:
        hist = torch.zeros(HI_BINS, dtype=torch.int64)
        hist_hi16(torch.from_numpy(a), hist)
    above = hist.flip(0).cumsum(0).flip(0)  # above[b] = #entries whose high bits are >= b (non-increasing)
    b = int((above >= k).sum()) - 1  # the largest b with above[b] >= k: the bin of the k-th largest
    rest = k - (int(above[b + 1]) if b + 1 < HI_BINS else 0)  # its rank inside bin b (1 = largest)
    bits = a.view(np.int32)
    parts = []
    for lo in range(0, n, RADIX_PIECE):  # pieces: the mask stays in cache
        p = bits[lo:lo + RADIX_PIECE]
        parts.append(p[(p >> 16) == b])
    cand = np.concatenate(parts).view(np.float32)
    m = cand.shape[0]
    return float(np.partition(cand, m - rest)[m - rest])


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The ``k``-th largest entry of a flat tensor (``1 <= k <= numel``), exactly, as a Python float.

    On CPU, a non-negative float32 tensor (``|tau|``: no negative value, no ``-0.0``) of at least
    :data:`RADIX_MIN` entries goes through :func:`kth_largest_nonneg` (exact radix select); other
    float32/float64 CPU tensors through ``numpy.partition`` on a copy (introselect, linear time:
    about 20x faster there than ``torch.kthvalue``, which it equals); other dtypes and devices use
    ``torch.kthvalue``. ``values`` is not modified.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64) and not flat.requires_grad:
        a = flat.contiguous().numpy()
        if a.dtype == np.float32 and n >= RADIX_MIN and not (a.view(np.int32) < 0).any():
            return kth_largest_nonneg(a, k)
        a = a.copy()
        a.partition(n - k)
        return float(a[n - k])
    return float(torch.kthvalue(flat, n - k + 1).values)


def threshold_keep_mask(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """Entries with ``|tau| >= threshold`` and ``tau != 0`` (global trimming with a precomputed threshold)."""
    return (tau.abs() >= float(threshold)) & (tau != 0)


def ties_keep_masks(taus: torch.Tensor | Sequence[torch.Tensor], density: float = 0.2, *,
                    thresholds: Sequence[float] | None = None) -> list[torch.Tensor]:
    """Which entries of each task vector survive TIES' trim and sign election.

    Trim: :func:`topk_keep_mask` per expert (or :func:`threshold_keep_mask` with
    ``thresholds[i]`` for global trimming). Elect: ``gamma = sign(sum_i trimmed tau_i)``. Kept:
    trimmed entries whose sign equals ``gamma`` (none where ``gamma == 0``). The TIES merge is the
    mean of the kept entries (:func:`workbench.merging.ties_merge_tau`).
    """
    t = _stack(taus)
    if thresholds is not None:
        if len(thresholds) != t.shape[0]:
            raise ValueError(f"{len(thresholds)} thresholds for {t.shape[0]} experts")
        keep = torch.stack([threshold_keep_mask(t[i], thresholds[i]) for i in range(t.shape[0])])
    else:
        keep = torch.stack([topk_keep_mask(t[i], density) for i in range(t.shape[0])])
    trimmed = torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))
    gamma = torch.sign(trimmed.sum(0))
    keep = keep & (torch.sign(t) == gamma) & (gamma != 0)
    return list(keep.unbind(0))


def dare_keep_mask(shape: Sequence[int] | torch.Size, p: float, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """DARE's keep-mask: each entry kept independently with probability ``1 - p``.

    Drawn as ``torch.bernoulli(full(shape, 1 - p), generator=generator)``, the same draw as peft's
    ``random_pruning`` (so the same seed gives the same mask). ``device`` defaults to the
    generator's device.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.
    """
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"drop rate p must be in [0, 1), got {p}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    if torch.device(device).type == "cpu":
        # the same draw as torch.bernoulli(full(shape, 1 - p)) on CPU (one 24-bit uniform per entry,
        # kept when below 1 - p in float32; tests/test_masks.py checks the identity), twice as fast
        q = torch.tensor(1.0 - float(p), dtype=torch.float32).item()
        return torch.rand(tuple(shape), generator=generator, dtype=torch.float32, device=device) < q
    probs = torch.full(tuple(shape), 1.0 - float(p), dtype=torch.float32, device=device)
    return torch.bernoulli(probs, generator=generator).to(torch.bool)


# ------------------------------------------------------------------------------------------ MMER / TALL
def mmer_masks(taus: torch.Tensor | Sequence[torch.Tensor], tau_star: torch.Tensor,
               lam: float = 1.0) -> list[torch.Tensor]:
    """MMER's per-modality masks ``m_i = 1[|tau_i| > lam * |tau_i - tau*|]`` (methods.md 3).

    With ``lam = 1`` this is the element-wise minimiser of ``||theta_i - (theta_0 + m * tau*)||_1``
    (keep ``tau*`` where it is closer to ``tau_i`` than 0 is). The threshold form with ``lam`` is
    the TALL-style generalisation - **unverified** reading of the paper. With ``lam = 0`` the mask is
    every entry where ``tau_i != 0``.
    """
    t = _stack(taus)
    star = tau_star.to(device=t.device, dtype=t.dtype)
    return list((t.abs() > float(lam) * (t - star).abs()).unbind(0))


def tall_masks(taus: torch.Tensor | Sequence[torch.Tensor], tau_mt: torch.Tensor, lam: float = 1.0, *,
               nonzero_only: bool = False) -> list[torch.Tensor]:
    """TALL masks (Wang et al. 2024): ``m_t = 1[|tau_t| >= lam * |tau_MT - tau_t|]``.

    ``tau_MT`` is the multi-task vector (usually ``sum_t tau_t``). As written, an entry where both
    ``tau_t`` and ``tau_MT - tau_t`` are 0 is kept (``0 >= 0``); ``nonzero_only=True`` also
    requires ``tau_t != 0`` (what :mod:`workbench.analysis.overlap` uses).
    """
    t = _stack(taus)
    mt = tau_mt.to(device=t.device, dtype=t.dtype)
    m = t.abs() >= float(lam) * (mt - t).abs()
    if nonzero_only:
        m = m & (t != 0)
    return list(m.unbind(0))
