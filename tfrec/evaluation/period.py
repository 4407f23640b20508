"""Period evaluation that keeps the ranked lists, for reports (`tfrec evaluate --report`).

`report.evaluate_period` returns only metric rows; a report also needs each model's
top-k lists, the targets and the training-period context (activity, known users and
items, popularity, impressions). Rows are computed exactly as evaluate_period does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from tfrec.data.schema import PAD, POSITIVE_EVENT_WEIGHTS
from tfrec.evaluation.baselines import CooccurrenceBaseline, PopularityBaseline
from tfrec.evaluation.click_model import PositionBasedClickModel, logged_impressions
from tfrec.evaluation.html_report import CURVE_MAX_K, ReportData
from tfrec.evaluation.report import item_age_rows, oracle_lists, ranked_lists
from tfrec.data.feature_spec import catalog_features
from tfrec.metrics.retrieval import (EvalSet, RowSearch, build_eval_set, embed_in_batches,
                                     evaluate_lists, retrieve_topk)

__all__ = ["PeriodLists", "evaluate_period_lists", "period_report_data"]

EmbedFn = Callable[[Dict[str, np.ndarray]], np.ndarray]


@dataclass
class PeriodLists:
    """Rows and ranked lists of every model evaluated on one period.

    Args:
      rows: model -> metrics (same keys and values as report.evaluate_period, plus a
        co-occurrence baseline row).
      lists: model -> [users, width] ranked ids (width >= 100 for recall curves).
      eval_set: the evaluated users and their targets.
      item_embeddings: (item ids, [N, D]) of the model's candidate tower, if any.
    """

    rows: Dict[str, Dict[str, float]]
    lists: Dict[str, np.ndarray]
    eval_set: EvalSet
    item_embeddings: Optional[tuple] = None
    notes: List[str] = field(default_factory=list)


def _padded(recommended: Sequence[Sequence[str]], width: int) -> np.ndarray:
    out = np.full((len(recommended), width), PAD, dtype=object)
    for row, items in enumerate(recommended):
        items = list(items)[:width]
        out[row, :len(items)] = items
    return out


def evaluate_period_lists(events: pd.DataFrame, catalog: pd.DataFrame, start_ts: int,
                          end_ts: int, history_length: int, query_fn: Optional[EmbedFn] = None,
                          candidate_fn: Optional[EmbedFn] = None, ks: Sequence[int] = (10, 100),
                          data_dir: Optional[str] = None, max_users: Optional[int] = None,
                          cooccurrence: bool = True, ranker=None,
                          candidates: int = 100,
                          index: Optional[RowSearch] = None) -> PeriodLists:
    """Model, popularity, co-occurrence and oracle lists and metrics on one period.

    Metrics use lists cut at max(ks), so rows equal `evaluate_period`'s; the stored
    lists are max(max(ks), 100) long for the report's recall curves.

    Args:
      events / catalog: the tables.
      start_ts / end_ts: evaluation period (users frozen at start_ts).
      history_length: history items per user.
      query_fn / candidate_fn: the model's embedding functions (omit: baselines only).
      ks: cut-offs.
      data_dir: synthetic world directory (oracle row when it has a ground truth).
      max_users: seeded sample of users.
      cooccurrence: also evaluate the item-item co-occurrence baseline.
      ranker / candidates: a trained ranker re-ordering the retrieval top-`candidates`
        (adds the "two_tower+ranker" row).
      index: retrieve through this index instead of exact search (see evaluate_period).
    """
    from tfrec.metrics.candidates import period_purchases, purchase_rate

    eval_set = build_eval_set(events, start_ts, end_ts, history_length, max_users=max_users)
    cut = max(ks)
    width = max(cut, CURVE_MAX_K)
    exclude = dict(zip(eval_set.user_ids, eval_set.exclude))
    users = list(eval_set.user_ids)
    rows: Dict[str, Dict[str, float]] = {}
    lists: Dict[str, np.ndarray] = {}
    embeddings = None

    bought = period_purchases(events, start_ts, end_ts)

    def add(name: str, recommended: Sequence[Sequence[str]]) -> None:
        lists[name] = _padded(recommended, width)
        rows[name] = evaluate_lists(lists[name][:, :cut], eval_set, ks)
        rows[name]["purchase_rate@10"] = purchase_rate(lists[name], eval_set.user_ids, bought)

    if query_fn is not None:
        items = catalog_features(catalog, candidate_fn)
        item_emb = embed_in_batches(candidate_fn, items)
        query_emb = embed_in_batches(query_fn, eval_set.query_features(), batch_size=1024)
        add("two_tower", retrieve_topk(query_emb, item_emb, items["item_id"], width,
                                       eval_set.exclude, search=index))
        embeddings = (items["item_id"], item_emb)
        if ranker is not None:
            for name, ranked in ranked_lists(ranker, eval_set, events, catalog, query_fn,
                                             candidate_fn, candidates, data_dir,
                                             index).items():
                add(name, ranked)
    popularity = PopularityBaseline().fit(events, until_ts=start_ts)
    add("popularity", popularity.recommend(users, width, exclude=exclude))
    if cooccurrence:
        cooc = CooccurrenceBaseline().fit(events, until_ts=start_ts)
        add("cooccurrence", cooc.recommend(users, None, width, exclude=exclude))
    oracle = oracle_lists(data_dir, eval_set, width)
    if oracle is not None:
        add("oracle", oracle)
    final = "two_tower+ranker" if "two_tower+ranker" in lists else "two_tower"
    if final in lists:  # the served model on new vs established items
        rows.update(item_age_rows(lists[final], eval_set, events, ks))
    return PeriodLists(rows=rows, lists=lists, eval_set=eval_set, item_embeddings=embeddings)


def period_report_data(period: PeriodLists, events: pd.DataFrame, catalog: pd.DataFrame,
                       title: str, k: int = 10,
                       metadata: Optional[Dict[str, object]] = None) -> ReportData:
    """Report inputs for a period: training-period context, business and calibration.

    Business metrics and click calibration come from a position-based click model
    fitted on impressions before the period and checked on the period's impressions;
    logs without impressions skip both, with a note.
    """
    eval_set = period.eval_set
    start, end = eval_set.start_ts, eval_set.end_ts
    before = events[(events["ts"] < start) & events["event_type"].isin(list(POSITIVE_EVENT_WEIGHTS))
                    & (events["item_id"] != "")]
    activity = before.groupby("user_id").size()
    item_users = before.drop_duplicates(["user_id", "item_id"]).groupby("item_id").size()
    item_counts = item_users.reindex(catalog["item_id"], fill_value=0)
    notes = [f"Users frozen at ts {start}; targets are their positive interactions in "
             f"[{start}, {end}); items they interacted with before are excluded.",
             "Novelty, popularity and cold-start slices use interactions before the period."]
    business, probs, labels = None, None, None
    train_imps = logged_impressions(events, catalog, end_ts=start)
    test_imps = logged_impressions(events, catalog, start_ts=start, end_ts=end)
    if len(train_imps) and len(test_imps):
        click_model = PositionBasedClickModel().fit(train_imps)
        prices = dict(zip(catalog["item_id"].astype(str), catalog["price"].astype(float)))
        business = {name: click_model.expected_outcomes(lists[:, :k], prices, k)
                    for name, lists in period.lists.items()}
        probs = click_model.click_probability(test_imps["item_id"].to_numpy(object),
                                              test_imps["position"].to_numpy())
        labels = test_imps["clicked"].to_numpy(np.float64)
        notes.append("Business metrics: expected CTR/CVR/GMV of each model's top-"
                     f"{k} shown at positions 1..{k}, under a position-based click model "
                     "fitted on impressions before the period; calibration compares its "
                     "click probabilities with the period's logged clicks.")
    else:
        notes.append("No logged impressions: business metrics and click calibration skipped.")
    return ReportData(
        title=title, rows=period.rows,
        recommendations={name: lists for name, lists in period.lists.items()},
        relevant=eval_set.targets, user_ids=list(eval_set.user_ids),
        user_activity=activity.reindex(eval_set.user_ids, fill_value=0).to_numpy(),
        known_users=set(activity.index), known_items=set(item_users.index),
        catalog_size=len(catalog),
        item_labels=dict(zip(catalog["item_id"].astype(str), catalog["category"].astype(str))),
        item_counts=dict(zip(item_counts.index.astype(str), item_counts.to_numpy(np.float64))),
        num_users=max(int(activity.size), 1), item_embeddings=period.item_embeddings,
        click_probabilities=probs, click_labels=labels, business=business, k=k,
        notes=notes + period.notes, metadata=dict(metadata or {}))


def write_period_report(report_dir: str, tables, start_ts: int, end_ts: int, cfg,
                        query_fn: Optional[EmbedFn], candidate_fn: Optional[EmbedFn],
                        split: str = "test", max_users: Optional[int] = None,
                        tensorboard_dir: Optional[str] = None,
                        source: str = "", ranker=None,
                        index: Optional[RowSearch] = None) -> Dict[str, Dict[str, float]]:
    """Evaluates a period with lists, writes the report, returns the metric rows.

    Args:
      report_dir: where report.html / report.json / PNGs go.
      tables: io.Tables of the run's data.
      start_ts / end_ts: the evaluated period.
      cfg: the run's Config (history length, cut-offs, data dir).
      query_fn / candidate_fn: the model's embedding functions.
      split: period name for the title.
      max_users: seeded sample of users.
      tensorboard_dir: TensorBoard directory of the report ("" disables it).
      source: run directory or SavedModel evaluated (shown in the report).
      ranker: the run's trained ranker (adds the "two_tower+ranker" row).
      index: retrieve through this index instead of exact search (see evaluate_period).
    """
    from tfrec.evaluation.html_report import write_report

    period = evaluate_period_lists(tables.events, tables.catalog, start_ts, end_ts,
                                   cfg.data.history_length, query_fn, candidate_fn,
                                   ks=cfg.train.eval_ks,
                                   # the synthetic truth knows raw ids, not pseudonyms
                                   data_dir=(None if cfg.data.pseudonymize_users
                                             else cfg.data.data_dir),
                                   max_users=max_users, ranker=ranker,
                                   candidates=cfg.ranking.candidates, index=index)
    data = period_report_data(period, tables.events, tables.catalog,
                              title=f"tfrec evaluation: {split} period",
                              metadata={"model": source, "split": split,
                                        "period": f"[{start_ts}, {end_ts})",
                                        "users": len(period.eval_set),
                                        "data_dir": os.path.abspath(cfg.data.data_dir)})
    write_report(report_dir, data, tensorboard_dir=tensorboard_dir)
    from tfrec.evaluation.report import evaluate_search

    return {**period.rows, **evaluate_search(
        tables.events, tables.catalog, start_ts, end_ts, cfg.data.history_length, query_fn,
        candidate_fn, ranker=ranker, candidates=cfg.ranking.candidates, ks=cfg.train.eval_ks,
        max_sessions=max_users, search_history=cfg.ranking.search_history)}
