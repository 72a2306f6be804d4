"""WUDI and OptMerge: the quadratic objective ``sum_i w_i ||(tau_m - T_i) P_i^T||_F^2`` per 2-D
tensor (:class:`Targets`, OptMerge's presets), its iterative (Adam / SGD) and exact solvers, the
methods ``wudi`` / ``optmerge`` with their batched forms, and :func:`objective_report`.

The batched forms (``wudi_batched``, ``optmerge_batched``) optimise ``B`` same-shape 2-D tensors
at once (``bmm``) for the GPU path of :mod:`workbench.engine`; they run the same code as the
per-tensor functions (which call them with ``B = 1``). The ``precision`` parameter
(:data:`PRECISIONS`) picks the arithmetic of the iterative solver's per-step matmuls.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import ConfigError
from .common import finish, stack_task_vectors
from .registry import get_method, merge_method

Tensor = torch.Tensor

#: the paper of OptMerge and the benchmark, and its official code (which also holds the WUDI
#: implementation followed here: ``wudi_merging``; docs/METHODS.md)
OPTMERGE_PAPER = ("Wei et al., ICLR 2026, OptMerge: Unifying Multimodal LLM Capabilities and Modalities via Model "
                  "Merging, arXiv:2505.19892")
OFFICIAL_CODE = "https://github.com/WalkerWorldPeace/MLLMerging"


#: OptMerge settings by setting (methods.md section 4 table, checked against the authors' code:
#: ``InternVL/internvl_chat/model_merging.py`` for ``full_ft``, ``LLaMA-Factory/model_merging.py`` for
#: ``lora``, ``ModelCompose/scripts/model_composition/ties_merging.py`` for ``modality``; see
#: docs/METHODS.md). ``k_ratio=None``: k = floor(min(m,n)/N). ``target``: ``"centred"``
#: ``T_i = trunc_k(tau_i - mean_j tau_j) + mean_j tau_j`` (the InternVL code's "demeaned SVD") or
#: ``"truncated"`` ``T_i = trunc_k(tau_i)``. ``projection``: ``"rank_k"`` ``P_i = S_k V_k^T`` or
#: ``"full"`` ``P_i = tau_i`` (WUDI's Gram, as the modality code).
OPTMERGE_PRESETS: dict[str, dict[str, Any]] = {
    "full_ft": {"init": "sum", "optimizer": "adam", "lr": 1e-5, "momentum": 0.0, "steps": 300, "k_ratio": None,
                "target": "centred", "projection": "rank_k"},
    "lora": {"init": "mean", "optimizer": "sgd", "lr": 1e-4, "momentum": 0.9, "steps": 300, "k_ratio": None,
             "target": "truncated", "projection": "rank_k"},
    "modality": {"init": "mean", "optimizer": "sgd", "lr": 5e-2, "momentum": 0.9, "steps": 300, "k_ratio": 0.2,
                 "target": "truncated", "projection": "full"},
}
TARGETS = ("centred", "truncated")
PROJECTIONS = ("rank_k", "full")
#: ``lr_scale`` values of the iterative solver: ``"absolute"`` (the paper's: ``lr`` as given) or
#: ``"relative"`` (ours, for models whose weights are not at 7B scale; see :func:`wudi`).
LR_SCALES = ("absolute", "relative")
#: The iterative solve counts as converged when the gradient norm at its end is at most this
#: fraction of the gradient norm at its initialisation (:func:`objective_report`).
CONVERGED_GRAD_RATIO = 1e-2


@dataclass(frozen=True)
class Targets:
    """How one tensor's objective ``sum_i w_i ||(X - T_i) P_i^T||_F^2`` is built from the ``tau_i``.

    ``k=None``: WUDI (``T_i = P_i = tau_i``). Otherwise OptMerge with rank ``k``; ``target`` and
    ``projection`` as in :data:`OPTMERGE_PRESETS`.
    """

    k: int | None = None
    target: str = "truncated"
    projection: str = "rank_k"

    def rows(self, m: int, n: int) -> int:
        """Rows of each ``P_i`` (the number of directions it contributes)."""
        return m if self.k is None or self.projection == "full" else min(int(self.k), m, n)


def _as_expert_stack(experts: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(experts, Tensor):
        return experts
    return torch.stack(list(experts))


def _rank_k(m: int, n: int, N: int, k_ratio: float | None) -> int:
    q = min(m, n)
    if k_ratio is None:
        return max(1, q // N)
    r = float(k_ratio)
    if not 0.0 < r <= 1.0:
        raise ConfigError(f"k_ratio must be in (0, 1], got {k_ratio}")
    return max(1, min(q, int(math.floor(r * q + 1e-9))))


@dataclass
class _System:
    """The objective ``sum_i w_i ||(X - T_i) P_i^T||_F^2`` of a batch, in one of two forms.

    Gram form: ``A = sum_i w_i P_i^T P_i [B, n, n]`` and ``C = sum_i w_i T_i P_i^T P_i [B, m, n]``;
    gradient ``2 (X A - C)`` (cost ``m n^2`` per step). Factored form: ``Pp [B, K, n]`` and
    ``Rp [B, m, K]``, the blocks ``sqrt(w_i) P_i`` and ``sqrt(w_i) T_i P_i^T`` stacked, so the
    objective is ``||X Pp^T - Rp||_F^2`` and the gradient ``2 (X Pp^T - Rp) Pp`` (cost ``2 m n K``).
    ``K_eff [B]``: summed rank bound of the experts with non-zero weight. ``c0 [B]``: the
    constant ``sum_i w_i ||T_i P_i^T||_F^2`` of the Gram form's objective
    ``tr(X A X^T) - 2 tr(X C^T) + c0``.
    """

    K_eff: Tensor
    A: Tensor | None = None
    C: Tensor | None = None
    Pp: Tensor | None = None
    Rp: Tensor | None = None
    c0: Tensor | None = None

    def objective_and_grad_norm(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """The objective and the norm of its gradient at ``X [B, m, n]`` (float64, ``[B]`` each)."""
        X = X.to(torch.float64)
        if self.A is not None:
            XA = torch.bmm(X, self.A.to(torch.float64))
            C = self.C.to(torch.float64)
            f = (XA * X).sum((-2, -1)) - 2.0 * (X * C).sum((-2, -1)) + self.c0.to(torch.float64)
            return f.clamp_min(0.0), 2.0 * torch.linalg.matrix_norm(XA - C)
        Pp = self.Pp.to(torch.float64)
        r = torch.bmm(X, Pp.transpose(-1, -2)) - self.Rp.to(torch.float64)
        return r.pow(2).sum((-2, -1)), 2.0 * torch.linalg.matrix_norm(torch.bmm(r, Pp))


def _as_targets(k: int | None | Targets) -> Targets:
    return k if isinstance(k, Targets) else Targets(k=None if k is None else int(k))


def _factors(tau: Tensor, t: Targets, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(P_i, T_i P_i^T)`` of one expert's ``[B, m, n]`` task vectors (``mean``: the experts'
    mean ``[B, m, n]``, needed by ``target="centred"``).

    WUDI (``t.k=None``): ``T_i = P_i = tau_i``. OptMerge, rank k, ``tau_i = U S V^T``:
    ``P_i = S_k V_k^T`` (``projection="rank_k"``) or ``tau_i`` (``"full"``); ``T_i = U_k S_k V_k^T``
    (``target="truncated"``) or ``trunc_k(tau_i - mean) + mean`` (``"centred"``, the truncation of
    the centred vector by its own SVD). Truncated and rank-k: ``T_i P_i^T = U_k S_k^2`` (the sign
    choices of the SVD cancel).
    """
    if t.k is None:
        return tau, tau @ tau.transpose(-1, -2)
    k = int(t.k)
    if t.projection == "rank_k" or t.target == "truncated":
        U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
        U, S, Vh = U[..., :k], S[..., :k], Vh[..., :k, :]
    P = S[..., :, None] * Vh if t.projection == "rank_k" else tau
    if t.target == "truncated":
        if t.projection == "rank_k":
            return P, U * S.pow(2)[..., None, :]
        T = (U * S[..., None, :]) @ Vh
    else:
        if mean is None:
            raise ConfigError("target='centred' needs the experts' mean task vector")
        Uc, Sc, Vhc = torch.linalg.svd(tau - mean, full_matrices=False)
        T = (Uc[..., :k] * Sc[..., None, :k]) @ Vhc[..., :k, :] + mean
    return P, T @ P.transpose(-1, -2)


