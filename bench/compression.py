"""Compressed and on-device retrieval against the float32 SavedModel, in one run.

One synthetic world (--world), one two-tower run (`workflow.train`), exported as the
TF Serving SavedModel (float32: the reference; bfloat16 and int8 storage of the large
tables, `tfrec export --precision`) and as `tfrec export --format tflite` (float32 and
int8 dynamic-range files, run in the LiteRT interpreter). Every variant answers the same
test-period users (frozen at the test start, request history excluded, k = 10):
NDCG@10 and recall@10 of their test-period items (`evaluate_lists`), top-10 overlap
with the SavedModel's lists, size on disk, and batch-1 latency in this process (p50 /
p99 over --requests calls after --warmup; the SavedModel call includes its in-graph
tokenisation, the TFLite call starts from prepared tokens, as an app's native tokenizer
would hand them over). Ratios are against the SavedModel of the same run.

Ranker task (same world and retrieval run, --seeds): the recommendation ranker as
trained (the teacher), its pipeline SavedModel (retrieval top-K -> ranker -> top-10, no
brand cap) in float32, bfloat16 and int8 (`export.precision`), and smaller students
(--student overrides) trained on labels only and distilled from the teacher
(`tfrec train-ranker --teacher`, one per --temperatures). Columns: the ranker's own
validation NDCG@10 (held-out validation-period lists: where a temperature is picked),
test NDCG@10 and recall@10 of the pipeline's lists, the share of the teacher's gain over
the retrieval order kept, top-10 overlap with the teacher's lists, ranker weights
trained, size on disk and batch-1 `recommend` latency, with ratios to the teacher's
float32 pipeline of the same run.

Search task (Home Depot, needs ../shared/data and `tfrec text import-minilm`): the
query encoder of the search two-tower (MiniLM) adapted four ways on the same query split
(`tfrec.search.train`: build_pipeline + train_two_tower, epoch picked on validation):
zero-shot (no training), full fine-tuning (encoder_lr), the top --top-layers blocks, and
LoRA (--lora-rank on query/value, lora_lr). Columns: test NDCG@10 of the two-tower and
hybrid stages over the whole catalog, encoder weights trained (and their share), two-tower
training seconds, and the share of full fine-tuning's gain over zero-shot each keeps.

Distillation task (Home Depot, same data): per seed, the full search pipeline trained
(`train_search`, MiniLM query tower fine-tuned: the teacher) and distilled into a
--student-layers student (`tfrec.search.distill`); rows teacher / student: test NDCG@10
of the two-tower, hybrid and two-tower+ranker stages, the share of the teacher's gain over
BM25 the student keeps, and batch-1 ms of the query tower (query vector + catalog top-100
by the pipeline's first pass: exact, coarse or IVF) and of the whole `search` call, with
the student/teacher ratio. Then teacher and students
as search SavedModels with the product vectors stored in each --search-precisions
(`search.precision`): test NDCG@10 / Recall@100 of the loaded signature's lists, top-10
overlap with the same model's float32 export, size on disk, fresh-process RSS, batch-1
p50 / p99 ms of the signature (--requests calls after --warmup, test queries rotating).

Usage: python bench/compression.py [--tasks recommendation,ranker,search,distill]
       [--world small] [--seeds 0] [--search-seeds 0,1,2]
       [--precisions float32 bfloat16 int8] [--teacher-precisions float32 bfloat16 int8]
       [--student-layers 2 0] [--distill-lr 0=1e-3]
       [--search-precisions float32 bfloat16 int8]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, one seed, one
epoch, 100 users, 20 timed calls, the retrieval SavedModel in float32 and int8, the
teacher pipeline in float32 and one distilled student (T=5) only (`--precisions`,
`--teacher-precisions`, `--search-precisions`: each export costs ~10-20 s), no RSS
processes; search
on the first 200 Home Depot queries with a tiny random BERT (skipped without the file),
a search teacher without cross-fitted ranker lists, distilled into the word bag only.
Same code and tables; the figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional

import numpy as np

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (dir_mb, format_table, machine_line, parse_smoke_args, ratio,  # noqa: E402
                     work_dir, world_config)
from _common import first_queries, time_calls, tiny_bert  # noqa: E402
from tfrec import workflow  # noqa: E402
from tfrec.features.quantize import PRECISIONS  # noqa: E402

SMOKE = dict(world="tiny", seeds=[0], epochs=1, users=100, warmup=3, requests=20,
             search_seeds="0", queries=200, encoder="tiny", lora_rank=4, top_layers=1,
             student_layers=[0], distill_epochs=1, ranker_folds=0, title_queries=100,
             ranker_epochs=1, rec_ranker_epochs=1, temperatures=[5.0], rss=False,
             latency_queries=3,
             precisions=["float32", "int8"], teacher_precisions=["float32"],
             search_precisions=["float32", "int8"],
             labels_student=False)
K = 10
# The ranker's student: one cross layer, one narrow deep layer, narrower text pieces.
STUDENT = ["ranking.cross_layers=1", "ranking.deep_units=[32]", "ranking.text_embedding_dim=16"]
DISTILL = ["ranking.distill_weight=1.0"]
VARIANTS = ("SavedModel float32", "SavedModel bfloat16", "SavedModel int8", "TFLite float32",
            "TFLite int8")


def eval_set_of(cfg, users: int):
    """Test-period users frozen at the test start (as `tfrec evaluate` builds them)."""
    from tfrec.data.io import load_tables
    from tfrec.metrics.retrieval import build_eval_set
    from tfrec.training.trainer import ensure_prepared

    times = ensure_prepared(cfg)["split"]
    events = load_tables(cfg.data.data_dir).events
    return build_eval_set(events, int(times["t_test"]), int(times["t_end"]),
                          cfg.data.history_length, max_users=users, seed=0)


def saved_model_caller(path: str):
    import tensorflow_text  # noqa: F401  (the text tower's case-folding op)

    fn = tf.saved_model.load(path).signatures["serving_default"]

    def call(f: dict) -> np.ndarray:
        n = len(f["user_id"])
        out = fn(user_id=tf.constant(f["user_id"].astype(str)),
                 history=tf.constant(f["history"].astype(str)),
                 query=tf.constant(f["query"].astype(str)),
                 device=tf.constant(f["device"].astype(str)),
                 hour=tf.constant(f["hour"], tf.int64), k=tf.constant([K] * n),
                 exclude_seen=tf.constant([True] * n))
        return out["item_ids"].numpy().astype(str)
    return call


def edge_caller(path: str, variant: str):
    """(lists of a batch, batch-1 call on prepared inputs) of one TFLite file."""
    from tfrec.export.edge import EdgeRecommender

    rec = EdgeRecommender(path, variant)

    def call(f: dict) -> np.ndarray:
        return rec.recommend(f)["item_ids"][:, :K].astype(str)

    runner = rec.interpreter.get_signature_runner("recommend")
    return call, lambda inputs: runner(**inputs), rec.inputs


RSS_SCRIPT = r"""
import sys
kind, path = sys.argv[1], sys.argv[2]
if kind == "tflite":
    from ai_edge_litert.interpreter import Interpreter
    if path:
        Interpreter(model_path=path).allocate_tensors()
