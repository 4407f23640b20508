"""Closed-loop load on tfrec's embedded gRPC server, with server-side batching off and on.

Serves the exported retrieval model (the latest version under --model-dir, default
work/models/retrieval; without one, a model is trained on the --world synthetic world
and exported to a temporary directory first) from a ModelServer in a child process,
so the clients do not share the server's Python interpreter. The version is copied to
a private base dir, so exports made meanwhile do not change the model under test.

Each row restarts the server with one batching mode (--modes):
  off    each Predict is one model call (the default server);
  file   --enable-batching with serving/batching_parameters.txt (64 rows, 2 ms timeout,
         4 batch threads, history padding);
  eager  the same with batch_timeout_micros 0: a batch closes as soon as a batch thread
         is free, so only requests that piled up meanwhile are merged.
With --logging off,on every mode also runs with request logging on (rotating Parquet
request logs in a scratch directory, tfrec serve --request-log): the overhead of logging
is the "on" row's QPS and p99 against the "off" row of the same mode, in the same run.
Each server is driven with each client level (--clients, e.g. 1 and 16 concurrent clients): a
bounded closed loop where every client sends its next request when the previous
answer arrived, for --seconds or --max-requests in total. Clients are threads
(each with its own channel) or, with --processes P, P processes of clients/P threads.

Requests are what PredictClient.recommend sends: serving_default, one user, a
--history-item history (fixed width), empty or non-empty query, k=--k, exclude_seen;
rotating over --pool distinct requests. Latency is measured around
PredictClient.predict in the client (encode, loopback gRPC, queueing, model, decode).
"reqs/call" is requests per model call, read from the server's /metrics histogram.
Ratios divide by the first row (QPS: higher is better; p50: lower is better).

Run from the repository root:  python bench/serving_load.py [--clients 1,16] [--seconds 10]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the model is always trained
here (tiny world, 1 epoch) unless --model-dir is given, so the run does not depend on
work/models; only batching mode file (the batching path; off is the default server,
which serving_latency.py's smoke run serves, and eager is file with another timeout:
each mode costs a server start), 1 and 4 clients, 0.5 s or 100 requests per row after a
0.5 s warm-up, a pool of 16 requests, logging off and on. Same server process, load and
table; the figures mean nothing. TensorFlow's graph optimizer is off (bench/_common.py).
Options given explicitly still override these.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import urllib.request

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (closed_loop, format_table, machine_line, parse_smoke_args,  # noqa: E402
                     ratio)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "retrieval"
DEFAULT_MODEL_DIR = os.path.join(REPO, "work", "models", MODEL)
# model_dir "": no export to reuse, train one (a smoke run must not depend on work/models).
SMOKE = dict(model_dir="", world="tiny", epochs=1, modes="file", logging="off,on",
             clients="1,4", seconds=0.5, max_requests=100, warmup_seconds=0.5, pool=16)


# -- the model -------------------------------------------------------------------------------

def latest_version(model_dir: str):
    """Path of the highest integer version holding a saved_model.pb, or None."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    versions = [int(n) for n in os.listdir(model_dir)
                if n.isdigit() and os.path.isfile(os.path.join(model_dir, n, "saved_model.pb"))]
    return os.path.join(model_dir, str(max(versions))) if versions else None


def train_and_export(world: str, epochs: int, workdir: str) -> str:
    """Generates a synthetic world, trains a retrieval model and exports it (tfrec demo's path)."""
    from tfrec import workflow
    from tfrec.config import Config

    cfg = Config()
    cfg.data.data_dir = os.path.join(workdir, "data")
    cfg.data.tfrecord_dir = os.path.join(workdir, "tfrecords")
    cfg.train.checkpoint_dir = os.path.join(workdir, "checkpoints")
    cfg.train.log_dir = os.path.join(workdir, "tensorboard_logs")
    cfg.export.base_dir = os.path.join(workdir, "models")
    cfg.train.epochs = epochs
    workflow.generate(cfg, world=world)
    run = workflow.train(cfg)
    return workflow.export(cfg, model=run.model)


