"""From an event log to retrieval examples, user states and evaluation targets.

Each positive interaction (click, add to cart, purchase) becomes one example whose
query side is what the system knew *just before* it: the user's earlier positives,
the session's search text, device and hour. Nothing at or after its time leaks in.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set

import numpy as np
import pandas as pd

from tfrec.data.feature_spec import FeatureSpec, default_spec
from tfrec.data.schema import POSITIVE_EVENT_WEIGHTS
from tfrec.data.split import TimeSplit

UNSEEN_ITEM_COUNT = 0.5  # pseudo-count of items without training positives


def hour_of_day(ts) -> np.ndarray:
    """UTC hour (0-23) of unix seconds."""
    return (np.asarray(ts, dtype=np.int64) // 3600) % 24


def positive_interactions(events: pd.DataFrame) -> pd.DataFrame:
    """Collapses click/cart/purchase events to one row per (user, session, item).

    A purchase is usually preceded by a click and a cart add of the same item;
    counting all three would triple the example, so the deepest funnel stage sets
    the weight and the first positive sets the time.

    Args:
      events: validated events table.

    Returns:
      DataFrame(user_id, session_id, item_id, ts, weight, query, device) sorted by
      ts (then user, session, item). `query` is the session's search text, "" when
      browsing; `device` is that of the first positive.
    """
    is_positive = events["event_type"].isin(list(POSITIVE_EVENT_WEIGHTS)) & \
        (events["item_id"] != "")
    keys = ["user_id", "session_id", "item_id"]
    pos = events.loc[is_positive, keys + ["ts", "event_type", "device"]]
    pos = pos.assign(weight=pos["event_type"].map(POSITIVE_EVENT_WEIGHTS).astype(np.float32))
    # Every tie is broken by value, not by row order, so tables read in parallel (the
    # Beam engine) give the same examples.
    pos = pos.sort_values(["ts", "device", "event_type"], kind="stable")
    grouped = pos.groupby(keys, sort=False).agg(
        ts=("ts", "min"), weight=("weight", "max"), device=("device", "first")).reset_index()

    # The session query may sit on the search event only, not on the clicks.
    searched = events.loc[events["query"] != "", ["user_id", "session_id", "query", "ts"]]
    session_query = searched.sort_values(["ts", "query"], kind="stable").drop_duplicates(
        ["user_id", "session_id"])[["user_id", "session_id", "query"]]
    out = grouped.merge(session_query, on=["user_id", "session_id"], how="left")
    out["query"] = out["query"].astype(object).where(out["query"].notna(), "")
    out = out.sort_values(["ts", "user_id", "session_id", "item_id"], kind="stable")
    columns = ["user_id", "session_id", "item_id", "ts", "weight", "query", "device"]
    return out[columns].reset_index(drop=True)


def candidate_probabilities(positives: pd.DataFrame, catalog: pd.DataFrame,
                            before_ts: Optional[int] = None) -> pd.Series:
    """Share of each catalog item among (training) positives: its in-batch sampling rate.

    Models subtract log(candidate_prob) from logits (logQ correction) so popular
    items are not over-penalised as in-batch negatives; computing it on training
    positives only keeps validation and test from leaking into training.

    Args:
      positives: output of `positive_interactions`.
      catalog: validated catalog; every item gets a probability.
      before_ts: count positives with ts < before_ts only (None: all).

    Returns:
      float64 Series indexed by item_id, summing to 1; items without positives get
      the pseudo-count UNSEEN_ITEM_COUNT instead of 0.
    """
    if before_ts is not None:
        positives = positives[positives["ts"] < before_ts]
    counts = positives["item_id"].value_counts()
    counts = counts.reindex(catalog["item_id"].to_numpy(), fill_value=0).astype(np.float64)
    counts = counts.clip(lower=UNSEEN_ITEM_COUNT)
    return counts / counts.sum()


def histories_before(users: np.ndarray, items: np.ndarray, ts: np.ndarray,
                     query_users: np.ndarray, query_ts: np.ndarray,
                     history_length: int) -> List[List[str]]:
    """Items each query user interacted with strictly before each query time.

    Args:
      users, items, ts: positives sorted by (user, ts).
      query_users, query_ts: where to read the history.

    Returns:
      Per query, up to history_length item ids, most recent first.
    """
    starts = {}
    if len(users):
        change = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1], [True]]))
        for a, b in zip(change[:-1], change[1:]):
            starts[users[a]] = (a, b)
    out: List[List[str]] = []
    for user, t in zip(query_users, query_ts):
        span = starts.get(user)
        if span is None:
            out.append([])
            continue
        a, b = span
        end = a + int(np.searchsorted(ts[a:b], t, side="left"))  # strictly before t
        out.append(items[max(a, end - history_length):end][::-1].tolist())
    return out


def user_examples(events: pd.DataFrame, history_length: int = 20) -> pd.DataFrame:
    """The query side of every positive interaction: history, session query, device, hour.

    Everything here is computed within one user, so any partition of the events by
    user (the Beam engine's buckets) gives the same rows as the whole table.

    Args:
      events: validated events (of whole users).
      history_length: maximum history items (most recent first).

    Returns:
      `positive_interactions` columns plus `history` (lists of item ids) and `hour`.
    """
    if history_length < 1:
        raise ValueError(f"history_length must be >= 1, got {history_length}")
    positives = positive_interactions(events)
    by_user = positives.sort_values(["user_id", "ts"], kind="stable")
    history = histories_before(by_user["user_id"].to_numpy(), by_user["item_id"].to_numpy(),
                               by_user["ts"].to_numpy(), positives["user_id"].to_numpy(),
                               positives["ts"].to_numpy(), history_length)
    return positives.assign(history=pd.Series(history, index=positives.index, dtype=object),
                            hour=hour_of_day(positives["ts"]))


def with_items(examples: pd.DataFrame, catalog: pd.DataFrame, probs: pd.Series,
               features: Optional[FeatureSpec] = None) -> pd.DataFrame:
    """Adds the candidate side (catalog columns, candidate_prob) to `user_examples` rows.

    Item-local like `user_examples` is user-local: a partition by item gives the same rows.

    Args:
      examples: `user_examples` output.
      catalog: validated catalog (rows of the examples' items at least); examples on
        items missing from it are dropped.
      probs: `candidate_probabilities` of (at least) those items.
      features: the feature specification; built-ins if None.

    Returns:
      DataFrame with the spec's `example_columns`, sorted by (ts, user_id, item_id).
    """
    features = features or default_spec()
    item_columns = features.check_catalog(catalog)[list(features.catalog_columns)]
    examples = examples.merge(item_columns, on="item_id", how="inner", sort=False)
    examples["candidate_prob"] = probs.reindex(examples["item_id"].to_numpy()).to_numpy(
        dtype=np.float32)
    columns = features.example_columns
    for name, dtype in columns.items():
        if dtype in ("float", "int"):
            examples[name] = examples[name].astype(np.float32 if dtype == "float" else np.int64)
    examples = examples.sort_values(["ts", "user_id", "item_id"], kind="stable")
    return examples[list(columns)].reset_index(drop=True)


def build_retrieval_examples(events: pd.DataFrame, catalog: pd.DataFrame,
                             history_length: int = 20,
                             split: Optional[TimeSplit] = None,
                             features: Optional[FeatureSpec] = None) -> pd.DataFrame:
    """One example per positive interaction, with point-in-time query features.

    Args:
      events: validated events.
      catalog: validated catalog; positives on items missing from it are dropped.
      history_length: maximum history items (most recent first).
      split: when given, candidate_prob counts training positives only
        (ts < split.t_val); otherwise all positives.
      features: the feature specification (candidate columns come from the catalog);
        built-in features if None.

    Returns:
      DataFrame with the spec's `example_columns` (user_id, history, query, device,
      hour, item_id, title, category, brand, price, declared extras, weight,
      candidate_prob, ts), sorted by ts. `history` holds Python lists of item ids;
      float features float32, int features int64.
    """
    examples = user_examples(events, history_length)
    probs = candidate_probabilities(examples, catalog,
                                    before_ts=None if split is None else split.t_val)
    return with_items(examples, catalog, probs, features)


def user_states(events: pd.DataFrame, at_ts: int, history_length: int = 20,
                users: Optional[Iterable[str]] = None) -> pd.DataFrame:
    """Each user's query-side features as of `at_ts` (for evaluation and serving).

    Args:
      events: validated events.
      at_ts: unix seconds; only events strictly before it are used.
      history_length: maximum history items (most recent first).
      users: user ids to describe, in output order; default all users with an
        event before at_ts. Users without events get an empty history and device "".

    Returns:
      DataFrame(user_id, history, device, hour): device is the user's last device
      before at_ts, hour the UTC hour of at_ts.
    """
    before = events[events["ts"] < at_ts]
    if users is None:
        users = sorted(pd.unique(before["user_id"]))
    users = np.asarray(list(users), dtype=object)
    positives = positive_interactions(before).sort_values(["user_id", "ts"], kind="stable")
    history = histories_before(positives["user_id"].to_numpy(), positives["item_id"].to_numpy(),
                         positives["ts"].to_numpy(), users,
                         np.full(len(users), at_ts, dtype=np.int64), history_length)
    last_device = before.sort_values("ts", kind="stable").drop_duplicates(
        "user_id", keep="last").set_index("user_id")["device"]
    device = last_device.reindex(users).fillna("").to_numpy(dtype=object)
    return pd.DataFrame({
        "user_id": pd.Series(users, dtype=object),
        "history": pd.Series(history, dtype=object),
        "device": pd.Series(device, dtype=object),
        "hour": np.full(len(users), int(hour_of_day(at_ts)), dtype=np.int64)})


def _positive_events(events: pd.DataFrame) -> pd.DataFrame:
    mask = events["event_type"].isin(list(POSITIVE_EVENT_WEIGHTS)) & (events["item_id"] != "")
    return events.loc[mask, ["ts", "user_id", "item_id"]].sort_values("ts", kind="stable")


def period_targets(events: pd.DataFrame, start_ts: int, end_ts: int) -> Dict[str, List[str]]:
    """Items each user interacted positively with in [start_ts, end_ts), the ground
    truth of offline retrieval evaluation.

    Returns:
      {user_id: item ids de-duplicated, in order of first interaction}, users sorted.
    """
    pos = _positive_events(events)
    pos = pos[(pos["ts"] >= start_ts) & (pos["ts"] < end_ts)]
    pos = pos.drop_duplicates(["user_id", "item_id"], keep="first")
    grouped = pos.groupby("user_id", sort=True)["item_id"].agg(list)
    return {str(u): list(items) for u, items in grouped.items()}


def seen_items(events: pd.DataFrame, before_ts: int) -> Dict[str, Set[str]]:
    """Items each user interacted positively with before `before_ts`.

    Evaluation and serving usually exclude these from recommendations (impressions
    alone do not count: being shown an item is not having seen it).
    """
    pos = _positive_events(events)
    pos = pos[pos["ts"] < before_ts]
    grouped = pos.groupby("user_id", sort=True)["item_id"].agg(set)
    return {str(u): set(items) for u, items in grouped.items()}

