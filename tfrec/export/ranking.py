"""Export of the ranker as a TF Serving SavedModel: candidate ids in, re-ordered ids out.

Callers send the candidates they already have (from any retrieval); the model looks up
their features and two-tower embeddings itself, so requests stay raw strings and the
ranker sees exactly the retrieval_score feature it was trained with.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import numpy as np
import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import ExportConfig
from tfrec.data.feature_spec import catalog_features
from tfrec.features.quantize import (catalog_rows, check_precision, quantized_tables,
                                     track_quantized)
from tfrec.models.attribution import GROUPS, integrated_gradients
from tfrec.models.catalog_index import (CatalogIndex, TuningQueries, choose_index,
                                        in_index_order)
from tfrec.metrics.retrieval import embed_in_batches
from tfrec.export.retrieval import same_batch
from tfrec.export.versioned import SignatureModule
from tfrec.models.ranking import RankingModel
from tfrec.models.retrieval import TwoTowerModel
from tfrec.models.embedding import tower_fn

# Longer query text is cut (at a UTF-8 boundary) before any tokenisation: a 100 KB
# query must cost no more than a normal one, and never fail.
MAX_QUERY_BYTES = 1024
NEG_INF = -np.inf
log = logging.getLogger(__name__)

REQUEST_SPECS = (
    tf.TensorSpec([None], tf.string, name="query"),
    tf.TensorSpec([None], tf.string, name="user_id"),
    tf.TensorSpec([None, None], tf.string, name="history"),
    tf.TensorSpec([None], tf.string, name="device"),
    tf.TensorSpec([None], tf.int64, name="hour"),
)
CANDIDATES_SPEC = tf.TensorSpec([None, None], tf.string, name="candidate_ids")


def clean_query(query: tf.Tensor, max_bytes: int = MAX_QUERY_BYTES) -> tf.Tensor:
    """Caps query text at `max_bytes` and drops invalid UTF-8 (e.g. a cut character).

    Tokenisers cost time per byte and some reject malformed UTF-8; capping first keeps
    every request bounded and well-formed.

    Args:
      query: [B] raw query strings.
      max_bytes: bytes kept per query.
    """
    short = tf.strings.substr(query, 0, max_bytes, unit="BYTE")
    return tf.strings.unicode_transcode(short, "UTF-8", "UTF-8", errors="ignore")


def _in_stock(catalog: pd.DataFrame) -> Optional[np.ndarray]:
    """The catalog's `in_stock` column as bools (None: no column, everything in stock)."""
    if "in_stock" not in catalog:
        return None
    column = catalog["in_stock"]
    if column.isna().any():
        raise ValueError("catalog column 'in_stock' has missing values; fill them with "
                         "True/False (or drop the column: everything is then in stock)")
    if pd.api.types.is_bool_dtype(column):
        return column.to_numpy(bool)
    if pd.api.types.is_numeric_dtype(column) and column.isin([0, 1]).all():
        return column.to_numpy().astype(bool)
    raise ValueError(f"catalog column 'in_stock' must hold booleans (or 0/1), got dtype "
                     f"{column.dtype} with values like {column.iloc[0]!r}")


