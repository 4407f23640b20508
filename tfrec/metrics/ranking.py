"""Offline ranking and classification metrics over plain id lists and scores.

Metrics take ranked ids rather than model outputs so that every model and baseline
is judged by the same code; numpy only, so evaluation never needs a TF graph.

Conventions shared by the top-k metrics:

* `recommended` is a 2-D array or a list of ranked id lists, one row per user.
  Ragged rows are padded with `""`, and `""`/`None` never match a relevant id.
  An id repeated in a row only counts at its first position.
* `relevant` holds, per user, a collection of relevant ids, or a mapping
  id -> grade for graded relevance (ids with a non-positive grade are not relevant).
* Users with no relevant item are excluded from the average (there is nothing to
  retrieve, so any score would be arbitrary); when no user remains the metric is NaN.
* Ids are compared by their text form (bytes decoded as UTF-8), so `5`, `"5"` and
  `b"5"` are the same item, which lets TF string tensors meet Python ids.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, Collection, Dict, Iterable, List, Optional, Set, Union

import numpy as np

from tfrec.data.schema import PAD

Relevant = Union[Collection[Any], Mapping[Any, float]]

__all__ = [
    "recall_at_k",
    "precision_at_k",
    "hit_rate_at_k",
    "ndcg_at_k",
    "mrr",
    "average_precision_at_k",
    "map_at_k",
    "auc",
    "gauc",
    "catalog_coverage",
    "evaluate_topk",
    "topk_ids",
    "metric_curve",
    "intra_list_diversity",
    "embedding_diversity",
    "novelty",
    "popularity_bias",
]


# ----------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------


def _check_k(k: Any, name: str = "k") -> int:
    """Returns `k` as an int; bools and floats are rejected to catch swapped args."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    return int(k)


def _to_text(values: np.ndarray) -> np.ndarray:
    """Casts ids to a unicode array; padding (None, "") becomes PAD."""
    values = np.asarray(values)
    if values.dtype.kind == "U":
        return values
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8")
    if values.dtype.kind == "O":
        flat = [
            PAD if v is None else v.decode("utf-8") if isinstance(v, bytes) else str(v)
            for v in values.ravel()
        ]
        return np.asarray(flat, dtype=str).reshape(values.shape)
    return values.astype(str)


def _as_id_matrix(recommended: Any) -> np.ndarray:
    """Returns `recommended` as a [users, width] unicode matrix, padding ragged rows."""
    if isinstance(recommended, np.ndarray):
        if recommended.ndim != 2:
            raise ValueError(
                f"recommended must be 2-D [users, k], got shape {recommended.shape}"
            )
        return _to_text(recommended)
    if isinstance(recommended, (str, bytes, Mapping)):
        raise ValueError("recommended must be a list of ranked id lists, one per user")
    rows = list(recommended)
    for i, row in enumerate(rows):
        # Sets and strings are iterable but have no rank order.
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)):
            raise ValueError(
                f"recommended[{i}] must be a ranked sequence of ids, got {type(row).__name__}"
            )
        if np.ndim(row) != 1 and len(row) > 0:
            raise ValueError(f"recommended[{i}] must be 1-D, got shape {np.shape(row)}")
    width = max((len(row) for row in rows), default=0)
    matrix = np.full((len(rows), width), PAD, dtype=object)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = list(row)
    return _to_text(matrix)


def _flatten_relevant(relevant: Any, num_users: int):
    """Flattens per-user relevance into (user, id, gain) arrays of positive gain."""
    if isinstance(relevant, (str, bytes, Mapping)):
        raise ValueError(
            "relevant must be a sequence aligned with recommended (one entry per user), "
            f"got {type(relevant).__name__}"
        )
    relevant = list(relevant)
    if len(relevant) != num_users:
        raise ValueError(
            f"recommended has {num_users} users but relevant has {len(relevant)}"
        )
    users: List[int] = []
    ids: List[Any] = []
    gains: List[float] = []
    for u, entry in enumerate(relevant):
        if entry is None:
            continue
        if isinstance(entry, (str, bytes)):
            # set("abc") would silently become three ids.
            raise ValueError(
                f"relevant[{u}] is a single string; wrap it in a collection, e.g. {{{entry!r}}}"
            )
        if isinstance(entry, Mapping):
            keys = list(entry.keys())
            grades = [float(g) for g in entry.values()]
        else:
            keys = list(entry)
            grades = [1.0] * len(keys)
        users.extend([u] * len(keys))
        ids.extend(keys)
        gains.extend(grades)
    user_arr = np.asarray(users, dtype=np.int64)
    gain_arr = np.asarray(gains, dtype=np.float64)
    id_arr = _to_text(np.asarray(ids, dtype=object)) if ids else np.zeros(0, dtype=str)
    if not np.all(np.isfinite(gain_arr)):
        raise ValueError("relevance grades must be finite numbers")
    if np.any(gain_arr < 0):
        raise ValueError("relevance grades must be >= 0; negative gains break NDCG")
    keep = (gain_arr > 0) & (id_arr != PAD)
    return user_arr[keep], id_arr[keep], gain_arr[keep]


