"""A pretrained encoder and the fresh layers above it, each with its own learning rate.

A fine-tuned BERT wants a rate 10-100x below what freshly initialised heads need: one
Adam for both either disturbs the pretrained weights or starves the heads.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.text.pretrain import WarmupLinearDecay

SCHEDULES = ("constant", "warmup_linear")


def encoder_optimizer(learning_rate: float, schedule: str = "constant",
                      total_steps: int = 0, warmup_fraction: float = 0.1
                      ) -> tf.keras.optimizers.Optimizer:
    """Adam for the encoder's variables, at `learning_rate` or BERT's warm-up schedule.

    Args:
      learning_rate: (peak) rate of the encoder.
      schedule: "constant", or "warmup_linear" (linear warm-up over `warmup_fraction`
        of `total_steps`, then linear decay to 0 at `total_steps`).
      total_steps: optimizer steps of the whole run (warmup_linear only).
      warmup_fraction: share of the steps spent warming up.

    Raises:
      ValueError: for a non-positive rate, an unknown schedule, or warmup_linear without
        a positive `total_steps` / with a warm-up share outside [0, 1).
    """
    if not learning_rate > 0:
        raise ValueError(f"encoder learning rate must be > 0, got {learning_rate}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown encoder schedule {schedule!r}; choose one of {SCHEDULES}")
    rate = learning_rate
    if schedule == "warmup_linear":
        if total_steps < 1 or not 0.0 <= warmup_fraction < 1.0:
            raise ValueError("warmup_linear needs total_steps >= 1 and warmup_fraction in "
                             f"[0, 1), got {total_steps} and {warmup_fraction}")
        rate = WarmupLinearDecay(learning_rate, int(warmup_fraction * total_steps),
                                 total_steps)
    return tf.keras.optimizers.Adam(rate)


def minimize(tape: tf.GradientTape, loss: tf.Tensor, variables: Sequence[tf.Variable],
             optimizer: tf.keras.optimizers.Optimizer,
             encoder_variables: Sequence[tf.Variable] = (),
             encoder_opt: Optional[tf.keras.optimizers.Optimizer] = None) -> None:
    """One step: `encoder_variables` move with `encoder_opt`, the rest with `optimizer`.

    The loss is differentiated once. Under a LossScaleOptimizer (mixed precision) it
    scales the loss for both; a step whose gradients overflow is skipped by the heads'
    optimizer and gives the encoder a zero gradient.

    Args:
      tape: the tape that recorded `loss` (re-entered to scale it).
      loss: scalar to minimise.
      variables: every trainable variable of the model.
      optimizer: the model's optimizer (all variables when `encoder_opt` is None).
      encoder_variables: the subset that gets `encoder_opt`.
      encoder_opt: the encoder's optimizer, or None for a single rate.
    """
    if encoder_opt is None or not encoder_variables:
        optimizer.minimize(loss, list(variables), tape=tape)
        return
    encoder = {v.ref() for v in encoder_variables}
    encoder_vars = [v for v in variables if v.ref() in encoder]
    head_vars = [v for v in variables if v.ref() not in encoder]
    scaled = isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    if scaled:
        with tape:
            loss = optimizer.get_scaled_loss(loss)
    grads = tape.gradient(loss, encoder_vars + head_vars)
    if scaled:
        grads = optimizer.get_unscaled_gradients(grads)
        grads[:len(encoder_vars)] = _zero_unless_finite(grads[:len(encoder_vars)])
    encoder_opt.apply_gradients(
        [(g, v) for g, v in zip(grads[:len(encoder_vars)], encoder_vars) if g is not None])
    optimizer.apply_gradients(zip(grads[len(encoder_vars):], head_vars))


def _zero_unless_finite(grads: List[Optional[tf.Tensor]]) -> List[Optional[tf.Tensor]]:
    values = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads
              if g is not None]
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in values])

    def keep(g):
        if g is None:
            return None
        if isinstance(g, tf.IndexedSlices):
            return tf.IndexedSlices(tf.where(finite, g.values, tf.zeros_like(g.values)),
                                    g.indices, g.dense_shape)
        return tf.where(finite, g, tf.zeros_like(g))

    return [keep(g) for g in grads]
