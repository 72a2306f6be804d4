"""Parameter-interference profiles of a set of experts that share one base LLM.

The profile streams over tensor names: for one name at a time it reads the base tensor and
each expert's task vector ``tau_i = theta_i - theta_0`` (or ``s * B @ A`` for a LoRA expert,
the text adapter's product for a DAMC expert) and accumulates *sums* (dot products, squared
norms, counts). On a GPU the task vectors are stacked into an ``[N, numel]`` float32 matrix on
the device; on the CPU compiled kernels (:mod:`workbench.cpu_kernels`) read the stored
bfloat16 / float32 tensors directly, chunk by chunk, and no float32 copy is made. Nothing else
stays in memory, so peak memory is bounded by the largest tensor (a few times it on a GPU),
whatever the model size.

Every metric is a ratio of sums, so the aggregation per layer x module type is exact: the
cosine of a group is ``sum(dot) / sqrt(sum(|a|^2) * sum(|b|^2))`` over the group's tensors
(the cosine of the concatenated task vectors), not a mean of per-tensor cosines.
:meth:`InterferenceProfile.summary` gives the exact form by default and the mean of per-tensor
values with ``exact=False``.

Definitions (per tensor; ``k = round(topk * numel)``, at least 1):

- ``cosine(i, j) = <tau_i, tau_j> / (|tau_i| |tau_j|)``; ``rel_norm(i) = |tau_i| / |theta_0|``.
- ``conflict(i, j)``: among entries where both tau_i and tau_j are non-zero, the fraction with
  opposite signs. ``conflict_topk(i, j)``: the same among entries in both experts' top-k
  magnitudes (the entries TIES keeps after trimming).
- ``topk_conflict(i)``: among expert i's top-k entries, the fraction where some other
  expert's *trimmed* value has the opposite sign.
- elected sign ``gamma = sign(sum_i trim_k(tau_i))`` (TIES). ``elect_disagree(i)``: fraction
  of expert i's top-k entries whose sign is opposite to gamma. ``set_elect_disagree``: among
  entries with gamma != 0, the fraction where any expert's trimmed value opposes gamma.
  ``set_conflict``: among entries where at least two experts are non-zero, the fraction where
  the non-zero signs are not all equal (untrimmed).
- TIES: expert i survives at an entry when it is in its top-k and agrees with gamma.
  ``ties_survival(i)`` = survived entries / non-zero entries of tau_i; ``ties_energy(i)`` =
  ``|tau_i * survive_i|^2 / |tau_i|^2``. The TIES merged vector is the disjoint mean
  ``tau_m = sum_i survive_i tau_i / count``; expert i's share is ``survive_i tau_i / count``
  (the shares sum to ``tau_m``) and ``ties_share(i) = |share_i| / |tau_m|``.
- DARE (drop probability ``dare_p``, seeded per tensor name): ``dare_kept(i)`` = kept non-zero
  entries / non-zero entries; ``dare_energy(i)`` = ``|keep_i * tau_i|^2 / |tau_i|^2``; the
  share of a DARE-then-task-arithmetic merge is ``keep_i tau_i / (1 - p)``, so
  ``dare_share(i) = |share_i| / |tau_i|``.
- DAMC experts (``adapter_text/`` + ``adapter_modality/``): ``damc_cosine`` and
  ``damc_conflict`` compare the text and modality parameter sets of the same expert (on the
  LoRA products ``s * B @ A``). LoRA experts enter every metric through their products
  ``s * B @ A`` (never through A and B separately).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import math
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..device import resolve_device
from ..paths import repo_relative, resolve_repo_path
from ..merging import masks as M
from ..errors import CheckpointError, ConfigError
from ..io.experts import Expert, open_expert
from ..io.reader import CheckpointReader
from .. import cpu_kernels as K
from ..io.writer import atomic_write
from .store import save_frames, save_json

__all__ = [
    "InterferenceProfile",
    "foreign_check",
    "METRICS",
    "MetricSpec",
    "parse_name",
    "profile_interference",
    "tensor_stats",
    "topk_threshold",
    "zoo_experts",
]


# ----------------------------------------------------------------------------------- names
def parse_name(name: str) -> tuple[int | None, str]:
    """``(layer | None, module type)`` of a tensor name (:func:`workbench.task_vectors.parse_tensor_name`)."""
    from ..task_vectors import parse_tensor_name

    return parse_tensor_name(name)


# ----------------------------------------------------------------------------------- expert sources
def zoo_experts(zoo_dir: str | Path, *, kinds: Sequence[str] = ("full", "lora", "damc"),
                seed: int | None = None, modalities: Sequence[str] | None = None) -> dict[str, Path]:
    """``{name: folder}`` of a zoo's experts (``zoo/<preset>/experts/*/expert.json``) of the given kinds.

    Pass the result to :func:`profile_interference` with ``base=Zoo(<zoo>).base_path`` (the experts' theta_0).
    """
    root = Path(zoo_dir) / "experts"
    if not root.is_dir():
        raise CheckpointError("zoo has no experts/ folder", file=root)
    out: dict[str, Path] = {}
    for d in sorted(root.iterdir()):
        f = d / "expert.json"
        if not f.is_file():
            continue
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"unreadable expert.json: {e}", file=f) from e
        if info.get("kind") not in kinds:
            continue
        if seed is not None and info.get("seed") != seed:
            continue
        if modalities is not None and info.get("modality") not in modalities:
            continue
        out[info.get("name", d.name)] = d
    return out


def _open_base(path: str | Path):
    p = Path(path)
    if p.is_dir() and (p / "llm").is_dir() and not any(p.glob("*.safetensors")):
        p = p / "llm"
    return CheckpointReader(p)


# ----------------------------------------------------------------------------------- per-tensor kernel
def topk_threshold(abs_tau: torch.Tensor, topk: float) -> torch.Tensor:
    """Per-row magnitude threshold of the top ``topk`` fraction: the k-th largest ``|tau|`` of each row.

    ``abs_tau`` is ``[N, n]`` (magnitudes; signed values work too, the absolute value is taken row by row); ``k = max(1, round(topk * n))``. An entry is in the top-k when
    ``|tau| >= threshold`` and ``tau != 0`` (ties at the threshold are all kept). On CPU the
    selection is an exact radix select (:func:`workbench.merging.kth_largest_nonneg`: a histogram of the float32 bit
    patterns' high half, then ``numpy.partition`` of the one bin that holds the k-th largest -
    the same value as ``numpy.partition`` of the row, several times faster) one row at a time
    (one row of extra memory); on other devices ``torch.kthvalue``.
    """
    n = abs_tau.shape[1]
    k = max(1, min(n, int(round(topk * n))))
    if k == n:
        return torch.zeros(abs_tau.shape[0], dtype=abs_tau.dtype, device=abs_tau.device)
    out = torch.empty(abs_tau.shape[0], dtype=abs_tau.dtype, device=abs_tau.device)
    for i in range(abs_tau.shape[0]):  # one row at a time: one row of extra memory
        row = abs_tau[i].abs()
        if row.device.type == "cpu":
            out[i] = M.kth_largest_nonneg(row.contiguous().numpy(), k)
        else:
            out[i] = torch.kthvalue(row, n - k + 1).values
    return out


@contextlib.contextmanager
def _exact_fp32_matmul():
    """Disable TF32 for the duration (a Gram matrix of task vectors needs full fp32)."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def tensor_stats(
    taus: torch.Tensor,
    *,
    topk: float = 0.2,
    dare_p: float | None = 0.2,
    dare_seed: int = 0,
    chunk_size: int = 1 << 19,
) -> dict[str, torch.Tensor]:
    """Sums for every interference metric of one tensor.

    Args:
        taus: ``[N, n]`` float32 task vectors (one flattened tensor per expert), any device.
        topk: fraction of entries kept by the TIES trim (per expert, by magnitude).
        dare_p: DARE drop probability, or ``None`` to skip the DARE statistics (they are NaN).
        dare_seed: seed of the DARE draws (counter-based: entry ``j`` of expert ``i`` draws the same
            value on every device and for every chunking; :mod:`workbench.cpu_kernels`).
        chunk_size: entries per column chunk (bounds the temporaries to about ``10 * N * chunk``
            floats); at most ``2**24`` so that float32 partial counts stay exact integers.

    Returns:
        float64 tensors (on ``taus.device``): ``gram`` ``[N, N]`` (dots; the diagonal holds
        ``|tau_i|^2``), ``both_nonzero``/``conflicts``/``both_kept``/``conflicts_kept`` ``[N, N]``,
        per expert ``[N]``: ``nonzero, topk_kept, topk_opposed, elect_opposed, ties_survived,
        ties_survived_sq, ties_share_sq, dare_kept_n, dare_kept_sq``; set scalars:
        ``multi_nonzero, set_conflicts, elected, elect_disagree_any, ties_merged_sq, ta_sq``.

    Every count is an exact integer. On the CPU (up to 8 experts) each chunk goes through the
    compiled kernel of :mod:`workbench.cpu_kernels` (float sums accumulated in float64); on
    other devices through torch operations (float32 sums per chunk, added in float64). The two
    give the same counts and float sums equal to ~1e-6 relative (tested).
    """
    if taus.dim() != 2 or not taus.is_floating_point():
        raise ValueError(f"taus must be a float [N, n] matrix, got {tuple(taus.shape)} {taus.dtype}")
    if not 0.0 < topk <= 1.0:
        raise ConfigError(f"topk must be in (0, 1], got {topk}")
    if dare_p is not None and not 0.0 <= dare_p < 1.0:
        raise ConfigError(f"dare_p must be in [0, 1), got {dare_p}")
    taus = taus.float()
    chunk_size = int(max(1, min(chunk_size, 1 << 24)))
    N, n = taus.shape
    acc = _StatsAccumulator(N, taus.device, dare_p, dare_seed)
    try:
        thr = topk_threshold(taus, topk)
        with _exact_fp32_matmul():
            for start in range(0, n, chunk_size):
                acc.add(taus[:, start:start + chunk_size], thr, start)
        return acc.result()
    finally:
        acc.close()


