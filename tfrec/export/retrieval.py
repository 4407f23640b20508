"""Export of a trained two-tower model as a TF Serving SavedModel.

The SavedModel carries the towers (with their vocabularies), the whole catalog's
embeddings, ids and titles, and an exact brute-force top-k. Every input is batched
(first dimension), so TF Serving's request batching can merge requests.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.data.feature_spec import catalog_features
from tfrec.metrics.retrieval import embed_in_batches
from tfrec.models.retrieval import TwoTowerModel
from tfrec.models.embedding import tower_fn

K_SPEC = tf.TensorSpec([None], tf.int32, name="k")
EXCLUDE_SPEC = tf.TensorSpec([None], tf.bool, name="exclude_seen")


def _same_batch(reference: tf.Tensor, tensors: Dict[str, tf.Tensor]) -> list:
    """In-graph checks that every input has one row per request row."""
    batch = tf.shape(reference)[0]
    return [tf.debugging.assert_equal(
        tf.shape(t)[0], batch,
        message=f"input '{name}' must have the same batch size (first dimension) as the others")
        for name, t in tensors.items()]


class RetrievalModule(tf.Module):
    """Serving graph: towers + catalog index + exact top-k.

    Args:
      model: trained two-tower model.
      catalog: every item that can be recommended (including items created after training).
    """

    def __init__(self, model: TwoTowerModel, catalog: pd.DataFrame):
        super().__init__(name="tfrec_retrieval")
        if len(catalog) == 0:
            raise ValueError("cannot export a retrieval model over an empty catalog")
        features = catalog_features(catalog, model)
        embeddings = embed_in_batches(tower_fn(model.candidate_tower), features)
        self.query_tower = model.query_tower
        self.candidate_tower = model.candidate_tower
        self.num_items = len(catalog)
        self.item_embeddings = tf.Variable(embeddings.astype(np.float32), trainable=False,
                                           name="item_embeddings")
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

    def _check_k(self, k: tf.Tensor) -> list:
        return [tf.debugging.assert_greater_equal(
                    k, 1, message="k must be >= 1"),
                tf.debugging.assert_less_equal(
                    k, self.num_items,
                    message=f"k must be <= {self.num_items} (the catalog size)")]

    def _top_k(self, scores: tf.Tensor, k: tf.Tensor) -> Dict[str, tf.Tensor]:
        """Top max(k) per row; positions past a row's own k are padded ("" / -inf)."""
        width = tf.reduce_max(k)
        values, indices = tf.math.top_k(scores, k=width)
        keep = tf.range(width)[tf.newaxis, :] < k[:, tf.newaxis]
        keep = tf.logical_and(keep, values > -np.inf)
        ids = tf.where(keep, tf.gather(self.item_ids, indices), "")
        titles = tf.where(keep, tf.gather(self.titles, indices), "")
        values = tf.where(keep, values, -np.inf)
        return {"item_ids": ids, "scores": values, "titles": titles}

    def _query(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        checks = _same_batch(features["user_id"], features)
        checks.append(tf.debugging.assert_greater(
            tf.shape(features["history"])[1], -1, message="history must be a 2-D [batch, items]"))
        with tf.control_dependencies(checks):
            return self.query_tower(features, training=False)

    def _query_embedding(self, features):
        return {"embedding": self._query(features)}

    def _candidate_embedding(self, features):
        with tf.control_dependencies(_same_batch(features["item_id"], features)):
            return {"embedding": self.candidate_tower(features, training=False)}

    def _recommend(self, features, k, exclude_seen):
        checks = self._check_k(k) + _same_batch(features["user_id"], {"k": k,
                                                                       "exclude_seen": exclude_seen})
        with tf.control_dependencies(checks):
            query = self._query(features)
            scores = tf.matmul(query, self.item_embeddings, transpose_b=True)  # [B, N]
            # Exclude the request's history items where asked: scatter -inf at their columns.
            seen = self.item_index.lookup(features["history"])  # [B, H], -1 unknown/padding
            rows = tf.broadcast_to(tf.range(tf.shape(seen)[0], dtype=tf.int64)[:, None],
                                   tf.shape(seen))
            mask = tf.logical_and(seen >= 0, exclude_seen[:, None])
            coords = tf.stack([tf.boolean_mask(rows, mask), tf.boolean_mask(seen, mask)], axis=1)
            scores = tf.tensor_scatter_nd_update(
                scores, coords, tf.fill([tf.shape(coords)[0]], tf.constant(-np.inf, tf.float32)))
            return self._top_k(scores, k)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="item_id"), K_SPEC])
    def similar_items(self, item_id, k):
        index = self.item_index.lookup(item_id)
        checks = self._check_k(k) + _same_batch(item_id, {"k": k}) + [
            tf.debugging.assert_non_negative(
                index, message="unknown item_id: similar_items needs ids from the catalog")]
        with tf.control_dependencies(checks):
            k = tf.minimum(k, self.num_items - 1)
            query = tf.gather(self.item_embeddings, index)
            scores = tf.matmul(query, self.item_embeddings, transpose_b=True)
            rows = tf.range(tf.shape(index)[0], dtype=tf.int64)
            scores = tf.tensor_scatter_nd_update(  # an item is not similar to itself
                scores, tf.stack([rows, index], axis=1),
                tf.fill(tf.shape(rows), tf.constant(-np.inf, tf.float32)))
            return self._top_k(scores, tf.maximum(k, 1))

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        return {
            "serving_default": self.recommend.get_concrete_function(),
            "query_embedding": self.query_embedding.get_concrete_function(),
            "candidate_embedding": self.candidate_embedding.get_concrete_function(),
            "similar_items": self.similar_items.get_concrete_function(),
        }
