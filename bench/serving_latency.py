"""Latency and throughput of gRPC Predict (top-k retrieval) on tfrec's embedded server.

For each catalog size (--sizes) a SavedModel is exported as `tfrec export` would write
it: a catalog of that many items from the synthetic world generator, vocabularies
over it (every item, --users user ids), an untrained TwoTowerModel (latency does not
depend on the weights), RetrievalModule (towers + catalog embeddings + exact top-k)
and save_versioned. One tfrec.serving.server.ModelServer on 127.0.0.1 (port 0) serves
all sizes, by default in a child process so the client threads do not share the
server's Python interpreter (--server thread runs it in this process instead).

Each request is what PredictClient.recommend sends: serving_default, one user, a
20-item history of catalog items, empty query, k=100, exclude_seen=true; requests
rotate over a pool of --pool different users/histories. Latency is measured around
PredictClient.predict (request encoding, loopback gRPC, server, response decoding).

Load is a bounded closed loop: 1 client thread (sequential latency) then --threads
threads, each with its own channel, sending back to back for --seconds (or until
--max-requests); repeated --repeats times, and each figure in the table is the median
over the repeats. "direct" rows call the same signature in this process (tf.constant
inputs, numpy outputs, no gRPC) sequentially: the gap to the 1-thread gRPC row is the
cost of gRPC, protobuf and the server's request handling. "p50 vs ref" divides each
row's p50 by the p50 of the first size's 1-thread gRPC row.

Run from the repository root:  python bench/serving_latency.py [--sizes 10000,100000]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): a 1,000-item catalog, 1,000
user ids, the server in a thread (--server thread: no child process to start;
ranking_latency.py's smoke run starts this file's Server as a process), 2 client
threads, 0.5 s or 200 requests per run, 1 repeat, 20 direct calls, a pool of 16
requests. Same export, closed loop and table; the figures mean nothing. TensorFlow's
graph optimizer is off (bench/_common.py). Options given explicitly still override
these.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np
import pandas as pd
import tensorflow as tf

from tfrec.config import ModelConfig
from tfrec.data.synthetic import WorldSpec, generate_world
from tfrec.export.retrieval import RetrievalModule
from tfrec.export.versioned import save_versioned
from tfrec.features.vocab import build_vocabularies
from tfrec.models.retrieval import TwoTowerModel
from tfrec.serving.client import PredictClient
from tfrec.serving.model_manager import load_version
from tfrec.serving.server import ModelServer

tf.get_logger().setLevel("ERROR")  # Python-side TF notices (e.g. retracing) off
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import closed_loop, format_table, machine_line, parse_smoke_args  # noqa: E402

SMOKE = dict(sizes="1000", server="thread", threads=2, seconds=0.5, max_requests=200,
             repeats=1, direct_requests=20, users=1000, pool=16)


def export_model(num_items, base_dir, args, encoder="pooled"):
    """Writes `<base_dir>/retrieval_<n>[_<encoder>]/1/`; returns (model name, item ids,
    user ids). `encoder` is the query tower's model.history_encoder."""
    spec = WorldSpec(name=f"catalog-{num_items}", num_items=num_items, num_users=50, days=1,
                     sessions_per_user=1.0)
    catalog = generate_world(spec, seed=args.seed).catalog
    items = catalog["item_id"].astype(str).to_numpy()
    users = np.array([f"U{i:07d}" for i in range(args.users)])
    rows = max(len(items), len(users))  # as if every user and item had trained
    train = pd.DataFrame({"user_id": np.resize(users, rows), "item_id": np.resize(items, rows),
                          "query": ""})
    config = ModelConfig(history_encoder=encoder)
    vocab = build_vocabularies(train, catalog, config.text_max_tokens, config.price_buckets)
    tf.keras.utils.set_random_seed(args.seed)
    model = TwoTowerModel(vocab, config)
    model.build_from_features()
    module = RetrievalModule(model, catalog)
    name = f"retrieval_{num_items}" + ("" if encoder == "pooled" else f"_{encoder}")
    save_versioned(module, module.signatures(), base_dir, name, version=1)
    return name, items, users


