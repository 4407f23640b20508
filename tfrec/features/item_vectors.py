"""Frozen per-item vectors (BERT title embeddings) looked up by item id.

A BERT pass per training example would cost far more than the rest of the step; the
vectors are computed once per item outside the model (and again only for new or edited
items), stored in it, and a trained projection adapts them to the tower.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf


class ItemVectors(tf.keras.layers.Layer):
    """Item id -> projection of its stored vector; unknown ids get a zero vector.

    Args:
      item_ids: the items with a vector (row order of `set_vectors`).
      width: size of the stored vectors (e.g. 384 for MiniLM).
      dim: output size of the trained projection.

    Raises:
      ValueError: a non-positive width or dim.
    """

    def __init__(self, item_ids: Sequence[str], width: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        if width < 1 or dim < 1:
            raise ValueError(f"ItemVectors needs width and dim >= 1, got {width}, {dim} (train "
                             "with model.title_encoder set: the width comes from the encoder)")
        self.width, self.dim = int(width), int(dim)
        ids = np.asarray(list(item_ids) or ["[none]"], dtype=object)
        self.lookup = tf.keras.layers.StringLookup(vocabulary=ids, num_oov_indices=1)
        self.num_items = len(ids)
        # Row 0 = unknown item (zeros); a weight, so checkpoints and SavedModels keep it.
        self.vectors = self.add_weight(
            "vectors", shape=(self.num_items + 1, self.width), dtype=tf.float32,
            initializer="zeros", trainable=False, experimental_autocast=False)
        self.projection = tf.keras.layers.Dense(dim, name="projection")

    def set_vectors(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        """Points the layer at another catalog: ids and their vectors, row-aligned.

        Raises:
          ValueError: misaligned rows, a wrong width, or no items.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(item_ids) == 0 or vectors.shape != (len(item_ids), self.width):
            raise ValueError(f"set_vectors: expected [{len(item_ids)}, {self.width}] vectors "
                             f"for {len(item_ids)} items, got {list(vectors.shape)}")
        table = np.concatenate([np.zeros([1, self.width], np.float32), vectors])
        if len(item_ids) != self.num_items:
            # A new table variable: the SavedModel of this export holds the new catalog.
            self._non_trainable_weights = [w for w in self._non_trainable_weights
                                           if w is not self.vectors]
            self.vectors = self.add_weight(
                f"vectors_{len(item_ids)}", shape=table.shape, dtype=tf.float32,
                initializer="zeros", trainable=False, experimental_autocast=False)
        self.lookup.set_vocabulary(np.asarray(list(item_ids), dtype=object))
        self.num_items = len(item_ids)
        self.vectors.assign(table)

    def preprocess(self, item_ids: tf.Tensor) -> tf.Tensor:
        """Ids -> table rows (0 = unknown); tf.data-safe."""
        return self.lookup(tf.reshape(item_ids, [-1]))

    def encode(self, rows: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        return self.projection(tf.gather(self.vectors, rows))

    def call(self, item_ids: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        return self.encode(self.preprocess(item_ids), training=training)

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), "width": self.width, "dim": self.dim}
