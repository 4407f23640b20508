"""Offline evaluation: ranking metrics, business metrics and the baselines models must beat.

Metrics work on ranked id lists and plain score arrays (numpy only), so models,
baselines and exported servables are all judged by exactly the same code.
"""

from tfrec.evaluation.baselines import BM25Baseline, CooccurrenceBaseline, PopularityBaseline
from tfrec.evaluation.ab_testing import ab_test
from tfrec.evaluation.click_model import (
    PositionBasedClickModel,
    calibration_table,
    expected_business_metrics,
)
from tfrec.evaluation.off_policy import ips_estimate, snips_estimate
from tfrec.metrics.ranking import (
    auc,
    average_precision_at_k,
    catalog_coverage,
    embedding_diversity,
    evaluate_topk,
    gauc,
    hit_rate_at_k,
    intra_list_diversity,
    map_at_k,
    metric_curve,
    mrr,
    ndcg_at_k,
    ndcg_of_scored_lists,
    novelty,
    popularity_bias,
    precision_at_k,
    recall_at_k,
    scored_list_metrics,
    topk_ids,
)
from tfrec.evaluation.slices import activity_slices, cold_start_slices, evaluate_slices

__all__ = [
    "BM25Baseline",
    "CooccurrenceBaseline",
    "PopularityBaseline",
    "PositionBasedClickModel",
    "ab_test",
    "activity_slices",
    "auc",
    "average_precision_at_k",
    "calibration_table",
    "catalog_coverage",
    "cold_start_slices",
    "embedding_diversity",
    "evaluate_slices",
    "evaluate_topk",
    "expected_business_metrics",
    "gauc",
    "hit_rate_at_k",
    "intra_list_diversity",
    "ips_estimate",
    "map_at_k",
    "metric_curve",
    "mrr",
    "ndcg_at_k",
    "ndcg_of_scored_lists",
    "novelty",
    "popularity_bias",
    "precision_at_k",
    "recall_at_k",
    "scored_list_metrics",
    "snips_estimate",
    "topk_ids",
]
