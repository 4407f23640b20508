"""Target attention (DIN): the request's history summarised for each candidate.

A pooled history is one vector per request, the same for every candidate, so the crosses
can only compare a candidate with the history's average. Shoppers have several interests
at once; the items that tell whether this candidate fits are the few of its kind. Deep
Interest Network's activation unit scores every history position against the candidate
and pools the history with those scores, so each candidate sees its own summary.
"""

from __future__ import annotations

from typing import Sequence

import tfrec  # noqa: F401
import tensorflow as tf

NORMALIZATIONS = ("sigmoid", "softmax")


class TargetAttention(tf.keras.layers.Layer):
    """Per-candidate weighted sum of history vectors, weights from an activation unit.

    The activation unit is an MLP over [h, c, h*c, h-c] of a history position h and a
    candidate c. Its first layer is applied as W_h h + W_c c + W_p (h*c): h - c is linear
    in h and c, so its kernel folds into theirs, and the [B, L, H, 4D] concatenation is
    never built; only the product term is per (candidate, position). Cost is linear in
    B * L * H; padding positions get weight 0, so padding never changes the output.

    Args:
      units: hidden layer sizes of the activation unit (ReLU), before the 1-unit score.
      normalization: "sigmoid" (DIN: independent weights in (0, 1), the weighted sum
        divided by the number of real positions, so how many items match still shows) or
        "softmax" (weights over the real positions sum to 1).

    Raises:
      ValueError: an unknown normalization or no hidden units.
    """

    def __init__(self, units: Sequence[int] = (32,), normalization: str = "sigmoid",
                 **kwargs):
        super().__init__(**kwargs)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"target attention normalization must be one of "
                             f"{NORMALIZATIONS}, got {normalization!r}")
        if not units or any(int(u) < 1 for u in units):
            raise ValueError(f"target attention needs hidden units >= 1, got {list(units)}")
        self.units = tuple(int(u) for u in units)
        self.normalization = normalization
        first = self.units[0]
        self.history_kernel = tf.keras.layers.Dense(first, name="history")
        self.candidate_kernel = tf.keras.layers.Dense(first, use_bias=False, name="candidate")
        self.product_kernel = tf.keras.layers.Dense(first, use_bias=False, name="product")
        self.hidden = [tf.keras.layers.Dense(u, activation="relu", name=f"hidden_{i}")
                       for i, u in enumerate(self.units[1:], start=1)]
        self.score = tf.keras.layers.Dense(1, name="score")

    def weights_of(self, history: tf.Tensor, candidates: tf.Tensor, mask: tf.Tensor
                   ) -> tf.Tensor:
        """Attention weights [B, L, H] of each candidate over the history positions.

        Args:
          history: [B, H, D] per-position history vectors.
          candidates: [B, L, D] candidate vectors (same D: the matching features).
          mask: [B, H] bool, True at real (non-padding) positions.

        Returns:
          [B, L, H] weights, 0 at padding positions.
        """
        history = tf.cast(history, self.compute_dtype)
        candidates = tf.cast(candidates, self.compute_dtype)
        product = candidates[:, :, tf.newaxis, :] * history[:, tf.newaxis, :, :]  # [B,L,H,D]
        hidden = tf.nn.relu(self.history_kernel(history)[:, tf.newaxis, :, :]
                            + self.candidate_kernel(candidates)[:, :, tf.newaxis, :]
                            + self.product_kernel(product))
        for layer in self.hidden:
            hidden = layer(hidden)
        logits = tf.squeeze(self.score(hidden), -1)  # [B, L, H]
        real = tf.broadcast_to(mask[:, tf.newaxis, :], tf.shape(logits))
        if self.normalization == "softmax":
            # Masked softmax; a history with no real position gets all-zero weights.
            logits = tf.where(real, logits, tf.fill(tf.shape(logits),
                                                    tf.constant(-1e9, logits.dtype)))
            return tf.nn.softmax(logits, axis=-1) * tf.cast(real, logits.dtype)
        count = tf.reduce_sum(tf.cast(mask, logits.dtype), axis=1)[:, tf.newaxis, tf.newaxis]
        return tf.sigmoid(logits) * tf.cast(real, logits.dtype) / tf.maximum(count, 1.0)

    def call(self, history: tf.Tensor, candidates: tf.Tensor, mask: tf.Tensor
             ) -> tf.Tensor:
        """History summarised per candidate.

        Args:
          history: [B, H, D] per-position history vectors.
          candidates: [B, L, D] candidate vectors.
          mask: [B, H] bool, True at real (non-padding) positions.

        Returns:
          [B, L, D]: sum over h of weight[b, l, h] * history[b, h]; zeros without history.
        """
        weights = self.weights_of(history, candidates, mask)
        return tf.einsum("blh,bhd->bld", weights, tf.cast(history, weights.dtype))

    def get_config(self) -> dict:
        return {**super().get_config(), "units": list(self.units),
                "normalization": self.normalization}

