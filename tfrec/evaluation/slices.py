"""Metrics per slice of users or targets: activity buckets, new users, new items.

An average hides who the model fails: a system can win overall while being worse
than popularity for new users; every slice runs the same `evaluate_topk`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Optional, Sequence

import numpy as np

from tfrec.metrics.ranking import _as_id_matrix, _to_text, evaluate_topk

__all__ = ["Slice", "activity_slices", "cold_start_slices", "evaluate_slices"]

DEFAULT_ACTIVITY_EDGES = (1, 5, 20, 50, 100)


@dataclass(frozen=True)
class Slice:
    """A subset of evaluated users, with (possibly filtered) targets.

    Args:
      name: label shown in tables and plots.
      rows: indices of the slice's users in the full evaluation arrays.
      relevant: targets of those users, aligned with `rows`.
    """

    name: str
    rows: np.ndarray
    relevant: List[Any]

    def __len__(self) -> int:
        return len(self.rows)


def _bucket_names(edges: Sequence[int]) -> List[str]:
    names = [] if edges[0] == 0 else ["0"] if edges[0] == 1 else [f"0-{edges[0] - 1}"]
    for lo, hi in zip(edges[:-1], edges[1:]):
        names.append(f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}")
    names.append(f"{edges[-1]}+")
    return names


def activity_slices(activity: Sequence[float], relevant: Sequence[Any],
                    edges: Sequence[int] = DEFAULT_ACTIVITY_EDGES) -> List[Slice]:
    """Users bucketed by their number of past interactions (e.g. "0" is cold).

    Args:
      activity: per user, interactions before the evaluation period.
      relevant: per user targets (aligned with `activity`).
      edges: increasing bucket lower bounds; (1, 5, 20) gives "0", "1-4", "5-19",
        "20+". Empty buckets are omitted.
    """
    edges = [int(e) for e in edges]
    if not edges or any(b <= a for a, b in zip(edges[:-1], edges[1:])) or edges[0] < 0:
        raise ValueError(f"edges must be increasing non-negative integers, got {edges}")
    activity = np.asarray(activity, dtype=np.float64)
    if activity.ndim != 1 or len(activity) != len(relevant):
        raise ValueError(f"activity has {activity.size} entries but relevant has "
                         f"{len(relevant)}")
    names = _bucket_names(edges)
    bucket = np.searchsorted(np.asarray(edges), activity, side="right")
    if edges[0] == 0:
        bucket = bucket - 1
    relevant = list(relevant)
    out = []
    for index, name in enumerate(names):
        rows = np.flatnonzero(bucket == index)
        if rows.size:
            out.append(Slice(name, rows, [relevant[r] for r in rows]))
    return out


def _id_set(values: Optional[Collection[Any]]) -> set:
    if values is None:
        return set()
    return set(_to_text(np.asarray(list(values), dtype=object)).tolist())


def cold_start_slices(user_ids: Sequence[Any], relevant: Sequence[Any],
                      known_users: Collection[Any], known_items: Collection[Any]) -> List[Slice]:
    """All / new users / returning users / new-item targets / known-item targets.

    "New users" have no training interactions; "new items" keeps, for every user, only
    targets that never appeared in training (users without such targets drop out, as
    in every top-k metric), which measures whether cold items can be found at all.

    Args:
      user_ids: evaluated users.
      relevant: per user targets (ids, or id -> grade mappings).
      known_users: users seen in training.
      known_items: items seen in training.
    """
    if len(user_ids) != len(relevant):
        raise ValueError(f"user_ids has {len(user_ids)} entries but relevant has "
                         f"{len(relevant)}")
    users = _to_text(np.asarray(list(user_ids), dtype=object))
    seen_users, seen_items = _id_set(known_users), _id_set(known_items)
    relevant = list(relevant)
    new_user = np.fromiter((u not in seen_users for u in users), dtype=bool, count=len(users))

    def keep(items: Any, new: bool) -> Any:
        if isinstance(items, dict):
            return {i: g for i, g in items.items() if (str(i) not in seen_items) == new}
        return [i for i in items if (str(i) not in seen_items) == new]

    all_rows = np.arange(len(users))
    slices = [Slice("all", all_rows, relevant),
              Slice("new users", np.flatnonzero(new_user),
                    [relevant[r] for r in np.flatnonzero(new_user)]),
              Slice("returning users", np.flatnonzero(~new_user),
                    [relevant[r] for r in np.flatnonzero(~new_user)]),
              Slice("new items", all_rows, [keep(r, True) for r in relevant]),
              Slice("known items", all_rows, [keep(r, False) for r in relevant])]
    return slices


def evaluate_slices(recommended: Any, slices: Sequence[Slice],
                    ks: Sequence[int] = (10,)) -> Dict[str, Dict[str, float]]:
    """`evaluate_topk` on each slice; a slice without evaluable users gets {"users": 0}.

    Args:
      recommended: ranked ids of all evaluated users, [users, width].
      slices: from `activity_slices`, `cold_start_slices` or hand-made.
      ks: cut-offs.
    """
    rec = _as_id_matrix(recommended)
    out: Dict[str, Dict[str, float]] = {}
    for piece in slices:
        if len(piece.rows) and int(np.max(piece.rows)) >= rec.shape[0]:
            raise ValueError(f"slice {piece.name!r} refers to row {int(np.max(piece.rows))} "
                             f"but recommended has {rec.shape[0]} rows")
        has_targets = any(len(r) > 0 for r in piece.relevant if r is not None)
        if not len(piece.rows) or not has_targets:
            out[piece.name] = {"users": 0}
            continue
        out[piece.name] = evaluate_topk(rec[piece.rows], piece.relevant, ks=ks)
    return out
