"""Integrated-gradients attributions of the ranker's score to its feature groups.

A score alone cannot tell a shopper or an auditor what drove it. Integrated gradients
split score(x) - score(baseline) exactly over the inputs (completeness), so the
per-group shares add up to the score change they explain.
"""

from __future__ import annotations

from typing import Dict, Tuple

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.models.ranking import INPUT_ORDER, NUMERIC_GROUPS, RankingModel

# Feature group of each ranker input (numeric features are split by NUMERIC_GROUPS).
GROUP_OF_INPUT = {
    "user": "user", "history_items": "history", "history_categories": "history",
    "history_brands": "history", "device": "context", "hour": "context", "item": "item",
    "category": "item", "brand": "item", "price": "item", "attributes": "item",
    "text": "text", "target_history": "history", "retrieval": "retrieval"}
GROUP_OF_NUMERIC = {"popularity": "item", "retrieval": "retrieval", "category": "history",
                    "brand": "history", "price": "history"}
GROUPS = ("user", "history", "item", "context", "text", "retrieval")


def _numeric_groups() -> Dict[str, Tuple[int, ...]]:
    """Attribution group -> standardised numeric feature columns."""
    out: Dict[str, Tuple[int, ...]] = {}
    for name, columns in NUMERIC_GROUPS.items():
        group = GROUP_OF_NUMERIC[name]
        out[group] = out.get(group, ()) + tuple(columns)
    return out


def integrated_gradients(ranker: RankingModel, features: Dict[str, tf.Tensor],
                         steps: int = 32) -> Dict[str, tf.Tensor]:
    """Attributions of the ranker's combined score to feature groups, per candidate.

    The baseline is every ranker input at zero: embeddings of nothing, standardised
    numeric features at their training mean, no retrieval score. The path integral uses
    the midpoint rule over `steps` points, all in one batch.

    Args:
      ranker: a trained ranker.
      features: ranker inputs (request features [B], item_id [B, L], retrieval_score).
      steps: points on the straight path from the baseline (more: closer completeness).

    Returns:
      One [B, L] tensor per group of `GROUPS`, plus "score" (the score explained) and
      "baseline" (the baseline's score); the groups add up to score - baseline up to the
      integration error.

    Raises:
      ValueError: steps < 1.
    """
    if steps < 1:
        raise ValueError(f"integrated gradients need steps >= 1, got {steps}")
    x = ranker.scoring_inputs(features, training=False)
    shape = tf.shape(x["retrieval"])  # [B, L]
    alphas = (tf.range(steps, dtype=tf.float32) + 0.5) / float(steps)

    def along_path(value: tf.Tensor) -> tf.Tensor:
        """[N, ...] -> [steps * N, ...]: value scaled by each alpha (step-major)."""
        scaled = alphas[:, tf.newaxis] * tf.reshape(value, [1, -1])
        return tf.reshape(scaled, tf.concat([[-1], tf.shape(value)[1:]], axis=0))

    # Candidates become the batch ([B*L, 1] lists): per-list features such as z-scores
    # are already inside `numeric`, so scoring them one by one changes nothing.
    flat = {name: tf.reshape(value, [-1, 1] if name == "retrieval" else
                             [-1, 1, value.shape[-1]] if name == "numeric" else
                             [-1, value.shape[-1]])
            for name, value in x.items()}
    path = {name: along_path(value) for name, value in flat.items()}
    with tf.GradientTape() as tape:
        tape.watch(list(path.values()))
        total = tf.reduce_sum(ranker.score(ranker.logits(path)))
    grads = tape.gradient(total, path)
    groups = {g: tf.zeros([tf.reduce_prod(shape)]) for g in GROUPS}
    for name, value in flat.items():
        mean_grad = tf.reduce_mean(
            tf.reshape(grads[name], tf.concat([[steps], tf.shape(value)], axis=0)), axis=0)
        contribution = mean_grad * value
        if name == "numeric":
            for group, columns in _numeric_groups().items():
                groups[group] += tf.reduce_sum(
                    tf.gather(contribution, list(columns), axis=2), axis=[1, 2])
        else:
            axes = list(range(1, len(value.shape)))
            groups[GROUP_OF_INPUT[name]] += (tf.reduce_sum(contribution, axis=axes) if axes
                                             else contribution)
    zero = {name: tf.zeros_like(value) for name, value in flat.items()}
    out = {g: tf.reshape(v, shape) for g, v in groups.items()}
    out["score"] = tf.reshape(ranker.score(ranker.logits(flat)), shape)
    out["baseline"] = tf.reshape(ranker.score(ranker.logits(zero)), shape)
    return out

