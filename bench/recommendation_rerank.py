"""Does the ranker improve on the retrieval order? Synthetic world, several seeds.

For each seed: generate the world, train the two-tower (training period), train the
ranker on its validation-period top-K, then freeze test-period users and compare the
retrieval order of the top-K with the ranker's order and with the oracle re-rank
(true utility; the best any ranker of these candidates could do). Figures are the
ones `tfrec evaluate` prints; ratios are against the retrieval order of the same run.

Usage: python bench/recommendation_rerank.py [--world small] [--seeds 0 1 2]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, one seed (0), 1
retrieval epoch, 1 ranker epoch, 100 test users. Same steps and tables (the mean ± sd
over one seed has sd 0); the figures mean nothing. TensorFlow's graph optimizer is off
(bench/_common.py). Options given explicitly still override these.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import sys

import numpy as np

import tfrec  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args, world_config  # noqa: E402
from tfrec import workflow

ROWS = ("two_tower", "two_tower+ranker", "two_tower+oracle_ranker")
METRICS = ("ndcg@10", "recall@10", "mrr", "purchase_rate@10")
SMOKE = dict(world="tiny", seeds=[0], epochs=1, ranker_epochs=1, users=100)


def one_seed(world: str, seed: int, root: str, args=None) -> dict:
    """Metrics of the three orders on the test period of one generated world.

    `args` may set the retrieval and ranker epochs and the test users (None: the
    trainer's defaults, every test user)."""
    cfg = world_config(root, world, seed, args.epochs if args is not None else None,
                       args.ranker_epochs if args is not None else None)
    start = time.perf_counter()
    workflow.generate(cfg)
    result = workflow.train(cfg)
    ranked = workflow.train_ranker(cfg, run=result.run_name, retrieval=result.model)
    rows = workflow.evaluate(cfg, run=result.run_name,
                             max_users=args.users if args is not None else None)
    out = {name: rows[name] for name in ROWS}
    out["seconds"] = {"total": time.perf_counter() - start, "ranker": ranked.seconds,
                      "lists": ranked.lists, "users": rows["two_tower"].get("users", 0)}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None,
                        help="retrieval epochs (default: the trainer's, with early stopping)")
    parser.add_argument("--ranker-epochs", type=int, default=None,
                        help="ranker epochs (default: the ranking config's)")
    parser.add_argument("--users", type=int, default=None,
                        help="test users evaluated (default: all)")
    args = parse_smoke_args(parser, argv, SMOKE)
    print(machine_line())
    results = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"tfrec-rerank-{seed}-") as root:
            results[seed] = one_seed(args.world, seed, root, args)
        r = results[seed]
        print(f"seed {seed}: {r['seconds']['users']:.0f} test users, ranker trained on "
              f"{r['seconds']['lists']} lists in {r['seconds']['ranker']:.0f}s, "
              f"{r['seconds']['total']:.0f}s in all", flush=True)

    per_seed = [[seed, name] + [f"{results[seed][name][m]:.4f}" for m in METRICS]
                for seed in args.seeds for name in ROWS]
    print()
    print(format_table(["seed", "order"] + list(METRICS), per_seed,
                       title=f"test period, retrieval top-100 re-ordered ({args.world} world)"))

    summary = []
    for name in ROWS:
        row = [name]
        for m in METRICS:
            values = np.array([results[s][name][m] for s in args.seeds])
            base = np.array([results[s]["two_tower"][m] for s in args.seeds])
            ratios = values[base > 0] / base[base > 0]  # a zero reference has no ratio
            row.append(f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0:.4f}"
                       f" ({f'{ratios.mean():.2f}x' if len(ratios) else 'n/a'})")
        summary.append(row)
    print()
    print(format_table(["order"] + [f"{m} (vs retrieval)" for m in METRICS], summary,
                       title=f"mean ± sd over seeds {args.seeds}; ratio = mean of per-seed "
                             "ratios to the retrieval order (n/a: it scored 0 in every seed)"))
    gains = [results[s]["two_tower+ranker"]["ndcg@10"] - results[s]["two_tower"]["ndcg@10"]
             for s in args.seeds]
    print("\nranker - retrieval NDCG@10 per seed: " + ", ".join(f"{g:+.4f}" for g in gains))


if __name__ == "__main__":
    main()
