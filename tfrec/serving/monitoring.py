"""Prometheus-style metrics of the embedded model server, served over local HTTP.

Operators need request rates, error codes, latency and batching efficiency without
attaching a debugger; a /metrics page in the text exposition format is what Prometheus
(and curl) read. Only the standard library is used: no client library to install.
"""

from __future__ import annotations

import bisect
import http.server
import logging
import math
import re
import threading
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                   5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNKNOWN = "_unknown_"  # label of names the server does not serve: keeps label sets bounded

Labels = Tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if value != int(value) else str(int(value))


class _Metric:
    """Name, help, type and label names shared by every metric kind."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()):
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _check(self, labels: Sequence[str]) -> Labels:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"metric {self.name} takes labels {self.labelnames}, got {labels}")
        return tuple(str(v) for v in labels)

    def header(self) -> List[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> List[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._values: Dict[Labels, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._check(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(self._check(labels), 0.0)

    def samples(self) -> List[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_label_text(self.labelnames, k)} {_number(v)}" for k, v in items]


class Histogram(_Metric):
    """Observations counted into cumulative `le` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        if not self.buckets:
            raise ValueError(f"histogram {name} needs at least one bucket")
        # Per label set: [count per bucket (+Inf last), sum].
        self._values: Dict[Labels, Tuple[List[int], List[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        key = self._check(labels)
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            counts, total = self._values.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[index] += 1
            total[0] += value

    def counts(self, *labels: str) -> Dict[float, int]:
        """Upper bound -> observations in that bucket (not cumulative), +Inf last."""
        with self._lock:
            counts = list(self._values.get(self._check(labels), ([0] * (len(self.buckets) + 1),
                                                                 [0.0]))[0])
        return dict(zip(self.buckets + (math.inf,), counts))

    def samples(self) -> List[str]:
        with self._lock:
            items = sorted((k, (list(c), t[0])) for k, (c, t) in self._values.items())
        lines = []
        names = self.labelnames + ("le",)
        for key, (counts, total) in items:
            cumulative = 0
            for bound, count in zip(self.buckets + (math.inf,), counts):
                cumulative += count
                lines.append(f"{self.name}_bucket{_label_text(names, key + (_number(bound),))} "
                             f"{cumulative}")
            labels = _label_text(self.labelnames, key)
            lines.append(f"{self.name}_sum{labels} {_number(total)}")
            lines.append(f"{self.name}_count{labels} {cumulative}")
        return lines


class CallbackGauge(_Metric):
    """A gauge whose values are read from the server's state at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str],
                 read: Callable[[], Mapping[Labels, float]]):
        super().__init__(name, help_text, labelnames)
        self._read = read

    def samples(self) -> List[str]:
        try:
            values = sorted(self._read().items())
        except Exception:  # a scrape must never break serving
            logger.exception("reading gauge %s failed", self.name)
            return []
        return [f"{self.name}{_label_text(self.labelnames, tuple(map(str, k)))} {_number(v)}"
                for k, v in values]


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self):
        self._metrics: List[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        lines = []
        for metric in self._metrics:
            lines += metric.header() + metric.samples()
        return "\n".join(lines) + "\n"


class ServingMetrics:
    """The model server's metrics: requests, latency, batching and loaded versions.

    Args:
      managers: Model name -> ModelManager, read at scrape time for version gauges.
      queued_requests: Returns the number of requests waiting for a batch, if batching.
      queued_log: Returns the number of calls waiting for the request log writer, if
        requests are logged.
    """

    def __init__(self, managers: Optional[Mapping[str, object]] = None,
                 queued_requests: Optional[Callable[[], int]] = None,
                 queued_log: Optional[Callable[[], int]] = None):
        self.managers = dict(managers or {})
        self.registry = Registry()
        add = self.registry.add
        self.requests = add(Counter(
            "tfrec_serving_requests_total", "RPCs answered, by method, model, signature and "
            "gRPC status code.", ("method", "model", "signature", "code")))
        self.latency = add(Histogram(
            "tfrec_serving_request_latency_seconds", "Server-side RPC latency in seconds "
            "(decode, queue, model call, encode).", ("method", "model", "signature"),
            LATENCY_BUCKETS))
        self.batch_size = add(Histogram(
            "tfrec_serving_batch_size", "Rows per model call.", ("model", "signature"),
            BATCH_BUCKETS))
        self.batch_requests = add(Histogram(
            "tfrec_serving_batch_requests", "Requests merged into one model call (1 without "
            "batching).", ("model", "signature"), BATCH_BUCKETS))
        self.batch_retries = add(Counter(
            "tfrec_serving_batch_retries_total", "Merged batches that failed and were re-run "
            "request by request.", ("model", "signature")))
        self.abandoned = add(Counter(
            "tfrec_serving_abandoned_calls_total", "Model calls stopped early because every "
            "client they served had cancelled or passed its deadline.", ("model", "signature")))
        add(CallbackGauge("tfrec_serving_model_version", "Highest version being served "
                          "(0: none).", ("model",), self._versions))
        add(CallbackGauge("tfrec_serving_model_versions_failed", "Versions whose load failed "
                          "(refused, not served).", ("model",), self._failed))
        self.log_dropped = add(Counter(
            "tfrec_serving_request_log_dropped_total", "Answered calls not logged because the "
            "request log queue was full (or its file could not be written).", ()))
        self.log_rows = add(Counter(
            "tfrec_serving_request_log_rows_total", "Request log rows written to Parquet.", ()))
        if queued_log is not None:
            add(CallbackGauge("tfrec_serving_request_log_queued", "Calls waiting for the "
                              "request log writer.", (), lambda: {(): queued_log()}))
        if queued_requests is not None:
            add(CallbackGauge("tfrec_serving_batch_queued_requests", "Requests waiting for a "
                              "batch thread.", (), lambda: {(): queued_requests()}))

    def _versions(self) -> Dict[Labels, float]:
        return {(name, ): float(max(m.versions(), default=0)) for name, m in self.managers.items()}

    def _failed(self) -> Dict[Labels, float]:
        return {(name,): float(sum(1 for s in m.version_states().values()
                                   if s.error_message))
                for name, m in self.managers.items()}

    def record_request(self, method: str, model: str, signature: str, code: str,
                       seconds: float) -> None:
        self.requests.inc(method, model, signature, code)
        self.latency.observe(seconds, method, model, signature)

    def record_batch(self, model: str, signature: str, rows: int, requests: int) -> None:
        self.batch_size.observe(rows, model, signature)
        self.batch_requests.observe(requests, model, signature)

    def render(self) -> str:
        return self.registry.render()


class _Handler(http.server.BaseHTTPRequestHandler):
    render: Callable[[], str] = staticmethod(lambda: "")

    def do_GET(self):  # noqa: N802 (http.server naming)
        path = self.path.split("?", 1)[0]
        if path != "/metrics":
            self._send(404, f"not found: {path}; metrics are at /metrics\n", "text/plain")
            return
        try:
            body = self.render()
        except Exception as e:
            logger.exception("rendering /metrics failed")
            self._send(500, f"metrics unavailable: {type(e).__name__}: {e}\n", "text/plain")
            return
        self._send(200, body, CONTENT_TYPE)

    def _send(self, status: int, body: str, content_type: str) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):  # scrapes every few seconds: keep logs quiet
        logger.debug("metrics http: " + fmt, *args)


class MetricsHTTPServer:
    """Serves `render()` at http://host:port/metrics from a daemon thread.

    Args:
      render: Returns the exposition text.
      host: Interface; 127.0.0.1 keeps metrics private to the machine.
      port: TCP port; 0 picks a free one (read `.port` after `start()`).
    """

    def __init__(self, render: Callable[[], str], host: str = "127.0.0.1", port: int = 0):
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"monitoring port must be in [0, 65535], got {port}")
        self.render = render
        self.host = host
        self.requested_port = int(port)
        self._httpd: Optional[http.server.ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("MetricsHTTPServer is not started; call start() first")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def start(self) -> "MetricsHTTPServer":
        handler = type("MetricsHandler", (_Handler,), {"render": staticmethod(self.render)})
        try:
            httpd = http.server.ThreadingHTTPServer((self.host, self.requested_port), handler)
        except OSError as e:
            raise OSError(f"cannot bind the metrics HTTP server to {self.host}:"
                          f"{self.requested_port} (port in use?): {e}") from e
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="tfrec-metrics-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None


def parse_exposition(text: str) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """(sample name, sorted label pairs) -> value from exposition text (tests, benches)."""
    samples = {}
    pattern = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = pattern.match(line)
        if match is None:
            raise ValueError(f"not an exposition sample line: {line!r}")
        name, labels, value = match.groups()
        pairs = tuple(sorted(
            (k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
            for k, v in label.findall(labels or "")))
        samples[(name, pairs)] = float(value)
    return samples
