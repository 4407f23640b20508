"""Weight histograms: TensorBoard's bucket layout, bounded reads of large tables."""

import os

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.histogram import summary_v2
from tensorboard.util import tensor_util

from tfrec.training.histograms import (SampledTensorBoard, histogram_buckets, sample_values,
                                       write_weight_histograms)


@pytest.mark.parametrize("values", [
    np.random.default_rng(0).normal(size=1000),
    np.array([0.5, 0.5, 0.5]),  # one value
    np.array([-3.0, 0.0, 0.0, 1.0, 7.0]),  # the max lands in the last bucket
])
def test_buckets_match_tensorboards_own(values):
    ours = histogram_buckets(values)
    theirs = summary_v2._buckets(tf.constant(values)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_non_finite_values_are_left_out():
    buckets = histogram_buckets(np.array([1.0, np.nan, 2.0, np.inf]))
    assert buckets[:, 2].sum() == 2
    assert histogram_buckets(np.array([np.nan]))[:, 2].sum() == 0


def test_a_large_table_is_sampled_by_rows_and_counted_whole():
    table = tf.Variable(tf.reshape(tf.range(100_000 * 8, dtype=tf.float32), [100_000, 8]))
    values = sample_values(table, max_values=4096)
    assert 0 < values.size <= 4096
    assert values.size % 8 == 0  # whole rows
    # evenly spaced rows from the first to near the last
    assert values[0] == 0 and values[-8] >= (100_000 - 200) * 8
    small = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(sample_values(small), [1, 2, 3, 4])
    with pytest.raises(ValueError, match="max_values must be positive"):
        sample_values(small, 0)


def test_histograms_are_written_as_tensorboard_reads_them(tmp_path):
    table = tf.Variable(tf.random.stateless_normal([50_000, 16], seed=[1, 2]), name="items")
    bias = tf.Variable(tf.zeros([3]), name="bias")
    ids = tf.Variable(["a", "b"], name="ids")  # strings have no histogram
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        assert write_weight_histograms([table, bias, ids, table], step=3, max_values=8192) == 2
    writer.flush()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["tensors"]) == {"items_0/histogram", "bias_0/histogram"}
    event = acc.Tensors("items_0/histogram")[0]
    buckets = tensor_util.make_ndarray(event.tensor_proto)
    assert event.step == 3 and buckets.shape == (30, 3)
    assert buckets[:, 2].sum() == pytest.approx(50_000 * 16)  # the whole table's count
    # A normal sample: about 68% of the values within one sd of 0.
    centers = (buckets[:, 0] + buckets[:, 1]) / 2
    assert buckets[np.abs(centers) < 1.0, 2].sum() / buckets[:, 2].sum() == pytest.approx(
        0.68, abs=0.05)
    assert acc.SummaryMetadata("items_0/histogram").plugin_data.plugin_name == "histograms"


def test_the_callback_logs_every_layers_weights(tmp_path):
    model = tf.keras.Sequential([tf.keras.layers.Embedding(1000, 4, input_length=1),
                                 tf.keras.layers.Flatten(), tf.keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.arange(64).reshape([-1, 1]), np.zeros([64, 1])
    model.fit(x, y, epochs=2, verbose=0,
              callbacks=[SampledTensorBoard(str(tmp_path), histogram_freq=1)])
    acc = EventAccumulator(os.path.join(str(tmp_path), "train"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["tensors"] if t.endswith("/histogram")]
    assert len(tags) == 3, tags  # embeddings, kernel, bias
    assert all(len(acc.Tensors(t)) == 2 for t in tags)  # one per epoch
