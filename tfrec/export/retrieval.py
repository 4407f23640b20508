"""Export of a trained two-tower model as a TF Serving SavedModel.

The SavedModel carries the towers (with their vocabularies), the whole catalog's
embeddings, ids and titles, and a top-k over them: exact, or an IVF index (see
`tfrec.models.catalog_index`). Every input is batched (first dimension), so TF Serving's
request batching can merge requests.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import ExportConfig
from tfrec.data.feature_spec import catalog_features
from tfrec.export.versioned import SignatureModule
from tfrec.features.quantize import (catalog_rows, check_precision, quantized_tables,
                                     track_quantized)
from tfrec.models.catalog_index import (NPROBE_SPEC, CatalogIndex, TuningQueries,
                                        choose_index, in_index_order)
from tfrec.metrics.retrieval import embed_in_batches
from tfrec.models.retrieval import TwoTowerModel
from tfrec.models.embedding import tower_fn

K_SPEC = tf.TensorSpec([None], tf.int32, name="k")
EXCLUDE_SPEC = tf.TensorSpec([None], tf.bool, name="exclude_seen")
ITEM_SPEC = tf.TensorSpec([None], tf.string, name="item_id")


def same_batch(reference: tf.Tensor, tensors: Dict[str, tf.Tensor]) -> list:
    """In-graph checks that every input has one row per request row."""
    batch = tf.shape(reference)[0]
    return [tf.debugging.assert_equal(
        tf.shape(t)[0], batch,
        message=f"input '{name}' must have the same batch size (first dimension) as the others")
        for name, t in tensors.items()]


class RetrievalModule(SignatureModule):
    """Serving graph: towers + catalog embeddings + top-k (exact or IVF).

    With an IVF index, `recommend_nprobe` and `similar_items_nprobe` take one more input,
    nprobe [B] int32 (1..nlist), for callers trading latency against recall per request.

    Args:
      model: trained two-tower model.
      catalog: every item that can be recommended (including items created after training).
      index: export settings of the index (None: exact top-k).
      queries: validation queries the IVF recall is measured on (`validation_queries`).

    With `index.precision` int8 / bfloat16 the catalog embeddings and the towers' large
    embedding tables are saved quantized (`tfrec.features.quantize`) and the float
    tables are left out of the SavedModel.
    """

    def __init__(self, model: TwoTowerModel, catalog: pd.DataFrame,
                 index: Optional[ExportConfig] = None,
                 queries: Optional[TuningQueries] = None):
        super().__init__(name="tfrec_retrieval")
        if len(catalog) == 0:
            raise ValueError("cannot export a retrieval model over an empty catalog")
        features = catalog_features(catalog, model)
        embeddings = embed_in_batches(tower_fn(model.candidate_tower), features)
        choice = choose_index(embeddings, queries, index or ExportConfig(index="exact"),
                              item_ids=features["item_id"])
        self.index_card = choice.card
        features, embeddings = in_index_order(choice, features, embeddings)
        self.precision = check_precision((index or ExportConfig()).precision)
        self._track_towers(model)
        self.num_items = len(catalog)
        self.index = CatalogIndex(embeddings, choice, self.precision)
        self.item_embeddings = self.index.item_embeddings
        self.item_ids = tf.Variable(features["item_id"].astype(str), trainable=False,
                                    name="item_ids", dtype=tf.string)
        self.titles = tf.Variable(features["title"].astype(str), trainable=False,
                                  name="titles", dtype=tf.string)
        self.item_index = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(features["item_id"].astype(str)),
                tf.range(self.num_items, dtype=tf.int64)),
            default_value=-1)
        # Input signatures from the feature specification (declared extra columns too).
        query_specs = model.query_tower.input_specs
        self.query_embedding = tf.function(self._query_embedding, input_signature=[query_specs])
        self.candidate_embedding = tf.function(
            self._candidate_embedding, input_signature=[model.candidate_tower.input_specs])
        self.recommend = tf.function(self._recommend,
                                     input_signature=[query_specs, K_SPEC, EXCLUDE_SPEC])
        if self.index.is_ivf:
            self.recommend_nprobe = tf.function(
                self._recommend, input_signature=[query_specs, K_SPEC, EXCLUDE_SPEC,
                                                  NPROBE_SPEC])
            self.similar_items_nprobe = tf.function(
                self._similar_items, input_signature=[ITEM_SPEC, K_SPEC, NPROBE_SPEC])
        self.similar_items = tf.function(self._similar_items,
                                         input_signature=[ITEM_SPEC, K_SPEC])

    def _track_towers(self, model: TwoTowerModel) -> None:
        """Towers as attributes (float32), or untracked beside their quantized tables and
        whatever else their graphs read (so the float tables are not saved)."""
        tables = track_quantized(
            self, {"query_tower": model.query_tower, "candidate_tower": model.candidate_tower},
            self.precision)
        object.__setattr__(self, "_tables", tables)  # int keys: not a trackable dict

    def _tower(self, tower, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        with quantized_tables(self._tables):
            return tower(features, training=False)

    def _check_k(self, k: tf.Tensor) -> list:
        return [tf.debugging.assert_greater_equal(
                    k, 1, message="k must be >= 1"),
                tf.debugging.assert_less_equal(
                    k, self.num_items,
                    message=f"k must be <= {self.num_items} (the catalog size)")]

    def _top_k(self, query: tf.Tensor, k: tf.Tensor, blocked: tf.Tensor,
               nprobe: Optional[tf.Tensor]) -> Dict[str, tf.Tensor]:
        """Top max(k) per row; positions past a row's own k are padded ("" / -inf)."""
        width = tf.reduce_max(k)
        values, rows = self.index.top_k(query, width, blocked=blocked, nprobe=nprobe)
        keep = tf.range(width)[tf.newaxis, :] < k[:, tf.newaxis]
        keep = tf.logical_and(keep, rows >= 0)
        safe = tf.maximum(rows, 0)
        ids = tf.where(keep, tf.gather(self.item_ids, safe), "")
        titles = tf.where(keep, tf.gather(self.titles, safe), "")
        values = tf.where(keep, values, -np.inf)
        return {"item_ids": ids, "scores": values, "titles": titles}

    def _query(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        checks = same_batch(features["user_id"], features)
        checks.append(tf.debugging.assert_greater(
            tf.shape(features["history"])[1], -1, message="history must be a 2-D [batch, items]"))
        with tf.control_dependencies(checks):
            return self._tower(self.query_tower, features)

    def _query_embedding(self, features):
        return {"embedding": self._query(features)}

    def _candidate_embedding(self, features):
        with tf.control_dependencies(same_batch(features["item_id"], features)):
            return {"embedding": self._tower(self.candidate_tower, features)}

    def _nprobe_checks(self, nprobe: Optional[tf.Tensor], reference: tf.Tensor) -> list:
        if nprobe is None:
            return []
        return self.index.check_nprobe(nprobe) + same_batch(reference, {"nprobe": nprobe})

    def _recommend(self, features, k, exclude_seen, nprobe=None):
        checks = self._check_k(k) + same_batch(features["user_id"], {"k": k,
                                                                      "exclude_seen": exclude_seen})
        checks += self._nprobe_checks(nprobe, features["user_id"])
        with tf.control_dependencies(checks):
            query = self._query(features)
            # The request's history items are left out where asked.
            seen = self.item_index.lookup(features["history"])  # [B, H], -1 unknown/padding
            blocked = tf.where(exclude_seen[:, None], seen, tf.constant(-1, tf.int64))
            return self._top_k(query, k, blocked, nprobe)

    def _similar_items(self, item_id, k, nprobe=None):
        index = self.item_index.lookup(item_id)
        checks = self._check_k(k) + same_batch(item_id, {"k": k}) + [
            tf.debugging.assert_non_negative(
                index, message="unknown item_id: similar_items needs ids from the catalog")]
        checks += self._nprobe_checks(nprobe, item_id)
        with tf.control_dependencies(checks):
            k = tf.minimum(k, self.num_items - 1)
            query = catalog_rows(self.item_embeddings, index)
            # An item is not similar to itself.
            return self._top_k(query, tf.maximum(k, 1), index[:, tf.newaxis], nprobe)

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        out = {
            "serving_default": self.recommend.get_concrete_function(),
            "query_embedding": self.query_embedding.get_concrete_function(),
            "candidate_embedding": self.candidate_embedding.get_concrete_function(),
            "similar_items": self.similar_items.get_concrete_function(),
        }
        if self.index.is_ivf:
            out["recommend_nprobe"] = self.recommend_nprobe.get_concrete_function()
            out["similar_items_nprobe"] = self.similar_items_nprobe.get_concrete_function()
        return out
