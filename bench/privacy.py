"""Retrieval quality under differential privacy: test recall@100 vs epsilon (DP-SGD).

Protocol (bench/README.md, "Privacy"):
  data     one synthetic world (--world, seed 42), tfrec's split.
  runs     "non-private"   `tfrec train` as is (in-batch softmax, lazy_adam);
           "clip only"     `train.dp` with noise_multiplier 0: sampled negatives and
                           clipping without noise (no privacy; --no-clip-only skips
                           it): what the DP setup costs before any noise.
           "eps=E"         `train.dp` with target_epsilon E (the noise multiplier that
                           reaches E at --delta over the planned steps, from dp-accounting),
                           l2_clip --clip, --negatives sampled catalog items per step,
                           adam. Same epochs, batch size, learning rate and seed as the
                           non-private run; early stopping as configured (a DP run's
                           epsilon counts every step run).
  figures  recall@100 on the test period (users frozen at its start, seen items
           excluded, --eval-users users), relative to the non-private run of the same
           seed; the epsilon each run reports; the training step time relative to the
           non-private step (median epoch seconds / steps per epoch).
Run from the repository root:  python bench/privacy.py [--world small] [--epsilons 1,3,8]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, 1 epoch, batch
256, epsilon 8 only (no clip-only run), 100 evaluation users. Same table; the figures mean nothing.
TensorFlow's graph optimizer is off (bench/_common.py). Options given explicitly still
override these.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from copy import deepcopy
from typing import Dict, List, Optional, Sequence

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)

from tfrec.config import DPConfig
from tfrec.data.io import load_tables
from tfrec.data.synthetic import generate_world
from tfrec.evaluation.report import evaluate_period
from tfrec.models.embedding import tower_fn
from tfrec.training.trainer import ensure_prepared, train_retrieval

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args, ratio, world_config  # noqa: E402

SMOKE = dict(world="tiny", epochs=1, batch_size=256, epsilons="8", eval_users=100,
             clip_only=False)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default="small")
    p.add_argument("--seed", type=int, default=1, help="training seed (the world is seed 42)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--epsilons", default="1,3,8", help="target epsilons of the DP runs")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=1.0, help="train.dp.l2_clip")
    p.add_argument("--negatives", type=int, default=64, help="train.dp.num_negatives")
    p.add_argument("--eval-users", type=int, default=2000)
    p.add_argument("--clip-only", action=argparse.BooleanOptionalAction, default=True,
                   help="also run train.dp with noise_multiplier 0 (no privacy)")
    p.add_argument("--workdir", default="", help="keep the runs here (default: a temp dir)")
    return parse_smoke_args(p, argv, SMOKE)


def run(cfg, name: str, eval_users: int) -> Dict[str, object]:
    """Trains `cfg` as run `name`; its test recall@100, epsilon and step time."""
    cfg = deepcopy(cfg)
    cfg.train.run_name = name
    result = train_retrieval(cfg)
    meta = ensure_prepared(cfg)
    tables = load_tables(cfg.data.data_dir)
    t_test, t_end = int(meta["split"]["t_test"]), int(meta["split"]["t_end"])
    rows = evaluate_period(tables.events, tables.catalog, t_test, t_end,
                           cfg.data.history_length, tower_fn(result.model.query_tower),
                           tower_fn(result.model.candidate_tower), ks=(100,),
                           max_users=eval_users, search=False)
    steps_per_epoch = max(1, int(meta["counts"]["train"]) // cfg.train.batch_size)
    metrics = _metrics(result.run_dir)
    return {"recall": rows["two_tower"]["recall@100"], "dp": metrics.get("dp"),
            "step_ms": 1000 * statistics.median(result.epoch_seconds) / steps_per_epoch,
            "epochs": len(result.epoch_seconds), "seconds": metrics["seconds"]}


def _metrics(run_dir: str) -> dict:
    import json

    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    wall = time.perf_counter()
    work = args.workdir or tempfile.mkdtemp(prefix="tfrec-privacy-")
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    try:
        cfg = world_config(work, args.world, args.seed, epochs=args.epochs)
        cfg.data.seed = 42  # the world; args.seed is the training seed
        cfg.train.batch_size = args.batch_size
        if not os.path.exists(os.path.join(cfg.data.data_dir, "events.parquet")):
            generate_world(args.world, seed=42).save(cfg.data.data_dir)
        runs = {"non-private": run(cfg, "non-private", args.eval_users)}
        if args.clip_only:
            clip_cfg = deepcopy(cfg)
            clip_cfg.train.dp = DPConfig(noise_multiplier=0.0, delta=args.delta,
                                         l2_clip=args.clip, num_negatives=args.negatives)
            runs["clip only"] = run(clip_cfg, "dp-clip-only", args.eval_users)
        for eps in epsilons:
            dp_cfg = deepcopy(cfg)
            dp_cfg.train.dp = DPConfig(target_epsilon=eps, delta=args.delta, l2_clip=args.clip,
                                       num_negatives=args.negatives)
            runs[f"eps={eps:g}"] = run(dp_cfg, f"dp-eps{eps:g}", args.eval_users)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    base = runs["non-private"]
    rows: List[List[str]] = []
    for name, r in runs.items():
        dp = r["dp"] or {}
        rows.append([name, f"{dp['epsilon']:.2f}" if dp else "inf",
                     f"{dp['noise_multiplier']:.3f}" if dp else "-",
                     f"{r['recall']:.4f}", ratio(r["recall"], base["recall"]),
                     f"{r['step_ms']:.0f}", ratio(r["step_ms"], base["step_ms"]),
                     str(r["epochs"])])
    print(machine_line())
    print(f"world {args.world} (seed 42), training seed {args.seed}; {args.epochs} epochs, "
          f"batch {args.batch_size}; DP: delta {args.delta:g}, l2_clip {args.clip:g}, "
          f"{args.negatives} sampled catalog negatives, adam; recall@100 on the test period "
          f"({args.eval_users} users)")
    print(format_table(["run", "epsilon", "noise", "test recall@100", "vs non-private",
                        "step ms", "step vs non-private", "epochs"], rows,
                       title="Retrieval under DP-SGD (recall relative to the non-private run)"))
    print(f"bench wall time: {(time.perf_counter() - wall) / 60:.1f} min")


if __name__ == "__main__":
    main()
