"""Trains catalog search from graded judgments: two-tower, then the ranker on held-out lists.

The two-tower learns from the train queries. The ranker must not learn from lists the
two-tower was fitted on (their dense scores are over-confident there), so it trains on
the validation queries' retrieved lists, with a share of them held out to pick its epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.data.homedepot import load_homedepot, split_by_query
from tfrec.features.lexical import LexicalIndex
from tfrec.features.quantize import catalog_rows
from tfrec.features.speller import Speller, SpellerOptions, speller_from_texts
from tfrec.models.catalog_index import check_index_settings
from tfrec.models.encoder_rate import encoder_optimizer
from tfrec.models.losses import SoftmaxListwiseLoss
from tfrec.search.category import (catalog_categories, category_accuracy,
                                   category_targets, prior_accuracy, train_category_head)
from tfrec.search.config import (SearchConfig, check_feedback, check_hybrid_weights,
                                 check_ranker_folds)
from tfrec.search.data import judgments_from_events, product_catalog
from tfrec.search.index import (index_pipeline, load_search_pipeline, query_vectors,
                                save_search_run, saved_vocabularies, tuned_config)
from tfrec.search.metrics import SearchMetrics, catalog_search_metrics, query_gains
from tfrec.search.model import (SearchTwoTower, catalog_word_ids, query_encoder_of,
                                 word_vocabulary)
from tfrec.search.pipeline import SearchPipeline, fuse_hybrid
from tfrec.search.ranker import FEATURES, SearchRanker
from tfrec.training.keep_best import KeepBestEpoch, fit_keep_best
from tfrec.training.strategy import configure_devices, make_strategy
from tfrec.training.warm_start import append_new, transfer_weights

log = logging.getLogger(__name__)

__all__ = ["SearchData", "SearchRun", "load_search_data", "title_vectors", "build_pipeline",
           "train_two_tower", "retrieved_lists", "train_ranker", "evaluate_stages",
           "train_query_categories",
           "train_search", "STAGES"]

STAGES = ("bm25", "two_tower", "hybrid", "two_tower+ranker")
_DEPTH = 100  # ranked products per query kept for metrics (Recall@100)


@dataclasses.dataclass
class SearchData:
    """Judgments, the catalog they define, and the seeded query split."""

    judgments: pd.DataFrame
    catalog: pd.DataFrame  # product_id, title; row i = catalog row i
    splits: Dict[str, pd.DataFrame]

    @functools.cached_property
    def row_of(self) -> Dict[str, int]:
        """Product id -> catalog row, built once (a loop reading it per product rebuilt a
        41k-entry dict on every read)."""
        return {p: i for i, p in enumerate(self.catalog["product_id"])}


@dataclasses.dataclass
class SearchRun:
    """A trained search pipeline with what it measured."""

    pipeline: SearchPipeline
    data: SearchData
    metrics: Dict[str, Dict[str, float]]
    timings: Dict[str, float]
    history: Dict[str, List[float]]
    replicas: int = 1  # devices the two-tower trained on
    # Query-category classifier: source, categories, val/test accuracy ({} if none).
    query_category: Dict[str, object] = dataclasses.field(default_factory=dict)


def load_search_data(cfg: SearchConfig) -> SearchData:
    """Judgments named by the config, their catalog and the train/val/test query split."""
    source = cfg.judgments
    if source.startswith("synthetic:"):
        from tfrec.data.synthetic import generate_world, get_spec
        # synthetic:SPEC or synthetic:SPEC:LANG (e.g. synthetic:tiny:zh, a Chinese shop)
        spec_name, _, lang = (source.split(":", 1)[1] or "tiny").partition(":")
        spec = get_spec(spec_name or "tiny")
        world = generate_world(dataclasses.replace(spec, lang=lang or spec.lang), seed=42)
        judgments = judgments_from_events(world.events, world.catalog)
        catalog = product_catalog(judgments)
        category = dict(zip(world.catalog["item_id"].astype(str), world.catalog["category"]))
        catalog["category"] = catalog["product_id"].astype(str).map(category).fillna("")
    else:
        judgments = load_homedepot(path=source or None, data_dir=cfg.data_dir)
        catalog = product_catalog(judgments)
    return SearchData(judgments, catalog, split_by_query(judgments, cfg.split, seed=cfg.seed))


def title_vectors(cfg: SearchConfig, titles: Sequence[str],
                  cache_dir: Optional[str] = None) -> np.ndarray:
    """Frozen sentence embeddings [N, H] of the titles, cached on disk per title.

    The product tower keeps them frozen, so each title is embedded once per encoder
    setting and shared by runs; a catalog with a few new or edited titles embeds only
    those (`TextVectorCache`).
    """
    from tfrec.text.embedding import cached_sentence_vectors

    return cached_sentence_vectors(titles, cfg.title_encoder_path, cfg.preprocessor,
                                   cfg.title_length, cfg.embed_batch_size, cache_dir,
                                   what="titles", precision=cfg.title_precision)


def build_pipeline(cfg: SearchConfig, data: SearchData, vectors: np.ndarray,
                   grow_from: Optional[Dict[str, List[str]]] = None,
                   ranker_features: int = len(FEATURES)) -> SearchPipeline:
    """Zero-shot pipeline: untrained residuals (= BERT cosine), BM25, no ranker yet.

    Args:
      grow_from: vocabularies of a run to warm-start from ({"words", "id_vocabulary"}):
        its words and ids keep their rows, new ones are appended.
      ranker_features: the ranker's input columns (a warm start keeps its run's).
    """
    titles = data.catalog["title"].tolist()
    train = data.splits["train"]
    vocabulary = word_vocabulary(titles + train["query"].unique().tolist(),
                                 min_count=cfg.word_min_count, analyzer=cfg.word_analyzer)
    id_vocabulary = sorted(set(train["product_id"])) if cfg.id_embeddings else []
    if grow_from is not None:
        vocabulary = append_new(grow_from["words"], vocabulary)
        if cfg.id_embeddings:
            id_vocabulary = append_new(grow_from["id_vocabulary"], id_vocabulary)
    row_of = data.row_of
    encoder = query_encoder_of(cfg)
    two_tower = SearchTwoTower(
        encoder, vectors, catalog_word_ids(titles, vocabulary, analyzer=cfg.word_analyzer),
        len(vocabulary), data.catalog["product_id"].tolist(),
        id_vocabulary=id_vocabulary,
        negatives=cfg.negatives,
        temperature=cfg.temperature,
        negative_rows=sorted({row_of[p] for p in train["product_id"]}),
        word_analyzer=cfg.word_analyzer)
    two_tower.set_word_lookup(vocabulary)
    lexical = LexicalIndex(titles, k1=cfg.bm25_k1, b=cfg.bm25_b, analyzer=cfg.lexical_analyzer)
    return SearchPipeline(two_tower, lexical, None,
                          data.catalog["product_id"].tolist(), titles,
                          candidates=cfg.candidates, hybrid_weight=cfg.hybrid_weight,
                          dense_corrections=cfg.dense_corrections,
                          speller=build_speller(cfg, titles, train["query"].unique()),
                          ranker_features=ranker_features,
                          feedback_weight=cfg.feedback_weight,
                          feedback_keep=cfg.feedback_keep, feedback_top=cfg.feedback_top,
                          feedback_extra=cfg.feedback_extra,
                          feedback_pool=cfg.feedback_pool)


def build_speller(cfg: SearchConfig, titles: Sequence[str],
                  queries: Sequence[str]) -> Optional[Speller]:
    """The run's query speller over `titles` (None when `cfg.speller` is off).

    Args:
      queries: logged queries of the training split only (validation and test queries
        must not teach it which words are known).
    """
    if not cfg.speller:
        return None
    speller, info = speller_from_texts(titles, queries,
                                       SpellerOptions(compounds=cfg.speller_compounds))
    log.info("speller: %d catalog words offered, %d deletion keys, %d known words",
             info["words"], info["keys"], info["known"])
    return speller


def _query_lists(judgments: pd.DataFrame, row_of: Dict[str, int], width: int):
    grouped = judgments.groupby("query", sort=True)
    queries = np.asarray(list(grouped.groups), dtype=object)
    rows = np.full([len(queries), width], -1, np.int32)
    gains = np.zeros([len(queries), width], np.float32)
    for i, (_, g) in enumerate(grouped):
        g = g.sort_values("relevance", ascending=False).head(width)
        rows[i, :len(g)] = [row_of[p] for p in g["product_id"]]
        gains[i, :len(g)] = g["relevance"].to_numpy() - 1.0
    return queries, rows, gains


def _to_depth(rows: np.ndarray) -> np.ndarray:
    """[Q, n] ranked rows padded with -1 / cut to exactly _DEPTH columns."""
    if rows.shape[1] < _DEPTH:
        rows = np.pad(rows, ((0, 0), (0, _DEPTH - rows.shape[1])), constant_values=-1)
    return rows[:, :_DEPTH]


def _ranked(pipeline: SearchPipeline, queries: Sequence[str], stage: str,
            batch: int = 64) -> np.ndarray:
    """[Q, 100] catalog rows of one stage, best first (-1 pads)."""
    parts = []
    for start in range(0, len(queries), batch):
        q = tf.constant(list(queries[start:start + batch]))
        if stage == "two_tower+ranker":
            rows = pipeline.search(q, num_results=pipeline.list_width)["rows"].numpy()
        elif stage == "two_tower" and pipeline.ivf is not None:  # the list the index serves
            rows = pipeline.retrieve(q)["rows"][:, :pipeline.candidates].numpy()
        else:
            key = {"two_tower": "dense", "bm25": "bm25", "hybrid": "hybrid"}[stage]
            scores = pipeline.catalog_scores(q)[key]
            rows = tf.math.top_k(scores, min(_DEPTH, pipeline.num_products))[1].numpy()
        parts.append(_to_depth(rows))
    return np.concatenate(parts) if parts else np.zeros([0, _DEPTH], np.int64)


def evaluate_stages(pipeline: SearchPipeline, judgments: pd.DataFrame,
                    row_of: Dict[str, int], stages: Sequence[str] = STAGES
                    ) -> Dict[str, SearchMetrics]:
    """Full-catalog NDCG@10 / Recall@100 / MRR of each stage on the judged queries."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {STAGES}")
    if "two_tower+ranker" in stages and pipeline.ranker is None:
        raise ValueError("stage 'two_tower+ranker' needs a trained ranker (train_ranker)")
    queries = sorted(judgments["query"].unique())
    gains = query_gains(judgments, row_of, queries)
    return {s: catalog_search_metrics(_ranked(pipeline, queries, s), gains) for s in stages}


