"""Analysis of merges: parameter-interference profiles, mask overlap and what the experts share, as tidy
DataFrames."""
from .interference import (METRICS, InterferenceProfile, iter_task_vectors, profile_interference,
                           metric_by_group, tensor_stats, zoo_experts)
from .overlap import (OVERLAP_METRICS, MaskOverlap, analyze_masks, compute_masks, coverage_counts,
                      expert_count_sweep, lambda_sweep, load_mmer_masks, method_masks, pairwise_iou,
                      pattern_counts, sweep_masks, sweep_table)
from .shared import SharedSplit, mean_direction_split, pair_cosines

__all__ = [
    "METRICS", "OVERLAP_METRICS", "InterferenceProfile", "MaskOverlap", "SharedSplit", "analyze_masks",
    "compute_masks", "coverage_counts", "expert_count_sweep", "iter_task_vectors", "lambda_sweep",
    "load_mmer_masks", "mean_direction_split", "method_masks", "pair_cosines", "pairwise_iou", "pattern_counts",
    "profile_interference", "metric_by_group", "sweep_masks", "sweep_table", "tensor_stats", "zoo_experts",
]
