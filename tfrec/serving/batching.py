"""Server-side request batching for the embedded model server, like TF Serving's.

Under load, one model call over many rows costs little more than a call over one row,
so concurrent Predict requests for the same signature are merged, run once, split back.

Only requests that can be merged without changing any answer share a batch: same
model version and signature, same inner shapes (or a declared-safe padding), and the
same largest `k` (the width of top-k outputs). A merged batch that fails is re-run
request by request, so one bad request never fails the innocent ones.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from typing import Callable, Deque, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import grpc
import numpy as np

from tfrec.serving.cancel import CallStopped, Canceller

logger = logging.getLogger(__name__)

Arrays = Dict[str, np.ndarray]
RunFn = Callable[[Arrays], Arrays]
# (model name, version, signature): the unit batches are reported under.
Group = Tuple[str, int, str]


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """TF Serving's batching parameters, plus which inputs may be padded or split on.

    Args:
      max_batch_size: Most rows in one model call; a request with more rows runs alone.
      batch_timeout_micros: Longest a batch waits for more requests once opened; 0
        closes it as soon as a batch thread is free (merging only what piled up).
      max_enqueued_batches: Batches waiting per queue before new requests are
        answered UNAVAILABLE (back-pressure instead of unbounded latency).
      num_batch_threads: Threads running batches in parallel.
      pad_variable_length_inputs: Merge requests whose `pad_inputs` differ in width by
        padding them at the end with "" (TF Serving pads with the first element, which
        would repeat a real history item; "" is what tfrec models treat as padding).
      pad_inputs: 2-D string inputs for which "" padding is known not to change answers.
      width_inputs: Inputs whose largest value sets an output width (`k` of top-k); only
        requests with the same largest value share a batch, so answers keep their shape.
    """

    max_batch_size: int = 64
    batch_timeout_micros: int = 1000
    max_enqueued_batches: int = 100
    num_batch_threads: int = max(1, min(4, os.cpu_count() or 1))
    pad_variable_length_inputs: bool = False
    pad_inputs: Tuple[str, ...] = ("history",)
    width_inputs: Tuple[str, ...] = ("k",)

    def __post_init__(self):
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"batching {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ValueError(
                f"batching batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}")
        # Tuples keep the options hashable when built from lists (CLI, YAML).
        object.__setattr__(self, "pad_inputs", tuple(self.pad_inputs))
        object.__setattr__(self, "width_inputs", tuple(self.width_inputs))

    @property
    def timeout_seconds(self) -> float:
        return self.batch_timeout_micros / 1e6


# -- TF Serving's batching_parameters.txt ----------------------------------------------------

# Field -> (number, kind) of tensorflow.serving.BatchingParameters. The proto is not in
# the tensorflow-serving-api wheel, so an equivalent message is built at runtime and the
# file is parsed with protobuf's own text format (comments, `{ value: N }` wrappers).
_INT64, _BOOL, _STRING, _REPEATED_INT64, _PLAIN_BOOL = "int64", "bool", "string", "rint64", "pbool"
_BATCHING_FIELDS = {
    "max_batch_size": (1, _INT64),
    "batch_timeout_micros": (2, _INT64),
    "max_enqueued_batches": (3, _INT64),
    "num_batch_threads": (4, _INT64),
    "thread_pool_name": (5, _STRING),
    "allowed_batch_sizes": (6, _REPEATED_INT64),
    "pad_variable_length_inputs": (7, _PLAIN_BOOL),
    "enable_large_batch_splitting": (8, _BOOL),
    "max_execution_batch_size": (9, _INT64),
}
_SUPPORTED = {"max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
              "num_batch_threads", "pad_variable_length_inputs"}
_message_class = None


def _batching_message_class():
    global _message_class
    if _message_class is not None:
        return _message_class
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    wrappers = {_INT64: ".google.protobuf.Int64Value", _BOOL: ".google.protobuf.BoolValue",
                _STRING: ".google.protobuf.StringValue"}
    fdp = descriptor_pb2.FileDescriptorProto(
        name="tfrec/batching_parameters.proto", package="tfrec.serving",
        dependency=["google/protobuf/wrappers.proto"], syntax="proto3")
    message = fdp.message_type.add(name="BatchingParameters")
    field_type = descriptor_pb2.FieldDescriptorProto
    for name, (number, kind) in _BATCHING_FIELDS.items():
        field = message.field.add(name=name, number=number, label=field_type.LABEL_OPTIONAL)
        if kind in wrappers:
            field.type, field.type_name = field_type.TYPE_MESSAGE, wrappers[kind]
        elif kind == _REPEATED_INT64:
            field.type, field.label = field_type.TYPE_INT64, field_type.LABEL_REPEATED
        else:
            field.type = field_type.TYPE_BOOL
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    _message_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tfrec.serving.BatchingParameters"))
    return _message_class


def parse_batching_parameters(path: str, **overrides) -> BatchingOptions:
    """Reads TF Serving's `--batching_parameters_file` (BatchingParameters text proto).

    Fields TF Serving has but this server does not use (allowed_batch_sizes, ...) are
    accepted with a warning; unknown fields and bad values are errors.

    Args:
      path: The text proto file, e.g. serving/batching_parameters.txt.
      **overrides: BatchingOptions fields to set regardless of the file.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is not a valid BatchingParameters text proto.
    """
    from google.protobuf import text_format

    if not os.path.isfile(path):
        raise FileNotFoundError(f"batching parameters file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    params = _batching_message_class()()
    try:
        text_format.Parse(text, params)
    except text_format.ParseError as e:
        raise ValueError(
            f"batching parameters file {path!r} is not a valid BatchingParameters text proto "
            f"({e}); known fields: {sorted(_BATCHING_FIELDS)}") from e
    values = {}
    for field, value in params.ListFields():
        if field.name not in _SUPPORTED:
            logger.warning("batching parameters file %s: %s is ignored by the tfrec server",
                           path, field.name)
            continue
        values[field.name] = value if isinstance(value, bool) else value.value
    values["pad_variable_length_inputs"] = bool(params.pad_variable_length_inputs)
    values.update(overrides)
    try:
        return BatchingOptions(**values)
    except ValueError as e:
        raise ValueError(f"batching parameters file {path!r}: {e}") from e


# -- batches ------------------------------------------------------------------------------

class BatchError(Exception):
    """A request could not run in a batch (queue full, deadline, shutdown).

    Args:
      code: gRPC status the request is answered with.
      message: Detail sent to the client.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Task:
    """One request waiting for its batch; the handler thread waits on it.

    Args:
      inputs: Decoded request inputs, all with the same first dimension.
      deadline: `time.monotonic()` after which the request is dropped unrun.
    """

    def __init__(self, inputs: Arrays, deadline: Optional[float] = None):
        self.inputs = inputs
        self.rows = int(next(iter(inputs.values())).shape[0])
        self.deadline = deadline
        self.cancelled = False
        self.on_cancel: Optional[Callable[[], None]] = None  # set while its batch runs
        self._done = threading.Event()
        self._outputs: Optional[Arrays] = None
        self._error: Optional[BaseException] = None

    def cancel(self) -> None:
        """Drops the request if it has not run yet (client gone or deadline passed); a
        running batch stops once all of its requests are cancelled."""
        self.cancelled = True
        hook = self.on_cancel
        if hook is not None:
            hook()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def finish(self, outputs: Optional[Arrays] = None,
               error: Optional[BaseException] = None) -> None:
        self._outputs, self._error = outputs, error
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    def result(self) -> Arrays:
        """The request's outputs, or raises the error it got."""
        if not self._done.is_set():
            raise RuntimeError("Task.result() called before the task finished")
        if self._error is not None:
            raise self._error
        return self._outputs


