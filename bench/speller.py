"""What the query speller buys: BM25 with and without the corrections, typo and clean queries.

Rows, all in this process, BM25 (numpy `BM25Scorer`) over catalog text; "vs plain" is
the speller's figure over the same queries' without it (the reference, same run):
  * synthetic worlds (en, zh): the generator knows which logged queries carry a typo and
    the item wanted; recall@10 of that item, typo and clean queries apart. The speller
    learns from the catalog and the first 70% of the query log (by time).
  * Chinese pinyin slips: clean zh queries with one character replaced by its homophone
    (the generator's typo), so the intended query is known: share repaired exactly, and
    share of the clean queries the speller alters (false corrections).
  * Home Depot (when present): NDCG@10 / Recall@100 of judged products on a held-out 20%
    of distinct queries (the speller learns from the other 80%), all queries and those
    the speller changed.
  * latency: `corrections` of one query in a tf.function, p50 over --repeats calls.

Run from the repository root:  python bench/speller.py [--world small]
Smoke mode (--smoke; tests/test_bench_smoke.py): tiny world, no Home Depot.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import List, Tuple

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args, ratio  # noqa: E402

from tfrec.data.homedepot import homedepot_path, load_homedepot  # noqa: E402
from tfrec.data.synthetic import generate_world, get_spec  # noqa: E402
from tfrec.features.bm25 import BM25Scorer  # noqa: E402
from tfrec.features.speller import Speller, speller_from_texts  # noqa: E402
from tfrec.evaluation.spelling import (corrected_queries, homophone_repair, top_rows,  # noqa: E402
                                       typo_recall)
from tfrec.search.metrics import catalog_search_metrics, query_gains  # noqa: E402



def world_rows(world_name: str, lang: str, seed: int, max_queries: int) -> List[List[object]]:
    world = generate_world(dataclasses.replace(get_spec(world_name), lang=lang), seed=seed)
    return [[f"{world_name} world ({lang}), {name}", r["queries"], f"{r['changed']:.3f}",
             "recall@10", f"{r['plain']:.4f}", f"{r['speller']:.4f}",
             ratio(r["speller"], r["plain"])]
            for name, r in typo_recall(world, max_queries).items()]


def homophone_rows(world_name: str, seed: int, max_queries: int) -> List[List[object]]:
    """Chinese pinyin slips put into clean queries: exact repairs, and clean queries altered."""
    world = generate_world(dataclasses.replace(get_spec(world_name), lang="zh"), seed=seed)
    r = homophone_repair(world, max_queries)
    return [[f"{world_name} world (zh), one homophone slip", r["queries"], f"{r['changed']:.3f}",
             "exact repair", "0.0000", f"{r['repaired']:.4f}", "-"],
            [f"{world_name} world (zh), the same queries clean", r["queries"],
             f"{r['clean_changed']:.3f}", "altered", "0.0000", f"{r['clean_changed']:.4f}", "-"]]


def homedepot_rows(data_dir: str) -> Tuple[List[List[object]], Speller]:
    judgments = load_homedepot(data_dir=data_dir)
    catalog = judgments.drop_duplicates("product_id")
    ids = catalog["product_id"].astype(str).tolist()
    titles = catalog["title"].astype(str).tolist()
    queries = np.array(sorted(judgments["query"].drop_duplicates()))
    order = np.random.default_rng(0).permutation(len(queries))
    held = queries[order[:len(queries) // 5]].tolist()
    speller, _ = speller_from_texts(titles, queries[order[len(queries) // 5:]].tolist())
    bm25 = BM25Scorer().fit(ids, titles)
    gains = query_gains(judgments, {p: i for i, p in enumerate(ids)}, held)
    expanded, changed = corrected_queries(speller, held)
    plain = catalog_search_metrics(top_rows(bm25, held, 100), gains)
    fixed = catalog_search_metrics(top_rows(bm25, expanded, 100), gains)
    rows = []
    for name, sel in (("held-out queries", slice(None)), ("changed by the speller", changed)):
        for metric, a, b in (("NDCG@10", plain.ndcg, fixed.ndcg),
                             ("Recall@100", plain.recall, fixed.recall)):
            x, y = float(np.nanmean(a[sel])), float(np.nanmean(b[sel]))
            n = len(held) if name.startswith("held") else int(changed.sum())
            rows.append([f"Home Depot, {name}", n, f"{changed.mean():.3f}", metric,
                         f"{x:.4f}", f"{y:.4f}", ratio(y, x)])
    return rows, speller


def latency_ms(speller: Speller, query: str, repeats: int) -> float:
    fn = tf.function(speller.corrections, input_signature=[tf.TensorSpec([None], tf.string)])
    x = tf.constant([query])
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="small")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-queries", type=int, default=3000, dest="max_queries")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--homedepot", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--data-dir", dest="data_dir", default=None)
    args = parse_smoke_args(parser, argv, {"world": "tiny", "max_queries": 300,
                                           "repeats": 20, "homedepot": False})
    print(machine_line())
    rows = world_rows(args.world, "en", args.seed, args.max_queries)
    rows += world_rows(args.world, "zh", args.seed, args.max_queries)
    rows += homophone_rows(args.world, args.seed, args.max_queries)
    speller = None
    if args.homedepot and os.path.exists(homedepot_path(args.data_dir)):
        hd, speller = homedepot_rows(args.data_dir)
        rows += hd
    print(format_table(("queries", "n", "changed", "metric", "plain", "speller", "vs plain"),
                       rows, title="BM25 without and with the query speller"))
    if speller is None:
        speller, _ = speller_from_texts(["toilet seat", "vinyl flooring"] * 2)
    ms = latency_ms(speller, "pink toliet seat elongated", args.repeats)
    print(f"\ncorrections of one query (tf.function, p50 of {args.repeats}): {ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