@dataclasses.dataclass(frozen=True)
class _Judgement:
    """Relevance of every recommended slot, shared by all top-k metrics.

    Computing it once lets `evaluate_topk` derive every metric at every k from a
    single vectorised join of recommendations against relevance.
    """

    gains: np.ndarray  # [users, width] grade of each slot, 0 for misses/padding/repeats
    ideal: np.ndarray  # [users, depth] relevant grades sorted descending, 0 padded
    num_relevant: np.ndarray  # [users]

    @property
    def evaluated(self) -> np.ndarray:
        return self.num_relevant > 0


def _judge(recommended: Any, relevant: Any, depth: Optional[int] = None) -> _Judgement:
    """Joins the top `depth` recommendations of each user with its relevant ids.

    Args:
      recommended: Ranked ids, [users, width] (see module docstring).
      relevant: Per-user relevant ids or id -> grade mappings.
      depth: Positions to judge; None judges the whole list.
    """
    rec = _as_id_matrix(recommended)
    num_users = rec.shape[0]
    if depth is not None:
        rec = rec[:, :depth]
    rel_user, rel_ids, rel_gain = _flatten_relevant(relevant, num_users)

    # One vocabulary for both sides turns id matching into integer key matching.
    vocab, codes = np.unique(np.concatenate([rec.ravel(), rel_ids]), return_inverse=True)
    n = max(len(vocab), 1)
    rec_keys = np.arange(num_users, dtype=np.int64)[:, None] * n + codes[: rec.size].reshape(
        rec.shape
    )
    rel_keys = rel_user * n + codes[rec.size :]
    rel_keys, first = np.unique(rel_keys, return_index=True)
    rel_user, rel_gain = rel_user[first], rel_gain[first]

    # Only the first occurrence of an id in a row may score.
    _, first_slot = np.unique(rec_keys.ravel(), return_index=True)
    countable = np.zeros(rec.size, dtype=bool)
    countable[first_slot] = True
    countable = countable.reshape(rec.shape) & (rec != PAD)

    gains = np.zeros(rec.shape, dtype=np.float64)
    if rel_keys.size:
        pos = np.minimum(np.searchsorted(rel_keys, rec_keys), rel_keys.size - 1)
        found = countable & (rel_keys[pos] == rec_keys)
        gains[found] = rel_gain[pos[found]]

    num_relevant = np.bincount(rel_user, minlength=num_users)
    ideal_depth = int(num_relevant.max(initial=0))
    if depth is not None:
        ideal_depth = min(ideal_depth, depth)
    order = np.lexsort((-rel_gain, rel_user))
    sorted_user, sorted_gain = rel_user[order], rel_gain[order]
    starts = np.searchsorted(sorted_user, np.arange(num_users))
    rank = np.arange(sorted_user.size) - starts[sorted_user]
    keep = rank < ideal_depth
    ideal = np.zeros((num_users, ideal_depth), dtype=np.float64)
    ideal[sorted_user[keep], rank[keep]] = sorted_gain[keep]
    return _Judgement(gains=gains, ideal=ideal, num_relevant=num_relevant)


def _mean_over_evaluated(values: np.ndarray, judgement: _Judgement) -> float:
    mask = judgement.evaluated
    if not mask.any():
        return float("nan")
    return float(values[mask].mean())


def _discounts(width: int) -> np.ndarray:
    """1 / log2(rank + 1) for ranks 1..width."""
    return 1.0 / np.log2(np.arange(2, width + 2, dtype=np.float64))


# ----------------------------------------------------------------------------
# Metrics on a judgement (shared by the public functions and evaluate_topk)
# ----------------------------------------------------------------------------


def _recall(j: _Judgement, k: int) -> float:
    hits = (j.gains[:, :k] > 0).sum(axis=1)
    return _mean_over_evaluated(hits / np.maximum(j.num_relevant, 1), j)


def _precision(j: _Judgement, k: int) -> float:
    hits = (j.gains[:, :k] > 0).sum(axis=1)
    return _mean_over_evaluated(hits / k, j)


def _hit_rate(j: _Judgement, k: int) -> float:
    return _mean_over_evaluated((j.gains[:, :k] > 0).any(axis=1).astype(np.float64), j)


def _transform_gain(gains: np.ndarray, gain: str) -> np.ndarray:
    if gain == "linear":
        return gains
    if gain == "exponential":
        return np.exp2(gains) - 1.0
    raise ValueError(f"gain must be 'linear' or 'exponential', got {gain!r}")


