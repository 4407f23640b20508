"""Packs a batch's fixed-shape columns into one matrix per dtype, and back.

tf.data pays per component for every element it shuffles and batches: a preprocessed
retrieval example has ~20 small tensors, so the in-memory cache re-batched them slower
than the model trained on them. Packed, an example is one row per dtype plus its
variable-length columns.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import tensorflow as tf

PACKED_PREFIX = "packed_"


class ColumnPacker:
    """Flattens a batch structure into {dtype: [B, width]} plus the variable columns.

    Components whose per-example shape is fully known are flattened to [B, n] and
    concatenated per dtype; the others (e.g. -1 padded trigram buckets, whose width
    varies per batch) stay as they are, keyed by their position.

    Args:
      spec: the batched element spec ([B, ...] tensors) of the structure to pack.

    Raises:
      ValueError: a component that is not a dense tensor, or has no batch dimension.
    """

    def __init__(self, spec: Any):
        self._spec = spec
        self._flat = tf.nest.flatten(spec)
        self._fixed: Dict[str, List[Tuple[int, tf.TensorShape, int]]] = {}
        self._variable: List[int] = []
        for i, s in enumerate(self._flat):
            if not isinstance(s, tf.TensorSpec) or s.shape.rank is None or s.shape.rank < 1:
                raise ValueError(f"ColumnPacker packs dense [batch, ...] tensors; component "
                                 f"{i} is {s!r}")
            row = s.shape[1:]
            if row.is_fully_defined():
                self._fixed.setdefault(s.dtype.name, []).append(
                    (i, row, row.num_elements()))
            else:
                self._variable.append(i)

    @property
    def variable_keys(self) -> List[str]:
        """Keys of the packed dict that hold variable-length columns as they came."""
        return [str(i) for i in self._variable]

    def pack(self, batch: Any) -> Dict[str, tf.Tensor]:
        """The batch as {"packed_<dtype>": [B, width], "<position>": variable column}."""
        flat = tf.nest.flatten(batch)
        out = {f"{PACKED_PREFIX}{dtype}": tf.concat(
            [tf.reshape(flat[i], [-1, n]) for i, _, n in cols], axis=1)
            for dtype, cols in self._fixed.items()}
        out.update({str(i): flat[i] for i in self._variable})
        return out

    def unpack(self, packed: Dict[str, tf.Tensor]) -> Any:
        """Inverse of `pack`: the original structure, shapes and dtypes."""
        flat: List[Any] = [None] * len(self._flat)
        for dtype, cols in self._fixed.items():
            matrix = packed[f"{PACKED_PREFIX}{dtype}"]
            parts = tf.split(matrix, [n for _, _, n in cols], axis=1)
            for (i, row, _), part in zip(cols, parts):
                flat[i] = tf.reshape(part, [-1] + row.as_list())
        for i in self._variable:
            flat[i] = packed[str(i)]
        return tf.nest.pack_sequence_as(self._spec, flat)
