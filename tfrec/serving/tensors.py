"""TensorProto <-> numpy conversions with the validation TF Serving does on requests.

Malformed protos must become INVALID_ARGUMENT answers, never a crash or a silently
padded tensor, so every check raises a `TensorError` whose message names the input.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

# Repeated value field holding the elements of each dtype (when tensor_content is empty).
_VALUE_FIELDS = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_STRING: "string_val",
    types_pb2.DT_HALF: "half_val",
    types_pb2.DT_BFLOAT16: "half_val",
}
# Complex numbers take two proto values per element.
_COMPLEX_FIELDS = {types_pb2.DT_COMPLEX64: "scomplex_val", types_pb2.DT_COMPLEX128: "dcomplex_val"}


class TensorError(ValueError):
    """A request tensor is malformed or does not fit the signature.

    The message is sent back verbatim as the INVALID_ARGUMENT detail.
    """


class TooLargeError(TensorError):
    """A request tensor is over a configured size limit (RESOURCE_EXHAUSTED)."""


def check_size(proto: tensor_pb2.TensorProto, name: str, max_rows: int = 0,
               max_elements: int = 0) -> None:
    """Refuses a tensor whose declared shape is over the server's limits, from its header.

    A 40-byte TensorProto can declare [100000] and one value that TF broadcasts: the
    cost is in the shape, not the message size, so it is checked before decoding.

    Args:
      proto: The request TensorProto.
      name: Input alias used in error messages.
      max_rows: Largest first dimension (batch rows); 0 disables the check.
      max_elements: Largest number of elements; 0 disables the check.
    """
    shape = shape_of(proto)
    if not shape or any(d < 0 for d in shape):
        return  # to_ndarray reports unknown ranks and negative dimensions
    if max_rows and shape[0] > max_rows:
        raise TooLargeError(f"input '{name}' has {shape[0]} rows; the server accepts at most "
                            f"{max_rows} rows per request (max_request_rows)")
    elements = int(np.prod(shape, dtype=np.float64))  # float: no int64 overflow
    if max_elements and elements > max_elements:
        raise TooLargeError(f"input '{name}' has shape {format_shape(shape)} ({elements} "
                            f"elements); the server accepts at most {max_elements} elements "
                            f"per tensor (max_tensor_elements)")


def dtype_name(dtype: Any) -> str:
    """`DT_INT32`-style name of a DataType enum, tf.DType or numpy dtype."""
    if isinstance(dtype, int):
        return types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else (
            f"DT_<{dtype}>")
    return types_pb2.DataType.Name(tf.as_dtype(dtype).as_datatype_enum)


def shape_of(proto: tensor_pb2.TensorProto) -> Optional[Tuple[int, ...]]:
    """Shape declared by a TensorProto; None when its rank is unknown."""
    if proto.tensor_shape.unknown_rank:
        return None
    return tuple(int(d.size) for d in proto.tensor_shape.dim)


def format_shape(shape: Optional[Sequence[Optional[int]]]) -> str:
    """`[?,5]`: the notation TF uses in shape error messages."""
    if shape is None:
        return "<unknown rank>"
    return "[" + ",".join("?" if d is None or d < 0 else str(d) for d in shape) + "]"


def to_ndarray(proto: tensor_pb2.TensorProto, name: str = "tensor") -> np.ndarray:
    """Decodes a request TensorProto, rejecting any whose content does not fit its shape.

    TF itself pads short value lists with the last value; we only accept an exact
    count or a single value (what `tf.make_tensor_proto` emits for a broadcast scalar).

    Args:
      proto: The TensorProto of one input.
      name: Input alias used in error messages.
    """
    if proto.dtype == types_pb2.DT_INVALID:
        raise TensorError(f"input '{name}' has no dtype (DT_INVALID)")
    if proto.dtype not in _VALUE_FIELDS and proto.dtype not in _COMPLEX_FIELDS:
        raise TensorError(f"input '{name}' has unsupported dtype {dtype_name(proto.dtype)}")
    shape = shape_of(proto)
    if shape is None:
        raise TensorError(f"input '{name}' has an unknown rank; a full shape is required")
    if any(d < 0 for d in shape):
        raise TensorError(f"input '{name}' has a negative dimension in shape {list(shape)}")
    num_elements = int(np.prod(shape, dtype=np.int64))
    dtype = tf.as_dtype(proto.dtype)

    if proto.tensor_content:
        if proto.dtype == types_pb2.DT_STRING:
            raise TensorError(f"input '{name}': DT_STRING tensors cannot use tensor_content")
        expected = num_elements * dtype.size
        if len(proto.tensor_content) != expected:
            raise TensorError(
                f"input '{name}' has {len(proto.tensor_content)} bytes of tensor_content but "
                f"shape {list(shape)} of {dtype_name(proto.dtype)} needs {expected}")
    else:
        field = _VALUE_FIELDS.get(proto.dtype) or _COMPLEX_FIELDS[proto.dtype]
        count = len(getattr(proto, field))
        if proto.dtype in _COMPLEX_FIELDS:
            if count % 2:
                raise TensorError(f"input '{name}' has an odd number of {field} entries")
            count //= 2
        if count != num_elements and not (count == 1 and num_elements > 1):
            raise TensorError(
                f"input '{name}' has {count} values in {field} but its shape {list(shape)} "
                f"holds {num_elements}")
    try:
        return tf.make_ndarray(proto)
    except Exception as e:  # decoding errors not caught above, e.g. odd layouts
        raise TensorError(f"input '{name}' could not be decoded: {e}") from e


def from_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """Decodes a response TensorProto (trusted) to numpy; strings stay bytes."""
    return np.asarray(tf.make_ndarray(proto))


def to_proto(value: Any, dtype: Any = None) -> tensor_pb2.TensorProto:
    """Encodes an array-like (or tf.Tensor) as a TensorProto.

    Args:
      value: numpy array, nested lists, scalar or eager tensor; str becomes DT_STRING.
      dtype: Optional dtype to cast to, e.g. tf.int32 for `k`.
    """
    if isinstance(value, tensor_pb2.TensorProto):
        return value
    if isinstance(value, tf.Tensor):
        value = value.numpy()
    return tf.make_tensor_proto(value, dtype=dtype)


def check_against_spec(proto: tensor_pb2.TensorProto, spec: tf.TensorSpec, name: str) -> None:
    """Checks a request tensor's dtype and shape against the signature's TensorSpec.

    Done on the proto header before decoding, so a wrong request costs nothing.

    Args:
      proto: The request TensorProto.
      spec: The signature input spec (`structured_input_signature`).
      name: Input alias used in error messages.
    """
    expected = spec.dtype.as_datatype_enum
    if proto.dtype != expected:
        raise TensorError(
            f"input '{name}' has dtype {dtype_name(proto.dtype)} but signature expects "
            f"{dtype_name(expected)}")
    shape = shape_of(proto)
    if shape is None:
        raise TensorError(f"input '{name}' has an unknown rank; a full shape is required")
    if spec.shape.rank is None:
        return
    if len(shape) != spec.shape.rank:
        raise TensorError(
            f"input '{name}' has shape {format_shape(shape)} (rank {len(shape)}) but signature "
            f"expects {format_shape(spec.shape.as_list())} (rank {spec.shape.rank})")
    for got, want in zip(shape, spec.shape.as_list()):
        if want is not None and got != want:
            raise TensorError(
                f"input '{name}' has shape {format_shape(shape)} but signature expects "
                f"{format_shape(spec.shape.as_list())}")


def check_values(array: np.ndarray, name: str, max_string_bytes: int = 0,
                 allow_non_finite: bool = False) -> None:
    """Rejects values a model would silently turn into garbage: NaN/Inf, huge strings.

    A NaN price becomes a nonsense embedding rather than an error, and a multi-MB
    string costs tokenizer time on every request, so both stop at the server's door.

    Args:
      array: A decoded request tensor.
      name: Input alias used in error messages.
      max_string_bytes: Longest string element accepted; 0 disables the check.
      allow_non_finite: Accept NaN and +-Inf in floating-point inputs.
    """
    if array.dtype.kind in "fc" and not allow_non_finite and array.size:
        bad = ~np.isfinite(array)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            value = array[where]
            raise TensorError(
                f"input '{name}' has a non-finite value ({value}) at index {list(where)}; "
                f"NaN and Inf are rejected, send finite numbers")
    if array.dtype == object and max_string_bytes > 0 and array.size:
        lengths = np.fromiter(map(len, array.ravel()), dtype=np.int64, count=array.size)
        longest = int(lengths.argmax())
        if lengths[longest] > max_string_bytes:
            where = [int(i) for i in np.unravel_index(longest, array.shape)]
            raise TensorError(
                f"input '{name}' has a string of {lengths[longest]} bytes at index {where}; "
                f"the server accepts at most {max_string_bytes} bytes per string "
                f"(max_string_bytes)")


def shape_proto_to_tuple(shape: tensor_shape_pb2.TensorShapeProto) -> Optional[Tuple]:
    """TensorShapeProto -> tuple with None for unknown dims (None for unknown rank)."""
    if shape.unknown_rank:
        return None
    return tuple(None if d.size < 0 else int(d.size) for d in shape.dim)
