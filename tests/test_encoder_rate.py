"""Two learning rates in one step: the encoder's variables move at its own rate."""

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.models.encoder_rate import encoder_optimizer, minimize


def _step(optimizer, encoder_opt):
    """One step on a loss that pulls every weight up; returns (encoder, head) moves."""
    encoder = tf.Variable(np.zeros(4, np.float32))
    head = tf.Variable(np.zeros(3, np.float32))
    table = tf.Variable(np.zeros((5, 2), np.float32))  # sparse (IndexedSlices) gradient

    def loss():
        return -(tf.reduce_sum(encoder) + tf.reduce_sum(head)
                 + tf.reduce_sum(tf.gather(table, [1, 3])))

    with tf.GradientTape() as tape:
        value = loss()
    minimize(tape, value, [encoder, table, head], optimizer, [encoder, table], encoder_opt)
    return encoder.numpy(), table.numpy(), head.numpy()


@pytest.mark.parametrize("loss_scaled", [False, True])
def test_encoder_and_heads_step_at_their_own_rates(loss_scaled):
    optimizer = tf.keras.optimizers.Adam(1e-2)
    if loss_scaled:  # the mixed-precision path: one scaled loss, unscaled gradients
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    encoder, table, head = _step(optimizer, encoder_optimizer(1e-4))
    # Adam's first step moves each weight by about its learning rate.
    np.testing.assert_allclose(head, 1e-2, rtol=1e-3)
    np.testing.assert_allclose(encoder, 1e-4, rtol=1e-3)
    np.testing.assert_allclose(table[[1, 3]], 1e-4, rtol=1e-3)
    assert not table[[0, 2, 4]].any(), "rows the step did not touch stay put"


def test_one_rate_without_an_encoder_optimizer():
    encoder, _, head = _step(tf.keras.optimizers.Adam(1e-2), None)
    np.testing.assert_allclose(encoder, head[:1].repeat(4), rtol=1e-6)


def test_warmup_linear_schedule_and_bad_settings():
    optimizer = encoder_optimizer(1e-4, "warmup_linear", total_steps=100, warmup_fraction=0.1)
    schedule = optimizer.get_config()["learning_rate"]["config"]
    assert schedule == {"peak": 1e-4, "warmup_steps": 10, "total_steps": 100}
    assert float(encoder_optimizer(1e-4).learning_rate) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="unknown encoder schedule 'cosine'"):
        encoder_optimizer(1e-4, "cosine")
    with pytest.raises(ValueError, match="needs total_steps >= 1"):
        encoder_optimizer(1e-4, "warmup_linear")
    with pytest.raises(ValueError, match="must be > 0"):
        encoder_optimizer(0.0)
