"""Home Depot full-catalog search: BM25 vs MiniLM zero-shot vs two-tower vs hybrid vs ranker.

Protocol (bench/README.md, "Home Depot full-catalog search"):
  catalog    every distinct product (product_uid, first title) in
             ../shared/data/homedepot/queries_dev.csv (41,127 products).
  split      distinct queries, seeded, 70/10/20 train/validation/test
             (tfrec.data.homedepot.split_by_query); one run per seed (--seeds).
  metrics    each test query ranks the WHOLE catalog (tfrec.search.metrics):
             NDCG@10 with gain = relevance - 1 (unjudged products gain 0),
             Recall@100 of products graded >= 2.0, MRR of the first product graded
             >= 2.5; each averaged over the test queries with such a product.
Rows (one tfrec.search.pipeline.SearchPipeline per seed; same code path as the
exported model):
  BM25, plain terms    Okapi BM25 over titles (k1 1.2, b 0.75, the shared Unicode tokens:
                       `lexical_analyzer` "plain"), in-graph
                       (tfrec.features.lexical.LexicalIndex), query as typed: the BM25
                       of every tfrec before the "light" analyzer.
  BM25, as typed       the same with the run's analyzer (default "light": letter/digit
                       runs split, plural suffixes folded), query as typed.
  BM25 + speller       the same, the query speller's corrections added to the query
                       (tfrec.features.speller; what the pipeline's BM25 stage runs). The
                       "vs BM25" columns are against this row.
  BM25 + speller, no compounds
                       the same speller without compound splits and joins ("lawnmower"
                       -> "lawn mower", "out door" -> "outdoor"): a paired reference.
  MiniLM zero-shot     cosine of mean-pooled all-MiniLM-L6-v2 embeddings: the untrained
                       two-tower (its learned residuals start at zero).
  two-tower            query tower = MiniLM fine-tuned on the train queries' graded
                       judgments (graded multi-positive softmax, catalog negatives),
                       product tower = frozen MiniLM title vector + learned residual from
                       title words; epoch picked on validation.
  hybrid               catalog-z-scored fusion (1 - w) two-tower + w BM25, w picked from
                       0-0.5 by validation NDCG@10 after the two-tower trains.
  two-tower+ranker     union of the two-tower and BM25 top-100 lists re-scored by the
                       DCN ranker (BERT query / product vectors, BM25, coverage,
                       retrieval scores and ranks), trained on the validation queries'
                       lists (20% of them held out to pick its epoch) and on every
                       train query's list from a two-tower that did not train on it
                       (`ranker_folds` 2: two more two-towers, each on half the train
                       queries).
                       Past the ranker's first 20 results, pseudo-relevance feedback
                       (tfrec.search.feedback): ranker z-score + w x cosine to the mean
                       two-tower vector of the 10 best hybrid candidates; and up to 50
                       more products retrieved by the query vector moved to that mean,
                       ranked with the rest. The weight and the number of extra
                       products are picked from `feedback_weights` x `feedback_extras`
                       by validation Recall@100 after the ranker trains.
  two-tower+ranker, validation lists only
                       the same pipeline's ranker retrained on the validation lists alone
                       (the ranker before `ranker_folds`, with the run's feedback weight):
                       a paired reference.
  two-tower+ranker, no feedback
                       the final pipeline with feedback weight 0 and no extra products
                       (the ranker's order of the two retrievers' union): a paired
                       reference.
  two-tower+ranker, no feedback products
                       the final pipeline with its feedback weight but no extra
                       products: what the feedback query's products add.
"train s": two-tower fine-tuning (+ the fold two-towers and the ranker on its row); the
shared MiniLM title embedding of the catalog (once per run) is printed separately.
"ms/query": batch-1 latency of that stage on the CPU (median over --latency-queries test
queries, in-process tf.function); the last seed's pipeline is also exported and its
SavedModel timed.

Run from the repository root (needs `tfrec text import-minilm`, i.e. work/text/minilm):

    python bench/homedepot_search.py [--seeds 0,1,2] [--workdir work/bench-homedepot]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the judgments of the first 200
distinct queries of the file (--queries; catalog = their products), one seed (0), 1
two-tower epoch, 1 ranker epoch, 5 latency queries, no export (--no-export: about 8 s;
tests/test_search.py covers export_search), and a tiny random BERT (2 layers, hidden 64,
vocabulary from the slice's titles and queries; written to the work dir) instead of
MiniLM, so work/text/minilm is not needed. Same pipeline and table; the figures mean
nothing. Without the Home Depot file under the data dir, a smoke run prints "skipped:
..." and exits 0. TensorFlow's graph optimizer is off (bench/_common.py). Options given
explicitly still override these.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, Optional, Sequence

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np
import tensorflow as tf

from tfrec.data.homedepot import homedepot_path
from tfrec.features.lexical import LexicalIndex
from tfrec.features.speller import speller_from_texts
from tfrec.search.config import SearchConfig
from tfrec.search.distill import batch1_latency_ms
from tfrec.search.index import index_pipeline
from tfrec.search.metrics import catalog_search_metrics, query_gains
from tfrec.search.train import evaluate_stages, load_search_data, train_ranker, train_search

tf.get_logger().setLevel("ERROR")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (first_queries, format_table, machine_line, parse_smoke_args,  # noqa: E402
                     ratio, skip, tiny_bert)

# encoder "tiny": a tiny random BERT built into the work dir (see tiny_bert).
SMOKE = dict(seeds="0", queries=200, epochs=1, ranker_epochs=1, latency_queries=5,
             export=False, encoder="tiny")

ROWS = (("BM25, plain terms, as typed", "bm25_plain"), ("BM25, as typed", "bm25_as_typed"),
        ("BM25 + speller, no compounds", "bm25_no_compounds"), ("BM25 + speller", "bm25"),
        ("MiniLM zero-shot", "minilm_zero_shot"), ("two-tower", "two_tower"),
        ("hybrid (two-tower + BM25)", "hybrid"),
        ("two-tower+ranker, validation lists only", "two_tower+ranker (val lists)"),
        ("two-tower+ranker, no feedback", "two_tower+ranker (no feedback)"),
        ("two-tower+ranker, no feedback products", "two_tower+ranker (no feedback products)"),
        ("two-tower+ranker", "two_tower+ranker"))
IVF_ROWS = (("two-tower, IVF", "two_tower (ivf)"),
            ("two-tower+ranker, IVF", "two_tower+ranker (ivf)"))
METRICS = ("ndcg@10", "recall@100", "mrr")
FINAL = "two_tower+ranker"
# Paired reference rows timed as the stage whose graph they share (about the same work).
LATENCY_OF = {"bm25_no_compounds": "bm25"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="query-split seeds, comma separated")
    p.add_argument("--workdir", default=None,
                   help="keeps the title-vector cache between runs (default: a temp dir, "
                        "so the timed run embeds the catalog once)")
    p.add_argument("--data-dir", default=None, help="real-data dir (default ../shared/data)")
    p.add_argument("--epochs", type=int, default=SearchConfig.epochs)
    p.add_argument("--ranker-epochs", type=int, default=SearchConfig.ranker_epochs)
    p.add_argument("--latency-queries", type=int, default=50)
    p.add_argument("--queries", type=int, default=0,
                   help="use only the judgments of the first N distinct queries of the "
                        "file (0: all)")
    p.add_argument("--encoder", default=SearchConfig.encoder,
                   help="BERT encoder (\"tiny\": build a tiny random one in the work dir, "
                        "with its own preprocessor)")
    p.add_argument("--preprocessor", default=SearchConfig.preprocessor)
    p.add_argument("--no-export", dest="export", action="store_false",
                   help="skip exporting the last seed's pipeline and timing the SavedModel")
    p.add_argument("--ivf", action="store_true",
                   help="also measure the served stages through an IVF index over the same "
                        "trained pipeline (what `tfrec search index --index ivf` serves; "
                        "nprobe tuned on the validation queries), paired with exact search")
    return parse_smoke_args(p, argv, SMOKE)


def stage_latency(run, queries: Sequence[str], plain: LexicalIndex) -> Dict[str, float]:
    """Median batch-1 ms per query of each stage (tf.functions, after a warm-up); `plain`:
    the catalog's BM25 over plain terms (`bm25_plain`)."""
    pipe = run.pipeline
    spec = [tf.TensorSpec([None], tf.string)]
    fns = {
        "bm25_plain": tf.function(lambda q: tf.math.top_k(plain(pipe.clean_queries(q)), 100),
                                  input_signature=spec),
        "bm25_as_typed": tf.function(
            lambda q: tf.math.top_k(pipe.lexical(pipe.clean_queries(q)), 100),
            input_signature=spec),
        "bm25": tf.function(lambda q: tf.math.top_k(pipe.lexical(tf.strings.join(
            [pipe.clean_queries(q), pipe.corrections(q)], separator=" ")), 100),
            input_signature=spec),
        "two_tower": tf.function(lambda q: tf.math.top_k(tf.matmul(
            pipe.two_tower.query_vectors(pipe.clean_queries(q)), pipe.product_vectors,
            transpose_b=True), 100), input_signature=spec),
        "hybrid": tf.function(lambda q: tf.math.top_k(pipe.catalog_scores(q)["hybrid"], 100),
                              input_signature=spec),
        "two_tower+ranker": tf.function(lambda q: pipe.search(q, 10), input_signature=spec),
    }
    out = batch1_latency_ms(fns, queries)
    out["minilm_zero_shot"] = out["two_tower"]  # same computation, other weights
    return out


