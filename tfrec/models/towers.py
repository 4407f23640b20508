"""Query and candidate towers of the two-tower retrieval model.

The query tower sees who is asking (user id, recent items, optional search text,
context); the candidate tower sees what an item is (id and content), so items never
seen in training still get meaningful embeddings from their title, brand and category.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import ModelConfig
from tfrec.data.feature_spec import FeatureSpec, default_spec
from tfrec.features.attributes import ItemAttributes
from tfrec.features.item_vectors import ItemVectors
from tfrec.features.layers import (HourEmbedding, IdEmbedding, PooledSequenceEmbedding,
                                   PriceFeatures, SequenceAttributeEmbedding, TextEncoder)
from tfrec.features.vocab import Vocabularies
from tfrec.models.sequence import HistoryEncoder


def _mlp(hidden: Sequence[int], out_dim: int, name: str) -> tf.keras.Sequential:
    layers = [tf.keras.layers.Dense(units, activation="relu") for units in hidden]
    # Output in float32 even under mixed precision: scores and softmax need the range.
    layers.append(tf.keras.layers.Dense(out_dim, dtype="float32"))
    return tf.keras.Sequential(layers, name=name)


def _output(config: ModelConfig, name: str) -> Optional[tf.keras.Sequential]:
    """The tower's MLP, or None when `model.projection` is off."""
    return _mlp(config.hidden_units, config.embedding_dim, name) if config.projection else None


def _check_projection(config: ModelConfig, used: Sequence[str], id_feature: str, field: str,
                     also: Sequence[str] = ()) -> None:
    """Without projection a tower's vector is its id embedding itself (ids-only towers, as
    in a plain matrix factorisation), so nothing else may feed it.

    Args:
      config: model hyper-parameters.
      used: the built-in features the tower reads.
      id_feature: its id feature ("user_id" / "item_id").
      field: the config field naming those features.
      also: other parts it would read (declared catalog columns, title vectors).

    Raises:
      ValueError: projection off with hidden layers, other features or unequal widths.
    """
    if config.projection:
        return
    if tuple(config.hidden_units):
        raise ValueError("model.projection=false makes each tower its id embedding, so it "
                         "takes no hidden layers; set model.hidden_units=[] (got "
                         f"{list(config.hidden_units)})")
    if tuple(used) != (id_feature,):
        raise ValueError(f"model.projection=false makes each tower its id embedding; set "
                         f"model.{field}=[{id_feature}] (got {list(used)})")
    if also:
        raise ValueError(f"model.projection=false makes each tower its id embedding, but "
                         f"the {field.split('_')[0]} tower would also read {list(also)}; "
                         "set model.projection=true")
    if config.id_embedding_dim != config.embedding_dim:
        raise ValueError(f"model.projection=false: model.id_embedding_dim "
                         f"({config.id_embedding_dim}) must equal model.embedding_dim "
                         f"({config.embedding_dim})")


def _l2_normalize(x: tf.Tensor) -> tf.Tensor:
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)


def _column(name: str) -> Callable[[Mapping[str, tf.Tensor]], tf.Tensor]:
    return lambda features: features[name]