else:
    import tensorflow as tf
    import tensorflow_text  # noqa: F401
    if path:
        tf.saved_model.load(path)
# VmHWM: this process image's peak (ru_maxrss would carry the forking parent's over exec)
with open("/proc/self/status") as f:
    print([int(line.split()[1]) for line in f if line.startswith("VmHWM:")][0] / 1024)
"""


MEASURE_RSS = {"on": True}  # --no-rss (smoke): a process per model costs seconds each


def loaded_rss_mb(kind: str, path: str = "") -> float:
    """Peak RSS (MB) of a fresh process that loads one model ("savedmodel": TensorFlow
    and TF Text imported; "tflite": the LiteRT interpreter, tensors allocated); without
    `path`, the runtime's own floor. NaN with --no-rss."""
    import subprocess

    if not MEASURE_RSS["on"]:
        return float("nan")
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, kind, path], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"loading {path or kind} failed: {proc.stderr[-2000:]}")
    return float(proc.stdout.split()[-1])


def timed(call, requests: list, warmup: int, count: int):
    """p50 / p99 ms of batch-1 calls."""
    times = time_calls(call, requests, warmup, count)
    return np.percentile(times, 50), np.percentile(times, 99)


def world_run(seed: int, root: str, args):
    """(config, retrieval run) of one generated world: what both recommendation tables
    start from."""
    cfg = world_config(root, args.world, seed, args.epochs, args.rec_ranker_epochs)
    workflow.generate(cfg)
    return cfg, workflow.train(cfg)


def one_seed(cfg, run, args) -> dict:
    saved = {}
    for precision in args.precisions:
        cfg.export.precision, cfg.export.model_name = precision, f"retrieval_{precision}"
        saved[precision] = workflow.export(cfg, run=run.run_name, model=run.model)
    edge = workflow.export_edge(cfg, run=run.run_name, k=K)
    eval_set = eval_set_of(cfg, args.users)
    features = eval_set.query_features()
    singles = [{k: v[i:i + 1] for k, v in features.items()} for i in range(len(eval_set))]
    out = {}
    for precision, path in saved.items():
        call = saved_model_caller(path)
        lists = np.concatenate([call(eval_set.query_features(slice(i, i + 256)))
                                for i in range(0, len(eval_set), 256)])
        p50, p99 = timed(call, singles, args.warmup, args.requests)
        out[f"SavedModel {precision}"] = {"lists": lists, "mb": dir_mb(path), "p50": p50,
                                          "p99": p99, "rss": loaded_rss_mb("savedmodel", path),
                                          "path": path}
    for variant in ("float32", "int8"):
        call, raw, prepare = edge_caller(edge, variant)
        lists = call(features)
        prepared = [prepare(f) for f in singles]
        p50, p99 = timed(raw, prepared, args.warmup, args.requests)
        path = os.path.join(edge, f"{variant}.tflite")
        out[f"TFLite {variant}"] = {"lists": lists, "mb": os.path.getsize(path) / 2 ** 20,
                                    "p50": p50, "p99": p99,
                                    "rss": loaded_rss_mb("tflite", path)}
    return score_lists(out, VARIANTS[0], eval_set)


