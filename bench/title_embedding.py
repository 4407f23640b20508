"""Title embedding for search: titles/s of the old and new embedding, and a re-index.

Data: the distinct product titles of ../shared/data/homedepot/queries_dev.csv
(tfrec.data.homedepot), a seeded sample of --titles of them. Encoder: MiniLM
(work/text/minilm, `tfrec text import-minilm`), packed to --title-length tokens as
`tfrec search train` does (SearchConfig.title_length).

Rows, all in this process on the same titles, each timed as the best of --repeats
passes after one warm-up batch:
  * "padded (before)": the batching `title_vectors` used until now: titles sorted by
    length, every batch packed to the full --title-length (SentenceEncoder trim=False).
    The reference of the "vs before" column.
  * "trimmed, by tokens": titles batched by token count, each batch cut to its longest
    title (SentenceEncoder's trim).
  * "+ 2 batches in flight": the same with two batches running at once (workers=2).
  * "+ PRECISION (after)": the same with the encoder's matmuls in --precision (auto:
    bfloat16 on CPUs with native bfloat16, as `tfrec search train` does).
  Each row shows the smallest cosine and the largest difference of its vectors to the
  padded float32 ones.
  * "re-index, N% changed": a TextVectorCache filled with every title, then asked for
    the catalog with --changed percent of the titles edited: only those are embedded.

Run from the repository root:  python bench/title_embedding.py [--titles 4000]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): 96 titles, 1 repeat, a tiny
random BERT (2 layers, hidden 64; written to a temporary directory) instead of MiniLM,
and the synthetic tiny world's titles when the Home Depot file is absent. Same table;
the figures mean nothing. TensorFlow's graph optimizer is off (bench/_common.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import List, Optional, Sequence

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np

from tfrec.data.homedepot import homedepot_path, load_homedepot
from tfrec.text.embedding import (PRECISIONS, SentenceEncoder, TextVectorCache,
                                  resolve_precision)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args, ratio, tiny_bert  # noqa: E402

MINILM = os.path.join("work", "text", "minilm")
TINY = "tiny"
SMOKE = {"titles": 96, "repeats": 1, "encoder": TINY}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None,
                        help="holds homedepot/queries_dev.csv (default ../shared/data)")
    parser.add_argument("--encoder", default=os.path.join(MINILM, "encoder"),
                        help=f'BERT encoder ("{TINY}": a tiny random one built for this run)')
    parser.add_argument("--preprocessor", default=os.path.join(MINILM, "preprocessor"))
    parser.add_argument("--titles", type=int, default=4000, help="titles sampled (0: all)")
    parser.add_argument("--title-length", type=int, default=48, help="packed BERT tokens")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (best shown)")
    parser.add_argument("--changed", type=float, default=1.0,
                        help="percent of titles edited before the re-index")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="the last row's encoder matmuls (auto: bfloat16 where the CPU "
                             "multiplies it natively)")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_smoke_args(parser, argv, SMOKE)
    if args.encoder != TINY:
        for name in ("encoder", "preprocessor"):
            if not os.path.exists(getattr(args, name)):
                parser.error(f"--{name} {getattr(args, name)!r} not found: run `tfrec text "
                             "import-minilm` first")
    return args


def load_titles(args: argparse.Namespace) -> List[str]:
    if os.path.isfile(homedepot_path(args.data_dir)):
        titles = load_homedepot(data_dir=args.data_dir)["title"].astype(str).unique()
    elif args.smoke:  # no shared data: the synthetic world's titles
        from tfrec.data.synthetic import generate_world
        titles = generate_world("tiny", seed=0).catalog["title"].astype(str).unique()
    else:
        raise SystemExit(f"Home Depot judgments not found at {homedepot_path(args.data_dir)!r}")
    rng = np.random.default_rng(args.seed)
    if 0 < args.titles < len(titles):
        titles = titles[np.sort(rng.permutation(len(titles))[:args.titles])]
    return [str(t) for t in titles]


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(args: argparse.Namespace, scratch: str) -> None:
    titles = load_titles(args)
    if args.encoder == TINY:
        args.encoder, args.preprocessor = tiny_bert(os.path.join(scratch, "bert"), titles)
    ordered = sorted(titles, key=len)  # what title_vectors did before trimming
    precision = resolve_precision(args.precision)
    settings = {  # row -> SentenceEncoder arguments, each a step on the one before
        "padded (before)": dict(trim=False, workers=1, precision="float32"),
        "trimmed, by tokens": dict(trim=True, workers=1, precision="float32"),
        "+ 2 batches in flight": dict(trim=True, workers=2, precision="float32"),
        f"+ {precision} (after)": dict(trim=True, workers=2, precision=precision),
    }
    encoders = {name: SentenceEncoder(args.encoder, args.preprocessor,
                                      seq_length=args.title_length,
                                      batch_size=args.batch_size, progress_seconds=0, **kw)
                for name, kw in settings.items()}
    seconds, vectors = {}, {}
    for name, encoder in encoders.items():
        texts = ordered if name == "padded (before)" else titles
        encoder.encode(texts[:args.batch_size])  # warm-up: traces the function
        seconds[name] = best_seconds(lambda: encoder.encode(texts), args.repeats)
        vectors[name] = encoder.encode(titles)
    reference = vectors["padded (before)"]
    before = seconds["padded (before)"]

    cache = TextVectorCache(os.path.join(scratch, "cache"), "bench")
    after = encoders[f"+ {precision} (after)"]
    cache.vectors(titles, after.encode)
    edited = list(titles)
    count = max(1, int(round(len(titles) * args.changed / 100)))
    for i in np.random.default_rng(args.seed + 1).permutation(len(titles))[:count]:
        edited[i] = edited[i] + " (new)"
    start = time.perf_counter()
    cache.vectors(edited, after.encode)
    reindex = time.perf_counter() - start

    n = len(titles)
    rows = [[name, n, f"{s:.2f}", f"{n / s:.0f}", ratio(before, s),
             f"{float(np.min(np.sum(vectors[name] * reference, axis=1))):.6f}",
             f"{float(np.max(np.abs(vectors[name] - reference))):.1e}"]
            for name, s in seconds.items()]
    rows.append([f"re-index, {args.changed:g}% changed", cache.embedded, f"{reindex:.2f}",
                 f"{n / reindex:.0f}", ratio(before, reindex), "", ""])
    print(format_table(
        ["batching", "embedded", "seconds", "titles/s", "vs before", "min cosine",
         "max |diff|"], rows,
        title=f"title embedding | {n} titles, {args.title_length} tokens, batch "
              f"{args.batch_size}, best of {args.repeats} | {args.encoder}\n{machine_line()}"))
    print(f"{after.precision} resolved from --precision {args.precision}; cosine and |diff| "
          "against the padded float32 vectors; titles/s counts every title of the catalog "
          "(the re-index embeds only the changed ones)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="tfrec-bench-titles-")
    try:
        run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