def exported_latency(run, queries: Sequence[str], base: str) -> float:
    """Median batch-1 ms of the exported search SavedModel (loaded back in this process)."""
    from tfrec.search.export import export_search
    path = export_search(run.pipeline, base)
    fn = tf.saved_model.load(path).signatures["serving_default"]
    fn(query=tf.constant(queries[:1]))
    times = []
    for q in queries:
        start = time.perf_counter()
        fn(query=tf.constant([q]))
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def ivf_stages(run, cfg: SearchConfig, queries: Sequence[str],
               latency: Dict[str, float]) -> Dict:
    """Test metrics and batch-1 ms of the two-tower and the final stage through an IVF
    index over the trained pipeline (keys "<stage> (ivf)"); the pipeline is exact again
    afterwards. Returns the index card."""
    pipe = run.pipeline
    card = index_pipeline(pipe, dataclasses.replace(cfg, index="ivf"), pipe.tuning_queries)
    try:
        for stage, m in evaluate_stages(pipe, run.data.splits["test"], run.data.row_of,
                                        ("two_tower", "two_tower+ranker")).items():
            run.metrics[f"{stage} (ivf)"] = m.summary()
        spec = [tf.TensorSpec([None], tf.string)]
        latency.update({f"{k} (ivf)": v for k, v in batch1_latency_ms({
            "two_tower": tf.function(lambda q: pipe.retrieve(q)["rows"][:, :pipe.candidates],
                                     input_signature=spec),
            "two_tower+ranker": tf.function(lambda q: pipe.search(q, 10),
                                            input_signature=spec)}, queries).items()})
    finally:
        pipe.set_index(None)
    return card


