"""Distils a trained search run's query encoder into a smaller one (`tfrec search distill`).

The query encoder is the per-request cost of search (titles are embedded offline). The
student keeps the teacher's first `layers` transformer blocks (fine-tuned weights), or
with `layers=0` is a bag of word vectors started from the teacher's vector of each word
alone (`tfrec.search.word_bag`). It learns to reproduce the teacher's query vectors
(cosine) and its score distribution over the teacher's top products (listwise KL,
temperature `temperature`), on the training queries plus product titles as unlabelled
pseudo-queries. The product tower and the rest of the pipeline are the teacher's,
unchanged; the epoch is picked on validation NDCG@10.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.search.config import SearchConfig
from tfrec.search.index import (index_pipeline, load_search_pipeline, resolve_search_run,
                                save_search_run)
from tfrec.search.model import query_encoder_of
from tfrec.search.pipeline import SearchPipeline
from tfrec.search.train import SearchData, evaluate_stages, load_search_data
from tfrec.search.word_bag import WordBagEncoder, max_word_pieces, multi_piece_words
from tfrec.text.bert import build_encoder, canonical_weight_name, encoder_weights
from tfrec.text.config import BertConfig
from tfrec.text.hub_export import ENCODER_KIND, export_encoder, read_export_info, vocab_path
from tfrec.text.vocab import read_vocab
from tfrec.training.optimizers import LazyAdam

log = logging.getLogger(__name__)

STUDENT_ENCODER = "student_encoder"
STAGES = ("bm25", "two_tower", "hybrid", "two_tower+ranker")


@dataclasses.dataclass
class DistillConfig:
    """Settings of one distillation (epochs: Home Depot validation NDCG@10 was best at the
    fifth or sixth epoch on three query splits).

    Args:
      layers: transformer blocks the student keeps (the teacher's first ones); 0: a
        word bag (`WordBagEncoder`: a gather and a mean per query), trained with LazyAdam
        so a step updates only the rows its queries hold.
      epochs: passes over the distillation queries (the best by validation NDCG@10 wins).
      batch_size: queries per step.
      lr: Adam learning rate of the student encoder and query adapter.
      top_k: teacher products per query the listwise KL runs over.
      temperature: softmax temperature of the KL (on the teacher's scaled cosines).
      kl_weight: weight of the KL beside the cosine loss.
      title_queries: product titles added as pseudo-queries (0: training queries only).
      bag_words: with layers=0, the most frequent multi-piece words of the titles and
        training queries that get their own row (others: the mean of their pieces).
      seed: sampling and shuffling seed.
    """

    layers: int = 2
    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-4
    top_k: int = 50
    temperature: float = 1.0
    kl_weight: float = 1.0
    title_queries: int = 20000
    bag_words: int = 100_000
    seed: int = 0

    def check(self, teacher_layers: int) -> None:
        """Raises ValueError on settings that cannot work, naming the field."""
        if not 0 <= self.layers < teacher_layers:
            raise ValueError(f"layers must be in [0, {teacher_layers - 1}] (the teacher has "
                             f"{teacher_layers} blocks; 0: a word bag), got "
                             f"{self.layers}")
        for name in ("epochs", "batch_size", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.title_queries < 0 or self.bag_words < 0:
            raise ValueError(f"title_queries and bag_words must be >= 0, got "
                             f"{self.title_queries} and {self.bag_words}")
        if not (self.lr > 0 and self.temperature > 0 and self.kl_weight >= 0):
            raise ValueError("lr and temperature must be > 0 and kl_weight >= 0")


def student_encoder(teacher: SearchPipeline, encoder_path: str, layers: int,
                    out_dir: str) -> str:
    """Exports the teacher's (fine-tuned) embeddings and first `layers` blocks as a
    TF-Hub-format encoder under `out_dir`; returns its path.

    Raises:
      ValueError: the teacher's encoder is not a tfrec text export, or a weight is missing.
    """
    info = read_export_info(encoder_path, ENCODER_KIND)
    config = BertConfig.from_dict({**info["config"], "num_layers": layers})
    student = build_encoder(config)
    sources = {canonical_weight_name(v.name): v
               for v in teacher.two_tower.query_encoder.encoder.weights
               if "lora_" not in v.name}
    for name, target in encoder_weights(student).items():
        if name not in sources:
            raise ValueError(f"the teacher's encoder has no weight {name!r} to start the "
                             "student from")
        target.assign(sources[name])
    return export_encoder(student, os.path.join(out_dir, STUDENT_ENCODER),
                          read_vocab(vocab_path(encoder_path)), info["lower_case"],
                          overwrite=True, keep_accents=info.get("keep_accents", False),
                          source=f"first {layers} blocks of the fine-tuned {encoder_path}")


def distill_queries(data: SearchData, count: int, seed: int) -> List[str]:
    """Training queries plus up to `count` product titles (pseudo-queries), shuffled."""
    queries = data.splits["train"]["query"].astype(str).unique().tolist()
    titles = data.catalog["title"].astype(str).tolist()
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(titles), size=min(count, len(titles)), replace=False)
    texts = queries + [titles[i] for i in picked]
    rng.shuffle(texts)
    return texts


def teacher_targets(pipeline: SearchPipeline, queries: Sequence[str], top_k: int,
                    batch: int = 256) -> Dict[str, np.ndarray]:
    """Teacher query vectors [Q, H], top-k product rows [Q, K] and their scaled scores."""
    vectors, rows, scores = [], [], []
    scale = float(tf.exp(pipeline.two_tower.log_scale))
    for start in range(0, len(queries), batch):
        q = pipeline.query_vectors(tf.constant(queries[start:start + batch]))
        values, top = tf.math.top_k(tf.matmul(q, pipeline.product_vectors, transpose_b=True),
                                    top_k)
        vectors.append(q.numpy())
        rows.append(top.numpy())
        scores.append(scale * values.numpy())
    return {"vectors": np.concatenate(vectors), "rows": np.concatenate(rows),
            "scores": np.concatenate(scores)}


def _stage_metrics(pipeline: SearchPipeline, split, row_of, stages=STAGES) -> Dict[str, dict]:
    present = [s for s in stages if s != "two_tower+ranker" or pipeline.ranker is not None]
    return {k: v.summary() for k, v in evaluate_stages(pipeline, split, row_of,
                                                       tuple(present)).items()}


def _side(pipeline: SearchPipeline, split, row_of, timed: Sequence[str]) -> Dict[str, dict]:
    """Test metrics and batch-1 latency of one side (teacher or student); with feedback
    products, also its ranked lists without them (the feedback query and the ranker slots
    it fills, plus a second catalog pass when `feedback_pool` is 0)."""
    out = {"metrics": _stage_metrics(pipeline, split, row_of),
           "latency_ms": query_latency_ms(pipeline, timed) if timed else {}}
    if pipeline.feedback_extra:
        with pipeline.feedback_settings(extra=0):
            out["metrics_no_feedback_products"] = _stage_metrics(
                pipeline, split, row_of, ("bm25", "two_tower+ranker"))
            if timed:
                out["latency_ms"]["search_no_feedback_products"] = batch1_latency_ms(
                    {"search": tf.function(lambda q: pipeline.search(q, 10))},
                    timed)["search"]
    return out


def query_latency_ms(pipeline: SearchPipeline, queries: Sequence[str]) -> Dict[str, float]:
    """Median batch-1 ms of the query tower (vectors + the catalog top-100 by the first
    pass `search` uses: exact, coarse or IVF) and of `search`."""
    fns = {"query_tower": tf.function(
               lambda q: pipeline.dense_rows(pipeline.query_vectors(q), 100)),
           "search": tf.function(lambda q: pipeline.search(q, 10))}
    return batch1_latency_ms(fns, queries)


def batch1_latency_ms(fns: Dict[str, Callable], queries: Sequence[str]) -> Dict[str, float]:
    """Median ms of each query function called on one query at a time (after one call)."""
    out = {}
    for name, fn in fns.items():
        fn(tf.constant(queries[:1]))
        times = []
        for q in queries:
            start = time.perf_counter()
            fn(tf.constant([q]))
            times.append(time.perf_counter() - start)
        out[name] = 1000 * float(np.median(times))
    return out


def _train_student(pipeline: SearchPipeline, targets: Dict[str, np.ndarray],
                   queries: Sequence[str], settings: DistillConfig, val_ndcg) -> List[float]:
    """Fits the student (already in `pipeline`) to the targets; restores the best epoch."""
    two_tower = pipeline.two_tower
    variables = (two_tower.query_encoder.trainable_variables
                 + two_tower.query_adapter.trainable_variables)
    optimizer = (LazyAdam(settings.lr) if isinstance(two_tower.query_encoder, WordBagEncoder)
                 else tf.keras.optimizers.Adam(settings.lr))
    products = tf.constant(pipeline.product_vectors.numpy())  # the frozen product side
    scale = tf.exp(two_tower.log_scale)
    tau = settings.temperature

    @tf.function
    def step(batch_queries, t_vectors, t_rows, t_scores):
        with tf.GradientTape() as tape:
            s = two_tower.query_vectors(batch_queries, training=True)
            cosine = tf.reduce_mean(1.0 - tf.reduce_sum(s * t_vectors, axis=-1))
            s_scores = scale * tf.einsum("bh,bkh->bk", s, tf.gather(products, t_rows))
            kl = tf.reduce_mean(tf.keras.losses.kl_divergence(
                tf.nn.softmax(t_scores / tau), tf.nn.softmax(s_scores / tau)))
            loss = cosine + settings.kl_weight * kl
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    dataset = (tf.data.Dataset.from_tensor_slices(
        (np.asarray(queries, dtype=object).astype(str), targets["vectors"],
         targets["rows"].astype(np.int32), targets["scores"].astype(np.float32)))
        .shuffle(len(queries), seed=settings.seed).batch(settings.batch_size))
    scores = [val_ndcg()]
    best, best_weights = scores[0], [v.numpy() for v in variables]
    for epoch in range(settings.epochs):
        losses = [float(step(*batch)) for batch in dataset]
        scores.append(val_ndcg())
        log.info("distill epoch %d: loss %.4f, val ndcg@10 %.4f", epoch + 1,
                 float(np.mean(losses)), scores[-1])
        if scores[-1] > best:
            best, best_weights = scores[-1], [v.numpy() for v in variables]
    for v, w in zip(variables, best_weights):
        v.assign(w)
    pipeline.refresh_product_vectors()
    return scores


def distill_search(run: str, workdir: str, settings: Optional[DistillConfig] = None,
                   latency_queries: int = 50) -> Dict[str, object]:
    """Distils the search run at `run` into `<workdir>/search` (a run `tfrec search index`
    and export read like any other); returns teacher vs student metrics and latency.

    Args:
      run: a `tfrec search train` workdir (or its search/ dir): the teacher.
      workdir: output: the student encoder, the student run, metrics.json.
      settings: DistillConfig (defaults if None).
      latency_queries: test queries timed at batch 1 (0: no timing).

    Raises:
      FileNotFoundError: no trained run at `run`.
      ValueError: bad settings, or a teacher encoder that is not a tfrec text export.
    """
    settings = settings or DistillConfig()
    run = resolve_search_run(run)
    cfg = SearchConfig.from_yaml(os.path.join(run, "model", "config.yaml"))
    if cfg.query_encoder != "bert":
        raise ValueError(f"the teacher run {run!r} has a {cfg.query_encoder!r} query encoder: "
                         "distil a run trained with BERT")
    teacher_layers = int(read_export_info(cfg.encoder, ENCODER_KIND)["config"]["num_layers"])
    settings.check(teacher_layers)
    start = time.perf_counter()
    data = load_search_data(cfg)
    cache = os.path.join(os.path.dirname(os.path.abspath(run)), "cache")
    pipeline, _ = load_search_pipeline(run, data.catalog, cache_dir=cache)
    row_of, test, val = data.row_of, data.splits["test"], data.splits["val"]
    timed = sorted(test["query"].unique())[:latency_queries]
    teacher = _side(pipeline, test, row_of, timed)
    os.makedirs(workdir, exist_ok=True)
    queries = distill_queries(data, settings.title_queries, settings.seed)
    targets = teacher_targets(pipeline, queries, min(settings.top_k, len(data.catalog)))
    teacher_encoder = pipeline.two_tower.query_encoder
    encoder_path, words = None, []
    if settings.layers:
        encoder_path = student_encoder(pipeline, cfg.encoder, settings.layers, workdir)
        student_fields = {"encoder": encoder_path}
    else:
        texts = (data.catalog["title"].astype(str).tolist()
                 + data.splits["train"]["query"].astype(str).unique().tolist())
        words = multi_piece_words(teacher_encoder.tokenize, texts, max_word_pieces(
            len(read_vocab(vocab_path(cfg.encoder)))), settings.bag_words)
        student_fields = {"query_encoder": "word_bag", "word_bag_words": len(words)}
    student_cfg = dataclasses.replace(cfg, fine_tune=True, top_layers=0, lora_rank=0,
                                      title_encoder=cfg.title_encoder_path, **student_fields)
    encoder = query_encoder_of(student_cfg)
    if isinstance(encoder, WordBagEncoder):
        encoder.start_from(teacher_encoder.encoder, words)
    pipeline.two_tower.query_encoder = encoder

    def val_ndcg() -> float:
        return evaluate_stages(pipeline, val, row_of, ("hybrid",))["hybrid"].summary()[
            "ndcg@10"] if len(val) else float("nan")

    t = time.perf_counter()
    pipeline.set_index(None)  # the product vectors are re-embedded after training
    history = _train_student(pipeline, targets, queries, settings, val_ndcg)
    index_pipeline(pipeline, student_cfg, getattr(pipeline, "tuning_queries", []))
    train_s = time.perf_counter() - t
    student = _side(pipeline, test, row_of, timed)
    out = os.path.join(workdir, "search")
    save_search_run(pipeline, student_cfg, out,
                    categories=getattr(pipeline, "saved_categories", None))
    result = {"teacher": teacher, "student": student, "val_ndcg@10": history,
              "settings": dataclasses.asdict(settings), "student_encoder": encoder_path,
              "teacher_run": os.path.abspath(run), "precision": student_cfg.precision,
              "distill_queries": len(queries),
              "train_s": train_s, "total_s": time.perf_counter() - start,
              "kept_gain_over_bm25": kept_gain(teacher["metrics"], student["metrics"])}
    if "metrics_no_feedback_products" in student:
        # The student without the feedback query's products, against the
        # teacher as it serves (with it).
        result["kept_gain_no_feedback_products"] = kept_gain(
            teacher["metrics"], student["metrics_no_feedback_products"])
    with open(os.path.join(out, "distill.json"), "w") as f:
        json.dump(result, f, indent=2)
    result["pipeline"] = pipeline
    return result


def kept_gain(teacher: Dict[str, dict], student: Dict[str, dict],
              metric: str = "ndcg@10") -> Dict[str, float]:
    """Per stage: (student - BM25) / (teacher - BM25) of `metric` (NaN without a gain)."""
    bm25 = teacher["bm25"][metric]
    out = {}
    for stage in teacher:
        if stage == "bm25" or stage not in student:
            continue
        gain = teacher[stage][metric] - bm25
        out[stage] = (student[stage][metric] - bm25) / gain if gain > 0 else float("nan")
    return out
