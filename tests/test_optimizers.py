"""LazyAdam: sparse updates touch only the rows of the batch; dense weights are Adam's."""

from __future__ import annotations

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.training.optimizers import LazyAdam, make_optimizer


def _step(optimizer, table, dense, rows):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(table, rows) * [1.0, -2.0]) + tf.reduce_sum(dense ** 2)
    optimizer.apply_gradients(zip(tape.gradient(loss, [table, dense]), [table, dense]))


def test_lazy_adam_updates_only_touched_rows_and_matches_adam_on_them():
    start = np.arange(10, dtype=np.float32).reshape(5, 2)
    runs = {}
    for name, optimizer in (("lazy", LazyAdam(0.1)), ("adam", tf.keras.optimizers.Adam(0.1))):
        table, dense = tf.Variable(start), tf.Variable([1.0, -3.0])
        _step(optimizer, table, dense, tf.constant([1, 3, 3]))  # row 3 twice: summed
        first = table.numpy().copy()
        _step(optimizer, table, dense, tf.constant([0]))
        runs[name] = first, table.numpy(), dense.numpy()
    (lazy_1, lazy_2, lazy_dense), (adam_1, adam_2, adam_dense) = runs["lazy"], runs["adam"]
    # Step 1: Adam's untouched rows have zero moments too, so both agree everywhere.
    np.testing.assert_allclose(lazy_1, adam_1, rtol=1e-6)
    np.testing.assert_array_equal(lazy_1[[0, 2, 4]], start[[0, 2, 4]])
    assert not np.allclose(lazy_1[[1, 3]], start[[1, 3]])
    # Step 2 touches row 0 only: LazyAdam leaves rows 1 and 3 where step 1 put them,
    # Adam keeps moving them with their decayed momentum (a whole-table update).
    np.testing.assert_array_equal(lazy_2[[1, 2, 3, 4]], lazy_1[[1, 2, 3, 4]])
    assert not np.allclose(adam_2[[1, 3]], adam_1[[1, 3]])
    np.testing.assert_allclose(lazy_2[0], adam_2[0], atol=1e-6)
    np.testing.assert_allclose(lazy_dense, adam_dense, rtol=1e-6)


def test_make_optimizer_names_and_errors():
    assert isinstance(make_optimizer("lazy_adam", 0.01), LazyAdam)
    assert float(make_optimizer("adagrad", 0.05).learning_rate) == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamw'.*lazy_adam"):
        make_optimizer("adamw", 0.01)
    with pytest.raises(ValueError, match="amsgrad"):
        LazyAdam(amsgrad=True)