def _department(features: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """First level of the category path ("garden>hoses" -> "garden")."""
    return tf.strings.regex_replace(tf.reshape(features["category"], [-1]), ">.*", "")


# (key, layer, raw input) of one tower part: the layer maps its raw input to a vector in
# `call` and splits into `preprocess` (raw -> integers) and `encode` (integers -> vector).
Part = Tuple[str, tf.keras.layers.Layer, Callable[[Mapping[str, tf.Tensor]], Any]]


def selected(config_names: Sequence[str], available: Sequence[str], field_name: str
             ) -> Tuple[str, ...]:
    """The built-in features a tower reads: `config_names`, or all when empty.

    Raises:
      ValueError: an unknown name (the message lists the valid ones).
    """
    unknown = [n for n in config_names if n not in available]
    if unknown:
        raise ValueError(f"model.{field_name}: unknown feature(s) {unknown}; choose among "
                         f"{list(available)} (empty: all)")
    return tuple(config_names) or tuple(available)


class _Tower(tf.keras.Model):
    """Concatenates its parts' vectors and maps them through an MLP to a unit vector
    (with `model.projection` off, its id embedding is normalised instead).

    Raw features go through each part's `call` (serving, evaluation); a training batch
    preprocessed in tf.data goes through each part's `encode` -- the same layers, so the
    two paths cannot drift apart.
    """

    # (key, attribute, raw input) of every possible part; a part is present when the
    # tower has the attribute (`model.query_features` / `candidate_features`).
    PARTS: Tuple[Tuple[str, str, Callable[[Mapping[str, tf.Tensor]], Any]], ...] = ()

    @property
    def parts(self) -> List[Part]:
        # isinstance, not hasattr: Keras models carry a `history` attribute of their own.
        return [(key, getattr(self, attr), get) for key, attr, get in self.PARTS
                if isinstance(getattr(self, attr, None), tf.keras.layers.Layer)]

    def preprocess(self, features: Mapping[str, tf.Tensor]) -> Dict[str, Any]:
        """Raw features -> the integer (and scaled) inputs of `encode`; tf.data-safe."""
        return {key: layer.preprocess(get(features)) for key, layer, get in self.parts}

    def encode(self, inputs: Mapping[str, Any], training: Optional[bool] = None) -> tf.Tensor:
        """Preprocessed inputs -> L2-normalised embedding."""
        return self._combine([layer.encode(inputs[key], training=training)
                              for key, layer, _ in self.parts])

    def call(self, features: Mapping[str, tf.Tensor], training: Optional[bool] = None
             ) -> tf.Tensor:
        return self._combine([layer(get(features), training=training)
                              for _, layer, get in self.parts])

    def _combine(self, parts: List[tf.Tensor]) -> tf.Tensor:
        x = tf.concat([tf.cast(p, parts[0].dtype) for p in parts], 1)
        return _l2_normalize(x if self.mlp is None else self.mlp(x))


QUERY_FEATURES = ("user_id", "history", "query", "device", "hour")
CANDIDATE_FEATURES = ("item_id", "title", "category", "brand", "price")


class QueryTower(_Tower):
    """User id + recent history + search text + context -> query embedding.

    Args:
      vocab: learned vocabularies.
      config: model hyper-parameters (`query_features` picks the built-in inputs read).
      text: text encoder shared with the candidate tower (query words meet title words).
      features: the feature specification (input signature, embedding sizes).
    """

    PARTS = (("user", "user", _column("user_id")),
             ("history", "history", _column("history")),
             ("history_categories", "history_categories", _column("history")),
             ("history_brands", "history_brands", _column("history")),
             ("query", "text", _column("query")),
             ("device", "device", _column("device")),
             ("hour", "hour", _column("hour")))

    def __init__(self, vocab: Vocabularies, config: ModelConfig, text: TextEncoder,
                 features: Optional[FeatureSpec] = None, **kwargs):
        super().__init__(**kwargs)
        self.features = features = features or default_spec()
        used = selected(config.query_features, QUERY_FEATURES, "query_features")
        _check_projection(config, used, "user_id", "query_features")
        dim = config.id_embedding_dim
        if "user_id" in used:
            self.user = IdEmbedding(vocab.users, dim, dropout=config.id_dropout,
                                    hash_bins=config.user_hash_bins, name="user")
        if "history" in used:
            self.history_items = IdEmbedding(vocab.items, dim, mask_padding=True,
                                             name="history_items")
            self.history_categories = SequenceAttributeEmbedding(
                vocab.catalog_items, vocab.catalog_categories, vocab.categories,
                features["category"].dim, name="history_categories")
            self.history_brands = SequenceAttributeEmbedding(
                vocab.catalog_items, vocab.catalog_brands, vocab.brands,
                features["brand"].dim, name="history_brands")
            if config.history_encoder == "pooled":
                self.history = PooledSequenceEmbedding(self.history_items, name="history")
            else:  # the pooled category/brand parts stay: cheap, and robust to rare items
                self.history = HistoryEncoder(
                    self.history_items, self.history_categories, self.history_brands,
                    kind=config.history_encoder, dim=config.history_dim,
                    max_length=config.history_max_length, layers=config.history_layers,
                    heads=config.history_heads, dropout=config.history_dropout,
                    readout=config.history_readout,
                    next_item_loss=config.history_next_item_weight > 0, name="history")
        if "query" in used:
            self.text = text
        if "device" in used:
            self.device = IdEmbedding(vocab.devices, features["device"].dim, name="device")
        if "hour" in used:
            self.hour = HourEmbedding(features["hour"].dim, name="hour")
        self.mlp = _output(config, "query_mlp")

    @property
    def input_specs(self) -> Dict[str, tf.TensorSpec]:
        return self.features.query_specs


class CandidateTower(_Tower):
    """Item id + title + category + brand + price (+ declared extra columns) -> embedding.

    Args:
      vocab: learned vocabularies.
      config: model hyper-parameters (`candidate_features` picks the built-in inputs).
      text: text encoder shared with the query tower.
      features: the feature specification (input signature, sizes, extra columns).
    """

    PARTS = (("item", "item", _column("item_id")),
             ("title", "text", _column("title")),
             ("category", "category", lambda f: tf.reshape(f["category"], [-1])),
             ("department", "department", _department),
             ("brand", "brand", _column("brand")),
             ("price", "price", _column("price")),
             ("attributes", "attributes", lambda f: f),
             ("title_vectors", "title_vectors", _column("item_id")))

    def __init__(self, vocab: Vocabularies, config: ModelConfig, text: TextEncoder,
                 features: Optional[FeatureSpec] = None, **kwargs):
        super().__init__(**kwargs)
        self.features = features = features or default_spec()
        used = selected(config.candidate_features, CANDIDATE_FEATURES, "candidate_features")
        wider = [f"declared column {f.name}" for f in features.extras]
        _check_projection(config, used, "item_id", "candidate_features",
                         also=wider + (["title vectors"] if config.title_encoder else []))
        dim = config.id_embedding_dim
        if "item_id" in used:
            self.item = IdEmbedding(vocab.items, dim, dropout=config.id_dropout, name="item")
        if "title" in used:
            self.text = text
        if "category" in used:
            self.category = IdEmbedding(vocab.categories, features["category"].dim,
                                        name="category")
            self.department = IdEmbedding(vocab.departments, features.department_dim,
                                          name="department")
        if "brand" in used:
            self.brand = IdEmbedding(vocab.brands, features["brand"].dim, name="brand")
        if "price" in used:
            self.price = PriceFeatures(vocab.price_boundaries, vocab.log_price_mean,
                                       vocab.log_price_std, features["price"].dim, name="price")
        if features.extras:  # declared catalog columns are always read
            self.attributes = ItemAttributes(features, vocab, name="attributes")
        if config.title_encoder:  # vectors are filled by training / export, not here
            self.title_vectors = ItemVectors(vocab.catalog_items, config.title_vector_width,
                                             config.title_vector_dim, name="title_vectors")
        self.mlp = _output(config, "candidate_mlp")

    @property
    def input_specs(self) -> Dict[str, tf.TensorSpec]:
        return self.features.candidate_specs
