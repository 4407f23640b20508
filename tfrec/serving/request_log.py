"""Request logging: what was served, to whom, in what order, with what propensity.

Outcome analysis (A/B reports, off-policy estimates, retraining on served traffic)
needs the exact lists users saw. Logging must never slow or fail a request, so
handlers only enqueue references to their arrays; a writer thread turns them into
rows and writes rotating Parquet files. A full queue drops (and counts) instead of
blocking.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Set

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

# One row per request row (a request with a batch of users gives several rows).
LOG_COLUMNS = ("request_id", "row", "ts", "model", "version", "signature", "experiment",
               "arm", "user_id", "context", "item_ids", "positions", "scores", "propensities",
               "explored", "inclusion_propensities", "randomized")
FILE_PATTERN = "requests-*.parquet"
REQUEST_ID_KEY = "x-request-id"  # gRPC metadata naming a call in the log and its outcomes
_USER, _ITEMS, _SCORES = "user_id", "item_ids", "scores"


@dataclasses.dataclass
class Served:
    """One Predict call as the handler saw it (arrays are not copied or converted).

    Args:
      request_id: Client-given `x-request-id`, or one made by the server.
      ts: Unix seconds when the reply was ready.
      model / version / signature: What answered.
      experiment / arm: The experiment and arm routed to ("" for direct calls).
      inputs: Decoded request inputs.
      outputs: The reply's outputs.
      propensities: [rows, k] probability of each shown item at its position; None
        means a deterministic policy (1 for every shown item).
      explored: [rows] the row got an exploration ordering (None: no row did).
      randomized: [rows] that ordering was uniformly random (None: no row's was).
      inclusion: [rows, k] probability of each shown item being in the list at any
        position; None: deterministic (1).
    """

    request_id: str
    ts: float
    model: str
    version: int
    signature: str
    experiment: str
    arm: str
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    propensities: Optional[np.ndarray] = None
    explored: Optional[np.ndarray] = None
    randomized: Optional[np.ndarray] = None
    inclusion: Optional[np.ndarray] = None


def _text(value: Any) -> Any:
    """Strings as str (invalid UTF-8 kept as escapes: characters are never dropped)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _context(inputs: Mapping[str, np.ndarray], row: int) -> str:
    """The row's inputs other than the user id, as JSON (lists without "" padding)."""
    context = {}
    for name in sorted(inputs):
        if name == _USER:
            continue
        array = inputs[name]
        if array.ndim == 0:
            value = _text(array[()])
        elif array.shape[0] <= row:
            continue
        elif array.ndim == 1:
            value = _text(array[row])
        else:
            value = [_text(v) for v in np.ravel(array[row]) if v not in (b"", "")]
        context[name] = value
    return json.dumps(context, ensure_ascii=False, default=str)


def _strings(values: np.ndarray) -> pa.Array:
    """A string Arrow array from numpy bytes/str objects (invalid UTF-8 kept as escapes)."""
    try:
        return pa.array(values, type=pa.binary()).cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([_text(v) for v in values], type=pa.string())


def _list_array(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)


def log_table(calls: List[Served]) -> pa.Table:
    """The log rows (LOG_COLUMNS) of several calls as one Arrow table.

    Built with numpy per call and Arrow per column, not Python per item: the writer
    shares the interpreter with the request handlers.
    """
    row_columns: Dict[str, list] = {name: [] for name in (
        "request_id", "row", "ts", "model", "version", "signature", "experiment", "arm",
        "user_id", "context", "explored", "randomized")}
    items, positions, scores, propensities, inclusion, counts = [], [], [], [], [], []
    for call in calls:
        ids = call.outputs.get(_ITEMS)
        rows = int(ids.shape[0]) if ids is not None and ids.ndim >= 1 else 1
        if ids is not None and ids.ndim == 2:
            shown = (ids != b"") & (ids != "")
            counts.append(shown.sum(axis=1))
            items.append(ids[shown])
            positions.append(np.broadcast_to(np.arange(ids.shape[1]), ids.shape)[shown])
            values = call.outputs.get(_SCORES)
            scores.append(values[shown].astype(np.float32) if values is not None
                          and values.shape == ids.shape else np.full(shown.sum(), np.nan,
                                                                     np.float32))
            for out, given in ((propensities, call.propensities), (inclusion, call.inclusion)):
                out.append(np.ones(shown.sum(), np.float32) if given is None
                           else given[shown].astype(np.float32))
        else:
            counts.append(np.zeros(rows, dtype=np.int64))
        users = call.inputs.get(_USER)
        for row in range(rows):
            row_columns["request_id"].append(call.request_id)
            row_columns["row"].append(row)
            row_columns["ts"].append(call.ts)
            row_columns["model"].append(call.model)
            row_columns["version"].append(int(call.version))
            row_columns["signature"].append(call.signature)
            row_columns["experiment"].append(call.experiment)
            row_columns["arm"].append(call.arm)
            row_columns["user_id"].append(
                _text(users[row]) if users is not None and users.ndim == 1
                and users.shape[0] > row else "")
            row_columns["context"].append(_context(call.inputs, row))
            for flag in ("explored", "randomized"):
                given = getattr(call, flag)
                row_columns[flag].append(bool(given[row]) if given is not None else False)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]) if counts else [0]
    flat = {
        "item_ids": _strings(np.concatenate(items) if items else np.array([], dtype=object)),
        "positions": pa.array(np.concatenate(positions).astype(np.int32) if positions
                              else np.array([], np.int32)),
        "scores": pa.array(np.concatenate(scores) if scores else np.array([], np.float32)),
        "propensities": pa.array(np.concatenate(propensities) if propensities
                                 else np.array([], np.float32)),
        "inclusion_propensities": pa.array(np.concatenate(inclusion) if inclusion
                                           else np.array([], np.float32)),
    }
    types = {"row": pa.int32(), "ts": pa.float64(), "version": pa.int64(),
             "explored": pa.bool_(), "randomized": pa.bool_()}
    columns = {name: pa.array(values, type=types.get(name, pa.string()))
               for name, values in row_columns.items()}
    columns.update({name: _list_array(offsets, values) for name, values in flat.items()})
    return pa.table({name: columns[name] for name in LOG_COLUMNS})


