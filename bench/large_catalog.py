"""Exact brute-force top-100 over 100k and 1M items on CPU, and training + export at 1M.

Part 1, top-k latency (--sizes, default 100,000 and 1,000,000 items). The graph is the
one `tfrec export` serves (tfrec/export/retrieval.py, RetrievalModule.recommend after the
query tower): the catalog's item embeddings [N, 64] float32 and ids [N] string stored as
tf.Variables, scores = tf.matmul(query, items, transpose_b=True), tf.math.top_k(k=100),
tf.gather of the ids, in one tf.function. Embeddings are random and L2-normalised, queries
random (latency does not depend on the values). Each size is timed at batch 1 and batch
32 (queries per request): --warmup calls, then --requests calls back to back; the table
gives p50/p99 per request and per query. "table MiB" is N x 64 x 4 bytes (the embeddings
alone); "RSS +MiB" is the process's resident-memory growth when the embeddings and ids
variables were created.

Part 2, the real model at 1M items (--train-items, default 1,000,000; 0 skips): a
synthetic catalog of that size (`WorldSpec`, no events needed), vocabularies over every
item id (as if each had been trained on, so the id tables have N rows), the trainer's
`build_model` (float32, trainer defaults: LazyAdam) and --train-steps steps of `fit` on
batches of --batch-size examples whose positives are drawn from the catalog (Zipf-like),
after --warmup-steps untimed steps (tracing). Then the export as `tfrec export` does it:
RetrievalModule (embeds the whole catalog with the candidate tower) + save_versioned.
Reports the time of each phase, the SavedModel's size on disk, the process's peak RSS,
and the latency of the exported serving_default (towers + history exclusion + exact
top-100, loaded with tf.saved_model.load) at batch 1 and 32.

Part 3, training step time by catalog size (--step-items, default 5,000 and 1,000,000;
empty skips): the model of part 2 built for each size and each --optimizers value
(`train.optimizer`: adam, whose sparse update rewrites every row of the embedding tables
and their two moment tables; lazy_adam, which updates only the rows a batch touches).
The sizes' models live side by side and take turns: --rounds rounds of --train-steps
timed steps each at --batch-size (after --warmup-steps), the order flipped every round,
so a change of machine load falls on both sizes alike. The key figure is the median over
rounds of the round's ms/step ratio to the smallest size with the same optimizer (and
its range).

Both training parts feed batches as the trainer does: `model.preprocess` (id lookups,
tokens, trigrams) in the tf.data map, in parallel with the step, prefetched; no cache,
so every batch pays its lookups (the trainer caches preprocessed examples that fit
`train.input_cache_mb`, which later epochs then skip). Each batch also carries the
trainer's `model.catalog_negatives` uniform draws from the whole catalog (default 256),
gathered and preprocessed in tf.data.

Run from the repository root:  python bench/large_catalog.py [--sizes 100000,1000000]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): a 1,000-item latency table and
training + export at 1,000 items (100 user ids, batch 32, 1 warm-up + 2 timed steps),
the step time of lazy_adam at 1,000 items, 2
warm-up calls and 10 timed calls per row. Same graphs, phases and tables; the figures
mean nothing. TensorFlow's graph optimizer is off (bench/_common.py). Options given
explicitly still override these.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np
import pandas as pd
import tensorflow as tf

from tfrec.config import Config
from tfrec.data.synthetic import WorldSpec, generate_world
from tfrec.export.retrieval import RetrievalModule
from tfrec.export.versioned import save_versioned
from tfrec.features.vocab import build_vocabularies
from tfrec.training.negatives import negatives_dataset, with_negatives
from tfrec.training.trainer import build_model

tf.get_logger().setLevel("ERROR")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args, time_calls  # noqa: E402

SMOKE = dict(sizes="1000", train_items=1000, train_steps=2, warmup_steps=1, batch_size=32,
             users=100, warmup=2, requests=10, step_items="1000", rounds=2,
             optimizers="lazy_adam")

DIM = 64


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BruteForceTopK(tf.Module):
    """The export's exact top-k: catalog embeddings and ids as variables, matmul + top_k."""

    def __init__(self, embeddings: np.ndarray, ids: np.ndarray):
        super().__init__()
        self.item_embeddings = tf.Variable(embeddings, trainable=False)
        self.item_ids = tf.Variable(ids, trainable=False, dtype=tf.string)

    @tf.function(input_signature=[tf.TensorSpec([None, DIM], tf.float32),
                                  tf.TensorSpec([], tf.int32)])
    def top_k(self, query, k):
        scores = tf.matmul(query, self.item_embeddings, transpose_b=True)
        values, indices = tf.math.top_k(scores, k=k)
        return tf.gather(self.item_ids, indices), values


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def latency_rows(args, rng) -> list:
    rows = []
    for n in args.sizes:
        before = rss_mb()
        emb = rng.standard_normal((n, DIM), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ids = np.array([f"I{i:07d}" for i in range(n)], dtype=object)
        index = BruteForceTopK(emb, ids)
        table_mb = emb.nbytes / 2**20
        del emb, ids  # the variables hold their own copies
        grown = rss_mb() - before
        for batch in args.batches:
            queries = [tf.constant(rng.standard_normal((batch, DIM), dtype=np.float32))
                       for _ in range(8)]
            k = tf.constant(args.k)
            ms = time_calls(lambda q: index.top_k(q, k)[0].numpy(), queries, args.warmup,
                            args.requests)
            p50, p99 = percentile(ms, 50), percentile(ms, 99)
            rows.append([f"{n:,}", batch, f"{table_mb:.0f}", f"{grown:.0f}", len(ms),
                         f"{p50:.2f}", f"{p99:.2f}", f"{p50 / batch:.2f}",
                         f"{1000 * batch / statistics.mean(ms):,.0f}"])
            print(f"  {n:,} items, batch {batch}: p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)
        del index
    return rows


def zipf_shares(n: int) -> np.ndarray:
    """Share of the positives of each of `n` items, the i-th in proportion to 1 / i."""
    popularity = 1.0 / np.arange(1, n + 1)
    return popularity / popularity.sum()


def synthetic_examples(catalog: pd.DataFrame, users: np.ndarray, rows: int, history: int,
                       rng) -> dict:
    """Training examples whose positives follow a Zipf-like popularity over the catalog."""
    n = len(catalog)
    popularity = zipf_shares(n)
    pos = rng.choice(n, size=rows, p=popularity)
    hist = rng.choice(n, size=(rows, history), p=popularity)
    items = catalog["item_id"].astype(str).to_numpy(dtype=object)
    return {
        "user_id": rng.choice(users, size=rows).astype(object),
        "history": items[hist],
        "query": np.full(rows, "", dtype=object),
        "device": np.full(rows, "mobile", dtype=object),
        "hour": rng.integers(0, 24, size=rows).astype(np.int64),
        "item_id": items[pos],
        "title": catalog["title"].astype(str).to_numpy(dtype=object)[pos],
        "category": catalog["category"].astype(str).to_numpy(dtype=object)[pos],
        "brand": catalog["brand"].astype(str).to_numpy(dtype=object)[pos],
        "price": catalog["price"].astype(np.float32).to_numpy()[pos],
        "weight": np.ones(rows, np.float32),
        "candidate_prob": popularity[pos].astype(np.float32),
    }


def dir_size_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files) / 2**20


def large_model(n: int, args, optimizer: Optional[str] = None) -> tuple:
    """(catalog, users, cfg, model, phases): a synthetic catalog of `n` items and the
    trainer's model over vocabularies with every item id (as if each had been trained on)."""
    phases = []
    t0 = time.perf_counter()
    spec = WorldSpec(name=f"catalog-{n}", num_items=n, num_users=50, days=1,
                     sessions_per_user=1.0)
    catalog = generate_world(spec, seed=args.seed).catalog
    phases.append(["synthetic catalog", time.perf_counter() - t0, f"{n:,} items"])

    t0 = time.perf_counter()
    users = np.array([f"U{i:07d}" for i in range(args.users)], dtype=object)
    items = catalog["item_id"].astype(str).to_numpy()
    rows = max(len(items), len(users))  # every item and user gets an id row
    seen = pd.DataFrame({"user_id": np.resize(users, rows), "item_id": np.resize(items, rows),
                         "query": ""})
    cfg = Config()
    cfg.train.optimizer = optimizer or cfg.train.optimizer  # default: the trainer's
    vocab = build_vocabularies(seen, catalog, cfg.model.text_max_tokens,
                               cfg.model.price_buckets)
    tf.keras.utils.set_random_seed(args.seed)
    model = build_model(vocab, cfg)
    model.build_from_features()
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    phases.append(["vocabularies + model", time.perf_counter() - t0,
                   f"{params / 1e6:.0f}M trainable parameters ({params * 4 / 2**20:,.0f} MB), "
                   f"{len(vocab.items):,} item ids"])
    return catalog, users, cfg, model, phases


def training_batches(model, catalog, users, cfg, args, rng, steps: int) -> tf.data.Dataset:
    """`steps` batches fed as the trainer feeds them: raw examples batched, then
    `model.preprocess` in the parallel map (string work off the step), prefetched, with
    the trainer's uniform catalog draws (`model.catalog_negatives`) beside each batch."""
    examples = synthetic_examples(catalog, users, steps * args.batch_size,
                                  cfg.data.history_length, rng)
    ds = (tf.data.Dataset.from_tensor_slices(examples)
          .batch(args.batch_size, drop_remainder=True)
          .map(model.preprocess, num_parallel_calls=tf.data.AUTOTUNE))
    if cfg.model.catalog_negatives:
        shares = pd.Series(zipf_shares(len(catalog)), catalog["item_id"].to_numpy())
        ds = with_negatives(ds, negatives_dataset(catalog, model, cfg.model.catalog_negatives,
                                                  args.seed, shares=shares))
    return ds.prefetch(tf.data.AUTOTUNE)


def timed_steps(model, catalog, users, cfg, args, rng) -> tuple:
    """(seconds of args.train_steps fit steps after args.warmup_steps untimed ones,
    warm-up seconds, last loss)."""
    dataset = training_batches(model, catalog, users, cfg, args, rng,
                               args.warmup_steps + args.train_steps)
    t0 = time.perf_counter()
    model.fit(dataset.take(args.warmup_steps), epochs=1, verbose=0)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    history = model.fit(dataset.skip(args.warmup_steps), epochs=1, verbose=0)
    return time.perf_counter() - t0, warm, history.history["loss"][-1]


def step_time_rows(args, rng) -> list:
    """Part 3: ms per training step by catalog size and optimizer, vs the smallest size,
    the sizes' models taking turns (see the module docstring)."""
    rows = []
    for optimizer in args.optimizers:
        steps, ms = {}, {n: [] for n in args.step_items}
        for n in args.step_items:
            catalog, users, cfg, model, _ = large_model(n, args, optimizer)
            batches = iter(training_batches(
                model, catalog, users, cfg, args, rng,
                args.warmup_steps + args.rounds * args.train_steps))
            steps[n] = (model.make_train_function(), batches)
        # Warm up after every model is built: building the 1M-item model evicts the
        # smaller one's tables and graphs from the caches.
        for step, batches in steps.values():
            for _ in range(args.warmup_steps):
                step(batches)
        loss = {}
        for r in range(args.rounds):
            for n in (args.step_items if r % 2 == 0 else args.step_items[::-1]):
                step, batches = steps[n]
                t0 = time.perf_counter()
                for _ in range(args.train_steps):
                    logs = step(batches)
                loss[n] = float(logs["loss"])  # waits for the last step
                ms[n].append(1000 * (time.perf_counter() - t0) / args.train_steps)
        smallest = args.step_items[0]
        for n in args.step_items:
            ratios = [a / b for a, b in zip(ms[n], ms[smallest])]
            rows.append([optimizer, f"{n:,}", args.batch_size, f"{statistics.median(ms[n]):,.0f}",
                         f"{statistics.median(ratios):.2f}x",
                         f"{min(ratios):.2f}-{max(ratios):.2f}x", f"{loss[n]:.2f}"])
            print(f"  {optimizer} {n:,} items: {statistics.median(ms[n]):,.0f} ms/step "
                  f"(rounds: {', '.join(f'{m:,.0f}' for m in ms[n])})", flush=True)
        del steps
        tf.keras.backend.clear_session()
    return rows


def train_and_export(args, rng, work: str) -> tuple:
    """Part 2: phases (name, seconds, note) and latency rows of the exported model."""
    n = args.train_items
    catalog, users, cfg, model, phases = large_model(n, args)
    seconds, warm, loss = timed_steps(model, catalog, users, cfg, args, rng)
    phases.append(["training (timed steps)", seconds,
                   f"{args.train_steps} steps x {args.batch_size}: "
                   f"{args.train_steps * args.batch_size / seconds:,.0f} examples/s, "
                   f"{1000 * seconds / args.train_steps:,.0f} ms/step (warm-up "
                   f"{args.warmup_steps} steps {warm:.0f}s), loss {loss:.2f}"])

    t0 = time.perf_counter()
    module = RetrievalModule(model, catalog)
    phases.append(["embed catalog (RetrievalModule)", time.perf_counter() - t0,
                   f"{n:,} x {DIM} float32 = {n * DIM * 4 / 2**20:,.0f} MB"])
    t0 = time.perf_counter()
    path = save_versioned(module, module.signatures(), os.path.join(work, "models"),
                          "retrieval", version=1)
    phases.append(["tf.saved_model.save", time.perf_counter() - t0,
                   f"SavedModel {dir_size_mb(path):,.0f} MB on disk"])
    del module, model

    t0 = time.perf_counter()
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    phases.append(["tf.saved_model.load", time.perf_counter() - t0, ""])
    rows = []
    for batch in args.batches:
        requests = []
        for _ in range(8):
            pick = synthetic_examples(catalog, users, batch, cfg.data.history_length, rng)
            requests.append({
                "user_id": tf.constant(pick["user_id"].astype(str)),
                "history": tf.constant(pick["history"].astype(str)),
                "query": tf.constant(pick["query"].astype(str)),
                "device": tf.constant(pick["device"].astype(str)),
                "hour": tf.constant(pick["hour"]),
                "k": tf.constant(np.full(batch, args.k, np.int32)),
                "exclude_seen": tf.constant(np.ones(batch, bool))})
        ms = time_calls(lambda r: serve(**r)["item_ids"].numpy(), requests, args.warmup,
                        args.requests)
        rows.append([f"{n:,} (exported model)", batch, "-", "-", len(ms),
                     f"{percentile(ms, 50):.2f}", f"{percentile(ms, 99):.2f}",
                     f"{percentile(ms, 50) / batch:.2f}",
                     f"{1000 * batch / statistics.mean(ms):,.0f}"])
    return phases, rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000",
                        help="catalog sizes of the top-k latency table")
    parser.add_argument("--batches", default="1,32", help="queries per request")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100, help="timed calls per row")
    parser.add_argument("--train-items", type=int, default=1_000_000,
                        help="catalog size of the training + export part (0 skips it)")
    parser.add_argument("--step-items", default="5000,1000000",
                        help="catalog sizes of the step-time table (empty skips it)")
    parser.add_argument("--optimizers", default="adam,lazy_adam",
                        help="train.optimizer values of the step-time table")
    parser.add_argument("--train-steps", type=int, default=20,
                        help="timed steps of part 2, and per size per round of part 3")
    parser.add_argument("--rounds", type=int, default=5,
                        help="part 3: rounds in which the sizes take turns")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--users", type=int, default=30000, help="user ids in the vocabulary")
    parser.add_argument("--work-dir", help="keep the exported SavedModel here")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_smoke_args(parser, argv, SMOKE)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.step_items = [int(s) for s in args.step_items.split(",") if s]
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()

    print("top-k latency:", flush=True)
    rows = latency_rows(args, rng)
    steps = []
    if args.step_items:
        print("training step time by catalog size:", flush=True)
        steps = step_time_rows(args, rng)
    phases, exported = [], []
    work = args.work_dir or tempfile.mkdtemp(prefix="tfrec-large-")
    try:
        if args.train_items:
            print(f"training + export at {args.train_items:,} items:", flush=True)
            phases, exported = train_and_export(args, rng, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(machine_line())
    print(format_table(
        ["catalog", "batch", "table MiB", "RSS +MiB", "requests", "p50 ms", "p99 ms",
         "p50 ms/query", "queries/s"],
        rows + exported,
        title=f"exact top-{args.k} (matmul + tf.math.top_k over the stored embeddings, "
              f"dim {DIM}); {args.warmup} warm-up calls, then back-to-back requests"))
    if steps:
        print()
        print(format_table(["optimizer", "catalog", "batch", "ms/step", "vs smallest",
                            "range", "loss"],
                           steps, title=f"training step time by catalog size ({args.rounds} "
                                        f"rounds of {args.train_steps} steps per size, taking "
                                        f"turns, after {args.warmup_steps} warm-up; medians)"))
    if phases:
        print()
        print(f"retrieval model at {args.train_items:,} items (process peak RSS "
              f"{peak_rss_mb():,.0f} MB)")
        width = max(len(p) for p, _, _ in phases)
        for phase, seconds, details in phases:
            print(f"{phase:<{width}}  {seconds:7.1f} s  {details}")
    print(f"total wall time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