def val_lists_ranker(run, cfg: SearchConfig) -> Dict[str, float]:
    """Test metrics of a ranker trained on the validation lists only (as before
    `ranker_folds`), on the same two-tower: the paired reference of the final row. The
    run's own ranker is put back afterwards."""
    ranker = run.pipeline.ranker
    try:
        start = time.perf_counter()
        train_ranker(run.pipeline, cfg, run.data)  # no extra lists
        run.timings["ranker_val_lists_s"] = time.perf_counter() - start
        return evaluate_stages(run.pipeline, run.data.splits["test"], run.data.row_of,
                               ("two_tower+ranker",))["two_tower+ranker"].summary()
    finally:
        run.pipeline.ranker = ranker


def without_feedback(run, weight: bool = True) -> Dict[str, float]:
    """Test metrics of the final stage without the feedback's extra products and, with
    `weight`, with feedback weight 0 (the ranker's order all the way down), on the same
    pipeline: the paired references of the feedback."""
    with run.pipeline.feedback_settings(extra=0, weight=0.0 if weight else None):
        return evaluate_stages(run.pipeline, run.data.splits["test"], run.data.row_of,
                               ("two_tower+ranker",))["two_tower+ranker"].summary()


def bm25_as_typed(run) -> Dict[str, float]:
    """Test metrics of the BM25 stage with the speller detached (queries as typed)."""
    speller, run.pipeline.speller = run.pipeline.speller, None
    try:
        return evaluate_stages(run.pipeline, run.data.splits["test"], run.data.row_of,
                               ("bm25",))["bm25"].summary()
    finally:
        run.pipeline.speller = speller