def score_lists(out: dict, reference: str, eval_set) -> dict:
    """Replaces each row's "lists" by its NDCG / recall@K and top-K overlap with the
    `reference` row's lists."""
    from tfrec.metrics.retrieval import evaluate_lists

    reference_lists = out[reference]["lists"]
    for row in out.values():
        lists = row.pop("lists")
        metrics = evaluate_lists(lists.tolist(), eval_set, (K,))
        row["ndcg"], row["recall"] = metrics[f"ndcg@{K}"], metrics[f"recall@{K}"]
        row["overlap"] = float(np.mean([len((set(a) - {""}) & set(b)) / K
                                        for a, b in zip(reference_lists, lists)]))
    return out


def pipeline_caller(path: str):
    """Top-K ids of the pipeline's `recommend` signature (history, nothing else excluded)."""
    import tensorflow_text  # noqa: F401

    fn = tf.saved_model.load(path).signatures["recommend"]

    def call(f: dict) -> np.ndarray:
        n = len(f["user_id"])
        empty = tf.constant([[""]] * n)
        out = fn(user_id=tf.constant(f["user_id"].astype(str)),
                 history=tf.constant(f["history"].astype(str)),
                 device=tf.constant(f["device"].astype(str)),
                 hour=tf.constant(f["hour"], tf.int64), k=tf.constant([K] * n),
                 exclude_item_ids=empty, purchased_item_ids=empty)
        return out["item_ids"].numpy().astype(str)
    return call


def trained_weights(model) -> int:
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def ranker_seed(cfg, run, args, retrieval_path: Optional[str] = None) -> dict:
    """Per variant: test lists of its exported pipeline (retrieval top-K -> ranker ->
    top-10, no brand cap), size, batch-1 latency and the ranker's trained weights;
    "retrieval": the retrieval SavedModel's lists (the order the rankers improve on)."""
    import copy

    from tfrec.data.examples import positive_interactions
    from tfrec.data.io import load_data_tables
    from tfrec.export.exporter import export_pipeline
    from tfrec.features.catalog import catalog_statistics
    from tfrec.training.trainer import ensure_prepared

    tables = load_data_tables(cfg.data)
    t_test = int(ensure_prepared(cfg)["split"]["t_test"])
    # Served as of the test start: popularity counted up to then, nothing later.
    stats = catalog_statistics(tables.catalog, positive_interactions(tables.events), t_test)
    if retrieval_path is None:  # the retrieval table's float32 export otherwise
        cfg.export.precision, cfg.export.model_name = "float32", "retrieval_lists"
        retrieval_path = workflow.export(cfg, run=run.run_name, model=run.model)
    rankers = {"teacher": workflow.train_ranker(cfg, run=run.run_name, retrieval=run.model)}
    students = [("student, labels only", [], None)] * args.labels_student + [
        (f"student, distilled T={t:g}", args.distill + [f"ranking.distill_temperature={t}"],
         rankers["teacher"].model) for t in args.temperatures]
    for name, overrides, teacher in students:
        student = copy.deepcopy(cfg).override(args.student + overrides)
        rankers[name] = workflow.train_ranker(student, run=run.run_name, retrieval=run.model,
                                              teacher=teacher)
    paths = {}
    base = os.path.join(os.path.dirname(cfg.export.base_dir), "ranker_bench")
    for name, result in rankers.items():
        result.model.use_catalog(tables.catalog, stats)
        for precision in (args.teacher_precisions if name == "teacher" else ("float32",)):
            export = copy.deepcopy(cfg.export)
            export.base_dir, export.precision = base, precision
            label = f"{name} {precision}" if name == "teacher" else name
            paths[label] = (export_pipeline(
                run.run_dir, tables.catalog, export, max_per_brand=None,
                model_name="".join(c if c.isalnum() else "_" for c in label),
                retrieval=run.model, ranker=result.model),
                trained_weights(result.model), result.val_metrics[f"score_ndcg_at_{K}"])
    eval_set = eval_set_of(cfg, args.users)
    singles = [{k: v[i:i + 1] for k, v in eval_set.query_features().items()}
               for i in range(len(eval_set))]

    def lists_of(call) -> np.ndarray:
        return np.concatenate([call(eval_set.query_features(slice(i, i + 256)))
                               for i in range(0, len(eval_set), 256)])

    out = {"retrieval": {"lists": lists_of(saved_model_caller(retrieval_path))}}
    for label, (path, weights, val) in paths.items():
        call = pipeline_caller(path)
        p50, p99 = timed(call, singles, args.warmup, args.requests)
        out[label] = {"lists": lists_of(call), "mb": dir_mb(path), "p50": p50, "p99": p99,
                      "weights": weights, "val": val,
                      "rss": loaded_rss_mb("savedmodel", path)}
    return score_lists(out, "teacher float32", eval_set)


