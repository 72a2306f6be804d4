"""The small pieces every merge family shares: the stacked task vectors ``theta_i - theta_0``, the
final ``theta_0 + scale * tau_m``, per-expert weights and the checks of shapes, densities and drop rates."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError

Tensor = torch.Tensor


def stack_task_vectors(base: Tensor, experts: Sequence[Tensor]) -> Tensor:
    """``[N, *shape]`` float32 task vectors ``theta_i - theta_0`` (on ``base``'s device).

    Raises:
        ConfigError: no experts, or an expert whose shape differs from the base's.
    """
    check_shapes(base, experts)
    base = base.to(torch.float32)
    # written into one preallocated stack (no per-expert temporaries): the same values as
    # torch.stack([e.float() - base for e in experts])
    out = torch.empty((len(experts), *base.shape), dtype=torch.float32, device=base.device)
    for i, e in enumerate(experts):
        torch.sub(e.to(device=base.device, dtype=torch.float32), base, out=out[i])
    return out


def check_shapes(base: Tensor, experts: Sequence[Tensor]) -> None:
    """Raise :class:`ConfigError` if there is no expert or an expert's shape differs from the base's."""
    if len(experts) == 0:
        raise ConfigError("a merge needs at least one expert")
    for i, e in enumerate(experts):
        if tuple(e.shape) != tuple(base.shape):
            raise ConfigError(f"expert {i} has shape {list(e.shape)}, the base {list(base.shape)}")


def finish(base: Tensor, tau_m: Tensor, scale: float) -> Tensor:
    """The merged weight ``theta_0 + scale * tau_m`` (float32)."""
    return base.to(torch.float32) + float(scale) * tau_m


def finish_in_place(base: Tensor, tau_m: Tensor, scale: float) -> Tensor:
    """:func:`finish` writing into ``tau_m`` (a temporary the caller owns): the same values
    (``scale * tau_m`` then ``+ base``; float addition is commutative)."""
    if float(scale) != 1.0:
        tau_m.mul_(float(scale))
    return tau_m.add_(base.to(torch.float32))


def check_density(density: float, what: str = "density") -> float:
    """``density`` as a float in (0, 1] (else :class:`ConfigError`)."""
    d = float(density)
    if not 0.0 < d <= 1.0:
        raise ConfigError(f"{what} must be in (0, 1], got {density}")
    return d


def check_drop_rate(p: float) -> float:
    """DARE's drop rate ``p`` as a float in [0, 1) (else :class:`ConfigError`)."""
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"drop_rate must be in [0, 1), got {p}")
    return p


def expert_weights(weights: Sequence[float] | None, n: int, default: float, device) -> Tensor:
    """``[n]`` float32 per-expert weights: ``weights``, or ``default`` for every expert when ``None``."""
    if weights is None:
        return torch.full((n,), float(default), dtype=torch.float32, device=device)
    if len(weights) != n:
        raise ConfigError(f"{len(weights)} weights given for {n} experts")
    return torch.tensor([float(w) for w in weights], dtype=torch.float32, device=device)
