"""Indexing large product tables with `tfrec search index`: time and peak memory by size.

Protocol (bench/README.md, "Indexing a large catalog"):
  run        one `tfrec search train` on the synthetic world's search log (tiny random
             BERT, 1 epoch each: the weights do not matter here, the code path does).
  tables     synthetic product tables of --sizes products (seeded): brand, 3-8 words of
             the world's titles with Chinese and accented words mixed in, and a model
             number, so titles are distinct like a real catalog's; brand/category columns.
  index      `tfrec search index --run RUN --catalog TABLE` as its own process per size
             (peak memory = that process's max RSS, from wait4), each into a fresh cache,
             so every title is embedded; then the largest table again with --changed of
             its titles edited (only those are embedded; the rest come from the cache).
  serve      the exported SavedModel of each size loaded in a fresh process: load
             seconds and the median latency of single queries (product titles).
Key figures are ratios against the smallest size in the same run: seconds per product
and peak memory above the smallest run's, per product. The tiny BERT's title vectors
are 64 wide; MiniLM's are 384, which adds (384 - 64) * 4 bytes * ~3 copies per product.

Run from the repository root:

    python bench/catalog_index.py [--sizes 10000,100000,1000000] [--changed 0.01]
        [--index auto|ivf|exact] [--compare-exact]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): one table of 300 products, no
re-index, 2 queries. Same protocol and table; the figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (dir_mb, format_table, machine_line, parse_smoke_args, ratio,  # noqa: E402
                     run_child, tiny_bert)

SMOKE = dict(sizes="300", changed=0.0, queries=2)
EXTRA_WORDS = ["café", "crème", "dorée", "Fußmatte", "niño", "手机壳", "新品", "不锈钢", "保温杯",
               "蓝牙耳机"]
# Loads an export in a fresh process and times single queries (TF Text ops first).
SERVE = """
import json, sys, time
import tensorflow_text, tensorflow as tf
start = time.perf_counter()
model = tf.saved_model.load(sys.argv[1])
load = time.perf_counter() - start
fn = model.signatures["serving_default"]
queries = json.loads(sys.argv[2])
fn(query=tf.constant([queries[0][0]]))  # first call: tracing
times, found = [], 0
for q, want in queries:
    start = time.perf_counter()
    out = fn(query=tf.constant([q]))
    times.append(time.perf_counter() - start)
    found += want.encode() in out["product_ids"].numpy()[0].tolist()