def tune_hybrid_weight(pipeline: SearchPipeline, weights: Sequence[float],
                       judgments: pd.DataFrame, row_of: Dict[str, int],
                       batch: int = 64) -> Dict[float, float]:
    """Sets the pipeline's hybrid weight (BM25 share) to the one of `weights` with the best
    NDCG@10 over `judgments` (validation queries); returns weight -> NDCG@10.

    How much BM25 adds to the two-tower depends on the catalog's text and the tower's
    fit (a keyword-heavy log wants more), so it is measured per run, not fixed.

    Raises:
      ValueError: no weights, a weight outside [0, 1], or no judged queries.
    """
    if not weights:
        raise ValueError("hybrid weights must be a non-empty list of numbers in [0, 1]")
    check_hybrid_weights(weights, "hybrid weights")
    weights = [float(w) for w in weights]
    queries = sorted(judgments["query"].unique())
    if not queries:
        raise ValueError("tuning the hybrid weight needs judged validation queries")
    depth = min(_DEPTH, pipeline.num_products)
    ranked: Dict[float, List[np.ndarray]] = {w: [] for w in weights}
    for start in range(0, len(queries), batch):
        scores = pipeline.catalog_scores(tf.constant(queries[start:start + batch]))
        for w in weights:  # one pass of the query tower for every weight
            fused = fuse_hybrid(scores["dense_z"], scores["bm25_z"], w)
            ranked[w].append(_to_depth(tf.math.top_k(fused, depth)[1].numpy()))
    gains = query_gains(judgments, row_of, queries)
    ndcg = {w: catalog_search_metrics(np.concatenate(r), gains).summary()["ndcg@10"]
            for w, r in ranked.items()}
    pipeline.hybrid_weight = max(weights, key=ndcg.__getitem__)  # ties: the first
    return ndcg