def _system(taus: Tensor, t: Targets | int | None, *, form: str | None = None,
            dtype: torch.dtype = torch.float32) -> _System:
    """Build :class:`_System` for ``taus [N, B, m, n]`` (``t`` an int k: OptMerge's truncated
    targets) with ``w_i = 1 / ||tau_i||_F^2`` (0 for an
    all-zero ``tau_i``; the mean of ``target="centred"`` is over all N experts, as the official code).
    ``form=None`` picks the cheaper per-step gradient: Gram unless ``n > 2 K``. One expert at a
    time, so the workspace stays near one ``[B, m, n]`` per expert."""
    N, B, m, n = taus.shape
    t = _as_targets(t)
    rank = t.rows(m, n)
    K = N * rank
    if form is None:
        form = "gram" if n <= 2 * K else "factored"
    sq = taus.to(dtype).pow(2).sum((-2, -1))  # [N, B]
    w = torch.where(sq > 0, 1.0 / sq.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(sq))
    K_eff = (sq > 0).sum(0) * rank
    mean = taus.to(dtype).mean(0) if t.k is not None and t.target == "centred" else None
    if form == "gram":
        A = torch.zeros(B, n, n, dtype=dtype, device=taus.device)
        C = torch.zeros(B, m, n, dtype=dtype, device=taus.device)
        c0 = torch.zeros(B, dtype=torch.float64, device=taus.device)
        for i in range(N):
            tau = taus[i].to(dtype)
            wi = w[i][:, None, None]
            if t.k is None:
                G = tau.transpose(-1, -2) @ tau
                A.add_(wi * G)
                C.add_(wi * (tau @ G))
                c0.add_(w[i].double() * G.double().pow(2).sum((-2, -1)))  # ||tau tau^T||_F = ||tau^T tau||_F
            else:
                P, R = _factors(tau, t, mean)
                A.add_(wi * (P.transpose(-1, -2) @ P))
                C.add_(wi * (R @ P))
                c0.add_(w[i].double() * R.double().pow(2).sum((-2, -1)))
        return _System(K_eff=K_eff, A=A, C=C, c0=c0)
    Ps, Rs = [], []
    for i in range(N):
        P, R = _factors(taus[i].to(dtype), t, mean)
        ws = w[i].sqrt()[:, None, None]
        Ps.append(ws * P)
        Rs.append(ws * R)
    return _System(K_eff=K_eff, Pp=torch.cat(Ps, dim=1), Rp=torch.cat(Rs, dim=2))


