"""Warm-up requests written with every export (`assets.extra/tf_serving_warmup_requests`).

The first call of a freshly loaded SavedModel pays for graph optimisation and kernel
set-up (1-2 s here); TF Serving (and tfrec's server) replays the requests in this file
before a version takes traffic, so no shopper's request pays it. The format is TF
Serving's: a TFRecord file of `PredictionLog` protos holding `PredictRequest`s.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Mapping, Tuple

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

log = logging.getLogger(__name__)

__all__ = ["WARMUP_FILE", "sample_inputs", "warmup_requests", "write_warmup"]

WARMUP_FILE = "tf_serving_warmup_requests"  # under assets.extra/, TF Serving's name


def _specs(function) -> Tuple[List[Tuple[str, tf.TensorSpec]], List[Tuple[str, tf.TensorSpec]]]:
    """(positional, keyword) (signature input key, spec) pairs of a concrete function.

    A positional spec's key is its name (what `tf.saved_model.save` uses as the input key
    of the signature); None if one is unnamed.
    """
    args, kwargs = function.structured_input_signature
    positional = [(spec.name, spec) for spec in args]
    return positional, list(kwargs.items())


def _sample(spec: tf.TensorSpec) -> np.ndarray:
    shape = [1 if d is None else int(d) for d in spec.shape.as_list()]
    if spec.dtype == tf.string:
        return np.full(shape, "x", dtype=object)
    if spec.dtype == tf.bool:
        return np.zeros(shape, dtype=bool)
    return np.full(shape, 1 if spec.dtype.is_integer else 0.0, dtype=spec.dtype.as_numpy_dtype)


def sample_inputs(function) -> Dict[str, np.ndarray]:
    """One-row inputs of a signature, by input key, from its specs ("x", 1, 0.0, False).

    Unknown dimensions become 1; integers are 1, so a top-k signature is valid.
    """
    positional, keyword = _specs(function)
    return {key: _sample(spec) for key, spec in positional + keyword}


def warmup_requests(model_name: str, signatures: Mapping[str, object]
                    ) -> List[predict_pb2.PredictRequest]:
    """A PredictRequest per signature that answers its sample inputs.

    Each sample is run once here: a signature that refuses it (e.g. `similar_items` of
    an unknown item id "x") gets no warm-up request, since a failing warm-up request
    would make TF Serving refuse the whole version.
    """
    requests = []
    for name, function in sorted(signatures.items()):
        positional, keyword = _specs(function)
        if any(key is None for key, _ in positional):
            log.info("no warm-up request for signature %r: an input spec has no name", name)
            continue
        inputs = sample_inputs(function)
        try:
            function(*[tf.constant(inputs[k], dtype=s.dtype) for k, s in positional],
                     **{k: tf.constant(inputs[k], dtype=s.dtype) for k, s in keyword})
        except (tf.errors.OpError, ValueError, TypeError) as e:
            log.info("no warm-up request for signature %r: its sample input fails (%s)", name,
                     type(e).__name__)
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
