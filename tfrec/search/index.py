"""A trained search run kept on disk, and its index over any product table.

Judgments only train the model; the products it searches are an input. The run keeps
what was learned (adapters, word and id embeddings, the ranker, a fine-tuned encoder)
apart from anything sized by the catalog, so `index_products` rebuilds the pipeline
over a new table: titles embedded (cached per title), BM25 and the dense index over
every product, judged or not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.config import set_field
from tfrec.data.schema import SchemaError
from tfrec.features.lexical import LexicalIndex
from tfrec.models.catalog_index import (TuningQueries, check_index_settings, choose_index,
                                        exact_top_k, recall_vs_exact, wants_ivf)
from tfrec.search.category import CatalogCategories, QueryCategoryHead
from tfrec.search.config import SearchConfig, check_coarse
from tfrec.search.model import SearchTwoTower, catalog_word_ids, query_encoder_of
from tfrec.search.pipeline import SearchPipeline
from tfrec.search.ranker import LEGACY_FEATURES, SearchRanker

log = logging.getLogger(__name__)

__all__ = ["RUN_DIR", "tuned_config", "save_search_run", "load_search_pipeline", "read_products",
           "resolve_search_run", "saved_vocabularies", "index_pipeline", "query_vectors"]

RUN_DIR = "search"  # under a `tfrec search train` workdir
MODEL_DIR = "model"
META_FILE = "model.json"
CHECKPOINT = "weights"
CENTROIDS = "category_centroids.npy"  # title departments' k-means centroids
MAX_TUNING_QUERIES = 1000  # validation queries an IVF index is tuned on
PRODUCT_COLUMNS = ("product_id", "title")
OPTIONAL_PRODUCT_COLUMNS = ("brand", "category", "description")


def _parts(two_tower: SearchTwoTower, ranker: Optional[SearchRanker],
           category_head: Optional[QueryCategoryHead] = None) -> Dict[str, object]:
    """What training changed: nothing here is sized by the catalog."""
    parts = {"words": two_tower.words, "ids": two_tower.ids,
             "query_adapter": two_tower.query_adapter,
             "product_adapter": two_tower.product_adapter,
             "log_scale": two_tower.log_scale, "query_encoder": two_tower.query_encoder}
    if ranker is not None:
        parts["ranker"] = ranker
    if category_head is not None:
        parts["category_head"] = category_head
    return parts


def _id_vocabulary(two_tower: SearchTwoTower, product_ids: List[str]) -> List[str]:
    """Product ids with a learned embedding, in embedding-row order."""
    index = two_tower.id_index.numpy()
    vocabulary = [""] * int(index.max(initial=0))
    for row, slot in enumerate(index):
        if slot > 0:
            vocabulary[slot - 1] = product_ids[row]
    return vocabulary


def query_vectors(pipeline: SearchPipeline, queries: Sequence[str],
                  batch: int = 256) -> np.ndarray:
    """[Q, H] query vectors as the pipeline serves them (cleaned, with the speller's
    corrections when the query tower reads them), a batch at a time."""
    parts = [pipeline.query_vectors(tf.constant(list(queries[s:s + batch]))).numpy()
             for s in range(0, len(queries), batch)]
    return np.concatenate(parts) if parts else np.zeros([0, pipeline.two_tower.dim],
                                                        np.float32)


def tuning_sample(queries: Sequence[str], seed: int) -> List[str]:
    """At most MAX_TUNING_QUERIES of `queries`, in their order: a seeded sample, not a
    prefix (validation queries come sorted, and a prefix would be alphabetical)."""
    queries = list(queries)
    if len(queries) <= MAX_TUNING_QUERIES:
        return queries
    keep = np.random.default_rng(seed).choice(len(queries), MAX_TUNING_QUERIES, replace=False)
    return [queries[i] for i in np.sort(keep)]


def index_pipeline(pipeline: SearchPipeline, cfg: SearchConfig,
                   queries: Sequence[str] = ()) -> Dict:
    """Builds the dense retriever's index the config asks for over the current product
    vectors (exact, IVF with nprobe tuned on `queries`, or exact with a coarse first pass
    whose recall vs exact is measured on them) and sets it on `pipeline`.

    Args:
      pipeline: product vectors final (refresh drops nothing after this; it refuses).
      cfg: the run's index settings (`index`, `nlist`, `nprobe`, targets).
      queries: real queries to tune nprobe and measure recall vs exact on (validation
        queries; a seeded sample of MAX_TUNING_QUERIES when there are more); none: a
        sample of the catalog's own vectors stands in (the card says so).

    Returns:
      The index card (also `pipeline.index_card`, and the export's model card).

    Raises:
      ValueError: bad index settings.
    """
    settings = cfg.index_settings()
    check_index_settings(settings)
    check_coarse(cfg.coarse_dims, cfg.coarse_shortlist, cfg.candidates, cfg.coarse_min_items)
    pipeline.set_coarse(0)
    pipeline.set_index(None)
    queries = tuning_sample(queries, cfg.seed)
    if wants_ivf(settings, pipeline.num_products):
        tuning = (TuningQueries(query_vectors(pipeline, queries), source="validation queries")
                  if queries else None)
        pipeline.set_index(choose_index(pipeline.product_vectors.numpy(), tuning, settings,
                                        seed=cfg.seed))
    elif (0 < cfg.coarse_dims < pipeline.two_tower.dim
          and pipeline.num_products >= max(cfg.coarse_min_items, cfg.coarse_shortlist)):
        tune_coarse(pipeline, cfg, queries)
    return pipeline.index_card


def tune_coarse(pipeline: SearchPipeline, cfg: SearchConfig, queries: Sequence[str]) -> Dict:
    """Sets the coarse first pass (`SearchPipeline.set_coarse`) at `cfg.coarse_dims`,
    doubled until its recall@100 against exact search on `queries` reaches
    `cfg.index_target_recall` (exact search if no width below the vectors' does).

    Returns:
      The card entry (also `pipeline.index_card["coarse"]`): dims, shortlist, recall
      by dims tried, the queries measured on (none: the catalog's first 1,000 vectors
      stand in, and the card says so).
    """
    k = min(100, pipeline.num_products)
    if queries:
        vectors, source = query_vectors(pipeline, queries), "validation queries"
    else:
        vectors = pipeline.product_vectors[:1000].numpy()
        source = "catalog items (no validation queries)"
    truth = exact_top_k(vectors, pipeline.product_vectors.numpy(), k)
    tried, dims = {}, cfg.coarse_dims
    while dims < pipeline.two_tower.dim:
        pipeline.set_coarse(dims, cfg.coarse_shortlist)
        rows = tf.function(lambda q: pipeline.dense_rows(q, k))
        found = np.concatenate([rows(tf.constant(vectors[i:i + 64])).numpy()
                                for i in range(0, len(vectors), 64)])
        tried[str(dims)] = recall_vs_exact(found, truth)
        if tried[str(dims)]["recall@100"] >= cfg.index_target_recall:
            break
        dims *= 2
    else:
        pipeline.set_coarse(0)
        log.warning("coarse first pass below recall@100 %.3f vs exact at every width tried "
                    "(%s): exact search", cfg.index_target_recall, tried)
    card = {"recall_vs_exact": tried, "tuning_queries": len(vectors), "source": source}
    if pipeline.coarse_dims:
        log.info("coarse first pass on %d of %d dims, shortlist %d: %s vs exact (%d %s)",
                 pipeline.coarse_dims, pipeline.two_tower.dim, pipeline.coarse_shortlist,
                 tried[str(dims)], len(vectors), source)
        pipeline.index_card["coarse"].update(card)
    else:
        pipeline.index_card["coarse_tried"] = card
    return card


def tuned_config(cfg: SearchConfig, pipeline: SearchPipeline) -> SearchConfig:
    """`cfg` with the weights validation picked for `pipeline` (hybrid, feedback): what
    the saved run, its config.yaml and the export's card record."""
    return dataclasses.replace(cfg, hybrid_weight=pipeline.hybrid_weight,
                               feedback_weight=pipeline.feedback_weight,
                               feedback_extra=pipeline.feedback_extra)


def save_search_run(pipeline: SearchPipeline, cfg: SearchConfig, run_dir: str,
                    categories: Optional[CatalogCategories] = None) -> str:
    """Writes `<run_dir>/model/` (replaced atomically): config, vocabularies, weights.

    Args:
      pipeline: the trained pipeline.
      cfg: its SearchConfig.
      run_dir: `<workdir>/search` of the run.
      categories: the catalog categories its query-category classifier predicts (how a
        new product table gets them: by name, or by the saved department centroids).

    Returns:
      The model directory.
    """
    two_tower = pipeline.two_tower
    product_ids = [p.decode() for p in pipeline.product_ids.numpy()]
    meta = {"words": list(two_tower.word_lookup.get_vocabulary()[1:]),  # [UNK] is row 0
            "id_vocabulary": _id_vocabulary(two_tower, product_ids),
            "ranker": pipeline.ranker is not None,
            "ranker_features": pipeline.ranker_features,
            "lexical_analyzer": pipeline.lexical.analyzer,
            "word_analyzer": two_tower.word_analyzer,
            "bm25": {"k1": pipeline.lexical.k1, "b": pipeline.lexical.b},
            "trained_products": len(product_ids),
            # The speller is rebuilt over whatever table is indexed, from these queries.
            "speller_queries": getattr(pipeline.speller, "logged_queries", []),
            "speller_compounds": pipeline.speller is not None
                                 and pipeline.speller.options.compounds,
            # What an IVF index over a new table is tuned on (validation queries).
            "tuning_queries": list(getattr(pipeline, "tuning_queries", [])),
            "categories": None}
    head = pipeline.category_head
    if head is not None and categories is not None:
        meta["categories"] = {"names": list(categories.names), "source": categories.source,
                              "filter": pipeline.category_filter}
    os.makedirs(run_dir, exist_ok=True)
    final = os.path.join(run_dir, MODEL_DIR)
    tmp = tempfile.mkdtemp(prefix=".model-", dir=run_dir)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the run dir is shared like any other
    try:
        # The pipeline's own weights (validation may have moved them from cfg's).
        tuned_config(cfg, pipeline).to_yaml(os.path.join(tmp, "config.yaml"))
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False)
        if meta["categories"] is not None and categories.centroids is not None:
            np.save(os.path.join(tmp, CENTROIDS), categories.centroids)
        tf.train.Checkpoint(**_parts(two_tower, pipeline.ranker,
                                     head if meta["categories"] else None)).write(
            os.path.join(tmp, CHECKPOINT))
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def resolve_search_run(path: str) -> str:
    """The run directory holding `model/`: `path` itself or `<path>/search`.

    Raises:
      FileNotFoundError: neither holds a saved search model.
    """
    for candidate in (path, os.path.join(path, RUN_DIR)):
        if os.path.isfile(os.path.join(candidate, MODEL_DIR, META_FILE)):
            return candidate
    raise FileNotFoundError(f"{path!r} holds no trained search run (no {RUN_DIR}/{MODEL_DIR}/"
                            f"{META_FILE}); train one with `tfrec search train --workdir DIR`")


def saved_vocabularies(path: str) -> Dict[str, List[str]]:
    """{"words", "id_vocabulary"} of a saved run, in embedding-row order."""
    with open(os.path.join(resolve_search_run(path), MODEL_DIR, META_FILE),
              encoding="utf-8") as f:
        meta = json.load(f)
    return {"words": meta["words"], "id_vocabulary": meta["id_vocabulary"]}


def read_products(path: str) -> pd.DataFrame:
    """A product table (Parquet/CSV): product_id, title and optional brand/category/description.

    Returns:
      The table with string columns (missing optional text -> "").

    Raises:
      FileNotFoundError: no such file.
      SchemaError: unreadable, empty, a required column missing, an id missing or
        duplicated, an empty title (the message names the row).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"product table {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".parquet":
            table = pd.read_parquet(path)
        elif ext == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            raise SchemaError(f"product table {path!r}: unsupported extension {ext!r}; "
                              "use .parquet or .csv")
    except SchemaError:
        raise
    except Exception as e:  # pandas / pyarrow raise many types on corrupt files
        raise SchemaError(f"could not read product table {path!r} ({type(e).__name__}: "
                          f"{e})") from e
    missing = [c for c in PRODUCT_COLUMNS if c not in table.columns]
    if missing:
        raise SchemaError(f"{path}: product table is missing column(s) {missing}; expected "
                          f"{list(PRODUCT_COLUMNS)} (optional: {list(OPTIONAL_PRODUCT_COLUMNS)})")
    if len(table) == 0:
        raise SchemaError(f"{path}: product table has no rows")
    out = {}
    for column in PRODUCT_COLUMNS + OPTIONAL_PRODUCT_COLUMNS:
        if column not in table.columns:
            out[column] = np.full(len(table), "", dtype=object)
            continue
        values = table[column].reset_index(drop=True)
        bad = values.map(lambda v: v is not None and not isinstance(v, str)
                         and not (isinstance(v, float) and np.isnan(v)))
        if column == "product_id":  # numeric ids from Parquet are fine as text
            bad &= ~values.map(lambda v: isinstance(v, (int, np.integer)))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            value = values.iloc[row]
            value = value.item() if isinstance(value, np.generic) else value
            raise SchemaError(f"{path}: column {column!r} must hold text; row {row} has "
                              f"{value!r} ({type(value).__name__})")
        out[column] = values.map(lambda v: "" if v is None or (isinstance(v, float)
                                                                and np.isnan(v))
                                 else str(v).strip()).astype(object)
    products = pd.DataFrame(out)
    for column in PRODUCT_COLUMNS:
        empty = products[column] == ""
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise SchemaError(f"{path}: column {column!r} is empty in {int(empty.sum())} "
                              f"row(s) (first: row {row}); every product needs a {column}")
    duplicated = products["product_id"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise SchemaError(f"{path}: product_id {products['product_id'].iloc[row]!r} appears "
                          f"more than once (first repeat: row {row}); ids must be unique")
    return products


def load_search_pipeline(run_dir: str, products: pd.DataFrame,
                         cache_dir: Optional[str] = None, index: bool = True,
                         overrides: Optional[Dict[str, object]] = None
                         ) -> Tuple[SearchPipeline, SearchConfig]:
    """Rebuilds a trained search pipeline over `products` (any table, no retraining).

    Args:
      run_dir: a run directory (see `resolve_search_run`).
      products: `read_products` output.
      cache_dir: title-vector cache (default: the run's workdir cache, so only titles
        not embedded before cost encoder time).
      index: build the dense retriever's index the config asks for (`index_pipeline`);
        False for a pipeline that only passes its weights on (warm start).
      overrides: SearchConfig fields to change first (e.g. {"index": "ivf"}).

    Returns:
      (pipeline, config of the run).
    """
    from tfrec.search.train import build_speller, title_vectors

    run_dir = resolve_search_run(run_dir)
    model_dir = os.path.join(run_dir, MODEL_DIR)
    cfg = SearchConfig.from_yaml(os.path.join(model_dir, "config.yaml"))
    for key, value in (overrides or {}).items():
        set_field(cfg, key, value, prefix="search")
    check_index_settings(cfg.index_settings())
    check_coarse(cfg.coarse_dims, cfg.coarse_shortlist, cfg.candidates, cfg.coarse_min_items)
    with open(os.path.join(model_dir, META_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    titles = products["title"].astype(str).tolist()
    ids = products["product_id"].astype(str).tolist()
    vectors = title_vectors(cfg, titles, cache_dir=cache_dir or os.path.join(
        os.path.dirname(os.path.abspath(run_dir)), "cache"))
    encoder = query_encoder_of(cfg)
    words = meta["words"]
    # Runs saved before these settings: plain terms for both, BM25 k1 1.2 and b 0.75.
    word_analyzer = meta.get("word_analyzer", "plain")
    two_tower = SearchTwoTower(encoder, vectors,
                               catalog_word_ids(titles, words, analyzer=word_analyzer),
                               len(words), ids, id_vocabulary=meta["id_vocabulary"],
                               negatives=cfg.negatives, temperature=cfg.temperature,
                               word_analyzer=word_analyzer)
    two_tower.set_word_lookup(words)
    ranker = SearchRanker() if meta["ranker"] else None
    # Runs saved before compound splits and joins: a speller without them.
    cfg.speller_compounds = bool(meta.get("speller_compounds", False))
    speller = build_speller(cfg, titles, meta.get("speller_queries", []))
    bm25 = meta.get("bm25", {"k1": 1.2, "b": 0.75})
    lexical = LexicalIndex(titles, k1=bm25["k1"], b=bm25["b"],
                           analyzer=meta.get("lexical_analyzer", "plain"))
    pipeline = SearchPipeline(two_tower, lexical, ranker, ids, titles,
                              candidates=cfg.candidates, hybrid_weight=cfg.hybrid_weight,
                              dense_corrections=cfg.dense_corrections,
                              speller=speller, refresh=False,  # once, after the restore
                              # Runs saved before the later ranker columns read the first 11.
                              ranker_features=meta.get("ranker_features", LEGACY_FEATURES),
                              feedback_weight=cfg.feedback_weight,
                              feedback_keep=cfg.feedback_keep,
                              feedback_top=cfg.feedback_top,
                              feedback_extra=cfg.feedback_extra,
                              feedback_pool=cfg.feedback_pool)
    head = None
    saved = meta.get("categories")
    if saved:
        centroids_file = os.path.join(model_dir, CENTROIDS)
        categories = CatalogCategories(
            np.zeros([0], np.int32), saved["names"], saved["source"],
            np.load(centroids_file) if os.path.isfile(centroids_file) else None)
        head = QueryCategoryHead(len(saved["names"]))
        head.build((None, two_tower.dim))
        pipeline.set_query_categories(head, categories.for_products(products, vectors),
                                      saved["names"], saved.get("filter", 0.0))
        # Kept for a re-save of this pipeline (`tfrec search distill`).
        pipeline.saved_categories = categories
    del vectors  # the two-tower holds its own copy: one catalog-sized array, not two
    if ranker is not None:
        pipeline.search(tf.constant(["x"]), num_results=1)  # creates the ranker's weights
    status = tf.train.Checkpoint(**_parts(two_tower, ranker, head)).read(
        os.path.join(model_dir, CHECKPOINT))
    status.assert_existing_objects_matched().expect_partial()
    # A LoRA run was saved merged (adapters zero): trace the plain encoder from here.
    two_tower.query_encoder.merge_adapters()
    pipeline.refresh_product_vectors()
    pipeline.tuning_queries = meta.get("tuning_queries", [])
    if index:
        index_pipeline(pipeline, cfg, pipeline.tuning_queries)
    learned = set(meta["id_vocabulary"])
    log.info("search index over %d products (%d with a learned id embedding)", len(ids),
             sum(p in learned for p in ids))
    return pipeline, cfg