def tune_feedback(pipeline: SearchPipeline, weights: Sequence[float],
                  judgments: pd.DataFrame, row_of: Dict[str, int],
                  extras: Sequence[int] = (0,), batch: int = 64
                  ) -> Dict[Tuple[int, float], float]:
    """Sets the pipeline's feedback extra products and weight to the pair of `extras` x
    `weights` with the best Recall@100 over `judgments` (validation queries); returns
    (extra, weight) -> Recall@100.

    The feedback re-orders only what follows the ranker's head and adds products to
    the list, so the deep recall is what it can change; whether the catalog's product
    lines make the centroid a good guide is measured per run.

    Raises:
      ValueError: no ranker, no weights or extras, a weight below 0, an extra below 0,
        or no judged queries.
    """
    if pipeline.ranker is None:
        raise ValueError("tuning the feedback needs a trained ranker (train_ranker)")
    if not weights or not extras:
        raise ValueError("feedback weights must be a non-empty list of numbers >= 0 and "
                         "feedback extras a non-empty list of integers >= 0")
    check_feedback(weights, pipeline.feedback_keep, pipeline.feedback_top, extras=extras)
    grid = [(int(e), float(w)) for e in extras for w in weights]
    queries = sorted(judgments["query"].unique())
    if not queries:
        raise ValueError("tuning the feedback needs judged validation queries")
    ranked: Dict[Tuple[int, float], List[np.ndarray]] = {g: [] for g in grid}
    for start in range(0, len(queries), batch):
        q = tf.constant(queries[start:start + batch])
        for extra in dict.fromkeys(e for e, _ in grid):
            r = pipeline.retrieve(q, extra=extra)
            logits = pipeline.ranker(pipeline.ranker_inputs(r), training=False)
            for w in weights:  # one retrieval and ranker pass per extra for every weight
                scores = pipeline.with_feedback(logits, r, float(w))
                order = tf.math.top_k(scores, min(_DEPTH, int(scores.shape[1])))[1]
                ranked[(extra, float(w))].append(
                    _to_depth(tf.gather(r["rows"], order, batch_dims=1).numpy()))
    gains = query_gains(judgments, row_of, queries)
    recall = {g: catalog_search_metrics(np.concatenate(r), gains).summary()["recall@100"]
              for g, r in ranked.items()}
    best = max(grid, key=recall.__getitem__)  # ties: the first (fewer extras, lower weight)
    pipeline.feedback_extra, pipeline.feedback_weight = best
    return recall


