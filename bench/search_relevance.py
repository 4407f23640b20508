"""Home Depot search relevance: BM25 vs MiniLM, zero-shot and fine-tuned (fast / cross).

Data: ../shared/data/homedepot/queries_dev.csv (human grades 1-3 of (query, product
title) pairs; tfrec.data.homedepot). Distinct queries are split train/val/test
(split_by_query, seeded); every judged product of a test query is a candidate and the
metric is NDCG@10 of each query's candidates ordered by the model, with graded gains
(relevance - 1, graded_relevance), averaged over test queries with a positive gain.

Rows (all scored on the same test lists in the same run; ratios against BM25):
  BM25               Okapi BM25 (k1 1.2, b 0.75) over the titles of every product in
                     the file (corpus statistics of the whole catalog).
  MiniLM zero-shot   cosine of mean-pooled all-MiniLM-L6-v2 sentence embeddings of the
                     query and the title: the similarity column of an untrained "fast"
                     TextMatch (item embeddings computed once, stored in the layer).
  MiniLM fast        TextMatch("fast"), query encoder fine-tuned (PEFT: last N blocks),
                     title embeddings frozen -> tfrs DCN Cross -> MLP (+ a linear wide
                     path) -> logit.
  MiniLM cross       TextMatch("cross"): BERT over each (query, title) pair, last N blocks
                     + pooler fine-tuned -> the same head.
Fine-tuned rows train with the listwise softmax loss (tfrec.models.losses) over each
training query's candidate list (padded to --list-size), Adam with a lower learning
rate for the encoder than for the head (linear decay to 0), and keep the epoch with
the best validation NDCG@10. No lexical (BM25) feature enters a MiniLM row.
"Train s" is fine-tuning time (with per-epoch validation); "prep s" is item embedding
(fast / zero-shot) or index building (BM25); "score s" is scoring the test lists.

Run from the repository root (needs `tfrec text import-minilm` done, i.e.
work/text/minilm):

    python bench/search_relevance.py [--train-queries 3000] [--epochs 1] [--seed 42]
        [--modes bm25,zeroshot,fast,cross]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the judgments of the first 200
distinct queries of the file (--queries), 40 train / 10 validation / 20 test lists, 1
epoch, and a tiny random BERT (2 layers, hidden 64, vocabulary from the slice's titles
and queries; written to a temporary directory) instead of MiniLM, so work/text/minilm is
not needed. Every mode, same table; the figures mean nothing. Without the Home Depot
file under the data dir, a smoke run prints "skipped: ..." and exits 0. TensorFlow's
graph optimizer is off (bench/_common.py). Options given explicitly still override
these.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrec.data.homedepot import graded_relevance, homedepot_path, load_homedepot, split_by_query
from tfrec.evaluation.baselines import BM25Baseline
from tfrec.metrics.ranking import ndcg_of_scored_lists
from tfrec.models.losses import get_loss
from tfrec.models.text_match import TextMatch

tf.get_logger().setLevel("ERROR")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args, skip, tiny_bert  # noqa: E402

MODES = ("bm25", "zeroshot", "fast", "cross")
MINILM = os.path.join("work", "text", "minilm")
TINY = "tiny"  # --encoder tiny: a tiny random BERT built for this run (see tiny_bert)
SMOKE = dict(queries=200, train_queries=40, val_queries=10, test_queries=20, epochs=1,
             encoder=TINY)
K = 10


@dataclasses.dataclass
class Lists:
    """Candidate lists of some queries: rows into the item table, graded gains."""

    queries: np.ndarray  # [Q] query strings
    index: np.ndarray  # [Q, L] int32 item rows, -1 pads
    labels: np.ndarray  # [Q, L] float32 gains (relevance - 1), -1 pads

    def take(self, rows: np.ndarray) -> "Lists":
        return Lists(self.queries[rows], self.index[rows], self.labels[rows])

    def __len__(self) -> int:
        return len(self.queries)


def build_lists(judgments: pd.DataFrame, item_row: Dict[str, int], list_size: int,
                rng: np.random.Generator) -> Lists:
    """One list per distinct query, candidates shuffled (so score ties break at random)."""
    queries, relevant = graded_relevance(judgments)
    index = np.full((len(queries), list_size), -1, np.int32)
    labels = np.full((len(queries), list_size), -1.0, np.float32)
    for q, gains in enumerate(relevant):
        products = list(gains)
        if len(products) > list_size:
            raise ValueError(f"query {queries[q]!r} has {len(products)} judged products; "
                             f"raise --list-size to at least that")
        order = rng.permutation(len(products))
        index[q, :len(products)] = [item_row[products[i]] for i in order]
        labels[q, :len(products)] = [gains[products[i]] for i in order]
    return Lists(np.asarray(queries, dtype=object), index, labels)


def ndcg(scores: np.ndarray, lists: Lists) -> float:
    return ndcg_of_scored_lists(np.where(lists.index < 0, -1e9, scores), lists.labels, K)


def per_query_ndcg(scores: np.ndarray, lists: Lists) -> np.ndarray:
    """NDCG@K of each list (NaN where no candidate has a positive gain); mean = `ndcg`."""
    scores = np.where(lists.index < 0, -1e9, scores)
    out = np.full(len(lists), np.nan)
    for q in np.flatnonzero((lists.labels > 0).any(axis=1)):
        out[q] = ndcg_of_scored_lists(scores[q:q + 1], lists.labels[q:q + 1], K)
    return out


def random_order_ndcg(lists: Lists, rng: np.random.Generator, draws: int = 50) -> np.ndarray:
    """Per-list expected NDCG@K of a random order (mean over `draws` shuffles)."""
    return np.mean([per_query_ndcg(rng.random(lists.index.shape), lists)
                    for _ in range(draws)], axis=0)


def paired_ci(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
              resamples: int = 2000) -> Tuple[float, float, float]:
    """Mean of a - b over lists and its 95% bootstrap interval (lists resampled)."""
    diff = (a - b)[~np.isnan(a)]
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# ------------------------------------------------------------------------- BM25

def bm25_scores(bm25: BM25Baseline, columns: np.ndarray, lists: Lists,
                block: int = 64) -> np.ndarray:
    """[Q, L] BM25 scores of each list's candidates (`columns`: item row -> BM25 doc)."""
    out = np.zeros(lists.index.shape, np.float32)
    for start in range(0, len(lists), block):
        part = lists.index[start:start + block]
        scores = bm25.score(list(lists.queries[start:start + block]))
        out[start:start + block] = np.take_along_axis(scores, columns[np.maximum(part, 0)], 1)
    return out


