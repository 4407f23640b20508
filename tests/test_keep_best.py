"""KeepBestEpoch: every trainer keeps the weights of its best validation epoch."""

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.training.keep_best import BestEpoch, KeepBestEpoch, fit_keep_best


def test_best_epoch_keeps_and_restores_the_best_values():
    v = tf.Variable(1.0)
    best = BestEpoch.of_variables(lambda: [v])
    assert best.update(0.5, epoch=0)
    v.assign(2.0)
    assert not best.update(0.4) and not best.update(float("nan"))
    best.restore()
    assert float(v.numpy()) == 1.0 and best.best == 0.5 and best.epoch == 0
    last = BestEpoch.of_variables(lambda: [v], nan_is_better=True)
    assert last.update(float("nan")) and last.update(0.1)


def _model():
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(2,))])
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss="mse")
    return model


def test_fit_restores_the_best_epoch_and_stops_after_patience():
    model = _model()
    x, y = np.ones((8, 2), np.float32), np.ones((8, 1), np.float32)
    scores = iter([0.2, 0.9, 0.5, 0.4, 0.3, 0.1])
    kept = {}

    class Record(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            kept[epoch] = [w.copy() for w in self.model.get_weights()]

    keep = KeepBestEpoch(score_fn=lambda: next(scores), log_key="val_fake", patience=2)
    history = model.fit(x, y, epochs=6, verbose=0, callbacks=[Record(), keep])
    assert len(history.history["loss"]) == 4  # best at epoch 1, two worse epochs, stop
    assert history.history["val_fake"] == [0.2, 0.9, 0.5, 0.4]
    assert keep.tracker.epoch == 1
    for got, want in zip(model.get_weights(), kept[1]):
        np.testing.assert_array_equal(got, want)


def test_initial_weights_compete_and_monitor_reads_logs():
    model = _model()
    start = [w.copy() for w in model.get_weights()]
    keep = KeepBestEpoch(score_fn=iter([1.0, 0.1, 0.2]).__next__, score_initial=True)
    model.fit(np.ones((4, 2)), np.zeros((4, 1)), epochs=2, verbose=0, callbacks=[keep])
    assert keep.scores == [1.0, 0.1, 0.2] and keep.tracker.epoch == -1
    for got, want in zip(model.get_weights(), start):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="exactly one"):
        KeepBestEpoch()
    with pytest.raises(ValueError, match="score_fn"):
        KeepBestEpoch(monitor="val_loss", score_initial=True)
    watch = KeepBestEpoch(monitor="loss")
    _model().fit(np.ones((4, 2)), np.zeros((4, 1)), epochs=3, verbose=0, callbacks=[watch])
    assert len(watch.scores) == 3 and watch.tracker.best == max(watch.scores)


def test_fit_keep_best_scores_between_epochs():
    model = _model()
    start = [w.copy() for w in model.get_weights()]
    scores = iter([0.5, 0.4, 0.3])
    history, tracker = fit_keep_best(model, np.ones((4, 2)), 2, lambda: next(scores),
                                     score_initial=True, verbose=0, y=np.zeros((4, 1)))
    assert history["scores"] == [0.5, 0.4, 0.3] and len(history["loss"]) == 2
    assert tracker.epoch == -1
    for got, want in zip(model.get_weights(), start):
        np.testing.assert_array_equal(got, want)