def quadratic_merge_loss(tau_m: Tensor, taus: Tensor | Sequence[Tensor], k: int | None | Targets = None) -> Tensor:
    """WUDI's (``k=None``) or OptMerge's (rank ``k``, truncated targets, rank-k ``P_i``; or any
    :class:`Targets`) objective ``sum_i w_i ||(tau_m - T_i) P_i^T||_F^2`` for one 2-D tensor
    (``taus`` ``[N, m, n]``) or a batch (``tau_m [B, m, n]``, ``taus [N, B, m, n]``)."""
    taus = _as_expert_stack(taus)
    single = tau_m.dim() == 2
    if single:
        tau_m, taus = tau_m[None], taus[:, None]
    s = _system(taus, _as_targets(k), form="factored")
    loss = (tau_m.to(s.Pp.dtype) @ s.Pp.transpose(-1, -2) - s.Rp).pow(2).sum((-2, -1))
    return loss[0] if single else loss


def _exact_solve(taus: Tensor, t: Targets, X0: Tensor, eps: float, s: _System | None = None) -> Tensor:
    """The minimiser of the objective nearest ``X0`` (float64, result in ``taus``' dtype).

    Every minimiser solves ``X A = C`` (Gram form). Where ``A`` is singular (``N * rank < n``:
    GQA k/v projections, down projections, any ``m < n``) they form the affine set
    ``C A^+ + Y (I - A A^+)``; this returns ``X0 + (C - X0 A) A^+ = C A^+ + X0 (I - A A^+)``: the
    part of the initialisation outside the span of the ``P_i`` is kept, which is where gradient
    descent (and SGD with momentum) from ``X0`` converges, since its steps ``-(X A - C)`` lie in
    that span. (Adam's per-entry scaling leaves the span, so its limit is near this, not equal.)
    ``A^+`` is the pseudo-inverse from ``eigh``, eigenvalues at most ``eps * max eigenvalue``
    treated as 0 (``A = 0``, every ``tau_i = 0``: ``X0``). ``s``: the float64 Gram system, if built.
    """
    s = s if s is not None else _system(taus, t, form="gram", dtype=torch.float64)
    A, C = s.A, s.C
    evals, Q = torch.linalg.eigh(A)
    top = evals.amax(-1, keepdim=True)
    inv = torch.where(evals > float(eps) * top, 1.0 / evals, torch.zeros_like(evals))
    X0 = X0.to(torch.float64)
    R = C - torch.bmm(X0, A)
    X = X0 + torch.bmm(torch.bmm(R, Q) * inv[:, None, :], Q.transpose(-1, -2))
    return X.to(taus.dtype)


#: ``precision`` values of the iterative WUDI / OptMerge solver (see :func:`wudi`).
PRECISIONS = ("fp32", "bf16", "tf32")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")