def train_two_tower(pipeline: SearchPipeline, cfg: SearchConfig, data: SearchData,
                    log_dir: Optional[str] = None) -> Dict[str, List[float]]:
    """Fits the two-tower on the train queries; keeps the epoch with the best val NDCG@10.

    Validation ranks the whole catalog by the hybrid score, the list the ranker sees.
    """
    model = pipeline.two_tower
    row_of = data.row_of
    queries, rows, gains = _query_lists(data.splits["train"], row_of, width=16)
    if len(queries) == 0:
        raise ValueError("no training queries: the split left the train share empty")
    tf.random.set_seed(cfg.seed)
    dataset = (tf.data.Dataset.from_tensor_slices(
        {"query": queries.astype(str), "rows": rows, "gains": gains})
        .shuffle(len(queries), seed=cfg.seed, reshuffle_each_iteration=True)
        .batch(cfg.batch_size, drop_remainder=len(queries) >= cfg.batch_size))
    with model.distribute_strategy.scope():  # optimizer slots beside the variables
        model.encoder_optimizer = encoder_optimizer(
            cfg.lora_lr if model.query_encoder.adapters else cfg.encoder_lr)
        model.compile(optimizer=tf.keras.optimizers.Adam(cfg.lr))
    val = data.splits["val"]

    def val_ndcg() -> float:
        pipeline.refresh_product_vectors()
        return evaluate_stages(pipeline, val, row_of, ("hybrid",))["hybrid"].summary()[
            "ndcg@10"] if len(val) else float("nan")

    # Only trainable variables change; the frozen title table alone is 63 MB on Home Depot.
    # The untrained model (zero-shot encoder) competes too; NaN (no val queries) keeps
    # the last epoch.
    callbacks = [tf.keras.callbacks.TensorBoard(os.path.join(log_dir, "two_tower"),
                                                update_freq=20)] if log_dir else []
    fitted, _ = fit_keep_best(model, dataset, cfg.epochs, val_ndcg,
                              variables=lambda: model.trainable_variables, score_initial=True,
                              nan_is_better=True, callbacks=callbacks, verbose=0)
    history = {"loss": fitted["loss"], "val_ndcg@10": fitted["scores"]}
    # Adapters fold into the weights: the ranker, the saved run and exports see the
    # plain encoder.
    model.query_encoder.merge_adapters()
    if log_dir:
        with tf.summary.create_file_writer(
                os.path.join(log_dir, "two_tower", "validation")).as_default():
            for epoch, score in enumerate(fitted["scores"][1:]):
                tf.summary.scalar("epoch_hybrid_ndcg@10", score, step=epoch)
    pipeline.refresh_product_vectors()
    return history


