"""Cost of Unicode text: the shared tokenizer against the ASCII-only path it replaced.

Rows, all in this process on the same texts, best of --repeats passes after a warm-up:
  * "ascii (before)": what TextEncoder and BM25 did until the shared tokenizer (lowercase,
    everything outside [a-z0-9] dropped, whitespace split, "#word#" trigrams). The
    reference of the "vs ascii" column.
  * "unicode (after)": `tfrec.features.tokenize` (UTF-8 repair, NFKC case folding, words of
    any script, CJK characters + bigrams, trigrams per segment).
  * at batch 1 (a served query) and batch 4096 (the tf.data map in training), on English
    titles (Home Depot's when present, else the synthetic world's) and on the Chinese world.
  * "python lists": `tokenize` (what BM25Scorer.fit and vocabulary building call) against
    the old Python-regex `bm25_tokenize`, texts -> lists of str.

Run from the repository root:  python bench/text_tokenize.py [--texts 20000]
Smoke mode (--smoke; tests/test_bench_smoke.py): 256 texts, 1 repeat.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from typing import Callable, List, Sequence

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, ratio  # noqa: E402

from tfrec.data.homedepot import homedepot_path, load_homedepot  # noqa: E402
from tfrec.data.synthetic import generate_world, get_spec  # noqa: E402
from tfrec.features.tokenize import (char_ngrams, normalize_text, segment_tokens,  # noqa: E402
                                     text_segments, tokenize)


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def ascii_path(texts):
    texts = tf.strings.regex_replace(tf.strings.lower(texts), r"[^a-z0-9 ]+", " ")
    tokens = tf.strings.split(texts)[:, :32]
    chars = tf.strings.unicode_split(tf.strings.join(["#", tokens, "#"]), "UTF-8")
    grams = tf.strings.ngrams(chars, 3, separator="").merge_dims(1, 2)
    return tokens.to_tensor(), grams.to_tensor()


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def unicode_path(texts):
    segments = text_segments(normalize_text(texts))
    tokens = segment_tokens(segments)[:, :32]
    grams = char_ngrams(segments[:, :32])
    return tokens.to_tensor(), grams.to_tensor()


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def per_text_us(path, texts: np.ndarray, batch: int, repeats: int) -> float:
    batches = [tf.constant(texts[i:i + batch]) for i in range(0, len(texts), batch)]
    if batch == 1:
        batches = batches[:500]

    def run():
        for b in batches:
            path(b)
    return best_seconds(run, repeats) / sum(int(b.shape[0]) for b in batches) * 1e6


def python_regex(texts: Sequence[str]) -> List[List[str]]:
    token = re.compile(r"[a-z0-9]+")
    return [token.findall(t.lower()) for t in texts]


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.texts, args.repeats = 256, 1
    rng = np.random.default_rng(0)
    corpora = {}
    path = homedepot_path()
    if os.path.isfile(path) and not args.smoke:
        titles = load_homedepot(path).drop_duplicates("product_id")["title"].astype(str)
        corpora["Home Depot titles"] = titles.to_numpy(object)
    else:
        corpora["synthetic titles (en)"] = generate_world("tiny", 1).catalog["title"].to_numpy(object)
    zh = generate_world(dataclasses.replace(get_spec("tiny" if args.smoke else "small"),
                                            lang="zh"), 1)
    corpora["synthetic titles (zh)"] = zh.catalog["title"].to_numpy(object)
    print(machine_line())
    rows = []
    for name, texts in corpora.items():
        texts = texts[rng.permutation(len(texts))[:args.texts]]
        for batch in (1, 4096):
            before = per_text_us(ascii_path, texts, batch, args.repeats)
            after = per_text_us(unicode_path, texts, batch, args.repeats)
            rows.append([f"{name}, batch {batch}", len(texts), f"{before:.1f}", f"{after:.1f}",
                         ratio(after, before)])
        listed = [str(t) for t in texts]
        before = best_seconds(lambda: python_regex(listed), args.repeats)
        after = best_seconds(lambda: tokenize(listed), args.repeats)
        rows.append([f"{name}, python lists", len(texts),
                     f"{before / len(texts) * 1e6:.1f}", f"{after / len(texts) * 1e6:.1f}",
                     ratio(after, before)])
    print(format_table(["texts", "n", "ascii us/text", "unicode us/text", "vs ascii"], rows,
                       title="Tokenisation cost (lower is better)"))


if __name__ == "__main__":
    main()
