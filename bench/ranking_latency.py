"""gRPC latency of ranking: the one-call pipeline (search) and the ranker endpoint.

A search request to the pipeline runs retrieval over the whole catalog, the ranker on
the top-K and the business rules in one Predict call; the ranker endpoint re-orders K
candidates sent by the caller. Both grow with K and with the ranker's text features,
so this table shows what K = 100 vs 200 and BERT text features cost at serving time.

Models (built on a synthetic world, --world, seeded): a two-tower retrieval model and
one ranker per text variant, untrained (latency does not depend on the weights; the
graphs are the ones training produces): "bow" (words + char trigrams), "fast MiniLM"
(work/text/minilm, `tfrec text import-minilm`) and "fast tiny" (a 2-layer random BERT,
tfrec.text.hub_export.build_tiny_encoder); --variants picks among bow,minilm,tiny.
BERT variants are skipped, with the reason printed, when
tfrec.models.text_match.TextMatch does not import or MiniLM is missing.
--history-encoders repeats every variant with the retrieval model's query tower reading
the history with that encoder (model.history_encoder: pooled, transformer, gru).
Each variant is exported with export_ranker / export_pipeline (K = 100 and 200, k = 10,
max_per_brand 3) and served by tfrec's ModelServer in a child process on 127.0.0.1.

Traffic is bounded: one client, requests back to back for --seconds or --max-requests
per row, after --warmup requests, over a pool of real users, histories and search
queries of the world. Latency is measured around PredictClient (encoding, loopback
gRPC, server, decoding); each figure is the median over --repeats runs, and the ratio
columns divide by the first row.

Run from the repository root:  python bench/ranking_latency.py [--world small]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, one K (50),
only the bow variant (--variants bow: each variant costs two exports and a server start,
and the tiny BERT's own export about 10 s more; `--smoke --variants tiny` runs the BERT
path instead, without work/text/minilm, in about 50 s), 0.5 s or 20 requests per run
after 2 warm-up requests, 1 repeat, a pool of 8 requests. Same exports, server process
and table; the figures mean nothing. TensorFlow's graph optimizer is off
(bench/_common.py). Options given explicitly still override these.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np
import tensorflow as tf

from tfrec.config import Config, ExportConfig
from tfrec.data.examples import positive_interactions
from tfrec.data.synthetic import generate_world
from tfrec.export.exporter import export_pipeline, export_ranker
from tfrec.features.catalog import catalog_statistics
from tfrec.features.vocab import build_vocabularies
from tfrec.models.retrieval import TwoTowerModel
from tfrec.serving.client import PredictClient, ServingError

tf.get_logger().setLevel("ERROR")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args, ratio  # noqa: E402
from serving_latency import Server  # noqa: E402  (ModelServer in a child process)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINILM = os.path.join(REPO, "work", "text", "minilm")
VARIANTS = ("bow", "minilm", "tiny")
SMOKE = dict(world="tiny", candidates="50", seconds=0.5, max_requests=20, repeats=1,
             warmup=2, pool=8, variants="bow")
DUMMY = {"user_id": tf.constant([""]), "history": tf.constant([[""]]),
         "device": tf.constant([""]), "hour": tf.constant([0], tf.int64),
         "query": tf.constant([""]), "item_id": tf.constant([[""]]),
         "retrieval_score": tf.constant([[0.0]])}


class World:
    """Catalog, popularity statistics, vocabularies and retrieval model of one world."""

    def __init__(self, args):
        world = generate_world(args.world, seed=args.seed)
        self.catalog = world.catalog
        self.events = world.events
        positives = positive_interactions(world.events)
        cut = int(np.quantile(positives["ts"], 0.8))
        self.positives = positives
        train = positives[positives["ts"] < cut]
        cfg = Config()
        self.vocab = build_vocabularies(train, self.catalog, cfg.model.text_max_tokens,
                                        cfg.model.price_buckets)
        self.stats = catalog_statistics(self.catalog, positives, cut)
        self.retrievals = {}  # history encoder -> retrieval model
        for encoder in args.history_encoders:
            cfg.model.history_encoder = encoder
            tf.keras.utils.set_random_seed(args.seed)
            self.retrievals[encoder] = TwoTowerModel(self.vocab, cfg.model)
            self.retrievals[encoder].build_from_features()


def text_variants(args, world: World, workdir: str) -> Tuple[List[Tuple[str, str, str]],
                                                              List[str]]:
    """[(label, encoder, preprocessor)] of the BERT variants to run, and skip reasons."""
    skipped = []
    if args.bow_only:
        return [], ["BERT variants: --bow-only"]
    if not {"minilm", "tiny"} & set(args.variants):
        return [], ["BERT variants: not in --variants"]
    try:
        from tfrec.models.text_match import TextMatch  # noqa: F401
    except Exception as e:  # not written yet, or its dependencies are missing
        return [], [f"BERT variants: tfrec.models.text_match.TextMatch does not import "
                    f"({type(e).__name__}: {e})"]
    variants = []
    encoder, preprocessor = (os.path.join(MINILM, "encoder"),
                             os.path.join(MINILM, "preprocessor"))
    if "minilm" not in args.variants:
        skipped.append("fast MiniLM: not in --variants")
    elif os.path.isdir(encoder) and os.path.isdir(preprocessor):
        variants.append(("fast MiniLM", encoder, preprocessor))
    else:
        skipped.append(f"fast MiniLM: {MINILM} not found (run `tfrec text import-minilm`)")
    if "tiny" not in args.variants:
        return variants, skipped + ["fast tiny: not in --variants"]
    try:
        from tfrec.text.hub_export import build_tiny_encoder
        from tfrec.text.vocab import words_from_texts

        texts = list(world.catalog["title"]) + [q for q in world.events["query"] if q]
        variants.append(("fast tiny", *build_tiny_encoder(
            os.path.join(workdir, "tiny_encoder"),
            vocab_tokens=words_from_texts(texts, max_words=2000), layers=2, hidden=64,
            heads=2, seq_length=64, seed=0)))
    except Exception as e:
        skipped.append(f"fast tiny: building the tiny encoder failed ({type(e).__name__}: {e})")
    return variants, skipped


def build_ranker(world: World, text: Optional[Tuple[str, str, str]], args):
    """An untrained ranker of the variant, built as ranking_trainer builds it."""
    from tfrec.training.ranking_trainer import build_ranker as build

    cfg = Config()
    cfg.ranking.max_candidates = max(args.candidates)
    if text is not None:
        cfg.ranking.text_mode = "fast"
        cfg.ranking.text_encoder, cfg.ranking.text_preprocessor = text[1], text[2]
    tf.keras.utils.set_random_seed(args.seed)
    model = build(world.vocab, cfg, world.catalog, world.stats)
    model(DUMMY)
    return model


def export_variant(world: World, ranker, name: str, base_dir: str, args,
                   retrieval) -> Dict[str, str]:
    """Exports the ranker and one pipeline per K; returns row key -> model name."""
    export = ExportConfig(base_dir=base_dir, version=1)
    models = {"ranker": f"ranker_{name}"}
    export_ranker(base_dir, world.catalog, export, model_name=models["ranker"],
                  retrieval=retrieval, ranker=ranker)
    for k in args.candidates:
        models[f"pipeline_{k}"] = f"pipeline_{name}_{k}"
        export_pipeline(base_dir, world.catalog, export, model_name=models[f"pipeline_{k}"],
                        candidates=k, retrieval=retrieval, ranker=ranker)
    return models


def request_pools(world: World, args) -> Dict[str, List[dict]]:
    """Search requests (user, history, query) and ranker requests per K."""
    rng = np.random.default_rng(args.seed)
    searches = world.events[(world.events["event_type"] == "search")
                            & (world.events["query"].astype(str) != "")]
    rows = searches.sample(min(args.pool, len(searches)), random_state=args.seed)
    histories = world.positives.groupby("user_id")["item_id"].apply(list)
    ids = world.catalog["item_id"].astype(str).to_numpy()
    pools = {"search": [], **{f"ranker_{k}": [] for k in args.candidates}}
    for i, row in enumerate(rows.itertuples()):
        history = [str(h) for h in histories.get(row.user_id, [])][-args.history:]
        history += [""] * (args.history - len(history))
        context = {"user_id": np.array([row.user_id], dtype=object),
                   "history": np.array([history], dtype=object),
                   "device": np.array([row.device], dtype=object),
                   "hour": np.array([int(rng.integers(24))], dtype=np.int64)}
        query = np.array([row.query], dtype=object)
        pools["search"].append({**context, "query": query, "k": np.array([10], np.int32),
                                "exclude_item_ids": np.array([[""]], dtype=object),
                                "purchased_item_ids": np.array([[""]], dtype=object)})
        for k in args.candidates:
            candidates = rng.choice(ids, size=min(k, len(ids)), replace=False)
            pools[f"ranker_{k}"].append({**context, "query": query,
                                         "candidate_ids": np.array([candidates], dtype=object)})
    return pools


def sequential(client: PredictClient, model: str, signature: str, pool: List[dict],
               args) -> Tuple[np.ndarray, int, float]:
    """Back-to-back requests for --seconds (or --max-requests): latencies s, errors, wall."""
    latencies, errors = [], 0
    start = time.perf_counter()
    deadline = start + args.seconds
    n = 0
    while time.perf_counter() < deadline and n < args.max_requests:
        t0 = time.perf_counter()
        try:
            client.predict(model, pool[n % len(pool)], signature)
        except ServingError:
            errors += 1
        else:
            latencies.append(time.perf_counter() - t0)
        n += 1
    return np.asarray(latencies), errors, time.perf_counter() - start


def summarize(runs) -> Dict[str, float]:
    stats = [(len(lat) / wall, *np.percentile(lat * 1000, [50, 99])) for lat, _, wall in runs
             if len(lat)]
    if not stats:
        return {"requests": 0, "errors": sum(r[1] for r in runs), "qps": 0.0,
                "p50": float("nan"), "p99": float("nan")}
    medians = [statistics.median(s[i] for s in stats) for i in range(3)]
    return {"requests": sum(len(r[0]) + r[1] for r in runs), "errors": sum(r[1] for r in runs),
            "qps": medians[0], "p50": medians[1], "p99": medians[2]}


def bench_variant(label: str, models: Dict[str, str], base_dir: str, pools, args) -> list:
    """Serves one variant's models in a child process and measures each row."""
    server = Server({name: os.path.join(base_dir, name) for name in models.values()},
                    "process")
    rows = []
    try:
        with PredictClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            for k in args.candidates:
                for endpoint, model, signature, pool in (
                        ("pipeline search", models[f"pipeline_{k}"], "search", pools["search"]),
                        ("ranker", models["ranker"], "serving_default", pools[f"ranker_{k}"])):
                    client.wait_until_available(model, timeout=300)
                    for request in pool[:args.warmup]:
                        client.predict(model, request, signature)  # errors here are bugs
                    runs = [sequential(client, model, signature, pool, args)
                            for _ in range(args.repeats)]
                    rows.append((label, k, endpoint, summarize(runs)))
                    print(f"  {label}, K={k}, {endpoint}: p50 {rows[-1][3]['p50']:.1f} ms",
                          flush=True)
    finally:
        server.stop()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="small", help="synthetic world preset")
    parser.add_argument("--candidates", default="100,200", help="retrieval K, comma list")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one run")
    parser.add_argument("--max-requests", type=int, default=400, help="cap of one run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (median shown)")
    parser.add_argument("--warmup", type=int, default=20, help="requests before timing")
    parser.add_argument("--pool", type=int, default=64, help="distinct requests rotated")
    parser.add_argument("--history", type=int, default=20, help="history width")
    parser.add_argument("--bow-only", action="store_true", help="skip the BERT variants")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"rankers to measure, comma list among {','.join(VARIANTS)}")
    parser.add_argument("--history-encoders", default="pooled",
                        help="retrieval query towers' history encoders, comma list among "
                             "pooled,transformer,gru (model.history_encoder): rows for each")
    parser.add_argument("--seed", type=int, default=42)
    args = parse_smoke_args(parser, argv, SMOKE)
    args.history_encoders = [e.strip() for e in args.history_encoders.split(",") if e.strip()]
    args.candidates = [int(k) for k in args.candidates.split(",") if k.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        parser.error(f"--variants must be a comma list among {','.join(VARIANTS)}, "
                     f"got {unknown or 'nothing'}")

    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="tfrec-bench-ranking-")
    rows, build_seconds = [], {}
    try:
        world = World(args)
        print(f"world {args.world!r}: {len(world.catalog)} items, "
              f"{len(world.vocab.users)} users in the vocabulary", flush=True)
        pools = request_pools(world, args)
        bert, skipped = text_variants(args, world, workdir)
        for reason in skipped:
            print(f"skipped {reason}", flush=True)
        if "bow" not in args.variants:
            skipped.insert(0, "bow: not in --variants")
            print(f"skipped {skipped[0]}", flush=True)
        for encoder, text in [(e, t) for e in args.history_encoders
                              for t in ([None] if "bow" in args.variants else []) + bert]:
            label = "bow" if text is None else text[0]
            if encoder != "pooled":
                label += f", {encoder} history"
            name = label.replace(" ", "_").replace(",", "").lower()
            base_dir = os.path.join(workdir, "models", name)
            t0 = time.perf_counter()
            models = export_variant(world, build_ranker(world, text, args), name, base_dir, args,
                                    world.retrievals[encoder])
            build_seconds[label] = time.perf_counter() - t0
            print(f"{label}: built and exported in {build_seconds[label]:.0f}s", flush=True)
            rows += bench_variant(label, models, base_dir, pools, args)
            shutil.rmtree(base_dir, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    if not rows:
        sys.exit("nothing measured: " + "; ".join(skipped))
    ref = rows[0][3]
    table = [[label, k, endpoint, s["requests"], s["errors"], f"{s['qps']:.1f}",
              f"{s['p50']:.1f}", f"{s['p99']:.1f}", ratio(s["p50"], ref["p50"]),
              ratio(s["p99"], ref["p99"])] for label, k, endpoint, s in rows]
    print()
    print(f"ranking latency | world {args.world!r} ({len(world.catalog):,} items), untrained "
          f"models, k=10, {args.history}-item history, max_per_brand 3 | one client, "
          "server in a child process")
    print(machine_line())
    print(format_table(
        ["ranker", "K", "endpoint", "requests", "errors", "QPS", "p50 ms", "p99 ms",
         "p50 vs ref", "p99 vs ref"], table,
        title=f"sequential gRPC, {args.seconds:g}s or {args.max_requests} requests per run, "
              f"median of {args.repeats} runs; ref = first row"))
    for reason in skipped:
        print(f"skipped {reason}")
    print("build + export (s): " + ", ".join(f"{k} {v:.0f}" for k, v in build_seconds.items()))
    print(f"total wall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
