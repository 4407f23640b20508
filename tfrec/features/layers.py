"""Preprocessing + embedding layers that live inside the models.

Raw strings go in, vectors come out, so the exported SavedModel takes the same raw
features as training and serving needs no Python-side preprocessing. Each layer splits
into `preprocess` (strings -> integers) and `encode` (integers -> vectors): training runs
the first in tf.data, once per example, and the step only the second; `call` is both.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator, Mapping, Optional, Sequence

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.features.quantize import QuantizedTable, gather_rows, lookup_table
from tfrec.features.tokenize import char_ngrams, normalize_text, segment_tokens, text_segments

MAX_TEXT_BYTES = 1024  # longer texts are truncated: bounded cost per request


def _as_array(values: Sequence[str]) -> np.ndarray:
    """Vocabularies as numpy arrays: saving a StringLookup built from a Python list of
    100k ids walks the list thousands of times (minutes per export)."""
    return np.asarray(list(values), dtype=object)


class IdEmbedding(tf.keras.layers.Layer):
    """String id -> embedding, with an OOV bucket and optional id dropout.

    Id dropout maps a random share of known ids to the OOV bucket during training, so
    the OOV vector learns the average entity and other features learn to carry it.

    Args:
      vocabulary: known ids (others share one OOV bucket).
      dim: embedding size.
      dropout: probability of replacing an id with OOV during training.
      hash_bins: when > 0, hash ids into this many bins instead of a vocabulary.
      mask_padding: treat "" as padding (index 0, zero vector); for sequences.
    """

    def __init__(self, vocabulary: Sequence[str], dim: int, dropout: float = 0.0,
                 hash_bins: int = 0, mask_padding: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.dropout = float(dropout)
        self.mask_padding = mask_padding
        if hash_bins > 0:
            # Hashing has no padding: reserve bin 0 for "" explicitly.
            self.lookup = tf.keras.layers.Hashing(num_bins=hash_bins)
            size = hash_bins + 1
            self._hashing = True
        else:
            self.lookup = tf.keras.layers.StringLookup(
                vocabulary=_as_array(vocabulary), mask_token="" if mask_padding else None,
                num_oov_indices=1)
            size = self.lookup.vocabulary_size()
            self._hashing = False
        self._oov_index = 1 if mask_padding else 0
        self.embedding = tf.keras.layers.Embedding(size, dim, name="table")

    @property
    def oov_row(self) -> Optional[int]:
        """Row of the OOV bucket (the learned "any unknown id"); None when hashing."""
        return None if self._hashing else self._oov_index

    def preprocess(self, values: tf.Tensor) -> tf.Tensor:
        """Raw ids -> table rows, no dropout: the preprocessing half (runs in tf.data)."""
        values = tf.convert_to_tensor(values)
        if not self._hashing:
            return self.lookup(values)
        idx = self.lookup(values) + 1
        if self.mask_padding:
            idx = tf.where(tf.equal(values, ""), tf.zeros_like(idx), idx)
        return idx

    def drop(self, idx: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        """Id dropout on table rows (training only; padding is never dropped)."""
        if not training or self.dropout <= 0:
            return idx
        drop = tf.random.uniform(tf.shape(idx)) < self.dropout
        if self.mask_padding:
            drop = tf.logical_and(drop, idx > 0)
        return tf.where(drop, tf.cast(self._oov_index, idx.dtype), idx)

    def encode(self, idx: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        """Table rows (from `preprocess`) -> embeddings, with id dropout when training."""
        return embedding_rows(self.embedding, self.drop(idx, training=training))

    def call(self, values: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        return self.encode(self.preprocess(values), training=training)


def table_of(embedding: tf.keras.layers.Embedding):
    """The table of an Embedding layer read directly (built by calling it once, so the
    variable gets the layer's name scope as if `__call__` had created it); its quantized
    copy inside `tfrec.features.quantize.quantized_tables`."""
    if not embedding.built:
        embedding(tf.zeros([0], tf.int64))
    return lookup_table(embedding.embeddings)


def embedding_rows(embedding: tf.keras.layers.Embedding, ids: tf.Tensor) -> tf.Tensor:
    """`embedding(ids)`, or the rows of its quantized copy when one is in scope."""
    table = table_of(embedding)
    if isinstance(table, QuantizedTable):
        return tf.cast(table.gather(ids), embedding.compute_dtype)
    return embedding(ids)


_DENSE_POOLING = contextvars.ContextVar("tfrec_dense_pooling", default=False)


@contextlib.contextmanager
def dense_pooling() -> Iterator[None]:
    """Graphs traced inside pool with gathers and masked sums instead of segment ops.

    TFLite's builtin ops have no sparse segment mean; on-device graphs (batch of a few
    rows, no gradients) lose nothing by pooling densely.
    """
    token = _DENSE_POOLING.set(True)
    try:
        yield
    finally:
        _DENSE_POOLING.reset(token)


def _dense_pooled_rows(table: tf.Variable, ids: tf.Tensor, valid: tf.Tensor,
                       weights: Optional[tf.Tensor]) -> tf.Tensor:
    rows = gather_rows(table, tf.where(valid, ids, tf.zeros_like(ids)))  # [B, L, D]
    w = tf.cast(valid, rows.dtype)
    if weights is not None:
        w *= tf.cast(weights, rows.dtype)
    total = tf.reduce_sum(w, axis=1, keepdims=True)
    # expand_dims, not [..., None]: TFLite's strided slice has no new-axis mask
    summed = tf.reduce_sum(rows * tf.expand_dims(w, -1), axis=1)
    return summed / tf.maximum(total, tf.constant(1e-6, rows.dtype))


def pooled_rows(table: tf.Variable, ids: tf.Tensor, valid: tf.Tensor,
                weights: Optional[tf.Tensor] = None) -> tf.Tensor:
    """(Weighted) mean over axis 1 of table rows `ids` [B, L] where `valid`; zeros for
    rows with nothing valid.

    Each distinct id is gathered once, so the gradient reaching the optimizer has one
    row per distinct id in the batch, not one per position (words, trigrams and history
    items repeat across a batch: a tenth as many rows to update on the synthetic worlds).
    Inside `dense_pooling()` the same mean is taken with builtin TFLite ops.
    """
    if _DENSE_POOLING.get():
        return _dense_pooled_rows(table, ids, valid, weights)
    where = tf.where(valid)  # [N, 2], row-major: segment ids come sorted
    flat = tf.gather_nd(ids, where)
    segments = tf.cast(where[:, 0], tf.int32)
    batch = tf.shape(ids)[0]
    unique, position = tf.unique(flat, out_idx=tf.int32)
    rows = gather_rows(table, unique)
    if weights is None:
        return tf.sparse.segment_mean(rows, position, segments, num_segments=batch)
    w = tf.gather_nd(weights, where)
    summed = tf.math.unsorted_segment_sum(tf.gather(rows, position) * w[:, tf.newaxis],
                                          segments, batch)
    total = tf.math.unsorted_segment_sum(w, segments, batch)
    return summed / tf.maximum(total, tf.constant(1e-6, total.dtype))[:, tf.newaxis]


def recency_weights(ids: tf.Tensor, decay: float) -> tf.Tensor:
    """[B, L] weights decay**position (histories are ordered most recent first)."""
    length = tf.shape(ids)[1]
    return tf.broadcast_to(tf.pow(tf.constant(decay, tf.float32),
                                  tf.cast(tf.range(length), tf.float32))[tf.newaxis, :],
                           tf.shape(ids))


class PooledSequenceEmbedding(tf.keras.layers.Layer):
    """Recency-weighted mean of the embeddings of a padded id sequence (recent items).

    Args:
      id_embedding: an `IdEmbedding` built with `mask_padding=True`.
      recency_decay: weight of position i is decay**i.
    """

    def __init__(self, id_embedding: IdEmbedding, recency_decay: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        if not id_embedding.mask_padding:
            raise ValueError("PooledSequenceEmbedding needs an IdEmbedding with mask_padding=True")
        self.id_embedding = id_embedding
        self.recency_decay = float(recency_decay)

    def preprocess(self, sequences: tf.Tensor) -> tf.Tensor:
        """Id sequences -> table rows (0 = padding)."""
        return self.id_embedding.preprocess(sequences)

    def encode(self, idx: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        idx = self.id_embedding.drop(idx, training=training)
        pooled = pooled_rows(table_of(self.id_embedding.embedding), idx, idx > 0,
                             recency_weights(idx, self.recency_decay))
        return tf.cast(pooled, self.compute_dtype)

    def call(self, sequences: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        return self.encode(self.preprocess(sequences), training=training)


class SequenceAttributeEmbedding(tf.keras.layers.Layer):
    """Pooled embedding of an attribute (category, brand) of the items in a sequence.

    Ids of rare items carry little signal; their catalog attributes are known at serving
    time and tell which categories and brands a user is after.

    Args:
      item_ids: catalog item ids.
      item_values: the attribute of each item in `item_ids` (aligned).
      vocabulary: attribute vocabulary (index 0 of the embedding = unknown).
      dim: embedding size.
      recency_decay: weight of position i is decay**i.
    """

    def __init__(self, item_ids: Sequence[str], item_values: Sequence[str],
                 vocabulary: Sequence[str], dim: int, recency_decay: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        if len(item_ids) != len(item_values):
            raise ValueError(f"item_ids ({len(item_ids)}) and item_values ({len(item_values)}) "
                             "must be aligned")
        self.items = tf.keras.layers.StringLookup(
            vocabulary=_as_array(item_ids) if len(item_ids) else ["[none]"], mask_token="",
            num_oov_indices=1)
        index = {v: i + 1 for i, v in enumerate(vocabulary)}
        # Lookup index 0 = padding, 1 = unknown item, then the items in order. A numpy array,
        # not a list: Keras tracks list attributes and walks them on every save.
        self._table = np.asarray(
            [0, 0] + [index.get(v, 0) for v in item_values] if len(item_ids) else [0, 0, 0],
            dtype=np.int64)
        self.embedding = tf.keras.layers.Embedding(len(vocabulary) + 1, dim, name="values")
        self.recency_decay = float(recency_decay)

    def build(self, input_shape):
        self.table = self.add_weight(
            name="item_to_value", shape=(len(self._table),), dtype=tf.int64, trainable=False,
            initializer=tf.keras.initializers.Constant(self._table))
        super().build(input_shape)

    def preprocess(self, sequences: tf.Tensor) -> tf.Tensor:
        """Item id sequences -> catalog rows (0 = padding, 1 = unknown item)."""
        return self.items(sequences)

    def encode(self, idx: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        pooled = pooled_rows(table_of(self.embedding), tf.gather(self.table, idx), idx > 1,
                             recency_weights(idx, self.recency_decay))
        return tf.cast(pooled, self.compute_dtype)

    def rows(self, idx: tf.Tensor) -> tf.Tensor:
        """Catalog rows (from `preprocess`) -> the attribute embedding of every position,
        [B, H, dim], unpooled for sequence models and target attention; zeros for padding
        and items missing from the catalog (as the pooled mean skips them)."""
        if not self.built:  # a sequence model may read the rows before the pooled call
            self.build(None)
        vectors = embedding_rows(self.embedding, tf.gather(self.table, idx))
        vectors = vectors * tf.cast(idx > 1, vectors.dtype)[..., tf.newaxis]
        return tf.cast(vectors, self.compute_dtype)

    def call(self, sequences: tf.Tensor) -> tf.Tensor:
        return self.encode(self.preprocess(sequences))


def text_tokens(texts: tf.Tensor, max_length: int, ngram_bins: int) -> Dict[str, tf.Tensor]:
    """Texts -> {"words": [B, max_length] normalised tokens ("" = padding), "grams":
    [B, G] int64 trigram buckets (-1 = padding; only with ngram_bins > 0)}.

    The half of `TextEncoder` that needs TF Text, regex and hashing ops; an on-device
    model takes this as its text input (`tfrec.export.edge`). Buckets are
    `tf.strings.to_hash_bucket_fast` (FarmHash Fingerprint64 mod `ngram_bins`).
    """
    texts = tf.strings.substr(tf.reshape(texts, [-1]), 0, MAX_TEXT_BYTES, unit="BYTE")
    segments = text_segments(normalize_text(texts))
    words = segment_tokens(segments)[:, :max_length]
    out = {"words": words.to_tensor(default_value="", shape=[None, max_length])}
    if ngram_bins > 0:
        grams = char_ngrams(segments[:, :max_length])  # [B, G]
        buckets = tf.ragged.map_flat_values(tf.strings.to_hash_bucket_fast, grams, ngram_bins)
        out["grams"] = buckets.to_tensor(default_value=-1)
    return out


class TextEncoder(tf.keras.layers.Layer):
    """Bag of words plus hashed character trigrams, mean pooled.

    Words carry meaning learned from the adapted vocabulary; character trigrams make
    misspelled or unseen words ("hedphones") land near their correct spelling. Text is
    split by `tfrec.features.tokenize` (any script: CJK characters and bigrams, NFKC
    case-folded words); trigrams run over each segment. Empty text gives a zero vector.

    Args:
      tokens: adapted word vocabulary (without padding/OOV tokens).
      dim: output size of each part; the output has 2 * dim features.
      max_length: words kept per text.
      ngram_bins: hash buckets of character trigrams (0 disables them).
    """

    def __init__(self, tokens: Sequence[str], dim: int, max_length: int = 32,
                 ngram_bins: int = 20000, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length
        self.ngram_bins = ngram_bins
        # Ids as TextVectorization gave them: 0 = padding, 1 = unknown, words from 2.
        self.vectorize = tf.keras.layers.StringLookup(
            vocabulary=_as_array(tokens) if len(tokens) else _as_array(["[empty]"]),
            mask_token="", num_oov_indices=1)
        self.words = tf.keras.layers.Embedding(self.vectorize.vocabulary_size(), dim,
                                               name="words")
        self.dim = dim
        if ngram_bins > 0:
            self.trigrams = tf.keras.layers.Embedding(ngram_bins, dim, name="trigrams")

    def tokens(self, texts: tf.Tensor) -> Dict[str, tf.Tensor]:
        """`text_tokens(texts, max_length, ngram_bins)` with this encoder's settings."""
        return text_tokens(texts, self.max_length, self.ngram_bins)

    def token_ids(self, tokens: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """`tokens` output -> `encode` input: words looked up ("" -> 0), grams as given."""
        return {**tokens, "words": self.vectorize(tokens["words"])}

    def preprocess(self, texts: tf.Tensor) -> Dict[str, tf.Tensor]:
        """Texts -> {"words": [B, max_length] ids (0 = padding), "grams": [B, G] trigram
        buckets (-1 = padding; only with ngram_bins > 0)}. The string half: runs in the
        model for serving and in tf.data for training."""
        return self.token_ids(self.tokens(texts))

    def encode(self, inputs: Mapping[str, tf.Tensor], training: Optional[bool] = None
               ) -> tf.Tensor:
        """Preprocessed text -> [B, dim] (words) or [B, 2 * dim] (words + trigrams)."""
        word_ids = inputs["words"]
        words = pooled_rows(table_of(self.words), word_ids, word_ids > 0)
        if self.ngram_bins > 0:
            grams = inputs["grams"]
            words = tf.concat([words, pooled_rows(table_of(self.trigrams), grams, grams >= 0)],
                              axis=1)
        return tf.cast(words, self.compute_dtype)

    def call(self, texts: tf.Tensor) -> tf.Tensor:
        return self.encode(self.preprocess(texts))


class PriceFeatures(tf.keras.layers.Layer):
    """Price as a bucket embedding plus a normalised log price.

    Buckets capture price bands users prefer; the continuous value keeps order.

    Args:
      boundaries: bucket edges (training quantiles).
      mean / std: normalisation of log1p(price).
      dim: bucket embedding size.
    """

    def __init__(self, boundaries: Sequence[float], mean: float, std: float, dim: int,
                 **kwargs):
        super().__init__(**kwargs)
        self.bucketize = tf.keras.layers.Discretization(bin_boundaries=list(boundaries))
        self.embedding = tf.keras.layers.Embedding(len(boundaries) + 1, dim, name="buckets")
        self.mean, self.std = float(mean), float(std)

    def preprocess(self, price: tf.Tensor) -> Dict[str, tf.Tensor]:
        """Prices -> {"bucket": [B] int, "scaled": [B] normalised log price}."""
        price = tf.reshape(tf.cast(price, tf.float32), [-1])
        price = tf.where(tf.math.is_finite(price), price, tf.zeros_like(price))
        return {"bucket": self.bucketize(price),
                "scaled": (tf.math.log1p(tf.maximum(price, 0.0)) - self.mean) / self.std}

    def encode(self, inputs: Mapping[str, tf.Tensor], training: Optional[bool] = None
               ) -> tf.Tensor:
        buckets = self.embedding(inputs["bucket"])
        return tf.concat([buckets, tf.cast(inputs["scaled"][:, tf.newaxis], buckets.dtype)],
                         axis=1)

    def call(self, price: tf.Tensor) -> tf.Tensor:
        return self.encode(self.preprocess(price))


class HourEmbedding(tf.keras.layers.Layer):
    """Hour of day (0-23) -> embedding; out-of-range values share an extra bucket."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.embedding = tf.keras.layers.Embedding(25, dim, name="hours")

    def preprocess(self, hour: tf.Tensor) -> tf.Tensor:
        """Hours -> rows (24 = out of range)."""
        hour = tf.reshape(tf.cast(hour, tf.int64), [-1])
        valid = tf.logical_and(hour >= 0, hour < 24)
        return tf.where(valid, hour, tf.fill(tf.shape(hour), tf.constant(24, tf.int64)))

    def encode(self, idx: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        return self.embedding(idx)

    def call(self, hour: tf.Tensor) -> tf.Tensor:
        return self.encode(self.preprocess(hour))