#: patterns of up to this many experts are counted by a histogram of sign codes (3**(N+1) bins)
_MAX_CODED_EXPERTS = K.MAX_KERNEL_EXPERTS  # the compiled kernel writes the same codes
#: up to this many experts, both codes share one histogram (3**(2N+1) bins)
_MAX_JOINT_EXPERTS = K.MAX_JOINT_EXPERTS
#: on the CPU, coded chunks go through the compiled kernel (:mod:`workbench.cpu_kernels`);
#: ``False`` forces the torch operations (the tests compare the two)
_USE_KERNEL = True


@functools.lru_cache(maxsize=32)
def _sign_table(N: int, dev: torch.device) -> torch.Tensor:
    """``[3^(N+1), N+1]`` float64: the signs (-1, 0, 1) that code ``c`` stands for (base-3 digits - 1)."""
    digits = torch.arange(3 ** (N + 1), device=dev)[:, None] // (3 ** torch.arange(N + 1, device=dev)) % 3
    return (digits - 1).to(torch.float64)


class _StatsAccumulator:
    """The sums of :func:`tensor_stats`, fed one column chunk ``t [N, c]`` at a time (in column order).

    Float sums (``gram``, ``ta_sq`` and the TIES / DARE energies) use the same float32 products
    per chunk as ever, so they do not depend on how the chunk was produced. Every count is an
    integer computed exactly: for ``N <= 8`` from two histograms per chunk of per-column codes
    (the experts' signs, and their trimmed signs with the elected sign), decoded at the end with
    small tables; for larger ``N`` with sign Gram matrices (float32, exact inside a chunk).
    """

    def __init__(self, N: int, dev: torch.device, dare_p: float | None, dare_seed: int = 0):
        self.N, self.dev, self.dare_p = N, dev, dare_p
        self.base_sq = 0.0  # |theta_0|^2 of the chunks given to add_stored (compiled path)
        self.dare_keys = K.dare_keys(dare_seed, N)
        self.dare_int = K.dare_keep_threshold(dare_p) if dare_p is not None else 0
        self._wbuf: torch.Tensor | None = None
        self._sbuf: torch.Tensor | None = None
        f64 = dict(dtype=torch.float64, device=dev)
        self.f64 = f64
        self.gram = torch.zeros(N, N, **f64)
        self.vecs = {k: torch.zeros(N, **f64) for k in ("ties_survived_sq", "ties_share_sq", "dare_kept_n",
                                                         "dare_kept_sq")}
        self.scal = {k: torch.zeros((), **f64) for k in ("ties_merged_sq", "ta_sq")}
        self.ones_n = torch.ones(1, N, device=dev)
        self.tiny = torch.nextafter(torch.zeros((), device=dev), torch.ones((), device=dev))
        self.coded = N <= _MAX_CODED_EXPERTS
        if self.coded:
            self.w3 = torch.tensor([[3.0 ** i for i in range(N)]], device=dev)  # [1, N]
            # sum_i 3^i * sign_i (+ 3^N * gamma) plus these offsets is in [0, 3^N) ([0, 3^(N+1)))
            self.off_u, self.off_t = (3 ** N - 1) // 2, (3 ** (N + 1) - 1) // 2
            self.hist_u = torch.zeros(3 ** N, dtype=torch.long, device=dev)
            self.hist_t = torch.zeros(3 ** (N + 1), dtype=torch.long, device=dev)
            # N <= 4: one histogram of the joint code (code_u, code_t) per chunk, from one product
            # [w3, 3^(N+1) w3] @ [st; s] (integers < 3^(2N+1) <= 3^9: exact in float32)
            self.joint = N <= _MAX_JOINT_EXPERTS
            if self.joint:
                self.wj = torch.cat([self.w3, self.w3 * float(3 ** (N + 1))], 1)  # [1, 2N]
                self.off_j = self.off_u * 3 ** (N + 1) + self.off_t
                self.hist_j = torch.zeros(3 ** (2 * N + 1), dtype=torch.long, device=dev)
        # the compiled CPU kernel (same codes, same decoding; float sums in float64)
        self.compiled = dev.type == "cpu" and self.coded and _USE_KERNEL
        if self.compiled:
            self.kernel = K.chunk_kernel(N)
            self.sums = np.zeros(N * N + 2 + 4 * N + 1, np.float64)  # the kernel's layout; last: |base|^2
            self._codes: np.ndarray | None = None
        if not self.coded:
            self.mats = {k: torch.zeros(N, N, **f64) for k in ("ss", "nn", "sst", "nnt")}
            self.legacy = {k: torch.zeros(N, **f64) for k in ("topk_opposed", "elect_opposed", "ties_survived")}
            self.lscal = {k: torch.zeros((), **f64) for k in ("multi_nonzero", "set_conflicts", "elected",
                                                              "elect_disagree_any")}

    def add(self, t: torch.Tensor, thr: torch.Tensor, pos0: int) -> None:
        """Accumulate one chunk ``t [N, c]`` (float32) holding entries ``pos0 .. pos0 + c - 1`` of the
        tensor; ``thr [N]`` are the experts' top-k thresholds.

        Torch path: every ``[N, c]`` temporary lives in three scratch buffers kept between chunks,
        and every 0/1 mask is a float32 (a float-output comparison, then a float product: several
        times cheaper on CPU than a bool mask and a bool x float product, and the same values).
        """
        if self.compiled:
            self._add_compiled(t, thr, pos0)
            return
        thr = torch.maximum(thr.to(self.dev), self.tiny)[:, None]
        ones_n = self.ones_n
        a, x, y = self._bufs(t.shape[1], t.dtype)
        self.gram += (t @ t.T).double()
        colsum = (ones_n @ t)[0]
        self.scal["ta_sq"] += torch.dot(colsum, colsum).double()
        del colsum
        kf = torch.ge(torch.abs(t, out=a), thr, out=a)  # 1.0 where kept by the trim (thr > 0: kept => non-zero)
        tk = torch.mul(t, kf, out=x)  # t * kf
        gamma = torch.sign((ones_n @ tk)[0])
        st = torch.sign(tk, out=x)  # trimmed signs (= sign(t) * kf)
        s = torch.sign(t, out=y)
        if self.coded and self.joint:  # x, y are adjacent: [st; s] is one [2N, c] view
            xy = self._sbuf[1:3].view(2 * self.N, t.shape[1])
            self._count(self.hist_j, (self.wj @ xy)[0].add_(gamma, alpha=float(3 ** self.N)), self.off_j)
        elif self.coded:
            self._count(self.hist_u, (self.w3 @ s)[0], self.off_u)
            self._count(self.hist_t, (self.w3 @ st)[0].add_(gamma, alpha=float(3 ** self.N)), self.off_t)
        else:
            self._legacy_counts(s, st, kf, gamma)
        del s, kf
        survive = st.mul_(gamma).clamp_min_(0)  # kept and agreeing with gamma
        inv = (ones_n @ survive)[0].clamp_min_(1).reciprocal_()  # 1 / max(count, 1)
        surv_vals = survive.mul_(t)  # t * survive (exact: survive is 0 or 1)
        merged = (ones_n @ surv_vals)[0] * inv
        self.scal["ties_merged_sq"] += torch.dot(merged, merged).double()
        del merged
        sq = surv_vals.mul_(t)
        w = self._w(t.shape[1], t.dtype)  # [c, 2]: ones | inv^2 (as torch.stack([ones, inv * inv], 1))
        torch.mul(inv, inv, out=w[:, 1])
        sums = (sq @ w).double()
        self.vecs["ties_survived_sq"] += sums[:, 0]
        self.vecs["ties_share_sq"] += sums[:, 1]
        del sq, w, inv
        if self.dare_p is not None:
            dk = K.dare_keep_torch(pos0, t.shape[1], self.dare_keys, self.dare_int, self.dev, t.dtype, self.N)  # 1.0 kept
            dt = torch.mul(t, dk, out=y)  # = dk * t
            self.vecs["dare_kept_n"] += torch.sign(dt, out=a).abs_().sum(1).double()  # kept non-zero entries (exact)
            self.vecs["dare_kept_sq"] += dt.mul_(t).sum(1).double()

    def _bufs(self, c: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Three ``[N, c]`` scratch buffers (kept between chunks of one width)."""
        if self._sbuf is None or self._sbuf.shape[2] != c or self._sbuf.dtype != dtype:
            self._sbuf = torch.empty(3, self.N, c, dtype=dtype, device=self.dev)
        return self._sbuf[0], self._sbuf[1], self._sbuf[2]

    def _w(self, c: int, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``[c, 2]`` buffer whose first column is 1 (kept between chunks of one width:
        a column stack per chunk costs more than the product it feeds)."""
        if self._wbuf is None or self._wbuf.shape[0] != c or self._wbuf.dtype != dtype:
            self._wbuf = torch.empty(c, 2, dtype=dtype, device=self.dev)
            self._wbuf[:, 0] = 1.0
        return self._wbuf

    def _add_compiled(self, t: torch.Tensor, thr: torch.Tensor, pos0: int) -> None:
        """:meth:`add` through the compiled kernel (one pass over the chunk, then the code histogram)."""
        c = t.shape[1]
        tn = t.contiguous().numpy()
        self.add_stored([tn[i] for i in range(self.N)], np.zeros(self.N, np.float32), np.zeros(c, np.float32),
                        0, c, pos0, thr)

    def add_stored(self, mains: Sequence[np.ndarray], w: np.ndarray, base: np.ndarray, lo: int, c: int,
                   pos0: int, thr: torch.Tensor) -> None:
        """The compiled kernel on task vectors built from stored tensors:
        ``tau_i = mains[i][lo:lo+c] - w[i] * base[lo:lo+c]`` (see :func:`kernels._kernel_source`;
        float32 arrays or bfloat16 bits from :func:`kernels.as_kernel_array`), entries
        ``pos0 .. pos0 + c - 1`` of the tensor. Also adds ``|base[lo:lo+c]|^2`` to :attr:`base_sq`."""
        if self.dare_p is not None:
            K.check_positions(pos0 + c)
        thr_n = torch.maximum(thr.to(torch.float32), self.tiny).numpy()
        if self._codes is None or self._codes.shape[1] < c:
            self._codes = np.empty((2, c), np.int32)
        cu, ct = self._codes[0, :c], self._codes[1, :c]
        self.kernel(*mains, w, base, lo, c, pos0, thr_n, self.dare_keys, self.dare_int, self.dare_p is not None,
                    self.sums, cu, ct)
        if self.joint:
            K.count_codes(cu, self.hist_j.numpy())
        else:
            K.count_codes(cu, self.hist_u.numpy())
            K.count_codes(ct, self.hist_t.numpy())

    def _fold_compiled(self) -> None:
        """Move the kernel's float64 sums into ``gram`` / ``scal`` / ``vecs`` (once, at the end)."""
        N, s = self.N, torch.from_numpy(self.sums)
        low = s[: N * N].view(N, N).tril()
        self.gram += low + low.tril(-1).T
        self.scal["ta_sq"] += s[N * N]
        self.scal["ties_merged_sq"] += s[N * N + 1]
        for j, k in enumerate(("ties_survived_sq", "ties_share_sq", "dare_kept_n", "dare_kept_sq")):
            self.vecs[k] += s[N * N + 2 + j * N: N * N + 2 + (j + 1) * N]
        self.base_sq += float(s[-1])
        self.sums[:] = 0.0

    def close(self) -> None:
        """Release per-tensor buffers (kept as a hook: :func:`tensor_stats` always calls it)."""
        self._wbuf = None
        self._sbuf = None

    @staticmethod
    def _count(hist: torch.Tensor, code: torch.Tensor, off: int) -> None:
        hist += torch.bincount(code.add_(float(off)).to(torch.int32), minlength=hist.numel())

    def _legacy_counts(self, s, st, kf, gamma) -> None:
        ones_n, t_dtype = self.ones_n, s.dtype
        nzf = s.abs()
        self.mats["ss"] += (s @ s.T).double()
        self.mats["nn"] += (nzf @ nzf.T).double()
        pos = s.clamp_min(0)
        npos_all = (ones_n @ pos)[0]
        nnz_all = (ones_n @ nzf)[0]
        nneg_all = nnz_all - npos_all
        self.lscal["multi_nonzero"] += (nnz_all >= 2).sum().double()
        self.lscal["set_conflicts"] += ((npos_all > 0) & (nneg_all > 0)).sum().double()
        self.mats["sst"] += (st @ st.T).double()
        self.mats["nnt"] += (kf @ kf.T).double()
        pos_t = st.clamp_min(0)
        npos = (ones_n @ pos_t)[0]
        nneg = (ones_n @ kf)[0] - npos
        neg_t = kf - pos_t
        self.legacy["topk_opposed"] += (pos_t @ (nneg > 0).to(t_dtype) + neg_t @ (npos > 0).to(t_dtype)).double()
        agree = st * gamma
        survive = agree.clamp_min(0)
        disagree = survive - agree
        self.legacy["elect_opposed"] += disagree.sum(1).double()
        self.lscal["elected"] += gamma.abs().sum().double()
        self.lscal["elect_disagree_any"] += ((ones_n @ disagree)[0] > 0).sum().double()
        self.legacy["ties_survived"] += survive.sum(1).double()

    def _decoded(self) -> dict[str, torch.Tensor]:
        """Integer statistics from the code histograms (float64, exact)."""
        N, f64 = self.N, self.f64
        if self.joint:
            hj = self.hist_j.view(3 ** N, 3 ** (N + 1))
            self.hist_u, self.hist_t = hj.sum(1), hj.sum(0)
        sig = _sign_table(N, self.dev)  # [3^(N+1), N+1] signs; column N is gamma
        su = sig[: 3 ** N, :N]
        hu = self.hist_u.to(torch.float64)
        nzu = su.abs()
        out = {"ss": su.T @ (su * hu[:, None]), "nn": nzu.T @ (nzu * hu[:, None])}
        out["multi_nonzero"] = (hu * (nzu.sum(1) >= 2)).sum()
        out["set_conflicts"] = (hu * ((su > 0).any(1) & (su < 0).any(1))).sum()
        st, g = sig[:, :N], sig[:, N:]
        ht = self.hist_t.to(torch.float64)
        kt = st.abs()
        out["sst"] = st.T @ (st * ht[:, None])
        out["nnt"] = kt.T @ (kt * ht[:, None])
        any_pos, any_neg = (st > 0).any(1, keepdim=True), (st < 0).any(1, keepdim=True)
        opposed = ((st > 0) & any_neg) | ((st < 0) & any_pos)
        out["topk_opposed"] = (opposed * ht[:, None]).sum(0)
        agree = st * g
        out["elect_opposed"] = ((agree < 0) * ht[:, None]).sum(0)
        out["ties_survived"] = ((agree > 0) * ht[:, None]).sum(0)
        out["elected"] = (ht * (g[:, 0] != 0)).sum()
        out["elect_disagree_any"] = (ht * (agree < 0).any(1)).sum()
        return {k: v.to(**f64) for k, v in out.items()}

    def result(self) -> dict[str, torch.Tensor]:
        self.close()
        if self.compiled:
            self._fold_compiled()
        if self.coded:
            d = self._decoded()
            mats = {k: d[k] for k in ("ss", "nn", "sst", "nnt")}
            per = {k: d[k] for k in ("topk_opposed", "elect_opposed", "ties_survived")}
            sc = {k: d[k] for k in ("multi_nonzero", "set_conflicts", "elected", "elect_disagree_any")}
        else:
            mats, per, sc = self.mats, self.legacy, self.lscal
        vecs = {"topk_opposed": per["topk_opposed"], "elect_opposed": per["elect_opposed"],
                "ties_survived": per["ties_survived"], **self.vecs}
        order = ("topk_opposed", "elect_opposed", "ties_survived", "ties_survived_sq", "ties_share_sq",
                 "dare_kept_n", "dare_kept_sq")
        scal = {"multi_nonzero": sc["multi_nonzero"], "set_conflicts": sc["set_conflicts"],
                "elected": sc["elected"], "elect_disagree_any": sc["elect_disagree_any"],
                "ties_merged_sq": self.scal["ties_merged_sq"], "ta_sq": self.scal["ta_sq"]}
        out: dict[str, torch.Tensor] = {"gram": self.gram, **{k: vecs[k] for k in order}, **scal}
        out["nonzero"] = torch.diagonal(mats["nn"]).clone()
        out["topk_kept"] = torch.diagonal(mats["nnt"]).clone()
        out["both_nonzero"] = mats["nn"]
        out["conflicts"] = (mats["nn"] - mats["ss"]) / 2
        out["both_kept"] = mats["nnt"]
        out["conflicts_kept"] = (mats["nnt"] - mats["sst"]) / 2
        if self.dare_p is None:
            out["dare_kept_n"].fill_(float("nan"))
            out["dare_kept_sq"].fill_(float("nan"))
        return out


_PIECE = 1 << 20  # entries per piece when a task-vector row is built from the stored tensors
#: tensors with fewer entries are not split across worker threads (the hand-over costs more)
_PARALLEL_MIN = 1 << 18
#: widest chunk the compiled CPU path builds at once (N x 32768 float32: 512 KiB for 4 experts, L2-sized)
_CPU_BLOCK = 1 << 15


def _non_finite_error(name: str, base_t: torch.Tensor, bad: Sequence[int], files: Sequence[Any],
                      enames: Sequence[str]) -> CheckpointError:
    """The error for non-finite task vectors of experts ``bad`` (indices) on tensor ``name``: it names
    the base's file when the base holds the NaN / Inf, else the first such expert's file
    (``files = [base file, expert files...]`` of this tensor)."""
    if base_t.is_floating_point() and not bool(torch.isfinite(base_t).all()):
        return CheckpointError("non-finite values in the base (every task vector is non-finite)", file=files[0],
                               tensor=name)
    return CheckpointError(f"non-finite task vector for expert(s) {[enames[i] for i in bad]}",
                           file=files[1 + bad[0]], tensor=name)


def _streamed_stats(name: str, base_t: torch.Tensor, raws: list, files: Sequence[Any], enames: Sequence[str], *,
                    topk: float, dare_p: float | None, dare_seed: int, chunk_size: int,
                    pool: ThreadPoolExecutor | None = None, workers: int = 1):
    """:func:`tensor_stats` of one tensor on the CPU without the ``[N, n]`` float32 task vectors.

    Each ``tau_i`` is rebuilt on demand from the stored tensors (``main - base`` in float32, the
    same values as :func:`iter_task_vectors`), by the compiled kernels of
    :mod:`workbench.cpu_kernels`, which read bfloat16 / float32 tensors as stored:

    1. per expert, the finiteness check and the top-k threshold, an exact radix select: a
       histogram of the high 16 bits of ``|tau_i|``, then one more pass for the low 16 bits of the
       k-th largest (:func:`kernels.tau_hist`, :func:`kernels.tau_kth_largest`);
    2. the sums, one pass over column chunks of at most :data:`_CPU_BLOCK` entries (whatever
       ``chunk_size`` says), every expert's entry and the base's read once per column.

    With ``pool`` (``workers`` threads; the kernels release the GIL) step 1 runs one expert per
    worker when there are at least as many experts as workers, else splits each expert's columns
    into ``workers`` ranges (histograms added); step 2 splits the columns into ``workers`` ranges,
    one accumulator each, summed at the end (every statistic is a sum over columns: counts are
    the same integers, float sums change in their last bits with ``workers``).

    No float32 copy of a task vector is made (extra memory: a few small buffers), except for
    other stored dtypes (float16, float64) or a tensor an expert lacks, whose rows are built in
    float32 by torch (one row at a time) and, for the sums, chunk by chunk; and with more than 8
    experts, where the sums are torch operations on ``[N, chunk]`` float32 chunks.

    ``files`` (``[base file, expert files...]`` of this tensor) name the culprit of a non-finite
    task vector. Returns ``(name, numel, stats, base_sq, DAMC other-set deltas, tau_row(i))`` as
    :func:`profile_interference` consumes them.
    """
    N = len(raws)
    bflat = base_t.reshape(-1)
    numel = bflat.numel()
    mains = [(m.reshape(-1) if m is not None else None, w) for (m, _, w) in raws]
    base_f32 = bflat.dtype == torch.float32
    chunk_size = int(max(1, min(chunk_size, 1 << 24)))

    def base_piece(lo: int, hi: int, buf: torch.Tensor) -> torch.Tensor:
        """``base[lo:hi]`` in float32 (exact for a 16/32-bit base; a wider one is rounded as ever)."""
        return bflat[lo:hi] if base_f32 else buf[:hi - lo].copy_(bflat[lo:hi])

    def fill(i: int, lo: int, hi: int, out: torch.Tensor, b32: torch.Tensor | None) -> torch.Tensor:
        main, is_weight = mains[i]
        if main is None:
            return out.zero_()
        out.copy_(main[lo:hi])
        if is_weight:
            out.sub_(b32)
        return out

    def tau_row(i: int) -> torch.Tensor:
        row = torch.empty(numel, dtype=torch.float32)
        buf = torch.empty(min(numel, _PIECE), dtype=torch.float32)
        for lo in range(0, numel, _PIECE):
            hi = min(numel, lo + _PIECE)
            fill(i, lo, hi, row[lo:hi], base_piece(lo, hi, buf))
        return row

    if not 0.0 < topk <= 1.0:
        raise ConfigError(f"topk must be in (0, 1], got {topk}")
    k = max(1, min(numel, int(round(topk * numel)))) if numel else 1
    radix = k < numel and numel >= M.RADIX_MIN
    thr = torch.zeros(N, dtype=torch.float32)
    bad = []
    # the stored tensors as the kernels read them (float32, or bfloat16 bits); None: other dtypes,
    # whose task vector is built as a float32 row by torch first
    base_k = K.as_kernel_array(bflat)
    mains_k = [K.as_kernel_array(m) if (m is not None and base_k is not None) else None for (m, _) in mains]
    def threshold(i: int) -> float | None:
        """Expert i's top-k threshold; ``None`` when its task vector is not finite."""
        if mains[i][0] is None:
            return 0.0  # tau = 0: finite, threshold 0 (the k-th largest of zeros)
        if mains_k[i] is not None:
            src = (mains_k[i], base_k, mains[i][1])
        else:
            row = tau_row(i).numpy()
            src = (row, row, False)
        hist = np.zeros(M.HI_BINS if radix else 0, np.int64)
        split = dict(pool=pool if parallel and not by_expert else None, workers=workers)
        if not K.tau_hist(*src, hist, radix, **split):
            return None
        if radix:
            return K.tau_kth_largest(*src, k, hist, **split)
        if k < numel:  # a short row: numpy.partition of |tau| (the row built once)
            return M.kth_largest_nonneg(np.abs(src[0] if mains_k[i] is None else tau_row(i).numpy()), k)
        return 0.0

    parallel = pool is not None and workers > 1 and numel >= _PARALLEL_MIN
    # at least as many experts as workers: one expert per worker (measured faster: fewer hand-overs);
    # fewer: one expert at a time, its columns split into ranges, so every worker has work
    by_expert = N >= workers
    for i, v in enumerate(pool.map(threshold, range(N)) if parallel and by_expert else map(threshold, range(N))):
        if v is None:
            bad.append(i)
        else:
            thr[i] = v
    if bad:
        raise _non_finite_error(name, base_t, bad, files, enames)
    acc = _StatsAccumulator(N, torch.device("cpu"), dare_p, dare_seed)
    if acc.compiled:
        chunk_size = min(chunk_size, _CPU_BLOCK)
    base_sq = 0.0
    if acc.compiled and all(m is not None for m in mains_k):
        # the kernel reads the stored tensors directly: no float32 chunk is built at all
        w = np.array([1.0 if is_w else 0.0 for (_, is_w) in mains], np.float32)

        def column_range(lo: int, hi: int, acc: _StatsAccumulator) -> tuple[dict, float]:
            for start in range(lo, hi, chunk_size):
                c = min(hi, start + chunk_size) - start
                acc.add_stored(mains_k, w, base_k, start, c, start, thr)
            return acc.result(), acc.base_sq

        if not parallel:
            stats, base_sq = column_range(0, numel, acc)
        else:  # W column ranges (multiples of the chunk), one accumulator each, summed
            step = -(-numel // (workers * chunk_size)) * chunk_size
            parts = list(pool.map(lambda lo: column_range(lo, min(numel, lo + step), _StatsAccumulator(
                N, torch.device("cpu"), dare_p, dare_seed)), range(0, numel, step)))
            stats = {key: sum(p[0][key] for p in parts) for key in parts[0][0]}
            base_sq = sum(p[1] for p in parts)
        return name, numel, stats, base_sq, [mod for (_, mod, _) in raws], tau_row
    width = min(chunk_size, max(numel, 1))
    t = torch.empty(N, width, dtype=torch.float32)
    bc = torch.empty(width, dtype=torch.float32)
    try:
        with _exact_fp32_matmul():
            for start in range(0, numel, chunk_size):
                end = min(numel, start + chunk_size)
                tc = t if end - start == width else torch.empty(N, end - start, dtype=torch.float32)
                b32 = base_piece(start, end, bc)  # one cast per chunk, shared by the experts
                c64 = b32.double()
                base_sq += float(torch.dot(c64, c64))
                del c64
                for i in range(N):
                    fill(i, start, end, tc[i], b32)
                acc.add(tc, thr, start)
        stats = acc.result()
    finally:
        acc.close()
    return name, numel, stats, base_sq, [mod for (_, mod, _) in raws], tau_row


def _sq_norm(x: torch.Tensor, chunk_size: int = 1 << 19) -> float:
    """``sum(x ** 2)`` accumulated in float64, chunk by chunk (no full-size float64 copy)."""
    flat = x.reshape(-1)
    total = 0.0
    for s in range(0, flat.numel(), chunk_size):
        c = flat[s:s + chunk_size].double()
        total += float(torch.dot(c, c))
    return total


def _pair_sums(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """dot, squared norms, both-non-zero and opposite-sign counts of two flat float tensors."""
    with _exact_fp32_matmul():
        out = {"dot": float(torch.dot(a.double(), b.double())), "sq_text": float(a.double().square().sum()),
               "sq_mod": float(b.double().square().sum())}
    prod = torch.sign(a) * torch.sign(b)
    out["both_nonzero"] = float((prod != 0).sum())
    out["conflicts"] = float((prod < 0).sum())
    return out


# ----------------------------------------------------------------------------------- metrics
def _ratio(num: str, den: str) -> Callable[[pd.DataFrame], pd.Series]:
    def f(d: pd.DataFrame) -> pd.Series:
        den_v = d[den].astype(float)
        return d[num].astype(float) / den_v.where(den_v != 0)
    return f


def _sqrt_ratio(num: str, den: str) -> Callable[[pd.DataFrame], pd.Series]:
    def f(d: pd.DataFrame) -> pd.Series:
        den_v = d[den].astype(float)
        return np.sqrt(d[num].astype(float) / den_v.where(den_v != 0))
    return f


def _cos(dot: str, a: str, b: str) -> Callable[[pd.DataFrame], pd.Series]:
    def f(d: pd.DataFrame) -> pd.Series:
        den = np.sqrt(d[a].astype(float) * d[b].astype(float))
        return d[dot].astype(float) / den.where(den != 0)
    return f


@dataclass(frozen=True)
class MetricSpec:
    """A metric: the frame it lives in, the summed columns it needs, and how to form it from sums."""

    frame: str  # "pairs" | "per_expert" | "tensors" | "damc"
    columns: tuple[str, ...]
    fn: Callable[[pd.DataFrame], pd.Series]
    doc: str
    bounds: tuple[float, float] | None = None  # natural colour range


#: Every metric :meth:`InterferenceProfile.summary` knows. ``frame`` says its grain: per pair,
#: per expert, per tensor (the whole set) or per DAMC expert (text vs modality sets).
METRICS: dict[str, MetricSpec] = {
    "cosine": MetricSpec("pairs", ("dot", "sq_a", "sq_b"), _cos("dot", "sq_a", "sq_b"),
                         "cosine similarity of the task vectors", (-1, 1)),
    "conflict": MetricSpec("pairs", ("conflicts", "both_nonzero"), _ratio("conflicts", "both_nonzero"),
                           "sign-conflict rate over entries where both are non-zero", (0, 1)),
    "conflict_topk": MetricSpec("pairs", ("conflicts_kept", "both_kept"), _ratio("conflicts_kept", "both_kept"),
                                "sign-conflict rate over entries in both experts' top-k", (0, 1)),
    "rel_norm": MetricSpec("per_expert", ("tau_sq", "base_sq"), _sqrt_ratio("tau_sq", "base_sq"),
                           "|tau_i| / |theta_0|", None),
    "topk_conflict": MetricSpec("per_expert", ("topk_opposed", "topk_kept"), _ratio("topk_opposed", "topk_kept"),
                                "share of the expert's top-k entries opposed by another expert's top-k", (0, 1)),
    "elect_disagree": MetricSpec("per_expert", ("elect_opposed", "topk_kept"), _ratio("elect_opposed", "topk_kept"),
                                 "share of the expert's top-k entries opposite to the elected sign", (0, 1)),
    "ties_survival": MetricSpec("per_expert", ("ties_survived", "nonzero"), _ratio("ties_survived", "nonzero"),
                                "share of the expert's non-zero entries TIES keeps", (0, 1)),
    "ties_energy": MetricSpec("per_expert", ("ties_survived_sq", "tau_sq"), _ratio("ties_survived_sq", "tau_sq"),
                              "share of |tau_i|^2 TIES keeps", (0, 1)),
    "ties_share": MetricSpec("per_expert", ("ties_share_sq", "ties_merged_sq"), _sqrt_ratio("ties_share_sq", "ties_merged_sq"),
                             "|expert's share of the TIES merged vector| / |TIES merged vector|", None),
    "dare_kept": MetricSpec("per_expert", ("dare_kept_n", "nonzero"), _ratio("dare_kept_n", "nonzero"),
                            "share of the expert's non-zero entries DARE keeps", (0, 1)),
    "dare_energy": MetricSpec("per_expert", ("dare_kept_sq", "tau_sq"), _ratio("dare_kept_sq", "tau_sq"),
                              "share of |tau_i|^2 DARE keeps (before the 1/(1-p) rescale)", (0, 1)),
    "set_conflict": MetricSpec("tensors", ("set_conflicts", "multi_nonzero"), _ratio("set_conflicts", "multi_nonzero"),
                               "entries (>= 2 experts non-zero) whose signs are not all equal", (0, 1)),
    "set_elect_disagree": MetricSpec("tensors", ("elect_disagree_any", "elected"), _ratio("elect_disagree_any", "elected"),
                                     "entries where any expert's top-k value opposes the elected sign", (0, 1)),
    "ties_vs_ta": MetricSpec("tensors", ("ties_merged_sq", "ta_sq"), _sqrt_ratio("ties_merged_sq", "ta_sq"),
                             "|TIES merged tau| / |sum of tau_i|", None),
    "damc_cosine": MetricSpec("damc", ("dot", "sq_text", "sq_mod"), _cos("dot", "sq_text", "sq_mod"),
                              "cosine of a DAMC expert's text and modality deltas", (-1, 1)),
    "damc_conflict": MetricSpec("damc", ("conflicts", "both_nonzero"), _ratio("conflicts", "both_nonzero"),
                                "sign conflicts between a DAMC expert's text and modality deltas", (0, 1)),
}

_ENTITY = {"pairs": ["expert_a", "expert_b"], "per_expert": ["expert"], "tensors": [], "damc": ["expert"]}
_KEYS = ["tensor", "layer", "module", "numel"]


def _add_derived(frame: str, df: pd.DataFrame) -> pd.DataFrame:
    for m, spec in METRICS.items():
        if spec.frame == frame and len(df) and all(c in df.columns for c in spec.columns):
            df[m] = spec.fn(df)
    return df


def metric_by_group(df: pd.DataFrame, metric: str, by: Sequence[str] = ("layer", "module"), *, exact: bool = True) -> pd.DataFrame:
    """Aggregate ``metric`` of a profile frame over groups ``by`` (plus the frame's entity columns).

    ``exact=True`` sums the metric's numerator/denominator columns in each group and forms the
    metric from the sums (the value of the concatenated group); ``exact=False`` averages the
    per-tensor metric values (NaN ignored). Rows with no layer keep ``layer`` = NA.
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    spec = METRICS[metric]
    keys = [*by, *[c for c in _ENTITY[spec.frame] if c not in by]]
    for k in keys:
        if k not in df.columns:
            raise ConfigError(f"cannot group {metric!r} by {k!r}: columns are {list(df.columns)}")
    if not len(df):
        return pd.DataFrame(columns=[*keys, metric, "n_tensors"])
    if exact:
        cols = list(dict.fromkeys(spec.columns))
        if keys:
            g = df.groupby(keys, dropna=False, sort=True)
            sums = g[cols].sum(min_count=1).reset_index()
            sums["n_tensors"] = g.size().values
        else:
            sums = df[cols].sum(min_count=1).to_frame().T
            sums["n_tensors"] = len(df)
        sums[metric] = spec.fn(sums).astype(float)
        return sums[[*keys, metric, "n_tensors"]]
    vals = df[keys].copy()
    vals[metric] = spec.fn(df).astype(float)
    if keys:
        g = vals.groupby(keys, dropna=False, sort=True)
        out = g[metric].mean().reset_index()
        out["n_tensors"] = g.size().values
    else:
        out = pd.DataFrame({metric: [vals[metric].mean()], "n_tensors": [len(vals)]})
    return out


# ----------------------------------------------------------------------------------- the profile
@dataclass
class InterferenceProfile:
    """Result of :func:`profile_interference`: tidy frames with raw sums and per-tensor metrics.

    - ``pairs``: one row per tensor and expert pair (``expert_a < expert_b`` in input order);
    - ``per_expert``: one row per tensor and expert;
    - ``tensors``: one row per tensor, whole-set statistics;
    - ``damc``: one row per tensor and DAMC expert (text vs modality sets); empty otherwise;
    - ``meta``: experts, kinds, parameters, device, timings.
    """

    pairs: pd.DataFrame
    per_expert: pd.DataFrame
    tensors: pd.DataFrame
    damc: pd.DataFrame
    meta: dict = field(default_factory=dict)

    FRAMES = ("pairs", "per_expert", "tensors", "damc")

    @property
    def experts(self) -> list[str]:
        """Expert names in input order."""
        return list(self.meta.get("experts", []))

    def frame(self, metric: str) -> pd.DataFrame:
        """The frame that holds ``metric``."""
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
        return getattr(self, METRICS[metric].frame)

    def metrics(self) -> list[str]:
        """Metrics that have data in this profile."""
        return [m for m, s in METRICS.items() if len(getattr(self, s.frame))
                and all(c in getattr(self, s.frame).columns for c in s.columns)]

    def summary(self, metric: str, by: Sequence[str] = ("layer", "module"), *, exact: bool = True) -> pd.DataFrame:
        """``metric`` aggregated per group ``by`` (and per pair/expert for pair/expert metrics). See :func:`metric_by_group`."""
        return metric_by_group(self.frame(metric), metric, tuple(by), exact=exact)

    def save(self, out_dir: str | Path) -> Path:
        """Write every frame as CSV and Parquet, the layer x module summaries of every metric, and ``meta.json``.

        The files are written into a temporary sibling folder ``<out_dir>.tmp-<pid>`` and moved into
        ``out_dir`` together at the end (signals held), so an interrupt or an error leaves ``out_dir``
        as it was."""
        import shutil

        from ..io.writer import signals_held

        final = Path(out_dir)
        tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            out = save_frames(tmp, {name: getattr(self, name) for name in self.FRAMES})
            parts = []
            for m in self.metrics():
                s = self.summary(m).rename(columns={m: "value"})
                s.insert(0, "metric", m)
                parts.append(s)
            summ = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
            atomic_write(out / "summary_layer_module.csv", lambda p: summ.to_csv(p, index=False))
            save_json(out / "meta.json", self.meta)
            with signals_held():
                final.mkdir(parents=True, exist_ok=True)
                for f in sorted(tmp.iterdir()):
                    os.replace(f, final / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    @classmethod
    def load(cls, out_dir: str | Path) -> "InterferenceProfile":
        """Read a profile written by :meth:`save` (Parquet frames + ``meta.json``)."""
        d = Path(out_dir)
        frames = {}
        for name in cls.FRAMES:
            p = d / f"{name}.parquet"
            if not p.is_file():
                raise CheckpointError(f"profile frame {name!r} missing", file=p)
            frames[name] = pd.read_parquet(p)
        meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").is_file() else {}
        return cls(meta=meta, **frames)


@contextlib.contextmanager
def _intra_op_threads(n: int | None):
    """``torch.set_num_threads(n)`` for the duration (``None``: leave the setting alone)."""
    old = torch.get_num_threads()
    if n is None or int(n) == old:
        yield
        return
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _stratified_index(n: int, m: int, seed: int) -> torch.Tensor:
    """``m`` sorted flat indices in ``[0, n)``: one uniform draw in each of ``m`` equal strata
    (``floor((l + u_l) * n / m)``), so every entry's expected count is exactly ``m / n``."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(m, generator=gen, dtype=torch.float64)
    idx = ((torch.arange(m, dtype=torch.float64) + u) * (n / m)).floor_().to(torch.int64)
    return idx.clamp_(0, n - 1)


def _seed_for(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _select_names(base_reader: Any, sources: Sequence[Expert], names: Any) -> list[str]:
    keys = base_reader.keys()
    if names is None:
        out = keys
    elif callable(names):
        out = [k for k in keys if names(k)]
    elif hasattr(names, "merged"):
        out = [k for k in keys if names.merged(k)]
    else:
        wanted = list(names)
        missing = [k for k in wanted if k not in base_reader]
        if missing:
            raise CheckpointError(f"{len(missing)} requested tensor(s) not in the base", file=base_reader.path, tensor=missing[0])
        out = wanted
    out = [k for k in out if base_reader.info(k).dtype.is_floating_point]
    target_sets = [s.targets() for s in sources]
    if all(t is not None for t in target_sets):  # only adapters: skip tensors nobody changes
        union = set().union(*target_sets)
        out = [k for k in out if k in union]
    return out


def _materialize(t: torch.Tensor | None, pin: bool) -> torch.Tensor | None:
    """Force a memory-mapped tensor's bytes into memory (in the prefetch thread, so the disk read
    overlaps the previous tensor's arithmetic): its pages are touched in place (CPU), or it is
    copied into pinned memory when the target is a GPU."""
    if t is None:
        return None
    if pin:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t)
    if not t.is_contiguous():
        return t.contiguous()
    # zero-copy: fault every page of the (memory-mapped) tensor in, one byte per page, so the disk
    # read happens here; the arithmetic then reads the mapped pages themselves (no second copy)
    flat = t.reshape(-1).view(torch.uint8)
    if flat.numel():
        int(flat[::_PAGE].max())
    return t


@dataclass
class TensorBatch:
    """One tensor name's data on the compute device: the flat float32 base and the ``[N, n]`` task vectors."""

    name: str
    shape: tuple[int, ...]
    base: torch.Tensor
    taus: torch.Tensor
    raws: list  # per expert: (None - already in taus -, DAMC other-set CPU delta or None, main_is_weight)


def iter_task_vectors(
    base: str | Path,
    experts: Mapping[str, str | Path],
    device: str | torch.device = "auto",
    *,
    names: Iterable[str] | Callable[[str], bool] | Any = None,
    damc_set: str = "text",
    strict: bool = True,
    prefetch: bool = True,
    progress: bool = True,
    desc: str = "task vectors",
    meta: dict | None = None,
    sample_index: Callable[[str, int], torch.Tensor | None] | None = None,
    refuse_foreign: bool = False,
):
    """Yield a :class:`TensorBatch` per tensor name: base + every expert's task vector, one name at a time.

    Only one name (up to ``1 + _READ_AHEAD`` with ``prefetch``: the next ones are read in a
    background thread) is in memory at a time. Tensors travel to ``device`` in their stored dtype and are cast there.
    If ``meta`` is a dict it receives ``experts``, ``kinds``, ``paths``, ``device``, ``n_tensors``,
    ``base_path`` and, at the end, ``seconds_waiting_for_io``.
    ``sample_index(name, numel)`` may return sorted flat indices: only those entries are read
    (the batch is then 1-D, of the sample's length); ``None`` reads the whole tensor.
    The experts are validated against the base first, as ``workbench merge`` does
    (:mod:`workbench.io.validate`; ``refuse_foreign``: a LoRA adapter naming another base raises).
    """
    dev = resolve_device(device)
    N = len(experts)
    enames = list(experts)
    for name, base_t, raws, files in _raw_stream(base, experts, dev, names=names, damc_set=damc_set,
                                                   strict=strict, prefetch=prefetch, progress=progress,
                                                   desc=desc, meta=meta, sample_index=sample_index,
                                                   refuse_foreign=refuse_foreign):
        numel = base_t.numel()
        b = base_t.to(dev, non_blocking=True).reshape(-1).to(torch.float32)
        taus = torch.zeros(N, numel, dtype=torch.float32, device=dev)
        for i, (main, _, is_weight) in enumerate(raws):
            if main is None:
                continue
            taus[i].copy_(main.to(dev, non_blocking=True).reshape(-1))
            if is_weight:
                taus[i].sub_(b)
        bad = [i for i in range(N) if not bool(torch.isfinite(taus[i]).all())]
        if bad:
            raise _non_finite_error(name, base_t, bad, files, enames)
        shape = tuple(base_t.shape)
        raws = [(None, mod, w) for (_, mod, w) in raws]  # the task vectors hold the data now
        del base_t
        yield TensorBatch(name, shape, b, taus, raws)
        del taus, b, raws


_PAGE = 4096  # bytes per page touched by _materialize
#: tensor names read ahead by the prefetch thread (each one: the base's and every expert's tensor)
_READ_AHEAD = 2


def _validate_sources(base_reader: Any, sources: Sequence[Expert], *, strict: bool,
                      refuse_foreign: bool) -> None:
    """The checks ``workbench merge`` makes (:meth:`workbench.io.experts.Expert.validate`): a full
    expert's names and shapes (``strict``: it holds every base tensor), an adapter's targets and
    shapes and the base model it names."""
    for s in sources:
        s.validate(base_reader, allow_missing=not strict, refuse_foreign=refuse_foreign)


def _files_of(name: str, base_reader: Any, sources: Sequence[Expert]) -> list[Path]:
    """``[base file, expert files...]`` holding tensor ``name`` (:meth:`Expert.file_of`)."""
    return [base_reader.file_of(name)] + [s.file_of(name) for s in sources]


def _raw_stream(base, experts, dev: torch.device, *, names=None, damc_set: str = "text", strict: bool = True,
                prefetch: bool = True, progress: bool = True, desc: str = "task vectors", meta: dict | None = None,
                sample_index: Callable[[str, int], torch.Tensor | None] | None = None, refuse_foreign: bool = False):
    """Yield ``(name, base tensor, raws, files)`` per tensor name (``files``: :func:`_files_of`), the stored tensors read (and
    materialised) one name ahead in a background thread; ``raws`` holds per expert
    ``(weight or delta or None, DAMC other-set delta or None, first_is_weight)`` (CPU, or pinned
    memory for a GPU). :func:`iter_task_vectors` builds its float32 task vectors from these.
    With ``sample_index`` (see :func:`iter_task_vectors`) every tensor is the 1-D gather of its
    sampled entries (read from the memory map: only the pages holding them are touched)."""
    base_reader = _open_base(base)
    sources = [open_expert(p, name=n, damc_set=damc_set) for n, p in experts.items()]
    _validate_sources(base_reader, sources, strict=strict, refuse_foreign=refuse_foreign)
    todo = _select_names(base_reader, sources, names)
    enames = [s.name for s in sources]
    if meta is not None:
        meta.update({"experts": enames, "kinds": {s.name: s.kind for s in sources},
                     "paths": {s.name: repo_relative(s.path) for s in sources}, "device": str(dev),
                     "n_tensors": len(todo), "base_path": repo_relative(base_reader.path), "sources": sources})

    pin = dev.type == "cuda"

    def load(name: str):
        info = base_reader.info(name)
        raws = []
        for s in sources:
            main, mod, is_weight = s.raw(name)
            if main is None and s.kind == "full" and strict:
                raise CheckpointError(f"expert {s.name!r} lacks a tensor of the base", file=s.path, tensor=name)
            for t in (main, mod):
                if t is not None and tuple(t.shape) != tuple(info.shape):
                    raise CheckpointError(f"expert {s.name!r}: shape {tuple(t.shape)} != base {tuple(info.shape)}",
                                          file=s.path, tensor=name)
            raws.append((main, mod, is_weight))
        idx = sample_index(name, math.prod(info.shape)) if sample_index is not None else None

        def mat(t: torch.Tensor | None) -> torch.Tensor | None:
            if idx is None or t is None:
                return _materialize(t, pin)
            out = t.reshape(-1).index_select(0, idx)
            return out.pin_memory() if pin else out

        return mat(base_reader.get(name)), [(mat(m), mat(d), w) for (m, d, w) in raws]

    from tqdm.auto import tqdm

    t_wait = 0.0
    bar = tqdm(total=len(todo), desc=desc, unit="tensor", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
    ahead = _READ_AHEAD if prefetch else 0
    try:
        pending = collections.deque(pool.submit(load, n) for n in todo[:ahead]) if pool else None
        for idx, name in enumerate(todo):
            tw = time.perf_counter()
            if pool is not None:
                base_t, raws = pending.popleft().result()
                if idx + ahead < len(todo):
                    pending.append(pool.submit(load, todo[idx + ahead]))
            else:
                base_t, raws = load(name)
            t_wait += time.perf_counter() - tw
            yield name, base_t, raws, _files_of(name, base_reader, sources)
            del base_t, raws
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if meta is not None:
            meta["seconds_waiting_for_io"] = round(t_wait, 3)


def profile_interference(
    base: str | Path,
    experts: Mapping[str, str | Path],
    device: str | torch.device = "auto",
    topk: float = 0.2,
    out_dir: str | Path | None = None,
    *,
    dare_p: float | None = 0.2,
    seed: int = 0,
    names: Iterable[str] | Callable[[str], bool] | Any = None,
    damc_set: str = "text",
    strict: bool = True,
    chunk_size: int = 1 << 19,
    prefetch: bool = True,
    progress: bool = True,
    threads: int | None = None,
    sample: int | None = None,
    refuse_foreign: bool = False,
) -> InterferenceProfile:
    """Stream over the experts' task vectors, one tensor name at a time, and profile their interference.

    Args:
        base: the shared base LLM (HF folder, weight file, or a zoo ``base/`` folder).
        experts: ``{name: path}``, at least two; see :func:`workbench.io.experts.open_expert` for the layouts.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; tensors are moved there in their stored dtype
            and cast to float32 on the device.
        topk: fraction kept by the TIES trim (per expert and tensor).
        out_dir: if given, :meth:`InterferenceProfile.save` writes the result there.
        dare_p: DARE drop probability for the kept-fraction metrics (``None``: skip them).
        seed: DARE seed; each tensor uses ``seed`` combined with a CRC of its name, so results do
            not depend on the order or subset of tensors. The draws are counter-based (a hash of
            seed, expert and entry position: :mod:`workbench.cpu_kernels`), the same on
            every device and for every ``chunk_size``.
        names: restrict to these tensor names (list, predicate or ``NameFilter``); default every
            floating-point base tensor (only the adapters' targets when every expert is an adapter).
        damc_set: which DAMC parameter set is the expert's task vector (``"text"``, the merged set).
        strict: a full-checkpoint expert lacking a base tensor raises; ``False`` treats it as ``tau = 0``.
        chunk_size: entries per column chunk inside a tensor (bounds the temporaries).
        prefetch: read the next tensors (:data:`_READ_AHEAD` names) in a background thread while
            the current one is computed.
        progress: show a tqdm bar.
        threads: worker threads for the arithmetic on a CPU device. The compiled kernels
            (:mod:`workbench.cpu_kernels`: bfloat16 / float32 tensors, up to 8 experts) run
            the experts' thresholds in parallel and split each tensor's columns into ``threads``
            ranges (they release the GIL; the reading runs in the prefetch thread beside them).
            An integer also sets torch's intra-op threads for the call (``torch.set_num_threads``,
            restored after), which the torch fallback uses (other dtypes, more experts).
            ``None`` (default): ``torch.get_num_threads()`` workers, torch's setting untouched.
            Measured on the 2-core box (296.8M params, 4 experts, ``benchmarks/profile_speed.py``):
            2 threads cut the exact profile's wall time by ~1.6x (warm) to ~1.8x (cold) against 1.
            Counts are exact whatever the setting; float sums change in their last bits (1e-15
            relative) with the number of column ranges. On the torch fallback, two intra-op
            threads per 2M-entry operation cost 2-10x the CPU time of one on the loaded 2-core
            box (measured earlier), and its float32 dots behind ``ta_sq`` and ``ties_merged_sq``
            depend on the thread count at the 1e-5 relative level: pass ``threads=1`` there.
        sample: ``None`` (default): the exact profile. An integer ``m``: an *estimate* from ``m``
            entries per tensor (tensors with at most ``m`` entries stay exact), chosen by stratified
            sampling (entry ``floor((l + u_l) * n / m)`` for ``l < m``, ``u_l`` uniform, seeded by
            ``seed`` and the tensor name) at the same positions for every expert; only those
            entries are read. Every sum is scaled by ``n / m`` (each entry's expected weight is 1:
            unbiased for every sum; ``numel`` stays the true size). The TIES threshold is the k-th
            largest of the sampled ``|tau|`` (``k = round(topk * m)``, a sample quantile), the DARE
            draws are the sample's own, and the non-finite check sees the sampled entries only.
            Error, per tensor (stated as for sampling with replacement, which stratification only
            lowers): a fraction ``p`` over ``m'`` sampled entries in its denominator has a standard
            error of at most ``sqrt(p (1 - p) / m')`` (``m = 65536``: <= 0.002 for ``conflict`` over
            dense task vectors, <= 0.01 for ``conflict_topk`` at ``topk = 0.2``, ``m' ~ 0.04 m``;
            the top-k metrics add the sample quantile's error, about as large again); squared norms,
            dots and the norm ratios (``rel_norm``, energies, shares) a relative standard error of
            ``CV / sqrt(m)``, ``CV`` the coefficient of variation of the summed per-entry terms
            (``sqrt(2)`` for Gaussian task vectors: ~0.006 at ``m = 65536``); cosines an absolute
            standard error below ``1 / sqrt(m)``. Group summaries pool tensors and shrink these
            (a large tensor still counts ``m`` entries: its weight is its true size). ``meta`` records
            ``sample``; ``tests/test_interference.py`` checks the errors against the exact profile.
        refuse_foreign: raise (instead of warning) for an expert that looks fine-tuned from another
            base (``||tau|| / ||theta_0||`` over its matrices above
            :data:`workbench.io.validate.FOREIGN_RATIO`, as ``workbench merge`` checks) and for a
            LoRA adapter naming another base model; nothing is written then.

    The experts are validated against the base before any tensor is read, by the checks
    ``workbench merge`` makes (:mod:`workbench.io.validate`), and ``out_dir`` may not be, lie
    inside, or contain an input.
    """
    if len(experts) < 2:
        raise ConfigError(f"profile_interference needs at least two experts, got {list(experts)}")
    if not 0.0 < topk <= 1.0:
        raise ConfigError(f"topk must be in (0, 1], got {topk}")
    if sample is not None and int(sample) < 1:
        raise ConfigError(f"sample must be a positive number of entries or None, got {sample}")
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"threads must be >= 1 or None, got {threads}")
    if out_dir is not None:
        from ..io.validate import check_output_path

        check_output_path(Path(out_dir), [Path(base), *map(Path, experts.values())])
        if Path(out_dir).exists() and not Path(out_dir).is_dir():
            raise ConfigError(f"output {out_dir} exists and is not a folder; refusing to replace it")
    info: dict = {}
    dev = resolve_device(device)
    numels: dict[str, int] = {}

    def sample_index(name: str, numel: int) -> torch.Tensor | None:
        numels[name] = numel
        if sample is None or numel <= int(sample):
            return None
        return _stratified_index(numel, int(sample), _seed_for(seed, "sample:" + name))

    kw = dict(names=names, damc_set=damc_set, strict=strict, prefetch=prefetch, progress=progress,
              desc="interference", meta=info, sample_index=sample_index, refuse_foreign=refuse_foreign)

    def scaled(name: str, m: int, st: dict, base_sq: float):
        """``(true numel, stats, base_sq, scale)``: sums of a sampled tensor scaled by ``n / m``."""
        n = numels[name]
        if n == m:
            return n, st, base_sq, 1.0
        scale = n / m
        return n, {k: v * scale for k, v in st.items()}, base_sq * scale, scale


    workers = int(threads if threads is not None else torch.get_num_threads()) if dev.type == "cpu" else 1
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="profile") if workers > 1 else None
    if dev.type == "cpu":
        # streaming: the [N, n] float32 task vectors are never held; memory ~ the stored tensors
        def streamed():
            for name, base_t, raws, files in _raw_stream(base, experts, dev, **kw):
                name, m, st, base_sq, mods, tau_row = _streamed_stats(
                    name, base_t, raws, files, list(experts), topk=topk, dare_p=dare_p,
                    dare_seed=_seed_for(seed, name), chunk_size=chunk_size, pool=pool, workers=workers)
                yield (name, *scaled(name, m, st, base_sq), mods, tau_row)
        stream = streamed()
    else:
        def batches():
            for batch in iter_task_vectors(base, experts, dev, **kw):
                st = tensor_stats(batch.taus, topk=topk, dare_p=dare_p, dare_seed=_seed_for(seed, batch.name),
                                  chunk_size=chunk_size)
                taus = batch.taus
                yield (batch.name, *scaled(batch.name, taus.shape[1], st, _sq_norm(batch.base, chunk_size)),
                       [mod for (_, mod, _) in batch.raws], lambda i, taus=taus: taus[i])
        stream = batches()
    pair_rows: list[dict] = []
    exp_rows: list[dict] = []
    set_rows: list[dict] = []
    damc_rows: list[dict] = []
    t0 = time.perf_counter()
    with _intra_op_threads(threads if dev.type == "cpu" else None), (pool or contextlib.nullcontext()):
        for name, numel, st, base_sq, scale, mods, tau_row in stream:
            sources = info["sources"]
            enames = info["experts"]
            N = len(enames)
            layer, module = parse_name(name)
            st = {k: v.cpu().numpy() for k, v in st.items()}
            key = {"tensor": name, "layer": layer, "module": module, "numel": numel}
            g = st["gram"]
            for i, j in itertools.combinations(range(N), 2):
                pair_rows.append({**key, "expert_a": enames[i], "expert_b": enames[j], "dot": g[i, j],
                                  "sq_a": g[i, i], "sq_b": g[j, j], "both_nonzero": st["both_nonzero"][i, j],
                                  "conflicts": st["conflicts"][i, j], "both_kept": st["both_kept"][i, j],
                                  "conflicts_kept": st["conflicts_kept"][i, j]})
            for i in range(N):
                row = {**key, "expert": enames[i], "kind": sources[i].kind, "base_sq": base_sq, "tau_sq": g[i, i],
                       "ties_merged_sq": float(st["ties_merged_sq"])}
                for k in ("nonzero", "topk_kept", "topk_opposed", "elect_opposed", "ties_survived",
                          "ties_survived_sq", "ties_share_sq", "dare_kept_n", "dare_kept_sq"):
                    row[k] = float(st[k][i])
                exp_rows.append(row)
            set_rows.append({**key, "n_experts": N, "base_sq": base_sq,
                             **{k: float(st[k]) for k in ("multi_nonzero", "set_conflicts", "elected",
                                                          "elect_disagree_any", "ties_merged_sq", "ta_sq")}})
            for i, (s, mod) in enumerate(zip(sources, mods)):
                if s.kind == "damc" and mod is not None:
                    a = tau_row(i)
                    m = mod.to(a.device).reshape(-1).to(torch.float32)
                    ps = {k: v * scale for k, v in _pair_sums(a, m).items()}
                    if damc_set == "modality":  # a is the modality set here: keep the column names true
                        ps["sq_text"], ps["sq_mod"] = ps["sq_mod"], ps["sq_text"]
                    damc_rows.append({**key, "expert": s.name, **ps})
    elapsed = time.perf_counter() - t0

    def frame(rows: list[dict], kind: str, extra: Sequence[str]) -> pd.DataFrame:
        df = pd.DataFrame(rows, columns=None if rows else [*_KEYS, *_ENTITY[kind], *extra])
        if len(df):
            df["layer"] = df["layer"].astype("Int64")
        return _add_derived(kind, df)

    prof = InterferenceProfile(
        pairs=frame(pair_rows, "pairs", ("dot", "sq_a", "sq_b")),
        per_expert=frame(exp_rows, "per_expert", ("tau_sq", "base_sq")),
        tensors=frame(set_rows, "tensors", ("set_conflicts", "multi_nonzero")),
        damc=frame(damc_rows, "damc", ("dot", "sq_text", "sq_mod")),
        meta={"base": repo_relative(base), **{k: v for k, v in info.items() if k != "sources"}, "topk": topk,
              "dare_p": dare_p, "seed": seed, "damc_set": damc_set, "sample": sample,
              "threads": threads if dev.type == "cpu" else None, "seconds": round(elapsed, 3)},
    )
    foreign_check(prof, strict=refuse_foreign)
    if out_dir is not None:
        prof.save(out_dir)
    return prof


def foreign_check(prof: "InterferenceProfile", *, strict: bool = False) -> list[str]:
    """The foreign-expert check of ``workbench merge`` (:class:`workbench.io.validate.TaskVectorNorms`)
    on a profile's ``tau_sq`` / ``base_sq`` sums per expert and tensor; returns the flagged experts."""
    from ..io.validate import TaskVectorNorms

    meta = prof.meta
    norms = TaskVectorNorms(prof.experts)
    index = {e: i for i, e in enumerate(prof.experts)}
    df = prof.per_expert
    if len(df):
        # headers only: the tensors' dimensions (meta names files relative to the repository)
        with CheckpointReader(resolve_repo_path(meta["base_path"])) as base:
            for row in df[["tensor", "expert", "tau_sq", "base_sq"]].itertuples(index=False):
                norms.add(row.tensor, len(base.info(row.tensor).shape), index[row.expert], row.tau_sq, row.base_sq)
    paths = meta.get("paths", {})
    return norms.check(strict=strict, files=[paths.get(e, e) for e in prof.experts])
