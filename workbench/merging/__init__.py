"""Merge methods by family, their registry, and the binary masks over task-vector entries.

- :mod:`~workbench.merging.registry`: :class:`MethodSpec`, :data:`METHODS`, :func:`get_method` and
  the :func:`merge_method` decorator (name, display name, citation) each family registers with;
- :mod:`~workbench.merging.common`: task-vector stacking and the small pieces every family shares;
- :mod:`~workbench.merging.linear`: Weight Average, Task Arithmetic;
- :mod:`~workbench.merging.ties_dare`: TIES, TA w/ DARE, TIES w/ DARE (trim, elect, drop, global thresholds);
- :mod:`~workbench.merging.svd`: TSV, Iso-C, Iso-CTS;
- :mod:`~workbench.merging.quadratic`: WUDI, OptMerge (objective, presets, solvers, objective report);
- :mod:`~workbench.merging.mmer`: MMER (TIES merge + per-expert masks);
- :mod:`~workbench.merging.masks`: MMER / TIES / DARE / TALL masks and the one bit-packing layout;
- :mod:`~workbench.merging.kernels`: the compiled (numba) CPU merges the engine runs where it can,
  and :mod:`~workbench.merging.thresholds`: their TIES thresholds (both imported on demand, not here).

Importing this package imports every family, so :data:`METHODS` is complete (in the order above).
"""
from .registry import METHODS, MergeOutput, MethodSpec, get_method, merge_method
from .common import stack_task_vectors
from .linear import task_arithmetic, weight_average
from .ties_dare import (dare_drop, dare_keep, dare_linear, dare_ties, disjoint_mean, elect_sign,
                        global_trim_thresholds, ties, ties_merge_tau, trim_topk)
from .svd import iso_c, iso_c_merge_tau, iso_cts, iso_cts_merge_tau, tsv, tsv_merge_tau
from .quadratic import (CONVERGED_GRAD_RATIO, LR_SCALES, OPTMERGE_PRESETS, PRECISIONS, PROJECTIONS, TARGETS, Targets,
                        objective_report, optmerge, optmerge_batched, optmerge_exact, optmerge_settings,
                        quadratic_merge_loss, wudi, wudi_batched, wudi_exact)
from .mmer import mmer
from .masks import (dare_keep_mask, kth_largest, kth_largest_nonneg, mask_density, mmer_masks,
                    tall_masks, threshold_keep_mask, ties_keep_masks, topk_keep_mask)

__all__ = [
    "METHODS", "MergeOutput", "MethodSpec", "get_method", "merge_method", "global_trim_thresholds",
    # building blocks
    "stack_task_vectors", "trim_topk", "elect_sign", "disjoint_mean", "ties_merge_tau", "dare_keep", "dare_drop",
    "tsv_merge_tau", "iso_c_merge_tau", "iso_cts_merge_tau", "quadratic_merge_loss", "wudi_exact",
    "optmerge_exact", "OPTMERGE_PRESETS", "PRECISIONS", "TARGETS", "PROJECTIONS", "LR_SCALES", "Targets",
    "optmerge_settings", "objective_report", "CONVERGED_GRAD_RATIO",
    # methods
    "weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv", "iso_c", "iso_cts",
    "wudi", "wudi_batched", "optmerge", "optmerge_batched", "mmer",
    # masks
    "mask_density", "topk_keep_mask", "kth_largest", "kth_largest_nonneg",
    "threshold_keep_mask", "ties_keep_masks", "dare_keep_mask", "mmer_masks", "tall_masks",
]
