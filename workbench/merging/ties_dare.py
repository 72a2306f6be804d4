"""TIES and DARE: trim / elect / disjoint mean, DARE's drop and rescale, the global trim
thresholds, and the three methods built on them (``ties``, ``dare_linear``, ``dare_ties``)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from ..errors import ConfigError
from .common import check_density, check_drop_rate, finish_in_place, stack_task_vectors
from .masks import kth_largest, topk_keep_mask
from .registry import merge_method

Tensor = torch.Tensor


def trim_topk(tau: Tensor, density: float) -> Tensor:
    """``tau`` with all but its top ``density`` fraction of magnitudes set to 0 (see
    :func:`workbench.merging.masks.topk_keep_mask` for k and ties)."""
    keep = topk_keep_mask(tau, check_density(density))
    return torch.where(keep, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))


def elect_sign(taus: Tensor) -> Tensor:
    """TIES' elected sign ``gamma = sign(sum_i tau_i)`` of stacked (already trimmed) task vectors
    (peft's ``majority_sign_method="total"``; where the sum is 0, ``gamma = 0`` and no entry is kept)."""
    return torch.sign(taus.sum(0))


def disjoint_mean(taus: Tensor, gamma: Tensor) -> Tensor:
    """Mean, per entry, of the non-zero ``tau_i`` whose sign equals ``gamma`` (0 where none does)."""
    agree = (torch.sign(taus) == gamma) & (taus != 0) & (gamma != 0)
    total = torch.where(agree, taus, torch.zeros((), dtype=taus.dtype, device=taus.device)).sum(0)
    return total / agree.sum(0).clamp_min(1).to(taus.dtype)


def ties_merge_tau(taus: Tensor, density: float = 0.2, *, thresholds: Sequence[float] | None = None) -> Tensor:
    """TIES (Yadav et al. 2023) on stacked task vectors ``[N, *shape]``: trim, elect, disjoint mean.

    Trim keeps each ``tau_i``'s top ``density`` magnitudes within this tensor, or, when
    ``thresholds`` is given (global trimming), its entries with ``|tau_i| >= thresholds[i]``.
    ``taus`` is not modified (the work happens on one copy; see :func:`_ties_merge_tau_`).
    """
    return _ties_merge_tau_(taus.clone(memory_format=torch.contiguous_format), density, thresholds=thresholds)


def _trim_(taus: Tensor, density: float, thresholds: Sequence[float] | None = None) -> Tensor:
    """TIES' trim of stacked task vectors, in place: the values of ``torch.where(keep, taus, 0)``
    with ``keep`` = :func:`topk_keep_mask` (or :func:`threshold_keep_mask` with ``thresholds``).

    One expert at a time: ``|tau_i|`` into a buffer, the threshold by selection
    (:func:`workbench.merging.masks.kth_largest`, computed once and used for the mask), and ``tau_i``
    multiplied by the keep mask ``|tau_i| >= t`` (nothing to do when ``t <= 0``: every non-zero
    entry is kept). Dropped negative entries become -0 instead of +0; no result of
    :func:`_disjoint_mean_` depends on the sign of a zero. Extra memory: a few rows.
    """
    N = taus.shape[0]
    if thresholds is not None and len(thresholds) != N:
        raise ConfigError(f"{len(thresholds)} trim thresholds for {N} experts")
    flat = taus.view(N, -1)  # contiguous: a view, so the trim lands in taus
    n = flat.shape[1]
    if n == 0:
        return taus
    k = max(1, min(n, int(round(float(density) * n))))
    a = torch.empty(n, dtype=taus.dtype, device=taus.device)
    keep = torch.empty(n, dtype=torch.bool, device=taus.device)
    for i in range(N):
        if thresholds is not None:
            t = float(thresholds[i])
            if t <= 0:
                continue
            torch.abs(flat[i], out=a)
        elif k == n:
            continue
        else:
            torch.abs(flat[i], out=a)
            t = kth_largest(a, k)
            if t <= 0:
                continue
        torch.ge(a, t, out=keep)  # as threshold_keep_mask / topk_keep_mask compare
        flat[i].mul_(keep)
    return taus


def _disjoint_mean_(trimmed: Tensor) -> Tensor:
    """``disjoint_mean(trimmed, elect_sign(trimmed))`` consuming ``trimmed`` (overwritten).

    ``tau_i * gamma > 0`` is exactly "non-zero, sign equal to gamma, gamma != 0"; the agreeing
    entries all have gamma's sign, so their sum is ``gamma * sum |tau_i|`` (float addition is
    symmetric under negation): bit-identical to the masked sum, with one ``[N, ...]`` buffer.
    """
    gamma = torch.sign(trimmed.sum(0))
    trimmed.mul_(gamma)
    N = trimmed.shape[0]
    count = torch.zeros(trimmed.shape[1:], dtype=torch.uint8 if N < 256 else torch.int32, device=trimmed.device)
    agree = torch.empty(trimmed.shape[1:], dtype=torch.bool, device=trimmed.device)
    for i in range(N):  # small-integer counts: much cheaper than a bool -> int64 sum over dim 0
        count.add_(torch.gt(trimmed[i], 0, out=agree))
    del agree
    # where nothing agrees the sum is +-0: "+ 0.0" makes it +0, as the masked sum gives (x + 0 = x otherwise)
    total = trimmed.clamp_min_(0).sum(0).mul_(gamma).add_(0.0)
    return total.div_(count.clamp_min_(1).to(total.dtype))


def _ties_merge_tau_(taus: Tensor, density: float = 0.2, *, thresholds: Sequence[float] | None = None) -> Tensor:
    """:func:`ties_merge_tau` on a stack the caller owns (it is overwritten): trim, elect, mean in place."""
    if thresholds is not None and len(thresholds) != taus.shape[0]:
        raise ConfigError(f"{len(thresholds)} trim thresholds for {taus.shape[0]} experts")
    if taus.shape[0] == 0 or taus[0].numel() == 0:
        trimmed = torch.stack([trim_topk(t, density) for t in taus.unbind(0)]) if thresholds is None else taus
        return disjoint_mean(trimmed, elect_sign(trimmed))
    taus = taus.contiguous()  # _trim_ works on a flat view
    return _disjoint_mean_(_trim_(taus, check_density(density), thresholds))


def dare_keep(shape: Sequence[int] | torch.Size, n_experts: int, p: float, generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> Tensor:
    """``[n_experts, *shape]`` float32 DARE keep masks (1 = kept): the counter-based draw of
    :mod:`workbench.cpu_kernels` (expert ``i``, flat position ``j``; seed
    ``generator.initial_seed()``, which the engine sets to the tensor's seed), identical on every
    device and in the compiled CPU merge (:mod:`workbench.merging.kernels`). Each entry is kept with
    probability ``1 - ceil(p * 2**16) / 2**16`` (``1 - p`` within ``1.6e-5``).

    This replaces peft's ``random_pruning`` draw (``torch.bernoulli`` on the generator) used
    before: DARE merges changed value (not distribution) with it; the mask is still applied as
    peft applies it (:func:`dare_drop`). Without a generator the seed comes from torch's global RNG.
    """
    from ..cpu_kernels import dare_keep_threshold, dare_keep_torch, dare_keys

    p_int = dare_keep_threshold(check_drop_rate(p))
    seed = generator.initial_seed() if generator is not None else int(torch.randint(0, 2 ** 62, ()))
    dev = torch.device(device) if device is not None else (generator.device if generator is not None else "cpu")
    n = math.prod(int(s) for s in shape)
    keys = dare_keys(seed, n_experts)
    return dare_keep_torch(0, n, keys, p_int, dev, n_experts=n_experts).reshape(n_experts, *shape)


def dare_drop(tau: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability ``p``, rescale the rest by ``1/(1-p)``.

    The mask is :func:`dare_keep` (expert 0's draw), applied as peft's ``random_pruning`` does:
    ``tau * keep / (1 - p)`` in that order.
    """
    p = check_drop_rate(p)
    keep = dare_keep(tau.shape, 1, p, generator, device=tau.device)[0]
    return (tau * keep).div_(1.0 - p)


def _dare_drop_(taus: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """:func:`dare_drop` of each ``taus[i]`` with expert ``i``'s draw of :func:`dare_keep`, in place."""
    p = check_drop_rate(p)
    keep = dare_keep(taus.shape[1:], taus.shape[0], p, generator, device=taus.device)
    return taus.mul_(keep).div_(1.0 - p)


def global_trim_thresholds(taus_by_tensor: Iterable[Tensor | Sequence[Tensor]], density: float) -> list[float]:
    """Per expert, the magnitude threshold of TIES' *global* trim over many tensors (exact).

    ``taus_by_tensor`` yields, per tensor, the experts' task vectors (a ``[N, ...]`` stack or a
    sequence of N tensors). For expert i, ``k = ceil(density * total entries)`` and the threshold
    is the k-th largest non-zero ``|tau_i|`` over all tensors (``0.0`` when fewer than ``k``
    entries are non-zero: keep everything); :func:`ties` keeps ``|tau_i| >= threshold``.

    This one is exact by ``torch.kthvalue`` over the concatenated magnitudes, so it holds all of
    one expert's ``|tau|`` in CPU memory: for tests and small models. The streaming version for
    real checkpoints, with the same definition (a histogram of bit patterns locates the threshold's bin, a
    second pass sorts that bin only: also exact) is :func:`workbench.engine.global_trim_thresholds`.
    """
    d = check_density(density)
    pools: list[list[Tensor]] = []
    total = 0
    for taus in taus_by_tensor:
        seq = list(taus.unbind(0)) if isinstance(taus, Tensor) else list(taus)
        if not pools:
            pools = [[] for _ in seq]
        if len(seq) != len(pools):
            raise ConfigError(f"{len(seq)} task vectors for a tensor, {len(pools)} before")
        total += seq[0].numel()
        for i, t in enumerate(seq):
            a = t.detach().reshape(-1).abs().to(device="cpu", dtype=torch.float32)
            pools[i].append(a[a > 0])
    k = max(1, math.ceil(d * total))
    out = []
    for pool in pools:
        vals = torch.cat(pool) if pool else torch.zeros(0)
        if vals.numel() < k:
            out.append(0.0)
        else:
            out.append(float(torch.kthvalue(vals, vals.numel() - k + 1).values))
    return out


#: the ``trim`` values of ``ties`` and ``dare_ties`` (``"tensor"``: an alias of ``"per_tensor"``)
_TRIM = {"trim": ("per_tensor", "tensor", "global")}
#: DARE's paper, the source of ``dare_linear`` and ``dare_ties``
DARE_REFERENCE = ("Yu et al., ICML 2024, Language Models are Super Mario: Absorbing Abilities from Homologous "
                  "Models as a Free Lunch, arXiv:2311.03099")


def check_trim(trim: str, thresholds):
    """``thresholds``, after checking ``trim`` (:data:`_TRIM`; ``"global"`` needs ``thresholds``).

    Raises:
        ConfigError: an unknown ``trim``, or ``"global"`` without thresholds.
    """
    if trim == "global" and thresholds is None:
        raise ConfigError("trim: global needs per-expert thresholds over all tensors (the engine computes "
                          "them; or pass thresholds from workbench.merging.global_trim_thresholds)")
    if trim not in ("per_tensor", "tensor", "global"):
        raise ConfigError(f"trim must be 'per_tensor' or 'global', got {trim!r}")
    return thresholds


@merge_method("ties", "TIES",
              "Yadav et al., NeurIPS 2023, TIES-Merging: Resolving Interference When Merging Models, "
              "arXiv:2306.01708",
              doc="TIES: trim to top density, elect sign, disjoint mean (per tensor or global trim)", choices=_TRIM)
def ties(base: Tensor, experts: Sequence[Tensor], *, name: str = "", generator=None, scale: float = 1.0,
         density: float = 0.2, trim: str = "per_tensor", thresholds: Sequence[float] | None = None) -> Tensor:
    """TIES: trim each ``tau_i`` to its top ``density`` magnitudes, elect ``gamma = sign(sum trimmed)``,
    mean of the entries agreeing with ``gamma``; ``theta = theta_0 + scale * tau_m``.

    ``trim="per_tensor"`` (alias ``"tensor"``) ranks magnitudes within this tensor;
    ``trim="global"`` uses ``thresholds[i]`` (keep ``|tau_i| >= thresholds[i]``), the per-expert
    thresholds over all merged tensors from :func:`global_trim_thresholds` (or the engine's
    streaming equivalent). Given ``thresholds`` are used whatever ``trim`` says.
    """
    thresholds = check_trim(trim, thresholds)
    taus = stack_task_vectors(base, experts)
    return finish_in_place(base, _ties_merge_tau_(taus, check_density(density), thresholds=thresholds), scale)


@merge_method("dare_linear", "TA w/ DARE", DARE_REFERENCE,
              doc="DARE drop p, rescale 1/(1-p), then task arithmetic", needs_generator=True)
def dare_linear(base: Tensor, experts: Sequence[Tensor], *, name: str = "", generator=None, scale: float = 1.0,
                drop_rate: float = 0.2) -> Tensor:
    """TA w/ DARE: ``tau_m = sum_i dare_drop(tau_i, p)`` (drop with prob. ``p``, rescale ``1/(1-p)``),
    one mask per expert: :func:`dare_keep` (counter-based, seeded by ``generator``; the compiled CPU
    merge of :mod:`workbench.merging.kernels` draws the same)."""
    taus = stack_task_vectors(base, experts)
    return finish_in_place(base, _dare_drop_(taus, drop_rate, generator).sum(0), scale)


@merge_method("dare_ties", "TIES w/ DARE", DARE_REFERENCE,
              doc="DARE drop p, rescale 1/(1-p), then TIES", needs_generator=True, choices=_TRIM)
def dare_ties(base: Tensor, experts: Sequence[Tensor], *, name: str = "", generator=None, scale: float = 1.0,
              drop_rate: float = 0.2, density: float = 0.2, trim: str = "per_tensor",
              thresholds: Sequence[float] | None = None) -> Tensor:
    """TIES w/ DARE: DARE drop + rescale of each ``tau_i``, then TIES (trim to ``density``, elect, mean).

    methods.md reads "then TIES" with TIES' 20% trim; peft's and mergekit's ``dare_ties`` skip the
    magnitude trim (here ``density=1``) - **unverified** which the benchmark used. With global trim
    the engine trims before this function runs (so the trim precedes the drop there).
    """
    thresholds = check_trim(trim, thresholds)
    taus = stack_task_vectors(base, experts)
    dropped = _dare_drop_(taus, drop_rate, generator)
    return finish_in_place(base, _ties_merge_tau_(dropped, check_density(density), thresholds=thresholds), scale)
