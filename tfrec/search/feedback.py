"""Pseudo-relevance feedback for the deep part of a ranked search list.

The ranker orders its first results well, but the relevant products it leaves just past
position 100 look to its features like the unjudged ones above them. What they share is
the product line the query is about: the mean two-tower vector of the list's best
hybrid matches (a query expansion in vector space) tells them apart. The head of the
ranker's order is kept as it is, so the first results do not move.
"""

from __future__ import annotations

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.models.lists import masked_zscore

__all__ = ["feedback_centroid", "feedback_query", "feedback_scores"]

_NEG = -1e9


def feedback_centroid(hybrid: tf.Tensor, vectors: tf.Tensor, valid: tf.Tensor,
                      top: int = 10) -> tf.Tensor:
    """[B, H] unit mean of the unit vectors of each list's `top` best valid hybrid
    candidates: what the list's surest matches have in common.

    Args:
      hybrid: [B, C] hybrid retrieval scores.
      vectors: [B, C, H] the candidates' two-tower product vectors.
      valid: [B, C] bool, real candidates.
      top: how many best hybrid candidates make the centroid.
    """
    valid = tf.cast(valid, tf.bool)
    vectors = tf.math.l2_normalize(tf.cast(vectors, tf.float32), axis=-1)
    _, lead = tf.math.top_k(tf.where(valid, tf.cast(hybrid, tf.float32), _NEG),
                            tf.minimum(top, tf.shape(hybrid)[1]))
    lead_valid = tf.cast(tf.gather(valid, lead, batch_dims=1), tf.float32)
    centroid = tf.reduce_sum(tf.gather(vectors, lead, batch_dims=1)
                             * lead_valid[..., tf.newaxis], axis=1)
    return tf.math.l2_normalize(centroid, axis=-1)


def feedback_query(query_vectors: tf.Tensor, centroid: tf.Tensor) -> tf.Tensor:
    """[B, H] the query vector moved halfway to the list's centroid (Rocchio in the
    two-tower's space): retrieves products like the surest matches that neither first
    list reached."""
    q = tf.math.l2_normalize(tf.cast(query_vectors, tf.float32), axis=-1)
    return tf.math.l2_normalize(q + tf.cast(centroid, tf.float32), axis=-1)


def feedback_scores(scores: tf.Tensor, hybrid: tf.Tensor, vectors: tf.Tensor,
                    valid: tf.Tensor, weight: float, keep: int = 20,
                    top: int = 10) -> tf.Tensor:
    """Final scores [B, C]: the ranker's first `keep` in its order, then the rest by
    ranker z-score + weight x z-scored cosine to the centroid of the `top` best hybrid
    candidates.

    Scores stay a total order: every kept candidate scores above every other one.

    Args:
      scores: [B, C] ranker logits (anything for invalid candidates).
      hybrid: [B, C] hybrid retrieval scores of the same candidates.
      vectors: [B, C, H] their two-tower product vectors.
      valid: [B, C] bool, real candidates.
      weight: the centroid's weight in the tail (0: the ranker's z-scores alone).
      keep: leading candidates of the ranker's order that keep their places.
      top: how many best hybrid candidates make the centroid.

    Returns:
      [B, C] float32 scores, -1e9 for invalid candidates.
    """
    valid = tf.cast(valid, tf.bool)
    z = masked_zscore(tf.where(valid, tf.cast(scores, tf.float32), 0.0), valid)
    centroid = feedback_centroid(hybrid, vectors, valid, top)
    vectors = tf.math.l2_normalize(tf.cast(vectors, tf.float32), axis=-1)
    cosine = tf.einsum("bch,bh->bc", vectors, centroid)
    tail = z + weight * masked_zscore(cosine, valid)
    # Each candidate's place in the ranker's order (ties: the earlier column).
    place = tf.argsort(tf.argsort(tf.where(valid, -z, -_NEG), stable=True), stable=True)
    head = tf.logical_and(valid, place < keep)
    rest = tf.logical_and(valid, tf.logical_not(head))
    best_rest = tf.reduce_max(tf.where(rest, tail, _NEG), axis=1, keepdims=True)
    worst_head = tf.reduce_min(tf.where(head, z, -_NEG), axis=1, keepdims=True)
    shift = tf.nn.relu(best_rest - worst_head) + 1.0
    return tf.where(head, z + shift, tf.where(rest, tail, _NEG))
