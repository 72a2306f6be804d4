"""The SVD-based merges of 2-D tensors: TSV-M, Iso-C and Iso-CTS (other tensors get the mean ``tau_i``)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError
from .common import finish, stack_task_vectors
from .registry import merge_method

Tensor = torch.Tensor

#: the paper of Iso-C and Iso-CTS
ISO_REFERENCE = ("Marczak et al., ICML 2025, No Task Left Behind: Isotropic Model Merging with Common and "
                 "Task-Specific Subspaces, arXiv:2502.04959")


def _whiten(M: Tensor) -> Tensor:
    """The orthogonal factor ``P Q^T`` of ``M = P S Q^T`` (nearest matrix with orthonormal columns)."""
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def tsv_merge_tau(taus: Tensor, rank: int | None = None) -> Tensor:
    """TSV-M (Gargiulo et al. 2025) on stacked 2-D task vectors ``[N, m, n]``.

    Each ``tau_i = U_i S_i V_i^T`` keeps its top ``r`` triplets (``r = max(1, floor(min(m,n)/N))``
    unless ``rank`` is given); the ``U``s, singular values and ``V``s are concatenated; ``U_cat``
    and ``V_cat`` are replaced by their orthogonal factors (``P Q^T`` from their SVDs); the result
    is ``U_perp diag(s_cat) V_perp^T``.
    """
    N, m, n = taus.shape
    r = int(rank) if rank is not None else max(1, min(m, n) // N)
    r = max(1, min(r, min(m, n)))
    U, S, Vh = torch.linalg.svd(taus, full_matrices=False)  # [N,m,q], [N,q], [N,q,n]
    U_cat = U[:, :, :r].permute(1, 0, 2).reshape(m, N * r)
    S_cat = S[:, :r].reshape(N * r)
    V_cat = Vh[:, :r, :].reshape(N * r, n).T
    return _whiten(U_cat) @ torch.diag(S_cat) @ _whiten(V_cat).T


def iso_c_merge_tau(taus: Tensor) -> Tensor:
    """Iso-C (Marczak et al. 2025): SVD of ``sum_i tau_i`` with every singular value replaced by
    their mean (over all ``min(m, n)`` of them)."""
    U, S, Vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    return (U * S.mean()) @ Vh


def iso_cts_merge_tau(taus: Tensor, common_space_fraction: float = 0.8) -> Tensor:
    """Iso-CTS (Marczak et al. 2025, "No task left behind: isotropic model merging with common and
    task-specific subspaces") on stacked 2-D task vectors ``[N, m, n]``.

    With ``q = min(m, n)``: the common subspace is the top ``k`` singular triplets of
    ``sum_i tau_i``, ``k = q - N * round((q - floor(fraction * q)) / N)`` (the task-specific
    budget is rounded to a multiple of N, as in the authors' code); each task gets
    ``s = (q - k) / N`` directions: the top ``s`` singular triplets of ``tau_i`` projected out
    of the common left subspace (``tau_i - U_c U_c^T tau_i``). The ``U``s and ``V``s are
    concatenated and orthogonalised (``P Q^T``), and every singular value is replaced by the mean
    of the concatenated ones. ``common_space_fraction = 0.8`` is the paper's default.
    """
    N, m, n = taus.shape
    frac = float(common_space_fraction)
    if not 0.0 <= frac <= 1.0:
        raise ConfigError(f"common_space_fraction must be in [0, 1], got {common_space_fraction}")
    q = min(m, n)
    k = int(q * frac)
    ts_total = int(round((q - k) / N)) * N
    k = q - ts_total
    s = ts_total // N
    U, S, Vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    us, ss, vs = [U[:, :k]], [S[:k]], [Vh[:k, :].T]
    if s > 0:
        Uc = U[:, :k]
        proj = taus - Uc @ (Uc.T @ taus)  # [N, m, n]
        Ut, St, Vht = torch.linalg.svd(proj, full_matrices=False)
        for i in range(N):
            us.append(Ut[i, :, :s])
            ss.append(St[i, :s])
            vs.append(Vht[i, :s, :].T)
    U_all, S_all, V_all = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    return (_whiten(U_all) * S_all.mean()) @ _whiten(V_all).T


@merge_method("tsv", "TSV",
              "Gargiulo et al., CVPR 2025, Task Singular Vectors: Reducing Task Interference in Model Merging, "
              "arXiv:2412.00081",
              doc="TSV-M: per-task top-r SVD, concatenated and whitened; non-2-D averaged")
def tsv(base: Tensor, experts: Sequence[Tensor], *, name: str = "", generator=None, scale: float = 1.0,
        rank: int | None = None) -> Tensor:
    """TSV-M, the correct version (methods.md 4): :func:`tsv_merge_tau` on 2-D tensors; other
    tensors get the mean of the ``tau_i``. ``rank`` overrides ``floor(min(m, n) / N)``."""
    taus = stack_task_vectors(base, experts)
    tau_m = tsv_merge_tau(taus, rank) if base.dim() == 2 else taus.mean(0)
    return finish(base, tau_m, scale)


@merge_method("iso_c", "Iso-C", ISO_REFERENCE,
              doc="Iso-C: SVD of sum tau_i, singular values replaced by their mean")
def iso_c(base: Tensor, experts: Sequence[Tensor], *, name: str = "", generator=None, scale: float = 1.0) -> Tensor:
    """Iso-C: :func:`iso_c_merge_tau` on 2-D tensors; other tensors get the mean of the ``tau_i``."""
    taus = stack_task_vectors(base, experts)
    return finish(base, iso_c_merge_tau(taus) if base.dim() == 2 else taus.mean(0), scale)


@merge_method("iso_cts", "Iso-CTS", ISO_REFERENCE,
              doc="Iso-CTS: common subspace (80%) + task-specific directions, isotropic")
def iso_cts(base: Tensor, experts: Sequence[Tensor], *, name: str = "", generator=None, scale: float = 1.0,
            common_space_fraction: float = 0.8) -> Tensor:
    """Iso-CTS: :func:`iso_cts_merge_tau` on 2-D tensors (``common_space_fraction = 0.8``, the
    paper's default); other tensors get the mean of the ``tau_i``."""
    taus = stack_task_vectors(base, experts)
    tau_m = iso_cts_merge_tau(taus, common_space_fraction) if base.dim() == 2 else taus.mean(0)
    return finish(base, tau_m, scale)