def ndcg_per_list(gains: np.ndarray, ideal: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k of each list from its slot gains and its ideal (descending) gains.

    The one NDCG of the package: top-k lists, scored candidate lists and full-catalog
    search all reduce to these two matrices.

    Args:
      gains: [N, width] gain of each ranked slot (0 for misses and padding).
      ideal: [N, depth] the list's relevant gains sorted descending, 0 padded.
      k: cut-off.

    Returns:
      [N] float64; 0 where a list has no positive ideal gain.
    """
    gains, ideal = np.asarray(gains, np.float64)[:, :k], np.asarray(ideal, np.float64)[:, :k]
    dcg = gains @ _discounts(gains.shape[1])
    idcg = ideal @ _discounts(ideal.shape[1])
    return dcg / np.where(idcg > 0, idcg, 1.0)


def reciprocal_ranks(hits: np.ndarray) -> np.ndarray:
    """1 / rank of each row's first hit, 0 without one: [N, width] bool -> [N]."""
    hits = np.asarray(hits, bool)
    if hits.shape[1] == 0:
        return np.zeros(hits.shape[0])
    return np.where(hits.any(axis=1), 1.0 / (hits.argmax(axis=1) + 1.0), 0.0)


def _ndcg(j: _Judgement, k: int, gain: str = "linear") -> float:
    gains = _transform_gain(j.gains[:, :k], gain)
    ideal = _transform_gain(j.ideal[:, :k], gain)
    return _mean_over_evaluated(ndcg_per_list(gains, ideal, k), j)


def _mrr(j: _Judgement, k: Optional[int]) -> float:
    hits = j.gains[:, :k] > 0 if k is not None else j.gains > 0
    return _mean_over_evaluated(reciprocal_ranks(hits), j)


_AP_NORMALIZATIONS = ("min", "relevant")


def _average_precision(j: _Judgement, k: int, normalization: str = "min") -> np.ndarray:
    hits = (j.gains[:, :k] > 0).astype(np.float64)
    ranks = np.arange(1, hits.shape[1] + 1, dtype=np.float64)
    precision_at_hits = np.cumsum(hits, axis=1) / ranks * hits
    if normalization == "min":
        denom = np.maximum(np.minimum(j.num_relevant, k), 1)
    elif normalization == "relevant":
        denom = np.maximum(j.num_relevant, 1)
    else:
        raise ValueError(f"normalization must be one of {_AP_NORMALIZATIONS}, "
                         f"got {normalization!r}")
    return precision_at_hits.sum(axis=1) / denom


# ----------------------------------------------------------------------------
# Public top-k metrics
# ----------------------------------------------------------------------------


def recall_at_k(recommended: Any, relevant: Sequence[Relevant], k: int) -> float:
    """Mean fraction of each user's relevant items found in the top k.

    The quantity retrieval stages optimise: a later ranker can only reorder what
    retrieval returned. Users with no relevant items are excluded (NaN if none left).

    Args:
      recommended: Ranked ids per user, [users, width].
      relevant: Relevant ids (or id -> grade) per user.
      k: Cut-off, >= 1; lists shorter than k are judged as they are.
    """
    k = _check_k(k)
    return _recall(_judge(recommended, relevant, k), k)


def precision_at_k(recommended: Any, relevant: Sequence[Relevant], k: int) -> float:
    """Mean fraction of the top k slots that hold a relevant item.

    The denominator is always k, so short or padded lists are penalised for the
    slots they failed to fill (same as Microsoft Recommenders).

    Args:
      recommended: Ranked ids per user, [users, width].
      relevant: Relevant ids (or id -> grade) per user.
      k: Cut-off, >= 1.
    """
    k = _check_k(k)
    return _precision(_judge(recommended, relevant, k), k)


def hit_rate_at_k(recommended: Any, relevant: Sequence[Relevant], k: int) -> float:
    """Fraction of users with at least one relevant item in the top k.

    Robust to users with many relevant items, where recall@k is capped by k.

    Args:
      recommended: Ranked ids per user, [users, width].
      relevant: Relevant ids (or id -> grade) per user.
      k: Cut-off, >= 1.
    """
    k = _check_k(k)
    return _hit_rate(_judge(recommended, relevant, k), k)


def ndcg_at_k(
    recommended: Any, relevant: Sequence[Relevant], k: int, gain: str = "linear"
) -> float:
    """Normalised discounted cumulative gain of the top k.

    DCG = sum(gain / log2(rank + 1)); the ideal DCG ranks the user's own gains in
    decreasing order, so 1.0 means no reordering could do better. Binary relevance
    uses gain 1; a mapping id -> grade gives graded NDCG.

    Args:
      recommended: Ranked ids per user, [users, width].
      relevant: Relevant ids per user, or mappings id -> grade (>= 0).
      k: Cut-off, >= 1.
      gain: "linear" uses the grade, "exponential" uses 2**grade - 1 (rewards
        getting the best items on top more strongly).
    """
    k = _check_k(k)
    _transform_gain(np.zeros(0), gain)  # validate before the join
    return _ndcg(_judge(recommended, relevant, k), k, gain)


def mrr(recommended: Any, relevant: Sequence[Relevant], k: Optional[int] = None) -> float:
    """Mean reciprocal rank of the first relevant item (0 when none is found).

    Matches search use, where the user mostly looks for one good result.

    Args:
      recommended: Ranked ids per user, [users, width].
      relevant: Relevant ids (or id -> grade) per user.
      k: Optional cut-off; None uses the whole list.
    """
    if k is not None:
        k = _check_k(k)
    return _mrr(_judge(recommended, relevant, k), k)


def average_precision_at_k(
    recommended: Sequence[Any], relevant: Relevant, k: int
) -> float:
    """Average precision of one ranked list, normalised by min(|relevant|, k).

    Normalising by min(|relevant|, k) (Microsoft Recommenders' convention) lets a
    perfect top k reach 1.0 even when the user has more than k relevant items.

    Args:
      recommended: One ranked id list.
      relevant: That user's relevant ids (or id -> grade).
      k: Cut-off, >= 1. Returns NaN when `relevant` is empty.
    """
    k = _check_k(k)
    if isinstance(recommended, (str, bytes)) or np.ndim(recommended) != 1:
        raise ValueError("average_precision_at_k takes one ranked list; use map_at_k for many")
    j = _judge([list(recommended)], [relevant], k)
    return _mean_over_evaluated(_average_precision(j, k), j)


def map_at_k(
    recommended: Any, relevant: Sequence[Relevant], k: int, normalization: str = "min"
) -> float:
    """Mean over users of `average_precision_at_k` (normalised by min(|rel|, k)).

    Published Microsoft Recommenders tables (before v1.2) divide by |rel| instead,
    which caps users with many relevant items far below 1; "relevant" reproduces them.

    Args:
      recommended: Ranked ids per user, [users, width].
      relevant: Relevant ids (or id -> grade) per user.
      k: Cut-off, >= 1.
      normalization: "min" (min(|rel|, k)) or "relevant" (|rel|).
    """
    k = _check_k(k)
    if normalization not in _AP_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_AP_NORMALIZATIONS}, "
                         f"got {normalization!r}")
    j = _judge(recommended, relevant, k)
    return _mean_over_evaluated(_average_precision(j, k, normalization), j)