def ranker_table(runs: list, args) -> None:
    """Mean ± sd over seeds per variant; ratios and kept gain are per-seed, then averaged."""
    ref = "teacher float32"
    rows = []
    for label in [k for k in runs[0] if k != "retrieval"]:
        def per_seed(key: str, reference: str = ref):
            return np.array([r[label][key] / r[reference][key] if r[reference][key] else np.nan
                             for r in runs])

        ndcg = np.array([r[label]["ndcg"] for r in runs])
        gain = [(r[label]["ndcg"] - r["retrieval"]["ndcg"])
                / (r[ref]["ndcg"] - r["retrieval"]["ndcg"])
                for r in runs if r[ref]["ndcg"] != r["retrieval"]["ndcg"]]
        rows.append([label, f"{np.mean([r[label]['val'] for r in runs]):.4f}",
                     f"{ndcg.mean():.4f} ± {ndcg.std():.4f}",
                     f"{np.nanmean(per_seed('ndcg')):.3f}x",
                     f"{np.mean(gain):.2f}" if gain else "n/a",
                     f"{np.mean([r[label]['recall'] for r in runs]):.4f}",
                     f"{np.mean([r[label]['overlap'] for r in runs]):.3f}",
                     f"{runs[0][label]['weights']:,}",
                     f"{np.mean([r[label]['mb'] for r in runs]):.2f}",
                     f"{np.nanmean(per_seed('mb')):.2f}x",
                     f"{np.mean([r[label]['rss'] for r in runs]):.0f}",
                     f"{np.mean([r[label]['p50'] for r in runs]):.2f}",
                     f"{np.mean([r[label]['p99'] for r in runs]):.2f}",
                     f"{np.nanmean(per_seed('p50')):.2f}x"])
    retrieval = np.array([r["retrieval"]["ndcg"] for r in runs])
    print()
    print(format_table(
        ["pipeline (ranker)", f"val ndcg@{K}", f"test ndcg@{K}", "vs teacher", "kept ranker gain", f"recall@{K}",
         "top-10 overlap", "ranker weights trained", "size MB", "size vs teacher",
         "RSS MB", "p50 ms", "p99 ms", "p50 vs teacher"], rows,
        title=f"recommendation ranker, {args.world} world, seeds {args.seeds} (mean ± sd): "
              f"pipeline SavedModels (retrieval top-K -> ranker -> top-{K}), batch-1 "
              f"recommend in-process; retrieval order NDCG@{K} {retrieval.mean():.4f}; kept "
              "ranker gain = (variant - retrieval) / (teacher - retrieval); val: the "
              "ranker's held-out validation-period lists (pick T there)"))
    print(f"RSS MB: peak of a fresh process after loading the pipeline (TensorFlow + TF Text "
          f"alone: {loaded_rss_mb('savedmodel'):.0f})")
    print(f"student: {' '.join(args.student)}; distilled with {' '.join(args.distill)} "
          f"at temperatures {args.temperatures}")
    print("LoRA / top-N rows: none for this ranker (bag-of-words text, no BERT encoder to "
          "adapt); TFLite: the on-device export is the retrieval query tower + top-k "
          "(table above), the ranker stays on the server.")


def encoder_weights(pipeline) -> int:
    """Query-encoder weights that train (adapters with LoRA)."""
    return sum(int(np.prod(v.shape)) for v in pipeline.two_tower.query_encoder.trainable_weights)


