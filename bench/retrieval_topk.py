"""Exact top-k over the catalog, as per-epoch validation runs it: NumPy vs tf.math.top_k.

`tfrec train` scores every validation user against the whole catalog at each epoch end
(`tfrec.metrics.retrieval.retrieve_with_scores`, also behind `tfrec evaluate`). The
reference is how it picked each user's top k until 2026-12-04: `np.argpartition` of the
negated scores, then a stable `argsort` of the k picked (one core); tfrec's is
`tf.math.top_k` on the same [chunk, N] score matrices (sorted, both cores). Both run
on the same random embeddings (--users x --dim queries, N x --dim items, k = --k, the
same users-per-matmul chunk as tfrec: 2**25 scores at most), --repeats times each,
alternately; the table prints the median seconds, tfrec's ratio to the reference
measured in the same run, and whether the lists are the same.

Usage: python bench/retrieval_topk.py [--items 5000,100000,1000000] [--users 500]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): 2,000 and 20,000 items, 64
users, one repeat. Same code and table; the figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args, ratio  # noqa: E402
from tfrec.metrics.retrieval import SCORE_BUDGET, retrieve_with_scores  # noqa: E402

SMOKE = dict(items="2000,20000", users=64, repeats=1)


def numpy_topk(queries: np.ndarray, items: np.ndarray, ids: np.ndarray, k: int,
               chunk: int = 1024) -> np.ndarray:
    """The reference: argpartition, then a stable argsort of the k picked, per chunk."""
    chunk = max(1, min(chunk, SCORE_BUDGET // max(1, len(ids))))
    out = []
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ items.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        out.append(ids[np.take_along_axis(top, order, axis=1)])
    return np.concatenate(out, axis=0)


def tfrec_topk(queries: np.ndarray, items: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    return retrieve_with_scores(queries, items, ids, k)[0]


def seconds(fn, *args) -> "tuple[float, np.ndarray]":
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="5000,100000,1000000",
                        help="catalog sizes, comma-separated")
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_smoke_args(parser, argv, SMOKE)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((args.users, args.dim)).astype(np.float32)
    rows = []
    for n in (int(x) for x in args.items.split(",")):
        items = rng.standard_normal((n, args.dim)).astype(np.float32)
        ids = np.asarray([f"I{i:07d}" for i in range(n)], dtype=object)
        tfrec_topk(queries[:8], items, ids, args.k)  # warm-up: TensorFlow's first op
        times = {"numpy": [], "tfrec": []}
        lists = {}
        for _ in range(max(1, args.repeats)):
            for name, fn in (("numpy", numpy_topk), ("tfrec", tfrec_topk)):
                t, lists[name] = seconds(fn, queries, items, ids, args.k)
                times[name].append(t)
        ref, new = statistics.median(times["numpy"]), statistics.median(times["tfrec"])
        same = float(np.mean(lists["numpy"] == lists["tfrec"]))
        rows.append([f"{n:,}", f"{args.users:,}", f"{ref:.3f}", f"{new:.3f}",
                     ratio(ref, new), f"{same:.4f}"])
    print(format_table(
        ["items", "users", "numpy s", "tfrec s", "tfrec speed-up", "same ids"], rows,
        title=f"exact top-{args.k} by dot product, dim {args.dim}, median of "
              f"{args.repeats}\n{machine_line()}"))


if __name__ == "__main__":
    main()
