"""Warm-start vs from-scratch retrieval training on a second period of data.

Protocol (bench/README.md, "Warm start"):
  data       one synthetic world; period 1 = its events before 80% of the time range,
             period 2 = all of them (new users, new items, more events).
  runs       "period 1"            from scratch on period 1 (the model in production);
             "scratch"             from scratch on period 2;
             "warm"                `train.warm_start` = period 1, the whole period 2;
             "warm, last N days"   the same on the training period's last --days days.
             Same config and epoch budget (--epochs); the warm runs at learning rate
             --warm-lr (0.001, half the default: a trained model needs smaller steps;
             chosen on this validation period over 0.002 and 0.0005). Every epoch is
             scored on period 2's validation period (recall@100 of the frozen users, the
             number early stopping watches). Each run is repeated for --seeds training
             seeds and the curves averaged: one run's recall moves by ~0.01.
  figure     steps until a run's mean curve first reaches the scratch runs' best mean
             validation recall@100, as a ratio of the scratch curve's steps to that point
             (lower is better; the issue's target: <= 0.5).
Run from the repository root:  python bench/warm_start.py [--world small] [--seeds 1,2,3]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, one seed, 1
epoch, batch 256, 200 evaluation users. Same table; the figures mean nothing. TensorFlow's
graph optimizer is off (bench/_common.py). Options given explicitly still override these.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from copy import deepcopy
from typing import Dict, List, Optional, Sequence

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np

from tfrec.config import Config
from tfrec.data.io import write_table
from tfrec.data.synthetic import generate_world
from tfrec.training.trainer import train_retrieval

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args, ratio  # noqa: E402

SMOKE = dict(world="tiny", epochs=1, batch_size=256, eval_users=200, seeds="1")
METRIC = "val_recall_at_100"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default="small")
    p.add_argument("--seeds", default="1,2,3", help="training seeds (the world is seed 42)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--days", type=float, default=0.0,
                   help="window of the last run (default: the days period 2 adds)")
    p.add_argument("--eval-users", type=int, default=2000)
    p.add_argument("--warm-lr", type=float, default=0.001,
                   help="learning rate of the warm runs (0: train.learning_rate, as the "
                        "scratch runs; 0.001 chosen on this validation period over 0.002 and "
                        "0.0005)")
    return parse_smoke_args(p, argv, SMOKE)


def write_period(world, root: str, cut: Optional[int]) -> str:
    """A data dir holding the world's tables, events before `cut` only (None: all)."""
    os.makedirs(root, exist_ok=True)
    events = world.events if cut is None else world.events[world.events["ts"] < cut]
    write_table(world.catalog, os.path.join(root, "catalog.parquet"))
    write_table(world.users, os.path.join(root, "users.parquet"))
    write_table(events.reset_index(drop=True), os.path.join(root, "events.parquet"))
    return root


def config(args, work: str, data_dir: str, name: str) -> Config:
    cfg = Config()
    cfg.data.data_dir = data_dir
    cfg.data.tfrecord_dir = os.path.join(work, "tfrecords", os.path.basename(data_dir))
    cfg.train.checkpoint_dir = os.path.join(work, "checkpoints")
    cfg.train.log_dir = os.path.join(work, "logs")
    cfg.train.run_name, cfg.train.epochs = name, args.epochs
    cfg.train.batch_size, cfg.train.seed = args.batch_size, args.seed
    cfg.train.eval_max_users = args.eval_users
    cfg.train.early_stopping_patience = args.epochs  # the whole budget: full curves
    cfg.train.histogram_freq = 0
    return cfg


def curve(result) -> Dict[str, object]:
    """Validation recall@100 per epoch and the steps each epoch took."""
    import json
    with open(os.path.join(result.run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    scores = [float(x) for x in result.history[METRIC]]
    return {"scores": scores, "steps_per_epoch": metrics["train_steps"] / len(scores),
            "seconds": metrics["seconds"]}


def steps_to(c: Dict[str, object], target: float) -> Optional[float]:
    for epoch, score in enumerate(c["scores"]):
        if score >= target - 1e-9:
            return (epoch + 1) * c["steps_per_epoch"]
    return None


def run_seed(args, world, work: str, seed: int) -> Dict[str, Dict[str, object]]:
    """The period-1 run, then scratch / warm / warm-window runs on period 2, one seed."""
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    ts = world.events["ts"]
    cut = int(ts.min() + 0.8 * (ts.max() - ts.min()))
    first = write_period(world, os.path.join(work, "period1"), cut)
    second = write_period(world, os.path.join(work, "period2"), None)
    days = args.days or float(np.ceil((ts.max() - cut) / 86400))
    runs: Dict[str, Dict[str, object]] = {}
    train_retrieval(config(args, work, first, f"period1-{seed}"))
    runs["scratch"] = curve(train_retrieval(config(args, work, second, f"scratch-{seed}")))
    warm = config(args, work, second, f"warm-{seed}")
    warm.train.warm_start = f"period1-{seed}"
    warm.train.learning_rate = args.warm_lr or warm.train.learning_rate
    runs["warm"] = curve(train_retrieval(warm))
    window = config(args, work, second, f"warm-window-{seed}")
    window.train.warm_start, window.data.train_days = f"period1-{seed}", days
    window.train.learning_rate = warm.train.learning_rate
    window.data.tfrecord_dir += "-window"
    runs[f"warm, last {days:g} days"] = curve(train_retrieval(window))
    return runs


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    wall = time.perf_counter()
    work = tempfile.mkdtemp(prefix="tfrec-warm-start-")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    try:
        world = generate_world(args.world, seed=42)
        per_seed = [run_seed(args, world, work, seed) for seed in seeds]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Curves averaged over seeds: one training run's recall moves by ~0.01 run to run.
    runs = {name: {"scores": list(np.mean([r[name]["scores"] for r in per_seed], axis=0)),
                   "steps_per_epoch": per_seed[0][name]["steps_per_epoch"],
                   "seconds": float(np.mean([r[name]["seconds"] for r in per_seed]))}
            for name in per_seed[0]}
    scratch = runs["scratch"]
    target = max(scratch["scores"])
    reference = steps_to(scratch, target)
    rows: List[List[str]] = []
    for name, c in runs.items():
        steps = steps_to(c, target)
        rows.append([name, f"{c['steps_per_epoch']:.0f}",
                     " ".join(f"{s:.3f}" for s in c["scores"]), f"{max(c['scores']):.4f}",
                     "not reached" if steps is None else f"{steps:.0f}",
                     "-" if steps is None else ratio(steps, reference),
                     f"{c['seconds']:.0f}"])
    print(machine_line())
    print(f"world {args.world} (seed 42): period 1 = events before 80% of the time range, "
          f"period 2 = all; {args.epochs} epochs, batch {args.batch_size}; warm runs at "
          f"learning rate {args.warm_lr or Config().train.learning_rate:g}; training seeds "
          f"{seeds} (curves averaged); target = the scratch run's best mean validation "
          f"recall@100 ({target:.4f})")
    print(format_table(["run", "steps/epoch", "val recall@100 per epoch", "best",
                        "steps to target", "vs scratch", "train s"], rows,
                       title="Warm start on period 2 (validation recall@100)"))
    for name in runs:
        print(f"{name}: best per seed " + ", ".join(
            f"{max(r[name]['scores']):.4f}" for r in per_seed))
    print(f"bench wall time: {(time.perf_counter() - wall) / 60:.1f} min")


if __name__ == "__main__":
    main()