def search_seed(seed: int, args, workdir: str) -> dict:
    """Test NDCG@10 (two-tower, hybrid), weights trained and seconds of each variant."""
    from dataclasses import replace

    from tfrec.search.config import SearchConfig
    from tfrec.search.train import (build_pipeline, evaluate_stages, load_search_data,
                                    title_vectors, train_two_tower)

    base = SearchConfig(seed=seed, epochs=args.search_epochs, data_dir=args.data_dir,
                        encoder=args.encoder, preprocessor=args.preprocessor)
    data = first_queries(base, args.queries) if args.queries else load_search_data(base)
    if args.encoder == "tiny":
        texts = data.catalog["title"].tolist() + data.judgments["query"].unique().tolist()
        base.encoder, base.preprocessor = tiny_bert(
            os.path.join(workdir, f"tiny_bert_{seed}"), texts)
    vectors = title_vectors(base, data.catalog["title"].tolist(),
                            cache_dir=os.path.join(workdir, "cache"))
    variants = {"zero-shot": None, "full fine-tune": {},
                f"top-{args.top_layers} blocks": {"top_layers": args.top_layers},
                f"LoRA r={args.lora_rank} (query, value)": {"lora_rank": args.lora_rank}}
    out = {}
    for label, overrides in variants.items():
        cfg = replace(base, **(overrides or {}))
        tf.keras.utils.set_random_seed(seed)
        pipeline = build_pipeline(cfg, data, vectors)
        start = time.perf_counter()
        if overrides is not None:
            train_two_tower(pipeline, cfg, data)
        seconds = time.perf_counter() - start if overrides is not None else 0.0
        stages = evaluate_stages(pipeline, data.splits["test"], data.row_of,
                                 ("two_tower", "hybrid"))
        out[label] = {"two_tower": stages["two_tower"].summary()["ndcg@10"],
                      "hybrid": stages["hybrid"].summary()["ndcg@10"],
                      "weights": encoder_weights(pipeline) if overrides is not None else 0,
                      "seconds": seconds}
        print(f"search seed {seed}, {label}: two-tower ndcg@10 "
              f"{out[label]['two_tower']:.4f}, {seconds:.0f} s", flush=True)
    return out


def home_depot_seeds(args, table: str):
    """(seeds, work dir), or None (and a skip line) without the Home Depot file."""
    from tfrec.data.homedepot import homedepot_path

    if not os.path.isfile(homedepot_path(args.data_dir)):
        print(f"\n{table} table skipped: no Home Depot judgments at "
              f"{homedepot_path(args.data_dir)!r}")
        return None
    seeds = [int(x) for x in args.search_seeds.split(",") if x.strip()]
    return seeds, work_dir(args.workdir, f"tfrec-compression-{table}-")


def search_table(args) -> None:
    setup = home_depot_seeds(args, "search")
    if setup is None:
        return
    seeds, workdir = setup
    runs = [search_seed(seed, args, workdir) for seed in seeds]
    labels = list(runs[0])
    zero = np.array([r["zero-shot"]["two_tower"] for r in runs])
    full = np.array([r["full fine-tune"]["two_tower"] for r in runs])
    rows = []
    for label in labels:
        tt = np.array([r[label]["two_tower"] for r in runs])
        hy = np.array([r[label]["hybrid"] for r in runs])
        # Share of the full fine-tune's trainable set: every encoder weight.
        weights, total = runs[0][label]["weights"], runs[0]["full fine-tune"]["weights"]
        gain = np.mean(full - zero)
        rows.append([label, f"{tt.mean():.4f} ± {tt.std():.4f}", f"{hy.mean():.4f}",
                     f"{np.mean(tt - full):+.4f}",
                     f"{np.mean(tt - zero) / gain:.2f}" if gain else "n/a",
                     f"{weights:,}", f"{100 * weights / total:.2f}%",
                     f"{np.mean([r[label]['seconds'] for r in runs]):.0f}"])
    print()
    print(format_table(["query encoder", "two-tower NDCG@10", "hybrid NDCG@10", "vs full FT",
                        "share of FT gain", "weights trained", "of encoder", "train s"],
                       rows, title=f"Home Depot search, test queries, seeds {seeds} "
                                   f"(mean ± sd), {args.encoder}"))


def distill_seed(seed: int, args, workdir: str) -> dict:
    """Teacher (trained search pipeline) and distilled student figures of one split."""
    from tfrec.search.config import SearchConfig
    from tfrec.search.distill import DistillConfig, distill_search
    from tfrec.search.train import train_search

    cfg = SearchConfig(seed=seed, epochs=args.search_epochs, data_dir=args.data_dir,
                       encoder=args.encoder, preprocessor=args.preprocessor,
                       ranker_epochs=args.ranker_epochs)
    if args.ranker_folds is not None:
        cfg.ranker_folds = args.ranker_folds
    if args.encoder == "tiny":
        data = first_queries(cfg, args.queries)
        texts = data.catalog["title"].tolist() + data.judgments["query"].unique().tolist()
        cfg.encoder, cfg.preprocessor = tiny_bert(
            os.path.join(workdir, f"tiny_bert_{seed}"), texts)
    if args.queries:
        # Distillation reloads the split from the config: a judgments file of the slice.
        data = first_queries(cfg, args.queries)
        path = os.path.join(workdir, f"judgments_{seed}.csv")
        data.judgments.rename(columns={"query": "search_term", "product_id": "product_uid",
                                       "title": "product_title"}).to_csv(path, index=False)
        cfg.judgments = path
    teacher_dir = os.path.join(workdir, f"teacher_{seed}")
    # One title-vector cache for every seed (and the search table's runs).
    shared = os.path.join(workdir, "cache")
    os.makedirs(shared, exist_ok=True)
    os.makedirs(teacher_dir, exist_ok=True)
    if not os.path.exists(os.path.join(teacher_dir, "cache")):
        os.symlink(shared, os.path.join(teacher_dir, "cache"))
    if not (args.reuse_teachers and os.path.isdir(os.path.join(teacher_dir, "search", "model"))):
        train_search(cfg, teacher_dir,
                     log_dir=os.path.join(workdir, "logs", f"teacher_{seed}"))
    out, saved = {}, {}
    if args.search_precisions:
        pipeline, data = teacher_pipeline(teacher_dir)
        saved["teacher"] = saved_search_rows(pipeline, data, args, os.path.join(
            workdir, f"saved_{seed}", "teacher"))
        del pipeline
    for layers in args.student_layers:
        settings = DistillConfig(layers=layers, epochs=args.distill_epochs,
                                 title_queries=args.title_queries, seed=seed,
                                 lr=args.distill_lr.get(layers, DistillConfig.lr))
        out[layers] = distill_search(teacher_dir, os.path.join(
            workdir, f"student_{seed}_{layers}"), settings, latency_queries=args.latency_queries)
        pipeline = out[layers].pop("pipeline")
        if args.search_precisions:
            saved[student_label(layers)] = saved_search_rows(
                pipeline, data, args, os.path.join(workdir, f"saved_{seed}", f"s{layers}"))
    return out, saved


