"""Catalog search run configuration (`tfrec search train`).

A separate top-level config: a search run has its own data (graded query-product
judgments) and no users, so it shares no section with the recommendation Config.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import yaml

from tfrec.config import (EXPORT_PRECISIONS, ExportConfig, plain, read_yaml_mapping,
                          set_field)
from tfrec.features.analyzers import check_analyzer, check_bm25


SEARCH_STRATEGIES = ("default", "one_device", "mirrored")
QUERY_ENCODERS = ("bert", "word_bag")


def check_search_strategy(name: str) -> None:
    """Raises a ValueError unless `name` is a strategy search training supports."""
    if name not in SEARCH_STRATEGIES:
        raise ValueError(f"search strategy must be one of {', '.join(SEARCH_STRATEGIES)}, got "
                         f"{name!r} (multi-worker and parameter-server training are for "
                         "recommendation models)")


def check_ranker_folds(folds: int, lists: int = 1) -> None:
    """Raises a ValueError unless `folds` is 0 (validation lists only) or >= 2, and the
    cap on their lists (`ranker_fold_lists`) is >= 1."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 0 or folds == 1:
        raise ValueError(f"ranker_folds must be 0 (the ranker learns from validation lists "
                         f"only) or >= 2 (cross-fitted training-query lists too), got "
                         f"{folds!r}")
    if isinstance(lists, bool) or not isinstance(lists, int) or lists < 1:
        raise ValueError(f"ranker_fold_lists must be an integer >= 1, got {lists!r}")


def check_hybrid_weights(weights: Sequence[Any], what: str) -> None:
    """Raises a ValueError unless every weight is a number in [0, 1] (a BM25 share)."""
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
            raise ValueError(f"{what} must be numbers in [0, 1], got {w!r}")


def check_feedback(weights: Sequence[Any], keep: Any, top: Any,
                   what: str = "feedback", extras: Sequence[Any] = (), pool: Any = 0,
                   candidates: Optional[int] = None) -> None:
    """Raises a ValueError unless every weight is a finite number >= 0, keep / top are
    integers >= 1, every extra an integer >= 0 and the pool 0 or an integer above
    `candidates` (`check_feedback_pool`; `what` prefixes the field names in the message)."""
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) \
                or not math.isfinite(w) or w < 0:
            raise ValueError(f"{what}_weight(s) must be finite numbers >= 0 (0 = off), "
                             f"got {w!r}")
    for name, value in (("keep", keep), ("top", top)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what}_{name} must be an integer >= 1, got {value!r}")
    for value in extras:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{what}_extra(s) must be integers >= 0 (0 = none), "
                             f"got {value!r}")
    check_feedback_pool(pool, candidates, what)


def check_feedback_pool(pool: Any, candidates: Optional[int] = None,
                        what: str = "feedback") -> None:
    """Raises a ValueError unless the pool is 0 or an integer above `candidates`: a pool
    of at most `candidates` rows holds only the dense list itself, so the feedback query
    could never find a new product there."""
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 0:
        raise ValueError(f"{what}_pool must be an integer >= 0 (0 = a second pass over the "
                         f"catalog), got {pool!r}")
    if candidates is not None and 0 < pool <= candidates:
        raise ValueError(f"{what}_pool must be 0 (a second pass over the catalog) or more "
                         f"than the {candidates} candidates: the first pass's top {pool} are "
                         f"the dense list itself, where feedback finds no new product")


def check_coarse(dims: Any, shortlist: Any, candidates: int, min_items: Any = 0) -> None:
    """Raises a ValueError unless dims and min_items are integers >= 0 and, with dims > 0,
    the shortlist an integer >= candidates."""
    for name, value in (("coarse_dims", dims), ("coarse_min_items", min_items)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"search.{name} must be an integer >= 0, got {value!r}")
    if dims and (isinstance(shortlist, bool) or not isinstance(shortlist, int)
                 or shortlist < candidates):
        raise ValueError(f"search.coarse_shortlist must be an integer >= search.candidates "
                         f"({candidates}), got {shortlist!r}")


