"""Sequence encoders of the shopper's recent items (query tower).

A recency-weighted mean cannot tell a shopper drifting to a new department from one
browsing around, nor read order ("bought the drill, then the bits"); self-attention or
a GRU over the items, their categories, brands and positions can.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.features.layers import IdEmbedding, SequenceAttributeEmbedding

HISTORY_ENCODERS = ("pooled", "transformer", "gru")
READOUTS = ("last", "attention")


def causal_mask(valid: tf.Tensor) -> tf.Tensor:
    """[B, H, H] attention mask of a most-recent-first sequence: position i sees i and
    the older positions (j >= i) that are not padding, never a more recent item.

    Args:
      valid: [B, H] bool, False for padding.
    """
    length = tf.shape(valid)[1]
    older = tf.range(length)[tf.newaxis, :] >= tf.range(length)[:, tf.newaxis]  # [H, H]
    return tf.logical_and(older[tf.newaxis], valid[:, tf.newaxis, :])


class _Block(tf.keras.layers.Layer):
    """Pre-norm Transformer block: masked self-attention and a feed-forward layer."""

    def __init__(self, dim: int, heads: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.norm1 = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.attention = tf.keras.layers.MultiHeadAttention(
            heads, max(1, dim // heads), dropout=dropout, name="attention")
        self.norm2 = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="norm2")
        self.ffn = tf.keras.Sequential([tf.keras.layers.Dense(2 * dim, activation="gelu"),
                                        tf.keras.layers.Dense(dim)], name="ffn")
        self.drop = tf.keras.layers.Dropout(dropout)

    def call(self, x: tf.Tensor, mask: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attention(h, h, attention_mask=mask, training=training),
                          training=training)
        return x + self.drop(self.ffn(self.norm2(x)), training=training)

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), "dim": self.dim, "heads": self.heads,
                "dropout": self.dropout}


class HistoryEncoder(tf.keras.layers.Layer):
    """Recent items (most recent first) -> one vector, by a causal Transformer or a GRU.

    Each position reads its item id, category and brand embeddings (shared with the
    tower's pooled parts) plus a learned position (recency rank) embedding. Padding ("")
    is masked; an empty history encodes to zeros (the tower's MLP bias takes over).

    Args:
      items: the history item `IdEmbedding` (mask_padding=True).
      categories, brands: the history attribute embeddings (their `rows`).
      kind: "transformer" or "gru".
      dim: width of the sequence model.
      max_length: longest history read (more recent items are kept).
      layers: Transformer blocks.
      heads: attention heads.
      dropout: dropout inside the blocks (training only).
      readout: "last" (the most recent position, which attends to all older ones) or
        "attention" (a learned query pools every position); Transformer only.
      next_item_loss: build the projection `next_item_loss` needs.

    Raises:
      ValueError: an unknown kind or readout, or a non-positive size.
    """

    def __init__(self, items: IdEmbedding, categories: SequenceAttributeEmbedding,
                 brands: SequenceAttributeEmbedding, kind: str = "transformer", dim: int = 64,
                 max_length: int = 20, layers: int = 1, heads: int = 2, dropout: float = 0.1,
                 readout: str = "last", next_item_loss: bool = False, **kwargs):
        super().__init__(**kwargs)
        if kind not in HISTORY_ENCODERS[1:]:
            raise ValueError(f"model.history_encoder must be one of {HISTORY_ENCODERS}, "
                             f"got {kind!r}")
        if readout not in READOUTS:
            raise ValueError(f"model.history_readout must be one of {READOUTS}, got {readout!r}")
        for name, value in (("history_dim", dim), ("data.history_length", max_length),
                            ("history_layers", layers), ("history_heads", heads)):
            if value < 1:
                raise ValueError(f"model.{name} must be >= 1, got {value}"
                                 if "." not in name else f"{name} must be >= 1, got {value}")
        if not items.mask_padding:
            raise ValueError("HistoryEncoder needs an IdEmbedding with mask_padding=True")
        self.items, self.categories, self.brands = items, categories, brands
        self.kind, self.dim, self.max_length = kind, dim, max_length
        self.num_layers, self.heads, self.dropout, self.readout = layers, heads, dropout, readout
        self.project = tf.keras.layers.Dense(dim, name="project")
        self.next_item = None
        if next_item_loss:  # states -> the item embedding space (built now: the optimizer
            # must see its variables before the first step)
            self.next_item = tf.keras.layers.Dense(items.embedding.output_dim, name="next_item")
            self.next_item.build(tf.TensorShape([None, dim]))
        if kind == "transformer":
            self.positions = tf.keras.layers.Embedding(max_length, dim, name="positions")
            self.blocks = [_Block(dim, heads, dropout, name=f"block_{i}") for i in range(layers)]
            if readout == "attention":
                self.pool_query = tf.keras.layers.Dense(1, use_bias=False, name="pool_query")
        else:
            self.gru = tf.keras.layers.GRU(dim, return_sequences=True, name="gru")

    def preprocess(self, sequences: tf.Tensor) -> Dict[str, tf.Tensor]:
        """Id sequences -> item table rows and catalog rows (tf.data-safe)."""
        sequences = tf.convert_to_tensor(sequences)[:, :self.max_length]
        return {"items": self.items.preprocess(sequences),
                "catalog": self.categories.preprocess(sequences)}

    def _read(self, idx: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """The item and catalog rows the encoder reads: the first max_length positions,
        and at least one (padding) position, as requests may send no history at all."""
        pad = [[0, 0], [0, tf.maximum(0, 1 - tf.shape(idx["items"])[1])]]
        return {key: tf.pad(idx[key][:, :self.max_length], pad) for key in ("items", "catalog")}

    def states(self, idx: Dict[str, tf.Tensor], training: Optional[bool] = None
               ) -> tf.Tensor:
        """Preprocessed histories -> one state per position [B, H, dim] (H >= 1), each
        read from its own item and the older ones only; zeros at padding."""
        read = self._read(idx)
        items, catalog = read["items"], read["catalog"]
        valid = items > 0
        x = tf.concat([tf.cast(self.items.encode(items, training=training), tf.float32),
                       tf.cast(self.categories.rows(catalog), tf.float32),
                       tf.cast(self.brands.rows(catalog), tf.float32)], axis=-1)
        x = self.project(x)
        if self.kind == "gru":
            # Oldest first, so each step has read only older items; padding sits at the
            # end of a most-recent-first history, at the start once reversed.
            x = tf.reverse(self.gru(tf.reverse(x, [1]), mask=tf.reverse(valid, [1]),
                                    training=training), [1])
        else:
            x = x + self.positions(tf.range(tf.shape(items)[1]))[tf.newaxis]
            mask = causal_mask(valid)
            for block in self.blocks:
                x = block(x, mask, training=training)
        return x * tf.cast(valid, x.dtype)[..., tf.newaxis]

    def encode(self, idx: Dict[str, tf.Tensor], training: Optional[bool] = None) -> tf.Tensor:
        x = self.states(idx, training=training)
        if self.readout == "last" or self.kind == "gru":
            out = x[:, 0]  # the most recent position has read the whole history
        else:
            valid = self._read(idx)["items"] > 0
            score = tf.squeeze(self.pool_query(x), -1)
            score = tf.where(valid, score, tf.fill(tf.shape(score), -1e9))
            weights = tf.nn.softmax(score, axis=1) * tf.cast(valid, x.dtype)
            out = tf.reduce_sum(weights[..., tf.newaxis] * x, axis=1)
        return tf.cast(out, self.compute_dtype)

    def next_item_loss(self, idx: Dict[str, tf.Tensor], training: Optional[bool] = None,
                       max_pairs: int = 2048) -> tf.Tensor:
        """SASRec-style auxiliary loss: every position's state predicts the item that came
        next (the position before it), a softmax over the batch's distinct next items.

        One training example then teaches the encoder at every position instead of only
        the last; causality keeps each state blind to the item it predicts.

        Args:
          idx: preprocessed histories (`preprocess`).
          training: Keras training flag.
          max_pairs: at most this many (state, next item) pairs per batch (bounded cost).

        Returns:
          Mean cross-entropy over the pairs (0 when the batch has none).

        Raises:
          ValueError: the encoder was built without next_item_loss.
        """
        if self.next_item is None:
            raise ValueError("HistoryEncoder(next_item_loss=False) has no next-item head; "
                             "set model.history_next_item_weight > 0")
        states = self.states(idx, training=training)
        items = self._read(idx)["items"]
        after, target = states[:, 1:], items[:, :-1]  # position i predicts position i - 1
        pairs = tf.where(tf.logical_and(items[:, 1:] > 0, target > 0))[:max_pairs]
        query = self.next_item(tf.gather_nd(after, pairs))
        wanted = tf.gather_nd(target, pairs)

        def cross_entropy() -> tf.Tensor:
            candidates, label = tf.unique(wanted)
            table = tf.gather(self.items.embedding.embeddings, candidates)
            logits = tf.matmul(tf.cast(query, tf.float32), tf.cast(table, tf.float32),
                               transpose_b=True)
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(label, logits))

        # A softmax needs at least one class: a batch without pairs adds nothing.
        return tf.cond(tf.size(wanted) > 0, cross_entropy, lambda: tf.constant(0.0))

    def call(self, sequences: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        return self.encode(self.preprocess(sequences), training=training)

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), "kind": self.kind, "dim": self.dim,
                "max_length": self.max_length, "layers": self.num_layers,
                "heads": self.heads, "dropout": self.dropout, "readout": self.readout,
                "next_item_loss": self.next_item is not None}
