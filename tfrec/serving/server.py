"""An in-process gRPC model server speaking TensorFlow Serving's API.

Clients written for TF Serving (PredictionService, ModelService) work unchanged, so
the same client code runs against this server in tests and TF Serving in production.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import logging
import re
import socket
import time
import uuid
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfrec.serving import tensors
from tfrec.serving.batching import Batcher, BatchError, BatchingOptions
from tfrec.serving.cancel import CallStopped, Canceller
from tfrec.serving.experiments import (
    ARM_OUTPUT,
    ITEM_OUTPUT,
    K_INPUT,
    USER_INPUT,
    Arm,
    Draw,
    Experiment,
    Exploration,
    check_models,
    describe,
)
from tfrec.serving.model_config import parse_model_config
from tfrec.serving.model_manager import (
    LoadedVersion,
    ModelManager,
    ServableNotFoundError,
    grpc_code,
    managers_from,
)
from tfrec.serving.monitoring import UNKNOWN, MetricsHTTPServer, ServingMetrics
from tfrec.serving.request_log import REQUEST_ID_KEY, RequestLog, Served

logger = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
SIGNATURE_DEF_FIELD = "signature_def"
_REQUEST_ID_CHARS = 128


_ECHO_CHARS = 100  # of a client-sent name repeated in an error message
_MESSAGE_CHARS = 2000  # of any error message


def echo(name: str, limit: int = _ECHO_CHARS) -> str:
    """A client-sent name as error messages repeat it: a 1 MB model name is not sent back."""
    name = str(name)
    return name if len(name) <= limit else f"{name[:limit]}...({len(name)} chars)"


class RpcAbort(Exception):
    """Ends an RPC with a status; raised by request handling, turned into context.abort.

    The message is cut to _MESSAGE_CHARS characters (names in it are cut by `echo`).
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        if len(message) > _MESSAGE_CHARS:
            message = message[:_MESSAGE_CHARS] + "...(cut)"
        super().__init__(message)
        self.code = code
        self.message = message


_TF_NOISE = re.compile(r"\s*(\[\[\{\{node [^}]*\}\}\]\]|\[Op:[^\]]*\])")


def short_tf_message(error: tf.errors.OpError, limit: int = 500) -> str:
    """The op's own message from a TF runtime error, without node and traceback noise.

    Args:
      error: The error raised by the signature call.
      limit: Maximum characters kept.
    """
    text = error.message or str(error)
    kept = []
    for line in text.splitlines():
        if (not line.strip() or line[:1].isspace() or line.startswith("Graph execution error")
                or line.startswith("Detected at node") or line.startswith("Node: ")
                or line.startswith("<stack traces unavailable>")):
            continue  # blank, indented stack frames/node refs, and headers
        kept.append(line)
    text = _TF_NOISE.sub("", " ".join(kept) if kept else text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass
class _Call:
    """Metric labels of one RPC, filled in as far as the request was understood."""

    method: str
    model: str = UNKNOWN
    signature: str = ""


def _rpc(method: Callable) -> Callable:
    """Maps exceptions of a handler to gRPC statuses and records the RPC's metrics.

    The handler gets a `_Call` to fill in its labels; the server keeps running whatever
    the handler raises.
    """

    @functools.wraps(method)
    def wrapper(self, request, context):
        start = time.perf_counter()
        spec = getattr(request, "model_spec", None)  # absent in e.g. ReloadConfigRequest
        name = spec.name if spec is not None else ""
        call = _Call(method.__name__, name if name in self._models.managers else UNKNOWN)
        code = grpc.StatusCode.OK
        try:
            response = method(self, request, context, call)
            limit = getattr(self, "_max_response_bytes", 0)
            size = response.ByteSize() if limit else 0
            if size > limit:  # gRPC would fail to send it; say why, count it as failed
                raise RpcAbort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"response of {size} bytes is larger than the server's max message size "
                    f"({limit} bytes, max_message_mb); ask for fewer rows, a smaller k or "
                    "fewer outputs (output_filter)")
            if not context.is_active():  # nobody gets this reply: not an OK
                left = context.time_remaining()
                raise RpcAbort(
                    grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0
                    else grpc.StatusCode.CANCELLED,
                    "the call ended (client cancelled or deadline passed) before the reply")
            return response
        except RpcAbort as e:
            code, message = e.code, e.message
        except Exception as e:  # a bug or an unexpected model failure
            logger.exception("%s failed", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
        finally:
            if self._metrics is not None:
                self._metrics.record_request(call.method, call.model, call.signature, code.name,
                                             time.perf_counter() - start)
        if code != grpc.StatusCode.INTERNAL:
            logger.info("%s -> %s: %s", method.__name__, code.name, message)
        context.abort(code, message)

    return wrapper


class _Models:
    """Name -> ModelManager lookups with TF Serving's NOT_FOUND wording."""

    def __init__(self, managers: Mapping[str, ModelManager]):
        self.managers = managers

    def manager(self, spec) -> ModelManager:
        if not spec.name:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "model_spec.name must be set")
        manager = self.managers.get(spec.name)
        if manager is None:
            name = echo(spec.name)
            request = (f"Specific({name}, {spec.version.value})" if spec.HasField("version")
                       else f"Latest({name})")
            raise RpcAbort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: {request}; this server serves models "
                f"{sorted(self.managers)}")
        return manager

    def signature_label(self, model: str, signature: str) -> str:
        """`signature` if a served version of `model` has it, else UNKNOWN (bounded labels)."""
        manager = self.managers.get(model)
        if manager is None:
            return UNKNOWN
        for version in manager.versions():
            try:
                if signature in manager.get(version).signatures:
                    return signature
            except ServableNotFoundError:
                continue  # unloaded meanwhile
        return UNKNOWN

    def resolve(self, spec) -> LoadedVersion:
        manager = self.manager(spec)
        if spec.version_label:
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"version_label {spec.version_label!r} is not supported by this server; "
                f"set model_spec.version or leave it empty for the latest")
        version = spec.version.value if spec.HasField("version") else None
        try:
            return manager.get(version)
        except ServableNotFoundError as e:
            raise RpcAbort(grpc.StatusCode.NOT_FOUND, str(e)) from None