def saved_search_rows(pipeline, data, args, root: str) -> dict:
    """Per --search-precisions: the pipeline exported as the search SavedModel with its
    product vectors in that precision, loaded back in this process: test NDCG@10 and
    Recall@100 of the signature's lists, top-10 overlap with the float32 export, size on
    disk, fresh-process RSS, batch-1 p50 / p99 ms."""
    import tensorflow_text  # noqa: F401  (the exported preprocessor's ops)
    from tfrec.search.export import export_search
    from tfrec.search.metrics import catalog_search_metrics, query_gains

    test, row_of = data.splits["test"], data.row_of  # a property: built on each read
    queries = sorted(test["query"].unique())
    gains = query_gains(test, row_of, queries)
    timed_queries = queries[:max(args.latency_queries, 1)]
    out, reference = {}, None
    for precision in args.search_precisions:
        path = export_search(pipeline, os.path.join(root, precision), num_results=100,
                             precision=precision)
        fn = tf.saved_model.load(path).signatures["serving_default"]
        ids = np.concatenate([fn(query=tf.constant(queries[i:i + 64]))["product_ids"].numpy()
                              for i in range(0, len(queries), 64)]).astype(str)
        ranked = np.array([[row_of.get(p, -1) for p in row] for row in ids])
        metrics = catalog_search_metrics(ranked, gains).summary()
        reference = ids if reference is None else reference
        p50, p99 = timed(lambda q: fn(query=tf.constant([q])), timed_queries, args.warmup,
                         args.requests)
        out[precision] = {
            "ndcg": metrics["ndcg@10"], "recall": metrics["recall@100"],
            "overlap": float(np.mean([len(set(a[:K]) & set(b[:K]) - {""}) / K
                                      for a, b in zip(reference, ids)])),
            "mb": dir_mb(path), "rss": loaded_rss_mb("savedmodel", path), "p50": p50,
            "p99": p99}
        del fn
    return out


def teacher_pipeline(teacher_dir: str):
    """(pipeline, data) of a trained search run, as `tfrec search index` loads it."""
    from tfrec.search.config import SearchConfig
    from tfrec.search.index import load_search_pipeline, resolve_search_run
    from tfrec.search.train import load_search_data

    run = resolve_search_run(teacher_dir)
    cfg = SearchConfig.from_yaml(os.path.join(run, "model", "config.yaml"))
    data = load_search_data(cfg)
    pipeline, _ = load_search_pipeline(run, data.catalog,
                                       cache_dir=os.path.join(teacher_dir, "cache"))
    return pipeline, data


def student_label(layers: int) -> str:
    return "student, word bag" if layers == 0 else f"student, {layers} blocks"