@contextlib.contextmanager
def _cuda_matmul_flags(precision: str, device: torch.device):
    """The global CUDA matmul flags ``precision`` needs, for the duration; the previous values are
    restored on exit (also on an error). ``tf32``: TF32 for float32 matmuls (the
    ``fp32_precision`` API where torch has it, else ``allow_tf32``); ``bf16``: no reduced-precision
    (bfloat16) split-K reductions in cuBLAS (``allow_bf16_reduced_precision_reduction = False``).
    Nothing is touched for ``fp32`` or off CUDA (TF32 does not exist on the CPU)."""
    if device.type != "cuda" or precision == "fp32":
        yield
        return
    m = torch.backends.cuda.matmul
    if precision == "tf32":
        new_api = hasattr(m, "fp32_precision")  # torch >= 2.9; mixing it with allow_tf32 can raise
        key, value = ("fp32_precision", "tf32") if new_api else ("allow_tf32", True)
    else:
        key, value = "allow_bf16_reduced_precision_reduction", False
    old = getattr(m, key)
    setattr(m, key, value)
    try:
        yield
    finally:
        setattr(m, key, old)


def _scaled_lr(lr: float, lr_scale: str, optimizer: str, taus: Tensor, s: _System) -> float | Tensor:
    """The step size the iterative solver uses: ``lr`` itself (``lr_scale="absolute"``, the
    paper's), or per tensor of the batch (``[B, 1, 1]``) for ``"relative"`` (ours):

    - Adam moves every entry by about ``lr`` per step whatever the gradient's size, so its
      natural unit is the size of the entries: ``lr * RMS(tau_1..tau_N)``.
    - SGD's step is ``lr`` times the gradient ``2 (X A - C)``; it is stable for
      ``lr < (1 + momentum) / lambda_max(A)``, so its natural unit is the curvature:
      ``lr / lambda_max(A)`` (an SVD of ``A`` or of the stacked ``P_i``).

    0 where the scale is 0 (all ``tau_i = 0``: nothing to move).
    """
    if lr_scale == "absolute":
        return float(lr)
    if lr_scale != "relative":
        raise ConfigError(f"lr_scale must be one of {', '.join(map(repr, LR_SCALES))}, got {lr_scale!r}")
    if optimizer == "adam":
        unit = taus.pow(2).mean((0, 2, 3)).sqrt()
    else:
        top = (torch.linalg.matrix_norm(s.A, ord=2) if s.A is not None
               else torch.linalg.matrix_norm(s.Pp, ord=2).pow(2))
        unit = torch.where(top > 0, 1.0 / top.clamp_min(torch.finfo(top.dtype).tiny), torch.zeros_like(top))
    return (float(lr) * unit).to(torch.float32)[:, None, None]


def _iterate(X0: Tensor, s: _System, *, optimizer: str, lr: float | Tensor, steps: int, momentum: float = 0.0,
             betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8, precision: str = "fp32") -> Tensor:
    """``steps`` steps of Adam or SGD from ``X0`` on the objective of ``s`` (gradient in closed
    form), with torch.optim's update rules (Adam: bias-corrected, no weight decay, ``eps`` added
    to ``sqrt(v_hat)``; SGD: ``buf = momentum * buf + g``, first ``buf = g``, no dampening).

    ``precision`` (:data:`PRECISIONS`): ``fp32`` float32 throughout. ``bf16``: the per-step
    products are bfloat16 matmuls of the displacement ``D = X - X0`` (``D A``, resp. ``D Pp^T``
    and ``r Pp``), added to the float32 residual at ``X0`` (``X0 A - C``, resp. ``X0 Pp^T - Rp``,
    computed once in float32), so the rounding error scales with the update, not with ``X``;
    ``X``, the optimiser state and the sums stay float32. ``tf32``: the float32 code with TF32
    matmuls on CUDA (on the CPU it is ``fp32``, bit for bit). ``lr``: a number, or ``[B, 1, 1]``
    per tensor (:func:`_scaled_lr`)."""
    _check_precision(precision)
    X = X0.clone()
    if steps <= 0:
        return X
    bf16 = torch.bfloat16
    if s.A is not None:
        A, C = s.A, s.C
        if precision == "bf16":
            A16 = A.to(bf16)
            R0 = torch.bmm(X0, A) - C

            def grad(X: Tensor) -> Tensor:
                return 2.0 * (R0 + torch.bmm((X - X0).to(bf16), A16).float())
        else:
            def grad(X: Tensor) -> Tensor:
                return 2.0 * (torch.bmm(X, A) - C)
    else:
        Pp, Rp = s.Pp, s.Rp
        Pt = Pp.transpose(-1, -2).contiguous()
        if precision == "bf16":
            P16, Pt16 = Pp.to(bf16), Pt.to(bf16)
            r0 = torch.bmm(X0, Pt) - Rp

            def grad(X: Tensor) -> Tensor:
                r = r0 + torch.bmm((X - X0).to(bf16), Pt16).float()
                return 2.0 * torch.bmm(r.to(bf16), P16).float()
        else:
            def grad(X: Tensor) -> Tensor:
                return 2.0 * torch.bmm(torch.bmm(X, Pt) - Rp, Pp)

    with _cuda_matmul_flags(precision, X.device):
        return _optimise(X, grad, optimizer=optimizer, lr=lr, steps=steps, momentum=momentum, betas=betas,
                         adam_eps=adam_eps)


