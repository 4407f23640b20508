"""Approximate top-k (IVF, core TF ops) against exact top-k, at 100k and 1M items.

For each catalog size (--sizes) two sets of vectors:
  trained  a tfrec retrieval model trained (`train_retrieval`, --train-steps steps of one
           epoch) on a synthetic world with that many items (`WorldSpec`, cached in
           --work-dir); the item tower embeds the whole catalog, the queries are the query
           tower's embeddings of validation users (what `tfrec export` measures on).
  random   unit-norm Gaussian vectors and queries of the same shape (no cluster
           structure: the worst case for any partitioning index).
Rows per set: exact (tfrec.models.catalog_index.CatalogIndex, the matmul + top_k `tfrec export`
serves below export.index_min_items), IVF (the same class over an IVF plan with nlist =
4 sqrt(N), built as the export builds it) at each --nprobes value, and as a reference on
the same vectors faiss IVF-Flat (same nlist, inner product, each nprobe) and HNSW
(M = 32, each --ef-search) when faiss-cpu is installed (`pip install faiss-cpu`, a
bench-only dependency). Columns: recall@100 against exact top-100 over --queries queries,
p50 / p99 latency per request at batch 1 and 32 (--requests back-to-back calls after
--warmup, one thread, in-process: query embeddings in, top-100 rows out), batch-1 p50
as a ratio to exact's in the same run (the key figure), build seconds and the index's
memory beside the embeddings (IVF: centroids + list offsets; faiss: its whole index).

Then over gRPC (trained vectors, --grpc): the trained model exported twice by
`export_retrieval` (export.index=exact and =ivf, nprobe tuned by the export to
export.index_target_recall on validation users), served by tfrec's ModelServer on
127.0.0.1 in this process, called through PredictClient with validation users' requests
(towers + history exclusion + top-100): serving_default of each, and the IVF model's
recommend_nprobe at each --nprobes value; p50 / p99 at batch 1 and 32.

Run from the repository root:  python bench/ann_retrieval.py [--sizes 100000,1000000]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): 2,000 items, 20 training
steps, 30 queries, 3 warm-up and 10 timed calls per row, nprobe 1 and 8, faiss rows
when faiss is installed, the gRPC table. Same code and tables; figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import replace

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np
import tensorflow as tf

from tfrec.config import Config
from tfrec.data.synthetic import World, WorldSpec, generate_world
from tfrec.evaluation.report import validation_queries
from tfrec.export.exporter import export_retrieval
from tfrec.models.catalog_index import CatalogIndex, IndexChoice, exact_top_k
from tfrec.metrics.retrieval import embed_in_batches
from tfrec.data.feature_spec import catalog_features
from tfrec.models.embedding import tower_fn
from tfrec.models.ivf import build_ivf, default_nlist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args, time_calls  # noqa: E402

SMOKE = {"sizes": "2000", "train_steps": 20, "queries": 30, "warmup": 3, "requests": 10,
         "nprobes": "1,8", "ef_search": "16,64"}
K = 100


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def world_dir(n: int, args) -> str:
    """A synthetic world with n items, generated once per --work-dir."""
    path = os.path.join(args.work_dir, f"world_{n}")
    if not os.path.exists(os.path.join(path, "world.json")):
        spec = WorldSpec(name=f"ann-{n}", num_items=n, num_users=min(30_000, max(300, n // 10)),
                         days=60, sessions_per_user=5.0)
        generate_world(spec, seed=args.seed).save(path)
    return path


def trained_vectors(n: int, args):
    """(model, run_dir, catalog, item embeddings, validation query embeddings)."""
    from tfrec.training.trainer import train_retrieval

    cfg = Config()
    cfg.data.data_dir = world_dir(n, args)
    cfg.data.tfrecord_dir = os.path.join(args.work_dir, f"tfrecords_{n}")
    cfg.train.checkpoint_dir = os.path.join(args.work_dir, "checkpoints")
    cfg.train.log_dir = os.path.join(args.work_dir, "logs")
    cfg.train.run_name = f"ann_{n}"
    cfg.train.epochs = 1
    cfg.train.steps_per_epoch = args.train_steps
    cfg.train.batch_size = args.batch_size
    cfg.train.eval_max_users = args.queries
    cfg.train.seed = args.seed
    cfg.export.base_dir = os.path.join(args.work_dir, "models")
    run = train_retrieval(cfg)
    catalog = World.load(cfg.data.data_dir).catalog
    features = catalog_features(catalog, run.model)
    items = embed_in_batches(tower_fn(run.model.candidate_tower), features)
    queries = validation_queries(cfg.data, tower_fn(run.model.query_tower),
                                 max_users=args.queries).embeddings
    return run, cfg, catalog, items, queries


def random_vectors(n: int, d: int, q: int, seed: int):
    rng = np.random.RandomState(seed)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa
    return unit(rng.randn(n, d)), unit(rng.randn(q, d))


def timed(call, batches, warmup: int, requests: int):
    """p50 / p99 ms of `call(batch)` over `requests` calls (cycling through batches)."""
    times = time_calls(call, batches, warmup, requests)
    return np.percentile(times, 50), np.percentile(times, 99)


def batches_of(queries: np.ndarray, size: int) -> list:
    reps = int(np.ceil(size / len(queries))) if len(queries) < size else 1
    q = np.tile(queries, (reps, 1))
    return [q[i:i + size] for i in range(0, len(q) - size + 1, size)] or [q[:size]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def tf_rows(name, vectors, queries, plan, nprobes, args, build_s):
    """Exact and IVF rows through CatalogIndex (what the export serves), per --precisions.

    Recall is always against float32 exact search; "vs exact" against float32 exact.
    """
    rows = []
    ordered = vectors[plan.order]
    truth = exact_top_k(queries, ordered, K)
    index_mb = (plan.centroids.nbytes + 2 * 8 * plan.nlist) / 2 ** 20
    variants = []
    for precision in args.precisions.split(","):
        exact = CatalogIndex(ordered, IndexChoice(plan=None), precision=precision)
        ivf = CatalogIndex(ordered, IndexChoice(plan=plan, nprobe=1), precision=precision)
        exact_fn = tf.function(lambda q, exact=exact: exact.top_k(q, K)[1])
        ivf_fn = tf.function(lambda q, p, ivf=ivf: ivf.top_k(q, K, nprobe=p)[1])
        tag = "" if precision == "float32" else f" {precision}"
        variants.append((f"exact{tag}", None, exact_fn))
        variants += [(f"ivf nprobe={p}{tag}", p, ivf_fn) for p in nprobes if p <= plan.nlist]
    reference = None
    for label, p, fn in variants:
        if p is None:
            call = lambda q, fn=fn: fn(tf.constant(q))  # noqa: E731
        else:
            call = lambda q, p=p, fn=fn: fn(tf.constant(q), tf.fill([len(q)], p))  # noqa: E731
        found = np.concatenate([call(b).numpy() for b in batches_of(queries, 64)])[
            :len(queries)]
        b1 = timed(call, batches_of(queries, 1), args.warmup, args.requests)
        b32 = timed(call, batches_of(queries, 32), args.warmup, args.requests)
        reference = reference or b1[0]
        rows.append([name, label, f"{recall(found, truth):.3f}", f"{b1[0]:.2f}", f"{b1[1]:.2f}",
                     f"{b32[0]:.2f}", f"{b32[1]:.2f}", f"{reference / b1[0]:.1f}x",
                     "-" if p is None else f"{build_s:.1f}",
                     "-" if p is None else f"{index_mb:.1f}"])
    return rows, truth, plan.order


def faiss_rows(name, vectors, queries, truth_rows, nlist, nprobes, ef_search, args, ref_ms):
    """faiss IVF-Flat and HNSW on the same vectors (truth in catalog row order)."""
    try:
        import faiss
    except ImportError:
        return [[name, "faiss (not installed)"] + ["-"] * 8]
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    d = vectors.shape[1]
    rows = []
    start = time.perf_counter()
    quantizer = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.RandomState(args.seed)
    ivf.train(vectors[rng.choice(len(vectors), min(len(vectors), 64 * nlist), replace=False)])
    ivf.add(vectors)
    ivf_build = time.perf_counter() - start
    start = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(vectors)
    hnsw_build = time.perf_counter() - start
    mb = lambda index: len(faiss.serialize_index(index)) / 2 ** 20  # noqa: E731
    settings = [(f"faiss IVF-Flat nprobe={p}", ivf, "nprobe", p, ivf_build)
                for p in nprobes if p <= nlist]
    settings += [(f"faiss HNSW32 ef={e}", hnsw, "efSearch", e, hnsw_build) for e in ef_search]
    for label, index, knob, value, build in settings:
        if knob == "nprobe":
            index.nprobe = value
        else:
            index.hnsw.efSearch = value
        call = lambda q, index=index: index.search(q, K)[1]  # noqa: E731
        found = call(queries)
        b1 = timed(call, batches_of(queries, 1), args.warmup, args.requests)
        b32 = timed(call, batches_of(queries, 32), args.warmup, args.requests)
        rows.append([name, label, f"{recall(found, truth_rows):.3f}", f"{b1[0]:.2f}",
                     f"{b1[1]:.2f}", f"{b32[0]:.2f}", f"{b32[1]:.2f}", f"{ref_ms / b1[0]:.1f}x",
                     f"{build:.1f}", f"{mb(index) - vectors.nbytes / 2 ** 20:.1f}"])
    return rows


def grpc_rows(n, run, cfg, catalog, nprobes, args):
    """Both exports of the trained model served on loopback, called with real requests."""
    from tfrec.metrics.retrieval import build_eval_set
    from tfrec.data.io import load_tables
    from tfrec.data.split import time_split
    from tfrec.serving import ModelServer, PredictClient

    paths = {}
    for kind in ("exact", "ivf"):
        export = replace(cfg.export, model_name=f"{kind}_{n}", index=kind, version=None)
        start = time.perf_counter()
        paths[kind] = export_retrieval(run.run_dir, catalog, export, model=run.model)
        paths[f"{kind}_s"] = time.perf_counter() - start
    events = load_tables(cfg.data.data_dir).events
    split = time_split(events, cfg.data.val_fraction, cfg.data.test_fraction)
    users = build_eval_set(events, split.t_val, split.t_test, cfg.data.history_length,
                           max_users=max(args.queries, 32))
    wanted = run.model.query_tower.input_specs
    features = {k: v for k, v in users.query_features().items() if k in wanted}

    def requests(size, nprobe=None):
        out = []
        for i in range(0, len(users.user_ids) - size + 1, size):
            r = {k: np.asarray(v[i:i + size]) for k, v in features.items()}
            r["k"] = np.full([size], K, np.int32)
            r["exclude_seen"] = np.ones([size], bool)
            if nprobe is not None:
                r["nprobe"] = np.full([size], nprobe, np.int32)
            out.append(r)
        return out

    models = {f"{kind}_{n}": os.path.dirname(paths[kind]) for kind in ("exact", "ivf")}
    server = ModelServer(models, port=0, poll_seconds=0).start()
    client = PredictClient(server.address, timeout=60)
    card = json.load(open(os.path.join(paths["ivf"], "assets.extra", "tfrec_model.json")))
    tuned = card["retrieval_index"].get("nprobe")
    rows = []
    reference = None
    variants = [("exact serving_default", f"exact_{n}", "serving_default", None),
                (f"ivf serving_default (nprobe={tuned})", f"ivf_{n}", "serving_default", None)]
    if card["retrieval_index"]["index"] == "ivf":
        variants += [(f"ivf recommend_nprobe nprobe={p}", f"ivf_{n}", "recommend_nprobe", p)
                     for p in nprobes if p <= card["retrieval_index"]["nlist"]]
    try:
        for label, model, signature, p in variants:
            call = lambda r, m=model, s=signature: client.predict(m, r, s)  # noqa: E731
            b1 = timed(call, requests(1, p), args.warmup, args.requests)
            b32 = timed(call, requests(32, p), args.warmup, args.requests)
            reference = reference or b1[0]
            rows.append([f"{n:,}", label, f"{b1[0]:.2f}", f"{b1[1]:.2f}", f"{b32[0]:.2f}",
                         f"{b32[1]:.2f}", f"{reference / b1[0]:.1f}x"])
    finally:
        client.close()
        server.stop(grace=0)
    index = card["retrieval_index"]
    note = (f"{n:,} items: export exact {paths['exact_s']:.0f} s, ivf {paths['ivf_s']:.0f} s "
            f"(k-means {index.get('build_seconds', '-')} s); model card: {index}")
    return rows, note


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--nprobes", default="4,8,16,32,64,128")
    parser.add_argument("--ef-search", default="32,64,128,256", help="faiss HNSW efSearch")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200, help="timed calls per row")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64, help="random vectors' size")
    parser.add_argument("--no-random", dest="random", action="store_false")
    parser.add_argument("--no-faiss", dest="faiss", action="store_false")
    parser.add_argument("--no-grpc", dest="grpc", action="store_false")
    parser.add_argument("--work-dir", help="keeps worlds, runs and exports (default: temp)")
    parser.add_argument("--precisions", default="float32",
                        help="storage of the catalog embeddings, comma-separated "
                             "(float32, bfloat16, int8): rows for each")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_smoke_args(parser, argv, SMOKE)
    tmp = None
    if not args.work_dir:
        tmp = tempfile.TemporaryDirectory(prefix="tfrec_ann_")
        args.work_dir = tmp.name
    nprobes = [int(p) for p in args.nprobes.split(",")]
    ef_search = [int(e) for e in args.ef_search.split(",")]
    print(machine_line(), flush=True)
    table, grpc_table, notes = [], [], []
    for n in [int(s) for s in args.sizes.split(",")]:
        start = time.perf_counter()
        run, cfg, catalog, items, queries = trained_vectors(n, args)
        notes.append(f"{n:,} items: world + training {time.perf_counter() - start:.0f} s, "
                     f"{len(queries)} validation queries")
        sets = [("trained", items, queries)]
        if args.random:
            sets.append(("random",) + random_vectors(n, args.dim, len(queries), args.seed))
        for name, vectors, q in sets:
            nlist = default_nlist(n)
            start = time.perf_counter()
            plan = build_ivf(vectors, nlist, seed=args.seed)
            build_s = time.perf_counter() - start
            label = f"{n:,} {name}"
            rows, truth, order = tf_rows(label, vectors, q, plan, nprobes, args, build_s)
            table += rows
            print(format_table(HEADERS, rows), flush=True)
            if args.faiss:
                ref_ms = float(rows[0][3])
                frows = faiss_rows(label, vectors, q, order[truth], nlist, nprobes, ef_search,
                                   args, ref_ms)
                table += frows
                print(format_table(HEADERS, frows), flush=True)
        if args.grpc:
            rows, note = grpc_rows(n, run, cfg, catalog, nprobes, args)
            grpc_table += rows
            notes.append(note)
    print()
    print(format_table(HEADERS, table, title=(
        f"top-{K}, in-process; 'vs exact' = exact's batch-1 p50 / this row's (higher is "
        "faster); build s and index MB beside the embeddings")))
    if grpc_table:
        print()
        print(format_table(GRPC_HEADERS, grpc_table, title=(
            f"over gRPC (tfrec ModelServer on 127.0.0.1, towers + history exclusion + "
            f"top-{K}); 'vs exact' = exact export's batch-1 p50 / this row's")))
    print()
    for note in notes:
        print(note)
    print(f"peak RSS {peak_rss_mb():,.0f} MB")
    if tmp is not None:
        tmp.cleanup()


HEADERS = ("catalog", "index", "recall@100", "b1 p50 ms", "b1 p99 ms", "b32 p50 ms",
           "b32 p99 ms", "vs exact", "build s", "index MB")
GRPC_HEADERS = ("catalog", "signature", "b1 p50 ms", "b1 p99 ms", "b32 p50 ms", "b32 p99 ms",
                "vs exact")

if __name__ == "__main__":
    main()