@dataclass
class SearchConfig:
    """Catalog search run (tfrec search train): judgments -> two-tower + BM25 -> ranker.

    A separate top-level config: a search run has its own data (graded query-product
    judgments) and no users, so it shares no section with the recommendation Config.
    """

    judgments: str = ""  # CSV (Home Depot columns) or "synthetic:<spec>[:<lang>]" (a world's log)
    data_dir: Optional[str] = None  # for the default Home Depot file when judgments == ""
    seed: int = 0  # query split and initialisation
    split: Tuple[float, float, float] = (0.7, 0.1, 0.2)  # distinct queries: train/val/test
    encoder: str = os.path.join("work", "text", "minilm", "encoder")
    preprocessor: str = os.path.join("work", "text", "minilm", "preprocessor")
    # Encoder of the frozen title vectors ("": `encoder`); a distilled run keeps its
    # teacher's here while its query tower runs the smaller student.
    title_encoder: str = ""
    query_length: int = 16  # BERT tokens per query
    # "bert": `encoder` runs on the query; "word_bag": the mean of its words' vectors in
    # `encoder`'s vocabulary (a distilled student, `tfrec search distill --layers 0`).
    query_encoder: str = "bert"
    word_bag_words: int = 0  # word_bag: rows of multi-piece words (set by the distillation)
    title_length: int = 48  # BERT tokens per title (frozen title embeddings)
    top_layers: int = 0  # fine-tune only the last N query-encoder blocks (0 = all)
    fine_tune: bool = True  # train the query encoder (False: frozen BERT + learned residuals)
    # LoRA: > 0 trains rank-r adapters on `lora_targets` projections of the query encoder
    # (of the last top_layers blocks; 0 = all) instead of its weights; merged into the
    # weights after training, so the exported model is the plain encoder.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: Tuple[str, ...] = ("query", "value")
    lora_lr: float = 1e-3  # adapters start at zero and need a larger step than encoder_lr
    epochs: int = 1  # two-tower epochs (the best by validation NDCG@10 is kept)
    batch_size: int = 64  # queries per two-tower step
    negatives: int = 2048  # sampled catalog negatives per step
    temperature: float = 0.05
    encoder_lr: float = 3e-5
    lr: float = 1e-3
    word_min_count: int = 2  # words in the learned bag-of-words vocabulary
    id_embeddings: bool = False  # product-id embeddings for products judged in training
    candidates: int = 100  # per retriever; the ranker re-scores their union (<= 2x)
    # BM25 terms (tfrec.features.analyzers): "light" also splits letter/digit runs
    # ("32x80") and folds plurals ("knobs" finds "Knob"); "plain": the shared tokens.
    lexical_analyzer: str = "light"
    # BM25 term-frequency saturation and title-length normalisation: titles are short and
    # rarely repeat a word, so less of both than the usual 1.2 / 0.75 for long documents.
    bm25_k1: float = 0.6
    bm25_b: float = 0.6
    # Terms of the two-tower's learned title/query word bag (same choices), so a query's
    # "knobs" moves with the title's "knob".
    word_analyzer: str = "light"
    hybrid_weight: float = 0.2  # BM25 share of the fused retrieval score
    # Validation NDCG@10 picks hybrid_weight among these after the two-tower trains (which
    # retriever deserves more weight depends on the catalog); () keeps hybrid_weight.
    hybrid_weights: Tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    # Pseudo-relevance feedback past the ranker's first feedback_keep results: the rest
    # are ordered by ranker z-score + feedback_weight x z-scored cosine to the mean
    # two-tower vector of the feedback_top best hybrid candidates (tfrec.search.feedback).
    # Validation Recall@100 picks the weight among feedback_weights after the ranker
    # trains (0 = off; () keeps feedback_weight).
    feedback_weight: float = 0.0
    feedback_weights: Tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
    feedback_keep: int = 20
    feedback_top: int = 10
    # Products the feedback query (the query vector moved to that centroid) retrieves
    # beyond both lists, added to the ranker's list; validation Recall@100 picks among
    # feedback_extras together with the weight (() keeps feedback_extra).
    feedback_extra: int = 0
    feedback_extras: Tuple[int, ...] = (0, 10, 25, 50)
    # Where the feedback query finds them: 0, a second pass over the catalog (or index);
    # N > candidates, the first dense pass's top N only (one catalog pass per query; at
    # 500-1,000 the same Home Depot validation NDCG@10 / Recall@100 as the second pass).
    feedback_pool: int = 500
    speller: bool = True  # correct words the catalog never uses (added to the BM25 query)
    # The speller also splits fused words into two catalog words ("lawnmower") and joins
    # typed pairs the catalog writes as one ("out door" -> "outdoor").
    speller_compounds: bool = True
    dense_corrections: bool = True  # the query tower also reads the corrections
    # Query -> category classifier (ranker features): auto|catalog|clusters|off; "auto"
    # uses the catalog's category column if it has one; "clusters": title departments
    # (k-means of the title vectors) for catalogs without categories.
    query_category: str = "auto"
    category_clusters: int = 32  # title departments of query_category=clusters
    category_filter: float = 0.0  # >0: retrieve only categories with p >= this x top p
    category_epochs: int = 30
    ranker_epochs: int = 30
    ranker_lr: float = 1e-3
    ranker_holdout: float = 0.2  # share of validation queries that picks the ranker epoch
    # k >= 2: the ranker also learns from every training query's list, each retrieved by
    # one of k two-towers trained without that query's fold (cross-fitting: a tower
    # scores its own training queries too well); 0: validation lists only. Costs k more
    # two-tower fits, each on (k-1)/k of the training queries.
    ranker_folds: int = 2
    # At most this many cross-fitted lists in all (a seeded sample of each fold's
    # queries; its tower still trains on all of the rest): the lists and their candidate
    # vectors are held in memory, and a shop's log can hold millions of queries.
    ranker_fold_lists: int = 20_000
    ranker_batch_size: int = 32
    results: int = 10  # products the exported model returns
    # Top-k of the dense retriever, as `export.*` of recommendation runs: exact | ivf |
    # auto (ivf from index_min_items products); nprobe 0 is tuned to index_target_recall
    # (recall@100 vs exact on the run's validation queries) when the index is built.
    index: str = "auto"
    index_min_items: int = 100_000
    nlist: int = 0
    nprobe: int = 0
    index_target_recall: float = 0.98
    index_recall_floor: float = 0.9
    # > 0 (from coarse_min_items products; an IVF index replaces it): the dense pass scores
    # the catalog on this many leading principal components of the product vectors (doubled
    # until recall@100 vs exact on validation queries reaches index_target_recall), then
    # re-scores its best `coarse_shortlist` with the whole vectors (Home Depot: 0.984-0.987
    # at 96 of MiniLM's 384 and 500, the same validation NDCG@10; 0: one exact pass).
    coarse_dims: int = 96
    coarse_shortlist: int = 500
    coarse_min_items: int = 20_000
    # Storage of the exported product vectors (and a word bag student's tables),
    # EXPORT_PRECISIONS: float32 | bfloat16 (half the bytes, scored in bfloat16) | int8
    # (a quarter, a float32 scale per row).
    precision: str = "float32"
    embed_batch_size: int = 128
    # Encoder matmuls for the frozen title vectors: auto (bfloat16 on CPUs that multiply
    # it natively, else float32) | float32 | bfloat16 (cosine to float32 > 0.999).
    title_precision: str = "auto"
    # Two-tower fine-tuning under tf.distribute: default|one_device|mirrored (the BERT
    # query tower is the cost); the small ranker trains on one device.
    strategy: str = "default"
    cpu_devices: int = 0  # >1 splits the CPU into logical devices (tests of mirrored)

    def check(self) -> None:
        """Raises a ValueError naming the first setting training cannot use (strategy,
        hybrid weights, ranker folds, feedback, analyzers, BM25 k1 / b), before data or
        models load."""
        check_search_strategy(self.strategy)
        if self.query_encoder not in QUERY_ENCODERS:
            raise ValueError(f"search.query_encoder must be one of {list(QUERY_ENCODERS)}, "
                             f"got {self.query_encoder!r}")
        check_hybrid_weights((self.hybrid_weight, *self.hybrid_weights),
                             "search.hybrid_weight and search.hybrid_weights")
        check_ranker_folds(self.ranker_folds, self.ranker_fold_lists)
        check_feedback((self.feedback_weight, *self.feedback_weights), self.feedback_keep,
                       self.feedback_top, "search.feedback",
                       (self.feedback_extra, *self.feedback_extras), self.feedback_pool,
                       self.candidates)
        check_analyzer(self.lexical_analyzer, "search.lexical_analyzer")
        check_analyzer(self.word_analyzer, "search.word_analyzer")
        check_bm25(self.bm25_k1, self.bm25_b, "search.bm25_")
        check_coarse(self.coarse_dims, self.coarse_shortlist, self.candidates,
                     self.coarse_min_items)
        if self.precision not in EXPORT_PRECISIONS:
            raise ValueError(f"search.precision must be one of {list(EXPORT_PRECISIONS)}, "
                             f"got {self.precision!r}")

    def index_settings(self) -> ExportConfig:
        """The index fields as the ExportConfig `tfrec.models.catalog_index` reads."""
        return ExportConfig(index=self.index, index_min_items=self.index_min_items,
                            nlist=self.nlist, nprobe=self.nprobe,
                            index_target_recall=self.index_target_recall,
                            index_recall_floor=self.index_recall_floor)

    @property
    def title_encoder_path(self) -> str:
        """The encoder the title vectors come from."""
        return self.title_encoder or self.encoder

    def to_yaml(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(plain(dataclasses.asdict(self)), f, sort_keys=False)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "SearchConfig":
        cfg = cls()
        for key, value in (raw or {}).items():
            set_field(cfg, key, value, prefix="search")
        return cfg

    @classmethod
    def from_yaml(cls, path: str) -> "SearchConfig":
        return cls.from_dict(read_yaml_mapping(path, "search config file", "fields"))