def train_query_categories(pipeline: SearchPipeline, cfg: SearchConfig, data: SearchData
                           ) -> Optional[Dict[str, object]]:
    """Fits the query -> category classifier and attaches it to the pipeline.

    Labels: the categories of each train query's relevant products (gain-weighted);
    the validation queries pick the epoch. Runs after the two-tower (it reads its query
    vectors) and before the ranker (which reads its probabilities).

    Returns:
      None when `cfg.query_category` is "off", the catalog has < 2 categories or no train
      query has a relevant product of a known category, else
      {"categories": CatalogCategories, "val_accuracy", "prior_accuracy", "test_accuracy",
      "test_prior_accuracy", "epoch"}.
    """
    categories = catalog_categories(data.catalog, pipeline.two_tower.title_vectors.numpy(),
                                    cfg.query_category, cfg.category_clusters, cfg.seed)
    if categories is None or len(categories.names) < 2:
        return None
    row_of, count = data.row_of, len(categories.names)
    split = {}
    for name in ("train", "val", "test"):
        queries = sorted(data.splits[name]["query"].unique())
        split[name] = (query_vectors(pipeline, queries),
                       category_targets(data.splits[name], row_of, categories.rows, count,
                                        queries))
    if not (split["train"][1].sum(axis=1) > 0).any():
        log.warning("query category: no training query has a relevant product of a known "
                    "category; no classifier")
        return None
    fitted = train_category_head(*split["train"], *split["val"], epochs=cfg.category_epochs,
                                 seed=cfg.seed)
    head = fitted["head"]
    pipeline.set_query_categories(head, categories.rows, categories.names,
                                  cfg.category_filter)
    test_vectors, test_targets = split["test"]
    info = {"categories": categories, "epoch": fitted["epoch"],
            "val_accuracy": fitted["val_accuracy"], "prior_accuracy": fitted["prior_accuracy"],
            "test_accuracy": category_accuracy(head(test_vectors).numpy(), test_targets)
            if len(test_vectors) else float("nan"),
            "test_prior_accuracy": prior_accuracy(split["train"][1], test_targets)}
    log.info("query categories (%s, %d): validation accuracy %.3f (most common category "
             "%.3f)", categories.source, count, info["val_accuracy"], info["prior_accuracy"])
    return info


def retrieved_lists(pipeline: SearchPipeline, judgments: pd.DataFrame,
                    row_of: Dict[str, int], batch: int = 64) -> Dict[str, np.ndarray]:
    """The retrieved union per judged query, with ranker inputs and graded labels.

    The two retrievers' lists only: the feedback's extra products are tuned after the
    ranker trains (`tune_feedback`) and join the lists at search time.
    """
    queries = sorted(judgments["query"].unique())
    gains = query_gains(judgments, row_of, queries)
    parts: Dict[str, List[np.ndarray]] = {}
    for start in range(0, len(queries), batch):
        r = pipeline.retrieve(tf.constant(queries[start:start + batch]), extra=0)
        for key in ("rows", "valid", "features", "query_vectors"):
            parts.setdefault(key, []).append(r[key].numpy())
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["labels"] = np.asarray([[g.get(int(r), 0.0) if r >= 0 else -1.0 for r in rows]
                                for rows, g in zip(out["rows"], gains)], np.float32)
    out["queries"] = np.asarray(queries, dtype=object)
    return out


class _ShuffledLists(tf.keras.utils.Sequence):
    """Batches of list rows in a new seeded order every epoch (Keras fit input)."""

    def __init__(self, rows: np.ndarray, batch_size: int, rng: np.random.Generator, make):
        super().__init__()
        self.rows, self.batch_size, self.rng, self.make = rows, batch_size, rng, make
        self.order = rng.permutation(rows)

    def __len__(self) -> int:
        return int(np.ceil(len(self.rows) / self.batch_size))

    def __getitem__(self, index: int):
        return self.make(self.order[index * self.batch_size:(index + 1) * self.batch_size])

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(self.rows)


def with_vectors(lists: Dict[str, np.ndarray], product_vectors) -> Dict[str, np.ndarray]:
    """`lists` plus the product vectors its candidates need: "table" [U, H] (each distinct
    row once) and "local" [n, C] (index into it), so lists from another pipeline keep
    that pipeline's vectors at a size bounded by the lists, not by the catalog."""
    unique = np.unique(np.maximum(lists["rows"], 0))
    table = catalog_rows(product_vectors, tf.constant(unique, tf.int32)).numpy()
    local = np.searchsorted(unique, np.maximum(lists["rows"], 0)).astype(np.int32)
    return {**lists, "table": table, "local": local}


