"""BestEpoch: the keep-best-epoch tracker of the search training loops."""

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.training.best_epoch import BestEpoch


def test_best_epoch_keeps_and_restores_the_best_values():
    v = tf.Variable(1.0)
    best = BestEpoch(lambda: [v])
    assert best.update(0.5)
    v.assign(2.0)
    assert not best.update(0.4) and not best.update(float("nan"))
    best.restore()
    assert float(v.numpy()) == 1.0 and best.best == 0.5
    last = BestEpoch(lambda: [v], nan_is_better=True)
    assert last.update(float("nan")) and last.update(0.1)
