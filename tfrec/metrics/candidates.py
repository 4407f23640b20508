"""Ranking lists built from retrieval candidates, labelled by what users did next.

A ranker trained on logged impressions learns within-session choice, but in production
it re-orders the retrieval top-K and is judged on what users do in the next days. So its
training lists are exactly that: each user frozen at a cut time, the two-tower's top-K
(with scores), and labels from the following period (any positive = click, purchase).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import pandas as pd

from tfrec.data.feature_spec import catalog_features
from tfrec.metrics.retrieval import (EmbedFn, EvalSet, RowSearch, embed_in_batches,
                                    retrieve_with_scores)

SEARCH_HISTORY = ("keep", "exclude")


def period_purchases(events: pd.DataFrame, start_ts: int, end_ts: int) -> Dict[str, set]:
    """Items each user bought in [start_ts, end_ts)."""
    bought = events[(events["event_type"] == "purchase") & (events["ts"] >= start_ts)
                    & (events["ts"] < end_ts)]
    return bought.groupby("user_id")["item_id"].apply(lambda s: set(s.astype(str))).to_dict()


def candidate_lists(eval_set: EvalSet, query_fn: EmbedFn, candidate_fn: EmbedFn,
                    catalog: pd.DataFrame, k: int,
                    purchases: Optional[Dict[str, set]] = None,
                    search: Optional[RowSearch] = None) -> Dict[str, np.ndarray]:
    """Retrieval top-k of each frozen user as ranker input arrays, with labels.

    Args:
      eval_set: users frozen at a cut time, with their targets in the following period.
      query_fn / candidate_fn: the retrieval model's tower functions.
      catalog: items to retrieve from.
      k: candidates per user.
      purchases: user -> items bought in the period (purchase labels); zeros if None.
      search: retrieve through this index (what an IVF export serves) instead of exact.

    Returns:
      user_id, history, device, hour, query [U(, H)]; item_id, retrieval_score, click,
      purchase [U, k]. "click" marks any positive interaction in the period.
    """
    if k < 1:
        raise ValueError(f"candidates per list must be >= 1, got {k}")
    items = catalog_features(catalog, candidate_fn)
    item_emb = embed_in_batches(candidate_fn, items)
    query_emb = embed_in_batches(query_fn, eval_set.query_features(), batch_size=1024)
    ids, scores = retrieve_with_scores(query_emb, item_emb, items["item_id"], k, eval_set.exclude,
                                       search=search)
    targets = [set(t) for t in eval_set.targets]
    bought = [purchases.get(u, set()) if purchases else set() for u in eval_set.user_ids]
    click = np.array([[i in t for i in row] for row, t in zip(ids, targets)], np.float32)
    purchase = np.array([[i in b for i in row] for row, b in zip(ids, bought)], np.float32)
    return {**eval_set.query_features(), "item_id": ids.astype(object),
            "retrieval_score": scores, "click": click, "purchase": purchase}


def rerank(candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Candidates re-ordered by descending score (stable: ties keep retrieval order)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1)


def purchase_rate(lists: np.ndarray, user_ids, purchases: Dict[str, set], k: int = 10) -> float:
    """Mean share of the top-k that the user bought in the period (purchase-rate@k)."""
    rates = [len(set(row[:k]) & purchases.get(u, set())) / k for u, row in zip(user_ids, lists)]
    return float(np.mean(rates)) if rates else 0.0


def search_sessions(events: pd.DataFrame, start_ts: int, end_ts: int, history_length: int,
                    max_sessions: Optional[int] = None, seed: int = 0) -> pd.DataFrame:
    """Search sessions in [start_ts, end_ts) with a positive, and their labels.

    Args:
      events: the events table.
      start_ts / end_ts: the period.
      history_length: history items per session (positives strictly before it).
      max_sessions: seeded sample cap.
      seed: sampling seed.

    Returns:
      DataFrame(user_id, ts, query, device, hour, history, clicked, bought): clicked =
      items with any positive event in the session, bought = purchased items.
    """
    from tfrec.data.examples import histories_before, hour_of_day, positive_interactions

    period = events[(events["ts"] >= start_ts) & (events["ts"] < end_ts)]
    searches = period[(period["event_type"] == "search") & (period["query"].astype(str) != "")]
    searches = searches.sort_values("ts", kind="stable").drop_duplicates("session_id")
    positives = positive_interactions(period)
    bought_events = period[period["event_type"] == "purchase"]
    clicked = positives.groupby("session_id")["item_id"].apply(lambda s: set(s.astype(str)))
    bought = bought_events.groupby("session_id")["item_id"].apply(lambda s: set(s.astype(str)))
    searches = searches[searches["session_id"].isin(clicked.index)]
    if max_sessions and len(searches) > max_sessions:
        searches = searches.sample(max_sessions, random_state=seed).sort_values("ts")
    history_pool = positive_interactions(events).sort_values(["user_id", "ts"], kind="stable")
    history = histories_before(
        history_pool["user_id"].to_numpy(), history_pool["item_id"].to_numpy(),
        history_pool["ts"].to_numpy(), searches["user_id"].to_numpy(dtype=object),
        searches["ts"].to_numpy(dtype=np.int64), history_length)
    return pd.DataFrame({
        "user_id": searches["user_id"].astype(str).to_numpy(object),
        "ts": searches["ts"].to_numpy(np.int64),
        "query": searches["query"].astype(str).to_numpy(object),
        "device": searches["device"].astype(str).to_numpy(object),
        "hour": hour_of_day(searches["ts"].to_numpy()),
        "history": history,
        "clicked": [clicked[s] for s in searches["session_id"]],
        "bought": [bought.get(s, set()) for s in searches["session_id"]],
    })


def excludes_history(policy: str) -> bool:
    """Whether search results leave out the shopper's history items ("keep"/"exclude").

    Raises:
      ValueError: for any other policy.
    """
    if policy not in SEARCH_HISTORY:
        raise ValueError(f"search_history must be one of {SEARCH_HISTORY}, got {policy!r}")
    return policy == "exclude"


def search_candidate_lists(sessions: pd.DataFrame, query_fn: EmbedFn, candidate_fn: EmbedFn,
                           catalog: pd.DataFrame, k: int, history_length: int,
                           exclude_history: bool = False) -> Dict[str, np.ndarray]:
    """Retrieval top-k for each search session's (user, query), labelled by the session.

    Search lists teach the ranker's text features: recommendation lists have no query.

    Args:
      exclude_history: leave out the session's last `history_length` history items, as
        the pipeline's search signature does with the request's history under
        `search_history: exclude` (by default they stay: people re-buy what they
        search for).
    """
    from tfrec.data.schema import PAD

    n = len(sessions)
    history = np.full((n, history_length), PAD, dtype=object)
    for row, items in enumerate(sessions["history"]):
        history[row, :len(items[:history_length])] = items[:history_length]
    features = {"user_id": sessions["user_id"].to_numpy(object), "history": history,
                "query": sessions["query"].to_numpy(object),
                "device": sessions["device"].to_numpy(object),
                "hour": sessions["hour"].to_numpy(np.int64)}
    items = catalog_features(catalog, candidate_fn)
    item_emb = embed_in_batches(candidate_fn, items)
    query_emb = embed_in_batches(query_fn, features, batch_size=1024)
    exclude = [set(row) - {PAD} for row in history] if exclude_history else None
    ids, scores = retrieve_with_scores(query_emb, item_emb, items["item_id"], k, exclude)
    click = np.array([[i in t for i in row] for row, t in zip(ids, sessions["clicked"])],
                     np.float32)
    purchase = np.array([[i in t for i in row] for row, t in zip(ids, sessions["bought"])],
                        np.float32)
    return {**features, "item_id": ids.astype(object), "retrieval_score": scores,
            "click": click, "purchase": purchase}


def concat_lists(*arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Stacks list arrays of the same keys and widths (e.g. recommendation + search)."""
    keys = arrays[0].keys()
    return {k: np.concatenate([a[k] for a in arrays], axis=0) for k in keys}
