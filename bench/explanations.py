"""Are the pipeline's reasons faithful, and what do they cost? Synthetic world, a few seeds.

For each seed: generate the world, train the two-tower and its ranker, build the
pipeline (with and without reasons) and the ranker export in this process. Test users
with at least 3 clicked/bought items ask for k recommendations; each item whose reason
cites a history item is re-scored by the ranker (same candidate list) with that item
removed from the request, and with each other history item removed instead.

Deletion table: share of (item, other history item) pairs where removing the cited
item lowers the score more than removing the other one (chance: 0.5), and the mean
score drops (ranker score units) of removing the cited item and the others. Reference rows cite the
most recent history item, or the history item nearest the item in the two-tower space
(common heuristics), on the same pairs. The query row does the same for search:
removing a matched query word versus removing an unmatched one.
Cost table: batch-1 `recommend` latency with reasons over without (same run).

Usage: python bench/explanations.py [--world small] [--seeds 0 1 2] [--users 200]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, one seed, one
epoch each, 20 users, 20 timed calls; the figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (format_table, machine_line, parse_smoke_args, ratio,  # noqa: E402
                     time_calls, world_config)
from tfrec import workflow  # noqa: E402

SMOKE = dict(world="tiny", seeds=[0], epochs=1, ranker_epochs=1, users=20, requests=20)
HISTORY = 8
METHODS = ("reason (leave-one-out)", "most recent item", "nearest item (two-tower)")


def _requests(events, users: int, seed: int):
    """(user, history most recent first) of test users with >= 3 clicked/bought items."""
    positives = events[events["event_type"].isin(["click", "purchase"])].sort_values("ts")
    out = []
    for user, rows in positives.groupby("user_id"):
        history = list(dict.fromkeys(rows["item_id"].tolist()[::-1]))[:HISTORY]
        if len(history) >= 3:
            out.append((user, history))
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order[:users]]


def _inputs(user, history, query=None, k=10):
    out = dict(user_id=tf.constant([user]),
               history=tf.constant([history + [""] * (HISTORY - len(history))]),
               device=tf.constant(["mobile"]), hour=tf.constant([20], tf.int64),
               k=tf.constant([k]), exclude_item_ids=tf.constant([[""]]),
               purchased_item_ids=tf.constant([[""]]))
    if query is not None:
        out["query"] = tf.constant([query])
    return out


def _ranker_scores(ranker, user, history, shown, query=""):
    got = ranker.rank(query=tf.constant([query]), user_id=tf.constant([user]),
                      history=tf.constant([history + [""] * (HISTORY - len(history))]),
                      device=tf.constant(["mobile"]), hour=tf.constant([20], tf.int64),
                      candidate_ids=tf.constant([shown]))
    ids = [i.decode() for i in got["item_ids"].numpy()[0]]
    return dict(zip(ids, got["scores"].numpy()[0]))


def deletion(pipeline, ranker, embed, requests, rng) -> dict:
    """Pairs won by each citing method, and the kinds of reasons given."""
    wins = {m: [0, 0, 0.0, 0.0] for m in METHODS}  # wins, pairs, cited drop, other drop
    kinds: dict = {}
    for user, history in requests:
        out = {k: v.numpy()[0] for k, v in pipeline.recommend(**_inputs(user, history)).items()}
        shown = [i.decode() for i in out["item_ids"] if i]
        for kind in out["reason_kinds"][:len(shown)]:
            kinds[kind.decode()] = kinds.get(kind.decode(), 0) + 1
        full = _ranker_scores(ranker, user, history, shown)
        without = {h: _ranker_scores(ranker, user, [x for x in history if x != h], shown)
                   for h in history}
        vectors = embed(shown + history)
        for i, item in enumerate(shown):
            cited = out["reason_items"][i].decode()
            if not cited:
                continue
            nearest = history[int(np.argmax(vectors[len(shown):] @ vectors[i]))]
            drop = {h: full[item] - without[h][item] for h in history}
            for method, pick in zip(METHODS, (cited, history[0], nearest)):
                others = [d for h, d in drop.items() if h != pick]
                w = wins[method]
                w[0] += sum(drop[pick] > d for d in others)
                w[1] += len(others)
                w[2] += drop[pick] * len(others)
                w[3] += sum(others)
    return {"wins": wins, "kinds": kinds}


def query_deletion(pipeline, ranker, requests, titles, rng) -> list:
    """[wins, pairs, matched drop, other drop] for removing matched vs unmatched words."""
    split = [re.findall(r"[^\W_]+", t.lower()) for t in titles]  # words as reasons see them
    vocabulary = sorted({w for t in split for w in t})
    w = [0, 0, 0.0, 0.0]
    for user, history in requests:
        words = rng.choice(split[rng.integers(len(split))], size=2).tolist()
        words += rng.choice(vocabulary, size=2).tolist()
        query = " ".join(words)
        out = {k: v.numpy()[0] for k, v in pipeline.search(**_inputs(user, history, query))
               .items()}
        shown = [i.decode() for i in out["item_ids"] if i]
        full = _ranker_scores(ranker, user, history, shown, query)
        without = {x: _ranker_scores(ranker, user, history, shown,
                                     " ".join(v for v in words if v != x)) for x in set(words)}
        for i, item in enumerate(shown):
            matched = set(out["reason_words"][i].decode().split()) & set(words)
            unmatched = set(words) - matched
            if not matched or not unmatched:
                continue
            for m in matched:
                for u in unmatched:
                    dm, du = full[item] - without[m][item], full[item] - without[u][item]
                    w[0] += dm > du
                    w[1] += 1
                    w[2] += dm
                    w[3] += du
    return w


def one_seed(args, seed: int, root: str) -> dict:
    from tfrec.export.pipeline import PipelineModule
    from tfrec.export.ranking import RankerModule
    from tfrec.models.embedding import tower_fn
    from tfrec.data.feature_spec import catalog_features

    cfg = world_config(root, args.world, seed, args.epochs, args.ranker_epochs)
    from tfrec.data.io import load_tables

    workflow.generate(cfg)
    world = load_tables(cfg.data.data_dir)
    result = workflow.train(cfg)
    ranked = workflow.train_ranker(cfg, run=result.run_name, retrieval=result.model)
    catalog = world.catalog
    models = (result.model, ranked.model)
    pipeline = PipelineModule(*models, catalog, max_per_brand=None)
    plain = PipelineModule(*models, catalog, max_per_brand=None, reasons=False)
    ranker = RankerModule(*models, catalog)
    index = {i: n for n, i in enumerate(catalog["item_id"])}
    item_vectors = tower_fn(result.model.candidate_tower)(catalog_features(catalog, result.model))
    item_vectors = tf.math.l2_normalize(item_vectors, axis=1).numpy()

    def embed(ids):
        return item_vectors[[index[i] for i in ids]]

    rng = np.random.default_rng(seed)
    requests = _requests(world.events, args.users, seed)
    out = deletion(pipeline, ranker, embed, requests, rng)
    out["query"] = query_deletion(pipeline, ranker, requests,
                                  catalog["title"].astype(str).tolist(), rng)
    inputs = [_inputs(u, h) for u, h in requests]
    timed = {}
    for name, module in (("with reasons", pipeline), ("without", plain)):
        timed[name] = float(np.median(time_calls(lambda x: module.recommend(**x), inputs,
                                                 warmup=5, requests=args.requests)))
    out["ms"] = timed
    out["candidates"] = pipeline.candidates
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--ranker-epochs", type=int, default=None)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--requests", type=int, default=200, help="timed calls per variant")
    args = parse_smoke_args(parser, argv, SMOKE)
    print(machine_line())
    results = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"tfrec-explain-{seed}-") as root:
            results[seed] = one_seed(args, seed, root)
        print(f"seed {seed}: reasons {results[seed]['kinds']}", flush=True)

    rows = []
    for seed, r in results.items():
        for method in METHODS:
            wins, pairs, cited, other = r["wins"][method]
            rows.append([seed, method, pairs, f"{wins / max(pairs, 1):.3f}",
                         f"{cited / max(pairs, 1):+.3f}", f"{other / max(pairs, 1):+.3f}"])
        wins, pairs, cited, other = r["query"]
        rows.append([seed, "matched query word", pairs, f"{wins / max(pairs, 1):.3f}",
                     f"{cited / max(pairs, 1):+.3f}", f"{other / max(pairs, 1):+.3f}"])
    print("\nDeletion test: removing the cited signal vs removing another one "
          "(share of pairs where the cited one lowers the score more; chance 0.5)")
    print(format_table(["seed", "cited by", "pairs", "share", "cited drop", "other drop"], rows))
    cost = [[seed, r["candidates"], f"{r['ms']['without']:.2f}", f"{r['ms']['with reasons']:.2f}",
             ratio(r["ms"]["with reasons"], r["ms"]["without"])] for seed, r in results.items()]
    print("\nCost: batch-1 recommend (k=10), median ms")
    print(format_table(["seed", "K", "without", "with reasons", "ratio"], cost))


if __name__ == "__main__":
    main()
