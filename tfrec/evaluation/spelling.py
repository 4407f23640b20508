"""How much a query speller helps BM25 on a synthetic world, whose typos are known.

The generator marks the logged queries it misspelled and the item each query was after,
so the speller is judged on recall, typo and clean queries apart: it must lift the first
without costing the second.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.data.synthetic import World
from tfrec.features.bm25 import BM25Scorer
from tfrec.features.speller import Speller, speller_from_texts

__all__ = ["corrected_queries", "top_rows", "typo_recall"]


def corrected_queries(speller: Speller, queries: Sequence[str], batch: int = 512
                      ) -> Tuple[List[str], np.ndarray]:
    """Queries with the speller's corrections appended, and [Q] bool: which changed."""
    fixes: List[str] = []
    for i in range(0, len(queries), batch):
        fixes += [c.decode() for c in speller.corrections(
            tf.constant(list(queries[i:i + batch]), tf.string)).numpy()]
    return ([f"{q} {c}" if c else q for q, c in zip(queries, fixes)],
            np.array([bool(c) for c in fixes], bool))


def top_rows(bm25: BM25Scorer, queries: Sequence[str], k: int) -> np.ndarray:
    """[Q, k] catalog rows of the best BM25 scores, best first."""
    return np.concatenate([np.argsort(-bm25.score(list(queries[i:i + 256])), axis=1)[:, :k]
                           for i in range(0, len(queries), 256)])


def typo_recall(world: World, max_queries: int = 3000, k: int = 10,
                log_share: float = 0.7) -> Dict[str, Dict[str, float]]:
    """BM25 recall@k of each query's target item, without and with the speller.

    The speller learns from the catalog (title, brand, category) and the first
    `log_share` of the query log by time; BM25 indexes the same catalog text.

    Returns:
      {"typo"|"clean": {"queries", "changed" (share), "plain", "speller"}}.
    """
    catalog, gt, events = world.catalog, world.ground_truth, world.events
    texts = (catalog["title"] + " " + catalog["brand"].astype(str) + " "
             + catalog["category"].astype(str)).tolist()
    cut = events["ts"].quantile(log_share)
    logged = events.loc[(events["ts"] < cut) & (events["query"] != ""), "query"].tolist()
    speller, _ = speller_from_texts(texts, logged)
    bm25 = BM25Scorer().fit(catalog["item_id"].tolist(), texts)
    ids = catalog["item_id"].to_numpy()
    queries = gt["query_texts"].astype(str)
    targets = gt["item_ids"].astype(str)[gt["query_target"]]
    typo = gt["query_typo"].astype(bool)
    out = {}
    for name, sel in (("typo", np.where(typo)[0]), ("clean", np.where(~typo)[0])):
        sel = sel[:max_queries]
        plain = queries[sel].tolist()
        expanded, changed = corrected_queries(speller, plain)
        recall = [float(np.mean([t in set(ids[r]) for t, r in zip(targets[sel], top)]))
                  if len(sel) else float("nan")
                  for top in (top_rows(bm25, plain, k), top_rows(bm25, expanded, k))]
        out[name] = {"queries": len(sel), "changed": float(changed.mean()) if len(sel) else 0.0,
                     "plain": recall[0], "speller": recall[1]}
    return out
