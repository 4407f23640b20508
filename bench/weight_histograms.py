"""Per-epoch weight histograms for TensorBoard: Keras' way vs tfrec's, by table size.

`tfrec train` writes a histogram of every weight each epoch (`train.histogram_freq`).
Keras' TensorBoard callback buckets every value with eager TensorFlow ops
(`tf.summary.histogram`: a [values x 30] one-hot), so its cost and memory grow with the
catalog; `tfrec.training.histograms` reads each weight once, buckets at most 65,536 of
its values (evenly spaced rows of a large table) in NumPy and writes the same summary.
For each item-table size (rows x --dim float32, plus the 5 small dense weights of a
tower), both write one epoch's histograms into a fresh log directory, --repeats times each,
tfrec's first; the table prints the median seconds, how far each raised the process's
peak memory (max RSS; 0 when it stayed under the peak of what ran before it), and
tfrec's time as a ratio of Keras' measured in the same run.

Usage: python bench/weight_histograms.py [--rows 5000,100000,1000000] [--dim 64]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): tables of 1,000 and 20,000
rows, one repeat. Same code and table; the figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args  # noqa: E402
from tfrec.training.histograms import write_weight_histograms  # noqa: E402

SMOKE = dict(rows="1000,20000", repeats=1)


def keras_histograms(weights) -> None:
    """What tf_keras' TensorBoard callback does per weight (`_log_weights`)."""
    for weight in weights:
        tf.summary.histogram(weight.name.replace(":", "_") + "/histogram", weight, step=0)


def tfrec_histograms(weights) -> None:
    write_weight_histograms(weights, step=0)


def timed(fn, weights) -> float:
    """Seconds of one epoch's histograms, written and flushed to a new log directory."""
    with tempfile.TemporaryDirectory() as logdir:
        writer = tf.summary.create_file_writer(logdir)
        start = time.perf_counter()
        with writer.as_default(), tf.summary.record_if(True):
            fn(weights)
        writer.flush()
        seconds = time.perf_counter() - start
        writer.close()
    return seconds


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="5000,100000,1000000",
                        help="item-table sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_smoke_args(parser, argv, SMOKE)
    print(machine_line())
    rng = np.random.default_rng(0)
    dense = [tf.Variable(rng.normal(size=shape).astype(np.float32), name=name)
             for name, shape in [("hidden/kernel", [304, 128]), ("hidden/bias", [128]),
                                 ("out/kernel", [128, args.dim]), ("out/bias", [args.dim]),
                                 ("norm/gamma", [args.dim])]]
    rows = []
    for n in [int(r) for r in args.rows.split(",") if r.strip()]:
        table = tf.Variable(rng.normal(size=[n, args.dim]).astype(np.float32),
                            name="item_embeddings")
        weights = [table] + dense
        timed(tfrec_histograms, weights)  # warm-up: first eager calls of each op
        seconds = {"tfrec": [], "keras": []}
        growth = {}
        for name, fn in (("tfrec", tfrec_histograms), ("keras", keras_histograms)):
            before = max_rss_mb()
            for _ in range(max(1, args.repeats)):
                seconds[name].append(timed(fn, weights))
            growth[name] = max_rss_mb() - before  # tfrec first: Keras' peak is not its
        keras, ours = np.median(seconds["keras"]), np.median(seconds["tfrec"])
        rows.append([f"{n:,} x {args.dim}", f"{keras:.3f}", f"{ours:.4f}",
                     f"{ours / keras:.4f}x", f"{growth['keras']:.0f}",
                     f"{growth['tfrec']:.0f}"])
        del table, weights
    print()
    print(format_table(
        ["item table", "keras s", "tfrec s", "tfrec vs keras", "keras RSS growth MB",
         "tfrec RSS growth MB"], rows,
        title=f"one epoch's weight histograms (item table + 5 dense weights), median of "
              f"{args.repeats}"))


if __name__ == "__main__":
    main()
