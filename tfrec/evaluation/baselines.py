"""Non-learned baselines a trained model has to beat: popularity and co-occurrence.

A model that loses to "most popular" or "bought together" on the same time split is
not learning personalisation; both return ranked id lists for `evaluate_topk`.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set

import numpy as np
import pandas as pd

from tfrec.data.schema import PAD, POSITIVE_EVENT_WEIGHTS
from tfrec.features.bm25 import BM25Scorer, expand_ranges
from tfrec.metrics.ranking import topk_ids

__all__ = ["PopularityBaseline", "CooccurrenceBaseline", "BM25Baseline"]

_REQUIRED_COLUMNS = ("ts", "user_id", "event_type", "item_id")
_SIMILARITIES = ("jaccard", "lift", "count")


def _check_k(k: int) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _positive_events(
    events: pd.DataFrame, until_ts: Optional[int], event_weights: Mapping[str, float]
) -> pd.DataFrame:
    """Positive interactions strictly before `until_ts`, with their funnel weight.

    Filtering on time here (not in callers) is what keeps baselines free of
    look-ahead when they are evaluated on a later period.

    Args:
      events: Events table (schema.EVENTS_SCHEMA columns).
      until_ts: Keep events with ts < until_ts; None keeps all.
      event_weights: event_type -> weight; other event types are ignored.
    """
    if not isinstance(events, pd.DataFrame):
        raise ValueError(f"events must be a pandas DataFrame, got {type(events).__name__}")
    missing = [c for c in _REQUIRED_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events table is missing columns {missing}")
    if not event_weights:
        raise ValueError("event_weights is empty: no event type counts as positive")
    items = events["item_id"]
    mask = events["event_type"].isin(list(event_weights)) & items.notna()
    mask &= items.astype(str) != PAD
    if until_ts is not None:
        mask &= events["ts"] < until_ts
    kept = events.loc[mask]
    return pd.DataFrame(
        {
            "user_id": kept["user_id"].astype(str).to_numpy(dtype=object),
            "item_id": kept["item_id"].astype(str).to_numpy(dtype=object),
            "ts": kept["ts"].to_numpy(dtype=np.int64),
            "weight": kept["event_type"].map(dict(event_weights)).to_numpy(dtype=np.float64),
        }
    )


class PopularityBaseline:
    """Recommends the most interacted-with items to everyone.

    The floor for any recommender, and the fallback for users without history.

    Args:
      weighted: Count positives by funnel weight (purchase > cart > click) instead
        of one per event.
      event_weights: event_type -> weight of a positive; defaults to
        schema.POSITIVE_EVENT_WEIGHTS.
    """

    def __init__(
        self, weighted: bool = False, event_weights: Optional[Mapping[str, float]] = None
    ) -> None:
        self.weighted = weighted
        self.event_weights = dict(event_weights or POSITIVE_EVENT_WEIGHTS)
        self.item_ids_: Optional[np.ndarray] = None
        self.scores_: Optional[np.ndarray] = None

    def fit(self, events: pd.DataFrame, until_ts: Optional[int] = None) -> "PopularityBaseline":
        """Counts positives per item before `until_ts`.

        Args:
          events: Events table.
          until_ts: Only events with ts < until_ts are counted (no look-ahead).
        """
        return self._fit_positives(_positive_events(events, until_ts, self.event_weights))

    def _fit_positives(self, positives: pd.DataFrame) -> "PopularityBaseline":
        values = positives["weight"] if self.weighted else pd.Series(1.0, index=positives.index)
        counts = values.groupby(positives["item_id"]).sum().sort_index()
        # Stable sort on the id-sorted counts: ties are broken by item id.
        order = np.argsort(-counts.to_numpy(dtype=np.float64), kind="stable")
        self.item_ids_ = counts.index.to_numpy(dtype=object)[order]
        self.scores_ = counts.to_numpy(dtype=np.float64)[order]
        return self

    @property
    def popularity(self) -> pd.Series:
        """Item id -> count (or weighted count), most popular first."""
        self._check_fitted()
        return pd.Series(self.scores_, index=pd.Index(self.item_ids_, name="item_id"))

    def _check_fitted(self) -> None:
        if self.item_ids_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")

    def recommend(
        self,
        user_ids: Iterable[str],
        k: int,
        exclude: Optional[Mapping[str, Set[str]]] = None,
    ) -> List[List[str]]:
        """The k most popular items per user, skipping that user's excluded items.

        Args:
          user_ids: Users to recommend for; unknown users are fine.
          k: Items per user, >= 1; fewer only if the catalogue runs out.
          exclude: Optional user id -> items not to recommend (e.g. already bought).
        """
        self._check_fitted()
        k = _check_k(k)
        top = [str(i) for i in self.item_ids_[:k]]
        out: List[List[str]] = []
        for user in user_ids:
            banned = exclude.get(user) if exclude else None
            out.append(self._top_excluding(k, banned, ()) if banned else list(top))
        return out

    def _top_excluding(self, k: int, banned: Optional[Set[str]], taken: Sequence[str]) -> List[str]:
        """Most popular items not in `banned` nor `taken`, at most k of them."""
        skip = set(banned or ()) | set(taken)
        # Only the first k + |skip| items can be needed.
        candidates = self.item_ids_[: k + len(skip)]
        return [str(i) for i in candidates if i not in skip][:k]


def _count_pairs(
    user_codes: np.ndarray, item_codes: np.ndarray, num_items: int, budget: int = 1 << 24
) -> tuple:
    """Number of users sharing each ordered item pair (i != j), as sorted pair keys.

    Sparse A^T A without scipy: pairs are enumerated per user, in chunks of at most
    ~`budget` pairs so memory stays bounded by the chunk, not by sum(|history|^2).

    Args:
      user_codes: User of each distinct (user, item) row.
      item_codes: Item of each row, in [0, num_items).
      num_items: Vocabulary size; a pair key is i * num_items + j.
      budget: Pairs enumerated per chunk.
    """
    order = np.argsort(user_codes, kind="stable")
    items = item_codes[order]
    users = user_codes[order]
    group_start = np.searchsorted(users, users)  # first row of each row's user
    group_size = np.searchsorted(users, users, side="right") - group_start
    # Chunks hold whole users (one user's pairs are never split across chunks).
    row_pairs = group_size.astype(np.int64)
    chunk_of_row = (np.cumsum(row_pairs) - row_pairs) // budget
    chunk_of_row = chunk_of_row[group_start]
    # chunk_of_row is non-decreasing, so each chunk is a contiguous slice of rows.
    bounds = np.flatnonzero(np.diff(chunk_of_row, prepend=-1, append=-1) != 0)
    keys, counts = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = np.arange(lo, hi)
        partners = expand_ranges(group_start[rows], group_size[rows])
        a = np.repeat(items[rows], group_size[rows])
        b = items[partners]
        off_diagonal = a != b
        chunk_keys, chunk_counts = np.unique(
            a[off_diagonal] * num_items + b[off_diagonal], return_counts=True
        )
        keys.append(chunk_keys)
        counts.append(chunk_counts)
    if not keys:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    keys, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate(counts)).astype(np.int64)
    return keys, counts


class CooccurrenceBaseline:
    """Item-to-item recommender from co-occurrence in users' positive histories (SAR-like).

    Captures "people who bought X also bought Y" with no training, a strong baseline
    for session/basket completion; users without known history get popularity.

    Args:
      similarity: Normalisation of the co-occurrence count c_ij of items i and j
        (c_ii = users with i): "jaccard" c_ij / (c_ii + c_jj - c_ij), "lift"
        c_ij / (c_ii * c_jj) (favours rare pairs), or raw "count".
      min_cooccurrence: Pairs seen by fewer users are dropped as noise.
      max_neighbors: Keep only each item's most similar neighbours (item-kNN
        pruning); bounds recommendation cost. None keeps every pair (exact SAR).
      max_items_per_user: Keep only each user's most recent distinct items; pair
        counting grows quadratically with history length. None keeps all.
      weighted_popularity: Use funnel weights in the popularity fallback.
      event_weights: event_type -> weight; defaults to schema.POSITIVE_EVENT_WEIGHTS.
    """

    # Users scored together in recommend(); bounds the flattened candidate arrays.
    _USER_BLOCK = 1024

    def __init__(
        self,
        similarity: str = "jaccard",
        min_cooccurrence: int = 1,
        max_neighbors: Optional[int] = 100,
        max_items_per_user: Optional[int] = 200,
        weighted_popularity: bool = False,
        event_weights: Optional[Mapping[str, float]] = None,
    ) -> None:
        if similarity not in _SIMILARITIES:
            raise ValueError(f"similarity must be one of {_SIMILARITIES}, got {similarity!r}")
        if min_cooccurrence < 1:
            raise ValueError(f"min_cooccurrence must be >= 1, got {min_cooccurrence}")
        if max_neighbors is not None and max_neighbors < 1:
            raise ValueError(f"max_neighbors must be >= 1 or None, got {max_neighbors}")
        if max_items_per_user is not None and max_items_per_user < 2:
            raise ValueError(
                f"max_items_per_user must be >= 2 (pairs need two items), got {max_items_per_user}"
            )
        self.similarity = similarity
        self.min_cooccurrence = min_cooccurrence
        self.max_neighbors = max_neighbors
        self.max_items_per_user = max_items_per_user
        self.event_weights = dict(event_weights or POSITIVE_EVENT_WEIGHTS)
        self.popularity_ = PopularityBaseline(weighted_popularity, self.event_weights)
        self.items_: Optional[np.ndarray] = None

    def fit(self, events: pd.DataFrame, until_ts: Optional[int] = None) -> "CooccurrenceBaseline":
        """Builds the sparse item-item similarity table from positives before `until_ts`.

        Args:
          events: Events table.
          until_ts: Only events with ts < until_ts are used (no look-ahead).
        """
        positives = _positive_events(events, until_ts, self.event_weights)
        self.popularity_._fit_positives(positives)

        # One row per (user, item) with its last interaction time, oldest first.
        last = (
            positives.groupby(["user_id", "item_id"], sort=False)["ts"].max().reset_index()
        )
        last = last.sort_values(["user_id", "ts", "item_id"], kind="stable")
        if self.max_items_per_user is not None:
            recency = last.groupby("user_id", sort=False).cumcount(ascending=False)
            last = last[recency < self.max_items_per_user]
        self.histories_: Dict[str, List[str]] = {
            user: list(items) for user, items in last.groupby("user_id", sort=False)["item_id"]
        }

        # Item codes follow popularity order, so "lower code" means "more popular"
        # and every tie below is broken towards popular items for free.
        self.items_ = np.asarray(self.popularity_.item_ids_, dtype=object)
        self._item_index = pd.Index(self.items_, dtype=object)
        num_items = len(self.items_)
        n = max(num_items, 1)
        item_codes = self._item_index.get_indexer(last["item_id"]).astype(np.int64)
        user_codes = pd.factorize(last["user_id"])[0].astype(np.int64)

        support = np.bincount(item_codes, minlength=num_items).astype(np.float64)  # c_ii
        keys, counts = _count_pairs(user_codes, item_codes, n)
        keep = counts >= self.min_cooccurrence
        keys, counts = keys[keep], counts[keep].astype(np.float64)
        src, dst = keys // n, keys % n
        if self.similarity == "jaccard":
            sim = counts / (support[src] + support[dst] - counts)
        elif self.similarity == "lift":
            sim = counts / (support[src] * support[dst])
        else:
            sim = counts

        # Neighbours of each item, most similar first (ties: more popular first).
        order = np.lexsort((dst, -sim, src))
        src, dst, sim = src[order], dst[order], sim[order]
        if self.max_neighbors is not None:
            rank = np.arange(src.size) - np.searchsorted(src, src)
            kept = rank < self.max_neighbors
            src, dst, sim = src[kept], dst[kept], sim[kept]
        # CSR layout: neighbours of item i are _neighbors[_indptr[i]:_indptr[i + 1]].
        self._indptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=num_items))])
        self._neighbors = dst
        self._similarities = sim
        return self

    def _check_fitted(self) -> None:
        if self.items_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")

    def similar_items(self, item_id: str, k: int) -> List[str]:
        """The k items most similar to `item_id` ([] for unknown items).

        Args:
          item_id: Query item.
          k: Maximum number of neighbours, >= 1.
        """
        self._check_fitted()
        k = _check_k(k)
        code = self._item_index.get_indexer([item_id])[0]
        if code < 0:
            return []
        start = self._indptr[code]
        stop = min(self._indptr[code + 1], start + k)
        return [str(i) for i in self.items_[self._neighbors[start:stop]]]

    def _codes(self, per_user: List[Sequence[str]]) -> tuple:
        """(row, item code) of known items in per-row id lists, deduplicated."""
        lengths = [len(ids) for ids in per_user]
        rows = np.repeat(np.arange(len(per_user), dtype=np.int64), lengths)
        flat = [str(i) for ids in per_user for i in ids]
        codes = self._item_index.get_indexer(pd.Index(flat, dtype=object)).astype(np.int64)
        n = max(len(self.items_), 1)
        keys = np.unique(rows[codes >= 0] * n + codes[codes >= 0])
        return keys // n, keys % n

    def recommend(
        self,
        user_ids: Iterable[str],
        histories: Optional[Mapping[str, Sequence[str]]],
        k: int,
        exclude: Optional[Mapping[str, Set[str]]] = None,
        exclude_history: bool = False,
    ) -> List[List[str]]:
        """Items ranked by summed similarity to each user's history items.

        Each distinct known history item contributes once; unknown items are ignored.
        Lists with fewer than k scored items (including empty histories and unknown
        users) are completed with popular items, so k items come back when possible.

        Args:
          user_ids: Users to recommend for.
          histories: user id -> items consumed; None uses the histories seen in fit.
          k: Items per user, >= 1.
          exclude: Optional user id -> items not to recommend.
          exclude_history: Also skip the user's history items (history items are
            scored like any other, since repeat purchases happen).
        """
        self._check_fitted()
        k = _check_k(k)
        user_ids = list(user_ids)
        if histories is None:
            histories = self.histories_
        user_histories = []
        for user in user_ids:
            items = histories.get(user) or ()
            if isinstance(items, (str, bytes)):
                raise ValueError(f"history of user {user!r} is a string; pass a list of item ids")
            user_histories.append(list(items))
        banned: List[Set[str]] = [set((exclude or {}).get(user) or ()) for user in user_ids]
        if exclude_history:
            banned = [b | set(h) for b, h in zip(banned, user_histories)]

        out: List[List[str]] = []
        for start in range(0, len(user_ids), self._USER_BLOCK):
            stop = min(len(user_ids), start + self._USER_BLOCK)
            chunks = self._score_block(user_histories[start:stop], banned[start:stop], k)
            for recs, skip in zip(chunks, banned[start:stop]):
                if len(recs) < k:
                    recs += self.popularity_._top_excluding(k - len(recs), skip, recs)
                out.append(recs)
        return out

    def _score_block(
        self, histories: List[List[str]], banned: List[Set[str]], k: int
    ) -> List[List[str]]:
        """Top-k co-occurrence items (positive score only) for a block of users."""
        num_rows, n = len(histories), max(len(self.items_), 1)
        rows, codes = self._codes(histories)
        starts = self._indptr[codes]
        lengths = self._indptr[codes + 1] - starts
        slots = expand_ranges(starts, lengths)
        cand_keys = np.repeat(rows, lengths) * n + self._neighbors[slots]
        weights = self._similarities[slots]
        banned_rows, banned_codes = self._codes([sorted(b) for b in banned])

        if cand_keys.size > num_rows * n:
            # Many candidates: a dense [users, items] block and a partition are
            # linear, where sorting the candidates would not be.
            dense = np.bincount(cand_keys, weights=weights, minlength=num_rows * n)
            dense = dense.reshape(num_rows, n)
            dense[banned_rows, banned_codes] = 0.0
            # Ties go to the lower code, i.e. the more popular item.
            cols = topk_ids(dense, np.arange(n), k)
            found = np.take_along_axis(dense, cols, axis=1) > 0
            return [[str(i) for i in self.items_[c[f]]] for c, f in zip(cols, found)]

        keys, inverse = np.unique(cand_keys, return_inverse=True)
        scores = np.bincount(inverse, weights=weights, minlength=keys.size)
        if banned_rows.size:
            allowed = ~np.isin(keys, banned_rows * n + banned_codes)
            keys, scores = keys[allowed], scores[allowed]
        cand_rows, cand_items = keys // n, keys % n
        # Equal scores fall back to code order, i.e. popularity order.
        order = np.lexsort((cand_items, -scores, cand_rows))
        cand_rows, cand_items = cand_rows[order], cand_items[order]
        rank = np.arange(cand_rows.size) - np.searchsorted(cand_rows, cand_rows)
        top = rank < k
        per_row = np.bincount(cand_rows[top], minlength=num_rows)
        chunks = np.split(self.items_[cand_items[top]], np.cumsum(per_row)[:-1])
        return [[str(i) for i in chunk] for chunk in chunks[:num_rows]]


class BM25Baseline(BM25Scorer):
    """Okapi BM25 search over item texts, the lexical baseline learned search must beat.

    Scoring is `tfrec.features.bm25.BM25Scorer` (shared with the in-graph index);
    this adds top-k search with per-query exclusions.
    """

    def search(self, queries: Sequence[str], k: int,
               exclude: Optional[Sequence[Set[str]]] = None) -> List[List[str]]:
        """Top-k document ids per query, best first; documents scoring 0 are not returned.

        Args:
          queries: query texts.
          k: results per query, >= 1.
          exclude: optional per-query sets of document ids to skip.
        """
        self._check_fitted()
        k = _check_k(k)
        queries = list(queries) if not isinstance(queries, str) else queries
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} rows but there are {len(queries)} "
                             "queries")
        index = {d: i for i, d in enumerate(self.doc_ids_)}
        out: List[List[str]] = []
        for start in range(0, len(queries), self._QUERY_BLOCK):
            block = queries[start:start + self._QUERY_BLOCK]
            scores = self.score(block)
            if exclude is not None:
                for row, banned in enumerate(exclude[start:start + self._QUERY_BLOCK]):
                    cols = [index[d] for d in banned if d in index]
                    scores[row, cols] = 0.0
            top = topk_ids(scores, np.arange(scores.shape[1]), k)
            for row, cols in enumerate(top):
                cols = cols[scores[row, cols] > 0]
                out.append([str(self.doc_ids_[c]) for c in cols])
        return out