def crossfit_lists(cfg: SearchConfig, data: SearchData, vectors: np.ndarray,
                   strategy: tf.distribute.Strategy,
                   start_from: Optional[SearchPipeline] = None,
                   grow_from: Optional[Dict[str, List[str]]] = None
                   ) -> List[Dict[str, np.ndarray]]:
    """Ranker lists of the training queries, each fold retrieved by a two-tower trained
    without it (`cfg.ranker_folds` folds; [] when 0; at most `cfg.ranker_fold_lists` in
    all, a seeded sample of each fold's queries beyond that).

    A two-tower ranks its own training queries better than any query it will serve, so
    their lists would teach the ranker to trust it too much; held-out folds give lists
    like serving's, ~7x more than the validation queries alone on Home Depot.

    Args:
      vectors: the frozen title vectors [N, H] (shared with the main pipeline).
      strategy: where the fold two-towers train (as the main one).
      start_from: a warm-start pipeline whose two-tower weights each fold starts from.
      grow_from: its vocabularies (see `build_pipeline`).

    Returns:
      One `with_vectors` dict per fold (`retrieved_lists` keys + "table", "local").
    """
    folds = cfg.ranker_folds
    check_ranker_folds(folds, cfg.ranker_fold_lists)
    train = data.splits["train"]
    queries = np.asarray(sorted(train["query"].unique()), dtype=object)
    if folds == 0 or len(queries) < folds:
        return []
    rng = np.random.default_rng(cfg.seed + 7)
    fold_of = rng.permutation(len(queries)) % folds
    per_fold = -(-cfg.ranker_fold_lists // folds)  # ceil: at most the cap in all
    features = len(FEATURES) if start_from is None else start_from.ranker_features
    out = []
    for fold in range(folds):
        inside = set(queries[fold_of != fold])
        held = train[~train["query"].isin(inside)]
        listed = queries[fold_of == fold]
        if len(listed) > per_fold:  # the tower trains on all the rest; lists of a sample
            listed = rng.choice(listed, per_fold, replace=False)
        fold_data = dataclasses.replace(data, splits={
            "train": train[train["query"].isin(inside)], "val": data.splits["val"],
            "test": held})
        with strategy.scope():
            pipeline = build_pipeline(cfg, fold_data, vectors, grow_from=grow_from,
                                      ranker_features=features)
            if start_from is not None:
                transfer_weights(start_from.two_tower, pipeline.two_tower)
        train_two_tower(pipeline, cfg, fold_data)
        index_pipeline(pipeline, cfg, sorted(data.splits["val"]["query"].unique()))
        train_query_categories(pipeline, cfg, fold_data)  # the ranker reads its probabilities
        listed_rows = held[held["query"].isin(set(listed))]
        out.append(with_vectors(retrieved_lists(pipeline, listed_rows, data.row_of),
                                pipeline.product_vectors))
        log.info("ranker cross-fitting: fold %d/%d, %d lists", fold + 1, folds,
                 len(out[-1]["queries"]))
        del pipeline
    return out


def train_ranker(pipeline: SearchPipeline, cfg: SearchConfig, data: SearchData,
                 log_dir: Optional[str] = None,
                 start_from: Optional[SearchRanker] = None,
                 extra_lists: Sequence[Dict[str, np.ndarray]] = ()) -> Dict[str, List[float]]:
    """Fits a SearchRanker on the validation queries' retrieved lists; sets pipeline.ranker.

    A `ranker_holdout` share of those queries is never trained on and picks the epoch
    (NDCG@10 of the re-ranked list); the ranker can only improve on the retrieval order
    it is given if that held-out score says so. `start_from`: a trained ranker whose
    weights this one starts from (warm start). `extra_lists`: more training lists with
    their own vectors (`crossfit_lists`); the held-out share stays validation lists.
    """
    row_of = data.row_of
    lists = retrieved_lists(pipeline, data.splits["val"], row_of)
    n = len(lists["queries"])
    if n < 2:
        raise ValueError(f"the ranker needs >= 2 validation queries, got {n}; enlarge the "
                         "validation share of `split`")
    order = np.random.default_rng(cfg.seed).permutation(n)
    held = max(1, int(round(cfg.ranker_holdout * n)))
    parts = [with_vectors(lists, pipeline.product_vectors)] + list(extra_lists)
    offsets = np.cumsum([0] + [len(p["table"]) for p in parts[:-1]])
    table = tf.constant(np.concatenate([p["table"] for p in parts]))
    local = np.concatenate([p["local"] + o for p, o in zip(parts, offsets)])
    stacked = {k: np.concatenate([p[k] for p in parts])
               for k in ("query_vectors", "features", "valid", "labels")}
    fit_rows = np.concatenate([order[held:], np.arange(n, len(local))])
    held_rows = order[:held]
    tf.random.set_seed(cfg.seed)
    ranker = SearchRanker()
    ranker.compile(optimizer=tf.keras.optimizers.Adam(cfg.ranker_lr),
                   loss=SoftmaxListwiseLoss())

    def inputs(rows: np.ndarray) -> Dict[str, tf.Tensor]:
        return {"query_vectors": tf.constant(stacked["query_vectors"][rows]),
                "product_vectors": tf.gather(table, local[rows]),
                "features": tf.constant(stacked["features"][rows]),
                "valid": tf.constant(stacked["valid"][rows])}

    if start_from is not None:
        ranker(inputs(fit_rows[:1]))  # creates the weights
        transfer_weights(start_from, ranker)
    held_gains = query_gains(data.splits["val"], row_of, list(lists["queries"][held_rows]))

    def held_ndcg() -> float:
        scores = ranker(inputs(held_rows), training=False).numpy()
        ranked = np.take_along_axis(lists["rows"][held_rows], np.argsort(-scores, axis=1), 1)
        return catalog_search_metrics(_to_depth(ranked), held_gains).summary()["ndcg@10"]

    batches = _ShuffledLists(fit_rows, cfg.ranker_batch_size,
                             np.random.default_rng(cfg.seed + 1),
                             lambda rows: (inputs(rows), tf.constant(stacked["labels"][rows])))
    keep = KeepBestEpoch(score_fn=held_ndcg, log_key="holdout_ndcg@10")
    callbacks = [keep]
    if log_dir:
        callbacks.append(tf.keras.callbacks.TensorBoard(os.path.join(log_dir, "ranker"),
                                                        update_freq="epoch", write_graph=False))
    fit = ranker.fit(batches, epochs=cfg.ranker_epochs, shuffle=False, verbose=0,
                     callbacks=callbacks)
    history = {"loss": [float(x) for x in fit.history.get("loss", [])],
               "holdout_ndcg@10": list(keep.scores),
               "lists": [float(len(fit_rows))]}
    pipeline.ranker = ranker
    return history


def train_search(cfg: SearchConfig, workdir: str, data: Optional[SearchData] = None,
                 zero_shot: bool = False, log_dir: Optional[str] = None,
                 warm_start: Optional[str] = None) -> SearchRun:
    """The whole search run: data -> frozen title vectors -> two-tower -> ranker -> test.

    Args:
      cfg: the run's SearchConfig.
      workdir: holds the title-vector cache and `search/metrics.json`.
      data: preloaded SearchData (default: load_search_data(cfg)).
      zero_shot: also measure the untrained pipeline (BERT cosine) on the test queries.
      log_dir: TensorBoard directory (default `tensorboard_logs/search/seed<seed>`).
      warm_start: a saved search run (workdir or its search/ dir) whose weights start this
        one: its word and id vocabularies grow, the optimizers start fresh.
    """
    cfg.check()
    if cfg.query_encoder != "bert":
        raise ValueError(f"search.query_encoder {cfg.query_encoder!r} is a distilled "
                         "student: train with the BERT encoder, then `tfrec search distill "
                         "--layers 0` (its words start from the teacher's vectors)")
    check_index_settings(cfg.index_settings())  # before hours of training, not after
    configure_devices(cfg.cpu_devices)
    strategy = make_strategy(cfg.strategy)
    timings: Dict[str, float] = {}
    start = time.perf_counter()
    data = data or load_search_data(cfg)
    vectors = title_vectors(cfg, data.catalog["title"].tolist(),
                            cache_dir=os.path.join(workdir, "cache"))
    timings["title_vectors_s"] = time.perf_counter() - start
    log_dir = log_dir or os.path.join("tensorboard_logs", "search", f"seed{cfg.seed}")
    previous = None
    if warm_start:
        previous, _ = load_search_pipeline(warm_start, data.catalog, index=False,
                                           cache_dir=os.path.join(workdir, "cache"))
    with strategy.scope():
        pipeline = build_pipeline(
            cfg, data, vectors,
            grow_from=None if previous is None else saved_vocabularies(warm_start),
            # A warm-started ranker keeps its input columns.
            ranker_features=len(FEATURES) if previous is None else previous.ranker_features)
        if previous is not None:
            transfer_weights(previous.two_tower, pipeline.two_tower)
    row_of, test = data.row_of, data.splits["test"]
    metrics: Dict[str, Dict[str, float]] = {}
    if zero_shot:
        metrics["minilm_zero_shot"] = evaluate_stages(
            pipeline, test, row_of, ("two_tower",))["two_tower"].summary()
    t = time.perf_counter()
    history = {f"two_tower_{k}": v for k, v in train_two_tower(pipeline, cfg, data,
                                                               log_dir).items()}
    timings["two_tower_s"] = time.perf_counter() - t
    # The ranker learns from, and the test measures, the lists the export serves.
    t = time.perf_counter()
    pipeline.tuning_queries = sorted(data.splits["val"]["query"].unique())
    index_pipeline(pipeline, cfg, pipeline.tuning_queries)
    timings["index_s"] = time.perf_counter() - t
    if cfg.hybrid_weights and len(data.splits["val"]):
        t = time.perf_counter()
        tuned = tune_hybrid_weight(pipeline, cfg.hybrid_weights, data.splits["val"], row_of)
        history["hybrid_weight_val_ndcg@10"] = [tuned[w] for w in sorted(tuned)]
        # The saved config, the fold pipelines and the export use the chosen weight.
        cfg = tuned_config(cfg, pipeline)
        log.info("hybrid weight %.2f (validation NDCG@10 %s)", cfg.hybrid_weight,
                 ", ".join(f"{w:g}: {v:.4f}" for w, v in sorted(tuned.items())))
        timings["hybrid_weight_s"] = time.perf_counter() - t
    t = time.perf_counter()
    categories = train_query_categories(pipeline, cfg, data)
    category_metrics: Dict[str, object] = {}
    if categories is not None:
        category_metrics = {
            "source": categories["categories"].source,
            "categories": len(categories["categories"].names),
            **{k: float(categories[k]) for k in ("val_accuracy", "prior_accuracy",
                                                  "test_accuracy", "test_prior_accuracy")}}
    timings["query_category_s"] = time.perf_counter() - t
    t = time.perf_counter()
    extra = crossfit_lists(cfg, data, vectors, strategy, start_from=previous,
                           grow_from=None if previous is None else saved_vocabularies(warm_start))
    timings["ranker_folds_s"] = time.perf_counter() - t
    t = time.perf_counter()
    history.update({f"ranker_{k}": v for k, v in train_ranker(
        pipeline, cfg, data, log_dir,
        start_from=None if previous is None else previous.ranker, extra_lists=extra).items()})
    timings["ranker_s"] = time.perf_counter() - t
    if (cfg.feedback_weights or cfg.feedback_extras) and len(data.splits["val"]):
        t = time.perf_counter()
        tuned = tune_feedback(pipeline, cfg.feedback_weights or (cfg.feedback_weight,),
                              data.splits["val"], row_of,
                              cfg.feedback_extras or (cfg.feedback_extra,))
        # [extra, weight, Recall@100] in grid order (extras outer).
        history["feedback_val_recall@100"] = [[e, w, v] for (e, w), v in tuned.items()]
        cfg = tuned_config(cfg, pipeline)
        log.info("feedback: %d extra products, weight %.2f (validation Recall@100 %s)",
                 cfg.feedback_extra, cfg.feedback_weight,
                 ", ".join(f"{e}/{w:g}: {v:.4f}" for (e, w), v in tuned.items()))
        timings["feedback_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for stage, m in evaluate_stages(pipeline, test, row_of).items():
        metrics[stage] = m.summary()
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    out = os.path.join(workdir, "search")
    os.makedirs(out, exist_ok=True)
    cfg.to_yaml(os.path.join(out, "config.yaml"))
    # `tfrec search index` rebuilds the run over any catalog.
    save_search_run(pipeline, cfg, out,
                    categories=None if categories is None else categories["categories"])
    with open(os.path.join(out, "metrics.json.tmp"), "w") as f:
        json.dump({"metrics": metrics, "query_category": category_metrics, "timings": timings,
                   "history": history}, f, indent=2)
    os.replace(os.path.join(out, "metrics.json.tmp"), os.path.join(out, "metrics.json"))
    return SearchRun(pipeline, data, metrics, timings, history,
                     replicas=strategy.num_replicas_in_sync, query_category=category_metrics)