def catalog_ids(version_dir: str) -> np.ndarray:
    """Item ids stored in the exported model (read from its checkpoint, no model load)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(version_dir, "variables", "variables"))
    return reader.get_tensor("item_ids/.ATTRIBUTES/VARIABLE_VALUE").astype(object)


def request_pool(items: np.ndarray, args) -> list:
    rng = np.random.default_rng(args.seed)
    pool = []
    for i in range(args.pool):
        history = list(rng.choice(items, size=args.history, replace=False))
        pool.append({
            "user_id": np.array([f"U{int(rng.integers(1, 2000)):06d}"], dtype=object),
            "history": np.array([history], dtype=object),
            "query": np.array(["running shoes" if i % 4 == 0 else ""], dtype=object),
            "device": np.array(["mobile" if i % 2 else "desktop"], dtype=object),
            "hour": np.array([int(rng.integers(24))], dtype=np.int64),
            "k": np.array([args.k], dtype=np.int32),
            "exclude_seen": np.array([True]),
        })
    return pool


# -- the server (child process) ------------------------------------------------------------

def batching_of(mode: str):
    from tfrec.serving.batching import parse_batching_parameters

    if mode == "off":
        return None
    path = os.path.join(REPO, "serving", "batching_parameters.txt")
    if mode == "file":
        return parse_batching_parameters(path)
    if mode == "eager":
        return parse_batching_parameters(path, batch_timeout_micros=0)
    raise ValueError(f"unknown mode {mode!r}; use off, file or eager")


def _serve(base: str, mode: str, max_workers: int, request_log, conn) -> None:
    from tfrec.serving.server import ModelServer

    server = ModelServer({MODEL: base}, port=0, poll_seconds=0, max_workers=max_workers,
                         batching=batching_of(mode), monitoring_port=0,
                         request_log=request_log).start()
    conn.send((server.port, server.monitoring_port))
    try:
        conn.recv()
    except EOFError:
        pass
    server.stop(0)
    if server.request_log is not None:
        conn.send((server.request_log.written_rows, server.request_log.dropped))


class ServerProcess:
    """A ModelServer with one batching mode in a spawned child process."""

    def __init__(self, base: str, mode: str, max_workers: int, request_log=None):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.logging = bool(request_log)
        self.process = context.Process(target=_serve, daemon=True,
                                       args=(base, mode, max_workers, request_log, child))
        self.process.start()
        if not self.conn.poll(300):
            self.process.kill()
            raise RuntimeError("the server process did not start within 300 s")
        self.port, self.monitoring_port = self.conn.recv()
        self.address = f"127.0.0.1:{self.port}"

    def batch_stats(self) -> tuple:
        """(model calls, requests) served so far, from /metrics."""
        from tfrec.serving.monitoring import parse_exposition

        url = f"http://127.0.0.1:{self.monitoring_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            samples = parse_exposition(response.read().decode())
        labels = (("model", MODEL), ("signature", "serving_default"))
        return (samples.get(("tfrec_serving_batch_requests_count", labels), 0.0),
                samples.get(("tfrec_serving_batch_requests_sum", labels), 0.0))

    def stop(self):
        """Stops the server; with logging, returns (rows written, calls dropped)."""
        self.conn.send("stop")
        logged = self.conn.recv() if self.logging and self.conn.poll(120) else None
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
        return logged


# -- load -----------------------------------------------------------------------------------

def _client_process(address, pool, threads, seconds, max_requests, offset, ready, go, queue):
    ready.set()  # imports and channel set-up are done
    queue.put(closed_loop(address, MODEL, pool, threads, seconds, max_requests, go, offset))


def run_clients(address, pool, clients, processes, seconds, max_requests):
    """Latencies, errors and wall time of `clients` concurrent clients."""
    if processes <= 1 or clients < 2:
        return closed_loop(address, MODEL, pool, clients, seconds, max_requests)
    context = multiprocessing.get_context("spawn")
    go, queue = context.Event(), context.Queue()
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    procs, readies = [], []
    for i, threads in enumerate(s for s in shares if s):
        ready = context.Event()
        procs.append(context.Process(target=_client_process, daemon=True, args=(
            address, pool, threads, seconds, max_requests // processes, i * 1000, ready, go,
            queue)))
        readies.append(ready)
        procs[-1].start()
    for ready in readies:
        ready.wait(300)
    time.sleep(1.0)  # let every process finish its warm-up request
    go.set()
    results = [queue.get(timeout=seconds + 300) for _ in procs]
    for proc in procs:
        proc.join(60)
    return (np.concatenate([r[0] for r in results]), sum((r[1] for r in results), []),
            max(r[2] for r in results))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_DIR,
                        help="base dir with <version>/ exports (latest is used)")
    parser.add_argument("--world", default="tiny", choices=("tiny", "small"),
                        help="synthetic world to train on when --model-dir has no version")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of that training")
    parser.add_argument("--modes", default="off,file,eager",
                        help="batching modes, comma list of off/file/eager")
    parser.add_argument("--logging", default="off",
                        help="request logging per mode, comma list of off/on (on: Parquet "
                             "request logs, as tfrec serve --request-log)")
    parser.add_argument("--clients", default="1,16", help="concurrent clients, comma list")
    parser.add_argument("--processes", type=int, default=1,
                        help="spread the clients over this many client processes")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one run")
    parser.add_argument("--max-requests", type=int, default=20000, help="cap of one run")
    parser.add_argument("--warmup-seconds", type=float, default=2.0,
                        help="untimed load at the highest client level after each server start")
    parser.add_argument("--max-workers", type=int, default=32, help="server gRPC threads")
    parser.add_argument("--history", type=int, default=20, help="history items per request")
    parser.add_argument("--k", type=int, default=10, help="results per request")
    parser.add_argument("--pool", type=int, default=64, help="distinct requests rotated")
    parser.add_argument("--seed", type=int, default=42)
    args = parse_smoke_args(parser, argv, SMOKE)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    logging_modes = [m.strip() for m in args.logging.split(",") if m.strip()]
    if not logging_modes or set(logging_modes) - {"off", "on"}:
        parser.error(f"--logging takes off and/or on, got {args.logging!r}")
    for mode in modes:
        batching_of(mode)  # fail on a bad mode before any work

    started = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="tfrec-bench-load-")
    rows = []
    try:
        source = latest_version(args.model_dir)
        origin = source
        if source is None:
            where = f"no export under {args.model_dir}" if args.model_dir else "no --model-dir"
            print(f"{where}: training on the {args.world!r} world "
                  f"({args.epochs} epochs)", flush=True)
            t0 = time.perf_counter()
            source = train_and_export(args.world, args.epochs, os.path.join(scratch, "work"))
            origin = f"trained here on {args.world!r} in {time.perf_counter() - t0:.0f}s"
        base = os.path.join(scratch, MODEL)
        shutil.copytree(source, os.path.join(base, "1"))
        items = catalog_ids(source)
        pool = request_pool(items, args)
        print(f"model: {origin} ({len(items)} items)", flush=True)

        for mode, log in [(m, g) for m in modes for g in logging_modes]:
            t0 = time.perf_counter()
            server = ServerProcess(base, mode, args.max_workers,
                                   os.path.join(scratch, f"logs-{mode}") if log == "on" else None)
            print(f"server ({mode}, logging {log}) up in {time.perf_counter() - t0:.0f}s",
                  flush=True)
            try:
                run_clients(server.address, pool, max(levels), 1, args.warmup_seconds,
                            400)  # warm-up
                for clients in levels:
                    calls0, requests0 = server.batch_stats()
                    latencies, errors, wall = run_clients(server.address, pool, clients,
                                                          args.processes, args.seconds,
                                                          args.max_requests)
                    calls1, requests1 = server.batch_stats()
                    per_call = ((requests1 - requests0) / (calls1 - calls0)
                                if calls1 > calls0 else float("nan"))
                    p50, p95, p99 = (np.percentile(latencies * 1000, [50, 95, 99])
                                     if len(latencies) else (float("nan"),) * 3)
                    rows.append(dict(mode=mode, log=log, clients=clients,
                                     requests=len(latencies)
                                     + len(errors), qps=len(latencies) / wall, p50=p50, p95=p95,
                                     p99=p99, errors=len(errors), per_call=per_call,
                                     codes=sorted(set(errors))))
                    print(f"{mode}, {clients} clients: {rows[-1]['qps']:.0f} QPS, p50 "
                          f"{p50:.2f} ms, {len(errors)} errors", flush=True)
            finally:
                logged = server.stop()
            if logged is not None:
                print(f"request log: {logged[0]} rows written, {logged[1]} calls dropped",
                      flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    first = rows[0]
    off = {(r["mode"], r["clients"]): r for r in rows if r["log"] == "off"}

    def versus_off(r, key):
        base = off.get((r["mode"], r["clients"]))
        return ratio(r[key], base[key]) if r["log"] == "on" and base else "-"

    table = [[r["mode"], r["log"], r["clients"], r["requests"], f"{r['qps']:.0f}",
              f"{r['p50']:.2f}", f"{r['p95']:.2f}", f"{r['p99']:.2f}", r["errors"],
              f"{r['per_call']:.2f}",
              ratio(r["qps"], first["qps"]), ratio(r["p50"], first["p50"]),
              versus_off(r, "qps"), versus_off(r, "p99")] for r in rows]
    print()
    print(f"serving load | serving_default top-{args.k}, {args.history}-item history, "
          f"{len(pool)} distinct requests | model: {origin}, {len(items)} items | server in a "
          f"child process, {args.max_workers} gRPC threads | clients: "
          f"{args.processes} process(es)")
    print(machine_line())
    print(format_table(
        ["batching", "log", "clients", "requests", "QPS", "p50 ms", "p95 ms", "p99 ms", "errors",
         "reqs/call", "QPS vs 1st", "p50 vs 1st", "QPS vs log off", "p99 vs log off"], table,
        title=f"closed loop, {args.seconds:g}s per row (cap {args.max_requests} requests); "
              f"ratios against the first row"))
    codes = sorted({c for r in rows for c in r["codes"]})
    if codes:
        print(f"error codes: {', '.join(codes)}")
    print(f"total wall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
