"""Declared extra catalog columns (colour, material, rating...) as one item vector.

The columns come from the feature specification, so a shop's own attributes reach the
candidate tower and the ranker by configuration. Preprocessing (string -> index,
number -> z-score) and encoding are separate steps: the first can run in tf.data.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.data.feature_spec import Feature, FeatureSpec
from tfrec.features.layers import _as_array, embedding_rows
from tfrec.features.vocab import Vocabularies


def preprocessing_layer(feature: Feature, vocab: Vocabularies) -> tf.keras.layers.Layer:
    """The Keras layer that turns raw values of an extra column into model input.

    Args:
      feature: an extra catalog feature of the specification.
      vocab: vocabularies of the run (`attributes`, `numeric_stats`).

    Returns:
      StringLookup (categorical: 0 = unknown) or Normalization (numeric).

    Raises:
      ValueError: the run's vocabularies have nothing for this feature.
    """
    if feature.preprocessing == "lookup":
        if feature.name not in vocab.attributes:
            raise ValueError(f"no vocabulary for feature {feature.name!r}; the run was "
                             f"trained without it (retrain with it declared)")
        return tf.keras.layers.StringLookup(
            vocabulary=_as_array(vocab.attributes[feature.name] or ["[empty]"]),
            num_oov_indices=1, name=f"{feature.name}_lookup")
    if feature.preprocessing == "normalize":
        if feature.name not in vocab.numeric_stats:
            raise ValueError(f"no statistics for feature {feature.name!r}; the run was "
                             f"trained without it (retrain with it declared)")
        mean, std = vocab.numeric_stats[feature.name]
        return tf.keras.layers.Normalization(mean=mean, variance=std * std,
                                             name=f"{feature.name}_normalize")
    raise ValueError(f"feature {feature.name!r}: no generic preprocessing for "
                     f"{feature.preprocessing!r}")


class ItemAttributes(tf.keras.layers.Layer):
    """Extra catalog columns -> [B, D] (embeddings of categoricals, z-scores of numbers).

    Args:
      features: the feature specification; its `extras` are encoded.
      vocab: vocabularies of the run.
    """

    def __init__(self, features: FeatureSpec, vocab: Vocabularies, **kwargs):
        super().__init__(**kwargs)
        self.columns = features.extras
        self.pre = {f.name: preprocessing_layer(f, vocab) for f in self.columns}
        self.embed = {f.name: tf.keras.layers.Embedding(self.pre[f.name].vocabulary_size(),
                                                        f.dim, name=f"{f.name}_embedding")
                      for f in self.columns if f.kind == "categorical"}

    @property
    def names(self) -> Sequence[str]:
        return [f.name for f in self.columns]

    def preprocess(self, values: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """Raw columns -> indices / scaled numbers (runs in the model or in tf.data)."""
        out = {}
        for f in self.columns:
            x = tf.reshape(values[f.name], [-1])
            if f.kind == "numeric":
                x = tf.cast(x, tf.float32)
                x = tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))
                out[f.name] = tf.reshape(self.pre[f.name](x[:, tf.newaxis]), [-1, 1])
            else:
                out[f.name] = self.pre[f.name](x)
        return out

    def encode(self, inputs: Mapping[str, tf.Tensor], training: Optional[bool] = None
               ) -> Optional[tf.Tensor]:
        """Preprocessed columns -> one [B, D] vector (None without extra columns)."""
        if not self.columns:
            return None
        parts = [embedding_rows(self.embed[f.name], inputs[f.name]) if f.kind == "categorical"
                 else tf.cast(inputs[f.name], self.compute_dtype) for f in self.columns]
        return tf.concat([tf.cast(p, self.compute_dtype) for p in parts], axis=1)

    def call(self, values: Mapping[str, tf.Tensor]) -> Optional[tf.Tensor]:
        return self.encode(self.preprocess(values))