def catalog_coverage(recommended: Any, catalog_size: int, k: Optional[int] = None) -> float:
    """Fraction of the catalog that appears in at least one top-k list.

    Accuracy metrics reward recommending the same bestsellers to everyone; coverage
    exposes that collapse.

    Args:
      recommended: Ranked ids per user, [users, width]; padding is ignored.
      catalog_size: Number of items that could have been recommended, >= 1.
      k: Optional cut-off; None uses the whole lists.
    """
    catalog_size = _check_k(catalog_size, "catalog_size")
    rec = _as_id_matrix(recommended)
    if k is not None:
        rec = rec[:, : _check_k(k)]
    distinct = np.unique(rec[rec != PAD]).size
    if distinct > catalog_size:
        raise ValueError(
            f"recommended holds {distinct} distinct items, more than catalog_size={catalog_size}"
        )
    return distinct / catalog_size


def evaluate_topk(
    recommended: Any, relevant: Sequence[Relevant], ks: Iterable[int] = (10, 100)
) -> Dict[str, float]:
    """All top-k metrics at every cut-off from a single relevance join.

    Returns keys "recall@k", "precision@k", "hit_rate@k", "ndcg@k", "map@k" for each
    k, "mrr" over the whole lists and "users", the number of users evaluated (those
    with at least one relevant item).

    Args:
      recommended: Ranked ids per user, [users, width].
      relevant: Relevant ids (or id -> grade) per user.
      ks: Cut-offs, each >= 1.
    """
    ks = [_check_k(k, "ks entries") for k in ks]
    if not ks:
        raise ValueError("ks must contain at least one cut-off")
    recommended = _as_id_matrix(recommended)  # once; _judge passes text matrices through
    j = _judge(recommended, relevant, max(max(ks), recommended.shape[1]))
    results: Dict[str, float] = {}
    for k in sorted(set(ks)):
        results[f"recall@{k}"] = _recall(j, k)
        results[f"precision@{k}"] = _precision(j, k)
        results[f"hit_rate@{k}"] = _hit_rate(j, k)
        results[f"ndcg@{k}"] = _ndcg(j, k)
        results[f"map@{k}"] = _mean_over_evaluated(_average_precision(j, k), j)
    results["mrr"] = _mrr(j, None)
    results["users"] = int(j.evaluated.sum())
    return results


# ----------------------------------------------------------------------------
# Score-based metrics
# ----------------------------------------------------------------------------


def _check_labels_scores(labels: Any, scores: Any) -> tuple:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D, got shapes {labels.shape} and {scores.shape}"
        )
    if labels.shape != scores.shape:
        raise ValueError(f"labels has {labels.size} entries but scores has {scores.size}")
    if labels.size == 0:
        raise ValueError("labels and scores are empty")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be binary (0/1 or bool)")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return labels.astype(np.float64), scores


