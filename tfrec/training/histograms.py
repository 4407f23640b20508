"""Weight histograms for TensorBoard whose cost does not grow with the catalog.

Keras' TensorBoard callback buckets every value of every weight with eager one-hot ops:
a 1M x 64 item table took 25 s and gigabytes per epoch, and a tiny model's ~60 weights
a third of its training time. Here each weight is read once, at most `max_values` of its
values are bucketed in NumPy, and the buckets are written as the histogram plugin's
own summary, so TensorBoard shows them exactly as before.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf
from tensorboard.plugins.histogram import metadata as histogram_metadata

BUCKETS = 30  # TensorBoard's default bucket count
MAX_VALUES = 1 << 16  # values bucketed per weight; a sample of larger ones


def sample_values(weight: tf.Variable, max_values: int = MAX_VALUES) -> np.ndarray:
    """Up to `max_values` values of `weight`, flattened: all of a small weight, evenly
    spaced rows of a large one (e.g. every 16th item of a catalog's embeddings).

    The variable is read whole and sliced, never gathered: a gather on a variable would
    make each later whole read of it (a matmul in the training step) copy it.

    Args:
      weight: a variable (or tensor) of numbers.
      max_values: cap on the values returned (at least one row).

    Raises:
      ValueError: max_values not positive.
    """
    if max_values <= 0:
        raise ValueError(f"max_values must be positive, got {max_values}")
    values = tf.convert_to_tensor(weight)
    size = int(np.prod(values.shape)) if values.shape.rank else 1
    if size > max_values and values.shape.rank:
        rows = int(values.shape[0])
        per_row = max(1, size // max(rows, 1))
        stride = -(-rows // max(1, max_values // per_row))  # ceil: at most max_values
        values = values[::stride]
    return np.asarray(values.numpy(), dtype=np.float64).reshape([-1])


def histogram_buckets(values: np.ndarray, scale: float = 1.0,
                      buckets: int = BUCKETS) -> np.ndarray:
    """[buckets, 3] (left edge, right edge, count) as TensorBoard's histogram summary
    lays them out: equal widths from min to max, the max in the last bucket.

    Args:
      values: numbers; non-finite ones are left out.
      scale: multiplies the counts (the weight's size over the sample's).
      buckets: bucket count.

    Returns:
      float64 buckets; all zero when no value is finite.
    """
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.zeros([buckets, 3], np.float64)
    low, high = float(values.min()), float(values.max())
    if low == high:  # one value: TensorBoard's own layout, everything in the last bucket
        counts = np.zeros([buckets], np.float64)
        counts[-1] = values.size
        edges = np.full([buckets], high)
        return np.stack([edges, edges, counts * scale], axis=1)
    counts, edges = np.histogram(values, bins=buckets, range=(low, high))
    return np.stack([edges[:-1], edges[1:], counts.astype(np.float64) * scale], axis=1)


def write_weight_histograms(weights: Iterable[tf.Variable], step: int,
                            max_values: int = MAX_VALUES) -> int:
    """Writes `<name>/histogram` for each numeric weight to the default summary writer.

    Returns:
      the number of histograms written.
    """
    metadata = histogram_metadata.create_summary_metadata(display_name=None,
                                                          description=None)
    seen, written = set(), 0
    for weight in weights:
        if id(weight) in seen or not (weight.dtype.is_floating or weight.dtype.is_integer):
            continue
        seen.add(id(weight))
        size = max(1, weight.shape.num_elements() or 1)
        values = sample_values(weight, max_values)
        buckets = histogram_buckets(values, scale=size / max(1, values.size))
        tf.summary.write(weight.name.replace(":", "_") + "/histogram",
                         tf.constant(buckets, tf.float64), step=step, metadata=metadata)
        written += 1
    return written


class SampledTensorBoard(tf.keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback with `write_weight_histograms` for its histograms.

    Everything else (scalars, profiler, graph, images) is Keras' own.
    """

    def _log_weights(self, epoch: int) -> None:
        with self._train_writer.as_default(), tf.summary.record_if(True):
            write_weight_histograms(
                (w for layer in self.model.layers for w in layer.weights), epoch)
            if self.write_images:
                for layer in self.model.layers:
                    for weight in layer.weights:
                        self._log_weight_as_image(
                            weight, weight.name.replace(":", "_") + "/image", epoch)
            self._train_writer.flush()