def distill_table(args) -> None:
    """Teacher and one row per student; without feedback products: the same pipeline
    minus the feedback query's products (its NDCG@10, kept gain against the
    teacher as it serves, and search ms)."""
    from tfrec.search.distill import kept_gain

    setup = home_depot_seeds(args, "distillation")
    if setup is None:
        return
    seeds, workdir = setup
    runs = []  # per seed: {layers: distill result}
    saved = []  # per seed: {model: {precision: SavedModel figures}}
    for seed in seeds:
        run, saved_rows = distill_seed(seed, args, workdir)
        runs.append(run)
        saved.append(saved_rows)
        for layers, result in runs[-1].items():
            print(f"distill seed {seed}, {student_label(layers)}: kept gain "
                  f"{result['kept_gain_over_bm25']}, {result['total_s']:.0f} s", flush=True)
    stages = ("two_tower", "hybrid", "two_tower+ranker")
    first = args.student_layers[0]
    sides = [("teacher", first, "teacher")] + [
        (student_label(layers), layers, "student") for layers in args.student_layers]
    nofb = "metrics_no_feedback_products"
    teacher_ms = {t: np.mean([r[first]["teacher"]["latency_ms"][t] for r in runs])
                  for t in ("query_tower", "search")}
    bm25 = np.array([r[first]["teacher"]["metrics"]["bm25"]["ndcg@10"] for r in runs])
    rows = []
    for label, layers, side in sides:
        results = [r[layers] for r in runs]
        row = [label]
        for stage in stages:
            v = np.array([r[side]["metrics"][stage]["ndcg@10"] for r in results])
            row.append(f"{v.mean():.4f} ± {v.std():.4f}")
        kept = [np.mean([r["kept_gain_over_bm25"][s] for r in results]) if side == "student"
                else 1.0 for s in stages]
        row += [f"{k:.2f}" for k in kept]
        for timing in ("query_tower", "search"):
            ms = np.mean([r[side]["latency_ms"][timing] for r in results])
            row += [f"{ms:.2f}", ratio(ms, teacher_ms[timing])]
        if all(nofb in r[side] for r in results):
            v = np.array([r[side][nofb]["two_tower+ranker"]["ndcg@10"] for r in results])
            ms = np.mean([r[side]["latency_ms"]["search_no_feedback_products"]
                          for r in results])
            kept = np.mean([kept_gain(r["teacher"]["metrics"], r[side][nofb])[
                "two_tower+ranker"] for r in results])
            row += [f"{v.mean():.4f}", f"{kept:.2f}", f"{ms:.2f}",
                    ratio(ms, teacher_ms["search"])]
        else:
            row += ["n/a"] * 4
        rows.append(row)
    print()
    print(format_table(
        ["model", "two-tower NDCG@10", "hybrid NDCG@10", "+ranker NDCG@10",
         "kept gain two-tower", "kept gain hybrid", "kept gain +ranker", "query tower ms",
         "vs teacher", "search ms", "search vs teacher", "+ranker NDCG@10 no fb products",
         "kept gain no fb products", "search ms no fb products", "no fb vs teacher"], rows,
        title=f"Home Depot search distillation, seeds {seeds}: teacher {args.encoder} "
              f"fine-tuned; students: its first N blocks or a word bag (BM25 NDCG@10 "
              f"{bm25.mean():.4f}; kept gain = (student - BM25) / (teacher - BM25), the "
              f"teacher as it serves; 'no fb products': without the feedback query's "
              f"products)"))
    if args.search_precisions:
        saved_search_table(saved, seeds, args)


def saved_search_table(saved: list, seeds: list, args) -> None:
    """The search SavedModels of teacher and students per product-vector precision,
    means over seeds; ratios against the teacher's float32 export of the same seed."""
    ref = args.search_precisions[0]
    rows = []
    for model in saved[0]:
        for precision in args.search_precisions:
            runs = [s[model][precision] for s in saved]
            teacher = [s["teacher"][ref] for s in saved]

            def mean(key, of=runs):
                return float(np.mean([r[key] for r in of]))

            rows.append([f"{model} {precision}", f"{mean('ndcg'):.4f}",
                         f"{mean('recall'):.4f}", f"{mean('overlap'):.3f}",
                         f"{mean('mb'):.1f}", ratio(mean("mb"), mean("mb", teacher)),
                         f"{mean('rss'):.0f}", f"{mean('p50'):.2f}", f"{mean('p99'):.2f}",
                         ratio(mean("p50"), mean("p50", teacher))])
    print()
    print(format_table(
        ["search SavedModel", "test NDCG@10", "Recall@100", "top-10 overlap", "size MB",
         "size vs teacher", "RSS MB", "p50 ms", "p99 ms", "p50 vs teacher"], rows,
        title=f"Home Depot search SavedModels, seeds {seeds}: product vectors stored in "
              f"{', '.join(args.search_precisions)} (`search.precision`); overlap with the "
              f"same model's {ref} export; batch-1 signature calls in-process"))


