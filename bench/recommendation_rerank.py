"""Does the ranker improve on the retrieval order? Synthetic world, several seeds.

For each seed: generate the world, train the two-tower (training period), train the
ranker on its validation-period top-K, then freeze test-period users and compare the
retrieval order of the top-K with the ranker's order and with the oracle re-rank
(true utility; the best any ranker of these candidates could do). Figures are the
ones `tfrec evaluate` prints; ratios are against the retrieval order of the same run.

Usage: python bench/recommendation_rerank.py [--world small] [--seeds 0 1 2]
       [--variant NAME[:KEY=VALUE,...] ...]

Each `--variant` is a model configuration trained on the same world per seed (config
overrides as `tfrec --set` takes them), e.g. `--variant pooled --variant
transformer:model.history_encoder=transformer`; the default is one variant with the
package defaults. Variants that differ only in `ranking.*` keys share one retrieval
model per seed (the first such variant's), so their rankers re-rank the same candidates
(a paired comparison). The whole-catalog oracle (the generator's utility over every item)
bounds retrieval: the "of oracle" line is each variant's recall@100 over the oracle's.

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, one seed (0), 1
retrieval epoch, 1 ranker epoch, 100 test users. Same steps and tables (the mean ± sd
over one seed has sd 0); the figures mean nothing. TensorFlow's graph optimizer is off
(bench/_common.py). Options given explicitly still override these.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import sys

import numpy as np

import tfrec  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (format_table, machine_line, parse_smoke_args, time_calls,  # noqa: E402
                     world_config)
from tfrec import workflow

ROWS = ("two_tower", "two_tower+ranker", "two_tower+oracle_ranker")
METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr", "purchase_rate@10")
SMOKE = dict(world="tiny", seeds=[0], epochs=1, ranker_epochs=1, users=100)


def parse_variant(text: str):
    """"name:key=value,key=value" -> (name, ["key=value", ...]); "name" alone: defaults."""
    name, _, rest = text.partition(":")
    overrides = [item for item in rest.split(",") if item]
    bad = [item for item in overrides if "=" not in item]
    if not name or bad:
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: expected NAME or NAME:KEY=VALUE[,KEY=VALUE...]")
    return name, overrides


def query_latency(cfg, model, users: int = 64, requests: int = 300) -> float:
    """Median ms of one batch-1 query embedding (in process, the exported function's
    graph) over test-period users' real histories: what the history encoder costs."""
    from tfrec.data.io import load_data_tables
    from tfrec.data.examples import user_states
    from tfrec.data.prepare import load_meta
    from tfrec.models.embedding import tower_fn

    tables = load_data_tables(cfg.data)
    at = int(load_meta(cfg.data.tfrecord_dir)["split"]["t_test"])
    states = user_states(tables.events, at, cfg.data.history_length).head(users)
    width = cfg.data.history_length
    inputs = [{"user_id": np.array([r.user_id], dtype=object),
               "history": np.array([list(r.history) + [""] * (width - len(r.history))],
                                   dtype=object),
               "query": np.array([""], dtype=object),
               "device": np.array([r.device], dtype=object),
               "hour": np.array([r.hour], np.int64)} for r in states.itertuples()]
    return float(np.median(time_calls(tower_fn(model.query_tower), inputs, 20, requests)))


