"""Training throughput of one process vs 2 local MultiWorkerMirrored workers vs a
parameter-server cluster, on the same data and the same global batch.

Every row is a real `tfrec train` command (a subprocess with a timeout, its process
group killed afterwards) on one synthetic world (--world, default small) whose TFRecords
are prepared once before the first row:

  1 process            --strategy default: one process, TensorFlow's own thread pools.
  2 workers (MWMS)     --cluster local:2: two worker processes on 127.0.0.1, each taking
                       half of the global batch per step, gradients all-reduced over gRPC.
  PS 1 worker + 1 ps   --cluster local:ps=1,workers=1: this command coordinates, one
                       worker process runs the steps, one PS process holds the variables.

All rows use --batch-size as the global batch and --steps-per-epoch steps per epoch, so
every epoch trains on the same number of examples. The trainer records the wall time of
each epoch's training steps (metrics.json "epoch_seconds": from the epoch's start to the
start of its validation, or to its end under PS; validation, recall evaluation and other
callbacks are excluded). The first epoch (tracing, cluster start-up) is dropped; ex/s is
steps x global batch / epoch seconds, median and best over the remaining --epochs - 1
epochs, and "vs 1 process" is the ratio of medians. "wall s" is the whole command,
process and TensorFlow start-up included. --rounds > 1 repeats all rows round-robin and
pools their timed epochs, so load from other jobs falls on every row alike.

Run from the repository root:  python bench/distributed.py [--world small]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, 2 shards,
global batch 64, 2 steps per epoch, 2 epochs (1 warm-up + 1 timed), 20 validation users,
240 s timeout per run, and only the parameter-server row (--rows 2; "vs 1 process" is
then against itself): every row is a `tfrec train` run of its own processes, about 15 s
for 1 process, 30 s for PS and 35 s for MultiWorkerMirrored on 2 cores, so
`--smoke --rows 0,1,2` runs them all in about 80 s. Same table; the figures mean nothing.
The `tfrec train` runs keep TensorFlow's graph optimizer (bench/_common.py turns it off
only in the smoke run's own processes). Options given explicitly still override these.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args  # noqa: E402

SMOKE = dict(world="tiny", shards=2, batch_size=64, steps_per_epoch=2, epochs=2,
             eval_users=20, timeout=240, rows="2")

ROWS = [
    ("1 process", "default", []),
    ("2 workers (MultiWorkerMirrored)", "local:2", ["--cluster", "local:2"]),
    ("PS: 1 worker + 1 ps", "local:ps=1,workers=1", ["--cluster", "local:ps=1,workers=1"]),
]


def run_row(flags, run_name: str, args, work: str) -> dict:
    """One `tfrec train` run; returns its metrics.json plus wall seconds (or an error)."""
    cmd = [sys.executable, "-m", "tfrec.cli", "train", "--workdir", work,
           "--set", f"train.log_dir={os.path.join(work, 'logs')}",
           "--set", f"data.num_shards={args.shards}", "--batch-size", str(args.batch_size),
           "--steps-per-epoch", str(args.steps_per_epoch), "--epochs", str(args.epochs),
           "--run-name", run_name, "--set", f"train.eval_max_users={args.eval_users}",
           "--set", "train.histogram_freq=0", "--set", "train.early_stopping_patience=1000",
           *flags]
    log_path = os.path.join(work, f"{run_name}.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a failed cluster
            except ProcessLookupError:
                pass
            proc.wait()
    wall = time.perf_counter() - start
    if code != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-1500:]
        reason = "timeout" if code is None else f"exit code {code}"
        print(f"  {run_name} failed ({reason}); log {log_path}:\n{tail}", flush=True)
        return {"error": reason, "wall": wall}
    with open(os.path.join(work, "checkpoints", run_name, "metrics.json")) as f:
        metrics = json.load(f)
    metrics["wall"] = wall
    return metrics


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="small", help="synthetic world preset")
    parser.add_argument("--batch-size", type=int, default=512, help="global batch")
    parser.add_argument("--steps-per-epoch", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=4, help="including 1 warm-up epoch")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all rows round-robin")
    parser.add_argument("--rows", default="0,1,2", help="row indices to run (0 = 1 process)")
    parser.add_argument("--shards", type=int, default=4, help="TFRecord shards per split")
    parser.add_argument("--eval-users", type=int, default=200,
                        help="validation users per epoch (not timed)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--work-dir", help="keep world, TFRecords and runs here")
    args = parse_smoke_args(parser, argv, SMOKE)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is a warm-up)")
    rows = [ROWS[int(i)] for i in args.rows.split(",")]
    start = time.perf_counter()
    work = args.work_dir or tempfile.mkdtemp(prefix="tfrec-distributed-")
    try:
        from tfrec.config import Config
        from tfrec.data.synthetic import generate_world
        from tfrec.training.trainer import ensure_prepared

        cfg = Config()
        cfg.data.data_dir = os.path.join(work, "data")
        cfg.data.tfrecord_dir = os.path.join(work, "tfrecords")
        cfg.data.num_shards = args.shards
        if not os.path.isdir(cfg.data.data_dir):
            generate_world(args.world).save(cfg.data.data_dir)
        meta = ensure_prepared(cfg)
        train_examples = int(meta["counts"]["train"])

        epochs = {label: [] for label, _, _ in rows}
        results = {}
        for r in range(args.rounds):
            for i, (label, _, flags) in enumerate(rows):
                print(f"round {r + 1}/{args.rounds}: {label}", flush=True)
                result = run_row(flags, f"r{r}-{i}", args, work)
                results.setdefault(label, []).append(result)
                if "epoch_seconds" in result:
                    epochs[label] += result["epoch_seconds"][1:]
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    per_epoch = args.batch_size * args.steps_per_epoch
    medians = {label: statistics.median(per_epoch / s for s in times)
               for label, times in epochs.items() if times}
    reference = medians.get(rows[0][0])
    table = []
    for label, spec, _ in rows:
        runs = results[label]
        ok = [r for r in runs if "error" not in r]
        if not ok:
            table.append([label, spec, "-", "-", "-", "-", "-", f"{runs[0]['wall']:.0f}",
                          "failed: " + runs[0]["error"]])
            continue
        speeds = [per_epoch / s for s in epochs[label]]
        workers = ok[0].get("workers", 1)
        local = args.batch_size // workers if spec == "local:2" else args.batch_size
        ratio = (f"{medians[label] / reference:.2f}x" if reference else "-")
        warmup = statistics.median(r["epoch_seconds"][0] for r in ok)
        table.append([label, spec, local, f"{medians[label]:,.0f}", f"{max(speeds):,.0f}",
                      ratio, f"{warmup:.1f}", f"{statistics.median(r['wall'] for r in ok):.0f}",
                      f"{ok[-1]['validation']['recall_at_100']:.3f}"])
    print()
    print(machine_line())
    print(format_table(
        ["setup", "cluster", "batch/step/proc", "ex/s median", "ex/s best", "vs 1 process",
         "epoch 1 s", "wall s", "val R@100"], table,
        title=(f"retrieval training throughput | world {args.world!r}: {train_examples:,} "
               f"training examples | global batch {args.batch_size}, {args.steps_per_epoch} "
               f"steps/epoch, {args.epochs} epochs (epoch 1 excluded) x {args.rounds} "
               f"round(s)")))
    print(f"total wall time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