def _batched(signature) -> bool:
    """Every input has a variable batch (first) dimension, as TF Serving batching needs."""
    return bool(signature.inputs) and all(
        spec.shape.rank is not None and spec.shape.rank >= 1 and spec.shape[0] is None
        for spec in signature.inputs.values())


def _batchable(signature) -> bool:
    """Requests of this signature can be merged: batched inputs and batched outputs."""
    return _batched(signature) and all(
        spec.shape.rank is None or spec.shape.rank >= 1 for spec in signature.outputs.values())


def _check_batch_sizes(signature, arrays: Mapping[str, np.ndarray]) -> None:
    """Inputs of a batched signature must agree on dim 0, as TF Serving batching demands.

    Without this, broadcasting in the model could silently answer a malformed request;
    an empty batch would fail deep inside the model with a cryptic message.
    """
    if not _batched(signature):
        return
    sizes = {name: arrays[name].shape[0] for name in sorted(signature.inputs)}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{name}={size}" for name, size in sizes.items())
        raise RpcAbort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"inputs of signature '{signature.name}' must have the same batch size "
            f"(0th dimension); got {detail}")
    if not next(iter(sizes.values())):
        raise RpcAbort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"inputs of signature '{signature.name}' have batch size 0 (0th dimension); "
            f"send at least one row")


