"""Retrieval -> ranker -> business rules in one SavedModel: one Predict call per request.

Chaining models in the client costs a network round trip per stage and ships candidate
lists back and forth; in one graph (core TF ops only) stock TF Serving runs all stages,
and the per-stage scores come back for debugging and logging.
"""

from __future__ import annotations

from typing import Dict, Optional

import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import ExportConfig
from tfrec.models.catalog_index import NPROBE_SPEC, TuningQueries
from tfrec.export.ranking import NEG_INF, RankingCore, sort_by
from tfrec.export.reasons import Reasons
from tfrec.export.retrieval import same_batch
from tfrec.export.versioned import SignatureModule
from tfrec.metrics.candidates import excludes_history
from tfrec.models.ranking import RankingModel
from tfrec.models.retrieval import TwoTowerModel

K_SPEC = tf.TensorSpec([None], tf.int32, name="k")
CONTEXT_SPECS = (
    tf.TensorSpec([None], tf.string, name="user_id"),
    tf.TensorSpec([None, None], tf.string, name="history"),
    tf.TensorSpec([None], tf.string, name="device"),
    tf.TensorSpec([None], tf.int64, name="hour"),
    K_SPEC,
    tf.TensorSpec([None, None], tf.string, name="exclude_item_ids"),
    tf.TensorSpec([None, None], tf.string, name="purchased_item_ids"),
)
QUERY_SPEC = tf.TensorSpec([None], tf.string, name="query")
EMPTY_QUERY = "search needs a non-empty query; use recommend"


def brand_cap(brands: tf.Tensor, valid: tf.Tensor, max_per_brand: int) -> tf.Tensor:
    """Keeps, in row order, at most `max_per_brand` items of each brand: [B, L] bool.

    Items without a brand ("") are not capped. An item's count is the number of valid
    same-brand items before it, so the first `max_per_brand` of each brand survive.

    Args:
      brands: [B, L] brand of each item, rows in ranked order.
      valid: [B, L] which items are real (not padding).
      max_per_brand: items kept per brand.
    """
    size = tf.shape(brands)[1]
    same = tf.equal(brands[:, :, tf.newaxis], brands[:, tf.newaxis, :])  # [B, L, L]
    earlier = tf.linalg.band_part(tf.ones([size, size]), -1, 0) - tf.eye(size)  # j < i
    before = tf.cast(same, tf.float32) * earlier * tf.cast(valid, tf.float32)[:, tf.newaxis, :]
    count = tf.reduce_sum(before, axis=2)
    return tf.logical_and(valid, tf.logical_or(tf.equal(brands, ""),
                                               count < float(max_per_brand)))