@dataclasses.dataclass
class _Batch:
    key: Hashable
    group: Group
    run: RunFn
    close_at: float
    tasks: List[Task] = dataclasses.field(default_factory=list)
    rows: int = 0


def merge_inputs(tasks: Sequence[Task], padded: Sequence[str] = ()) -> Arrays:
    """Concatenates the tasks' inputs along dim 0, padding `padded` inputs with "" at the end.

    Args:
      tasks: Tasks whose inputs share names, dtypes and (except `padded`) inner shapes.
      padded: 2-D string inputs that may differ in width.
    """
    merged = {}
    for name in tasks[0].inputs:
        arrays = [t.inputs[name] for t in tasks]
        if name in padded:
            width = max(a.shape[1] for a in arrays)
            arrays = [a if a.shape[1] == width else np.concatenate(
                [a, np.full((a.shape[0], width - a.shape[1]), b"", dtype=a.dtype)], axis=1)
                for a in arrays]
        merged[name] = np.concatenate(arrays, axis=0)
    return merged


def split_outputs(outputs: Mapping[str, np.ndarray], tasks: Sequence[Task]) -> List[Arrays]:
    """Cuts a batch's outputs back into one dict per task along dim 0.

    Raises:
      ValueError: an output has no batch dimension matching the merged rows.
    """
    total = sum(t.rows for t in tasks)
    for name, value in outputs.items():
        if np.ndim(value) == 0 or value.shape[0] != total:
            raise ValueError(f"output '{name}' has shape {list(np.shape(value))}, not "
                             f"[{total}, ...]; it cannot be split back into requests")
    parts, start = [], 0
    for task in tasks:
        parts.append({name: value[start:start + task.rows] for name, value in outputs.items()})
        start += task.rows
    return parts


