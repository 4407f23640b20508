"""Offline ranking benchmark on the synthetic world (issue 3 groundwork).

Part 1: the multi-task DCN ranker orders each held-out session's shown items; NDCG@10 of
clicks / purchases against the logged order and item popularity, ratios vs logged order.
Part 2 (--rerank): the ranker of the latest retrieval run (e.g. after `tfrec demo`),
trained on validation-period retrieval candidates, re-orders the retrieval top-K for
test-period users: NDCG@10 / purchase-rate@10 against retrieval order and the oracle.

Usage: python bench/ranking_offline.py [--world small] [--epochs 5] [--rerank]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, 1 ranker epoch,
the same table. With --smoke --rerank and no --checkpoint-dir, part 2 does not read
work/checkpoints: it first trains a throwaway retrieval run (tiny world, 1 epoch) in a
temporary directory, then re-ranks its top-50 for 100 test users. The figures mean
nothing. TensorFlow's graph optimizer is off (bench/_common.py). Options given
explicitly still override these.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import RankingConfig
from tfrec.data.examples import positive_interactions
from tfrec.data.lists import build_ranking_lists, lists_to_arrays
from tfrec.data.split import time_split
from tfrec.data.synthetic import generate_world
from tfrec.metrics.ranking import ndcg_of_scored_lists
from tfrec.features.vocab import build_vocabularies
from tfrec.data.io import load_tables
from tfrec.data.prepare import load_meta
from tfrec.features.catalog import CatalogLookup, catalog_statistics
from tfrec.models.ranking import RankingModel
from tfrec.models.embedding import tower_fn
from tfrec.training.trainer import load_trained_model, resolve_run_dir

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import parse_smoke_args  # noqa: E402

# checkpoint_dir "": --rerank trains its own throwaway retrieval run (see throwaway_run).
SMOKE = dict(world="tiny", epochs=1, checkpoint_dir="", candidates=50, users=100)


def train_ranker(vocab, arrays, config: RankingConfig, catalog) -> RankingModel:
    model = RankingModel(vocab, config, catalog)
    model.adapt_numeric(arrays)
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
    data = tf.data.Dataset.from_tensor_slices(arrays).shuffle(50000, seed=1)
    model.fit(data.batch(config.batch_size), epochs=config.epochs, verbose=0)
    return model


def shown_items(args) -> None:
    world = generate_world(args.world, seed=args.seed)
    events, catalog = world.events, world.catalog
    split = time_split(events, 0.1, 0.1)
    positives = positive_interactions(events)
    train_pos = positives[positives["ts"] < split.t_val]
    vocab = build_vocabularies(train_pos, catalog, 20000, 20)
    popularity = train_pos.groupby("item_id").size()
    lists = build_ranking_lists(events, 20, 10)
    train = lists_to_arrays(lists[lists["ts"] < split.t_val], catalog, 10, 20, popularity)
    test = lists_to_arrays(lists[lists["ts"] >= split.t_test], catalog, 10, 20, popularity)
    config = RankingConfig(loss=args.loss, epochs=args.epochs, learning_rate=0.002,
                           use_retrieval_score=False)
    lookup = CatalogLookup(catalog, catalog_statistics(catalog, positives, split.t_val))
    start = time.perf_counter()
    model = train_ranker(vocab, train, config, lookup)
    seconds = time.perf_counter() - start
    logits = model.predict(tf.data.Dataset.from_tensor_slices(test).batch(512), verbose=0)
    padded = test["position"] < 0
    rows = {"logged order": -test["position"].astype(float), "popularity": test["popularity"],
            "ranker": np.asarray(model.score(logits))}
    print(f"ranking shown items | world {args.world!r} seed {args.seed} | "
          f"{len(train['user_id'])} train lists, {len(test['user_id'])} test lists | "
          f"loss {args.loss}, {args.epochs} epochs, {seconds:.0f} s training")
    print(f"{'order':<14}{'ndcg@10 clicks':>16}{'vs logged':>11}{'ndcg@10 purchases':>19}"
          f"{'vs logged':>11}")
    reference = {}
    for name, score in rows.items():
        score = np.where(padded, -1e9, score)
        clicks = ndcg_of_scored_lists(score, test["click"])
        purchases = ndcg_of_scored_lists(score, test["purchase"])
        reference.setdefault("c", clicks)
        reference.setdefault("p", purchases)
        print(f"{name:<14}{clicks:>16.4f}{clicks / reference['c']:>10.3f}x"
              f"{purchases:>19.4f}{purchases / reference['p']:>10.3f}x")


def throwaway_run(root: str) -> str:
    """Trains a 1-epoch retrieval run on the tiny world under `root`; its checkpoint dir."""
    from tfrec import workflow
    from tfrec.config import Config

    cfg = Config()
    cfg.data.data_dir = os.path.join(root, "data")
    cfg.data.tfrecord_dir = os.path.join(root, "tfrecords")
    cfg.train.checkpoint_dir = os.path.join(root, "checkpoints")
    cfg.train.log_dir = os.path.join(root, "tensorboard_logs")
    cfg.train.epochs = 1
    workflow.generate(cfg, world="tiny")
    workflow.train(cfg)
    return cfg.train.checkpoint_dir


def rerank(args, log_dir: str = "") -> None:
    """Part 2; `log_dir` holds the ranker's TensorBoard logs (default: the config's)."""
    from tfrec.config import Config
    from tfrec.evaluation.report import evaluate_period, format_table
    from tfrec.training.ranking_trainer import train_ranker as train_candidate_ranker

    cfg = Config()
    cfg.train.checkpoint_dir = args.checkpoint_dir
    cfg.ranking.candidates = args.candidates
    cfg.ranking.epochs = args.epochs
    if log_dir:
        cfg.train.log_dir = log_dir
    run_dir = resolve_run_dir(args.checkpoint_dir)
    retrieval, run_cfg, _ = load_trained_model(run_dir)
    start = time.perf_counter()
    result = train_candidate_ranker(cfg, retrieval=retrieval)
    seconds = time.perf_counter() - start
    tables = load_tables(run_cfg.data.data_dir)
    split = load_meta(run_cfg.data.tfrecord_dir)["split"]
    rows = evaluate_period(tables.events, tables.catalog, int(split["t_test"]),
                           int(split["t_end"]), run_cfg.data.history_length,
                           tower_fn(retrieval.query_tower), tower_fn(retrieval.candidate_tower),
                           data_dir=run_cfg.data.data_dir, max_users=args.users,
                           ranker=result.model, candidates=args.candidates)
    print(f"\nre-ranking retrieval top-{args.candidates} | run {run_dir} | ranker trained on "
          f"{result.lists} validation-period lists in {seconds:.0f}s")
    print(format_table(rows, title="test period (users frozen at its start, seen items excluded)"))
    base = rows["two_tower"]
    ranked = rows["two_tower+ranker"]
    print(f"ranker vs retrieval order: ndcg@10 {ranked['ndcg@10'] / base['ndcg@10']:.3f}x, "
          f"purchase_rate@10 {ranked['purchase_rate@10'] / max(base['purchase_rate@10'], 1e-12):.3f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="small")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--loss", default="softmax")
    parser.add_argument("--rerank", action="store_true")
    parser.add_argument("--checkpoint-dir", default="work/checkpoints",
                        help="--rerank uses its latest retrieval run (\"\": train one "
                             "on the tiny world in a temporary directory)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--users", type=int, default=None)
    args = parse_smoke_args(parser, argv, SMOKE)
    start = time.perf_counter()
    shown_items(args)
    if args.rerank:
        scratch = None
        if not args.checkpoint_dir:
            scratch = tempfile.mkdtemp(prefix="tfrec-bench-rerank-")
            print("\ntraining a throwaway retrieval run (tiny world, 1 epoch)", flush=True)
            args.checkpoint_dir = throwaway_run(scratch)
        try:
            rerank(args, os.path.join(scratch, "tensorboard_logs") if scratch else "")
        finally:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
    print(f"total wall time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