def _grouped_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray, num_groups: int):
    """Per-group rank AUC (Mann-Whitney U); tied scores get their average rank.

    Average ranks make each tied positive/negative pair count 0.5, and sorting once
    by (group, score) gives every group's AUC without a Python loop.
    """
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order]
    new_tie = np.ones(g.size, dtype=bool)
    new_tie[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    tie_id = np.cumsum(new_tie) - 1
    group_start = np.searchsorted(g, np.arange(num_groups))
    rank = np.arange(g.size) - group_start[g] + 1.0
    avg_rank = (np.bincount(tie_id, weights=rank) / np.bincount(tie_id))[tie_id]
    count = np.bincount(g, minlength=num_groups).astype(np.float64)
    n_pos = np.bincount(g, weights=y, minlength=num_groups)
    n_neg = count - n_pos
    pos_rank_sum = np.bincount(g, weights=avg_rank * y, minlength=num_groups)
    valid = (n_pos > 0) & (n_neg > 0)
    values = np.full(num_groups, np.nan)
    values[valid] = (pos_rank_sum[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2) / (
        n_pos[valid] * n_neg[valid]
    )
    return values, count, valid


def auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve: P(random positive outscores random negative).

    Rank-based, so O(n log n) and exact for ties, which count as 0.5.

    Args:
      labels: Binary labels [n].
      scores: Real scores [n]; higher means more likely positive.
    """
    labels, scores = _check_labels_scores(labels, scores)
    values, _, valid = _grouped_auc(np.zeros(labels.size, dtype=np.int64), labels, scores, 1)
    if not valid[0]:
        raise ValueError("auc needs both positive and negative labels")
    return float(values[0])


def gauc(user_ids: Any, labels: Any, scores: Any) -> float:
    """Group AUC: per-user AUC averaged with weights = the user's number of examples.

    Global AUC also rewards separating active from inactive users; GAUC only
    measures ranking within a user, which is what a personalised ranker controls.
    Users whose examples are all positive or all negative are skipped.

    Args:
      user_ids: User of each example [n].
      labels: Binary labels [n].
      scores: Real scores [n].
    """
    labels, scores = _check_labels_scores(labels, scores)
    user_ids = np.asarray(user_ids)
    if user_ids.shape != labels.shape:
        raise ValueError(
            f"user_ids has {user_ids.size} entries but labels has {labels.size}"
        )
    _, groups = np.unique(_to_text(user_ids), return_inverse=True)
    num_groups = int(groups.max()) + 1
    values, count, valid = _grouped_auc(groups.astype(np.int64), labels, scores, num_groups)
    if not valid.any():
        raise ValueError("gauc needs at least one user with both positive and negative labels")
    return float(np.average(values[valid], weights=count[valid]))


# ----------------------------------------------------------------------------
# Scores -> ranked ids
# ----------------------------------------------------------------------------


# Rows per block in topk_ids are chosen so a float64 block stays ~8 MB: copying and
# partitioning cache-sized blocks is several times faster than whole-matrix passes.
_TOPK_BLOCK_ELEMENTS = 1 << 20


def _select_top(block: np.ndarray, k: int) -> np.ndarray:
    """Unordered column indices of the k largest scores per row, ties to lower columns.

    argpartition's pick among scores tied with the k-th largest is arbitrary, so
    only the rows where such a tie straddles the cut are re-selected exactly.
    """
    num_items = block.shape[1]
    sel = np.argpartition(block, num_items - k, axis=1)[:, num_items - k :]
    sel_scores = np.take_along_axis(block, sel, axis=1)
    kth = sel_scores.min(axis=1, keepdims=True)
    straddling = np.nonzero((block == kth).sum(axis=1) > (sel_scores == kth).sum(axis=1))[0]
    if straddling.size:
        sub, sub_kth = block[straddling], kth[straddling]
        above = sub > sub_kth
        tied = sub == sub_kth
        room = k - above.sum(axis=1, keepdims=True)
        chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
        sel[straddling] = np.nonzero(chosen)[1].reshape(-1, k)
    return sel


def topk_ids(
    scores: np.ndarray,
    item_ids: np.ndarray,
    k: int,
    exclude: Optional[Sequence[Set[int]]] = None,
    pad: Any = PAD,
) -> np.ndarray:
    """Top-k item ids per row of a score matrix, best first (ties: lower column).

    A partition selects in O(N) per row before sorting only k entries; excluded
    columns (e.g. items already bought) are scored -inf, and if a row has fewer
    than k admissible items the remaining slots hold `pad` instead of excluded ids.

    Args:
      scores: [users, items] scores; never modified.
      item_ids: [items] id of each column.
      k: Ids per row, >= 1; capped at the number of items.
      exclude: Optional per-row sets of column indices to skip.
      pad: Filler for rows that run out of admissible items (numeric ids are cast
        to object to hold it).
    """
    k = _check_k(k)
    scores = np.asarray(scores)
    item_ids = np.asarray(item_ids)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [users, items], got shape {scores.shape}")
    if scores.dtype.kind not in "biuf":
        raise ValueError(f"scores must be numeric, got dtype {scores.dtype}")
    if item_ids.ndim != 1 or item_ids.size != scores.shape[1]:
        raise ValueError(
            f"item_ids must be 1-D with {scores.shape[1]} entries (one per score column), "
            f"got shape {item_ids.shape}"
        )
    num_users, num_items = scores.shape
    k = min(k, num_items)
    if k == 0:
        return item_ids[np.zeros((num_users, 0), dtype=np.int64)]

    rows = cols = None
    if exclude is not None:
        if len(exclude) != num_users:
            raise ValueError(f"exclude has {len(exclude)} rows but scores has {num_users}")
        lengths = [len(columns) for columns in exclude]
        cols = np.fromiter(
            itertools.chain.from_iterable(exclude), dtype=np.int64, count=sum(lengths)
        )
        if cols.size and (cols.min() < 0 or cols.max() >= num_items):
            raise ValueError(f"exclude holds column indices outside [0, {num_items})")
        rows = np.repeat(np.arange(num_users), lengths)  # sorted, so blocks are slices

    top = np.empty((num_users, k), dtype=np.int64)
    padded = np.zeros((num_users, k), dtype=bool)
    block_rows = max(1, _TOPK_BLOCK_ELEMENTS // num_items)
    for start in range(0, num_users, block_rows):
        stop = min(num_users, start + block_rows)
        block = scores[start:stop].astype(np.float64, copy=True)
        if np.isnan(block).any():
            raise ValueError("scores contain NaN")
        excluded = None
        if rows is not None:
            lo, hi = np.searchsorted(rows, [start, stop])
            if hi > lo:
                excluded = np.zeros(block.shape, dtype=bool)
                excluded[rows[lo:hi] - start, cols[lo:hi]] = True
                block[excluded] = -np.inf
        if k < num_items:
            sel = _select_top(block, k)
        else:
            sel = np.broadcast_to(np.arange(num_items), block.shape)
        sel_scores = np.take_along_axis(block, sel, axis=1)
        sel = np.take_along_axis(sel, np.lexsort((sel, -sel_scores), axis=1), axis=1)
        top[start:stop] = sel
        if excluded is not None:
            padded[start:stop] = np.take_along_axis(excluded, sel, axis=1)

    result = item_ids[top]
    if padded.any():
        if result.dtype.kind not in "USO":
            result = result.astype(object)
        result[padded] = pad
    return result


# ----------------------------------------------------------------------------
# Curves over k
# ----------------------------------------------------------------------------

_CURVE_METRICS = ("recall", "precision", "hit_rate", "ndcg")


def metric_curve(
    recommended: Any, relevant: Sequence[Relevant], metric: str = "recall",
    max_k: Optional[int] = None,
) -> np.ndarray:
    """A top-k metric at every cut-off k = 1..max_k from one relevance join.

    Curves show where a model overtakes a baseline (e.g. popularity wins at k=1 but
    loses at k=50), which a single cut-off hides.

    Args:
      recommended: Ranked ids per user, [users, width].
      relevant: Relevant ids (or id -> grade) per user.
      metric: "recall", "precision", "hit_rate" or "ndcg" (linear gain).
      max_k: Last cut-off; default the list width.

    Returns:
      float64 array of length max_k; entry k-1 is the metric at k (NaN when no user
      has a relevant item).
    """
    if metric not in _CURVE_METRICS:
        raise ValueError(f"metric must be one of {_CURVE_METRICS}, got {metric!r}")
    rec = _as_id_matrix(recommended)
    max_k = _check_k(max_k, "max_k") if max_k is not None else max(rec.shape[1], 1)
    j = _judge(rec, relevant, max_k)
    mask = j.evaluated
    if not mask.any():
        return np.full(max_k, np.nan)
    width = j.gains.shape[1]
    gains = np.zeros((j.gains.shape[0], max_k))
    gains[:, :width] = j.gains
    hits = gains[mask] > 0
    ks = np.arange(1, max_k + 1, dtype=np.float64)
    if metric == "recall":
        values = np.cumsum(hits, axis=1) / j.num_relevant[mask][:, None]
    elif metric == "precision":
        values = np.cumsum(hits, axis=1) / ks
    elif metric == "hit_rate":
        values = np.maximum.accumulate(hits, axis=1).astype(np.float64)
    else:
        discounts = _discounts(max_k)
        ideal = np.zeros((int(mask.sum()), max_k))
        depth = min(j.ideal.shape[1], max_k)
        ideal[:, :depth] = j.ideal[mask][:, :depth]
        dcg = np.cumsum(gains[mask] * discounts, axis=1)
        idcg = np.cumsum(ideal * discounts, axis=1)
        values = dcg / np.where(idcg > 0, idcg, 1.0)
    return values.mean(axis=0)


# ----------------------------------------------------------------------------
# Beyond accuracy: diversity, novelty, popularity bias
# ----------------------------------------------------------------------------

# Users processed together by the pairwise metrics: bounds the [users, k, k] blocks.
_PAIR_BLOCK = 512


def _list_codes(recommended: Any, ids: np.ndarray, k: Optional[int]) -> np.ndarray:
    """[users, k] row index of each recommended id in `ids`; -1 for padding/unknown."""
    rec = _as_id_matrix(recommended)
    if k is not None:
        rec = rec[:, : _check_k(k)]
    vocab = _to_text(np.asarray(ids, dtype=object))
    order = np.argsort(vocab, kind="stable")
    sorted_vocab = vocab[order]
    flat = rec.ravel()
    pos = np.searchsorted(sorted_vocab, flat)
    pos = np.minimum(pos, max(sorted_vocab.size - 1, 0))
    found = (sorted_vocab.size > 0) & (flat != PAD)
    if sorted_vocab.size:
        found &= sorted_vocab[pos] == flat
    codes = np.where(found, order[pos] if sorted_vocab.size else -1, -1)
    return codes.reshape(rec.shape)


def _mean_pairwise(codes: np.ndarray, similarity_block) -> float:
    """Mean over lists of the mean (1 - similarity) over pairs of known items.

    Args:
      codes: [users, k] item rows (-1 = unknown, left out of the pairs).
      similarity_block: codes block [b, k] (>= 0) -> [b, k, k] pairwise similarity.
    """
    width = codes.shape[1]
    upper = np.triu(np.ones((width, width), dtype=bool), 1)
    per_list: List[np.ndarray] = []
    for start in range(0, codes.shape[0], _PAIR_BLOCK):
        block = codes[start:start + _PAIR_BLOCK]
        known = block >= 0
        sim = similarity_block(np.where(known, block, 0))
        pairs = known[:, :, None] & known[:, None, :] & upper
        count = pairs.sum(axis=(1, 2))
        distance = np.where(pairs, 1.0 - sim, 0.0).sum(axis=(1, 2))
        per_list.append(np.where(count > 0, distance / np.maximum(count, 1), np.nan))
    values = np.concatenate(per_list) if per_list else np.zeros(0)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def intra_list_diversity(
    recommended: Any, item_labels: Mapping[Any, Any], k: Optional[int] = None
) -> float:
    """Mean pairwise label distance inside each list (1 - Jaccard of the label sets).

    Ten near-identical items waste a slate even when all are relevant; with one
    category per item this is the share of pairs from different categories.

    Args:
      recommended: Ranked ids per user, [users, width].
      item_labels: item id -> a label (e.g. category string) or a collection of
        labels (e.g. genres). Items missing from it are left out of the pairs.
      k: Optional cut-off.

    Returns:
      Mean over lists with at least two known items, in [0, 1]; NaN if none.
    """
    if not isinstance(item_labels, Mapping):
        raise ValueError("item_labels must be a mapping item id -> label(s)")
    ids = np.asarray(list(item_labels.keys()), dtype=object)
    label_sets = [
        {value} if isinstance(value, (str, bytes)) or not isinstance(value, Iterable)
        else set(value)
        for value in item_labels.values()
    ]
    vocab = {label: i for i, label in enumerate(sorted({str(l) for s in label_sets for l in s}))}
    matrix = np.zeros((len(ids), max(len(vocab), 1)), dtype=np.float64)
    for row, labels in enumerate(label_sets):
        matrix[row, [vocab[str(l)] for l in labels]] = 1.0
    sizes = matrix.sum(axis=1)

    def jaccard(block: np.ndarray) -> np.ndarray:
        x = matrix[block]
        inter = np.einsum("uil,ujl->uij", x, x)
        union = sizes[block][:, :, None] + sizes[block][:, None, :] - inter
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 1.0)

    return _mean_pairwise(_list_codes(recommended, ids, k), jaccard)


def embedding_diversity(
    recommended: Any, item_ids: Sequence[Any], embeddings: np.ndarray, k: Optional[int] = None
) -> float:
    """Mean pairwise cosine distance (1 - cosine) of the items inside each list.

    Uses the model's own geometry, so it works without any catalogue taxonomy.

    Args:
      recommended: Ranked ids per user, [users, width].
      item_ids: [N] id of each embedding row.
      embeddings: [N, D] item embeddings (normalised here; zero rows count as
        orthogonal to everything).
      k: Optional cut-off.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(item_ids):
        raise ValueError(f"embeddings must be [len(item_ids)={len(item_ids)}, D], got "
                         f"shape {emb.shape}")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = emb / np.where(norms > 0, norms, 1.0)

    def cosine(block: np.ndarray) -> np.ndarray:
        x = unit[block]
        return np.einsum("uid,ujd->uij", x, x)

    return _mean_pairwise(_list_codes(recommended, np.asarray(item_ids, dtype=object), k), cosine)


def _counts_lookup(recommended: Any, item_counts: Mapping[Any, float], k: Optional[int]):
    if not isinstance(item_counts, Mapping) and not hasattr(item_counts, "items"):
        raise ValueError("item_counts must be a mapping item id -> interaction count")
    ids = np.asarray(list(item_counts.keys()), dtype=object)
    counts = np.asarray(list(item_counts.values()), dtype=np.float64)
    if counts.size and (np.any(counts < 0) or not np.all(np.isfinite(counts))):
        raise ValueError("item_counts must be finite and >= 0")
    rec = _as_id_matrix(recommended)
    if k is not None:
        rec = rec[:, : _check_k(k)]
    codes = _list_codes(rec, ids, None)
    return rec, codes, counts


def _mean_per_list(values: np.ndarray, present: np.ndarray) -> float:
    """Mean over lists (with >= 1 present slot) of the mean value of their slots."""
    count = present.sum(axis=1)
    total = np.where(present, values, 0.0).sum(axis=1)
    keep = count > 0
    return float((total[keep] / count[keep]).mean()) if keep.any() else float("nan")


def novelty(
    recommended: Any, item_counts: Mapping[Any, float], num_users: int, k: Optional[int] = None
) -> float:
    """Mean self-information -log2 p(i) of recommended items, p(i) = users(i) / num_users.

    High novelty means the system surfaces items few people already know; items
    absent from `item_counts` count as seen by one user (the rarest possible).

    Args:
      recommended: Ranked ids per user, [users, width]; padding is skipped.
      item_counts: item id -> number of users who interacted with it (training data).
      num_users: users in that data, >= 1.
      k: Optional cut-off.
    """
    num_users = _check_k(num_users, "num_users")
    rec, codes, counts = _counts_lookup(recommended, item_counts, k)
    users = np.where(codes >= 0, counts[np.maximum(codes, 0)] if counts.size else 0.0, 0.0)
    p = np.minimum(np.maximum(users, 1.0) / num_users, 1.0)
    return _mean_per_list(-np.log2(p), rec != PAD)


def popularity_bias(
    recommended: Any, item_counts: Mapping[Any, float], k: Optional[int] = None
) -> Dict[str, float]:
    """How much recommendations lean on already-popular items.

    Returns "arp" (average recommendation popularity: mean interaction count of the
    recommended items) and "popularity_percentile" (mean percentile of their count
    among all items of `item_counts`, ties averaged: 1.0 = the most popular item,
    0 for items absent from it), each averaged per list then over lists.

    Args:
      recommended: Ranked ids per user, [users, width]; padding is skipped.
      item_counts: item id -> interaction count over the catalogue (zeros included).
      k: Optional cut-off.
    """
    rec, codes, counts = _counts_lookup(recommended, item_counts, k)
    present = rec != PAD
    if counts.size:
        order = np.argsort(counts, kind="stable")
        sorted_counts = counts[order]
        below = np.searchsorted(sorted_counts, counts, side="left")
        upto = np.searchsorted(sorted_counts, counts, side="right")
        percentile = (below + upto + 1) / 2.0 / counts.size  # average rank / n
        item_count = np.where(codes >= 0, counts[np.maximum(codes, 0)], 0.0)
        item_pct = np.where(codes >= 0, percentile[np.maximum(codes, 0)], 0.0)
    else:
        item_count = item_pct = np.zeros(rec.shape)
    return {"arp": _mean_per_list(item_count, present),
            "popularity_percentile": _mean_per_list(item_pct, present)}


def _scored_order(scores: np.ndarray, labels: np.ndarray):
    """Labels of fixed lists re-ordered by descending score (padding last, stable)."""
    valid = labels >= 0
    order = np.argsort(-np.where(valid, scores, -np.inf), axis=1, kind="stable")
    ranked = np.take_along_axis(np.where(valid, labels, 0.0), order, axis=1)
    has_positive = (np.where(valid, labels, 0.0) > 0).any(axis=1)
    return ranked, has_positive


def ndcg_of_scored_lists(scores: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k of fixed candidate lists ordered by `scores`.

    Rankers re-order given lists (e.g. a session's impressions); labels < 0 mark padding
    and lists without a positive label are skipped, as in `ndcg_at_k`.

    Args:
      scores: [N, L] model scores.
      labels: [N, L] graded or binary labels, -1 for padding.
      k: cut-off.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    ranked, evaluated = _scored_order(scores, labels)
    if not evaluated.any():
        return float("nan")
    gains = np.maximum(ranked, 0.0)
    ideal = -np.sort(-gains, axis=1)
    return float(ndcg_per_list(gains, ideal, k)[evaluated].mean())


def scored_list_metrics(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (10,),
                        groups: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Ranking metrics of fixed candidate lists: NDCG@k, MRR, and AUC/GAUC for 0/1 labels.

    One function for the ranker's TensorBoard metrics, its bench and its tests, so every
    report of "ranker quality" means the same thing.

    Args:
      scores: [N, L] model scores.
      labels: [N, L] graded or binary labels, -1 for padding.
      ks: NDCG cut-offs.
      groups: [N] group (user) of each list for GAUC; default one group per list.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be equal [N, L]")
    out = {f"ndcg@{k}": ndcg_of_scored_lists(scores, labels, k) for k in ks}
    valid = labels >= 0
    ranked, evaluated = _scored_order(scores, labels)
    out["mrr"] = float(reciprocal_ranks(ranked > 0)[evaluated].mean()) if evaluated.any() else 0.0
    flat_labels = labels[valid]
    if np.isin(flat_labels, (0.0, 1.0)).all() and 0 < flat_labels.sum() < flat_labels.size:
        out["auc"] = auc(flat_labels, scores[valid])
        rows = np.arange(len(labels)) if groups is None else np.asarray(groups)
        out["gauc"] = gauc(np.broadcast_to(rows[:, None], labels.shape)[valid], flat_labels,
                           scores[valid])
    return out