def _optimise(X: Tensor, grad: Callable[[Tensor], Tensor], *, optimizer: str, lr: float | Tensor, steps: int,
              momentum: float, betas: tuple[float, float], adam_eps: float) -> Tensor:
    """The Adam / SGD loop of :func:`_iterate`, updating ``X`` in place (float32 state)."""
    if optimizer == "adam":
        b1, b2 = betas
        m1 = torch.zeros_like(X)
        v = torch.zeros_like(X)
        for t in range(1, int(steps) + 1):
            g = grad(X)
            m1.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            denom = (v.sqrt() / math.sqrt(bc2)).add_(adam_eps)
            if isinstance(lr, Tensor):
                X.sub_(m1.div(denom).mul_(lr / bc1))
            else:
                X.addcdiv_(m1, denom, value=-lr / bc1)
    elif optimizer == "sgd":
        buf = None
        for _ in range(int(steps)):
            g = grad(X)
            if momentum:
                buf = g.clone() if buf is None else buf.mul_(momentum).add_(g)
                g = buf
            if isinstance(lr, Tensor):
                X.sub_(g * lr)
            else:
                X.add_(g, alpha=-lr)
    else:
        raise ConfigError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    return X


def _init(taus: Tensor, init: str) -> Tensor:
    if init == "sum":
        return taus.sum(0)
    if init == "mean":
        return taus.mean(0)
    raise ConfigError(f"init must be 'sum' or 'mean', got {init!r}")


def wudi_exact(taus: Tensor, eps: float = 1e-12, init: str = "sum") -> Tensor:
    """Closed-form WUDI ``tau_m`` of stacked 2-D task vectors ``[N, m, n]`` (or ``[N, B, m, n]``):
    the solution of ``tau_m (sum_i w_i G_i) = sum_i w_i tau_i G_i``, ``G_i = tau_i^T tau_i``,
    nearest the ``init`` (see :func:`_exact_solve`)."""
    single = taus.dim() == 3
    t = taus[:, None] if single else taus
    X = _exact_solve(t, Targets(), _init(t, init), eps)
    return X[0] if single else X


def optmerge_exact(taus: Tensor, k: int, eps: float = 1e-12, init: str = "sum", target: str = "truncated",
                   projection: str = "rank_k") -> Tensor:
    """Closed-form OptMerge ``tau_m`` (``G_i = P_i^T P_i``, right side ``sum_i w_i T_i G_i``), rank ``k``,
    nearest the ``init`` (see :func:`_exact_solve`)."""
    single = taus.dim() == 3
    t = taus[:, None] if single else taus
    X = _exact_solve(t, Targets(int(k), target, projection), _init(t, init), eps)
    return X[0] if single else X


def _batched_inputs(base: Tensor, experts) -> tuple[Tensor, Tensor]:
    ex = _as_expert_stack(experts)
    if base.dim() != 3 or ex.dim() != 4 or tuple(ex.shape[1:]) != tuple(base.shape):
        raise ConfigError(f"batched merge needs base [B, m, n] and experts [N, B, m, n]; got {list(base.shape)} "
                          f"and {list(ex.shape)}")
    return base.to(torch.float32), ex.to(device=base.device, dtype=torch.float32) - base.to(torch.float32)


def _expert_batch(base: Tensor, experts: Sequence[Tensor]) -> Tensor:
    """``[N, 1, m, n]`` float32 stack of the experts (a batch of one tensor)."""
    return torch.stack([e.to(device=base.device, dtype=torch.float32) for e in experts])[:, None]


def _check_solver(solver: str) -> None:
    if solver not in ("iterative", "exact"):
        raise ConfigError(f"solver must be 'iterative' or 'exact', got {solver!r}")


