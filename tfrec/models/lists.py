"""Helpers over lists of scored candidates (one request's row)."""

from __future__ import annotations

from typing import Optional

import tfrec  # noqa: F401
import tensorflow as tf


def masked_zscore(x: tf.Tensor, valid: Optional[tf.Tensor] = None,
                  epsilon: float = 1e-9) -> tf.Tensor:
    """(x - mean) / std within each row (last axis) over its valid entries; 0 where invalid.

    Rankers compare the candidates of one request, so scores are standardised per list,
    not over the batch.

    Args:
      x: [..., L] float scores.
      valid: [..., L] bool mask of real candidates; all valid if None.
      epsilon: added to the variance (keeps constant rows finite).
    """
    w = tf.ones_like(x) if valid is None else tf.cast(valid, x.dtype)
    count = tf.maximum(tf.reduce_sum(w, axis=-1, keepdims=True), 1.0)
    mean = tf.reduce_sum(x * w, axis=-1, keepdims=True) / count
    var = tf.reduce_sum(tf.square(x - mean) * w, axis=-1, keepdims=True) / count
    return (x - mean) * tf.math.rsqrt(var + epsilon) * w
