"""Open catalog on Home Depot: search products nobody judged in training, beside BM25.

Protocol (bench/README.md, "Open catalog"):
  catalog    every distinct product of ../shared/data/homedepot/queries_dev.csv.
  hold-out   30% of the products (seeded per seed, --holdout): every judgment on them is
             removed from training and validation; the model never sees them.
  split      distinct queries, seeded, 70/10/20 train/validation/test (split_by_query).
  training   `train_search` on what is left (its run saved as `tfrec search train` does).
  index      the saved run rebuilt over ALL products (`load_search_pipeline`, the code of
             `tfrec search index`): held-out products get title vectors and BM25 terms
             like any other, nothing is retrained.
  metrics    each test query (all its judgments, held-out products included) ranks the
             whole catalog: NDCG@10 (gain = relevance - 1), Recall@100 of grade >= 2,
             MRR of the first grade >= 2.5 (tfrec.search.metrics). Test queries are split
             into "unseen" (at least one product graded >= 2 is held out) and "seen"
             (none is).
The key figures are ratios against BM25 over the same catalog in the same run. Settings
are the SearchConfig defaults (chosen on validation queries, bench/README.md); nothing
here is tuned on the test queries.

Run from the repository root (needs `tfrec text import-minilm`, i.e. work/text/minilm):

    python bench/open_catalog.py [--seeds 0,1,2] [--workdir work/bench-open-catalog]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the judgments of the first 200
distinct queries of the file (--queries), one seed, 1 two-tower and 1 ranker epoch and a
tiny random BERT instead of MiniLM; without the Home Depot file, the synthetic world's
search judgments (--judgments synthetic:tiny). Same protocol and table; the figures mean
nothing. TensorFlow's graph optimizer is off (bench/_common.py). Options given
explicitly still override these.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np
import pandas as pd
import tensorflow as tf

from tfrec.data.homedepot import homedepot_path, load_homedepot, split_by_query
from tfrec.search.config import SearchConfig
from tfrec.search.data import judgments_from_events, product_catalog
from tfrec.search.index import load_search_pipeline
from tfrec.search.train import SearchData, evaluate_stages, train_search

tf.get_logger().setLevel("ERROR")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args, ratio, tiny_bert  # noqa: E402

SMOKE = dict(seeds="0", queries=200, epochs=1, ranker_epochs=1, encoder="tiny")
STAGES = (("BM25", "bm25"), ("two-tower", "two_tower"), ("hybrid", "hybrid"),
          ("two-tower+ranker", "two_tower+ranker"))
GROUPS = ("unseen", "seen", "all")
METRICS = ("ndcg@10", "recall@100", "mrr")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="hold-out and query-split seeds")
    p.add_argument("--holdout", type=float, default=0.3, help="share of products held out")
    p.add_argument("--workdir", default=None,
                   help="keeps the title-vector cache between runs (default: a temp dir)")
    p.add_argument("--data-dir", default=None, help="real-data dir (default ../shared/data)")
    p.add_argument("--judgments", default=None,
                   help="synthetic:tiny for the synthetic world's search judgments "
                        "(default: Home Depot)")
    p.add_argument("--queries", type=int, default=0,
                   help="only the judgments of the first N distinct queries (0: all)")
    p.add_argument("--epochs", type=int, default=SearchConfig.epochs)
    p.add_argument("--ranker-epochs", type=int, default=SearchConfig.ranker_epochs)
    p.add_argument("--encoder", default=SearchConfig.encoder,
                   help='BERT encoder ("tiny": a tiny random one built in the work dir)')
    p.add_argument("--preprocessor", default=SearchConfig.preprocessor)
    return parse_smoke_args(p, argv, SMOKE)


def load_judgments(args) -> pd.DataFrame:
    if args.judgments and args.judgments.startswith("synthetic:"):
        from tfrec.data.synthetic import generate_world
        world = generate_world(args.judgments.split(":", 1)[1] or "tiny", seed=42)
        judgments = judgments_from_events(world.events, world.catalog)
    else:
        judgments = load_homedepot(data_dir=args.data_dir)
    if args.queries:
        keep = set(judgments["query"].drop_duplicates().iloc[:args.queries])
        judgments = judgments[judgments["query"].isin(keep)].reset_index(drop=True)
    return judgments


def held_out_products(products: pd.DataFrame, share: float, seed: int) -> set:
    rng = np.random.default_rng(10_000 + seed)
    ids = products["product_id"].to_numpy()
    return set(ids[rng.permutation(len(ids))[:int(round(share * len(ids)))]])


def query_groups(test: pd.DataFrame, held: set) -> Dict[str, List[str]]:
    """Test queries whose relevant (grade >= 2) products include a held-out one, or not."""
    relevant = test[test["relevance"] >= 2.0]
    unseen = set(relevant.loc[relevant["product_id"].isin(held), "query"])
    with_relevant = set(relevant["query"])
    return {"unseen": sorted(unseen), "seen": sorted(with_relevant - unseen),
            "all": sorted(with_relevant)}


def run_seed(args, seed: int, judgments: pd.DataFrame, workdir: str, encoder) -> Dict:
    products = product_catalog(judgments)
    held = held_out_products(products, args.holdout, seed)
    cfg = SearchConfig(seed=seed, epochs=args.epochs, ranker_epochs=args.ranker_epochs,
                       encoder=encoder[0], preprocessor=encoder[1], data_dir=args.data_dir)
    splits = split_by_query(judgments, cfg.split, seed=seed)
    seen = {name: part[~part["product_id"].isin(held)].reset_index(drop=True)
            for name, part in splits.items()}
    train_judgments = pd.concat(list(seen.values()), ignore_index=True)
    data = SearchData(train_judgments, product_catalog(train_judgments), seen)
    start = time.perf_counter()
    train_search(cfg, workdir, data=data,
                 log_dir=os.path.join(workdir, "tensorboard_logs", f"seed{seed}"))
    trained = time.perf_counter() - start
    start = time.perf_counter()
    pipeline, _ = load_search_pipeline(os.path.join(workdir, "search"), products)
    indexed = time.perf_counter() - start
    row_of = {p: i for i, p in enumerate(products["product_id"])}
    test = splits["test"]
    groups = query_groups(test, held)
    metrics = {}
    for group, queries in groups.items():
        if not queries:
            continue
        part = test[test["query"].isin(set(queries))]
        for stage, m in evaluate_stages(pipeline, part, row_of,
                                        [key for _, key in STAGES]).items():
            metrics[(group, stage)] = m.summary()
    print(f"seed {seed}: {len(held):,} of {len(products):,} products held out; test queries "
          f"unseen {len(groups['unseen'])}, seen {len(groups['seen'])}; "
          + ", ".join(f"{g} {s} ndcg@10 {metrics[(g, s)]['ndcg@10']:.4f}"
                      for g in ("unseen",) for _, s in STAGES if (g, s) in metrics)
          + f" | train {trained:.0f} s, index {indexed:.0f} s", flush=True)
    return {"metrics": metrics, "train_s": trained, "index_s": indexed,
            "groups": {g: len(q) for g, q in groups.items()},
            "products": len(products), "held": len(held)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.smoke and not args.judgments and not os.path.isfile(homedepot_path(args.data_dir)):
        args.judgments = "synthetic:tiny"  # no shared data here: the synthetic world
    wall = time.perf_counter()
    workdir = args.workdir or tempfile.mkdtemp(prefix="tfrec-open-catalog-")
    judgments = load_judgments(args)
    encoder = (args.encoder, args.preprocessor)
    if args.encoder == "tiny":
        texts = (product_catalog(judgments)["title"].tolist()
                 + judgments["query"].unique().tolist())
        encoder = tiny_bert(os.path.join(workdir, "tiny_bert"), texts)
    runs = [run_seed(args, seed, judgments, workdir, encoder) for seed in seeds]
    print()
    print(machine_line())
    source = args.judgments or "Home Depot queries_dev.csv"
    print(f"{source}: catalog {runs[0]['products']:,} products, {runs[0]['held']:,} held out "
          f"({args.holdout:.0%}) per seed; seeds {seeds}; test queries unseen/seen per seed: "
          + ", ".join(f"{r['groups']['unseen']}/{r['groups']['seen']}" for r in runs))
    rows = []
    for group in GROUPS:
        if not all((group, "bm25") in r["metrics"] for r in runs):
            continue
        reference = {m: np.mean([r["metrics"][(group, "bm25")][m] for r in runs])
                     for m in METRICS}
        for label, key in STAGES:
            values = {m: np.array([r["metrics"][(group, key)][m] for r in runs])
                      for m in METRICS}
            rows.append([group, label] + [f"{values[m].mean():.4f} ± {values[m].std():.4f}"
                                          for m in METRICS]
                        + [ratio(values["ndcg@10"].mean(), reference["ndcg@10"]),
                           ratio(values["recall@100"].mean(), reference["recall@100"]),
                           ratio(values["mrr"].mean(), reference["mrr"])])
    print(format_table(["queries", "model", "NDCG@10", "Recall@100", "MRR", "NDCG vs BM25",
                        "R@100 vs BM25", "MRR vs BM25"], rows,
                       title="Open catalog: whole-catalog search with 30% of the products "
                             "never judged in training (mean ± sd over seeds)"))
    wins = [r["metrics"][("unseen", "two_tower+ranker")]["ndcg@10"]
            - r["metrics"][("unseen", "bm25")]["ndcg@10"] for r in runs
            if ("unseen", "bm25") in r["metrics"]]
    print("unseen queries, two-tower+ranker minus BM25 NDCG@10 per seed: "
          + ", ".join(f"{w:+.4f}" for w in wins))
    train = ", ".join(f"{r['train_s']:.0f}" for r in runs)
    index = ", ".join(f"{r['index_s']:.0f}" for r in runs)
    print(f"train s per seed: {train}; index s (all products; titles not yet in the cache "
          f"are embedded first): {index}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS of this process): {peak:.0f} MB")
    if args.encoder == "tiny":
        print("BERT: a tiny random encoder (--encoder tiny) stands in for MiniLM")
    print(f"bench wall time: {(time.perf_counter() - wall) / 60:.1f} min")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
