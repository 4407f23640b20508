"""Query and candidate towers of the two-tower retrieval model.

The query tower sees who is asking (user id, recent items, optional search text,
context); the candidate tower sees what an item is (id and content), so items never
seen in training still get meaningful embeddings from their title, brand and category.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import ModelConfig
from tfrec.data.feature_spec import FeatureSpec, default_spec
from tfrec.features.attributes import ItemAttributes
from tfrec.features.layers import (HourEmbedding, IdEmbedding, PooledSequenceEmbedding,
                                   PriceFeatures, SequenceAttributeEmbedding, TextEncoder)
from tfrec.features.vocab import Vocabularies


def _mlp(hidden: Sequence[int], out_dim: int, name: str) -> tf.keras.Sequential:
    layers = [tf.keras.layers.Dense(units, activation="relu") for units in hidden]
    # Output in float32 even under mixed precision: scores and softmax need the range.
    layers.append(tf.keras.layers.Dense(out_dim, dtype="float32"))
    return tf.keras.Sequential(layers, name=name)


def _l2_normalize(x: tf.Tensor) -> tf.Tensor:
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)


class QueryTower(tf.keras.Model):
    """User id + recent history + search text + context -> query embedding.

    Args:
      vocab: learned vocabularies.
      config: model hyper-parameters.
      text: text encoder shared with the candidate tower (query words meet title words).
      features: the feature specification (input signature, embedding sizes).
    """

    def __init__(self, vocab: Vocabularies, config: ModelConfig, text: TextEncoder,
                 features: Optional[FeatureSpec] = None, **kwargs):
        super().__init__(**kwargs)
        self.features = features = features or default_spec()
        dim = config.id_embedding_dim
        self.user = IdEmbedding(vocab.users, dim, dropout=config.id_dropout,
                                hash_bins=config.user_hash_bins, name="user")
        self.history_items = IdEmbedding(vocab.items, dim, mask_padding=True,
                                         name="history_items")
        self.history = PooledSequenceEmbedding(self.history_items, name="history")
        self.history_categories = SequenceAttributeEmbedding(
            vocab.catalog_items, vocab.catalog_categories, vocab.categories,
            features["category"].dim, name="history_categories")
        self.history_brands = SequenceAttributeEmbedding(
            vocab.catalog_items, vocab.catalog_brands, vocab.brands, features["brand"].dim,
            name="history_brands")
        self.text = text
        self.device = IdEmbedding(vocab.devices, features["device"].dim, name="device")
        self.hour = HourEmbedding(features["hour"].dim, name="hour")
        self.mlp = _mlp(config.hidden_units, config.embedding_dim, "query_mlp")

    @property
    def input_specs(self) -> Dict[str, tf.TensorSpec]:
        return self.features.query_specs

    def call(self, features: Dict[str, tf.Tensor], training: Optional[bool] = None) -> tf.Tensor:
        parts = [
            self.user(features["user_id"], training=training),
            self.history(features["history"], training=training),
            self.history_categories(features["history"]),
            self.history_brands(features["history"]),
            self.text(features["query"]),
            self.device(features["device"]),
            self.hour(features["hour"]),
        ]
        return _l2_normalize(self.mlp(tf.concat([tf.cast(p, parts[0].dtype) for p in parts], 1)))


class CandidateTower(tf.keras.Model):
    """Item id + title + category + brand + price (+ declared extra columns) -> embedding.

    Args:
      vocab: learned vocabularies.
      config: model hyper-parameters.
      text: text encoder shared with the query tower.
      features: the feature specification (input signature, sizes, extra columns).
    """

    def __init__(self, vocab: Vocabularies, config: ModelConfig, text: TextEncoder,
                 features: Optional[FeatureSpec] = None, **kwargs):
        super().__init__(**kwargs)
        self.features = features = features or default_spec()
        dim = config.id_embedding_dim
        self.item = IdEmbedding(vocab.items, dim, dropout=config.id_dropout, name="item")
        self.text = text
        self.category = IdEmbedding(vocab.categories, features["category"].dim, name="category")
        self.department = IdEmbedding(vocab.departments, features.department_dim,
                                      name="department")
        self.brand = IdEmbedding(vocab.brands, features["brand"].dim, name="brand")
        self.price = PriceFeatures(vocab.price_boundaries, vocab.log_price_mean,
                                   vocab.log_price_std, features["price"].dim, name="price")
        self.attributes = ItemAttributes(features, vocab, name="attributes")
        self.mlp = _mlp(config.hidden_units, config.embedding_dim, "candidate_mlp")

    @property
    def input_specs(self) -> Dict[str, tf.TensorSpec]:
        return self.features.candidate_specs

    def call(self, features: Dict[str, tf.Tensor], training: Optional[bool] = None) -> tf.Tensor:
        category = tf.reshape(features["category"], [-1])
        department = tf.strings.regex_replace(category, ">.*", "")
        parts = [
            self.item(features["item_id"], training=training),
            self.text(features["title"]),
            self.category(category),
            self.department(department),
            self.brand(features["brand"]),
            self.price(features["price"]),
        ]
        extra = self.attributes(features)
        if extra is not None:
            parts.append(extra)
        return _l2_normalize(self.mlp(tf.concat([tf.cast(p, parts[0].dtype) for p in parts], 1)))