def _write_parquet(table: pa.Table, path: str) -> None:
    """Writes the table to `path` atomically (a reader never sees half a file)."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class RequestLog:
    """Asynchronous, bounded request log writing rotating Parquet files.

    Args:
      directory: Where `requests-<time>-<n>.parquet` files go (created).
      max_queue: Calls waiting to be written before new ones are dropped.
      rows_per_file: A file is written once this many rows are pending.
      flush_seconds: ... or once the oldest pending row is this old.
      on_drop: Called for each call not logged: queue full or its file unwritable.
      on_written: Called with the number of rows of each file written.
    """

    def __init__(self, directory: str, max_queue: int = 10000, rows_per_file: int = 50000,
                 flush_seconds: float = 10.0, on_drop: Optional[Callable[[], None]] = None,
                 on_written: Optional[Callable[[int], None]] = None):
        if max_queue < 1 or rows_per_file < 1 or flush_seconds <= 0:
            raise ValueError(f"request log needs max_queue >= 1, rows_per_file >= 1 and "
                             f"flush_seconds > 0, got {max_queue}, {rows_per_file}, "
                             f"{flush_seconds}")
        self.directory = directory
        self.rows_per_file = int(rows_per_file)
        self.flush_seconds = float(flush_seconds)
        self._queue: "queue.Queue[Served]" = queue.Queue(maxsize=int(max_queue))
        self._stopping = threading.Event()
        self._poll_seconds = min(0.25, self.flush_seconds)
        self._on_drop = on_drop or (lambda: None)
        self._on_written = on_written or (lambda rows: None)
        self._thread: Optional[threading.Thread] = None
        self._files = 0
        self.dropped = 0
        self.written_rows = 0

    def start(self) -> "RequestLog":
        if self._thread is not None:
            raise RuntimeError("RequestLog is already started")
        os.makedirs(self.directory, exist_ok=True)
        self._thread = threading.Thread(target=self._work, name="tfrec-request-log",
                                         daemon=True)
        self._thread.start()
        return self

    def queued(self) -> int:
        return self._queue.qsize()

    def log(self, served: Served) -> bool:
        """Queues one call; never blocks. Returns False (and counts it) when dropped."""
        try:
            self._queue.put_nowait(served)
            return True
        except queue.Full:
            self.dropped += 1
            self._on_drop()
            return False

    def stop(self, timeout: float = 60.0) -> None:
        """Writes everything queued, then stops the writer thread."""
        if self._thread is None:
            return
        self._stopping.set()  # the writer drains the queue first: nothing accepted is lost
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("request log writer did not finish within %.0f s; %d calls unwritten",
                         timeout, self._queue.qsize())
        self._thread = None
        self._stopping.clear()

    def _flush(self, calls: List[Served]) -> None:
        if not calls:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = os.path.join(self.directory, f"requests-{stamp}-{os.getpid()}-"
                                            f"{self._files:06d}.parquet")
        try:
            table = log_table(calls)
            _write_parquet(table, path)
        except Exception:  # a full disk must not kill the writer: count and go on
            logger.exception("writing request log %s failed; %d calls lost", path, len(calls))
            for _ in calls:
                self.dropped += 1
                self._on_drop()
            return
        self._files += 1
        self.written_rows += table.num_rows
        self._on_written(table.num_rows)

    def _work(self) -> None:
        # Polls instead of blocking on the queue: a wake-up per logged call would cost
        # the request threads a GIL hand-off each.
        pending: List[Served] = []
        rows, oldest = 0, None
        while True:
            stopping = self._stopping.wait(self._poll_seconds)
            while True:
                try:
                    served = self._queue.get_nowait()
                except queue.Empty:
                    break
                pending.append(served)
                items = served.outputs.get(_ITEMS)
                rows += int(items.shape[0]) if items is not None and items.ndim >= 1 else 1
                if oldest is None:
                    oldest = time.monotonic()
                if rows >= self.rows_per_file:
                    self._flush(pending)
                    pending, rows, oldest = [], 0, None
            if stopping or (oldest is not None
                            and time.monotonic() - oldest >= self.flush_seconds):
                self._flush(pending)
                pending, rows, oldest = [], 0, None
            if stopping:
                return


def read_request_logs(directory: str) -> pd.DataFrame:
    """Every row of the Parquet files in `directory`, ordered by time (LOG_COLUMNS).

    Raises:
      FileNotFoundError: the directory holds no request log files.
    """
    paths = sorted(glob.glob(os.path.join(directory, FILE_PATTERN)))
    if not paths:
        raise FileNotFoundError(f"no request logs ({FILE_PATTERN}) in {directory!r}")
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    return frame.sort_values(["ts", "request_id", "row"], kind="stable").reset_index(drop=True)


def user_rows(directory: str, user_ids: Set[str]) -> Dict[str, int]:
    """Rows of the users per request log file: {file: rows} (none: {})."""
    counts = {}
    for path in sorted(glob.glob(os.path.join(directory, FILE_PATTERN))):
        users = pq.read_table(path, columns=[_USER]).column(_USER).to_pylist()
        n = sum(u in user_ids for u in users)
        if n:
            counts[path] = n
    return counts


def remove_users(paths: List[str], user_ids: Set[str]) -> None:
    """Rewrites request log files without the users' rows (`tfrec forget`).

    Each file is replaced atomically; a file left with no rows is deleted.
    """
    for path in paths:
        table = pq.read_table(path)
        keep = pa.array([u not in user_ids for u in table.column(_USER).to_pylist()])
        kept = table.filter(keep)
        if kept.num_rows:
            _write_parquet(kept, path)
        else:
            os.remove(path)
