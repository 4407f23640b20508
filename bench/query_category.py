"""What the query-category classifier buys the search ranker, on synthetic shops.

Per language and seed, one search run on the world's search log (`synthetic:<world>:<lang>`
judgments, the same 70/10/20 query split as `tfrec search train`): the two-tower is
trained once; then the ranker is trained twice on the same retrieved validation lists,
without the classifier ("off", the reference of "vs off") and with it (its category
probability of each candidate as two more ranker features). Columns: test NDCG@10 and
Recall@100 of the final pipeline over the whole catalog, the ranker's held-out
validation NDCG@10 (what a setting should be chosen on), and the classifier's test-query
accuracy (its most probable category holds the largest share of the query's relevant
products) beside always answering the most common category.

Encoder: a tiny random BERT whose vocabulary is the world's frequent words (2 layers,
hidden 64; MiniLM maps most Chinese characters to [UNK]); `--encoder/--preprocessor` take
another TF-Hub BERT.

Run from the repository root:  python bench/query_category.py [--world small] [--seeds 0,1]
Smoke mode (--smoke; tests/test_bench_smoke.py): tiny world, English, one seed, 2 ranker
epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Dict, List

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (format_table, machine_line, parse_smoke_args, ratio, tiny_bert,  # noqa: E402
                     work_dir)

from tfrec.search.config import SearchConfig  # noqa: E402
from tfrec.search.train import (build_pipeline, evaluate_stages, load_search_data,  # noqa: E402
                                title_vectors, train_query_categories, train_ranker,
                                train_two_tower)


def one_run(world: str, lang: str, seed: int, args, workdir: str) -> Dict[str, Dict[str, float]]:
    """{"off"|"category": metrics} of one language and seed."""
    cfg = SearchConfig(judgments=f"synthetic:{world}:{lang}", seed=seed,
                       ranker_epochs=args.ranker_epochs, epochs=args.epochs)
    data = load_search_data(cfg)
    if args.encoder:
        encoder, preprocessor = args.encoder, args.preprocessor
    else:  # one per world and language (its vocabulary), shared by the seeds
        out = os.path.join(workdir, f"bert_{world}_{lang}")
        encoder, preprocessor = os.path.join(out, "encoder"), os.path.join(out, "preprocessor")
        if not os.path.isdir(encoder):
            texts = data.catalog["title"].tolist() + data.judgments["query"].tolist()
            encoder, preprocessor = tiny_bert(out, texts)
    cfg = dataclasses.replace(cfg, encoder=encoder, preprocessor=preprocessor)
    vectors = title_vectors(cfg, data.catalog["title"].tolist(),
                            cache_dir=os.path.join(workdir, "cache"))
    pipeline = build_pipeline(cfg, data, vectors)
    train_two_tower(pipeline, cfg, data)
    out = {}
    for name in ("off", "category"):
        run_cfg = dataclasses.replace(cfg, query_category="off" if name == "off" else "auto")
        pipeline.set_query_categories(None, [], [])
        info = train_query_categories(pipeline, run_cfg, data)
        history = train_ranker(pipeline, run_cfg, data)
        m = evaluate_stages(pipeline, data.splits["test"], data.row_of,
                            ("two_tower+ranker",))["two_tower+ranker"].summary()
        out[name] = {"ndcg@10": m["ndcg@10"], "recall@100": m["recall@100"],
                     "holdout": max(history["holdout_ndcg@10"]),
                     "accuracy": np.nan if info is None else info["test_accuracy"],
                     "prior": np.nan if info is None else info["test_prior_accuracy"]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="small")
    parser.add_argument("--langs", default="en,zh")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=1, help="two-tower epochs")
    parser.add_argument("--ranker-epochs", type=int, default=30, dest="ranker_epochs")
    parser.add_argument("--encoder", default="", help="TF-Hub BERT (default: tiny random)")
    parser.add_argument("--preprocessor", default="")
    parser.add_argument("--workdir", default=None)
    args = parse_smoke_args(parser, argv, {"world": "tiny", "langs": "en", "seeds": "0",
                                           "ranker_epochs": 2})
    workdir = work_dir(args.workdir, "tfrec-query-category-")
    print(machine_line())
    rows: List[List[object]] = []
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for lang in [x.strip() for x in args.langs.split(",") if x.strip()]:
        runs = [one_run(args.world, lang, seed, args, workdir) for seed in seeds]
        mean = {name: {k: float(np.mean([r[name][k] for r in runs])) for k in runs[0][name]}
                for name in ("off", "category")}
        for name, label in (("off", "no category"), ("category", "query category")):
            m = mean[name]
            rows.append([f"{args.world} world ({lang}), {label}", f"{m['ndcg@10']:.4f}",
                         ratio(m["ndcg@10"], mean["off"]["ndcg@10"]),
                         f"{m['recall@100']:.4f}", f"{m['holdout']:.4f}",
                         ratio(m["holdout"], mean["off"]["holdout"]),
                         "-" if np.isnan(m["accuracy"]) else
                         f"{m['accuracy']:.3f} ({m['prior']:.3f})"])
    print(format_table(("search ranker", "NDCG@10", "vs off", "R@100", "val NDCG@10",
                        "val vs off", "category acc (common)"), rows,
                       title=f"test queries, mean over seeds {seeds}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