def _call_signature(signature, arrays: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Runs a signature on numpy inputs (cast to its dtypes) and returns numpy outputs."""
    inputs = {name: tf.constant(array, dtype=signature.inputs[name].dtype)
              for name, array in arrays.items()}
    return {name: value.numpy() for name, value in signature.function(**inputs).items()}


def _rows(signature, arrays: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(arrays.values())).shape[0]) if _batched(signature) else 1


_ID_PREFIX = uuid.uuid4().hex[:12]  # this server process; a counter numbers its requests
_id_counter = itertools.count()


def request_id_of(context) -> Tuple[str, bool]:
    """(the client's `x-request-id` cut to 128 characters, False), else (a new id unique
    to this server process, True)."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)[:_REQUEST_ID_CHARS], False
    return f"{_ID_PREFIX}-{next(_id_counter)}", True


def _draw_columns(draw: Optional[Draw]) -> Dict[str, Optional[np.ndarray]]:
    """The request log's exploration fields of one call (all None: not explored)."""
    if draw is None:
        return {"propensities": None, "explored": None, "randomized": None}
    return {"propensities": draw.propensity, "explored": draw.explored,
            "randomized": draw.randomized}


def _draws(experiment: str, request_id: str) -> np.random.Generator:
    """Exploration randomness of one call: a retried request id gets the same order."""
    digest = hashlib.sha256(f"{experiment}\0{request_id}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def _default_input(spec, value: Any, rows: int) -> np.ndarray:
    """An arm's default for a missing input, repeated for every row of the request."""
    if spec.shape.rank == 2:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return np.array([values] * rows, dtype=object if spec.dtype == tf.string
                        else spec.dtype.as_numpy_dtype)
    dtype = object if spec.dtype == tf.string else spec.dtype.as_numpy_dtype
    return np.full([rows], value, dtype=dtype)


def _reorder(outputs: Dict[str, np.ndarray], index: np.ndarray) -> Dict[str, np.ndarray]:
    """Outputs laid out like `item_ids` ([rows, width, ...]) re-ordered to `index`."""
    items = outputs[ITEM_OUTPUT]
    reordered = {}
    for name, value in outputs.items():
        if value.ndim >= 2 and value.shape[:2] == items.shape[:2]:
            picked = np.take_along_axis(
                value, np.maximum(index, 0).reshape(index.shape + (1,) * (value.ndim - 2)),
                axis=1)
            fill = b"" if value.dtype == object else 0
            picked[index < 0] = fill
            reordered[name] = picked
        else:
            reordered[name] = value
    return reordered


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """PredictionService: Predict and GetModelMetadata over loaded SavedModels.

    Args:
      managers: Model name -> started ModelManager.
      metrics: Where RPCs and model calls are counted; None records nothing.
      batcher: Started Batcher merging concurrent Predict calls; None runs each alone.
      max_string_bytes: Longest string element accepted in a request (0: no limit).
      allow_non_finite: Accept NaN/Inf in float inputs (rejected by default).
      max_request_rows: Largest first dimension of a request tensor (0: no limit).
      max_tensor_elements: Most elements in one request tensor (0: no limit).
      max_response_bytes: Largest reply (gRPC's send limit); a larger one is answered
        RESOURCE_EXHAUSTED and counted so (0: no check).
      experiments: Experiment name -> Experiment; requests for that name are routed to
        one arm per user.
      request_log: Started RequestLog every answered Predict is queued to; None logs
        nothing.
    """

    def __init__(self, managers: Mapping[str, ModelManager],
                 metrics: Optional[ServingMetrics] = None, batcher: Optional[Batcher] = None,
                 max_string_bytes: int = 0, allow_non_finite: bool = False,
                 max_request_rows: int = 0, max_tensor_elements: int = 0,
                 max_response_bytes: int = 0,
                 experiments: Optional[Mapping[str, Experiment]] = None,
                 request_log: Optional[RequestLog] = None):
        self._models = _Models(managers)
        self._experiments = dict(experiments or {})
        self._log = request_log
        self._max_response_bytes = int(max_response_bytes)
        self._metrics = metrics
        self._batcher = batcher
        self._max_string_bytes = int(max_string_bytes)
        self._allow_non_finite = bool(allow_non_finite)
        self._max_request_rows = int(max_request_rows)
        self._max_tensor_elements = int(max_tensor_elements)

    @_rpc
    def Predict(self, request: predict_pb2.PredictRequest, context,
                call: _Call) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        experiment = self._experiments.get(spec.name)
        if experiment is not None:
            return self._predict_arm(request, context, call, experiment)
        return self._predict(request, context, call, spec,
                             spec.signature_name or DEFAULT_SIGNATURE)

    def _predict_arm(self, request: predict_pb2.PredictRequest, context, call: _Call,
                     experiment: Experiment) -> predict_pb2.PredictResponse:
        """Routes a request to its user's arm of `experiment` (all rows: one arm)."""
        if request.model_spec.HasField("version") or request.model_spec.version_label:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{echo(experiment.name)!r} is an experiment: its arms pin the "
                           f"versions; leave model_spec.version unset")
        proto = request.inputs.get(USER_INPUT)
        if proto is None:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                           f"requests to experiment {experiment.name!r} need a "
                           f"'{USER_INPUT}' input (hashed to pick the arm)")
        try:
            tensors.check_size(proto, USER_INPUT, self._max_request_rows,
                               self._max_tensor_elements)
            users = tensors.to_ndarray(proto, USER_INPUT)
        except tensors.TooLargeError as e:
            raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except tensors.TensorError as e:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        arms = {}
        for user in np.ravel(users):
            user = user.decode("utf-8", "backslashreplace") if isinstance(user, bytes) else user
            arm = experiment.arm_for(str(user))
            arms[arm.name] = arm
        if len(arms) != 1:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the users of this request fall in different arms "
                           f"{sorted(arms)} of experiment {experiment.name!r}; send one "
                           f"user per request (or users of one arm)")
        arm = next(iter(arms.values()))
        spec = model_pb2.ModelSpec(name=arm.model)
        if arm.version is not None:
            spec.version.value = int(arm.version)
        return self._predict(request, context, call, spec, arm.signature,
                             experiment=experiment.name, arm=arm)

    def _predict(self, request: predict_pb2.PredictRequest, context, call: _Call,
                 spec: model_pb2.ModelSpec, signature_name: str, experiment: str = "",
                 arm: Optional[Arm] = None) -> predict_pb2.PredictResponse:
        """Predict on the model `spec` names; with an `arm`, its input defaults,
        exploration and name in the reply."""
        model = spec.name
        call.model = model if model in self._models.managers else UNKNOWN
        call.signature = self._models.signature_label(model, signature_name)
        loaded = self._models.resolve(spec)
        signature = loaded.signatures.get(signature_name)
        if signature is None:  # TF Serving: FAILED_PRECONDITION, with the same message
            raise RpcAbort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature name: "{echo(signature_name)}" not found in signature def of '
                f"model {echo(model)!r} version {loaded.version}; available "
                f"signatures: {sorted(loaded.signatures)}")
        call.signature = signature_name
        extra_outputs = (ARM_OUTPUT,) if arm is not None else ()
        wanted = list(request.output_filter) or list(signature.outputs) + list(extra_outputs)
        repeated = sorted({n for n in wanted if wanted.count(n) > 1})
        if repeated:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                           f"duplicate output tensor alias in output_filter: "
                           f"{[echo(n) for n in repeated]}")
        arrays = self._decode_inputs(request, signature, arm)
        unknown = [n for n in wanted if n not in signature.outputs and n not in extra_outputs]
        if unknown:
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output_filter names unknown output(s) {[echo(n) for n in unknown]} of signature "
                f"'{signature_name}'; outputs are {sorted(signature.outputs)}")

        explore = arm.exploration if arm is not None else Exploration()
        explored = (explore.active and K_INPUT in arrays and ITEM_OUTPUT in signature.outputs
                    and arrays[K_INPUT].ndim == 1)
        model_inputs = arrays
        if explored:  # ask for the pool, then serve k of it
            model_inputs = dict(arrays)
            model_inputs[K_INPUT] = np.maximum(arrays[K_INPUT], explore.pool).astype(
                arrays[K_INPUT].dtype)
        outputs = self._run(model, loaded, signature, model_inputs, context)
        draw = inclusion = None
        request_id, made = (request_id_of(context) if self._log is not None or arm is not None
                            else ("", False))
        if explored:
            draw = explore.choose(outputs[ITEM_OUTPUT], arrays[K_INPUT],
                                  _draws(experiment, request_id))
            inclusion = explore.inclusion(draw.index, outputs[ITEM_OUTPUT], arrays[K_INPUT])
            outputs = _reorder(outputs, draw.index)
        if arm is not None:
            rows = next(iter(outputs.values())).shape[0] if outputs else 1
            outputs = dict(outputs)
            outputs[ARM_OUTPUT] = np.array([arm.name.encode("utf-8")] * rows, dtype=object)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = model
        response.model_spec.version.value = loaded.version
        response.model_spec.signature_name = signature_name
        for name in wanted:
            response.outputs[name].CopyFrom(tensors.to_proto(outputs[name]))
        if made:  # the client did not name the call: tell it the name the log uses
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        if self._log is not None:
            self._log.log(Served(request_id, time.time(), model, loaded.version, signature_name,
                                 experiment, arm.name if arm is not None else "", arrays,
                                 outputs, **_draw_columns(draw), inclusion=inclusion))
        return response

    def _record_batch(self, group: Tuple[str, int, str], rows: int, requests: int) -> None:
        if self._metrics is not None:
            self._metrics.record_batch(group[0], group[2], rows, requests)

    def _run(self, model: str, loaded: LoadedVersion, signature,
             arrays: Dict[str, np.ndarray], context) -> Dict[str, np.ndarray]:
        """Calls the signature, alone or merged with concurrent requests (batching)."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise RpcAbort(grpc.StatusCode.DEADLINE_EXCEEDED,
                           "deadline exceeded before the model was called")
        group = (model, loaded.version, signature.name)
        if self._batcher is not None and _batchable(signature):
            outputs = self._run_batched(group, signature, arrays, context, remaining)
        else:
            outputs = self._run_alone(group, signature, arrays, context)
            self._record_batch(group, _rows(signature, arrays), 1)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # the client has given up: say so
            raise RpcAbort(grpc.StatusCode.DEADLINE_EXCEEDED,
                           "deadline exceeded while the model ran")
        return outputs

    def _run_alone(self, group, signature, arrays: Dict[str, np.ndarray],
                   context) -> Dict[str, np.ndarray]:
        """Calls the signature; the call stops when the client cancels or its deadline
        passes (gRPC ends the RPC), freeing the thread and the CPU for live requests."""
        canceller = Canceller()
        if not context.add_callback(canceller.cancel):
            canceller.cancel()  # the RPC already ended
        try:
            return canceller.run(_call_signature, signature, arrays)
        except CallStopped:
            if self._metrics is not None:
                self._metrics.abandoned.inc(group[0], group[2])
            left = context.time_remaining()
            raise RpcAbort(
                grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0
                else grpc.StatusCode.CANCELLED,
                "model call stopped: the client cancelled or its deadline passed") from None
        except tf.errors.OpError as e:
            raise RpcAbort(grpc_code(e.error_code), short_tf_message(e)) from None

    def _run_batched(self, group, signature, arrays, context,
                     remaining: Optional[float]) -> Dict[str, np.ndarray]:
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            task = self._batcher.submit(group, arrays, functools.partial(_call_signature,
                                                                         signature), deadline)
        except BatchError as e:
            raise RpcAbort(e.code, e.message) from None
        context.add_callback(task.cancel)  # client gone: drop the request if still queued
        while not task.wait(0.25 if deadline is None
                            else max(0.0, min(0.25, deadline - time.monotonic()))):
            if deadline is not None and time.monotonic() >= deadline:
                task.cancel()
                raise RpcAbort(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "deadline exceeded while the request waited for its batch")
            if not context.is_active():
                task.cancel()
                raise RpcAbort(grpc.StatusCode.CANCELLED, "request cancelled by the client")
        try:
            return task.result()
        except BatchError as e:
            raise RpcAbort(e.code, e.message) from None
        except tf.errors.OpError as e:
            raise RpcAbort(grpc_code(e.error_code), short_tf_message(e)) from None

    def _decode_inputs(self, request: predict_pb2.PredictRequest, signature,
                       arm: Optional[Arm] = None) -> Dict[str, np.ndarray]:
        """Validated numpy inputs; an experiment arm ignores inputs its signature does
        not take (other arms may) and fills the ones it has defaults for."""
        expected = signature.inputs
        given = request.inputs
        defaults = dict(arm.inputs) if arm is not None else {}
        missing = sorted(set(expected) - set(given) - set(defaults))
        extra = sorted(set(given) - set(expected)) if arm is None else []
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing input(s) {', '.join(repr(n) for n in missing)}")
            if extra:
                parts.append(f"unexpected input(s) {', '.join(repr(echo(n)) for n in extra)}")
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{'; '.join(parts)} for signature '{signature.name}'; expected inputs: "
                f"{sorted(expected)}")
        arrays = {}
        for name in sorted(set(expected) & set(given)):
            try:
                tensors.check_against_spec(given[name], expected[name], name)
                tensors.check_size(given[name], name, self._max_request_rows,
                                   self._max_tensor_elements)
                arrays[name] = tensors.to_ndarray(given[name], name)
                tensors.check_values(arrays[name], name, self._max_string_bytes,
                                     self._allow_non_finite)
            except tensors.TooLargeError as e:
                raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
            except tensors.TensorError as e:
                raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        filled = sorted(set(expected) - set(given))
        if filled:
            rows = next(iter(arrays.values())).shape[0] if arrays else 1
            for name in filled:
                try:
                    arrays[name] = _default_input(expected[name], defaults[name], rows)
                except (TypeError, ValueError) as e:
                    raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"arm {arm.name!r}: default of input {name!r} does not fit "
                                   f"its spec {expected[name]}: {e}") from None
        _check_batch_sizes(signature, arrays)
        return arrays

    @_rpc
    def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,
                         context, call: _Call) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.metadata_field:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                           "GetModelMetadataRequest must specify at least one metadata_field "
                           f"(supported: '{SIGNATURE_DEF_FIELD}')")
        for field in request.metadata_field:
            if field != SIGNATURE_DEF_FIELD:
                raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Metadata field {echo(field)} is not supported "
                               f"(supported: '{SIGNATURE_DEF_FIELD}')")
        loaded = self._models.resolve(request.model_spec)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in loaded.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = loaded.version
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
        return response

    def _unimplemented(self, what: str):
        raise RpcAbort(grpc.StatusCode.UNIMPLEMENTED,
                       f"{what} is not supported by the tfrec model server; call Predict with "
                       f"one of the model's signatures instead")

    @_rpc
    def Classify(self, request, context, call: _Call):
        self._unimplemented("Classify")

    @_rpc
    def Regress(self, request, context, call: _Call):
        self._unimplemented("Regress")

    @_rpc
    def MultiInference(self, request, context, call: _Call):
        self._unimplemented("MultiInference")


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """ModelService: GetModelStatus from the managers' version states.

    Args:
      managers: Model name -> started ModelManager.
      metrics: Where RPCs are counted; None records nothing.
    """

    def __init__(self, managers: Mapping[str, ModelManager],
                 metrics: Optional[ServingMetrics] = None):
        self._models = _Models(managers)
        self._metrics = metrics

    @_rpc
    def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest,
                       context, call: _Call) -> get_model_status_pb2.GetModelStatusResponse:
        spec = request.model_spec
        manager = self._models.manager(spec)
        states = manager.version_states()
        if spec.HasField("version"):
            if spec.version.value not in states:
                raise RpcAbort(grpc.StatusCode.NOT_FOUND,
                               f"Could not find version {spec.version.value} of model {spec.name}")
            states = {spec.version.value: states[spec.version.value]}
        if not states:
            raise RpcAbort(grpc.StatusCode.NOT_FOUND,
                           f"Could not find any versions of model {spec.name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in sorted(states, reverse=True):
            status = states[version]
            entry = response.model_version_status.add()
            entry.version = version
            entry.state = int(status.state)
            entry.status.error_code = status.error_code.value[0]
            entry.status.error_message = status.error_message
        return response

    @_rpc
    def HandleReloadConfigRequest(self, request, context, call: _Call):
        raise RpcAbort(grpc.StatusCode.UNIMPLEMENTED,
                       "HandleReloadConfigRequest is not supported by the tfrec model server; "
                       "new versions of configured models load automatically, restart the "
                       "server to change the set of models")


def _check_port_free(host: str, port: int) -> None:
    """Raises OSError if `host:port` cannot be bound (SO_REUSEADDR, as gRPC binds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot bind gRPC server to {host}:{port} (port in use?): "
                          f"{e.strerror or e}") from e


