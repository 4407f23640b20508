"""Optimizers whose step cost follows the batch, not the size of the embedding tables.

Keras' Adam decays both moment tables and rewrites every row of an embedding table on
each step, even for the few rows a batch touched (about 1 s a step at 1M items on 2
cores). `LazyAdam` updates only those rows; dense weights get plain Adam.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

__all__ = ["LazyAdam", "OPTIMIZERS", "make_optimizer"]


class LazyAdam(tf.keras.optimizers.Adam):
    """Adam with row-wise sparse updates for embedding tables.

    For a sparse (IndexedSlices) gradient, only the rows in the batch have their first and
    second moments and weights updated; rows not seen keep their moments until they are
    next touched (the moments of a row decay per update of that row, not per step). The
    bias correction uses the global step, as in TF Addons' LazyAdam. Duplicate rows in a
    batch are summed first. Dense gradients (layers, biases) are plain Adam.

    Args:
      learning_rate, beta_1, beta_2, epsilon, **kwargs: as `tf.keras.optimizers.Adam`.

    Raises:
      ValueError: amsgrad=True (not defined lazily).
    """

    def __init__(self, learning_rate: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, name: str = "LazyAdam", **kwargs: Any):
        if kwargs.get("amsgrad"):
            raise ValueError("LazyAdam does not support amsgrad; use optimizer: adam")
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                         epsilon=epsilon, name=name, **kwargs)

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        alpha = (tf.cast(self.learning_rate, dtype) * tf.sqrt(1 - tf.pow(beta_2, step))
                 / (1 - tf.pow(beta_1, step)))
        key = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[key], self._velocities[key]
        rows, position = tf.unique(gradient.indices)
        grad = tf.math.unsorted_segment_sum(gradient.values, position, tf.shape(rows)[0])
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * grad
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(grad)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon),
                                              rows))


OPTIMIZERS: Dict[str, Callable[..., tf.keras.optimizers.Optimizer]] = {
    "adagrad": tf.keras.optimizers.Adagrad,
    "adam": tf.keras.optimizers.Adam,
    "lazy_adam": LazyAdam,
    "sgd": tf.keras.optimizers.SGD,
}


def make_optimizer(name: str, learning_rate: float) -> tf.keras.optimizers.Optimizer:
    """The optimizer `train.optimizer` names.

    Raises:
      ValueError: an unknown name (the message lists the known ones).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; use one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](learning_rate=learning_rate)