def label(num_items: int, encoder: str) -> str:
    """Catalog column of a row: the size, and the history encoder when not pooled."""
    return f"{num_items:,}" + ("" if encoder == "pooled" else f" {encoder}")


def request_pool(items, users, args):
    """--pool requests as PredictClient.recommend builds them (k=100, exclude_seen)."""
    rng = np.random.default_rng(args.seed)
    pool = []
    for i in range(args.pool):
        history = rng.choice(items, size=args.history, replace=False)
        pool.append({
            "user_id": np.array([rng.choice(users)], dtype=object),
            "history": np.array([history], dtype=object),
            "query": np.array([""], dtype=object),
            "device": np.array(["mobile" if i % 2 else "desktop"], dtype=object),
            "hour": np.array([int(rng.integers(24))], dtype=np.int64),
            "k": np.array([args.k], dtype=np.int32),
            "exclude_seen": np.array([True]),
        })
    return pool


def check_response(outputs, request, k):
    ids = [i.decode() for i in outputs["item_ids"][0]]
    seen = set(request["history"][0])
    if len(ids) != k or "" in ids or seen & set(ids):
        raise RuntimeError(f"unexpected response: {len(ids)} ids, "
                           f"{len(seen & set(ids))} history items not excluded")


def direct_calls(version_dir, pool, requests):
    """Sequential in-process calls of serving_default, as the server makes them.

    Returns (latencies s, error code names, wall s) like _common.closed_loop; a direct
    call has no gRPC status, so the error list is always empty (a failing call raises).
    """
    signature = load_version(1, version_dir).signatures["serving_default"]

    def call(request):
        inputs = {k: tf.constant(v, dtype=signature.inputs[k].dtype) for k, v in request.items()}
        return {k: v.numpy() for k, v in signature.function(**inputs).items()}

    for request in pool[:10]:
        check_response(call(request), request, int(request["k"][0]))
    start_all = time.perf_counter()
    latencies = []
    for n in range(requests):
        start = time.perf_counter()
        call(pool[n % len(pool)])
        latencies.append(time.perf_counter() - start)
    return np.asarray(latencies), [], time.perf_counter() - start_all


def _serve(models, conn):
    """Child process: serve until the parent says stop (or goes away)."""
    server = ModelServer(models, host="127.0.0.1", port=0, poll_seconds=0).start()
    conn.send(server.port)
    try:
        conn.recv()
    except EOFError:
        pass
    server.stop(0)


class Server:
    """ModelServer in a child process (default) or a thread of this one."""

    def __init__(self, models, mode):
        self.mode = mode
        if mode == "thread":
            self.server = ModelServer(models, host="127.0.0.1", port=0, poll_seconds=0).start()
            self.port = self.server.port
            return
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(models, child), daemon=True)
        self.process.start()
        if not self.conn.poll(300):
            self.process.kill()
            raise RuntimeError("the server process did not start in 300s")
        self.port = self.conn.recv()

    def stop(self):
        if self.mode == "thread":
            self.server.stop(0)
            return
        self.conn.send("stop")
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()


