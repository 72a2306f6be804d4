"""What a set of experts' task vectors share: each ``tau_i = theta_i - theta_0`` split, tensor by
tensor, into its part along the experts' mean direction and the rest.

Per tensor ``t``: ``u_t = mean_i tau_i,t / ||mean_i tau_i,t||``, ``c_i,t = <tau_i,t, u_t>``; the shared
part of expert ``i`` is ``c_i,t u_t`` and its residual ``tau_i,t - c_i,t u_t`` (the residuals sum to
zero over the experts, so the weight average of the experts - NaiveMC's LLM - is ``theta_0`` plus
the mean of the shared parts alone). :func:`mean_direction_split` returns the per-tensor table (the
share of the task vectors' squared norm along ``u_t``, the mean pairwise cosine) and the parts, to
be applied to ``theta_0`` (:func:`with_delta`) and evaluated; :func:`loss_gradient` and
:func:`dict_cosine` compare the directions with the first steps of training (the negative loss
gradient at ``theta_0`` on a task's batches), :func:`pair_cosines` does so for every pair of
(modality, task type) gradients. Used by notebook 08 (issue #19: why the modality experts' task
vectors have cosine ~0.25 in every layer).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .interference import parse_name

#: a mean task vector at most this fraction of the largest one has no direction (float32 rounding of
#: task vectors that cancel)
MEAN_TOL = 1e-6

__all__ = ["MEAN_TOL", "SharedSplit", "mean_direction_split", "with_delta", "loss_gradient", "dict_cosine",
           "pair_cosines"]


@dataclass
class SharedSplit:
    """The split of :func:`mean_direction_split`: ``directions[t]`` the unit mean direction of
    tensor ``t`` (float64; absent where the mean task vector is zero), ``coefficients[t]`` the
    ``[N]`` float64 ``c_i,t``, ``table`` one row per tensor (``name, layer, module, sq_norm, shared_sq,
    share, mean_pair_cosine``)."""

    taus: list[dict[str, torch.Tensor]]
    directions: dict[str, torch.Tensor]
    coefficients: dict[str, torch.Tensor]
    table: pd.DataFrame

    def shared(self, i: int) -> dict[str, torch.Tensor]:
        """Expert ``i``'s shared part ``c_i,t u_t`` per tensor (float32, the tensors' shapes)."""
        return {t: (self.coefficients[t][i] * u).float().view_as(self.taus[i][t]) for t, u in self.directions.items()}

    def residual(self, i: int) -> dict[str, torch.Tensor]:
        """Expert ``i``'s task vector without its shared part (``tau_i`` where there is no direction)."""
        shared = self.shared(i)
        return {t: tau - shared[t] if t in shared else tau for t, tau in self.taus[i].items()}

    def by_module(self) -> pd.DataFrame:
        """Per module type: the share of the squared norm along the mean direction (exact: sums over
        the type's tensors) and the mean over its tensors of the mean pairwise cosine."""
        g = self.table.groupby("module")
        return pd.DataFrame({"share": g["shared_sq"].sum() / g["sq_norm"].sum(),
                             "mean_pair_cosine": g["mean_pair_cosine"].mean(), "tensors": g.size()})

    def share(self) -> float:
        """The share over every tensor."""
        return float(self.table["shared_sq"].sum() / self.table["sq_norm"].sum())