class RankingCore(SignatureModule):
    """What the ranker and pipeline exports share: towers, ranker, catalog tables.

    Both need candidate embeddings (for retrieval scores), titles and brands by catalog
    row; keeping them in one tracked module keeps the two exports consistent.

    Args:
      retrieval: trained two-tower model (query tower and candidate embeddings).
      ranker: trained ranker of that retrieval run.
      catalog: items that can be served (items the ranker never saw are scored from
        their content).
      index: export settings of the retrieval top-k (None: exact; see `CatalogIndex`).
      queries: validation queries the IVF recall is measured on (`validation_queries`).
    """

    def __init__(self, retrieval: TwoTowerModel, ranker: RankingModel, catalog: pd.DataFrame,
                 index: Optional[ExportConfig] = None,
                 queries: Optional[TuningQueries] = None):
        super().__init__(name="tfrec_ranking_core")
        if len(catalog) == 0:
            raise ValueError("cannot export a ranker over an empty catalog")
        features = catalog_features(catalog, retrieval)
        ids = features["item_id"]
        if len(set(ids)) != len(ids):
            raise ValueError("catalog has duplicated item ids; each item must appear once")
        known = set(np.asarray(ranker.catalog.item_ids).astype(str))
        if any(i not in known for i in ids):
            # New items are ranked from their content; without statistics they count as
            # never bought (callers with events pass them via `use_catalog` first).
            log.info("the ranker is pointed at the export catalog (%d items, popularity 0)",
                     len(ids))
            ranker.use_catalog(catalog)
        self.precision = check_precision((index or ExportConfig()).precision)
        # The query tower and ranker tables at export.precision (the float ones unsaved).
        tables = track_quantized(
            self, {"query_tower": retrieval.query_tower, "ranker": ranker}, self.precision,
            keep=[ranker.text_match] if ranker.text_match is not None else [])
        object.__setattr__(self, "_tables", tables)  # int keys: not a trackable dict
        self.tasks = tuple(ranker.tasks)
        self.num_items = len(ids)
        embeddings = embed_in_batches(tower_fn(retrieval.candidate_tower), features)
        stock = _in_stock(catalog)
        choice = choose_index(embeddings, queries, index or ExportConfig(index="exact"),
                              item_ids=features["item_id"])
        self.index_card = choice.card
        features, embeddings, stock = in_index_order(choice, features, embeddings, stock)
        ids = features["item_id"]
        self.index = CatalogIndex(embeddings, choice, self.precision)
        self.item_embeddings = self.index.item_embeddings
        self.item_ids = tf.Variable(ids.astype(str), trainable=False, dtype=tf.string,
                                    name="item_ids")
        self.titles = tf.Variable(features["title"].astype(str), trainable=False,
                                  dtype=tf.string, name="titles")
        self.brands = tf.Variable(features["brand"].astype(str), trainable=False,
                                  dtype=tf.string, name="brands")
        self.has_stock = stock is not None
        self.in_stock = tf.Variable(stock if stock is not None else np.ones(len(ids), bool),
                                    trainable=False, name="in_stock")
        self.item_index = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(ids.astype(str)),
                                                tf.range(self.num_items, dtype=tf.int64)),
            default_value=-1)

    def quantized(self):
        """Context in which graphs read the quantized tables (a no-op at float32);
        every serving graph over this core is traced inside it."""
        return quantized_tables(self._tables)

    def rows(self, item_ids: tf.Tensor) -> tf.Tensor:
        """Catalog row of each id; -1 for padding ("") and unknown ids."""
        return self.item_index.lookup(item_ids)

    def gather(self, column: tf.Variable, rows: tf.Tensor, pad) -> tf.Tensor:
        """column[rows] with `pad` where rows < 0."""
        values = tf.gather(column, tf.maximum(rows, 0))
        return tf.where(rows >= 0, values, tf.cast(pad, column.dtype))

    def request(self, query: tf.Tensor, user_id: tf.Tensor, history: tf.Tensor,
                device: tf.Tensor, hour: tf.Tensor) -> Dict[str, tf.Tensor]:
        """Request features with the query text capped (before any tokeniser sees it)."""
        return {"user_id": user_id, "history": history, "query": clean_query(query),
                "device": device, "hour": hour}

    def query_embedding(self, request: Dict[str, tf.Tensor]) -> tf.Tensor:
        return self.query_tower(request, training=False)

    def retrieval_scores(self, query: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """Two-tower scores [B, L] of candidate rows [B, L]; 0 for padding."""
        items = catalog_rows(self.item_embeddings, tf.maximum(rows, 0))  # [B, L, D]
        scores = tf.einsum("bd,bld->bl", query, items)
        return tf.where(rows >= 0, scores, 0.0)

    def rank(self, request: Dict[str, tf.Tensor], item_ids: tf.Tensor,
             retrieval: tf.Tensor) -> Dict[str, tf.Tensor]:
        """Ranker outputs [B, L]: "score" (combined; -inf for padding) and per-task logits."""
        logits = self.ranker({**request, "item_id": item_ids, "retrieval_score": retrieval},
                             training=False)
        valid = tf.not_equal(item_ids, "")
        out = {task: tf.where(valid, logits[task], NEG_INF) for task in self.tasks}
        out["score"] = tf.where(valid, self.ranker.score(logits), NEG_INF)
        return out


def sort_by(scores: tf.Tensor, tensors: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Re-orders each row of `tensors` [B, L] by descending `scores` (ties keep order)."""
    _, order = tf.math.top_k(scores, k=tf.shape(scores)[1])
    return {name: tf.gather(t, order, batch_dims=1) for name, t in tensors.items()}


class RankerModule(SignatureModule):
    """Serving graph of the ranker: request + candidate ids -> candidates re-ordered.

    `serving_default` inputs: query [B] (may be ""), user_id [B], history [B, H],
    device [B], hour [B] int64, candidate_ids [B, L] ("" pads; lists of any length up
    to max_candidates). Outputs, all [B, L] in descending score order with padding last
    ("" / -inf): item_ids, titles, scores (combined ranker score), retrieval_scores,
    <task>_scores (per-task logits) and candidate_index (position in candidate_ids, -1
    for padding). Unknown candidate ids, too many candidates and mismatched batch sizes
    fail with INVALID_ARGUMENT; unknown users are fine (cold start).

    `explain` takes the same inputs and returns, per candidate (in request order),
    integrated-gradients attributions of its score to the feature groups
    (<group>_attributions for user, history, item, context, text, retrieval), the
    score and the all-zero baseline's score (baseline_scores); the attributions add up
    to scores - baseline_scores (`tfrec.models.attribution`).

    Args:
      retrieval: trained two-tower model (its retrieval scores are a ranker feature).
      ranker: trained ranker.
      catalog: items that may be candidates.
      max_candidates: longest candidate list accepted (default ranking.max_candidates).
      explain_steps: integration points of `explain` (its cost is steps x candidates).
      precision: storage of the large tables ("float32", "bfloat16", "int8"; see
        `tfrec.features.quantize`).
    """

    def __init__(self, retrieval: TwoTowerModel, ranker: RankingModel, catalog: pd.DataFrame,
                 max_candidates: Optional[int] = None, explain_steps: int = 32,
                 precision: str = "float32"):
        super().__init__(name="tfrec_ranker")
        self.max_candidates = int(max_candidates or ranker.config.max_candidates)
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")
        if explain_steps < 1:
            raise ValueError(f"explain_steps must be >= 1, got {explain_steps}")
        self.explain_steps = int(explain_steps)
        self.core = RankingCore(retrieval, ranker, catalog,
                                index=ExportConfig(index="exact", precision=precision))

    def _checks(self, request: Dict[str, tf.Tensor], candidate_ids: tf.Tensor,
                rows: tf.Tensor) -> list:
        unknown = tf.logical_and(rows < 0, tf.not_equal(candidate_ids, ""))
        return same_batch(request["user_id"], {**request, "candidate_ids": candidate_ids}) + [
            tf.debugging.Assert(
                tf.shape(candidate_ids)[1] <= self.max_candidates,
                ["too many candidates:", tf.shape(candidate_ids)[1],
                 f"candidate_ids per request; at most {self.max_candidates} "
                 "(ranking.max_candidates at export)"]),
            tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(unknown)),
                ["unknown candidate item id(s), not in the served catalog:",
                 tf.boolean_mask(candidate_ids, unknown)], summarize=5),
        ]

    def _checked(self, query, user_id, history, device, hour, candidate_ids):
        """Request, candidate rows and retrieval scores; the scores wait for the checks."""
        request = self.core.request(query, user_id, history, device, hour)
        rows = self.core.rows(candidate_ids)
        with tf.control_dependencies(self._checks(request, candidate_ids, rows)):
            retrieval = self.core.retrieval_scores(self.core.query_embedding(request), rows)
        return request, rows, retrieval

    @tf.function(input_signature=[*REQUEST_SPECS, CANDIDATES_SPEC], autograph=False)
    def rank(self, query, user_id, history, device, hour, candidate_ids):
        with self.core.quantized():
            return self._rank(query, user_id, history, device, hour, candidate_ids)

    def _rank(self, query, user_id, history, device, hour, candidate_ids):
        request, rows, retrieval = self._checked(query, user_id, history, device, hour,
                                                 candidate_ids)
        ranked = self.core.rank(request, candidate_ids, retrieval)
        size = tf.shape(candidate_ids)[1]
        position = tf.broadcast_to(tf.range(size)[tf.newaxis, :], tf.shape(candidate_ids))
        valid = rows >= 0
        out = sort_by(ranked["score"], {
            "item_ids": candidate_ids, "scores": ranked["score"],
            "titles": self.core.gather(self.core.titles, rows, ""),
            "retrieval_scores": tf.where(valid, retrieval, NEG_INF),
            "candidate_index": tf.where(valid, position, -1),
            **{f"{t}_scores": ranked[t] for t in self.core.tasks}})
        return out

    @tf.function(input_signature=[*REQUEST_SPECS, CANDIDATES_SPEC], autograph=False)
    def explain(self, query, user_id, history, device, hour, candidate_ids):
        with self.core.quantized():
            return self._explain(query, user_id, history, device, hour, candidate_ids)

    def _explain(self, query, user_id, history, device, hour, candidate_ids):
        request, rows, retrieval = self._checked(query, user_id, history, device, hour,
                                                 candidate_ids)
        parts = integrated_gradients(
            self.core.ranker, {**request, "item_id": candidate_ids, "retrieval_score": retrieval},
            steps=self.explain_steps)
        valid = rows >= 0
        out = {f"{g}_attributions": tf.where(valid, parts[g], 0.0) for g in GROUPS}
        out["scores"] = tf.where(valid, parts["score"], NEG_INF)
        out["baseline_scores"] = tf.where(valid, parts["baseline"], NEG_INF)
        out["item_ids"] = candidate_ids
        return out

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        return {"serving_default": self.rank.get_concrete_function(),
                "explain": self.explain.get_concrete_function()}
