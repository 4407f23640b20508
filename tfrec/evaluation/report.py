"""Test-period evaluation of a trained run beside its baselines.

Numbers only mean something next to references: the popularity baseline (what any
shop has on day one) and, on the synthetic world, the oracle that ranks by the
generator's true utilities (an upper reference for the data's noise level).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from tfrec.config import DataConfig
from tfrec.models.catalog_index import TuningQueries
from tfrec.evaluation.baselines import BM25Baseline, PopularityBaseline
from tfrec.metrics.ranking import evaluate_topk
from tfrec.metrics.candidates import (candidate_lists, excludes_history, period_purchases,
                                       purchase_rate, rerank, search_candidate_lists,
                                       search_sessions)
from tfrec.data.feature_spec import catalog_features
from tfrec.metrics.retrieval import (EvalSet, RowSearch, build_eval_set, embed_in_batches,
                                     evaluate_lists, retrieve_topk)

log = logging.getLogger(__name__)

DEFAULT_COLUMNS = ("recall@10", "recall@100", "ndcg@10", "hit_rate@10", "mrr",
                   "purchase_rate@10")


def validation_queries(data: DataConfig, query_fn, max_users: int = 1000
                       ) -> Optional[TuningQueries]:
    """Query embeddings of a seeded sample of the data's validation-period users, with
    the items each has seen (left out of their lists).

    What an IVF index's nprobe is tuned and its recall measured on: real queries, not
    catalog items, and never the test period. None when the data is not readable.
    """
    from tfrec.data.io import load_data_tables
    from tfrec.data.split import time_split

    try:
        events = load_data_tables(data).events
        split = time_split(events, data.val_fraction, data.test_fraction)
        eval_set = build_eval_set(events, split.t_val, split.t_test, data.history_length,
                                  max_users=max_users)
    except (OSError, ValueError) as e:
        log.warning("no validation queries to tune the index on (%s): using catalog items", e)
        return None
    return TuningQueries(embed_in_batches(query_fn, eval_set.query_features(), batch_size=1024),
                         exclude=eval_set.exclude)


def evaluate_period(events: pd.DataFrame, catalog: pd.DataFrame, start_ts: int, end_ts: int,
                    history_length: int, query_fn=None, candidate_fn=None,
                    ks: Sequence[int] = (10, 100), data_dir: Optional[str] = None,
                    max_users: Optional[int] = None, ranker=None,
                    candidates: int = 100, search: bool = True,
                    search_history: str = "keep",
                    index: Optional[RowSearch] = None) -> Dict[str, Dict[str, float]]:
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
      search: also evaluate the period's search sessions ("search:" rows; see
        `evaluate_search`).
      search_history: "keep" or "exclude" the searcher's history items (as trained).
      index: retrieve through this index (e.g. `IndexSearch` for an IVF export) instead
        of exact search, in the two_tower and ranker rows.
    """
    eval_set = build_eval_set(events, start_ts, end_ts, history_length, max_users=max_users)
    bought = period_purchases(events, start_ts, end_ts)
    rows: Dict[str, Dict[str, float]] = {}
    model_lists = None  # the final model's lists (ranker's when there is one)

    def add(name: str, lists) -> None:
        rows[name] = evaluate_lists(lists, eval_set, ks)
        rows[name]["purchase_rate@10"] = purchase_rate(
            np.asarray([list(r)[:10] for r in lists], dtype=object), eval_set.user_ids, bought)

    if query_fn is not None:
        items = catalog_features(catalog, candidate_fn)
        item_emb = embed_in_batches(candidate_fn, items)
        query_emb = embed_in_batches(query_fn, eval_set.query_features(), batch_size=1024)
        model_lists = retrieve_topk(query_emb, item_emb, items["item_id"], max(ks),
                                    eval_set.exclude, search=index)
        add("two_tower", model_lists)
        if ranker is not None:
            ranked = ranked_lists(ranker, eval_set, events, catalog, query_fn, candidate_fn,
                                  candidates, data_dir, index)
            for name, lists in ranked.items():
                add(name, lists)
            model_lists = ranked["two_tower+ranker"]
    popularity = PopularityBaseline().fit(events, until_ts=start_ts)
    recs = popularity.recommend(list(eval_set.user_ids), max(ks),
                                exclude=dict(zip(eval_set.user_ids, eval_set.exclude)))
    add("popularity", recs)
    oracle = oracle_lists(data_dir, eval_set, max(ks))
    if oracle is not None:
        add("oracle", oracle)
    if model_lists is not None:  # the served model on new vs established items
        rows.update(item_age_rows(model_lists, eval_set, events, ks))
    if search:
        rows.update(evaluate_search(events, catalog, start_ts, end_ts, history_length, query_fn,
                                    candidate_fn, ranker=ranker, candidates=candidates, ks=ks,
                                    max_sessions=max_users, search_history=search_history))
    return rows