def mean_direction_split(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]]
                         ) -> SharedSplit:
    """Split every floating tensor's task vectors (``experts[i][t] - base[t]``, in float64) along the
    experts' mean direction. ``base``/``experts``: state dicts with the same names and shapes
    (a name missing from an expert raises ``KeyError`` naming it)."""
    if len(experts) < 2:
        raise ValueError(f"mean_direction_split needs at least 2 experts, got {len(experts)}")
    taus: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    directions, coefficients, rows = {}, {}, []
    for t, b in base.items():
        if not torch.is_floating_point(b):
            continue
        for i, e in enumerate(experts):
            if t not in e:
                raise KeyError(f"expert {i} has no tensor {t!r}")
            if e[t].shape != b.shape:
                raise ValueError(f"tensor {t!r}: expert {i} has shape {tuple(e[t].shape)}, the base {tuple(b.shape)}")
        T = torch.stack([e[t].double().flatten() - b.double().flatten() for e in experts])
        for i in range(len(experts)):
            taus[i][t] = T[i].view_as(b).float()
        norms = T.norm(dim=1)
        mean = T.mean(0)
        sq = float((norms ** 2).sum())
        shared_sq = 0.0
        if float(mean.norm()) > MEAN_TOL * float(norms.max()):  # below: rounding of opposite task vectors
            u = mean / mean.norm()
            c = T @ u
            directions[t], coefficients[t] = u, c
            shared_sq = float((c ** 2).sum())
        unit = T / norms.clamp_min(1e-300)[:, None]
        cos = (unit @ unit.T)[np.triu_indices(len(experts), 1)]
        ok = (norms[:, None] > 0) & (norms[None, :] > 0)
        cos = cos[ok[np.triu_indices(len(experts), 1)]]
        layer, module = parse_name(t)
        rows.append({"name": t, "layer": layer, "module": module, "sq_norm": sq, "shared_sq": shared_sq,
                     "share": shared_sq / sq if sq > 0 else float("nan"),
                     "mean_pair_cosine": float(cos.mean()) if cos.numel() else float("nan")})
    return SharedSplit(taus, directions, coefficients, pd.DataFrame(rows))


def with_delta(llm: torch.nn.Module, delta: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``llm`` with ``delta[t]`` added to each named parameter / buffer (``theta_0 + delta``)."""
    out = copy.deepcopy(llm)
    state = out.state_dict()
    for t, d in delta.items():
        if t not in state:
            raise KeyError(f"the model has no tensor {t!r}")
        state[t].add_(d.to(state[t].dtype).view_as(state[t]))
    return out


def loss_gradient(model: torch.nn.Module, params: torch.nn.Module, batches: Iterator, n_batches: int,
                  to_inputs: Callable) -> dict[str, torch.Tensor]:
    """The negative gradient of ``model``'s mean loss over ``n_batches`` batches with respect to the
    parameters of ``params`` (by name: the first step of training from here). ``to_inputs(batch)``
    gives ``model``'s positional arguments; ``model(...)`` returns an object with ``.loss``."""
    was = [p.requires_grad for p in params.parameters()]
    params.requires_grad_(True)
    params.zero_grad(set_to_none=True)
    try:
        for _ in range(n_batches):
            (model(*to_inputs(next(batches))).loss / n_batches).backward()
        return {t: -p.grad.detach().clone() for t, p in params.named_parameters() if p.grad is not None}
    finally:
        for p, w in zip(params.parameters(), was):
            p.requires_grad_(w)
        params.zero_grad(set_to_none=True)


def dict_cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """The cosine of two per-tensor vectors over the names they share (float64 sums)."""
    names = [t for t in a if t in b]
    dot = sum(float(a[t].double().flatten() @ b[t].double().flatten()) for t in names)
    na = sum(float((a[t].double() ** 2).sum()) for t in names)
    nb = sum(float((b[t].double() ** 2).sum()) for t in names)
    return dot / float(np.sqrt(na * nb)) if na > 0 and nb > 0 else float("nan")


def pair_cosines(vectors: Mapping[tuple[str, str], Mapping[str, torch.Tensor]]) -> pd.DataFrame:
    """:func:`dict_cosine` of every pair of ``vectors`` keyed ``(modality, task)`` (e.g. the first-step
    gradients of each modality's own-task types): one row per pair, ``modality_a, task_a, modality_b,
    task_b, same_modality, same_task, cosine``. Grouped by ``(same_modality, same_task)`` it says
    whether the directions follow the task type across modalities or the modality across task types."""
    keys = list(vectors)
    rows = [{"modality_a": a[0], "task_a": a[1], "modality_b": b[0], "task_b": b[1],
             "same_modality": a[0] == b[0], "same_task": a[1] == b[1],
             "cosine": dict_cosine(vectors[a], vectors[b])}
            for i, a in enumerate(keys) for b in keys[i + 1:]]
    return pd.DataFrame(rows, columns=["modality_a", "task_a", "modality_b", "task_b", "same_modality", "same_task",
                                       "cosine"])