class Batcher:
    """Queues per batch key, closed by size or timeout, run by a pool of batch threads.

    Args:
      options: Batching parameters.
      on_batch: Called as (group, rows, requests) after every model call.
      on_retry: Called with the group when a merged batch failed and is re-run per request.
      on_abandon: Called with the group when a running model call was stopped because
        every request in it was cancelled or past its deadline.
    """

    def __init__(self, options: BatchingOptions,
                 on_batch: Optional[Callable[[Group, int, int], None]] = None,
                 on_retry: Optional[Callable[[Group], None]] = None,
                 on_abandon: Optional[Callable[[Group], None]] = None):
        self.options = options
        self._on_batch = on_batch or (lambda group, rows, requests: None)
        self._on_retry = on_retry or (lambda group: None)
        self._on_abandon = on_abandon or (lambda group: None)
        self._cond = threading.Condition()
        self._open: Dict[Hashable, _Batch] = {}
        self._ready: Deque[_Batch] = collections.deque()
        self._enqueued: Dict[Hashable, int] = collections.defaultdict(int)
        self._queued_tasks = 0
        self._threads: List[threading.Thread] = []
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Batcher":
        if self._threads:
            raise RuntimeError("Batcher is already started")
        self._stopping = False
        for i in range(self.options.num_batch_threads):
            thread = threading.Thread(target=self._work, name=f"tfrec-batch-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Fails queued requests with UNAVAILABLE and joins the batch threads."""
        with self._cond:
            self._stopping = True
            waiting = list(self._ready) + list(self._open.values())
            self._ready.clear()
            self._open.clear()
            self._enqueued.clear()
            self._queued_tasks = 0
            self._cond.notify_all()
        for batch in waiting:
            for task in batch.tasks:
                task.finish(error=BatchError(grpc.StatusCode.UNAVAILABLE,
                                             "the server is shutting down; retry elsewhere"))
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    def queued_requests(self) -> int:
        """Requests waiting for a batch thread (for the queue-depth gauge)."""
        return self._queued_tasks

    # -- submitting --------------------------------------------------------------------------

    def key(self, group: Group, inputs: Mapping[str, np.ndarray]) -> Hashable:
        """Requests with equal keys can share a batch without changing any answer."""
        shapes = []
        for name in sorted(inputs):
            array = inputs[name]
            if self._padded(name, array):
                shapes.append((name, "padded"))
            else:
                shapes.append((name, array.shape[1:]))
        widths = tuple((name, int(inputs[name].max()) if inputs[name].size else None)
                       for name in self.options.width_inputs if name in inputs)
        return group, tuple(shapes), widths

    def _padded(self, name: str, array: np.ndarray) -> bool:
        return (self.options.pad_variable_length_inputs and name in self.options.pad_inputs
                and array.ndim == 2 and array.dtype == object)

    def submit(self, group: Group, inputs: Arrays, run: RunFn,
               deadline: Optional[float] = None) -> Task:
        """Queues one request; the returned Task finishes when its batch has run.

        Args:
          group: (model, version, signature) the request resolved to.
          inputs: Validated inputs with a common first dimension.
          run: Calls the signature on merged inputs and returns numpy outputs.
          deadline: `time.monotonic()` after which the request is dropped unrun.

        Raises:
          BatchError: UNAVAILABLE when the queue is full or the batcher stopped.
        """
        task = Task(inputs, deadline)
        key = self.key(group, inputs)
        limit = self.options.max_batch_size
        with self._cond:
            if self._stopping or not self._threads:
                raise BatchError(grpc.StatusCode.UNAVAILABLE,
                                 "request batching is not running (server stopping?)")
            batch = self._open.get(key)
            if batch is not None and batch.rows + task.rows > limit:
                self._close(key)
                batch = None
            if batch is None:
                if self._enqueued[key] >= self.options.max_enqueued_batches:
                    raise BatchError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the batch queue of model {group[0]!r} version {group[1]} signature "
                        f"'{group[2]}' is full ({self._enqueued[key]} batches waiting); retry "
                        f"with backoff, or raise max_enqueued_batches / num_batch_threads")
                batch = _Batch(key, group, run,
                               time.monotonic() + self.options.timeout_seconds)
                self._open[key] = batch
                self._enqueued[key] += 1
            batch.tasks.append(task)
            batch.rows += task.rows
            self._queued_tasks += 1
            if batch.rows >= limit:
                self._close(key)
            self._cond.notify()
        return task

    def _close(self, key: Hashable) -> None:
        self._ready.append(self._open.pop(key))

    # -- batch threads -------------------------------------------------------------------

    def _next_batch(self) -> Optional[_Batch]:
        """The next batch to run: a full one, else the open one whose timeout passed."""
        with self._cond:
            while not self._stopping:
                if self._ready:
                    batch = self._ready.popleft()
                elif self._open:
                    key, batch = min(self._open.items(), key=lambda item: item[1].close_at)
                    wait = batch.close_at - time.monotonic()
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                    del self._open[key]
                else:
                    self._cond.wait()
                    continue
                self._enqueued[batch.key] -= 1
                if self._enqueued[batch.key] <= 0:
                    del self._enqueued[batch.key]  # keys include shapes: do not keep them all
                self._queued_tasks -= len(batch.tasks)
                if self._ready or self._open:
                    self._cond.notify()  # keep another thread watching what is left
                return batch
            return None

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except Exception as e:  # a bug here must not leave handlers waiting forever
                logger.exception("batch of %s failed unexpectedly", batch.group)
                for task in batch.tasks:
                    if not task.done:
                        task.finish(error=BatchError(grpc.StatusCode.INTERNAL,
                                                     f"batching failed: {type(e).__name__}: {e}"))

    def _live(self, tasks: Sequence[Task]) -> List[Task]:
        """Tasks still worth running; the others are answered without a model call."""
        now, live = time.monotonic(), []
        for task in tasks:
            if task.cancelled:
                task.finish(error=BatchError(grpc.StatusCode.CANCELLED,
                                             "request cancelled before its batch ran"))
            elif task.expired(now):
                task.finish(error=BatchError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "deadline exceeded while the request waited for its batch"))
            else:
                live.append(task)
        return live

    def _call(self, batch: _Batch, tasks: Sequence[Task], inputs: Arrays) -> Arrays:
        """Runs the model on `inputs`; stopped early once every task in it is cancelled.

        Raises:
          BatchError: the call was stopped (no task waits for it any more).
          Exception: whatever the model call raised.
        """
        canceller = Canceller()

        def stop_if_abandoned():
            if all(t.cancelled for t in tasks):
                canceller.cancel()

        for task in tasks:
            task.on_cancel = stop_if_abandoned
        stop_if_abandoned()  # a cancel that came before the hooks were set
        try:
            return canceller.run(batch.run, inputs)
        except CallStopped:
            self._on_abandon(batch.group)
            raise BatchError(grpc.StatusCode.CANCELLED, "model call stopped: every "
                             "request in it was cancelled or past its deadline") from None
        finally:
            for task in tasks:
                task.on_cancel = None

    def _run_one(self, batch: _Batch, task: Task) -> None:
        try:
            outputs = self._call(batch, [task], task.inputs)
        except BatchError:
            self._live([task])  # answers it CANCELLED / DEADLINE_EXCEEDED
            return
        except Exception as e:
            task.finish(error=e)
            return
        self._on_batch(batch.group, task.rows, 1)
        task.finish(outputs={name: np.asarray(value) for name, value in outputs.items()})

    def _execute(self, batch: _Batch) -> None:
        live = self._live(batch.tasks)
        if len(live) == 1:
            self._run_one(batch, live[0])
        if len(live) <= 1:
            return
        padded = [name for name, array in live[0].inputs.items() if self._padded(name, array)]
        try:
            outputs = self._call(batch, live, merge_inputs(live, padded))
            parts = split_outputs({n: np.asarray(v) for n, v in outputs.items()}, live)
        except BatchError:
            self._live(live)
            return
        except Exception as e:
            # Some request broke the merged call: re-run each alone so only it fails.
            logger.info("merged batch of %d requests for %s failed (%s: %s); re-running "
                        "them one by one", len(live), batch.group, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "")
            self._on_retry(batch.group)
            for task in self._live(live):
                self._run_one(batch, task)
            return
        self._on_batch(batch.group, sum(t.rows for t in live), len(live))
        for task, part in zip(live, parts):
            task.finish(outputs=part)