def _solve(taus: Tensor, t: Targets, *, solver: str, init: str, optimizer: str, lr: float, momentum: float,
           steps: int, lr_scale: str, eps: float, precision: str, report: list | None = None) -> Tensor:
    """The WUDI / OptMerge ``tau_m`` of ``taus [N, B, m, n]``: the iterative solve or the exact one.

    ``report``: a list to which one dict per tensor of the batch is appended: ``objective_start``
    (at the initialisation), ``objective_end``, ``grad_ratio`` (gradient norm at the end over the
    one at the start), ``converged`` (``grad_ratio <= CONVERGED_GRAD_RATIO``) and ``solver``,
    evaluated in float64 on the system the solver built (no second SVD);
    :func:`objective_report` computes the same from the inputs alone.
    """
    _check_solver(solver)
    _check_precision(precision)
    X0 = _init(taus, init)
    if solver == "exact":
        s = _system(taus, t, form="gram", dtype=torch.float64)
        X = _exact_solve(taus, t, X0, eps, s)
    else:
        s = _system(taus, t)
        X = _iterate(X0, s, optimizer=optimizer, lr=_scaled_lr(lr, lr_scale, optimizer, taus, s), steps=int(steps),
                     momentum=float(momentum), precision=precision)
    if report is not None:
        (f0, g0), (f1, g1) = s.objective_and_grad_norm(X0), s.objective_and_grad_norm(X)
        for j in range(X.shape[0]):
            report.append(_facts(float(f0[j]), float(g0[j]), float(f1[j]), float(g1[j]), solver))
    return X


def _facts(f0: float, g0: float, f1: float, g1: float, solver: str) -> dict[str, Any]:
    ratio = g1 / g0 if g0 > 0 else 0.0
    return {"objective_start": f0, "objective_end": f1, "grad_ratio": ratio,
            "converged": bool(ratio <= CONVERGED_GRAD_RATIO), "solver": solver}


def wudi_batched(base: Tensor, experts, *, names=None, generators=None, scale: float = 1.0,
                 solver: str = "iterative", lr: float = 1e-5, steps: int = 300, init: str = "sum",
                 lr_scale: str = "absolute", eps: float = 1e-12, precision: str = "fp32",
                 report: list | None = None) -> Tensor:
    """:func:`wudi` on ``B`` same-shape 2-D tensors at once (``base [B, m, n]``, ``experts [N, B, m, n]``)."""
    b, taus = _batched_inputs(base, experts)
    X = _solve(taus, Targets(), solver=solver, init=init, optimizer="adam", lr=lr, momentum=0.0, steps=steps,
               lr_scale=lr_scale, eps=eps, precision=precision, report=report)
    return finish(b, X, scale)


@merge_method("wudi", "WUDI",
              "Cheng et al., ICML 2025, Whoever Started the Interference Should End It: Guiding Data-Free Model "
              f"Merging via Task Vectors, arXiv:2503.08099; code followed: {OFFICIAL_CODE} (wudi_merging)",
              doc="WUDI: min sum ||(tau_m - tau_i) tau_i^T||^2/||tau_i||^2 (Adam 1e-5 x300 or exact)",
              batched_fn=wudi_batched, choices={"solver": ("iterative", "exact"), "init": ("sum", "mean"),
                                                "lr_scale": LR_SCALES, "precision": PRECISIONS}, reports=True)
def wudi(base: Tensor, experts: Sequence[Tensor], *, name: str = "", generator=None, scale: float = 1.0,
         solver: str = "iterative", lr: float = 1e-5, steps: int = 300, init: str = "sum",
         lr_scale: str = "absolute", eps: float = 1e-12, precision: str = "fp32",
         report: list | None = None) -> Tensor:
    """WUDI (Cheng et al. 2025): ``min_tau_m sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2``.

    ``solver="iterative"`` (the paper's and the official code's): Adam, ``lr = 1e-5``,
    ``steps = 300``, from ``init = sum_i tau_i``; the loss is the sum over experts; the gradient
    is computed in closed form (``2 (tau_m A - C)``, same update rule as ``torch.optim.Adam``).
    ``lr_scale="relative"`` (ours, not the paper's) makes ``lr`` a fraction of the task vectors'
    RMS (:func:`_scaled_lr`): the paper's 1e-5 was chosen for 7B weights, and on small models
    300 such steps hardly move (docs/METHODS.md). ``solver="exact"``: the minimiser nearest the
    initialisation, ``C A^+ + init (I - A A^+)`` with ``A = sum_i w_i G_i``,
    ``C = sum_i w_i tau_i G_i`` (float64; :func:`_exact_solve`, ``eps`` its eigenvalue cutoff):
    the limit the iterative method moves towards. Non-2-D tensors: mean of the ``tau_i`` (as
    the official code). ``report``: a list that receives the 2-D tensor's solve facts
    (objective start / end, convergence; see :func:`_solve`); the merge engine passes one.

    ``precision`` (iterative solver only): ``"fp32"`` (default) float32 throughout, as the paper
    (CUDA matmuls follow torch's global TF32 setting, off by default). ``"bf16"``: each step's
    matmuls in bfloat16 - the products of the displacement ``D = tau_m - init`` with the Gram
    matrix ``A`` (or with ``P^T`` and ``P`` in the factored form), added to the float32 residual
    at ``init`` computed once - while ``tau_m``, the Adam/SGD state, the sums and the system
    build (Gram matrices, SVD) stay float32; on CUDA cuBLAS' reduced-precision bf16 reductions
    are switched off for the call. Measured against ``fp32`` on the CPU (N = 2..4, six shapes, both
    gradient forms; tests/test_methods.py): after 50 steps the relative Frobenius error of ``tau_m``
    is <= 2.8e-3 and the objective difference <= 5e-5 of the objective at ``init`` (tested bounds
    1e-2 and 1e-3); after the default 300 steps <= 6e-4 with the paper's settings, up to 1.4e-2 where
    the iterate moves far (lr 1e-3; the ``modality`` preset). ``"tf32"``: the float32 code with
    TF32 matmuls on CUDA; on the CPU, which has no TF32, it equals ``fp32`` bit for bit. The
    global flags are restored after the call. ``solver="exact"`` ignores ``precision``: it builds
    and solves in float64 (result float32) because the normal equations square the condition
    number of ``tau_i``, which a bfloat16 or TF32 Gram matrix (8 or 11 significant bits) would
    not resolve.
    """
    _check_precision(precision)
    taus = stack_task_vectors(base, experts)
    if base.dim() != 2:
        return finish(base, taus.mean(0), scale)
    return wudi_batched(base[None], _expert_batch(base, experts), scale=scale, solver=solver,
                        lr=lr, steps=steps, init=init, lr_scale=lr_scale, eps=eps, precision=precision,
                        report=report)[0]