class ModelServer:
    """gRPC server with TF Serving's PredictionService and ModelService.

    Each model is polled for new versions, which are swapped in without a restart.

    Args:
      models: Model name -> base path holding `<version>/` SavedModels.
      host: Interface to bind; 127.0.0.1 keeps the server private to the machine.
      port: TCP port; 0 picks a free one (read it from `.port` after `start()`).
      poll_seconds: Seconds between scans for new versions (<= 0: never).
      max_workers: Threads answering RPCs concurrently; with batching, also the most
        requests that can wait for one batch.
      max_message_mb: Largest request/response message in MiB; bigger ones are refused
        with RESOURCE_EXHAUSTED before any decoding.
      require_models: Fail `start()` when a model has no loadable version. False
        starts anyway and answers NOT_FOUND until a version appears.
      policies: Optional model name -> ModelManager keyword arguments
        (`version_policy`, `num_versions`, `versions`).
      batching: Merge concurrent Predict requests (TF Serving's --enable_batching):
        BatchingOptions, True for the defaults, None/False to run each request alone.
      monitoring_port: Serve Prometheus metrics at http://127.0.0.1:PORT/metrics;
        0 picks a free port (`.monitoring_port`), None serves none (metrics are still
        counted in `.metrics`).
      max_string_bytes: Longest string element accepted in a request (0: no limit).
      allow_non_finite: Accept NaN/Inf in float inputs (rejected by default).
      max_concurrent_rpcs: RPCs in progress before new ones get RESOURCE_EXHAUSTED
        (None: unbounded queueing in front of the worker threads).
      max_request_rows: Rows (first dimension) a request tensor may declare; more get
        RESOURCE_EXHAUSTED before decoding (0: no limit).
      max_tensor_elements: Elements a request tensor may declare (0: no limit).
      experiments: Experiment name -> Experiment (`experiments.load_experiments`):
        Predict calls for an experiment's name go to its user's arm.
      request_log: Directory for rotating Parquet logs of every answered Predict (None:
        no logging); written asynchronously, dropped and counted when the queue is full.
      request_log_queue: Calls waiting for the log writer before new ones are dropped.
      request_log_flush_seconds: Longest a logged call waits before its file is written.
    """

    def __init__(self, models: Mapping[str, str], host: str = "127.0.0.1", port: int = 8500,
                 poll_seconds: float = 1.0, max_workers: int = 8, max_message_mb: float = 64,
                 require_models: bool = True,
                 policies: Optional[Mapping[str, Mapping[str, object]]] = None,
                 batching: Union[BatchingOptions, bool, None] = None,
                 monitoring_port: Optional[int] = None, max_string_bytes: int = 1 << 20,
                 allow_non_finite: bool = False, max_concurrent_rpcs: Optional[int] = None,
                 max_request_rows: int = 8192, max_tensor_elements: int = 1 << 22,
                 experiments: Optional[Mapping[str, Experiment]] = None,
                 request_log: Optional[str] = None, request_log_queue: int = 10000,
                 request_log_flush_seconds: float = 10.0):
        if not models:
            raise ValueError("ModelServer needs at least one model (name -> base path)")
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {port}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if max_message_mb <= 0:
            raise ValueError(f"max_message_mb must be > 0, got {max_message_mb}")
        if monitoring_port is not None and not 0 <= int(monitoring_port) <= 65535:
            raise ValueError(f"monitoring_port must be in [0, 65535], got {monitoring_port}")
        if max_string_bytes < 0:
            raise ValueError(f"max_string_bytes must be >= 0 (0: no limit), got "
                             f"{max_string_bytes}")
        if max_request_rows < 0 or max_tensor_elements < 0:
            raise ValueError(f"max_request_rows and max_tensor_elements must be >= 0 (0: no "
                             f"limit), got {max_request_rows}, {max_tensor_elements}")
        if max_concurrent_rpcs is not None and max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1, got {max_concurrent_rpcs}")
        if batching is True:
            batching = BatchingOptions()
        elif batching is False:
            batching = None
        elif batching is not None and not isinstance(batching, BatchingOptions):
            raise TypeError(f"batching must be a BatchingOptions, True or None, got "
                            f"{type(batching).__name__}")
        self.experiments = dict(experiments or {})
        check_models(self.experiments, list(models))
        self.managers = managers_from(models, poll_seconds=poll_seconds, policies=policies)
        self.host = host
        self.requested_port = int(port)
        self.max_workers = int(max_workers)
        self.max_message_bytes = int(max_message_mb * 1024 * 1024)
        self.require_models = require_models
        self.batching: Optional[BatchingOptions] = batching
        self.requested_monitoring_port = monitoring_port
        self.max_string_bytes = int(max_string_bytes)
        self.allow_non_finite = bool(allow_non_finite)
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.max_request_rows = int(max_request_rows)
        self.max_tensor_elements = int(max_tensor_elements)
        self.batcher: Optional[Batcher] = None
        queued = (lambda: self.batcher.queued_requests() if self.batcher else 0)
        self.request_log: Optional[RequestLog] = None
        if request_log:
            self.request_log = RequestLog(
                request_log, max_queue=request_log_queue,
                flush_seconds=request_log_flush_seconds,
                on_drop=lambda: self.metrics.log_dropped.inc(),
                on_written=lambda rows: self.metrics.log_rows.inc(amount=rows))
        self.metrics = ServingMetrics(self.managers, queued if batching else None,
                                      self.request_log.queued if self.request_log else None)
        self._metrics_http: Optional[MetricsHTTPServer] = None
        self._server: Optional[grpc.Server] = None
        self._port: Optional[int] = None

    @classmethod
    def from_config(cls, config_path: str, **kwargs) -> "ModelServer":
        """Builds a server from a TF Serving `models.config`, keeping version policies."""
        entries = parse_model_config(config_path)
        return cls({e.name: e.base_path for e in entries},
                   policies={e.name: e.manager_kwargs() for e in entries}, **kwargs)

    @property
    def port(self) -> int:
        """The bound port (the picked one when constructed with port 0)."""
        if self._port is None:
            raise RuntimeError("ModelServer is not started; call start() first")
        return self._port

    @property
    def monitoring_port(self) -> int:
        """The bound metrics HTTP port."""
        if self._metrics_http is None:
            raise RuntimeError("no metrics HTTP server: pass monitoring_port and start()")
        return self._metrics_http.port

    @property
    def metrics_url(self) -> str:
        """`http://127.0.0.1:PORT/metrics`."""
        if self._metrics_http is None:
            raise RuntimeError("no metrics HTTP server: pass monitoring_port and start()")
        return self._metrics_http.url

    @property
    def address(self) -> str:
        """`host:port` to give a client."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> "ModelServer":
        """Checks the port, loads every model, then starts answering RPCs.

        Raises:
          FileNotFoundError / RuntimeError: a model cannot be served (`require_models`).
          OSError: the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("ModelServer is already started")
        if self.requested_port:  # a busy port fails now, not after loading every model
            _check_port_free(self.host, self.requested_port)
        started = []
        try:
            for manager in self.managers.values():
                manager.start(require_version=self.require_models)
                started.append(manager)
            if self.batching is not None:
                self.batcher = Batcher(
                    self.batching,
                    on_batch=lambda g, rows, n: self.metrics.record_batch(g[0], g[2], rows, n),
                    on_retry=lambda g: self.metrics.batch_retries.inc(g[0], g[2]),
                    on_abandon=lambda g: self.metrics.abandoned.inc(g[0], g[2])).start()
                if self.batching.max_batch_size > self.max_workers:
                    logger.info("batching: at most max_workers=%d requests wait for a batch at "
                                "once (max_batch_size=%d counts rows)", self.max_workers,
                                self.batching.max_batch_size)
            if self.request_log is not None:
                self.request_log.start()
            if self.requested_monitoring_port is not None:
                self._metrics_http = MetricsHTTPServer(
                    self.metrics.render, port=self.requested_monitoring_port).start()
            server = grpc.server(
                concurrent.futures.ThreadPoolExecutor(self.max_workers,
                                                      thread_name_prefix="tfrec-grpc"),
                options=[("grpc.max_send_message_length", self.max_message_bytes),
                         ("grpc.max_receive_message_length", self.max_message_bytes),
                         ("grpc.so_reuseport", 0)],  # a busy port must fail, not be shared
                maximum_concurrent_rpcs=self.max_concurrent_rpcs)
            prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
                PredictionServicer(self.managers, self.metrics, self.batcher,
                                   self.max_string_bytes, self.allow_non_finite,
                                   self.max_request_rows, self.max_tensor_elements,
                                   self.max_message_bytes, self.experiments,
                                   self.request_log), server)
            model_service_pb2_grpc.add_ModelServiceServicer_to_server(
                ModelServicer(self.managers, self.metrics), server)
            host = f"[{self.host}]" if ":" in self.host else self.host
            address = f"{host}:{self.requested_port}"
            try:
                port = server.add_insecure_port(address)
            except RuntimeError as e:
                raise OSError(f"cannot bind gRPC server to {address} (port in use?): {e}") from e
            if port == 0:
                raise OSError(f"cannot bind gRPC server to {address} (port in use?)")
            server.start()
        except BaseException:
            self._stop_helpers()
            for manager in started:
                manager.stop()
            raise
        self._server, self._port = server, port
        logger.info("tfrec model server listening on %s, models %s%s%s", self.address,
                    {name: m.versions() for name, m in self.managers.items()},
                    f", batching {self.batching}" if self.batching else "",
                    f", metrics at {self.metrics_url}" if self._metrics_http else "")
        for line in self.experiment_status():
            logger.info("%s", line)
        if self.request_log is not None:
            logger.info("logging requests to %s", self.request_log.directory)
        return self

    def experiment_status(self) -> list:
        """One line per live experiment: arms with model, served version, signature, share."""
        return describe(self.experiments,
                        {name: m.versions() for name, m in self.managers.items()})

    def _stop_helpers(self) -> None:
        if self.request_log is not None:
            self.request_log.stop()  # writes what is queued: answered calls are not lost
        if self.batcher is not None:
            self.batcher.stop()
            self.batcher = None
        if self._metrics_http is not None:
            self._metrics_http.stop()
            self._metrics_http = None

    def stop(self, grace: Optional[float] = None) -> None:
        """Stops accepting RPCs, lets in-flight ones finish for `grace` seconds, unloads."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        self._stop_helpers()
        for manager in self.managers.values():
            manager.stop()
        logger.info("tfrec model server stopped")

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the server stops (or `timeout`); True if it stopped."""
        server = self._server
        if server is None:
            return True
        timed_out = server.wait_for_termination(timeout)
        return not timed_out

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=1.0)
