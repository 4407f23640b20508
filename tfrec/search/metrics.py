"""Full-catalog search metrics from graded judgments (Home Depot protocol).

Each query ranks the whole catalog; judged products gain `grade - 1`, unjudged ones 0,
so a model is only credited for what humans judged. Each metric averages over the
queries that can score on it (NDCG: some positive gain; Recall / MRR: some product at
their grade threshold), which keeps queries with nothing relevant from diluting them.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Sequence

import numpy as np
import pandas as pd

from tfrec.metrics.ranking import ndcg_per_list, reciprocal_ranks

__all__ = ["SearchMetrics", "query_gains", "catalog_search_metrics"]


@dataclasses.dataclass
class SearchMetrics:
    """Per-query values (NaN where a query cannot score) and their means."""

    ndcg: np.ndarray
    recall: np.ndarray
    mrr: np.ndarray
    k: int = 10
    recall_k: int = 100

    def summary(self) -> Dict[str, float]:
        """{"ndcg@10": ..., "recall@100": ..., "mrr": ..., counts of scoring queries}."""
        out: Dict[str, float] = {}
        for name, values in ((f"ndcg@{self.k}", self.ndcg), (f"recall@{self.recall_k}",
                                                                self.recall), ("mrr", self.mrr)):
            kept = values[~np.isnan(values)]
            out[name] = float(kept.mean()) if kept.size else float("nan")
        out["queries"] = int(np.sum(~np.isnan(self.ndcg)))
        return out


def query_gains(judgments: pd.DataFrame, row_of: Mapping[str, int],
                queries: Sequence[str]) -> List[Dict[int, float]]:
    """Per query (in the given order): catalog row -> grade - 1 of its judged products.

    Args:
      judgments: DataFrame(query, product_id, relevance) with grades in [1, 3].
      row_of: product id -> catalog row.
      queries: the queries to collect, in output order.

    Raises:
      ValueError: a judged product is not in the catalog, or a query has no judgment.
    """
    missing = sorted(set(judgments["product_id"]) - set(row_of))
    if missing:
        raise ValueError(f"{len(missing)} judged product(s) are not in the catalog, e.g. "
                         f"{missing[:3]}; build the catalog from the same judgments")
    grouped = {q: g for q, g in judgments.groupby("query", sort=False)}
    out = []
    for query in queries:
        if query not in grouped:
            raise ValueError(f"query {query!r} has no judgments")
        g = grouped[query]
        out.append({row_of[p]: float(r) - 1.0 for p, r in zip(g["product_id"], g["relevance"])})
    return out


def catalog_search_metrics(ranked: np.ndarray, gains: Sequence[Mapping[int, float]],
                           k: int = 10, recall_k: int = 100, recall_grade: float = 2.0,
                           mrr_grade: float = 2.5) -> SearchMetrics:
    """NDCG@k (gain grade - 1), Recall@recall_k of grade >= recall_grade, MRR of >= mrr_grade.

    Args:
      ranked: [Q, >= recall_k] catalog rows per query, best first (-1 = no result).
      gains: per query, catalog row -> grade - 1 (query_gains).
      k: NDCG cut-off.
      recall_k: recall cut-off (ranked needs at least this many columns).
      recall_grade: grade a product needs to count for recall.
      mrr_grade: grade of the product whose first rank MRR takes (anywhere in `ranked`).
    """
    ranked = np.asarray(ranked)
    if ranked.ndim != 2 or len(ranked) != len(gains):
        raise ValueError(f"ranked must be [queries, depth] with one row per query "
                         f"({len(gains)}), got shape {ranked.shape}")
    if ranked.shape[1] < max(k, recall_k):
        raise ValueError(f"ranked has {ranked.shape[1]} columns; need >= {max(k, recall_k)} "
                         f"for NDCG@{k} and Recall@{recall_k}")
    got = np.array([[gain.get(int(r), 0.0) for r in row[:k]]
                    for row, gain in zip(ranked, gains)]).reshape(-1, k)
    ideal = np.zeros((len(gains), k))
    for i, gain in enumerate(gains):
        best = np.sort(np.fromiter(gain.values(), float))[::-1][:k]
        ideal[i, :best.size] = best
    ndcg = np.where(ideal[:, 0] > 0, ndcg_per_list(got, ideal, k), np.nan)
    recall = np.full(len(gains), np.nan)
    first_hit = np.zeros(ranked.shape, bool)
    has_first = np.zeros(len(gains), bool)
    for i, (row, gain) in enumerate(zip(ranked, gains)):
        wanted = {r for r, g in gain.items() if g + 1.0 >= recall_grade - 1e-9}
        if wanted:
            recall[i] = len(wanted.intersection(int(r) for r in row[:recall_k])) / len(wanted)
        first = {r for r, g in gain.items() if g + 1.0 >= mrr_grade - 1e-9}
        has_first[i] = bool(first)
        first_hit[i] = [int(r) in first for r in row]
    mrr = np.where(has_first, reciprocal_ranks(first_hit), np.nan)
    return SearchMetrics(ndcg, recall, mrr, k=k, recall_k=recall_k)
