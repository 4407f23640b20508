"""Test-period evaluation of a trained run beside its baselines.

Numbers only mean something next to references: the popularity baseline (what any
shop has on day one) and, on the synthetic world, the oracle that ranks by the
generator's true utilities (an upper reference for the data's noise level).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from tfrec.data.io import load_tables
from tfrec.evaluation.baselines import PopularityBaseline
from tfrec.evaluation.retrieval import (EvalSet, build_eval_set, catalog_features,
                                        embed_in_batches, evaluate_lists, retrieve_topk)

DEFAULT_COLUMNS = ("recall@10", "recall@100", "ndcg@10", "hit_rate@10", "mrr",
                   "purchase_rate@10")


def evaluate_period(events: pd.DataFrame, catalog: pd.DataFrame, start_ts: int, end_ts: int,
                    history_length: int, query_fn=None, candidate_fn=None,
                    ks: Sequence[int] = (10, 100), data_dir: Optional[str] = None,
                    max_users: Optional[int] = None, ranker=None,
                    candidates: int = 100) -> Dict[str, Dict[str, float]]:
    """Model, popularity and (when ground truth exists) oracle metrics on one period.

    Every row also gets purchase_rate@10 (share of the top-10 bought in the period).

    Args:
      events / catalog: the tables.
      start_ts / end_ts: evaluation period; users are frozen at start_ts.
      history_length: history items per user.
      query_fn / candidate_fn: embedding functions of the model (omit for baselines only).
      ks: cut-offs.
      data_dir: synthetic world directory; its ground truth enables the oracle row.
      max_users: evaluate a seeded sample of users.
      ranker: a trained `RankingModel` re-ordering the retrieval top-`candidates`; adds
        the "two_tower+ranker" row (its catalog statistics are refreshed to start_ts).
      candidates: retrieval candidates the ranker re-orders.
    """
    from tfrec.training.candidates import period_purchases, purchase_rate

    eval_set = build_eval_set(events, start_ts, end_ts, history_length, max_users=max_users)
    bought = period_purchases(events, start_ts, end_ts)
    rows: Dict[str, Dict[str, float]] = {}

    def add(name: str, lists) -> None:
        rows[name] = evaluate_lists(lists, eval_set, ks)
        rows[name]["purchase_rate@10"] = purchase_rate(
            np.asarray([list(r)[:10] for r in lists], dtype=object), eval_set.user_ids, bought)

    if query_fn is not None:
        items = catalog_features(catalog)
        item_emb = embed_in_batches(candidate_fn, items)
        query_emb = embed_in_batches(query_fn, eval_set.query_features(), batch_size=1024)
        add("two_tower", retrieve_topk(query_emb, item_emb, items["item_id"], max(ks),
                                       eval_set.exclude))
        if ranker is not None:
            add("two_tower+ranker", rerank_period(ranker, eval_set, events, catalog, query_fn,
                                                  candidate_fn, candidates, start_ts))
    popularity = PopularityBaseline().fit(events, until_ts=start_ts)
    recs = popularity.recommend(list(eval_set.user_ids), max(ks),
                                exclude=dict(zip(eval_set.user_ids, eval_set.exclude)))
    add("popularity", recs)
    oracle = oracle_lists(data_dir, eval_set, max(ks))
    if oracle is not None:
        add("oracle", oracle)
    return rows


def rerank_period(ranker, eval_set: EvalSet, events: pd.DataFrame, catalog: pd.DataFrame,
                  query_fn, candidate_fn, candidates: int, cut_ts: int) -> np.ndarray:
    """The retrieval top-`candidates` of each frozen user, re-ordered by the ranker."""
    from tfrec.data.examples import positive_interactions
    from tfrec.features.catalog import catalog_statistics
    from tfrec.training.candidates import candidate_lists, rerank
    from tfrec.training.ranking_trainer import predict_scores

    ranker.catalog.set_statistics(
        catalog_statistics(catalog, positive_interactions(events), cut_ts))
    lists = candidate_lists(eval_set, query_fn, candidate_fn, catalog, candidates)
    scores, _ = predict_scores(ranker, lists)
    return rerank(lists["item_id"], scores)


def oracle_lists(data_dir: Optional[str], eval_set: EvalSet, k: int) -> Optional[List[List[str]]]:
    if not data_dir or not os.path.exists(os.path.join(data_dir, "ground_truth.npz")):
        return None
    from tfrec.data.synthetic import World  # only synthetic worlds have a ground truth

    world = World.load(data_dir)
    mid = (eval_set.start_ts + eval_set.end_ts) // 2
    return world.oracle_topk(list(eval_set.user_ids), mid, k,
                             exclude=dict(zip(eval_set.user_ids, eval_set.exclude)))


def format_table(rows: Dict[str, Dict[str, float]],
                 columns: Sequence[str] = DEFAULT_COLUMNS, title: str = "") -> str:
    """Plain-text table: one row per model, one column per metric."""
    cols = [c for c in columns if any(c in r for r in rows.values())]
    width = max([len(n) for n in rows] + [10])
    lines = [title] if title else []
    lines.append(f"{'model':<{width}}  " + "  ".join(f"{c:>11}" for c in cols))
    for name, metrics in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(
            f"{metrics.get(c, float('nan')):>11.4f}" for c in cols))
    users = next((int(r["users"]) for r in rows.values() if "users" in r), None)
    if users is not None:
        lines.append(f"({users} users)")
    return "\n".join(lines)