def bm25_no_compounds(run) -> Dict[str, float]:
    """Test metrics of the BM25 stage with the run's speller rebuilt without compounds."""
    speller = run.pipeline.speller
    run.pipeline.speller = speller_from_texts(
        run.data.catalog["title"].tolist(), speller.logged_queries,
        dataclasses.replace(speller.options, compounds=False))[0]
    try:
        return evaluate_stages(run.pipeline, run.data.splits["test"], run.data.row_of,
                               ("bm25",))["bm25"].summary()
    finally:
        run.pipeline.speller = speller


def bm25_plain(run, index: LexicalIndex) -> Dict[str, float]:
    """Test metrics of BM25 over the shared tokens (`index`: the catalog with the "plain"
    analyzer), queries as typed: what the run's analyzer is measured against."""
    test = run.data.splits["test"]
    queries = sorted(test["query"].unique())
    top = [tf.math.top_k(index(tf.constant(queries[i:i + 64])), 100).indices.numpy()
           for i in range(0, len(queries), 64)]
    return catalog_search_metrics(np.concatenate(top),
                                  query_gains(test, run.data.row_of, queries)).summary()


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.smoke and not os.path.isfile(homedepot_path(args.data_dir)):
        skip(f"Home Depot judgments not found at {homedepot_path(args.data_dir)!r} (pass "
             "--data-dir or set TFREC_DATA_DIR)")
    wall = time.perf_counter()
    workdir = args.workdir or tempfile.mkdtemp(prefix="tfrec-homedepot-")
    runs, latencies, ivf_cards = [], [], []
    exported_ms, tiny = None, None
    for i, seed in enumerate(seeds):
        cfg = SearchConfig(seed=seed, epochs=args.epochs, data_dir=args.data_dir,
                           ranker_epochs=args.ranker_epochs, encoder=args.encoder,
                           preprocessor=args.preprocessor)
        data = first_queries(cfg, args.queries) if args.queries else load_search_data(cfg)
        if args.encoder == "tiny":  # one for every seed (same judgments, other split)
            if not tiny:
                texts = (data.catalog["title"].tolist()
                         + data.judgments["query"].unique().tolist())
                tiny = tiny_bert(os.path.join(workdir, "tiny_bert"), texts)
            cfg.encoder, cfg.preprocessor = tiny
        run = train_search(cfg, workdir, data=data, zero_shot=True,
                           log_dir=os.path.join(workdir, "tensorboard_logs", f"seed{seed}"))
        run.metrics["bm25_as_typed"] = bm25_as_typed(run)
        if run.pipeline.speller is not None and run.pipeline.speller.options.compounds:
            run.metrics["bm25_no_compounds"] = bm25_no_compounds(run)
        # One plain-terms index per seed, for the metrics row and its latency.
        plain = LexicalIndex(data.catalog["title"].tolist(), analyzer="plain")
        run.metrics["bm25_plain"] = bm25_plain(run, plain)
        if cfg.ranker_folds:
            run.metrics["two_tower+ranker (val lists)"] = val_lists_ranker(run, cfg)
        run.metrics["two_tower+ranker (no feedback)"] = without_feedback(run)
        run.metrics["two_tower+ranker (no feedback products)"] = without_feedback(
            run, weight=False)
        runs.append(run)
        queries = sorted(data.splits["test"]["query"].unique())[:args.latency_queries]
        latencies.append(stage_latency(run, queries, plain))
        if args.ivf:
            ivf_cards.append(ivf_stages(run, cfg, queries, latencies[-1]))
        if args.export and i == len(seeds) - 1:
            exported_ms = exported_latency(run, queries, os.path.join(workdir, "export"))
        print(f"seed {seed}: " + ", ".join(f"{k} ndcg@10 {v['ndcg@10']:.4f}"
                                            for k, v in run.metrics.items())
              + f" | {run.timings['total_s']:.0f} s", flush=True)
    data = runs[0].data
    print()
    print(machine_line())
    print(f"catalog {len(data.catalog):,} products, {data.judgments['query'].nunique():,} "
          f"queries; test queries per seed: "
          + ", ".join(str(r.metrics["bm25"]["queries"]) for r in runs)
          + f"; seeds {seeds}")
    reference = {m: np.mean([r.metrics["bm25"][m] for r in runs]) for m in METRICS}
    rows = []
    for label, key in ROWS + (IVF_ROWS if args.ivf else ()):
        if not all(key in r.metrics for r in runs):  # e.g. ranker_folds 0: no paired row
            continue
        values = {m: np.array([r.metrics[key][m] for r in runs]) for m in METRICS}
        ranker_s = ("ranker_val_lists_s",) if "(val lists)" in key else (
            "ranker_s", "ranker_folds_s", "feedback_s")  # folds: the ranker's cost
        train = [r.timings["two_tower_s"] + (sum(r.timings.get(k, 0.0) for k in ranker_s)
                                             if "ranker" in key else 0)
                 for r in runs] if key not in ("bm25", "bm25_as_typed", "bm25_plain",
                                               "bm25_no_compounds", "minilm_zero_shot") \
            else [0.0]
        # The paired ranker has the final stage's graph: its latency.
        ms = np.median([lat.get(LATENCY_OF.get(key, key), lat[FINAL]) for lat in latencies])
        rows.append([label] + [f"{values[m].mean():.4f} ± {values[m].std():.4f}"
                               for m in METRICS]
                    + [ratio(values["ndcg@10"].mean(), reference["ndcg@10"]),
                       ratio(values["recall@100"].mean(), reference["recall@100"]),
                       f"{np.mean(train):.0f}",
                       f"{ms:.1f}"])
    print(format_table(["model", "NDCG@10", "Recall@100", "MRR", "NDCG vs BM25",
                        "R@100 vs BM25", "train s", "ms/query"], rows,
                       title="Home Depot full-catalog search, test queries "
                             "(mean ± sd over seeds)"))
    gains = [[r.metrics["two_tower+ranker"][m] - r.metrics["bm25"][m] for r in runs]
             for m in METRICS]
    print("two-tower+ranker minus BM25 per seed: " + "; ".join(
        f"{m} " + ", ".join(f"{g:+.4f}" for g in gain) for m, gain in zip(METRICS, gains)))
    paired = "two_tower+ranker (val lists)"
    if all(paired in r.metrics for r in runs):
        diffs = [[r.metrics["two_tower+ranker"][m] - r.metrics[paired][m] for r in runs]
                 for m in METRICS]
        print("ranker with cross-fitted training-query lists minus validation lists only, "
              "per seed: " + "; ".join(f"{m} " + ", ".join(f"{d:+.4f}" for d in diff)
                                       for m, diff in zip(METRICS, diffs)))
    unfed = "two_tower+ranker (no feedback)"
    print("feedback weight / extra products picked on validation per seed: " + ", ".join(
        f"{r.pipeline.feedback_weight:g} / {r.pipeline.feedback_extra}" for r in runs)
        + "; with minus without, per seed: "
        + "; ".join(f"{m} " + ", ".join(
            f"{r.metrics[FINAL][m] - r.metrics[unfed][m]:+.4f}" for r in runs)
            for m in METRICS))
    for seed, card in zip(seeds, ivf_cards):
        print(f"IVF seed {seed}: {card['nlist']} lists, nprobe {card['nprobe']}, recall@100 "
              f"vs exact {card['recall_vs_exact']['recall@100']:.3f} on "
              f"{card['recall_vs_exact']['queries']} {card['recall_vs_exact']['source']}, "
              f"built in {card['build_seconds']:.1f} s")
    if args.ivf:
        print("IVF minus exact per seed: " + "; ".join(
            f"{stage} ndcg@10 " + ", ".join(
                f"{r.metrics[stage + ' (ivf)']['ndcg@10'] - r.metrics[stage]['ndcg@10']:+.4f}"
                for r in runs) for stage in ("two_tower", "two_tower+ranker")))
    if tiny:
        print("BERT: a tiny random encoder (--encoder tiny) stands in for MiniLM (the rows "
              "named MiniLM use it)")
    print(f"title embedding ({'tiny BERT' if tiny else 'MiniLM'}, {len(data.catalog):,} "
          "titles, once per run): "
          f"{runs[0].timings['title_vectors_s']:.0f} s")
    if exported_ms is not None:
        print(f"exported search SavedModel, batch 1: {exported_ms:.1f} ms/query (median)")
    print(f"bench wall time: {(time.perf_counter() - wall) / 60:.1f} min")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
