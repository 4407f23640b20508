"""Warm-up requests written with every export (`assets.extra/tf_serving_warmup_requests`).

The first call of a freshly loaded SavedModel pays for graph optimisation and kernel
set-up (1-2 s here); TF Serving (and tfrec's server) replays the requests in this file
before a version takes traffic, so no shopper's request pays it. The format is TF
Serving's: a TFRecord file of `PredictionLog` protos holding `PredictRequest`s.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Mapping, Optional

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

log = logging.getLogger(__name__)

__all__ = ["WARMUP_FILE", "sample_inputs", "warmup_requests", "write_warmup"]

WARMUP_FILE = "tf_serving_warmup_requests"  # under assets.extra/, TF Serving's name


def _input_specs(function) -> Optional[Dict[str, tf.TensorSpec]]:
    """Signature input key -> spec of a concrete function, None if a key is unknowable.

    Keys are what `tf.saved_model.save` names the signature's inputs: a positional
    spec's name, the keys of a positional dict of specs, keyword names.
    """
    args, kwargs = function.structured_input_signature
    specs: Dict[str, tf.TensorSpec] = {}
    for arg in list(args) + [dict(kwargs)]:
        if arg is None:  # a Python default baked into the signature, not an input
            continue
        if isinstance(arg, tf.TensorSpec) and arg.name:
            specs[arg.name] = arg
        elif isinstance(arg, Mapping) and all(isinstance(v, tf.TensorSpec)
                                              for v in arg.values()):
            specs.update(arg)
        else:
            return None
    return specs


def _call(function, values: Mapping[str, np.ndarray]) -> None:
    """Calls `function` with `values` laid out as its input signature."""
    args, kwargs = function.structured_input_signature

    def tensor(key: str, spec: tf.TensorSpec) -> tf.Tensor:
        return tf.constant(values[key], dtype=spec.dtype)

    positional = [None if a is None else tensor(a.name, a) if isinstance(a, tf.TensorSpec)
                  else {k: tensor(k, v) for k, v in a.items()} for a in args]
    function(*positional, **{k: tensor(k, v) for k, v in kwargs.items()})


def _sample(spec: tf.TensorSpec, value: object = None) -> np.ndarray:
    shape = [1 if d is None else int(d) for d in spec.shape.as_list()]
    if value is not None:
        return np.full(shape, value, dtype=object if spec.dtype == tf.string
                       else spec.dtype.as_numpy_dtype)
    if spec.dtype == tf.string:
        return np.full(shape, "x", dtype=object)
    if spec.dtype == tf.bool:
        return np.zeros(shape, dtype=bool)
    return np.full(shape, 1 if spec.dtype.is_integer else 0.0, dtype=spec.dtype.as_numpy_dtype)


def sample_inputs(function, values: Optional[Mapping[str, object]] = None
                  ) -> Dict[str, np.ndarray]:
    """One-row inputs of a signature, by input key, from its specs ("x", 1, 0.0, False).

    Unknown dimensions become 1; integers are 1, so a top-k signature is valid.

    Args:
      function: a concrete function (a signature).
      values: input key -> the value to fill that input with instead (e.g. a catalog
        item id for inputs that refuse unknown ids).

    Raises:
      ValueError: an input whose signature key cannot be told (an unnamed spec).
    """
    specs = _input_specs(function)
    if specs is None:
        raise ValueError("the function has an input without a name")
    values = values or {}
    return {key: _sample(spec, values.get(key)) for key, spec in specs.items()}


def _cause(error: Exception) -> str:
    """The line of an error that says what failed: a graph error's message holds the
    Python stack of the failing op first and the cause last (then indented node names)."""
    lines = [line for line in str(error).splitlines()
             if line.strip() and not line[:1].isspace()]
    return lines[-1] if lines else type(error).__name__


def warmup_requests(model_name: str, signatures: Mapping[str, object],
                    values: Optional[Mapping[str, object]] = None
                    ) -> List[predict_pb2.PredictRequest]:
    """A PredictRequest per signature that answers its sample inputs.

    Each sample is run once here: a signature that refuses it (e.g. `similar_items` of
    an unknown item id "x" when `values` names no catalog item) gets no warm-up request,
    since a failing warm-up request would make TF Serving refuse the whole version.

    Args:
      model_name: the model the requests are addressed to.
      signatures: signature name -> concrete function.
      values: input key -> sample value (see `sample_inputs`).
    """
    requests = []
    for name, function in sorted(signatures.items()):
        try:
            inputs = sample_inputs(function, values)
            _call(function, inputs)
        except (tf.errors.OpError, ValueError, TypeError) as e:
            log.info("no warm-up request for signature %r: its sample input fails (%s: %s)",
                     name, type(e).__name__, _cause(e)[:300])
            continue
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = name
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        requests.append(request)
    return requests


def write_warmup(version_dir: str, requests: List[predict_pb2.PredictRequest]) -> str:
    """Writes `requests` to `<version_dir>/assets.extra/tf_serving_warmup_requests`."""
    extra = os.path.join(version_dir, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    path = os.path.join(extra, WARMUP_FILE)
    with tf.io.TFRecordWriter(path) as writer:
        for request in requests:
            record = prediction_log_pb2.PredictionLog()
            record.predict_log.request.CopyFrom(request)
            writer.write(record.SerializeToString())
    return path