def main(argv=None) -> None:
    from tfrec.search.config import SearchConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="recommendation,ranker,search,distill")
    parser.add_argument("--world", default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="retrieval epochs (default: the trainer's, early stopping)")
    parser.add_argument("--users", type=int, default=2000, help="test users evaluated")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--requests", type=int, default=500, help="timed batch-1 calls")
    parser.add_argument("--search-seeds", default="0,1,2", help="Home Depot query splits")
    parser.add_argument("--search-epochs", type=int, default=SearchConfig.epochs)
    parser.add_argument("--queries", type=int, default=0,
                        help="only the first N distinct Home Depot queries (0: all)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--encoder", default=SearchConfig.encoder,
                        help='"tiny": a tiny random BERT built in the work dir')
    parser.add_argument("--preprocessor", default=SearchConfig.preprocessor)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--top-layers", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keeps the title-vector cache")
    parser.add_argument("--student-layers", type=int, nargs="+", default=[2, 0],
                        help="one distilled student per value: its transformer blocks "
                             "(0: a word bag)")
    parser.add_argument("--distill-lr", nargs="+", default=["0=1e-3"], metavar="LAYERS=LR",
                        help="a student's learning rate by its layers (others: "
                             "DistillConfig's)")
    parser.add_argument("--reuse-teachers", action="store_true",
                        help="distil the teachers a previous run left in --workdir")
    parser.add_argument("--distill-epochs", type=int, default=6)
    parser.add_argument("--title-queries", type=int, default=20000)
    parser.add_argument("--ranker-epochs", type=int, default=SearchConfig.ranker_epochs)
    parser.add_argument("--ranker-folds", type=int, default=None,
                        help="the search teacher's cross-fitting folds (default: the config's)")
    parser.add_argument("--latency-queries", type=int, default=50)
    parser.add_argument("--rec-ranker-epochs", type=int, default=None,
                        help="recommendation ranker epochs (default: the ranking config's)")
    parser.add_argument("--student", nargs="+", default=STUDENT, metavar="FIELD=VALUE",
                        help="the smaller ranker's config overrides")
    parser.add_argument("--distill", nargs="+", default=DISTILL, metavar="FIELD=VALUE",
                        help="the distilled students' extra overrides")
    parser.add_argument("--no-rss", dest="rss", action="store_false",
                        help="skip the fresh-process RSS of each model")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS,
                        default=list(PRECISIONS),
                        help="the retrieval SavedModel's exports (float32 first: the reference)")
    parser.add_argument("--search-precisions", nargs="*", choices=PRECISIONS,
                        default=list(PRECISIONS),
                        help="distill task: export teacher and students as search "
                             "SavedModels with the product vectors in these precisions "
                             "(float32 first; none: no SavedModel table)")
    parser.add_argument("--teacher-precisions", nargs="+", choices=PRECISIONS,
                        default=list(PRECISIONS),
                        help="the teacher pipeline's exports (float32 first: the reference)")
    parser.add_argument("--no-labels-student", dest="labels_student", action="store_false",
                        help="skip the student trained on labels only")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 5.0],
                        help="one distilled student per distillation temperature")
    args = parse_smoke_args(parser, argv, SMOKE)
    try:
        args.distill_lr = {int(k): float(v) for k, v in
                           (item.split("=", 1) for item in args.distill_lr)}
    except ValueError:
        parser.error(f"--distill-lr: LAYERS=LR pairs, e.g. 0=1e-3, got {args.distill_lr}")
    for flag, values in (("--precisions", args.precisions),
                         ("--teacher-precisions", args.teacher_precisions),
                         ("--search-precisions", args.search_precisions or ["float32"])):
        if values[0] != "float32":
            parser.error(f"{flag}: float32 first (the reference), got {values}")
    tasks = {t.strip() for t in args.tasks.split(",") if t.strip()}
    MEASURE_RSS["on"] = args.rss
    print(machine_line())
    if "search" in tasks:
        search_table(args)
    if "distill" in tasks:
        distill_table(args)
    if not tasks & {"recommendation", "ranker"}:
        return
    ranker_runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"tfrec-compression-{seed}-") as root:
            cfg, run = world_run(seed, root, args)
            rows = one_seed(cfg, run, args) if "recommendation" in tasks else None
            if "ranker" in tasks:
                ranker_runs.append(ranker_seed(
                    cfg, run, args, rows[VARIANTS[0]]["path"] if rows else None))
        if rows is None:
            continue
        ref = rows[VARIANTS[0]]
        table = [[name, f"{r['ndcg']:.4f}", ratio(r["ndcg"], ref["ndcg"]),
                  f"{r['recall']:.4f}", f"{r['overlap']:.3f}", f"{r['mb']:.2f}",
                  ratio(r["mb"], ref["mb"]), f"{r['rss']:.0f}", f"{r['p50']:.3f}",
                  f"{r['p99']:.3f}", ratio(r["p50"], ref["p50"])] for name, r in rows.items()]
        print()
        print(format_table(
            ["variant", f"ndcg@{K}", "vs SavedModel", f"recall@{K}", "top-10 overlap",
             "size MB", "size vs SavedModel", "RSS MB", "p50 ms", "p99 ms",
             "p50 vs SavedModel"],
            table, title=f"recommendation retrieval, {args.world} world, seed {seed}: "
                         "float32 SavedModel vs quantized and on-device (batch 1, in-process)"))
        print(f"TFLite int8 / float32 size: "
              f"{rows['TFLite int8']['mb'] / rows['TFLite float32']['mb']:.3f}")
        print(f"RSS MB: peak of a fresh process after loading the model; the runtimes alone "
              f"take {loaded_rss_mb('savedmodel'):.0f} (TensorFlow + TF Text) and "
              f"{loaded_rss_mb('tflite'):.0f} (LiteRT)")
    if ranker_runs:
        ranker_table(ranker_runs, args)


if __name__ == "__main__":
    main()