# ------------------------------------------------------------------------- MiniLM

class Scorer(tf.keras.Model):
    """Relevance logit per (query, candidate): TextMatch -> DCN cross -> MLP -> 1.

    Args:
      text_match: the query-item text features.
      hidden: MLP widths.
    """

    def __init__(self, text_match: TextMatch, hidden: Sequence[int] = (64, 32), **kwargs):
        super().__init__(**kwargs)
        self.text_match = text_match
        self.cross = tfrs.layers.dcn.Cross(name="cross")
        self.mlp = [tf.keras.layers.Dense(h, activation="relu", name=f"mlp_{i}")
                    for i, h in enumerate(hidden)]
        self.logit = tf.keras.layers.Dense(1, name="logit")
        # Wide part: a linear path from the crossed features (e.g. the cosine column) to
        # the logit, so a strong single feature is usable from the first steps.
        self.wide = tf.keras.layers.Dense(1, use_bias=False, name="wide")

    def call(self, inputs: Dict[str, tf.Tensor], training=None) -> tf.Tensor:
        x = self.cross(self.text_match(inputs["query"], inputs["index"], training=training))
        deep = x
        for layer in self.mlp:
            deep = layer(deep)
        return tf.squeeze(self.logit(deep) + self.wide(x), -1)  # [B, L]


