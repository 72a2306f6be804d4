"""MMER (Li et al., ACL 2025): ``tau*`` = a TIES merge, plus one binary mask per expert."""
from __future__ import annotations

from typing import Sequence

import torch

from .common import check_density, finish, stack_task_vectors
from ..io.packing import pack_mask
from .masks import mmer_masks
from .registry import MergeOutput, merge_method
from .ties_dare import ties_merge_tau

Tensor = torch.Tensor


@merge_method("mmer", "MMER",
              "Li et al., ACL 2025, Multi-Modality Expansion and Retention for LLMs through Parameter Merging "
              "and Decoupling, arXiv:2505.17110",
              doc="MMER: tau* = TIES merge; masks m_i = |tau_i| > lam |tau_i - tau*| (unverified reading)")
def mmer(base: Tensor, experts: Sequence[Tensor], *, name: str = "", generator=None, scale: float = 1.0,
         density: float = 0.2, lam: float = 1.0, pack_masks: bool = False) -> MergeOutput:
    """MMER (Li et al., ACL 2025), reconstructed (methods.md 3; the paper's text was not read).

    ``tau* = `` TIES merge of the ``tau_i`` (trim to ``density = 0.2``, elect, disjoint mean) -
    **unverified** which merge the paper uses and its trim ratio. Per expert i the mask
    ``m_i = 1[|tau_i| > lam * |tau_i - tau*|]`` (``lam = 1``: the L1-distance minimiser; the
    ``lam`` generalisation and its default are an **unverified** reading). Returns
    ``MergeOutput(merged = theta_0 + scale * tau*, extras = {"mask_<i>": m_i})`` with boolean masks
    (the engine bit-packs boolean extras itself); ``pack_masks=True`` returns them packed with
    :func:`workbench.io.packing.pack_mask` (uint8, shape = the tensor's) instead. Modality i's model is
    then ``theta_0 + alpha * m_i * tau*`` (see :mod:`workbench.compose`).
    """
    taus = stack_task_vectors(base, experts)
    tau_star = ties_merge_tau(taus, check_density(density))
    masks = mmer_masks(taus, tau_star, lam)
    extras = {f"mask_{i}": (pack_mask(m) if pack_masks else m) for i, m in enumerate(masks)}
    return MergeOutput(merged=finish(base, tau_star, scale), extras=extras)