def one_seed(world: str, seed: int, root: str, args=None, variants=(("default", []),)) -> dict:
    """Metrics of the three orders per variant on the test period of one generated world,
    plus the whole-catalog oracle's (key "oracle").

    `args` may set the retrieval and ranker epochs and the test users (None: the
    trainer's defaults, every test user)."""
    base = world_config(root, world, seed, args.epochs if args is not None else None,
                        args.ranker_epochs if args is not None else None)
    start = time.perf_counter()
    workflow.generate(base)
    out = {}
    trained = {}  # retrieval overrides -> the run they trained (shared: paired rankers)
    for name, overrides in variants:
        began = time.perf_counter()
        cfg = copy.deepcopy(base).override(list(overrides))
        retrieval_key = tuple(o for o in overrides if not o.startswith("ranking."))
        if retrieval_key in trained:
            result = trained[retrieval_key]
            cfg.train.run_name = result.run_name
        else:
            cfg.train.run_name = f"{name}-{seed}"
            result = trained[retrieval_key] = workflow.train(cfg)
        ranked = workflow.train_ranker(cfg, run=result.run_name, retrieval=result.model)
        rows = workflow.evaluate(cfg, run=result.run_name,
                                 max_users=args.users if args is not None else None)
        out[name] = {order: rows[order] for order in ROWS}
        out[name]["latency"] = query_latency(cfg, result.model)
        out["oracle"] = rows["oracle"]
        out[name]["seconds"] = {
            "total": time.perf_counter() - began, "retrieval": sum(result.epoch_seconds),
            "epochs": len(result.epoch_seconds),
            "ranker": ranked.seconds, "lists": ranked.lists,
            "users": rows["two_tower"].get("users", 0)}
    out["seconds"] = time.perf_counter() - start
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
    parser.add_argument("--variant", type=parse_variant, action="append", default=None,
                        help="NAME[:KEY=VALUE,...] model configuration (repeatable)")
    args = parse_smoke_args(parser, argv, SMOKE)
    variants = args.variant or [("default", [])]
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        parser.error(f"--variant names must differ, got {names}")
    print(machine_line())
    for name, overrides in variants:
        print(f"variant {name}: {', '.join(overrides) or 'package defaults'}")
    results = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"tfrec-rerank-{seed}-") as root:
            results[seed] = one_seed(args.world, seed, root, args, variants)
        for name in names:
            t = results[seed][name]["seconds"]
            print(f"seed {seed} {name}: {t['users']:.0f} test users, retrieval steps "
                  f"{t['retrieval']:.0f}s, ranker on {t['lists']} lists in {t['ranker']:.0f}s, "
                  f"{t['total']:.0f}s in all", flush=True)

    def label(name: str, order: str) -> str:
        return order if len(names) == 1 else f"{name}: {order}"

    per_seed = [[seed, label(name, order)]
                + [f"{results[seed][name][order][m]:.4f}" for m in METRICS]
                for seed in args.seeds for name in names for order in ROWS]
    per_seed += [[seed, "oracle (whole catalog)"]
                 + [f"{results[seed]['oracle'][m]:.4f}" for m in METRICS] for seed in args.seeds]
    print()
    print(format_table(["seed", "order"] + list(METRICS), per_seed,
                       title=f"test period, retrieval top-100 re-ordered ({args.world} world)"))

    reference = names[0]
    summary = []
    for name in names:
        for order in ROWS:
            row = [label(name, order)]
            for m in METRICS:
                values = np.array([results[s][name][order][m] for s in args.seeds])
                base = np.array([results[s][reference]["two_tower"][m] for s in args.seeds])
                ratios = values[base > 0] / base[base > 0]  # a zero reference has no ratio
                row.append(f"{values.mean():.4f} ± "
                           f"{values.std(ddof=1) if len(values) > 1 else 0:.4f}"
                           f" ({f'{ratios.mean():.2f}x' if len(ratios) else 'n/a'})")
            summary.append(row)
    print()
    print(format_table(["order"] + [f"{m} (vs retrieval)" for m in METRICS], summary,
                       title=f"mean ± sd over seeds {args.seeds}; ratio = mean of per-seed "
                             f"ratios to the retrieval order of {label(reference, 'two_tower')}"
                             " (n/a: it scored 0 in every seed)"))
    print()
    for name in names:
        gains = [results[s][name]["two_tower+ranker"]["ndcg@10"]
                 / results[s][name]["two_tower"]["ndcg@10"] - 1 for s in args.seeds
                 if results[s][name]["two_tower"]["ndcg@10"] > 0]
        of_oracle = [results[s][name]["two_tower"]["recall@100"]
                     / results[s]["oracle"]["recall@100"] for s in args.seeds
                     if results[s]["oracle"]["recall@100"] > 0]
        print(f"{label(name, 'two_tower')}: recall@100 of the oracle's per seed "
              + ", ".join(f"{r:.3f}" for r in of_oracle)
              + "; ranker NDCG@10 lift over the retrieval order per seed "
              + ", ".join(f"{g:+.1%}" for g in gains))

    cost = []
    for name in names:
        def per_epoch(seed: int, variant: str) -> float:
            t = results[seed][variant]["seconds"]
            return t["retrieval"] / max(t["epochs"], 1)

        steps = [per_epoch(s, name) for s in args.seeds]
        ref_steps = [per_epoch(s, reference) for s in args.seeds]
        ms = [results[s][name]["latency"] for s in args.seeds]
        ref_ms = [results[s][reference]["latency"] for s in args.seeds]
        cost.append([name, f"{np.mean(steps):.1f}",
                     f"{np.mean([a / b for a, b in zip(steps, ref_steps)]):.2f}x",
                     f"{np.mean(ms):.2f}", f"{np.mean([a / b for a, b in zip(ms, ref_ms)]):.2f}x"])
    print()
    print(format_table(["variant", "s per epoch", f"vs {reference}", "query batch-1 ms (median)",
                        f"vs {reference} "], cost,
                       title="cost: retrieval training steps per epoch; one query embedding in "
                             "process (mean over seeds of per-seed ratios)"))


if __name__ == "__main__":
    main()
