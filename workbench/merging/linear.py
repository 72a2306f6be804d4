"""The linear merges: Weight Average (NaiveMC) and Task Arithmetic, ``theta_0 + scale * sum_i w_i tau_i``."""
from __future__ import annotations

from typing import Sequence

import torch

from .common import check_shapes, expert_weights, finish_in_place, stack_task_vectors
from .registry import merge_method

Tensor = torch.Tensor


def _weighted_sum_(taus: Tensor, w: Tensor) -> Tensor:
    """``sum_i w_i taus[i]``, scaling ``taus`` (a temporary the caller owns) in place."""
    return taus.mul_(w.reshape(-1, *([1] * (taus.dim() - 1)))).sum(0)


@merge_method("weight_average", "Weight Average",
              "Wortsman et al., ICML 2022, Model soups: averaging weights of multiple fine-tuned models improves "
              "accuracy without increasing inference time, arXiv:2203.05482; as NaiveMC: Chen et al., ACL 2024, "
              "Model Composition for Multimodal Large Language Models, arXiv:2402.12750",
              doc="mean of the theta_i (NaiveMC); theta_0 + scale * sum w_i tau_i")
def weight_average(base: Tensor, experts: Sequence[Tensor], *, name: str = "", generator=None,
                   scale: float = 1.0, weights: Sequence[float] | None = None) -> Tensor:
    """NaiveMC / Weight Average: ``theta = theta_0 + scale * sum_i w_i tau_i``, ``w_i = 1/N`` by default.

    With the defaults this is the mean of the ``theta_i`` (computed directly as their mean). With
    ``weights`` summing to 1 it is ``sum_i w_i theta_i``; DAMC's searched lambdas need not sum to 1
    (methods.md 2), hence the task-vector form.
    """
    if weights is None and float(scale) == 1.0:
        check_shapes(base, experts)
        return torch.stack([e.to(device=base.device, dtype=torch.float32) for e in experts]).mean(0)
    taus = stack_task_vectors(base, experts)
    w = expert_weights(weights, len(experts), 1.0 / len(experts), base.device)
    return finish_in_place(base, _weighted_sum_(taus, w), scale)


@merge_method("task_arithmetic", "Task Arithmetic",
              "Ilharco et al., ICLR 2023, Editing Models with Task Arithmetic, arXiv:2212.04089",
              doc="theta_0 + scale * sum_i tau_i")
def task_arithmetic(base: Tensor, experts: Sequence[Tensor], *, name: str = "", generator=None,
                    scale: float = 1.0, weights: Sequence[float] | None = None) -> Tensor:
    """Task Arithmetic (Ilharco et al. 2023): ``tau_m = sum_i w_i tau_i`` (``w_i = 1``), ``theta = theta_0 + scale tau_m``."""
    taus = stack_task_vectors(base, experts)
    w = expert_weights(weights, len(experts), 1.0, base.device)
    return finish_in_place(base, _weighted_sum_(taus, w), scale)