def item_age_rows(lists, eval_set: EvalSet, events: pd.DataFrame,
                  ks: Sequence[int]) -> Dict[str, Dict[str, float]]:
    """The model's lists scored on cold-item targets and on warm-item targets apart.

    A catalog that grows daily is only served well if items nobody has interacted with
    yet can be found; "cold items" keeps each user's targets without a positive event
    before the period, "warm items" the others (users left without targets drop out).

    Args:
      lists: the final model's top-k per user of `eval_set`.
      eval_set: the period's users and targets.
      events: the events table (interactions before the period make an item warm).
      ks: cut-offs.
    """
    from tfrec.data.examples import positive_interactions

    positives = positive_interactions(events)
    warm = set(positives.loc[positives["ts"] < eval_set.start_ts, "item_id"].astype(str))
    padded = np.full((len(lists), max(ks)), "", dtype=object)
    for row, items in enumerate(lists):
        items = list(items)[:max(ks)]
        padded[row, :len(items)] = items
    rows = {}
    for name, is_warm in (("cold items", False), ("warm items", True)):
        targets = [[t for t in user if (str(t) in warm) == is_warm] for user in eval_set.targets]
        rows[name] = evaluate_topk(padded, targets, ks=ks)
    return rows


def ranked_lists(ranker, eval_set: EvalSet, events: pd.DataFrame, catalog: pd.DataFrame,
                 query_fn, candidate_fn, candidates: int,
                 data_dir: Optional[str] = None,
                 index: Optional[RowSearch] = None) -> Dict[str, np.ndarray]:
    """The retrieval top-`candidates` of each frozen user re-ordered by the ranker
    ("two_tower+ranker") and, on a synthetic world, by true utility
    ("two_tower+oracle_ranker": the best any ranker of these candidates could do)."""
    lists = candidate_lists(eval_set, query_fn, candidate_fn, catalog, candidates,
                            search=index)
    out = {"two_tower+ranker": rank_lists(ranker, lists, events, catalog, eval_set.start_ts)}
    world = _world(data_dir)
    if world is not None:
        out["two_tower+oracle_ranker"] = world.oracle_rerank(
            eval_set.user_ids, lists["item_id"], (eval_set.start_ts + eval_set.end_ts) // 2)
    return out


def rank_lists(ranker, lists: Dict[str, np.ndarray], events: pd.DataFrame,
               catalog: pd.DataFrame, cut_ts: int) -> np.ndarray:
    """Candidate ids of `lists` re-ordered by the ranker, its catalog popularity features
    refreshed to `cut_ts` (what serving at that time would know)."""
    from tfrec.data.examples import positive_interactions
    from tfrec.features.catalog import catalog_statistics
    from tfrec.training.ranking_trainer import predict_scores

    ranker.catalog.set_statistics(
        catalog_statistics(catalog, positive_interactions(events), cut_ts))
    scores, _ = predict_scores(ranker, lists)
    return rerank(lists["item_id"], scores)


def evaluate_search(events: pd.DataFrame, catalog: pd.DataFrame, start_ts: int, end_ts: int,
                    history_length: int, query_fn=None, candidate_fn=None, ranker=None,
                    candidates: int = 100, ks: Sequence[int] = (10, 100),
                    max_sessions: Optional[int] = None,
                    search_history: str = "keep") -> Dict[str, Dict[str, float]]:
    """Search sessions of a period: did the results hold what the searcher engaged with?

    Each session's user is frozen at the search (history before it); hits are the items
    with a positive event in that session. BM25 over titles is the lexical baseline
    (it never reads the history). Rows are named "search:<model>"; `search_history`
    ("keep"/"exclude") treats the searcher's history items as serving would.
    """
    sessions = search_sessions(events, start_ts, end_ts, history_length, max_sessions)
    if len(sessions) == 0:
        return {}
    targets = [sorted(t) for t in sessions["clicked"]]
    bought = dict(enumerate(sessions["bought"]))
    keys = np.arange(len(sessions))
    rows: Dict[str, Dict[str, float]] = {}

    def add(name: str, lists) -> None:
        padded = np.full((len(lists), max(ks)), "", dtype=object)
        for row, items in enumerate(lists):
            items = list(items)[:max(ks)]
            padded[row, :len(items)] = items
        rows[f"search:{name}"] = evaluate_topk(padded, targets, ks=ks)
        rows[f"search:{name}"]["purchase_rate@10"] = purchase_rate(padded, keys, bought)

    if query_fn is not None:
        lists = search_candidate_lists(sessions, query_fn, candidate_fn, catalog,
                                       max(candidates, max(ks)), history_length,
                                       excludes_history(search_history))
        add("two_tower", lists["item_id"])
        if ranker is not None:
            top = {k: v[:, :candidates] if k in ("item_id", "retrieval_score") else v
                   for k, v in lists.items()}
            add("two_tower+ranker", rank_lists(ranker, top, events, catalog, start_ts))
    bm25 = BM25Baseline().fit(catalog["item_id"].astype(str).tolist(),
                              catalog["title"].astype(str).tolist())
    add("bm25", bm25.search(sessions["query"].tolist(), max(ks)))
    return rows


def _world(data_dir: Optional[str]):
    """The synthetic world of `data_dir`, or None (only synthetic worlds have a truth)."""
    if not data_dir or not os.path.exists(os.path.join(data_dir, "ground_truth.npz")):
        return None
    from tfrec.data.synthetic import World

    return World.load(data_dir)


def oracle_lists(data_dir: Optional[str], eval_set: EvalSet, k: int) -> Optional[List[List[str]]]:
    world = _world(data_dir)
    if world is None:
        return None
    mid = (eval_set.start_ts + eval_set.end_ts) // 2
    return world.oracle_topk(list(eval_set.user_ids), mid, k,
                             exclude=dict(zip(eval_set.user_ids, eval_set.exclude)))


def format_table(rows: Dict[str, Dict[str, float]],
                 columns: Sequence[str] = DEFAULT_COLUMNS, title: str = "") -> str:
    """Plain-text table: one row per model, one column per metric."""
    cols = [c for c in columns if any(c in r for r in rows.values())]
    counts = {int(r["users"]) for r in rows.values() if "users" in r}
    if len(counts) > 1 and "users" not in cols:  # slices (cold items...) count fewer users
        cols.append("users")
    width = max([len(n) for n in rows] + [10])
    lines = [title] if title else []
    lines.append(f"{'model':<{width}}  " + "  ".join(f"{c:>11}" for c in cols))
    for name, metrics in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(
            f"{metrics.get(c, float('nan')):>11.0f}" if c == "users" else
            f"{metrics.get(c, float('nan')):>11.4f}" for c in cols))
    users = next((int(r["users"]) for r in rows.values() if "users" in r), None)
    if users is not None and len(counts) == 1:
        lines.append(f"({users} users)")
    return "\n".join(lines)