def _batches(lists: Lists, size: int, order: np.ndarray):
    for start in range(0, len(lists), size):
        rows = order[start:start + size]
        yield (tf.constant(lists.queries[rows].tolist()), tf.constant(lists.index[rows]),
               tf.constant(lists.labels[rows]), rows)


def bucketed_order(lengths: np.ndarray, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Training order whose batches hold lists of similar length, batches shuffled.

    Each batch is padded to its longest pair, so grouping by length saves compute; the
    jitter changes the groups every epoch. The partial batch stays last.
    """
    order = np.argsort(lengths + rng.uniform(0.0, 8.0, len(lengths)), kind="stable")
    full = len(order) // batch * batch
    chunks = order[:full].reshape(-1, batch)[rng.permutation(full // batch)]
    return np.concatenate([chunks.reshape(-1), order[full:]])


def predict(fn: Callable, lists: Lists, batch: int, lengths: np.ndarray) -> np.ndarray:
    """[Q, L] scores; batches of similar text length (the layer trims to each batch's longest)."""
    out = np.zeros(lists.index.shape, np.float32)
    for query, index, _, rows in _batches(lists, batch, np.argsort(lengths, kind="stable")):
        out[rows] = fn(query, index).numpy()
    return out


def list_lengths(lists: Lists, titles: np.ndarray) -> np.ndarray:
    """Longest query + title (characters) of each list: a proxy for its token length."""
    chars = np.asarray([len(t) for t in titles])[np.maximum(lists.index, 0)]
    return np.where(lists.index >= 0, chars, 0).max(1) + np.asarray(
        [len(q) for q in lists.queries])


@dataclasses.dataclass
class Fit:
    seconds: float
    best_epoch: int
    val_ndcg: float
    history: List[Tuple[float, float]]  # (train loss, val NDCG) per epoch


def fine_tune(model: Scorer, train: Lists, val: Lists, args, lengths: Dict[str, np.ndarray],
              rng: np.random.Generator) -> Fit:
    """Listwise training; keeps the weights of the epoch with the best validation NDCG."""
    loss_fn = get_loss("softmax")
    steps = args.epochs * int(np.ceil(len(train) / args.batch_queries))
    model({"query": tf.constant(train.queries[:2].tolist()),
           "index": tf.constant(train.index[:2])})  # build
    encoder_ids = {id(v) for v in model.text_match.encoder.trainable_weights}
    encoder_vars = [v for v in model.trainable_variables if id(v) in encoder_ids]
    head_vars = [v for v in model.trainable_variables if id(v) not in encoder_ids]
    optimizers = [tf.keras.optimizers.Adam(
        tf.keras.optimizers.schedules.PolynomialDecay(lr, steps, 0.0))
        for lr in (args.encoder_lr, args.head_lr)]

    @tf.function(reduce_retracing=True)
    def step(query, index, labels):
        with tf.GradientTape() as tape:
            logits = model({"query": query, "index": index}, training=True)
            loss = loss_fn(labels, logits)
        grads = tape.gradient(loss, encoder_vars + head_vars)
        if encoder_vars:
            optimizers[0].apply_gradients(zip(grads[:len(encoder_vars)], encoder_vars))
        optimizers[1].apply_gradients(zip(grads[len(encoder_vars):], head_vars))
        return loss

    score = tf.function(lambda q, i: model({"query": q, "index": i}, training=False),
                        reduce_retracing=True)
    start = time.perf_counter()
    history, best, best_weights = [], (-1.0, 0), None
    for epoch in range(args.epochs):
        losses = [float(step(q, i, y)) for q, i, y, _ in
                  _batches(train, args.batch_queries,
                           bucketed_order(lengths["train"], args.batch_queries, rng))]
        val_ndcg = ndcg(predict(score, val, args.eval_batch, lengths["val"]), val)
        history.append((float(np.mean(losses)), val_ndcg))
        print(f"  epoch {epoch + 1}: train loss {history[-1][0]:.4f}, val NDCG@{K} "
              f"{val_ndcg:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
        if val_ndcg > best[0]:
            best = (val_ndcg, epoch + 1)
            best_weights = [v.numpy() for v in model.trainable_variables]
    for v, w in zip(model.trainable_variables, best_weights):
        v.assign(w)
    return Fit(time.perf_counter() - start, best[1], best[0], history)


# ------------------------------------------------------------------------- main

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None,
                        help="holds homedepot/queries_dev.csv (default ../shared/data)")
    parser.add_argument("--encoder", default=os.path.join(MINILM, "encoder"),
                        help=f"BERT encoder (\"{TINY}\": build a tiny random one for this "
                             "run, with its own preprocessor)")
    parser.add_argument("--preprocessor", default=os.path.join(MINILM, "preprocessor"))
    parser.add_argument("--queries", type=int, default=0,
                        help="use only the judgments of the first N distinct queries of the "
                             "file (0: all)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train-queries", type=int, default=3000,
                        help="training queries sampled from the train split (0 = all)")
    parser.add_argument("--val-queries", type=int, default=200,
                        help="validation queries for epoch selection (0 = all)")
    parser.add_argument("--test-queries", type=int, default=0, help="0 = the whole test split")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--list-size", type=int, default=16)
    parser.add_argument("--batch-queries", type=int, default=8, help="lists per training step")
    parser.add_argument("--eval-batch", type=int, default=32, help="lists per scoring batch")
    parser.add_argument("--pair-length", type=int, default=40, help="cross mode tokens")
    parser.add_argument("--query-length", type=int, default=24, help="fast mode query tokens")
    parser.add_argument("--fast-top-layers", type=int, default=2)
    parser.add_argument("--cross-top-layers", type=int, default=2)
    parser.add_argument("--encoder-lr", type=float, default=5e-5)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--output-dim", type=int, default=32)
    args = parse_smoke_args(parser, argv, SMOKE)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown or not args.modes:
        parser.error(f"--modes must be a comma-separated subset of {','.join(MODES)}, "
                     f"got {unknown or 'nothing'}")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.smoke and not os.path.isfile(homedepot_path(args.data_dir)):
        skip(f"Home Depot judgments not found at {homedepot_path(args.data_dir)!r} (pass "
             "--data-dir or set TFREC_DATA_DIR)")
    for name in ("encoder", "preprocessor") if args.encoder != TINY else ():
        handle = getattr(args, name)
        if set(args.modes) - {"bm25"} and "://" not in handle and not os.path.exists(handle):
            parser.error(f"--{name} {handle!r} not found: run `tfrec text import-minilm` "
                         "first (or pass a TF Hub handle)")
    return args


def _sample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(n)[:limit]) if 0 < limit < n else np.arange(n)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="tfrec-bench-relevance-") if args.encoder == TINY else None
    try:
        run(args, scratch)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, scratch: Optional[str] = None) -> None:
    """The benchmark; `scratch` holds the tiny BERT of --encoder tiny."""
    wall = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    tf.random.set_seed(args.seed)
    judgments = load_homedepot(data_dir=args.data_dir)
    if args.queries:  # the judgments of the file's first N distinct queries
        keep = set(judgments["query"].drop_duplicates().iloc[:args.queries])
        judgments = judgments[judgments["query"].isin(keep)].reset_index(drop=True)
    split = split_by_query(judgments, seed=args.seed)

    # Item table: every product judged for a query we use (titles in product order).
    catalog = judgments.drop_duplicates("product_id")[["product_id", "title"]]
    parts = {}
    for name, limit in (("train", args.train_queries), ("val", args.val_queries),
                        ("test", args.test_queries)):
        queries = np.asarray(sorted(split[name]["query"].unique()), dtype=object)
        keep = set(queries[_sample(len(queries), limit, rng)])
        parts[name] = split[name][split[name]["query"].isin(keep)]
    used = pd.concat(parts.values())["product_id"].unique()
    items = catalog.set_index("product_id").loc[used].reset_index()
    titles = items["title"].to_numpy(dtype=object)
    item_row = {p: i for i, p in enumerate(items["product_id"])}
    if args.encoder == TINY:  # vocabulary: the words of the titles and queries used here
        args.encoder, args.preprocessor = tiny_bert(
            os.path.join(scratch, "tiny_bert"),
            titles.tolist() + pd.concat(parts.values())["query"].unique().tolist())
        print("BERT: a tiny random encoder (--encoder tiny) stands in for MiniLM (the rows "
              "named MiniLM use it)", flush=True)
    lists = {name: build_lists(part, item_row, args.list_size, rng)
             for name, part in parts.items()}
    lengths = {name: list_lengths(lists[name], titles) for name in lists}
    train, val, test = lists["train"], lists["val"], lists["test"]
    print(f"Home Depot search relevance | {len(judgments)} judgments, "
          f"{judgments['query'].nunique()} queries, {len(catalog)} products | split by query "
          f"(seed {args.seed}): {split['train']['query'].nunique()}/"
          f"{split['val']['query'].nunique()}/{split['test']['query'].nunique()} "
          f"train/val/test queries")
    print(f"used: {len(train)} train lists (sampled), {len(val)} val lists (epoch selection), "
          f"{len(test)} test lists ({int((test.index >= 0).sum())} test pairs), "
          f"lists padded to {args.list_size}; NDCG@{K} graded gains = relevance - 1")
    print(f"fine-tuning: {args.epochs} epochs, {args.batch_queries} lists/step, listwise "
          f"softmax loss, Adam lr encoder {args.encoder_lr:g} / head {args.head_lr:g} "
          "(linear decay), length-bucketed batches, best val epoch kept | fast: "
          f"query_length {args.query_length}, last {args.fast_top_layers or 'all'} blocks "
          "trained, titles frozen | cross: "
          f"pair_length {args.pair_length}, last {args.cross_top_layers or 'all'} blocks + "
          f"pooler trained | head: TextMatch({args.output_dim}+2) -> Cross -> 64 -> 32 -> 1, "
          "plus a linear (wide) path from the crossed features")
    print(machine_line(), flush=True)

    rows: Dict[str, dict] = {}
    if "bm25" in args.modes:
        start = time.perf_counter()
        bm25 = BM25Baseline().fit(catalog["product_id"].tolist(), catalog["title"].tolist())
        doc = {d: i for i, d in enumerate(bm25.doc_ids_)}
        columns = np.asarray([doc[p] for p in items["product_id"]], np.int64)
        prep = time.perf_counter() - start
        start = time.perf_counter()
        scores = bm25_scores(bm25, columns, test)
        rows["BM25"] = dict(per_query=per_query_ndcg(scores, test),
                            val=ndcg(bm25_scores(bm25, columns, val), val),
                            prep=prep, score=time.perf_counter() - start)

    def evaluate(name: str, model, prep: float, fit: Optional[Fit] = None,
                 column: Optional[int] = None) -> None:
        def fn(q, i):
            out = model(q, i) if column is None else model(q, i)[:, :, column]
            return out
        fn = tf.function(fn, reduce_retracing=True)
        start = time.perf_counter()
        scores = predict(fn, test, args.eval_batch, lengths["test"])
        seconds = time.perf_counter() - start
        val_ndcg = fit.val_ndcg if fit else ndcg(predict(fn, val, args.eval_batch,
                                                         lengths["val"]), val)
        rows[name] = dict(per_query=per_query_ndcg(scores, test), val=val_ndcg, prep=prep,
                          score=seconds, train=fit.seconds if fit else None,
                          epoch=fit.best_epoch if fit else None)
        print(f"{name}: test NDCG@{K} {np.nanmean(rows[name]['per_query']):.4f}", flush=True)

    def scorer_fn(model: Scorer):
        return lambda q, i: model({"query": q, "index": i}, training=False)

    if "zeroshot" in args.modes or "fast" in args.modes:
        start = time.perf_counter()
        fine_tune_fast = "fast" in args.modes
        fast = TextMatch("fast", args.encoder, args.preprocessor, titles.tolist(),
                         output_dim=args.output_dim, query_length=args.query_length,
                         trainable=fine_tune_fast,
                         top_layers=args.fast_top_layers if fine_tune_fast else 0,
                         name="fast_match")
        prep = time.perf_counter() - start
        print(f"embedded {len(titles)} titles in {prep:.0f}s", flush=True)
        if "zeroshot" in args.modes:
            evaluate("MiniLM zero-shot cosine", lambda q, i: fast(q, i, training=False), prep,
                     column=args.output_dim)
        if fine_tune_fast:
            print("fine-tuning fast mode", flush=True)
            model = Scorer(fast, name="fast_scorer")
            fit = fine_tune(model, train, val, args, lengths, rng)
            evaluate("MiniLM fast, fine-tuned", scorer_fn(model), prep, fit)
            del model
        del fast
    if "cross" in args.modes:
        print("fine-tuning cross mode", flush=True)
        start = time.perf_counter()
        cross = TextMatch("cross", args.encoder, args.preprocessor, titles.tolist(),
                          output_dim=args.output_dim, pair_length=args.pair_length,
                          trainable=True, top_layers=args.cross_top_layers, name="cross_match")
        prep = time.perf_counter() - start
        model = Scorer(cross, name="cross_scorer")
        fit = fine_tune(model, train, val, args, lengths, rng)
        evaluate("MiniLM cross-encoder, fine-tuned", scorer_fn(model), prep, fit)

    random_rows = random_order_ndcg(test, np.random.default_rng(args.seed))
    rows = {"random order (expected)": dict(per_query=random_rows, val=float("nan"), prep=0.0,
                                            score=0.0), **rows}
    floor = float(np.nanmean(random_rows))
    base = rows.get("BM25", {}).get("per_query")
    table = []
    for name, r in rows.items():
        test_ndcg = float(np.nanmean(r["per_query"]))
        r["test"] = test_ndcg
        if base is None or name == "BM25":
            delta = "-"
        else:
            mean, low, high = paired_ci(r["per_query"], base, np.random.default_rng(args.seed))
            delta = f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"
        table.append([
            name, f"{test_ndcg:.4f}",
            f"{test_ndcg / np.nanmean(base):.4f}x" if base is not None else "-", delta,
            f"{100 * (test_ndcg - floor) / (1.0 - floor):.1f}%",
            "-" if np.isnan(r["val"]) else f"{r['val']:.4f}",
            "-" if r.get("train") is None else f"{r['train']:.0f}",
            "-" if r.get("epoch") is None else r["epoch"], f"{r['prep']:.0f}",
            f"{r['score']:.1f}"])
    print()
    print(format_table(
        ["method", f"test NDCG@{K}", "vs BM25", "diff vs BM25 [95% CI]", "gap closed",
         f"val NDCG@{K}", "train s", "best epoch", "prep s", "score s"], table,
        title=f"NDCG@{K} over each query's judged products ({int((~np.isnan(random_rows)).sum())} "
              f"test queries with a relevant product, same lists for every row)"))
    print("diff: paired per-query difference, 95% bootstrap interval over test queries; gap "
          "closed: (NDCG - random) / (1 - random)")
    fast, cross = rows.get("MiniLM fast, fine-tuned"), rows.get("MiniLM cross-encoder, fine-tuned")
    if fast and cross:
        mean, low, high = paired_ci(fast["per_query"], cross["per_query"],
                                    np.random.default_rng(args.seed))
        print(f"fast - cross-encoder: {mean:+.4f} NDCG@{K} [{low:+.4f}, {high:+.4f}]; fast "
              f"scores the test lists {cross['score'] / max(fast['score'], 1e-9):.1f}x faster")
    print(f"total wall time {time.perf_counter() - wall:.0f}s")


if __name__ == "__main__":
    main()