print(json.dumps({"load_s": load, "p50_ms": 1000 * sorted(times)[len(times) // 2],
                  "found": found}))
"""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="products per table")
    p.add_argument("--changed", type=float, default=0.01,
                   help="share of the largest table's titles edited for the re-index")
    p.add_argument("--queries", type=int, default=20, help="single queries per export")
    p.add_argument("--workdir", default=None,
                   help="a new or empty directory, kept after (default: a temp dir, "
                        "removed after)")
    p.add_argument("--index", default="auto", choices=("exact", "ivf", "auto"),
                   help="`search index --index` (auto: IVF from 100,000 products)")
    p.add_argument("--compare-exact", action="store_true",
                   help="also re-index each table with --index exact (titles from the "
                        "cache) and time both exports' queries: 'vs exact' column")
    args = parse_smoke_args(p, argv, SMOKE)
    # The run, its tiny BERT and the exports are written afresh: a used directory would
    # mix two runs' files (and the encoder refuses to overwrite itself).
    if args.workdir and os.path.isdir(args.workdir) and os.listdir(args.workdir):
        p.error(f"--workdir {args.workdir} is not empty (it holds an earlier run): give a "
                "new or empty directory")
    return args


def product_table(size: int, words: Sequence[str], seed: int) -> pd.DataFrame:
    """`size` products: brand, 3-8 words, a model number; brand and category columns."""
    rng = np.random.default_rng(seed)
    words = np.asarray(list(words) + EXTRA_WORDS, dtype=object)
    brands = np.asarray([f"brand{i}" for i in range(200)], dtype=object)
    counts = rng.integers(3, 9, size)
    picks = rng.integers(0, len(words), counts.sum())
    bounds = np.concatenate([[0], np.cumsum(counts)])
    brand = brands[rng.integers(0, len(brands), size)]
    titles = [f"{brand[i]} {' '.join(words[picks[bounds[i]:bounds[i + 1]]])} m{i:07d}"
              for i in range(size)]
    return pd.DataFrame({"product_id": [f"p{i:07d}" for i in range(size)], "title": titles,
                         "brand": brand,
                         "category": [f"cat{c}" for c in rng.integers(0, 50, size)]})


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    workdir = args.workdir or tempfile.mkdtemp(prefix="tfrec-catalog-index-")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    tfrec = [sys.executable, "-m", "tfrec"]
    try:
        from tfrec.data.synthetic import generate_world
        from tfrec.search.data import judgments_from_events

        world = generate_world("tiny", seed=42)
        judgments = judgments_from_events(world.events, world.catalog)
        titles = world.catalog["title"].astype(str).tolist()
        words = sorted({w for t in titles for w in t.split()})
        encoder, preprocessor = tiny_bert(os.path.join(workdir, "tiny_bert"),
                                          titles + judgments["query"].unique().tolist()
                                          + EXTRA_WORDS)
        run = os.path.join(workdir, "run")
        trained = run_child(tfrec + [
            "search", "train", "--judgments", "synthetic:tiny", "--workdir", run,
            "--set", f"encoder={encoder}", "--set", f"preprocessor={preprocessor}",
            "--set", "epochs=1", "--set", "ranker_epochs=1",
            "--set", "ranker_folds=0",  # what is measured is indexing, not the ranker
            "--no-export"], env)
        print(f"trained the search run in {trained['seconds']:.0f} s", flush=True)
        rows, measured = [], []
        plan = [(n, 0.0, index) for n in sizes for index in
                ([args.index, "exact"] if args.compare_exact else [args.index])]
        plan += [(sizes[-1], args.changed, args.index)] if args.changed else []
        for size, changed, index in plan:
            table = product_table(size, words, seed=size)
            if changed:
                edit = np.random.default_rng(1).permutation(size)[:int(round(changed * size))]
                table.loc[edit, "title"] = table.loc[edit, "title"] + " v2"
            path = os.path.join(workdir, f"products_{size}{'_edited' if changed else ''}.parquet")
            table.to_parquet(path, index=False)
            cache = os.path.join(workdir, "cache", str(size))
            second = index != args.index  # the exact twin of a table indexed just before
            if not changed and not second:
                shutil.rmtree(cache, ignore_errors=True)
            export = os.path.join(workdir, "export")
            name = f"{size}_{index}"
            # Its own cache per size (the first pass embeds every title); the edited table
            # and the exact twin reuse the cache of its size, filled by the first pass.
            m = run_child(tfrec + ["search", "index", "--run", run, "--catalog", path,
                                      "--export-base", export, "--model-name", name,
                                      "--index", index, "--cache-dir", cache], env)
            version = os.path.join(export, name, sorted(
                os.listdir(os.path.join(export, name)), key=int)[-1])
            with open(os.path.join(version, "assets.extra", "tfrec_model.json")) as f:
                card = json.load(f)["retrieval_index"]
            rng = np.random.default_rng(7)
            picks = rng.integers(0, size, args.queries)
            queries = [[table["title"].iloc[i], table["product_id"].iloc[i]] for i in picks]
            served = json.loads(run_child(
                [sys.executable, "-c", SERVE, version, json.dumps(queries)], env)
                ["stdout"].strip().splitlines()[-1])
            m.update(size=size, changed=changed, model_mb=dir_mb(version), twin=second,
                     index=(f"ivf {card['nlist']}/{card['nprobe']}"
                            if card["index"] == "ivf" else "exact"), **served)
            measured.append(m)
            print(f"{size:,} products{' (re-index)' if changed else ''}, {m['index']}: "
                  f"{m['seconds']:.1f} s, peak {m['peak_mb']:.0f} MB, query p50 "
                  f"{m['p50_ms']:.1f} ms", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    ref = measured[0]
    exact_ms = {m["size"]: m["p50_ms"] for m in measured if m["index"] == "exact"}
    for m in measured:
        per_s = m["seconds"] / m["size"]
        extra = (m["peak_mb"] - ref["peak_mb"]) * 2**20 / max(m["size"] - ref["size"], 1)
        label = (f" ({m['changed']:.0%} edited)" if m["changed"] else
                 " (exact twin, cached titles)" if m["twin"] else "")
        rows.append([f"{m['size']:,}" + label, m["index"],
                     f"{m['seconds']:.1f}", f"{m['size'] / m['seconds']:,.0f}",
                     ratio(per_s, ref["seconds"] / ref["size"]),
                     f"{m['peak_mb']:,.0f}",
                     "-" if m["size"] == ref["size"] else f"{extra:,.0f}",
                     f"{m['model_mb']:,.0f}", f"{m['load_s']:.1f}", f"{m['p50_ms']:.1f}",
                     ratio(exact_ms[m["size"]], m["p50_ms"]) if m["size"] in exact_ms else "-",
                     f"{m['found']}/{args.queries}"])
    print()
    print(machine_line())
    print(format_table(
        ["catalog", "dense top-k", "index s", "products/s", "s/product vs smallest",
         "peak MB", "bytes/product above smallest", "export MB", "load s", "query p50 ms",
         "speed vs exact", "own title top-10"], rows,
        title="tfrec search index: a fresh process per table (tiny BERT, 64-wide vectors)"))
    print("peak MB: max RSS of the `tfrec search index` process; index s: its wall time "
          "(start-up, reading, embedding, BM25, export); a re-index embeds only edited titles")
    print("dense top-k: exact, or ivf lists/nprobe; speed vs exact: the exact export's "
          "query p50 / this one's, same table (--compare-exact)")


if __name__ == "__main__":
    main()