def optmerge_settings(N: int, m: int, n: int, preset: str = "full_ft", **overrides) -> tuple[Targets, dict]:
    """The objective (:class:`Targets`) and solver settings (``init``, ``optimizer``, ``lr``,
    ``momentum``, ``steps``) of OptMerge's ``preset`` for ``N`` experts' ``m x n`` tensors, with
    the ``overrides`` that are not ``None`` (also ``k_ratio``, ``target``, ``projection``)."""
    if preset not in OPTMERGE_PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(OPTMERGE_PRESETS)}, got {preset!r}")
    p = {**OPTMERGE_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    for key, allowed in (("target", TARGETS), ("projection", PROJECTIONS)):
        if p[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {p[key]!r}")
    t = Targets(_rank_k(m, n, N, p["k_ratio"]), p["target"], p["projection"])
    return t, {"init": p["init"], "optimizer": p["optimizer"], "lr": float(p["lr"]),
               "momentum": float(p["momentum"]), "steps": int(p["steps"])}


def optmerge_batched(base: Tensor, experts, *, names=None, generators=None, scale: float = 1.0,
                     preset: str = "full_ft", solver: str = "iterative", k_ratio: float | None = None,
                     target: str | None = None, projection: str | None = None,
                     init: str | None = None, optimizer: str | None = None, lr: float | None = None,
                     momentum: float | None = None, steps: int | None = None, lr_scale: str = "absolute",
                     eps: float = 1e-12, precision: str = "fp32", report: list | None = None) -> Tensor:
    """:func:`optmerge` on ``B`` same-shape 2-D tensors at once (``base [B, m, n]``, ``experts [N, B, m, n]``)."""
    b, taus = _batched_inputs(base, experts)
    N, _, m, n = taus.shape
    t, run = optmerge_settings(N, m, n, preset, k_ratio=k_ratio, target=target, projection=projection, init=init,
                               optimizer=optimizer, lr=lr, momentum=momentum, steps=steps)
    X = _solve(taus, t, solver=solver, lr_scale=lr_scale, eps=eps, precision=precision, report=report, **run)
    return finish(b, X, scale)


@merge_method("optmerge", "OptMerge", f"{OPTMERGE_PAPER}; code followed: {OFFICIAL_CODE} (wudi_merging2)",
              doc="OptMerge: WUDI objective on rank-k targets; presets full_ft/lora/modality",
              batched_fn=optmerge_batched,
              choices={"solver": ("iterative", "exact"), "preset": tuple(OPTMERGE_PRESETS),
                       "target": (None, *TARGETS), "projection": (None, *PROJECTIONS),
                       "init": (None, "sum", "mean"), "optimizer": (None, "adam", "sgd"),
                       "lr_scale": LR_SCALES, "precision": PRECISIONS},
              reports=True)
def optmerge(base: Tensor, experts: Sequence[Tensor], *, name: str = "", generator=None, scale: float = 1.0,
             preset: str = "full_ft", solver: str = "iterative", k_ratio: float | None = None,
             target: str | None = None, projection: str | None = None,
             init: str | None = None, optimizer: str | None = None, lr: float | None = None,
             momentum: float | None = None, steps: int | None = None, lr_scale: str = "absolute",
             eps: float = 1e-12, precision: str = "fp32", report: list | None = None) -> Tensor:
    """OptMerge (Wei et al., ICLR 2026): ``min_tau_m sum_i ||(tau_m - T_i) P_i^T||_F^2 / ||tau_i||_F^2``,
    built as the authors' code builds it (docs/METHODS.md).

    ``preset`` fills the parameters left ``None`` (:data:`OPTMERGE_PRESETS`), k from
    ``floor(min(m,n)/N)`` or ``k_ratio``:

    - ``full_ft`` (``InternVL/internvl_chat/model_merging.py``): centred targets
      ``T_i = trunc_k(tau_i - mean_j tau_j) + mean_j tau_j``, ``P_i = S_k V_k^T`` of the uncentred
      ``tau_i``; init ``sum``, Adam lr 1e-5, 300 steps.
    - ``lora`` (``LLaMA-Factory/model_merging.py``): ``T_i = U_k S_k V_k^T``, ``P_i = S_k V_k^T``;
      init ``mean``, SGD lr 1e-4 momentum 0.9, 300 steps.
    - ``modality`` (ModelCompose's ``ties_merging.py``): ``T_i = trunc_k(tau_i)`` with
      ``k = floor(min(m,n)/5)`` (``k_ratio = 0.2``), ``P_i = tau_i`` (the full task vector,
      WUDI's Gram); init ``mean``, SGD lr 5e-2 momentum 0.9, 300 steps.

    ``target`` / ``projection`` override the preset's (:data:`TARGETS`, :data:`PROJECTIONS`).
    The loss is the *sum* over experts, weights ``1/||tau_i||_F^2`` of the uncentred ``tau_i`` (as
    the code). ``lr_scale``, ``solver="exact"``, ``eps``, ``precision`` and ``report``: as in :func:`wudi`
    (the SVDs are float32 in every mode). With ``k`` the full rank, truncated targets and rank-k
    ``P_i`` OptMerge is WUDI. Non-2-D tensors: mean of the ``tau_i``. Deliberate differences from
    the official code: float32 throughout (the LoRA and modality code cast targets and iterate
    in the checkpoint's half precision), LoRA experts merged as their product ``B A`` (the
    modality code merges the ``A`` and ``B`` factors as separate tensors).
    """
    _check_precision(precision)
    taus = stack_task_vectors(base, experts)
    if base.dim() != 2:
        return finish(base, taus.mean(0), scale)
    return optmerge_batched(base[None], _expert_batch(base, experts), scale=scale, preset=preset, solver=solver,
                            k_ratio=k_ratio, target=target, projection=projection, init=init, optimizer=optimizer,
                            lr=lr, momentum=momentum, steps=steps, lr_scale=lr_scale, eps=eps,
                            precision=precision, report=report)[0]


def objective_report(method: str, base: Tensor, experts: Sequence[Tensor], merged: Tensor,
                     params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """How far WUDI's / OptMerge's solve went on one 2-D tensor (``{}`` for other tensors).

    Rebuilds the objective of ``method`` with ``params`` (float64, from the inputs, independent
    of the solver's own arithmetic) and evaluates it at the initialisation and at
    ``tau_m = (merged - base) / scale``: ``objective_start``, ``objective_end``, the gradient
    norm ratio ``grad_ratio = ||grad(end)|| / ||grad(start)||`` and ``converged``
    (``grad_ratio <= CONVERGED_GRAD_RATIO``; an exact solve has ratio ~0). The objective's
    minimum itself is not computed (an ``n x n`` eigendecomposition; use ``solver="exact"``).
    """
    if method not in ("wudi", "optmerge"):
        raise ConfigError(f"objective_report covers 'wudi' and 'optmerge', not {method!r}")
    if base.dim() != 2:
        return {}
    spec = get_method(method)
    p = spec.check_params(params)
    taus = stack_task_vectors(base, experts).to(torch.float64)[:, None]
    N, _, m, n = taus.shape
    if method == "wudi":
        t, init = Targets(), p["init"]
    else:
        keys = ("k_ratio", "target", "projection", "init", "optimizer", "lr", "momentum", "steps")
        t, run = optmerge_settings(N, m, n, p["preset"], **{k: p[k] for k in keys})
        init = run["init"]
    scale = float(p["scale"])
    if scale == 0:
        raise ConfigError("objective_report needs a non-zero scale")
    s = _system(taus, t, form="factored", dtype=torch.float64)

    def value_and_grad(X: Tensor) -> tuple[float, float]:
        r = torch.bmm(X, s.Pp.transpose(-1, -2)) - s.Rp
        return float(r.pow(2).sum()), float(torch.bmm(r, s.Pp).mul_(2.0).norm())

    f0, g0 = value_and_grad(_init(taus, init))
    X = (merged.to(device=base.device, dtype=torch.float64) - base.to(torch.float64)) / scale
    f1, g1 = value_and_grad(X[None])
    return _facts(f0, g0, f1, g1, p["solver"])