class PipelineModule(SignatureModule):
    """Serving graph: retrieval top-K -> ranker -> business rules -> top-k.

    Signatures `serving_default` (= `recommend`) and `search` (adds query [B], which must
    be non-empty). Inputs: user_id [B], history [B, H], device [B], hour [B] int64,
    k [B] int32 (1..K), exclude_item_ids [B, E] (e.g. out of stock right now) and
    purchased_item_ids [B, P], "" padded. Outputs [B, max(k)], padded with "" / -inf:
    item_ids, titles, brands, scores (the final order's score: the ranker's),
    retrieval_scores and ranker_scores; with `reasons`, also why each item is there
    (reasons, reason_kinds, reason_items, reason_words, reason_scores: see
    `tfrec.export.reasons`).

    Stages: (1) two-tower scores over the catalog; history (in `search` only under
    `search_history="exclude"`), excluded, purchased and out-of-stock items (catalog
    column `in_stock`) are masked before the top-K, so all K candidates are eligible
    and filtering never empties the list; (2) the ranker
    re-scores the K; (3) at most `max_per_brand` items per brand in ranked order;
    (4) the first k survivors.

    Args:
      retrieval: trained two-tower model.
      ranker: trained ranker of that run.
      catalog: items that can be served (optional bool column `in_stock`).
      candidates: retrieval top-K the ranker sees (default ranking.candidates; capped
        at the catalog size).
      max_per_brand: brand diversity cap; None disables it.
      search_history: "keep" or "exclude" the request's history items in `search`
        results; None: as the ranker's training lists did (its `search_history`), so
        training and serving agree. `recommend` always excludes them.
      index: export settings of the retrieval top-k (None: exact) and the storage of
        the large tables (its `precision`: the query tower's, the ranker's and the
        catalog embeddings). With an IVF index, `recommend_nprobe` and `search_nprobe`
        take one more input, nprobe [B] int32.
      queries: validation queries the IVF recall is measured on (`validation_queries`).
      reasons: return a reason per item (costs a ranker pass per history item over the
        k shown items).

    Raises:
      ValueError: for candidates < 1, max_per_brand < 1 or an unknown search_history.
    """

    def __init__(self, retrieval: TwoTowerModel, ranker: RankingModel, catalog: pd.DataFrame,
                 candidates: Optional[int] = None, max_per_brand: Optional[int] = 3,
                 search_history: Optional[str] = None, index: Optional[ExportConfig] = None,
                 queries: Optional[TuningQueries] = None, reasons: bool = True):
        super().__init__(name="tfrec_pipeline")
        wanted = int(candidates or ranker.config.candidates)
        if wanted < 1:
            raise ValueError(f"candidates (retrieval top-K) must be >= 1, got {wanted}")
        if max_per_brand is not None and int(max_per_brand) < 1:
            raise ValueError(f"max_per_brand must be >= 1 (or None for no cap), "
                             f"got {max_per_brand}")
        self.search_history = search_history or ranker.config.search_history
        self.search_excludes_history = excludes_history(self.search_history)
        self.core = RankingCore(retrieval, ranker, catalog, index=index, queries=queries)
        self.candidates = min(wanted, self.core.num_items)
        self.max_per_brand = None if max_per_brand is None else int(max_per_brand)
        self.reasons = Reasons(self.core) if reasons else None
        if self.core.index.is_ivf:
            self.recommend_nprobe = tf.function(
                self._recommend, input_signature=[*CONTEXT_SPECS, NPROBE_SPEC], autograph=False)
            self.search_nprobe = tf.function(
                self._search, input_signature=[QUERY_SPEC, *CONTEXT_SPECS, NPROBE_SPEC],
                autograph=False)

    def _retrieve(self, request: Dict[str, tf.Tensor], blocked: tf.Tensor,
                  nprobe: Optional[tf.Tensor] = None):
        """Top-K eligible items: ids [B, K] ("" when fewer are eligible), scores, rows."""
        core = self.core
        values, top = core.index.top_k(
            core.query_embedding(request), self.candidates,
            blocked=core.rows(blocked),  # -1 for padding / ids outside the catalog
            eligible=core.in_stock if core.has_stock else None, nprobe=nprobe)
        valid = top >= 0
        return (core.gather(core.item_ids, top, ""), tf.where(valid, values, 0.0), top)

    def _run(self, query, user_id, history, device, hour, k, exclude_item_ids,
             purchased_item_ids, checks, search: bool = False,
             nprobe: Optional[tf.Tensor] = None) -> Dict[str, tf.Tensor]:
        core = self.core
        request = core.request(query, user_id, history, device, hour)
        message = f"k must be between 1 and {self.candidates} (the retrieval candidates)"
        checks = checks(request) + same_batch(user_id, {
            "history": history, "device": device, "hour": hour, "k": k, "query": query,
            "exclude_item_ids": exclude_item_ids, "purchased_item_ids": purchased_item_ids}) + [
            tf.debugging.assert_greater_equal(k, 1, message=message),
            tf.debugging.assert_less_equal(k, self.candidates, message=message)]
        if nprobe is not None:
            checks += core.index.check_nprobe(nprobe) + same_batch(user_id, {"nprobe": nprobe})
        with tf.control_dependencies(checks), core.quantized():
            exclude_history = not search or self.search_excludes_history
            blocked = tf.concat([history, exclude_item_ids, purchased_item_ids] if
                                exclude_history else [exclude_item_ids, purchased_item_ids],
                                axis=1)
            return self._stages(request, k, blocked, search, nprobe)

    def _stages(self, request: Dict[str, tf.Tensor], k: tf.Tensor, blocked: tf.Tensor,
                search: bool, nprobe: Optional[tf.Tensor] = None) -> Dict[str, tf.Tensor]:
        core = self.core
        ids, retrieval, rows = self._retrieve(request, blocked, nprobe)
        ranked = core.rank(request, ids, retrieval)
        ordered = sort_by(ranked["score"], {
            "rows": rows, "ranker_scores": ranked["score"], "retrieval_scores": retrieval})
        keep = ordered["rows"] >= 0
        if self.max_per_brand is not None:
            keep = brand_cap(core.gather(core.brands, ordered["rows"], ""), keep,
                             self.max_per_brand)
        # Survivors keep their ranked order (top_k is stable, so ties do too).
        width = tf.maximum(tf.reduce_max(k), 0)
        _, first = tf.math.top_k(tf.where(keep, ordered["ranker_scores"], NEG_INF), k=width)
        pick = lambda t: tf.gather(t, first, batch_dims=1)  # noqa: E731
        shown = tf.logical_and(pick(keep), tf.range(width)[tf.newaxis, :] < k[:, tf.newaxis])
        rows = tf.where(shown, pick(ordered["rows"]), -1)
        ranker_scores = tf.where(shown, pick(ordered["ranker_scores"]), NEG_INF)
        out = {
            "item_ids": core.gather(core.item_ids, rows, ""),
            "titles": core.gather(core.titles, rows, ""),
            "brands": core.gather(core.brands, rows, ""),
            "scores": ranker_scores,
            "ranker_scores": ranker_scores,
            "retrieval_scores": tf.where(shown, pick(ordered["retrieval_scores"]), NEG_INF),
        }
        if self.reasons is not None:
            out.update(self.reasons(request, rows, search))
        return out

    def _recommend(self, user_id, history, device, hour, k, exclude_item_ids,
                   purchased_item_ids, nprobe=None):
        query = tf.fill(tf.shape(user_id), "")
        return self._run(query, user_id, history, device, hour, k, exclude_item_ids,
                         purchased_item_ids, lambda request: [], nprobe=nprobe)

    def _search(self, query, user_id, history, device, hour, k, exclude_item_ids,
                purchased_item_ids, nprobe=None):
        def non_empty(request):
            text = tf.strings.strip(request["query"])
            return [tf.debugging.Assert(tf.reduce_all(tf.strings.length(text) > 0),
                                        [EMPTY_QUERY])]

        return self._run(query, user_id, history, device, hour, k, exclude_item_ids,
                         purchased_item_ids, non_empty, True, nprobe)

    @tf.function(input_signature=list(CONTEXT_SPECS), autograph=False)
    def recommend(self, user_id, history, device, hour, k, exclude_item_ids,
                  purchased_item_ids):
        return self._recommend(user_id, history, device, hour, k, exclude_item_ids,
                               purchased_item_ids)

    @tf.function(input_signature=[QUERY_SPEC, *CONTEXT_SPECS], autograph=False)
    def search(self, query, user_id, history, device, hour, k, exclude_item_ids,
               purchased_item_ids):
        return self._search(query, user_id, history, device, hour, k, exclude_item_ids,
                            purchased_item_ids)

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        recommend = self.recommend.get_concrete_function()
        out = {"serving_default": recommend, "recommend": recommend,
               "search": self.search.get_concrete_function()}
        if self.core.index.is_ivf:
            out["recommend_nprobe"] = self.recommend_nprobe.get_concrete_function()
            out["search_nprobe"] = self.search_nprobe.get_concrete_function()
        return out