def summarize(runs):
    """Median over repeats of QPS and percentiles (ms); totals of requests and errors.

    `runs` are (latencies s, error code names, wall s) as closed_loop and direct_calls
    return them; a run without a single answer (all errors) has no percentiles and is
    left out of the medians (NaN when no run has one).
    """
    stats = [(len(lat) / wall, *np.percentile(lat * 1000, [50, 95, 99]))
             for lat, _, wall in runs if len(lat)]
    medians = [statistics.median(s[i] for s in stats) if stats else float("nan")
               for i in range(4)]
    return {"requests": sum(len(r[0]) + len(r[1]) for r in runs),
            "errors": sum(len(r[1]) for r in runs),
            "qps": medians[0] if stats else 0.0, "p50": medians[1], "p95": medians[2],
            "p99": medians[3]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="catalog sizes, comma list")
    parser.add_argument("--threads", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one run")
    parser.add_argument("--max-requests", type=int, default=20000, help="cap of one run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (median shown)")
    parser.add_argument("--direct-requests", type=int, default=200,
                        help="in-process calls per repeat")
    parser.add_argument("--history", type=int, default=20, help="history items per request")
    parser.add_argument("--k", type=int, default=100, help="results per request")
    parser.add_argument("--users", type=int, default=30000, help="user vocabulary size")
    parser.add_argument("--pool", type=int, default=64, help="distinct requests rotated")
    parser.add_argument("--server", choices=("process", "thread"), default="process",
                        help="run the ModelServer in a child process or in this process")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--history-encoders", default="pooled",
                        help="comma list of model.history_encoder (pooled, transformer, gru)"
                             ": one model per size and encoder")
    args = parse_smoke_args(parser, argv, SMOKE)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    encoders = [e.strip() for e in args.history_encoders.split(",") if e.strip()]
    models = [(n, e) for n in sizes for e in encoders]

    started = time.perf_counter()
    base_dir = tempfile.mkdtemp(prefix="tfrec-bench-serving-")
    server = None
    rows = []
    try:
        exported, export_seconds = {}, {}
        for n, e in models:
            t0 = time.perf_counter()
            exported[n, e] = export_model(n, base_dir, args, e)
            export_seconds[n, e] = time.perf_counter() - t0
            print(f"exported {n} items ({e} history) in {export_seconds[n, e]:.0f}s",
                  flush=True)
        t0 = time.perf_counter()
        server = Server({name: os.path.join(base_dir, name) for name, _, _ in exported.values()},
                        args.server)
        address = f"127.0.0.1:{server.port}"
        print(f"server ({args.server}) on {address} in {time.perf_counter() - t0:.0f}s",
              flush=True)
        for n, e in models:
            name, items, users = exported[n, e]
            pool = request_pool(items, users, args)
            with PredictClient(address, timeout=60) as client:
                client.wait_until_available(name, timeout=120)
                for request in pool[:10] + pool[:40]:  # warm-up, checking the answers
                    check_response(client.predict(name, request), request, args.k)
            for threads in sorted({1, args.threads}):
                runs = [closed_loop(address, name, pool, threads, args.seconds,
                                    args.max_requests) for _ in range(args.repeats)]
                rows.append((label(n, e), "gRPC", threads, summarize(runs)))
                print(f"{n} items, {threads} thread(s): p50 {rows[-1][3]['p50']:.2f} ms",
                      flush=True)
            version_dir = os.path.join(base_dir, name, "1")
            runs = [direct_calls(version_dir, pool, args.direct_requests)
                    for _ in range(args.repeats)]
            rows.append((label(n, e), "direct", 1, summarize(runs)))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)

    reference = rows[0][3]["p50"]
    table = [[n, path, threads, s["requests"], f"{s['qps']:.1f}", f"{s['p50']:.2f}",
              f"{s['p95']:.2f}", f"{s['p99']:.2f}", s["errors"], f"{s['p50'] / reference:.2f}x"]
             for n, path, threads, s in rows]
    print()
    print(f"serving latency | serving_default top-{args.k}, exclude_seen, {args.history}-item "
          f"history, empty query | untrained two-tower, exact top-k | server: {args.server}")
    print(machine_line())
    print(format_table(
        ["catalog", "path", "threads", "requests", "QPS", "p50 ms", "p95 ms", "p99 ms",
         "errors", "p50 vs ref"], table,
        title=f"closed loop, {args.seconds:g}s per run (direct: {args.direct_requests} calls), "
              f"median of {args.repeats} runs; ref = {label(*models[0])} items, gRPC, "
              "1 thread"))
    print("build + export (s): " + ", ".join(f"{label(n, e)} items {t:.0f}"
                                             for (n, e), t in export_seconds.items()))
    print(f"total wall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
