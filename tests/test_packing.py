"""ColumnPacker: a batch structure packed into one matrix per dtype and back, exactly."""

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.data.packing import PACKED_PREFIX, ColumnPacker


def _batch():
    return {
        "query": {"user": tf.constant([3, 4], tf.int64),
                  "history": tf.constant([[1, 2, 0], [5, 6, 7]], tf.int64),
                  "grams": tf.constant([[9, -1], [8, 7]], tf.int64)},
        "price": {"scaled": tf.constant([0.5, 1.5]), "pair": tf.constant([[1., 2.], [3., 4.]])},
        "title": tf.constant(["无线耳机", "café"]),
        "cube": tf.reshape(tf.range(16, dtype=tf.int64), [2, 2, 2, 2]),
    }


def _spec(batch):
    # What a batched dataset reports: a batch dimension of unknown size, and the
    # variable-length column's width unknown too.
    def one(path_is_grams, t):
        shape = [None] + ([None] if path_is_grams else t.shape[1:].as_list())
        return tf.TensorSpec(shape, t.dtype)
    spec = tf.nest.map_structure(lambda t: one(False, t), batch)
    spec["query"]["grams"] = one(True, batch["query"]["grams"])
    return spec


def test_round_trip_keeps_values_shapes_and_dtypes():
    batch = _batch()
    packer = ColumnPacker(_spec(batch))
    packed = packer.pack(batch)
    # One matrix per dtype (int64, float32, string) plus the variable-length column.
    assert sorted(k for k in packed if k.startswith(PACKED_PREFIX)) == [
        PACKED_PREFIX + "float32", PACKED_PREFIX + "int64", PACKED_PREFIX + "string"]
    assert packed[PACKED_PREFIX + "int64"].shape == (2, 1 + 3 + 8)
    assert packer.variable_keys == [k for k in packed if not k.startswith(PACKED_PREFIX)]
    back = packer.unpack(packed)
    tf.nest.assert_same_structure(back, batch)
    for got, want in zip(tf.nest.flatten(back), tf.nest.flatten(batch)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert back["title"].numpy()[0].decode() == "无线耳机"


def test_round_trip_inside_tf_data_batches():
    """Packed examples shuffled and re-batched by tf.data unpack to the same rows."""
    batch = _batch()
    packer = ColumnPacker(_spec(batch))
    ds = (tf.data.Dataset.from_tensors(batch).map(packer.pack).unbatch()
          .padded_batch(2, padding_values={k: tf.constant("" if v.dtype == tf.string else -1,
                                                          v.dtype)
                                           for k, v in packer.pack(batch).items()})
          .map(packer.unpack))
    back = next(iter(ds))
    np.testing.assert_array_equal(back["cube"].numpy(), batch["cube"].numpy())
    np.testing.assert_array_equal(back["query"]["grams"].numpy(),
                                  batch["query"]["grams"].numpy())


def test_rejects_components_without_a_batch_dimension():
    with pytest.raises(ValueError, match="dense \\[batch, ...\\] tensors"):
        ColumnPacker({"scalar": tf.TensorSpec([], tf.int64)})
