"""Per-token routing of linear layers (shared by DAMC and MMER).

Contract used by :mod:`workbench.mllm`: ``with token_routes(llm, route_ids): llm(...)`` sets the
route of every prompt token (0 = text, k >= 1 = the k-th modality route) on every routed
module of ``llm`` for the duration of the call. On an LLM without routed modules it is a
no-op, so the same forward code serves plain and routed models.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class RoutedModule(nn.Module):
    """Marker base class: a module whose output depends on the current token routes."""

    route_ids: torch.Tensor | None = None


@contextlib.contextmanager
def token_routes(model: nn.Module, route_ids: torch.Tensor | None) -> Iterator[None]:
    """Set ``route_ids`` ([batch, seq] long) on every :class:`RoutedModule` in ``model``."""
    routed = [m for m in model.modules() if isinstance(m, RoutedModule)]
    previous = [m.route_ids for m in routed]
    for m in routed:
        m.route_ids = route_ids
    try:
        yield
    finally:
        for m, prev in zip(routed, previous):
            m.route_ids = prev
